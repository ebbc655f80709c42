//! The fabric: a "VPC" namespace that plays the VPC router and mapping service, one namespace per
//! node, and an "outside" namespace beyond an internet gateway, all kept in step with the
//! simulator through [`FabricHooks`].
//!
//! How AWS maps onto it:
//! - **ENI hot-plug**: an attached ENI is a veth pair; the node end (`eth<device>`) carries the
//!   ENI's MAC in the node namespace, the other end (`n<node>e<device>`) stays in the VPC
//!   namespace. Detaching deletes the pair.
//! - **Branch ENIs** (security groups for pods): a branch associated with a node's trunk is
//!   plugged the same way, as its own link `br<vlan>` carrying the branch's MAC, with its
//!   addresses routed and its own source check; the kernels we test on have no 802.1Q links,
//!   so the VLAN on the trunk is played by a link per branch (the plugin's `hotplug` branch
//!   link mode adopts it by MAC). Disassociating deletes the pair, if the plugin has not
//!   already deleted it with the pod.
//! - **Mapping service**: every address and /28 prefix assigned to an ENI (its primary too) is a
//!   `scope link` route towards that ENI's veth in the VPC namespace, with a permanent neighbour
//!   entry per address pointing at the ENI's MAC, so packets reach the ENI that owns the address
//!   however the node answers ARP. The VPC CIDRs are `prohibit` routes: a packet to an address
//!   no ENI holds never leaks to the internet gateway, and its sender gets ICMP
//!   "administratively prohibited" (a hard error on a connected socket) at once. AWS drops such
//!   packets silently; the answer is a deliberate difference so that tests see unreachability
//!   without waiting for a timeout.
//! - **VPC router**: each subnet's gateway (base + 1) is an address of the VPC namespace, and the
//!   VPC-side veths answer ARP by proxy for every routed address (nodes of one subnet ARP for
//!   each other directly).
//! - **Source/destination check**: an nftables table `ip vpc` drops, at prerouting, any packet
//!   that enters from an ENI's veth with a source not assigned to that ENI (a per-ENI interval
//!   set, updated on assign/unassign; the drop rule counts).
//! - **Internet gateway**: the VPC namespace's default route points at the outside namespace
//!   ([`OUTSIDE_ADDR`]); SNAT to the node's primary address happens on the node, as in the
//!   reference. The outside routes everything back to the VPC (it plays the IGW's 1:1 NAT by not
//!   needing one: it sees private sources as they are). With external SNAT
//!   (`AWS_VPC_K8S_CNI_EXTERNALSNAT=true`) a pod's packet leaves its own ENI with the pod's
//!   address and the outside sees that address; the reply needs nothing more, since the VPC
//!   namespace routes every assigned address and prefix to the ENI that holds it (the
//!   mapping service above), whichever ENI the pod is on (tests/tests/network_model.rs).
//! - **IPv6** (issue 10), as AWS does it: each VPC /56 is a `prohibit` route in the VPC
//!   namespace as in IPv4 (ICMPv6 "administratively prohibited", which a connected socket sees
//!   as `EACCES`; the "no route" code would not reach it, being a soft error), each subnet's /64 has
//!   its router address (base + 1) there, and every VPC-side veth carries the ENI gateway
//!   [`ENI_GATEWAY6`] (`fe80:ec2::1`) as its link-local address, which is how a node reaches the
//!   VPC router (its IPv6 default route, `via fe80:ec2::1 dev eth0`; AWS advertises it by RA,
//!   the fabric writes it). Every IPv6 address and /80 prefix assigned to an ENI is a route
//!   `via <the ENI's EUI-64 link-local> dev <its veth>` with a permanent neighbour entry for that
//!   link-local, so a /80 needs one route and no per-address neighbours, and the node never has
//!   to answer neighbour solicitations for its pods. A node's launch-time IPv6 address
//!   (`RunInstances` with `Ipv6AddressCount`) is a `/128` on eth0, as DHCPv6 gives it; the /64
//!   is not on-link, so nodes of one subnet also talk through the router. The source check has
//!   an `ip6 vpc` table like the `ip vpc` one; link-local sources (`fe80::/10`, neighbour
//!   discovery and the gateway) always pass. The outside namespace also holds
//!   [`OUTSIDE_ADDR6`] and routes all of IPv6 back to the VPC (so the VPC's /56s come back).
//! - **Service address**: [`SERVICE_ADDR`] (169.254.169.254) is a VPC-namespace address every
//!   node reaches through its default route, where the simulator's EC2/IMDS server can listen
//!   ([`crate::serve`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use subnet_calc::subnet::Ipv4Cidr;
use vpc_cni_net::testing::TestNetns;
use vpc_cni_net::{sysctl, Netns};
use vpc_sim::hooks::{
    AddressSet, AddressesChanged, BranchAssociated, BranchDisassociated, EniAttached, EniDetached,
    Hooks,
};
use vpc_sim::ipv6::Ipv6Block;

use crate::cmd::{ip_batch, nft, run_in};
use crate::error::{FabricError, Result};

/// The outside namespace's address ("the internet").
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The internet gateway's address on the VPC side of the outside link.
pub const IGW_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Prefix length of the VPC ↔ outside link.
const IGW_PREFIX_LEN: u8 = 24;
/// The outside namespace's IPv6 address ("the IPv6 internet", a documentation address).
pub const OUTSIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x10);
/// The internet gateway's IPv6 address on the VPC side of the outside link.
pub const IGW_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
/// Prefix length of the VPC ↔ outside link in IPv6.
const IGW_PREFIX_LEN6: u8 = 64;
/// The ENI gateway in IPv6 (spec/cni.md 2.5): the VPC router's link-local address on every ENI.
pub const ENI_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0xec2, 0, 0, 0, 0, 0, 1);
/// The link-local service address held by the VPC namespace (IMDS's address in AWS).
pub const SERVICE_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// MTU of every fabric link (EC2's jumbo frames).
pub const FABRIC_MTU: u32 = 9001;
/// nftables table (family `ip`) of the source/destination check in the VPC namespace.
pub const SRCCHK_TABLE: &str = "vpc";

/// A subnet's gateway: base + 1.
pub fn subnet_gateway(cidr: Ipv4Cidr) -> Ipv4Addr {
    Ipv4Addr::from(cidr.base().wrapping_add(1))
}

/// The router address of an IPv6 subnet: base + 1 (reserved by EC2, as in IPv4).
pub fn subnet_router6(block: Ipv6Block) -> Ipv6Addr {
    Ipv6Addr::from(block.base.wrapping_add(1))
}

/// The EUI-64 link-local address the kernel gives a link with `mac` (`02:…` → `fe80::…`); `None`
/// for a malformed MAC.
pub fn eui64_link_local(mac: &str) -> Option<Ipv6Addr> {
    let b: Vec<u8> = mac
        .split(':')
        .map(|x| u8::from_str_radix(x, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let [m0, m1, m2, m3, m4, m5] = <[u8; 6]>::try_from(b).ok()?;
    let iid = [m0 ^ 0x02, m1, m2, 0xff, 0xfe, m3, m4, m5];
    let mut o = [0u8; 16];
    o[0] = 0xfe;
    o[1] = 0x80;
    o[8..].copy_from_slice(&iid);
    Some(Ipv6Addr::from(o))
}

/// Every address of a prefix.
fn prefix_addrs(p: &Ipv4Cidr) -> impl Iterator<Item = Ipv4Addr> {
    (p.base()..=p.last()).map(Ipv4Addr::from)
}

/// An ENI as the fabric wired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniPort {
    /// ENI id.
    pub eni_id: String,
    /// Instance it is attached to.
    pub instance_id: String,
    /// Device index.
    pub device_index: u32,
    /// Network card index.
    pub network_card_index: u32,
    /// MAC (the node end of the veth carries it).
    pub mac: String,
    /// Subnet id.
    pub subnet_id: String,
    /// Subnet CIDR.
    pub subnet: Ipv4Cidr,
    /// Link name in the node namespace (`eth<device>`).
    pub node_ifname: String,
    /// Link name in the VPC namespace.
    pub vpc_ifname: String,
    /// IPv4 addresses routed to it (the primary included).
    pub ipv4: BTreeSet<Ipv4Addr>,
    /// /28 prefixes routed to it.
    pub prefixes: BTreeSet<Ipv4Cidr>,
    /// The subnet's IPv6 /64, if it has one.
    pub subnet6: Option<Ipv6Block>,
    /// The node end's link-local address (EUI-64 of the MAC): the next hop of its IPv6 routes.
    pub link_local: Ipv6Addr,
    /// IPv6 addresses routed to it.
    pub ipv6: BTreeSet<Ipv6Addr>,
    /// IPv6 /80 prefixes routed to it.
    pub ipv6_prefixes: BTreeSet<Ipv6Block>,
}

/// A node (a running instance) as the fabric booted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Instance id.
    pub instance_id: String,
    /// Name of its namespace (`/var/run/netns/<name>`).
    pub ns_name: String,
    /// Its primary ENI.
    pub primary_eni: String,
    /// The primary ENI's MAC (eth0).
    pub primary_mac: String,
    /// Primary private address (on eth0).
    pub primary_ip: Ipv4Addr,
    /// Subnet of the primary ENI.
    pub subnet: Ipv4Cidr,
    /// The primary ENI's first IPv6 address at launch (a /128 on eth0), if it had one.
    pub primary_ipv6: Option<Ipv6Addr>,
    /// The primary ENI's subnet /64, if the subnet has one.
    pub subnet6: Option<Ipv6Block>,
}

impl Node {
    /// Opens the node's namespace.
    pub fn netns(&self) -> Result<Netns> {
        Netns::named(&self.ns_name).map_err(FabricError::net(format!("open {}", self.ns_name)))
    }

    /// The subnet gateway the node routes through.
    pub fn gateway(&self) -> Ipv4Addr {
        subnet_gateway(self.subnet)
    }

    /// The IPv6 gateway the node routes through (every ENI's): [`ENI_GATEWAY6`].
    pub fn gateway6(&self) -> Ipv6Addr {
        ENI_GATEWAY6
    }
}

/// What [`State::plug`] needs to know of an ENI.
struct Plug<'a> {
    eni_id: &'a str,
    instance_id: &'a str,
    mac: &'a str,
    subnet_id: &'a str,
    subnet: Ipv4Cidr,
    device_index: u32,
    network_card_index: u32,
}

struct NodeState {
    index: u32,
    ns: TestNetns,
    info: Option<Node>,
}

#[derive(Default)]
struct State {
    closed: bool,
    vpc: Option<TestNetns>,
    outside: Option<TestNetns>,
    vpc_cidrs: Vec<Ipv4Cidr>,
    vpc_cidrs6: Vec<Ipv6Block>,
    subnets: BTreeMap<String, Ipv4Cidr>,
    subnets6: BTreeMap<String, Ipv6Block>,
    nodes: BTreeMap<String, NodeState>,
    enis: BTreeMap<String, EniPort>,
    /// Branch ENIs plugged into nodes, by branch ENI id.
    branches: BTreeMap<String, EniPort>,
    next_node: u32,
    errors: Vec<String>,
}

impl State {
    fn vpc(&self) -> Result<&TestNetns> {
        self.vpc.as_ref().ok_or(FabricError::Closed)
    }

    fn subnet(&self, id: &str) -> Result<Ipv4Cidr> {
        self.subnets
            .get(id)
            .copied()
            .ok_or_else(|| FabricError::Unknown {
                what: "subnet (register it with Fabric::add_subnet)",
                id: id.to_owned(),
            })
    }

    fn vpc_ip(&self, lines: &[String]) -> Result<()> {
        let vpc = self.vpc()?;
        ip_batch(vpc, vpc.name(), lines)
    }

    fn vpc_nft(&self, lines: &[String]) -> Result<()> {
        let vpc = self.vpc()?;
        nft(vpc, vpc.name(), lines)
    }

    fn attach(&mut self, ev: &EniAttached) -> Result<()> {
        if self.closed {
            return Err(FabricError::Closed);
        }
        let subnet = self.subnet(&ev.subnet_id)?;
        if !self.nodes.contains_key(&ev.instance_id) {
            let ns = TestNetns::new("node").map_err(FabricError::net("create node namespace"))?;
            let node = NodeState {
                index: self.next_node,
                ns,
                info: None,
            };
            self.next_node += 1;
            ip_batch(&node.ns, node.ns.name(), &["link set lo up".into()])?;
            sysctl::write(&node.ns, "net/ipv4/ip_forward", "1")
                .map_err(FabricError::net("node ip_forward"))?;
            // IPv6 forwarding as the reference's init container sets it; links that appear
            // later (hot-plugged ENIs) skip duplicate address detection, so their addresses
            // are usable at once.
            let v6: Vec<(String, String)> = [
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ]
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
            sysctl::write_all(&node.ns, &v6, false)
                .map_err(FabricError::net("node IPv6 sysctls"))?;
            self.nodes.insert(ev.instance_id.clone(), node);
        }
        let node = self
            .nodes
            .get(&ev.instance_id)
            .ok_or_else(|| FabricError::Unknown {
                what: "instance",
                id: ev.instance_id.clone(),
            })?;
        let (node_ifname, vpc_ifname) = if ev.network_card_index == 0 {
            (
                format!("eth{}", ev.device_index),
                format!("n{}e{}", node.index, ev.device_index),
            )
        } else {
            (
                format!("eth{}d{}", ev.network_card_index, ev.device_index),
                format!(
                    "n{}c{}e{}",
                    node.index, ev.network_card_index, ev.device_index
                ),
            )
        };
        let node_ns_name = node.ns.name().to_owned();
        let subnet6 = self.subnets6.get(&ev.subnet_id).copied();
        let mut port = self.plug(
            Plug {
                eni_id: &ev.eni_id,
                instance_id: &ev.instance_id,
                mac: &ev.mac,
                subnet_id: &ev.subnet_id,
                subnet,
                device_index: ev.device_index,
                network_card_index: ev.network_card_index,
            },
            &node_ns_name,
            node_ifname.clone(),
            vpc_ifname,
        )?;
        self.route_addresses(&mut port, &ev.addresses)?;
        if ev.device_index == 0 && ev.network_card_index == 0 {
            let primary =
                ev.addresses
                    .ipv4
                    .first()
                    .copied()
                    .ok_or_else(|| FabricError::Unknown {
                        what: "primary address of ENI",
                        id: ev.eni_id.clone(),
                    })?;
            let gw = subnet_gateway(subnet);
            let primary_ipv6 = ev.addresses.ipv6.first().copied();
            let mut lines = vec![
                format!("link set {node_ifname} up"),
                format!(
                    "addr add {primary}/{} dev {node_ifname}",
                    subnet.prefix_len()
                ),
                format!("route add default via {gw} dev {node_ifname}"),
            ];
            if let Some(a) = primary_ipv6 {
                lines.push(format!("addr add {a}/128 dev {node_ifname} nodad"));
            }
            if subnet6.is_some() {
                lines.push(format!(
                    "route add ::/0 via {ENI_GATEWAY6} dev {node_ifname}"
                ));
            }
            let node = self
                .nodes
                .get(&ev.instance_id)
                .ok_or_else(|| FabricError::Unknown {
                    what: "instance",
                    id: ev.instance_id.clone(),
                })?;
            ip_batch(&node.ns, &node_ns_name, &lines)?;
            sysctl::write(
                &node.ns,
                &format!("net/ipv4/conf/{node_ifname}/rp_filter"),
                "2",
            )
            .map_err(FabricError::net("node eth0 rp_filter"))?;
            let info = Node {
                instance_id: ev.instance_id.clone(),
                ns_name: node_ns_name,
                primary_eni: ev.eni_id.clone(),
                primary_mac: ev.mac.clone(),
                primary_ip: primary,
                subnet,
                primary_ipv6,
                subnet6,
            };
            if let Some(n) = self.nodes.get_mut(&ev.instance_id) {
                n.info = Some(info);
            }
        }
        self.enis.insert(ev.eni_id.clone(), port);
        Ok(())
    }

    /// Routes `set` to the ENI in the VPC namespace and allows it as a source.
    fn route_addresses(&self, port: &mut EniPort, set: &AddressSet) -> Result<()> {
        let dev = &port.vpc_ifname;
        let mut ip = Vec::new();
        let mut elems = Vec::new();
        let neigh = |a: Ipv4Addr| {
            format!(
                "neigh replace {a} lladdr {} dev {dev} nud permanent",
                port.mac
            )
        };
        for a in &set.ipv4 {
            ip.push(format!("route replace {a}/32 dev {dev} scope link"));
            ip.push(neigh(*a));
            elems.push(a.to_string());
        }
        for p in &set.ipv4_prefixes {
            ip.push(format!("route replace {p} dev {dev} scope link"));
            ip.extend(prefix_addrs(p).map(neigh));
            elems.push(p.to_string());
        }
        let mut elems6 = Vec::new();
        let via = port.link_local;
        for a in &set.ipv6 {
            ip.push(format!("route replace {a}/128 via {via} dev {dev}"));
            elems6.push(a.to_string());
        }
        for p in &set.ipv6_prefixes {
            ip.push(format!("route replace {p} via {via} dev {dev}"));
            elems6.push(p.to_string());
        }
        self.vpc_ip(&ip)?;
        let mut nft = Vec::new();
        if !elems.is_empty() {
            nft.push(format!(
                "add element ip {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems.join(", ")
            ));
        }
        if !elems6.is_empty() {
            nft.push(format!(
                "add element ip6 {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems6.join(", ")
            ));
        }
        self.vpc_nft(&nft)?;
        port.ipv4.extend(set.ipv4.iter().copied());
        port.prefixes.extend(set.ipv4_prefixes.iter().copied());
        port.ipv6.extend(set.ipv6.iter().copied());
        port.ipv6_prefixes.extend(set.ipv6_prefixes.iter().copied());
        Ok(())
    }

    fn unroute_addresses(&self, port: &mut EniPort, set: &AddressSet) -> Result<()> {
        let dev = &port.vpc_ifname;
        let mut ip = Vec::new();
        let mut elems = Vec::new();
        let neigh = |a: Ipv4Addr| format!("neigh del {a} dev {dev}");
        for a in set.ipv4.iter().filter(|a| port.ipv4.contains(a)) {
            ip.push(format!("route del {a}/32 dev {dev}"));
            ip.push(neigh(*a));
            elems.push(a.to_string());
        }
        for p in set
            .ipv4_prefixes
            .iter()
            .filter(|p| port.prefixes.contains(p))
        {
            ip.push(format!("route del {p} dev {dev}"));
            ip.extend(prefix_addrs(p).map(neigh));
            elems.push(p.to_string());
        }
        let mut elems6 = Vec::new();
        for a in set.ipv6.iter().filter(|a| port.ipv6.contains(a)) {
            ip.push(format!("route del {a}/128 dev {dev}"));
            elems6.push(a.to_string());
        }
        for p in set
            .ipv6_prefixes
            .iter()
            .filter(|p| port.ipv6_prefixes.contains(p))
        {
            ip.push(format!("route del {p} dev {dev}"));
            elems6.push(p.to_string());
        }
        let mut nft = Vec::new();
        if !elems.is_empty() {
            nft.push(format!(
                "delete element ip {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems.join(", ")
            ));
        }
        if !elems6.is_empty() {
            nft.push(format!(
                "delete element ip6 {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems6.join(", ")
            ));
        }
        // The source check first: once unassigned, the address may no longer be used.
        self.vpc_nft(&nft)?;
        self.vpc_ip(&ip)?;
        for a in &set.ipv4 {
            port.ipv4.remove(a);
        }
        for p in &set.ipv4_prefixes {
            port.prefixes.remove(p);
        }
        for a in &set.ipv6 {
            port.ipv6.remove(a);
        }
        for p in &set.ipv6_prefixes {
            port.ipv6_prefixes.remove(p);
        }
        Ok(())
    }

    fn detach(&mut self, ev: &EniDetached) -> Result<()> {
        if self.closed {
            return Err(FabricError::Closed);
        }
        let port = self
            .enis
            .remove(&ev.eni_id)
            .ok_or_else(|| FabricError::Unknown {
                what: "ENI",
                id: ev.eni_id.clone(),
            })?;
        self.unplug(&port, false)
    }

    /// Plugs an ENI (or a branch ENI) into a node: a veth pair whose node end carries the
    /// ENI's MAC, its VPC end with the IPv6 gateway and a permanent neighbour for the ENI's
    /// link-local address, and the ENI's (empty) source check. Addresses are routed by the
    /// caller.
    fn plug(
        &self,
        p: Plug<'_>,
        node_ns_name: &str,
        node_ifname: String,
        vpc_ifname: String,
    ) -> Result<EniPort> {
        let link_local = eui64_link_local(p.mac).ok_or_else(|| FabricError::Unknown {
            what: "MAC (not six hex octets) of ENI",
            id: format!("{} {}", p.eni_id, p.mac),
        })?;
        let subnet6 = self.subnets6.get(p.subnet_id).copied();
        self.vpc_ip(&[
            format!(
                "link add {vpc_ifname} mtu {FABRIC_MTU} type veth peer name {node_ifname} netns {node_ns_name} address {} mtu {FABRIC_MTU}",
                p.mac
            ),
            format!("link set {vpc_ifname} up"),
            format!("addr add {ENI_GATEWAY6}/64 dev {vpc_ifname} nodad"),
            format!(
                "neigh replace {link_local} lladdr {} dev {vpc_ifname} nud permanent",
                p.mac
            ),
        ])?;
        let port = EniPort {
            eni_id: p.eni_id.to_owned(),
            instance_id: p.instance_id.to_owned(),
            device_index: p.device_index,
            network_card_index: p.network_card_index,
            mac: p.mac.to_owned(),
            subnet_id: p.subnet_id.to_owned(),
            subnet: p.subnet,
            node_ifname,
            vpc_ifname: vpc_ifname.clone(),
            ipv4: BTreeSet::new(),
            prefixes: BTreeSet::new(),
            subnet6,
            link_local,
            ipv6: BTreeSet::new(),
            ipv6_prefixes: BTreeSet::new(),
        };
        // The source check exists before any address is routed to the ENI.
        let t = SRCCHK_TABLE;
        self.vpc_nft(&[
            format!("add set ip {t} s_{vpc_ifname} {{ type ipv4_addr; flags interval; }}"),
            format!("add chain ip {t} c_{vpc_ifname}"),
            format!("add rule ip {t} c_{vpc_ifname} ip saddr != @s_{vpc_ifname} counter drop"),
            format!("add element ip {t} srcchk {{ \"{vpc_ifname}\" : jump c_{vpc_ifname} }}"),
            format!("add set ip6 {t} s_{vpc_ifname} {{ type ipv6_addr; flags interval; }}"),
            format!("add element ip6 {t} s_{vpc_ifname} {{ fe80::/10 }}"),
            format!("add chain ip6 {t} c_{vpc_ifname}"),
            format!("add rule ip6 {t} c_{vpc_ifname} ip6 saddr != @s_{vpc_ifname} counter drop"),
            format!("add element ip6 {t} srcchk {{ \"{vpc_ifname}\" : jump c_{vpc_ifname} }}"),
        ])?;
        Ok(port)
    }

    /// Unplugs a port: deletes its veth pair (if the node end was already deleted, as the
    /// plugin deletes a branch pod's link, the pair is gone already) and its source check.
    fn unplug(&self, port: &EniPort, tolerate_gone: bool) -> Result<()> {
        let dev = &port.vpc_ifname;
        // Deleting one end deletes the pair, its routes and neighbours.
        let r = self.vpc_ip(&[format!("link del {dev}")]);
        if r.is_err() && !tolerate_gone {
            return r;
        }
        let t = SRCCHK_TABLE;
        let mut lines = Vec::new();
        for fam in ["ip", "ip6"] {
            lines.extend([
                format!("delete element {fam} {t} srcchk {{ \"{dev}\" }}"),
                format!("flush chain {fam} {t} c_{dev}"),
                format!("delete chain {fam} {t} c_{dev}"),
                format!("delete set {fam} {t} s_{dev}"),
            ]);
        }
        self.vpc_nft(&lines)
    }

    /// A branch ENI associated with a trunk on a node: plugged into the node as its own link
    /// `br<vlan>` (this kernel has no 802.1Q links; the plugin's `hotplug` branch link mode
    /// adopts it by MAC and renames it `vlan.eth.<vlan>`), with its addresses routed and its
    /// source check, as an ENI.
    fn branch_associate(&mut self, ev: &BranchAssociated) -> Result<()> {
        if self.closed {
            return Err(FabricError::Closed);
        }
        let subnet = self.subnet(&ev.subnet_id)?;
        let node = self
            .nodes
            .get(&ev.instance_id)
            .ok_or_else(|| FabricError::Unknown {
                what: "instance of the trunk",
                id: ev.instance_id.clone(),
            })?;
        let node_ns_name = node.ns.name().to_owned();
        let node_ifname = format!("br{}", ev.vlan_id);
        let vpc_ifname = format!("n{}b{}", node.index, ev.vlan_id);
        let mut port = self.plug(
            Plug {
                eni_id: &ev.branch_eni_id,
                instance_id: &ev.instance_id,
                mac: &ev.branch_mac,
                subnet_id: &ev.subnet_id,
                subnet,
                device_index: ev.vlan_id,
                network_card_index: 0,
            },
            &node_ns_name,
            node_ifname,
            vpc_ifname,
        )?;
        self.route_addresses(&mut port, &ev.addresses)?;
        self.branches.insert(ev.branch_eni_id.clone(), port);
        Ok(())
    }

    fn branch_disassociate(&mut self, ev: &BranchDisassociated) -> Result<()> {
        if self.closed {
            return Err(FabricError::Closed);
        }
        let port = self
            .branches
            .remove(&ev.branch_eni_id)
            .ok_or_else(|| FabricError::Unknown {
                what: "branch ENI",
                id: ev.branch_eni_id.clone(),
            })?;
        self.unplug(&port, true)
    }

    fn assign(&mut self, ev: &AddressesChanged, add: bool) -> Result<()> {
        if self.closed {
            return Err(FabricError::Closed);
        }
        // An ENI that is not attached has nothing to route; its attach event carries every
        // address it holds by then.
        let Some(mut port) = self.enis.remove(&ev.eni_id) else {
            return Ok(());
        };
        let r = if add {
            self.route_addresses(&mut port, &ev.addresses)
        } else {
            self.unroute_addresses(&mut port, &ev.addresses)
        };
        self.enis.insert(ev.eni_id.clone(), port);
        r
    }

    fn record(&mut self, what: &str, r: Result<()>) {
        if let Err(e) = r {
            let mut msg = format!("{what}: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("fabric: {msg}");
            self.errors.push(msg);
        }
    }
}

/// The simulator's view of the fabric: install with
/// `simulator.set_hooks(Box::new(fabric.hooks()))`. Each call does its work before returning
/// (the simulator answers only once the link, routes and checks exist, as EC2's data plane is
/// ready by the time a caller sees the reply); failures are recorded, see [`Fabric::errors`].
#[derive(Clone)]
pub struct FabricHooks {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for FabricHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricHooks").finish_non_exhaustive()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hooks for FabricHooks {
    fn on_attach(&mut self, ev: &EniAttached) {
        let mut s = lock(&self.state);
        let r = s.attach(ev);
        s.record(&format!("attach {} to {}", ev.eni_id, ev.instance_id), r);
    }

    fn on_detach(&mut self, ev: &EniDetached) {
        let mut s = lock(&self.state);
        let r = s.detach(ev);
        s.record(&format!("detach {} from {}", ev.eni_id, ev.instance_id), r);
    }

    fn on_assign(&mut self, ev: &AddressesChanged) {
        let mut s = lock(&self.state);
        let r = s.assign(ev, true);
        s.record(&format!("assign to {}", ev.eni_id), r);
    }

    fn on_unassign(&mut self, ev: &AddressesChanged) {
        let mut s = lock(&self.state);
        let r = s.assign(ev, false);
        s.record(&format!("unassign from {}", ev.eni_id), r);
    }

    fn on_branch_associated(&mut self, ev: &BranchAssociated) {
        let mut s = lock(&self.state);
        let r = s.branch_associate(ev);
        s.record(
            &format!(
                "associate branch {} with {}",
                ev.branch_eni_id, ev.trunk_eni_id
            ),
            r,
        );
    }

    fn on_branch_disassociated(&mut self, ev: &BranchDisassociated) {
        let mut s = lock(&self.state);
        let r = s.branch_disassociate(ev);
        s.record(&format!("disassociate branch {}", ev.branch_eni_id), r);
    }
}

/// The fabric: owns every namespace it creates and deletes them all when dropped (also while a
/// test panics). Names are `vcn-<vpc|out|node>-<pid>-<n>`, unique per test process.
pub struct Fabric {
    state: Arc<Mutex<State>>,
    vpc_name: String,
    outside_name: String,
}

impl std::fmt::Debug for Fabric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fabric")
            .field("vpc", &self.vpc_name)
            .field("outside", &self.outside_name)
            .finish_non_exhaustive()
    }
}

impl Fabric {
    /// Creates the VPC and outside namespaces, the internet-gateway link between them and the
    /// (empty) source/destination check. Needs root.
    pub fn new() -> Result<Fabric> {
        let vpc = TestNetns::new("vpc").map_err(FabricError::net("create VPC namespace"))?;
        let outside =
            TestNetns::new("out").map_err(FabricError::net("create outside namespace"))?;
        let (vpc_name, outside_name) = (vpc.name().to_owned(), outside.name().to_owned());
        let state = Arc::new(Mutex::new(State {
            vpc: Some(vpc),
            outside: Some(outside),
            ..State::default()
        }));
        let fabric = Fabric {
            state,
            vpc_name,
            outside_name,
        };
        fabric.build()?;
        Ok(fabric)
    }

    fn build(&self) -> Result<()> {
        let s = lock(&self.state);
        let vpc = s.vpc()?;
        let outside = s.outside.as_ref().ok_or(FabricError::Closed)?;
        let pairs: Vec<(String, String)> = [
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/default/proxy_arp", "1"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/default/send_redirects", "0"),
            ("net/ipv6/conf/all/forwarding", "1"),
            ("net/ipv6/conf/default/accept_dad", "0"),
            // Every refused IPv6 packet gets its ICMPv6 answer (no per-peer rate limit).
            ("net/ipv6/icmp/ratelimit", "0"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        sysctl::write_all(vpc, &pairs, false).map_err(FabricError::net("VPC sysctls"))?;
        let out_pairs = vec![(
            "net/ipv6/conf/default/accept_dad".to_owned(),
            "0".to_owned(),
        )];
        sysctl::write_all(outside, &out_pairs, false)
            .map_err(FabricError::net("outside sysctls"))?;
        let igw = format!("{IGW_ADDR}/{IGW_PREFIX_LEN}");
        ip_batch(
            vpc,
            vpc.name(),
            &[
                "link set lo up".into(),
                format!("addr add {SERVICE_ADDR}/32 dev lo"),
                format!(
                    "link add igw mtu {FABRIC_MTU} type veth peer name eth0 netns {} mtu {FABRIC_MTU}",
                    outside.name()
                ),
                "link set igw up".into(),
                format!("addr add {igw} dev igw"),
                format!("route add default via {OUTSIDE_ADDR} dev igw"),
                format!("addr add {IGW_ADDR6}/{IGW_PREFIX_LEN6} dev igw nodad"),
                format!("route add ::/0 via {OUTSIDE_ADDR6} dev igw"),
            ],
        )?;
        ip_batch(
            outside,
            outside.name(),
            &[
                "link set lo up".into(),
                "link set eth0 up".into(),
                format!("addr add {OUTSIDE_ADDR}/{IGW_PREFIX_LEN} dev eth0"),
                format!("route add default via {IGW_ADDR} dev eth0"),
                format!("addr add {OUTSIDE_ADDR6}/{IGW_PREFIX_LEN6} dev eth0 nodad"),
                format!("route add ::/0 via {IGW_ADDR6} dev eth0"),
            ],
        )?;
        let t = SRCCHK_TABLE;
        nft(
            vpc,
            vpc.name(),
            &[
                format!("add table ip {t}"),
                format!("add map ip {t} srcchk {{ type ifname : verdict; }}"),
                format!(
                    "add chain ip {t} pre {{ type filter hook prerouting priority -300; policy accept; }}"
                ),
                format!("add rule ip {t} pre iifname vmap @srcchk"),
                format!("add table ip6 {t}"),
                format!("add map ip6 {t} srcchk {{ type ifname : verdict; }}"),
                format!(
                    "add chain ip6 {t} pre {{ type filter hook prerouting priority -300; policy accept; }}"
                ),
                format!("add rule ip6 {t} pre iifname vmap @srcchk"),
            ],
        )
    }

    /// The hooks to install in the simulator (clones share the fabric).
    pub fn hooks(&self) -> FabricHooks {
        FabricHooks {
            state: Arc::clone(&self.state),
        }
    }

    /// Tells the fabric about a VPC CIDR: addresses in it that no ENI holds are refused by the
    /// VPC router (ICMP administratively prohibited) instead of going to the internet gateway.
    pub fn add_vpc_cidr(&self, cidr: Ipv4Cidr) -> Result<()> {
        let mut s = lock(&self.state);
        s.vpc_ip(&[format!("route add prohibit {cidr}")])?;
        s.vpc_cidrs.push(cidr);
        Ok(())
    }

    /// Tells the fabric about a subnet (hook events name subnets by id only) and gives its
    /// gateway address (base + 1) to the VPC router.
    pub fn add_subnet(&self, subnet_id: &str, cidr: Ipv4Cidr) -> Result<()> {
        let mut s = lock(&self.state);
        s.vpc_ip(&[format!("addr add {}/32 dev lo", subnet_gateway(cidr))])?;
        s.subnets.insert(subnet_id.to_owned(), cidr);
        Ok(())
    }

    /// Tells the fabric about a VPC's IPv6 /56: addresses in it that no ENI holds are refused by
    /// the VPC router (ICMPv6 administratively prohibited) instead of going to the internet
    /// gateway.
    pub fn add_vpc_cidr6(&self, block: Ipv6Block) -> Result<()> {
        let mut s = lock(&self.state);
        s.vpc_ip(&[format!("route add prohibit {block}")])?;
        s.vpc_cidrs6.push(block);
        Ok(())
    }

    /// Tells the fabric about a subnet's IPv6 /64 (before any of its ENIs is attached): its
    /// router address (base + 1) becomes an address of the VPC router, and nodes booted in it
    /// get their IPv6 default route via [`ENI_GATEWAY6`].
    pub fn add_subnet6(&self, subnet_id: &str, block: Ipv6Block) -> Result<()> {
        let mut s = lock(&self.state);
        s.vpc_ip(&[format!("addr add {}/128 dev lo", subnet_router6(block))])?;
        s.subnets6.insert(subnet_id.to_owned(), block);
        Ok(())
    }

    /// The VPC IPv6 /56s registered so far.
    pub fn vpc_cidrs6(&self) -> Vec<Ipv6Block> {
        lock(&self.state).vpc_cidrs6.clone()
    }

    /// The VPC namespace's name.
    pub fn vpc_ns_name(&self) -> &str {
        &self.vpc_name
    }

    /// Opens the VPC namespace.
    pub fn vpc_ns(&self) -> Result<Netns> {
        Netns::named(&self.vpc_name).map_err(FabricError::net(format!("open {}", self.vpc_name)))
    }

    /// The outside namespace's name.
    pub fn outside_ns_name(&self) -> &str {
        &self.outside_name
    }

    /// Opens the outside namespace (its address is [`OUTSIDE_ADDR`]).
    pub fn outside_ns(&self) -> Result<Netns> {
        Netns::named(&self.outside_name)
            .map_err(FabricError::net(format!("open {}", self.outside_name)))
    }

    /// The VPC CIDRs registered so far.
    pub fn vpc_cidrs(&self) -> Vec<Ipv4Cidr> {
        lock(&self.state).vpc_cidrs.clone()
    }

    /// The node booted for `instance_id`.
    pub fn node(&self, instance_id: &str) -> Result<Node> {
        lock(&self.state)
            .nodes
            .get(instance_id)
            .and_then(|n| n.info.clone())
            .ok_or_else(|| FabricError::Unknown {
                what: "node",
                id: instance_id.to_owned(),
            })
    }

    /// Every booted node, by instance id.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.state)
            .nodes
            .values()
            .filter_map(|n| n.info.clone())
            .collect()
    }

    /// The ENI as wired, while attached.
    pub fn eni(&self, eni_id: &str) -> Option<EniPort> {
        lock(&self.state).enis.get(eni_id).cloned()
    }

    /// Every attached ENI.
    pub fn enis(&self) -> Vec<EniPort> {
        lock(&self.state).enis.values().cloned().collect()
    }

    /// Every branch ENI plugged into a node (security groups for pods); `device_index` is
    /// its VLAN id, `node_ifname` the name it was plugged with (`br<vlan>`).
    pub fn branches(&self) -> Vec<EniPort> {
        lock(&self.state).branches.values().cloned().collect()
    }

    /// Hook failures so far (empty when the fabric mirrored every event).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }

    /// Packets the source/destination check dropped on `eni_id`'s link so far, IPv4 and IPv6
    /// together.
    pub fn source_check_drops(&self, eni_id: &str) -> Result<u64> {
        Ok(
            self.source_check_drops_of("ip", eni_id)?
                + self.source_check_drops_of("ip6", eni_id)?,
        )
    }

    /// Packets the IPv6 source/destination check dropped on `eni_id`'s link so far.
    pub fn source_check_drops6(&self, eni_id: &str) -> Result<u64> {
        self.source_check_drops_of("ip6", eni_id)
    }

    fn source_check_drops_of(&self, family: &str, eni_id: &str) -> Result<u64> {
        let s = lock(&self.state);
        let port = s.enis.get(eni_id).ok_or_else(|| FabricError::Unknown {
            what: "ENI",
            id: eni_id.to_owned(),
        })?;
        let vpc = s.vpc()?;
        let out = run_in(
            vpc,
            vpc.name(),
            "nft",
            &[
                "list",
                "chain",
                family,
                SRCCHK_TABLE,
                &format!("c_{}", port.vpc_ifname),
            ],
            None,
        )?;
        Ok(parse_counter_packets(&out).unwrap_or(0))
    }

    /// Deletes every namespace now (what dropping does). Later hook calls are recorded as
    /// errors.
    pub fn shutdown(&self) {
        let (nodes, vpc, outside) = {
            let mut s = lock(&self.state);
            s.closed = true;
            s.enis.clear();
            (std::mem::take(&mut s.nodes), s.vpc.take(), s.outside.take())
        };
        // Node namespaces first (their veths die with them), then the VPC and the outside.
        drop(nodes);
        drop(vpc);
        drop(outside);
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The packet count of the first `counter packets N bytes M` in nft's listing.
fn parse_counter_packets(listing: &str) -> Option<u64> {
    let rest = &listing[listing.find("counter packets ")? + "counter packets ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_is_subnet_base_plus_one() {
        let c: Ipv4Cidr = "10.0.2.0/24".parse().unwrap();
        assert_eq!(subnet_gateway(c), Ipv4Addr::new(10, 0, 2, 1));
    }

    #[test]
    fn a_prefix_expands_to_its_sixteen_addresses() {
        let p: Ipv4Cidr = "10.0.2.32/28".parse().unwrap();
        let all: Vec<_> = prefix_addrs(&p).collect();
        assert_eq!(all.len(), 16);
        assert_eq!(all[0], Ipv4Addr::new(10, 0, 2, 32));
        assert_eq!(all[15], Ipv4Addr::new(10, 0, 2, 47));
    }

    #[test]
    fn link_local_is_the_eui64_of_the_mac() {
        assert_eq!(
            eui64_link_local("02:1a:2b:3c:4d:5e"),
            Some("fe80::1a:2bff:fe3c:4d5e".parse().unwrap())
        );
        assert_eq!(
            eui64_link_local("00:00:00:00:00:01"),
            Some("fe80::200:ff:fe00:1".parse().unwrap())
        );
        assert_eq!(eui64_link_local("02:1a:2b:3c:4d"), None);
        assert_eq!(eui64_link_local("02:1a:2b:3c:4d:zz"), None);
    }

    #[test]
    fn the_ipv6_router_is_base_plus_one_and_the_gateway_is_fe80_ec2_1() {
        let b: Ipv6Block = "2600:1f14:abcd:1201::/64".parse().unwrap();
        assert_eq!(
            subnet_router6(b),
            "2600:1f14:abcd:1201::1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(ENI_GATEWAY6.to_string(), "fe80:ec2::1");
    }

    #[test]
    fn drop_counter_is_read_from_the_nft_listing() {
        let listing = "table ip vpc {\n\tchain c_n0e1 {\n\t\tip saddr != @s_n0e1 counter packets 3 bytes 252 drop\n\t}\n}\n";
        assert_eq!(parse_counter_packets(listing), Some(3));
        assert_eq!(parse_counter_packets("chain x {}"), None);
    }
}
