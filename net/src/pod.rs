//! Per-pod wiring (spec cni.md 2.2–2.5): the [`PodNetwork`] trait in our nouns, its netlink
//! implementation [`NetlinkPodNetwork`], and the pure CHECK comparison both implementations use.
//!
//! Both families: an interface spec ([`PodIfSpec`]) carries an IPv4 or an IPv6 address, and
//! the wiring follows the family (IPv6: `disable_ipv6=0` on the interface and `lo`, `/128`,
//! gateway `fe80::(i+1)`, the /128 added without DAD, `inet6` host rule; spec 2.5). [`PodSpec`] is the
//! IPv4-only form older callers build; it converts into a [`PodIfSpec`].
//!
//! ADD ([`PodNetwork::setup_pod`]) is transactional: whatever it did is undone when a step
//! fails. DEL ([`PodNetwork::teardown_pod`]) works only on the host side, as the reference does,
//! so it is idempotent and indifferent to a vanished pod namespace.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::branch::{
    expected_branch_objects, vlan_link_name, BranchLink, BranchLinkKind, BranchSpec,
    BranchTeardown, HotplugBranchLink, VlanBranchLink, VLAN_RULE_PRIORITY,
};
use crate::error::{NetError, Result};
use crate::names::{
    effective_host_table, pod_gateway_v4, pod_gateway_v6, pod_table, vlan_route_table_id,
    MAX_IFNAME_LEN,
};
use crate::netlink::{Address, Link, Neighbour, Netlink, Route, Rule, RuleFilter, VethEnd};
use crate::netns::Netns;
use crate::sysctl;
use crate::types::{Family, IpCidr, MacAddr, Scope, MAIN_TABLE};

/// Rule priority of `from <podIP> lookup i` inside the pod, for interfaces i > 0.
pub const FROM_INTERFACE_RULE_PRIORITY: u32 = 1;
/// Rule priority of `to <podIP> lookup main` on the host.
pub const TO_CONTAINER_RULE_PRIORITY: u32 = 512;
/// Rule priority of `from <podIP> lookup <ENI table>` on the host.
pub const FROM_POD_RULE_PRIORITY: u32 = 1536;

/// How often ADD looks at an IPv6 pod's addresses while DAD runs (the reference's 50 ms).
pub const DAD_POLL: Duration = Duration::from_millis(50);
/// How long ADD waits for an IPv6 pod's addresses to leave DAD (the reference's 10 s).
pub const DAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The smallest MTU accepted for a pod interface (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// The largest MTU accepted (jumbo frames on EC2).
pub const MAX_MTU: u32 = 9001;

/// What to build for one IPv4 pod interface (the IPv4-only form of [`PodIfSpec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Host-side veth name ([`crate::names::host_veth_name`]).
    pub host_veth: String,
    /// Container-side interface name (`eth0`, `mNicIf<i>`).
    pub container_ifname: String,
    /// Interface index i (0 for the first): gateway `169.254.1.(i+1)`, pod table main or i.
    pub index: u32,
    /// The pod's IPv4 address.
    pub ipv4: Ipv4Addr,
    /// MTU of both veth ends (`POD_MTU`).
    pub mtu: u32,
    /// The host route table of the ENI that owns the address (`RouteTableId`); 0, 1 or 254 mean
    /// main, anything else adds the from-pod rule at 1536.
    pub route_table: u32,
}

/// The part of a pod interface that does not depend on its address (so ADD can build it while
/// ipamd is still choosing one): see [`PodNetwork::prepare_link`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLinkSpec {
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Host-side veth name.
    pub host_veth: String,
    /// Container-side interface name.
    pub container_ifname: String,
    /// MTU of both veth ends.
    pub mtu: u32,
}

impl PodLinkSpec {
    /// Checks names and MTU before anything is touched.
    pub fn validate(&self) -> Result<()> {
        validate_link(&self.host_veth, &self.container_ifname, self.mtu)
    }
}

fn validate_link(host_veth: &str, container_ifname: &str, mtu: u32) -> Result<()> {
    for (what, n) in [
        ("host veth name", host_veth),
        ("container interface name", container_ifname),
    ] {
        if n.is_empty()
            || n.len() > MAX_IFNAME_LEN
            || n.contains(['/', ' ', '\0', ':'])
            || n == "."
            || n == ".."
        {
            return Err(NetError::invalid(format!("{what} {n:?}")));
        }
    }
    if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(NetError::invalid(format!("MTU {mtu}")));
    }
    Ok(())
}

impl PodSpec {
    /// The address-independent part of this interface.
    pub fn link(&self) -> PodLinkSpec {
        PodLinkSpec {
            netns: self.netns.clone(),
            host_veth: self.host_veth.clone(),
            container_ifname: self.container_ifname.clone(),
            mtu: self.mtu,
        }
    }

    /// Checks names, MTU and index before anything is touched.
    pub fn validate(&self) -> Result<()> {
        PodIfSpec::from(self).validate()
    }

    /// The pod's gateway, `169.254.1.(index+1)`.
    pub fn gateway(&self) -> Ipv4Addr {
        pod_gateway_v4(self.index).unwrap_or(crate::names::POD_GATEWAY_V4)
    }

    /// The table used inside the pod (main for index 0, else the index).
    pub fn pod_table(&self) -> u32 {
        pod_table(self.index)
    }

    /// The host table of the from-pod rule (main when `route_table` ≤ 1).
    pub fn host_table(&self) -> u32 {
        effective_host_table(self.route_table)
    }

    /// The teardown request matching this spec.
    pub fn teardown(&self) -> PodTeardown {
        PodTeardown {
            ip: IpAddr::V4(self.ipv4),
            route_table: self.route_table,
        }
    }
}

/// What to build for one pod interface of either family: the IPv4 wiring of spec 2.2 or the
/// IPv6 wiring of spec 2.5, chosen by the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIfSpec {
    /// The pod's network namespace (`CNI_NETNS`).
    pub netns: PathBuf,
    /// Host-side veth name ([`crate::names::host_veth_name`]).
    pub host_veth: String,
    /// Container-side interface name (`eth0`, `mNicIf<i>`).
    pub container_ifname: String,
    /// Interface index i (0 for the first): gateway `169.254.1.(i+1)` or `fe80::(i+1)`, pod
    /// table main or i.
    pub index: u32,
    /// The pod's address (a /32 or a /128 on the interface).
    pub ip: IpAddr,
    /// MTU of both veth ends (`POD_MTU`).
    pub mtu: u32,
    /// The host route table of the ENI that owns the address (`RouteTableId`); 0, 1 or 254 mean
    /// main, anything else adds the from-pod rule at 1536.
    pub route_table: u32,
}

impl From<&PodSpec> for PodIfSpec {
    fn from(s: &PodSpec) -> PodIfSpec {
        PodIfSpec {
            netns: s.netns.clone(),
            host_veth: s.host_veth.clone(),
            container_ifname: s.container_ifname.clone(),
            index: s.index,
            ip: IpAddr::V4(s.ipv4),
            mtu: s.mtu,
            route_table: s.route_table,
        }
    }
}

impl PodIfSpec {
    /// The address-independent part of this interface.
    pub fn link(&self) -> PodLinkSpec {
        PodLinkSpec {
            netns: self.netns.clone(),
            host_veth: self.host_veth.clone(),
            container_ifname: self.container_ifname.clone(),
            mtu: self.mtu,
        }
    }

    /// The address family of the interface.
    pub fn family(&self) -> Family {
        Family::of(&self.ip)
    }

    /// Checks names, MTU, index and address before anything is touched.
    pub fn validate(&self) -> Result<()> {
        validate_link(&self.host_veth, &self.container_ifname, self.mtu)?;
        let gw_ok = match self.ip {
            IpAddr::V4(_) => pod_gateway_v4(self.index).is_some(),
            IpAddr::V6(_) => pod_gateway_v6(self.index).is_some(),
        };
        if !gw_ok {
            return Err(NetError::invalid(format!("interface index {}", self.index)));
        }
        let bad = match self.ip {
            IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_broadcast(),
            IpAddr::V6(a) => {
                a.is_unspecified()
                    || a.is_multicast()
                    || a.is_loopback()
                    || (a.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if bad {
            return Err(NetError::invalid(format!("pod address {}", self.ip)));
        }
        if self.family() == Family::V6 && self.mtu < 1280 {
            return Err(NetError::invalid(format!(
                "MTU {} (IPv6 needs at least 1280)",
                self.mtu
            )));
        }
        Ok(())
    }

    /// The pod's gateway: `169.254.1.(index+1)` or `fe80::(index+1)`.
    pub fn gateway(&self) -> IpAddr {
        match self.ip {
            IpAddr::V4(_) => {
                IpAddr::V4(pod_gateway_v4(self.index).unwrap_or(crate::names::POD_GATEWAY_V4))
            }
            IpAddr::V6(_) => IpAddr::V6(
                pod_gateway_v6(self.index)
                    .unwrap_or(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
            ),
        }
    }

    /// The pod's address as a host prefix (/32 or /128).
    pub fn host_cidr(&self) -> IpCidr {
        IpCidr::host(self.ip)
    }

    /// The table used inside the pod (main for index 0, else the index).
    pub fn pod_table(&self) -> u32 {
        pod_table(self.index)
    }

    /// The host table of the from-pod rule (main when `route_table` ≤ 1).
    pub fn host_table(&self) -> u32 {
        effective_host_table(self.route_table)
    }

    /// The teardown request matching this spec.
    pub fn teardown(&self) -> PodTeardown {
        PodTeardown {
            ip: self.ip,
            route_table: self.route_table,
        }
    }
}

/// What was built, as reported by [`PodNetwork::setup_pod`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodWiring {
    /// Host veth name.
    pub host_veth: String,
    /// Host veth index in the host namespace.
    pub host_ifindex: u32,
    /// Host veth MAC (also the pod's gateway neighbour entry).
    pub host_mac: MacAddr,
    /// Container interface name.
    pub container_ifname: String,
    /// Container interface index in the pod namespace.
    pub container_ifindex: u32,
    /// Container interface MAC.
    pub container_mac: MacAddr,
    /// The pod's address.
    pub ip: IpAddr,
    /// The pod's gateway.
    pub gateway: IpAddr,
    /// The host table of the from-pod rule (main when none was added).
    pub host_table: u32,
    /// MTU of both ends.
    pub mtu: u32,
}

/// What DEL needs: the address and the ENI table it used (from ipamd or prevResult).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodTeardown {
    /// The pod's address (IPv4 or IPv6).
    pub ip: IpAddr,
    /// The ENI route table (0 and 1 mean main, as for legacy state).
    pub route_table: u32,
}

/// What DEL removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TeardownReport {
    /// Host rules deleted (512 and 1536, including stale copies).
    pub rules_deleted: usize,
    /// Whether the host /32 (or /128) route was still there and was deleted.
    pub host_route_deleted: bool,
}

/// The steps of ADD, in order; failures can be injected at any of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetupStep {
    /// Delete a leftover host veth of the same name (a re-created StatefulSet pod).
    RemoveStaleHostVeth,
    /// Create the veth pair from the host namespace, the container end placed directly in the
    /// pod namespace (one request, no move).
    CreateVeth,
    /// Write the host veth's IPv6 sysctls (before link-up).
    HostVethSysctls,
    /// Set the host veth up.
    HostVethUp,
    /// Set the container interface up.
    ContainerLinkUp,
    /// IPv6 only: `disable_ipv6=0` on the container interface and `lo` inside the pod.
    PodSysctls,
    /// Pod-side `from <podIP> lookup i` rule (interfaces i > 0).
    PodRule,
    /// Pod route `<gw>/32 dev <if> scope link`.
    PodGatewayRoute,
    /// Pod route `default via <gw> dev <if>`.
    PodDefaultRoute,
    /// Pod address `<podIP>/32`.
    PodAddress,
    /// Pod permanent neighbour `<gw> → host veth MAC`.
    PodNeighbour,
    /// IPv6 only: wait until no address of the pod interface is tentative (DAD done).
    WaitDad,
    /// Host route `<podIP>/32 dev <hostVeth> scope link` in main.
    HostRoute,
    /// Host rule `to <podIP> lookup main` at 512.
    ToPodRule,
    /// Host rule `from <podIP> lookup <table>` at 1536 (non-main tables).
    FromPodRule,
}

impl SetupStep {
    /// Every step in execution order (the IPv6 wiring runs all of them).
    pub const ALL: [SetupStep; 15] = [
        SetupStep::RemoveStaleHostVeth,
        SetupStep::CreateVeth,
        SetupStep::HostVethSysctls,
        SetupStep::HostVethUp,
        SetupStep::ContainerLinkUp,
        SetupStep::PodSysctls,
        SetupStep::PodRule,
        SetupStep::PodGatewayRoute,
        SetupStep::PodDefaultRoute,
        SetupStep::PodAddress,
        SetupStep::PodNeighbour,
        SetupStep::WaitDad,
        SetupStep::HostRoute,
        SetupStep::ToPodRule,
        SetupStep::FromPodRule,
    ];

    /// True for the steps only the IPv6 wiring has.
    pub fn v6_only(self) -> bool {
        matches!(self, SetupStep::PodSysctls | SetupStep::WaitDad)
    }

    /// The steps an ADD of `family` runs, in order.
    pub fn for_family(family: Family) -> Vec<SetupStep> {
        SetupStep::ALL
            .into_iter()
            .filter(|s| family == Family::V6 || !s.v6_only())
            .collect()
    }
}

impl std::fmt::Display for SetupStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Which namespace a drift was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host (node) namespace.
    Host,
    /// The pod's namespace.
    Pod,
}

/// A difference between a pod's expected wiring and what is there (CHECK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodDrift {
    /// An interface is missing.
    MissingLink {
        /// Where.
        side: Side,
        /// Its name.
        name: String,
    },
    /// An interface is down.
    LinkDown {
        /// Where.
        side: Side,
        /// Its name.
        name: String,
    },
    /// An interface has another MTU.
    WrongMtu {
        /// Where.
        side: Side,
        /// Its name.
        name: String,
        /// Expected MTU.
        expected: u32,
        /// Actual MTU.
        actual: u32,
    },
    /// The pod's /32 (or /128) is not on its interface.
    MissingAddress(IpCidr),
    /// A route is missing.
    MissingRoute {
        /// Where.
        side: Side,
        /// The route, as text.
        route: String,
    },
    /// A rule is missing.
    MissingRule {
        /// Where.
        side: Side,
        /// The rule, as text.
        rule: String,
    },
    /// An interface has another hardware address (a branch link without the branch ENI's MAC).
    WrongMac {
        /// Where.
        side: Side,
        /// Its name.
        name: String,
        /// Expected MAC.
        expected: MacAddr,
        /// Actual MAC (`None` when it has none).
        actual: Option<MacAddr>,
    },
    /// The gateway's permanent neighbour entry is missing or points elsewhere.
    WrongNeighbour {
        /// The host veth's MAC.
        expected: MacAddr,
        /// What the pod has (`None` when there is no permanent entry).
        actual: Option<MacAddr>,
    },
}

/// Everything of one namespace that CHECK looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsSnapshot {
    /// Links.
    pub links: Vec<Link>,
    /// Addresses.
    pub addresses: Vec<Address>,
    /// Routes of the family read, all tables.
    pub routes: Vec<Route>,
    /// Rules of the family read.
    pub rules: Vec<Rule>,
    /// Neighbours of the family read.
    pub neighbours: Vec<Neighbour>,
}

impl NsSnapshot {
    /// Reads a namespace's IPv4 state through `nl`.
    pub async fn read(nl: &Netlink) -> Result<NsSnapshot> {
        NsSnapshot::read_family(nl, Family::V4).await
    }

    /// Reads a namespace's links, addresses and the routes, rules and neighbours of `family`.
    pub async fn read_family(nl: &Netlink, family: Family) -> Result<NsSnapshot> {
        Ok(NsSnapshot {
            links: nl.links().await?,
            addresses: nl.addresses(None).await?,
            routes: nl.routes(family, None).await?,
            rules: nl.rules(family).await?,
            neighbours: nl.neighbours(family, None).await?,
        })
    }

    /// The link named `name`.
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }
}

fn has_route(s: &NsSnapshot, want: &Route) -> bool {
    s.routes.iter().any(|r| {
        r.dst.trunc() == want.dst.trunc()
            && r.table == want.table
            && r.oif == want.oif
            && r.gateway == want.gateway
            && r.scope == want.scope
    })
}

fn has_rule(s: &NsSnapshot, want: &Rule) -> bool {
    s.rules.iter().any(|r| {
        r.priority == want.priority
            && r.table == want.table
            && r.from == want.from
            && r.to == want.to
            && r.iif == want.iif
    })
}

fn check_link(
    side: Side,
    s: &NsSnapshot,
    name: &str,
    mtu: u32,
    drift: &mut Vec<PodDrift>,
) -> Option<Link> {
    let Some(l) = s.link(name) else {
        drift.push(PodDrift::MissingLink {
            side,
            name: name.to_string(),
        });
        return None;
    };
    if !l.up {
        drift.push(PodDrift::LinkDown {
            side,
            name: name.to_string(),
        });
    }
    if l.mtu != mtu {
        drift.push(PodDrift::WrongMtu {
            side,
            name: name.to_string(),
            expected: mtu,
            actual: l.mtu,
        });
    }
    Some(l.clone())
}

/// `dst dev <oif>` in `table`: `scope link` for IPv4; IPv6 routes have no scope (the kernel
/// reports every one as universe), so the IPv6 form says so.
pub(crate) fn link_route(dst: IpCidr, oif: u32, table: u32) -> Route {
    let mut r = Route::link_scope(dst, oif, table);
    if dst.family() == Family::V6 {
        r.scope = Scope::Universe;
    }
    r
}

/// The expected host-side objects of a pod interface: route, to-pod rule, optional from-pod
/// rule (in the interface's family).
pub fn expected_host_objects(spec: &PodIfSpec, host_ifindex: u32) -> (Route, Vec<Rule>) {
    let ip = spec.host_cidr();
    let family = spec.family();
    let route = link_route(ip, host_ifindex, MAIN_TABLE);
    let mut rules = vec![Rule::new(family, TO_CONTAINER_RULE_PRIORITY, MAIN_TABLE).to(ip)];
    if spec.host_table() != MAIN_TABLE {
        rules.push(Rule::new(family, FROM_POD_RULE_PRIORITY, spec.host_table()).from(ip));
    }
    (route, rules)
}

/// Compares the wiring `spec` asks for with snapshots of the host and pod namespaces (read
/// for the spec's family). Pure: both implementations of [`PodNetwork::check_interface`] call
/// it.
pub fn diff_pod(spec: &PodIfSpec, host: &NsSnapshot, pod: &NsSnapshot) -> Vec<PodDrift> {
    let mut drift = Vec::new();
    let host_link = check_link(Side::Host, host, &spec.host_veth, spec.mtu, &mut drift);
    let cont_link = check_link(Side::Pod, pod, &spec.container_ifname, spec.mtu, &mut drift);
    let ip = spec.host_cidr();
    let (route, rules) = expected_host_objects(spec, host_link.as_ref().map_or(0, |h| h.index));
    let routes: Vec<(Route, String)> = if host_link.is_some() {
        vec![(route, format!("{} dev {} scope link", ip, spec.host_veth))]
    } else {
        Vec::new()
    };
    diff_host_objects(host, &routes, &rules, &mut drift);
    diff_pod_side(
        spec,
        pod,
        cont_link.as_ref(),
        host_link.as_ref(),
        &mut drift,
    );
    drift
}

/// Adds a drift for each of `routes` (with its text) and `rules` missing from `host`.
pub(crate) fn diff_host_objects(
    host: &NsSnapshot,
    routes: &[(Route, String)],
    rules: &[Rule],
    drift: &mut Vec<PodDrift>,
) {
    for (route, text) in routes {
        if !has_route(host, route) {
            drift.push(PodDrift::MissingRoute {
                side: Side::Host,
                route: text.clone(),
            });
        }
    }
    for r in rules {
        if !has_rule(host, r) {
            drift.push(PodDrift::MissingRule {
                side: Side::Host,
                rule: r.to_string(),
            });
        }
    }
}

/// The pod-side part of CHECK: address, routes, rule, gateway neighbour.
pub(crate) fn diff_pod_side(
    spec: &PodIfSpec,
    pod: &NsSnapshot,
    cont_link: Option<&Link>,
    host_link: Option<&Link>,
    drift: &mut Vec<PodDrift>,
) {
    let ip = spec.host_cidr();
    let family = spec.family();
    let gw = spec.gateway();
    if let Some(c) = cont_link {
        if !pod
            .addresses
            .iter()
            .any(|a| a.index == c.index && a.cidr == ip)
        {
            drift.push(PodDrift::MissingAddress(ip));
        }
        let table = spec.pod_table();
        let gw_route = link_route(IpCidr::host(gw), c.index, table);
        if !has_route(pod, &gw_route) {
            drift.push(PodDrift::MissingRoute {
                side: Side::Pod,
                route: format!(
                    "{} dev {} scope link table {table}",
                    IpCidr::host(gw),
                    c.name
                ),
            });
        }
        let mut def = Route::default_via(gw, c.index, table);
        def.scope = Scope::Universe;
        if !has_route(pod, &def) {
            drift.push(PodDrift::MissingRoute {
                side: Side::Pod,
                route: format!("default via {gw} dev {} table {table}", c.name),
            });
        }
        if spec.index > 0 {
            let r = Rule::new(family, FROM_INTERFACE_RULE_PRIORITY, table).from(ip);
            if !has_rule(pod, &r) {
                drift.push(PodDrift::MissingRule {
                    side: Side::Pod,
                    rule: r.to_string(),
                });
            }
        }
        if let Some(h) = host_link {
            if let Some(expected) = h.mac {
                let actual = pod
                    .neighbours
                    .iter()
                    .find(|n| n.index == c.index && n.ip == gw && n.permanent)
                    .and_then(|n| n.mac);
                if actual != Some(expected) {
                    drift.push(PodDrift::WrongNeighbour { expected, actual });
                }
            }
        }
    }
}

/// CHECK of a branch-ENI pod (spec 2.6): the veth and pod side as [`diff_pod`], the branch
/// link (present, up, with the branch ENI's MAC), its two routes in the VLAN table, and the
/// mode's pod route and rules. Pure: both implementations of [`PodNetwork::check_branch`] call
/// it.
pub fn diff_branch(spec: &BranchSpec, host: &NsSnapshot, pod: &NsSnapshot) -> Vec<PodDrift> {
    let p = &spec.pod;
    let mut drift = Vec::new();
    let host_link = check_link(Side::Host, host, &p.host_veth, p.mtu, &mut drift);
    let cont_link = check_link(Side::Pod, pod, &p.container_ifname, p.mtu, &mut drift);
    let vlan_name = spec.vlan_name();
    let vlan = match host.link(&vlan_name) {
        None => {
            drift.push(PodDrift::MissingLink {
                side: Side::Host,
                name: vlan_name.clone(),
            });
            None
        }
        Some(l) => {
            if !l.up {
                drift.push(PodDrift::LinkDown {
                    side: Side::Host,
                    name: vlan_name.clone(),
                });
            }
            if spec.eni_mac != MacAddr::default() && l.mac != Some(spec.eni_mac) {
                drift.push(PodDrift::WrongMac {
                    side: Side::Host,
                    name: vlan_name.clone(),
                    expected: spec.eni_mac,
                    actual: l.mac,
                });
            }
            Some(l.clone())
        }
    };
    let (routes, rules) = expected_branch_objects(
        spec,
        host_link.as_ref().map_or(0, |h| h.index),
        vlan.as_ref().map_or(0, |v| v.index),
    );
    let table = spec.table();
    let mut described = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        let text = match i {
            0 => format!("{} dev {vlan_name} scope link table {table}", r.dst),
            1 => format!(
                "default via {} dev {vlan_name} table {table}",
                spec.subnet_gw
            ),
            _ => format!("{} dev {} scope link table {}", r.dst, p.host_veth, r.table),
        };
        let known = if i < 2 {
            vlan.is_some()
        } else {
            host_link.is_some()
        };
        if known {
            described.push((r, text));
        }
    }
    diff_host_objects(host, &described, &rules, &mut drift);
    diff_pod_side(p, pod, cont_link.as_ref(), host_link.as_ref(), &mut drift);
    drift
}

/// The per-pod network verbs the plugin needs, in our own nouns.
pub trait PodNetwork: Send + Sync {
    /// ADD of one interface of either family: builds the veth pair, pod addressing, routes,
    /// neighbour, host route and rules (IPv6: also the pod sysctls and the DAD wait). On
    /// failure everything this call created is removed again before the error returns.
    fn setup_interface(&self, spec: &PodIfSpec) -> impl Future<Output = Result<PodWiring>> + Send;

    /// ADD of an IPv4 interface ([`PodNetwork::setup_interface`] of its [`PodIfSpec`]).
    fn setup_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<PodWiring>> + Send {
        let spec = PodIfSpec::from(spec);
        async move { self.setup_interface(&spec).await }
    }

    /// Optionally starts an ADD before the address is known: builds what does not depend on
    /// it (stale veth removal, the veth pair, host sysctls, links up) so that this overlaps
    /// with the ipamd round trip. A later [`PodNetwork::setup_interface`] for the same link
    /// goes on from there; [`PodNetwork::discard_link`] undoes it when the ADD stops. On
    /// failure nothing is left and `setup_interface` does the whole work itself. The default
    /// does nothing.
    fn prepare_link(&self, link: &PodLinkSpec) -> impl Future<Output = Result<()>> + Send {
        let _ = link;
        std::future::ready(Ok(()))
    }

    /// Undoes a [`PodNetwork::prepare_link`] that no `setup_interface` took over (nothing to
    /// do otherwise). Best-effort: failures are logged.
    fn discard_link(&self, link: &PodLinkSpec) -> impl Future<Output = ()> + Send {
        let _ = link;
        std::future::ready(())
    }

    /// DEL: removes the host rules (512, and every 1536 copy for non-main tables) and the host
    /// /32 or /128 route, in the address's family. Never enters the pod namespace; things
    /// already gone count as done.
    fn teardown_pod(&self, t: &PodTeardown) -> impl Future<Output = Result<TeardownReport>> + Send;

    /// CHECK of one interface of either family: the differences between `spec` and what is
    /// there (empty when all is well).
    fn check_interface(
        &self,
        spec: &PodIfSpec,
    ) -> impl Future<Output = Result<Vec<PodDrift>>> + Send;

    /// ADD of a branch-ENI pod (spec 2.6): the interface's veth and pod side as
    /// [`PodNetwork::setup_interface`], then the branch link, its routes and the mode's host
    /// route and rules instead of the ordinary host wiring. Transactional like
    /// `setup_interface`. A link prepared by [`PodNetwork::prepare_link`] is taken over when it
    /// matches, and discarded otherwise.
    fn setup_branch(&self, spec: &BranchSpec) -> impl Future<Output = Result<PodWiring>> + Send;

    /// DEL of a branch-ENI pod, whatever mode it was added under: the branch link, every
    /// priority-10 rule for table `vlanId+100` of the family, the pod route in that table,
    /// then [`PodNetwork::teardown_pod`] against it. Already-gone things count as done.
    fn teardown_branch(
        &self,
        t: &BranchTeardown,
    ) -> impl Future<Output = Result<TeardownReport>> + Send;

    /// CHECK of a branch-ENI pod ([`diff_branch`]).
    fn check_branch(&self, spec: &BranchSpec)
        -> impl Future<Output = Result<Vec<PodDrift>>> + Send;

    /// CHECK of an IPv4 interface ([`PodNetwork::check_interface`] of its [`PodIfSpec`]).
    fn check_pod(&self, spec: &PodSpec) -> impl Future<Output = Result<Vec<PodDrift>>> + Send {
        let spec = PodIfSpec::from(spec);
        async move { self.check_interface(&spec).await }
    }
}

/// What a successful ADD step created and a rollback deletes.
enum Undo {
    HostVeth(String),
    BranchLink(BranchLinkKind, String),
    PodRule(Rule),
    HostRoute(Route),
    HostRule(Rule),
}

/// The real [`PodNetwork`]: netlink in the host namespace it was made for and in each pod's
/// namespace.
#[derive(Debug)]
pub struct NetlinkPodNetwork {
    host_ns: Netns,
    host: Netlink,
    fault: Option<SetupStep>,
    prepared: std::sync::Mutex<Option<PreparedLink>>,
}

/// A veth pair built by [`PodNetwork::prepare_link`], waiting for its address.
#[derive(Debug)]
struct PreparedLink {
    link: PodLinkSpec,
    pod_ns: Netns,
    pod: Netlink,
    built: BuiltLink,
}

/// What the address-independent steps built.
#[derive(Clone, Debug)]
struct BuiltLink {
    host_link: Link,
    cont: Link,
    host_mac: MacAddr,
}

/// Polls the IPv6 addresses of link `index` (only `only`, when given) every [`DAD_POLL`]
/// until none is tentative (the reference's `WaitForAddressesToBeStable`, [`DAD_TIMEOUT`] at
/// most). An address that failed DAD ends the wait at once: it will not recover.
///
/// ADD waits for the pod's own address only, which it adds without DAD: the wait then
/// returns at its first look, and still catches an address the kernel refused. The pod's
/// link-local, which carries none of its traffic (the gateway's neighbour entry is
/// permanent), may finish DAD later.
pub async fn wait_for_dad(nl: &Netlink, index: u32, only: Option<IpCidr>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + DAD_TIMEOUT;
    loop {
        let mut unsettled = nl.unsettled_v6_addresses(index).await?;
        if let Some(a) = only {
            unsettled.retain(|(c, _)| c.addr == a.addr);
        }
        if unsettled.is_empty() {
            return Ok(());
        }
        let failed: Vec<String> = unsettled
            .iter()
            .filter(|(_, f)| *f)
            .map(|(a, _)| a.to_string())
            .collect();
        if !failed.is_empty() {
            return Err(NetError::Dad {
                index,
                what: format!("{} failed (duplicate address)", failed.join(", ")),
            });
        }
        if tokio::time::Instant::now() + DAD_POLL > deadline {
            let t: Vec<String> = unsettled.iter().map(|(a, _)| a.to_string()).collect();
            return Err(NetError::Dad {
                index,
                what: format!("{} still tentative after {DAD_TIMEOUT:?}", t.join(", ")),
            });
        }
        tokio::time::sleep(DAD_POLL).await;
    }
}

impl NetlinkPodNetwork {
    /// Wires pods into `host_ns` (the node's namespace in production; a test namespace in
    /// tests). Must be called within a tokio runtime, which serves the netlink socket.
    pub fn new(host_ns: Netns) -> Result<NetlinkPodNetwork> {
        let host = Netlink::open(&host_ns)?;
        Ok(NetlinkPodNetwork {
            host_ns,
            host,
            fault: None,
            prepared: std::sync::Mutex::new(None),
        })
    }

    /// Makes every later ADD fail at `step` (after the earlier steps ran), to test rollback.
    pub fn with_fault(mut self, step: Option<SetupStep>) -> NetlinkPodNetwork {
        self.fault = step;
        self
    }

    /// The host namespace's netlink handle.
    pub fn host(&self) -> &Netlink {
        &self.host
    }

    /// Dump requests (whole-table reads) made so far by this pod network, in the host and
    /// every pod namespace: IPv4 ADD and DEL make none (see [`Netlink::dump_requests`]); an
    /// IPv6 ADD reads the pod interface's addresses while it waits for DAD.
    pub fn dump_requests(&self) -> usize {
        self.host.dump_requests()
    }

    /// The prepared link for `link`, taken out of the slot (`None` when there is none or it
    /// was made for another link).
    fn take_prepared(&self, link: &PodLinkSpec) -> Option<PreparedLink> {
        let mut slot = self.prepared.lock().ok()?;
        if slot.as_ref().is_some_and(|p| &p.link == link) {
            slot.take()
        } else {
            None
        }
    }

    fn step(&self, step: SetupStep) -> Result<()> {
        tracing::trace!(%step, "pod setup step");
        if self.fault == Some(step) {
            return Err(NetError::Injected {
                step: step.to_string(),
            });
        }
        Ok(())
    }

    /// The steps that do not need the address: stale veth, veth pair, sysctls, links up.
    async fn link_steps(
        &self,
        spec: &PodLinkSpec,
        pod_ns: &Netns,
        pod: &Netlink,
        undo: &mut Vec<Undo>,
    ) -> Result<BuiltLink> {
        self.step(SetupStep::RemoveStaleHostVeth)?;
        if self.host.delete_link_by_name(&spec.host_veth).await? {
            tracing::info!(veth = %spec.host_veth, "deleted leftover host veth");
        }

        self.step(SetupStep::CreateVeth)?;
        // A fresh random locally administered MAC (46 random bits), not compared with the
        // node's other links: that needed a dump of every link, whose cost grew with the pods
        // on the node. A clash among 1,000 links has a chance of about 1e-11, and would be
        // harmless anyway: a veth is point to point, so frames for the pod's gateway reach this
        // host end whatever other links use the same address.
        let host_mac = MacAddr::random_local()?;
        // One RTM_NEWLINK from the host socket: the host end here, the container end born in
        // the pod namespace (IFLA_NET_NS_FD), never created on the host and moved.
        self.host
            .add_veth(
                &VethEnd {
                    name: spec.host_veth.clone(),
                    mtu: spec.mtu,
                    mac: Some(host_mac),
                    up: false,
                },
                &VethEnd {
                    name: spec.container_ifname.clone(),
                    mtu: spec.mtu,
                    mac: None,
                    up: false,
                },
                Some(pod_ns),
            )
            .await?;
        undo.push(Undo::HostVeth(spec.host_veth.clone()));
        // Both ends read back at once, each by name (no dump), on their own sockets.
        let (host_link, cont) = futures_util::future::try_join(
            self.host.require_link(&spec.host_veth),
            pod.require_link(&spec.container_ifname),
        )
        .await?;

        self.step(SetupStep::HostVethSysctls)?;
        let v6 = |k: &str| format!("net/ipv6/conf/{}/{k}", spec.host_veth);
        sysctl::write_all(
            &self.host_ns,
            &[
                (v6("accept_ra"), "0".into()),
                (v6("accept_redirects"), "1".into()),
                (v6("forwarding"), "0".into()),
                // Its link-local answers the pod's neighbour solicitations as soon as the
                // link is up (a point-to-point veth: nothing to be duplicate of).
                (v6("accept_dad"), "0".into()),
            ],
            true,
        )?;

        self.step(SetupStep::HostVethUp)?;
        self.host.set_up(host_link.index).await?;

        self.step(SetupStep::ContainerLinkUp)?;
        pod.set_up(cont.index).await?;
        Ok(BuiltLink {
            host_link,
            cont,
            host_mac,
        })
    }

    /// The steps that need the address: (IPv6: pod sysctls,) pod rule, routes, address,
    /// neighbour, (IPv6: DAD wait,) host route and rules.
    async fn address_steps(
        &self,
        spec: &PodIfSpec,
        pod_ns: &Netns,
        pod: &Netlink,
        built: BuiltLink,
        undo: &mut Vec<Undo>,
        host_side: bool,
    ) -> Result<PodWiring> {
        let BuiltLink {
            host_link,
            cont,
            host_mac,
        } = built;
        let ip = spec.host_cidr();
        let family = spec.family();
        let gw = spec.gateway();
        let table = spec.pod_table();

        if family == Family::V6 {
            self.step(SetupStep::PodSysctls)?;
            // A pod namespace may start with IPv6 off (the runtime's or the node's defaults):
            // the address and the gateway neighbour need it on.
            sysctl::write_all(
                pod_ns,
                &[
                    // Before IPv6 comes on: a link-local created now skips DAD too.
                    (
                        format!("net/ipv6/conf/{}/accept_dad", spec.container_ifname),
                        "0".into(),
                    ),
                    (
                        format!("net/ipv6/conf/{}/disable_ipv6", spec.container_ifname),
                        "0".into(),
                    ),
                    ("net/ipv6/conf/lo/disable_ipv6".into(), "0".into()),
                ],
                false,
            )?;
        }

        self.step(SetupStep::PodRule)?;
        if spec.index > 0 {
            let r = Rule::new(family, FROM_INTERFACE_RULE_PRIORITY, table).from(ip);
            if pod.rule_add(&r).await? {
                undo.push(Undo::PodRule(r));
            }
        }

        self.step(SetupStep::PodGatewayRoute)?;
        pod.route_replace(&link_route(IpCidr::host(gw), cont.index, table))
            .await?;

        self.step(SetupStep::PodDefaultRoute)?;
        pod.route_replace(&Route::default_via(gw, cont.index, table))
            .await?;

        self.step(SetupStep::PodAddress)?;
        if family == Family::V6 {
            // ipamd hands each address of the node's /80 to one pod, and EC2 routes the /80
            // to this ENI alone: DAD (1 to 2 s per pod in the reference) cannot find a
            // duplicate, so the address is added usable at once.
            pod.add_address_nodad(cont.index, ip, Scope::Universe)
                .await?;
        } else {
            pod.add_address(cont.index, ip, Scope::Universe).await?;
        }

        self.step(SetupStep::PodNeighbour)?;
        pod.neighbour_add_permanent(cont.index, gw, host_mac)
            .await?;

        if family == Family::V6 {
            self.step(SetupStep::WaitDad)?;
            wait_for_dad(pod, cont.index, Some(ip)).await?;
        }

        let (host_route, host_rules) = expected_host_objects(spec, host_link.index);
        if !host_side {
            return Ok(PodWiring {
                host_veth: spec.host_veth.clone(),
                host_ifindex: host_link.index,
                host_mac,
                container_ifname: spec.container_ifname.clone(),
                container_ifindex: cont.index,
                container_mac: cont.mac.unwrap_or_default(),
                ip: spec.ip,
                gateway: gw,
                host_table: spec.host_table(),
                mtu: spec.mtu,
            });
        }
        self.step(SetupStep::HostRoute)?;
        self.host.route_replace(&host_route).await?;
        undo.push(Undo::HostRoute(host_route));

        for (i, rule) in host_rules.into_iter().enumerate() {
            self.step(if i == 0 {
                SetupStep::ToPodRule
            } else {
                SetupStep::FromPodRule
            })?;
            if self.host.rule_add(&rule).await? {
                undo.push(Undo::HostRule(rule));
            }
        }
        if spec.host_table() == MAIN_TABLE {
            self.step(SetupStep::FromPodRule)?;
        }

        Ok(PodWiring {
            host_veth: spec.host_veth.clone(),
            host_ifindex: host_link.index,
            host_mac,
            container_ifname: spec.container_ifname.clone(),
            container_ifindex: cont.index,
            container_mac: cont.mac.unwrap_or_default(),
            ip: spec.ip,
            gateway: gw,
            host_table: spec.host_table(),
            mtu: spec.mtu,
        })
    }

    /// The veth and pod side of `spec` (taking over a prepared link when it matches), and
    /// with `host_side` the ordinary host route and rules. Returns the pod namespace's socket
    /// (for a rollback) and the outcome; `undo` lists what was made.
    async fn build_interface(
        &self,
        spec: &PodIfSpec,
        host_side: bool,
        undo: &mut Vec<Undo>,
    ) -> Result<(Netlink, Result<PodWiring>)> {
        let link = spec.link();
        Ok(match self.take_prepared(&link) {
            Some(p) => {
                undo.push(Undo::HostVeth(link.host_veth.clone()));
                let r = self
                    .address_steps(spec, &p.pod_ns, &p.pod, p.built, undo, host_side)
                    .await;
                (p.pod, r)
            }
            None => {
                let pod_ns = Netns::open(&spec.netns)?;
                let pod = Netlink::open_sharing_counter(&pod_ns, &self.host)?;
                let r = match self.link_steps(&link, &pod_ns, &pod, undo).await {
                    Ok(built) => {
                        self.address_steps(spec, &pod_ns, &pod, built, undo, host_side)
                            .await
                    }
                    Err(e) => Err(e),
                };
                (pod, r)
            }
        })
    }

    /// True when a prepared link waits that is not `link`.
    fn prepared_other_than(&self, link: &PodLinkSpec) -> bool {
        self.prepared
            .lock()
            .ok()
            .is_some_and(|slot| slot.as_ref().is_some_and(|p| &p.link != link))
    }

    /// Undoes whatever link is prepared.
    async fn discard_any_prepared(&self) {
        let older = self.prepared.lock().ok().and_then(|mut slot| slot.take());
        if let Some(p) = older {
            tracing::debug!(veth = %p.link.host_veth, "discarding the prepared pod link");
            self.rollback(&p.pod, vec![Undo::HostVeth(p.link.host_veth.clone())])
                .await;
        }
    }

    async fn create_branch_link(&self, spec: &BranchSpec) -> Result<u32> {
        let name = spec.vlan_name();
        match spec.link {
            BranchLinkKind::Vlan => {
                VlanBranchLink::new(&self.host)
                    .create(spec.parent_ifindex, spec.vlan_id, spec.eni_mac, &name)
                    .await
            }
            BranchLinkKind::Hotplug => {
                HotplugBranchLink::new(&self.host)
                    .create(spec.parent_ifindex, spec.vlan_id, spec.eni_mac, &name)
                    .await
            }
        }
    }

    async fn delete_branch_link(&self, kind: BranchLinkKind, name: &str) -> Result<bool> {
        match kind {
            BranchLinkKind::Vlan => VlanBranchLink::new(&self.host).delete(name).await,
            BranchLinkKind::Hotplug => HotplugBranchLink::new(&self.host).delete(name).await,
        }
    }

    /// The host side of a branch pod, after its veth and pod side (spec 2.6 steps 2 to 5).
    async fn branch_host_steps(
        &self,
        spec: &BranchSpec,
        w: &PodWiring,
        undo: &mut Vec<Undo>,
    ) -> Result<()> {
        let family = spec.pod.family();
        let gone = self
            .host
            .delete_rules(&RuleFilter {
                priority: Some(VLAN_RULE_PRIORITY),
                iif: Some(spec.pod.host_veth.clone()),
                ..RuleFilter::any(family)
            })
            .await?;
        if gone > 0 {
            tracing::info!(veth = %spec.pod.host_veth, rules = gone, "deleted old iif rules of the host veth");
        }
        let name = spec.vlan_name();
        let index = self.create_branch_link(spec).await?;
        undo.push(Undo::BranchLink(spec.link, name.clone()));
        let v6 = |k: &str| format!("net/ipv6/conf/{name}/{k}");
        sysctl::write_all(
            &self.host_ns,
            &[
                (v6("accept_ra"), "0".into()),
                (v6("accept_redirects"), "1".into()),
                (v6("forwarding"), "0".into()),
            ],
            true,
        )?;
        self.host.set_up(index).await?;
        let (routes, rules) = expected_branch_objects(spec, w.host_ifindex, index);
        for r in routes {
            self.host.route_replace(&r).await?;
            undo.push(Undo::HostRoute(r));
        }
        for r in rules {
            if self.host.rule_add(&r).await? {
                undo.push(Undo::HostRule(r));
            }
        }
        Ok(())
    }

    async fn rollback(&self, pod: &Netlink, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            let r = match &u {
                Undo::HostRule(rule) => self.host.rule_delete(rule).await.map(drop),
                Undo::HostRoute(route) => self.host.route_delete(route).await.map(drop),
                Undo::PodRule(rule) => pod.rule_delete(rule).await.map(drop),
                Undo::HostVeth(name) => self.host.delete_link_by_name(name).await.map(drop),
                // A hot-plugged branch ENI is the fabric's, not ours: a failed ADD leaves it
                // (down) for the retry to take again; a VLAN link is ours and goes.
                Undo::BranchLink(BranchLinkKind::Hotplug, name) => {
                    match self.host.link_by_name(name).await {
                        Ok(Some(l)) => self.host.set_down(l.index).await,
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                Undo::BranchLink(kind, name) => {
                    self.delete_branch_link(*kind, name).await.map(drop)
                }
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "rollback step failed");
            }
        }
    }
}

impl PodNetwork for NetlinkPodNetwork {
    async fn setup_interface(&self, spec: &PodIfSpec) -> Result<PodWiring> {
        spec.validate()?;
        let mut undo = Vec::new();
        let (pod, result) = self.build_interface(spec, true, &mut undo).await?;
        match result {
            Ok(w) => {
                tracing::info!(veth = %w.host_veth, ip = %w.ip, table = w.host_table, "pod wired");
                Ok(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, veth = %spec.host_veth, "pod setup failed; rolling back");
                self.rollback(&pod, undo).await;
                Err(e)
            }
        }
    }

    async fn setup_branch(&self, spec: &BranchSpec) -> Result<PodWiring> {
        spec.validate()?;
        let p = &spec.pod;
        if self.prepared_other_than(&p.link()) {
            // Built under the ordinary veth name (strict mode names it `vlan…`): not ours.
            self.discard_any_prepared().await;
        }
        let mut undo = Vec::new();
        let (pod, result) = self.build_interface(p, false, &mut undo).await?;
        let result = match result {
            Ok(w) => self
                .branch_host_steps(spec, &w, &mut undo)
                .await
                .map(|()| w),
            Err(e) => Err(e),
        };
        match result {
            Ok(w) => {
                tracing::info!(veth = %w.host_veth, ip = %w.ip, vlan = spec.vlan_id, mode = ?spec.mode, "branch-ENI pod wired");
                Ok(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, veth = %p.host_veth, vlan = spec.vlan_id, "branch-ENI pod setup failed; rolling back");
                self.rollback(&pod, undo).await;
                Err(e)
            }
        }
    }

    async fn teardown_branch(&self, t: &BranchTeardown) -> Result<TeardownReport> {
        let name = vlan_link_name(t.vlan_id);
        let table = vlan_route_table_id(t.vlan_id);
        let ip = IpCidr::host(t.ip);
        let family = ip.family();
        if self.delete_branch_link(t.link, &name).await? {
            tracing::info!(link = %name, "branch link deleted");
        }
        let mut rules = self
            .host
            .delete_rules(&RuleFilter {
                priority: Some(VLAN_RULE_PRIORITY),
                table: Some(table),
                ..RuleFilter::any(family)
            })
            .await?;
        // The strict-mode pod route (it would go with the host veth; removed now so that
        // nothing of the pod is left in the VLAN table even while the netns lingers).
        let pod_route = Route {
            dst: ip,
            gateway: None,
            oif: None,
            table,
            scope: Scope::Link,
            pref_src: None,
        };
        if let Err(e) = self.host.route_delete(&pod_route).await {
            tracing::warn!(error = %e, %ip, table, "deleting the pod route in the VLAN table failed");
        }
        let mut report = self
            .teardown_pod(&PodTeardown {
                ip: t.ip,
                route_table: table,
            })
            .await?;
        rules += report.rules_deleted;
        report.rules_deleted = rules;
        Ok(report)
    }

    async fn check_branch(&self, spec: &BranchSpec) -> Result<Vec<PodDrift>> {
        spec.validate_for_check()?;
        let pod_ns = Netns::open(&spec.pod.netns)?;
        let pod = Netlink::open_sharing_counter(&pod_ns, &self.host)?;
        let family = spec.pod.family();
        let host = NsSnapshot::read_family(&self.host, family).await?;
        let pod = NsSnapshot::read_family(&pod, family).await?;
        Ok(diff_branch(spec, &host, &pod))
    }

    async fn prepare_link(&self, link: &PodLinkSpec) -> Result<()> {
        link.validate()?;
        // One prepared link at a time: an older one (never taken over) is undone first.
        let older = self.prepared.lock().ok().and_then(|mut slot| slot.take());
        if let Some(p) = older {
            self.rollback(&p.pod, vec![Undo::HostVeth(p.link.host_veth.clone())])
                .await;
        }
        let pod_ns = Netns::open(&link.netns)?;
        let pod = Netlink::open_sharing_counter(&pod_ns, &self.host)?;
        let mut undo = Vec::new();
        match self.link_steps(link, &pod_ns, &pod, &mut undo).await {
            Ok(built) => {
                let prepared = PreparedLink {
                    link: link.clone(),
                    pod_ns,
                    pod,
                    built,
                };
                if let Ok(mut slot) = self.prepared.lock() {
                    *slot = Some(prepared);
                }
                Ok(())
            }
            Err(e) => {
                tracing::debug!(error = %e, veth = %link.host_veth, "preparing the pod link failed; rolling back");
                self.rollback(&pod, undo).await;
                Err(e)
            }
        }
    }

    async fn discard_link(&self, link: &PodLinkSpec) {
        if let Some(p) = self.take_prepared(link) {
            tracing::debug!(veth = %link.host_veth, "discarding the prepared pod link");
            self.rollback(&p.pod, vec![Undo::HostVeth(link.host_veth.clone())])
                .await;
        }
    }

    async fn teardown_pod(&self, t: &PodTeardown) -> Result<TeardownReport> {
        let ip = IpCidr::host(t.ip);
        let family = ip.family();
        let table = effective_host_table(t.route_table);
        let mut report = TeardownReport::default();
        report.rules_deleted += self
            .host
            .delete_rules(&RuleFilter {
                priority: Some(TO_CONTAINER_RULE_PRIORITY),
                to: Some(ip),
                ..RuleFilter::any(family)
            })
            .await?;
        if table != MAIN_TABLE {
            report.rules_deleted += self
                .host
                .delete_rules(&RuleFilter {
                    priority: Some(FROM_POD_RULE_PRIORITY),
                    from: Some(ip),
                    table: Some(table),
                    ..RuleFilter::any(family)
                })
                .await?;
        }
        let route = Route {
            dst: ip,
            gateway: None,
            oif: None,
            table: MAIN_TABLE,
            scope: Scope::Link,
            pref_src: None,
        };
        match self.host.route_delete(&route).await {
            Ok(deleted) => report.host_route_deleted = deleted,
            Err(e) => tracing::warn!(error = %e, %ip, "deleting the host route failed"),
        }
        tracing::info!(%ip, table, rules = report.rules_deleted, "pod host wiring removed");
        Ok(report)
    }

    async fn check_interface(&self, spec: &PodIfSpec) -> Result<Vec<PodDrift>> {
        spec.validate()?;
        let pod_ns = Netns::open(&spec.netns)?;
        let pod = Netlink::open_sharing_counter(&pod_ns, &self.host)?;
        let family = spec.family();
        let host = NsSnapshot::read_family(&self.host, family).await?;
        let pod = NsSnapshot::read_family(&pod, family).await?;
        Ok(diff_pod(spec, &host, &pod))
    }
}
