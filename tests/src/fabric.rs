//! The fabric: a "VPC" namespace that plays the VPC router and mapping service, one namespace per
//! node, and an "outside" namespace beyond an internet gateway, all kept in step with the
//! simulator through [`FabricHooks`].
//!
//! How AWS maps onto it:
//! - **ENI hot-plug**: an attached ENI is a veth pair; the node end (`eth<device>`) carries the
//!   ENI's MAC in the node namespace, the other end (`n<node>e<device>`) stays in the VPC
//!   namespace. Detaching deletes the pair.
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
//! - **Service address**: [`SERVICE_ADDR`] (169.254.169.254) is a VPC-namespace address every
//!   node reaches through its default route, where the simulator's EC2/IMDS server can listen
//!   ([`crate::serve`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use subnet_calc::subnet::Ipv4Cidr;
use vpc_cni_net::testing::TestNetns;
use vpc_cni_net::{sysctl, Netns};
use vpc_sim::hooks::{AddressSet, AddressesChanged, EniAttached, EniDetached, Hooks};

use crate::cmd::{ip_batch, nft, run_in};
use crate::error::{FabricError, Result};

/// The outside namespace's address ("the internet").
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The internet gateway's address on the VPC side of the outside link.
pub const IGW_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Prefix length of the VPC ↔ outside link.
const IGW_PREFIX_LEN: u8 = 24;
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
    subnets: BTreeMap<String, Ipv4Cidr>,
    nodes: BTreeMap<String, NodeState>,
    enis: BTreeMap<String, EniPort>,
    next_node: u32,
    errors: Vec<String>,
}

impl State {
    fn vpc(&self) -> Result<&TestNetns> {
        self.vpc.as_ref().ok_or(FabricError::Closed)
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
        let subnet = *self
            .subnets
            .get(&ev.subnet_id)
            .ok_or_else(|| FabricError::Unknown {
                what: "subnet (register it with Fabric::add_subnet)",
                id: ev.subnet_id.clone(),
            })?;
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
        self.vpc_ip(&[
            format!(
                "link add {vpc_ifname} mtu {FABRIC_MTU} type veth peer name {node_ifname} netns {node_ns_name} address {} mtu {FABRIC_MTU}",
                ev.mac
            ),
            format!("link set {vpc_ifname} up"),
        ])?;
        let mut port = EniPort {
            eni_id: ev.eni_id.clone(),
            instance_id: ev.instance_id.clone(),
            device_index: ev.device_index,
            network_card_index: ev.network_card_index,
            mac: ev.mac.clone(),
            subnet_id: ev.subnet_id.clone(),
            subnet,
            node_ifname: node_ifname.clone(),
            vpc_ifname: vpc_ifname.clone(),
            ipv4: BTreeSet::new(),
            prefixes: BTreeSet::new(),
        };
        // The source check exists before any address is routed to the ENI.
        let t = SRCCHK_TABLE;
        self.vpc_nft(&[
            format!("add set ip {t} s_{vpc_ifname} {{ type ipv4_addr; flags interval; }}"),
            format!("add chain ip {t} c_{vpc_ifname}"),
            format!("add rule ip {t} c_{vpc_ifname} ip saddr != @s_{vpc_ifname} counter drop"),
            format!("add element ip {t} srcchk {{ \"{vpc_ifname}\" : jump c_{vpc_ifname} }}"),
        ])?;
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
            ip_batch(
                &node.ns,
                &node_ns_name,
                &[
                    format!("link set {node_ifname} up"),
                    format!(
                        "addr add {primary}/{} dev {node_ifname}",
                        subnet.prefix_len()
                    ),
                    format!("route add default via {gw} dev {node_ifname}"),
                ],
            )?;
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
        self.vpc_ip(&ip)?;
        if !elems.is_empty() {
            self.vpc_nft(&[format!(
                "add element ip {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems.join(", ")
            )])?;
        }
        port.ipv4.extend(set.ipv4.iter().copied());
        port.prefixes.extend(set.ipv4_prefixes.iter().copied());
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
        if !elems.is_empty() {
            self.vpc_nft(&[format!(
                "delete element ip {SRCCHK_TABLE} s_{dev} {{ {} }}",
                elems.join(", ")
            )])?;
        }
        self.vpc_ip(&ip)?;
        for a in &set.ipv4 {
            port.ipv4.remove(a);
        }
        for p in &set.ipv4_prefixes {
            port.prefixes.remove(p);
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
        let dev = &port.vpc_ifname;
        // Deleting one end deletes the pair, its routes and neighbours.
        self.vpc_ip(&[format!("link del {dev}")])?;
        let t = SRCCHK_TABLE;
        self.vpc_nft(&[
            format!("delete element ip {t} srcchk {{ \"{dev}\" }}"),
            format!("flush chain ip {t} c_{dev}"),
            format!("delete chain ip {t} c_{dev}"),
            format!("delete set ip {t} s_{dev}"),
        ])
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
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        sysctl::write_all(vpc, &pairs, false).map_err(FabricError::net("VPC sysctls"))?;
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

    /// Hook failures so far (empty when the fabric mirrored every event).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }

    /// Packets the source/destination check dropped on `eni_id`'s link so far.
    pub fn source_check_drops(&self, eni_id: &str) -> Result<u64> {
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
                "ip",
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
    fn drop_counter_is_read_from_the_nft_listing() {
        let listing = "table ip vpc {\n\tchain c_n0e1 {\n\t\tip saddr != @s_n0e1 counter packets 3 bytes 252 drop\n\t}\n}\n";
        assert_eq!(parse_counter_packets(listing), Some(3));
        assert_eq!(parse_counter_packets("chain x {}"), None);
    }
}
