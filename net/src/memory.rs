//! In-memory implementation of [`PodNetwork`] for fast unit tests of callers (the plugin's
//! driver): it keeps a model of the host and pod namespaces, applies the same steps with the
//! same rules (EEXIST tolerated, DEL best-effort), rolls back on failure, records the steps it
//! ran, and can fail at a chosen [`SetupStep`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::branch::{
    expected_branch_objects, hotplug_pick, vlan_link_name, BranchLinkKind, BranchSpec,
    BranchTeardown, VLAN_RULE_PRIORITY,
};
use crate::error::{NetError, Result};
use crate::netlink::{Address, Link, Neighbour, Route, Rule, RuleFilter};
use crate::pod::{
    diff_branch, diff_pod, expected_host_objects, NsSnapshot, PodDrift, PodIfSpec, PodNetwork,
    PodTeardown, PodWiring, SetupStep, TeardownReport, FROM_INTERFACE_RULE_PRIORITY,
    FROM_POD_RULE_PRIORITY, TO_CONTAINER_RULE_PRIORITY,
};
use crate::types::{Family, IpCidr, MacAddr, Scope, MAIN_TABLE};

/// The modelled namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryState {
    /// The host namespace.
    pub host: NsSnapshot,
    /// Pod namespaces by path.
    pub pods: BTreeMap<PathBuf, NsSnapshot>,
    next_index: u32,
    next_mac: u32,
}

#[derive(Debug, Default)]
struct Inner {
    state: MemoryState,
    fault: Option<SetupStep>,
    steps: Vec<SetupStep>,
}

/// An in-memory [`PodNetwork`].
#[derive(Debug, Default)]
pub struct MemoryPodNetwork {
    inner: Mutex<Inner>,
}

fn ns_not_found(path: &Path) -> NetError {
    NetError::Netns {
        op: "open",
        path: path.to_path_buf(),
        source: std::io::Error::from_raw_os_error(nix::libc::ENOENT),
    }
}

impl MemoryPodNetwork {
    /// An empty host namespace and no pod namespaces.
    pub fn new() -> MemoryPodNetwork {
        MemoryPodNetwork::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Models the runtime creating a pod namespace at `path` (with only `lo`).
    pub fn add_netns(&self, path: impl Into<PathBuf>) {
        let mut g = self.lock();
        g.state.next_index += 1;
        let lo = Link {
            index: 1,
            name: "lo".into(),
            mac: None,
            mtu: 65536,
            up: false,
            kind: None,
        };
        g.state.pods.insert(
            path.into(),
            NsSnapshot {
                links: vec![lo],
                ..NsSnapshot::default()
            },
        );
    }

    /// Models the runtime deleting a pod namespace: its veths die, and with them their host
    /// peers and every route through those peers.
    pub fn remove_netns(&self, path: &Path) {
        let mut g = self.lock();
        if g.state.pods.remove(path).is_none() {
            return;
        }
        let pod_path = path.to_path_buf();
        let dead: Vec<u32> = g
            .state
            .host
            .links
            .iter()
            .filter(|l| l.kind.as_deref() == Some(&format!("veth:{}", pod_path.display())))
            .map(|l| l.index)
            .collect();
        remove_links(&mut g.state.host, &dead);
    }

    /// Models the fabric plugging a link into the host namespace (a hot-plugged branch ENI
    /// carrying `mac`); returns its index.
    pub fn add_host_link(&self, name: &str, mac: MacAddr) -> u32 {
        let mut g = self.lock();
        g.state.next_index += 1;
        let index = 1000 + g.state.next_index;
        g.state.host.links.push(Link {
            index,
            name: name.into(),
            mac: Some(mac),
            mtu: 9001,
            up: true,
            kind: Some("hotplug".into()),
        });
        index
    }

    /// Makes later ADDs fail at `step` (`None` to stop failing).
    pub fn fail_at(&self, step: Option<SetupStep>) {
        self.lock().fault = step;
    }

    /// A copy of the modelled state.
    pub fn state(&self) -> MemoryState {
        self.lock().state.clone()
    }

    /// Every ADD step started so far, in order (including the one that failed).
    pub fn steps(&self) -> Vec<SetupStep> {
        self.lock().steps.clone()
    }
}

fn remove_links(ns: &mut NsSnapshot, indices: &[u32]) {
    ns.links.retain(|l| !indices.contains(&l.index));
    ns.addresses.retain(|a| !indices.contains(&a.index));
    ns.routes
        .retain(|r| r.oif.is_none_or(|i| !indices.contains(&i)));
    ns.neighbours.retain(|n| !indices.contains(&n.index));
}

fn add_rule(ns: &mut NsSnapshot, r: Rule) {
    if !ns.rules.contains(&r) {
        ns.rules.push(r);
        ns.rules.sort_by_key(|r| r.priority);
    }
}

fn replace_route(ns: &mut NsSnapshot, r: Route) {
    ns.routes
        .retain(|x| !(x.dst.trunc() == r.dst.trunc() && x.table == r.table));
    ns.routes.push(r);
}

/// The IP-based host teardown of one address (512, every 1536 copy, the host route).
fn teardown_ip(host: &mut NsSnapshot, t: &PodTeardown) -> TeardownReport {
    let ip = IpCidr::host(t.ip);
    let family = ip.family();
    let table = crate::names::effective_host_table(t.route_table);

    let mut report = TeardownReport::default();
    let to = RuleFilter {
        priority: Some(TO_CONTAINER_RULE_PRIORITY),
        to: Some(ip),
        ..RuleFilter::any(family)
    };
    let from = RuleFilter {
        priority: Some(FROM_POD_RULE_PRIORITY),
        from: Some(ip),
        table: Some(table),
        ..RuleFilter::any(family)
    };
    let before = host.rules.len();
    host.rules
        .retain(|r| !(to.matches(r) || (table != MAIN_TABLE && from.matches(r))));
    report.rules_deleted = before - host.rules.len();
    let before = host.routes.len();
    host.routes
        .retain(|r| !(r.table == MAIN_TABLE && r.dst == ip && r.gateway.is_none()));
    report.host_route_deleted = before != host.routes.len();
    report
}

impl Inner {
    fn step(&mut self, step: SetupStep) -> Result<()> {
        self.steps.push(step);
        if self.fault == Some(step) {
            return Err(NetError::Injected {
                step: step.to_string(),
            });
        }
        Ok(())
    }

    fn setup_branch(&mut self, spec: &BranchSpec) -> Result<PodWiring> {
        let w = self.setup(&spec.pod)?;
        let family = spec.pod.family();
        let host = &mut self.state.host;
        let (route, rules) = expected_host_objects(&spec.pod, w.host_ifindex);
        host.routes.retain(|r| r != &route);
        host.rules.retain(|r| !rules.contains(r));
        let old = RuleFilter {
            priority: Some(VLAN_RULE_PRIORITY),
            iif: Some(spec.pod.host_veth.clone()),
            ..RuleFilter::any(family)
        };
        host.rules.retain(|r| !old.matches(r));
        let name = spec.vlan_name();
        let index = match spec.link {
            BranchLinkKind::Vlan => {
                let stale: Vec<u32> = host
                    .links
                    .iter()
                    .filter(|l| l.name == name)
                    .map(|l| l.index)
                    .collect();
                remove_links(host, &stale);
                self.state.next_index += 1;
                let index = 1000 + self.state.next_index;
                let host = &mut self.state.host;
                host.links.push(Link {
                    index,
                    name: name.clone(),
                    mac: Some(spec.eni_mac),
                    mtu: 9001,
                    up: true,
                    kind: Some("vlan".into()),
                });
                index
            }
            BranchLinkKind::Hotplug => {
                let (found, stale) = hotplug_pick(&host.links, spec.eni_mac, &name)?;
                let (index, stale) = (found.index, stale.map(|l| l.index));
                if let Some(s) = stale {
                    remove_links(host, &[s]);
                }
                if let Some(l) = host.links.iter_mut().find(|l| l.index == index) {
                    l.name = name.clone();
                    l.up = true;
                }
                index
            }
        };
        let host = &mut self.state.host;
        let (routes, rules) = expected_branch_objects(spec, w.host_ifindex, index);
        for r in routes {
            replace_route(host, r);
        }
        for r in rules {
            add_rule(host, r);
        }
        Ok(w)
    }

    fn setup(&mut self, spec: &PodIfSpec) -> Result<PodWiring> {
        let ip = spec.host_cidr();
        let family = spec.family();
        let v6 = family == Family::V6;
        let gw = spec.gateway();
        let table = spec.pod_table();
        if !self.state.pods.contains_key(&spec.netns) {
            return Err(ns_not_found(&spec.netns));
        }

        self.step(SetupStep::RemoveStaleHostVeth)?;
        let stale: Vec<u32> = self
            .state
            .host
            .links
            .iter()
            .filter(|l| l.name == spec.host_veth)
            .map(|l| l.index)
            .collect();
        remove_links(&mut self.state.host, &stale);
        for pod in self.state.pods.values_mut() {
            let tag = format!("peer:{}", spec.host_veth);
            let gone: Vec<u32> = pod
                .links
                .iter()
                .filter(|l| l.kind.as_deref() == Some(&tag))
                .map(|l| l.index)
                .collect();
            remove_links(pod, &gone);
        }

        self.step(SetupStep::CreateVeth)?;
        self.state.next_mac += 1;
        let n = self.state.next_mac.to_be_bytes();
        let host_mac = MacAddr([0x02, 0xaa, n[0], n[1], n[2], n[3]]);
        let cont_mac = MacAddr([0x02, 0xbb, n[0], n[1], n[2], n[3]]);
        self.state.next_index += 2;
        let host_index = 1000 + self.state.next_index;
        let cont_index = 1001 + self.state.next_index;
        let pod_path = spec.netns.display().to_string();
        let Some(pod) = self.state.pods.get_mut(&spec.netns) else {
            return Err(ns_not_found(&spec.netns));
        };
        if pod.link(&spec.container_ifname).is_some() {
            return Err(NetError::Netlink {
                op: format!(
                    "create veth {} <-> {}",
                    spec.container_ifname, spec.host_veth
                ),
                errno: Some(nix::libc::EEXIST),
                source: "link exists".into(),
            });
        }
        pod.links.push(Link {
            index: cont_index,
            name: spec.container_ifname.clone(),
            mac: Some(cont_mac),
            mtu: spec.mtu,
            up: true,
            kind: Some(format!("peer:{}", spec.host_veth)),
        });
        self.state.host.links.push(Link {
            index: host_index,
            name: spec.host_veth.clone(),
            mac: Some(host_mac),
            mtu: spec.mtu,
            up: false,
            kind: Some(format!("veth:{pod_path}")),
        });

        self.step(SetupStep::HostVethSysctls)?;
        self.step(SetupStep::HostVethUp)?;
        if let Some(l) = self
            .state
            .host
            .links
            .iter_mut()
            .find(|l| l.index == host_index)
        {
            l.up = true;
        }
        self.step(SetupStep::ContainerLinkUp)?;
        if v6 {
            self.step(SetupStep::PodSysctls)?;
        }
        self.step(SetupStep::PodRule)?;
        let pod = self
            .state
            .pods
            .get_mut(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        if spec.index > 0 {
            add_rule(
                pod,
                Rule::new(family, FROM_INTERFACE_RULE_PRIORITY, table).from(ip),
            );
        }
        self.step(SetupStep::PodGatewayRoute)?;
        let pod = self
            .state
            .pods
            .get_mut(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        let mut gw_route = Route::link_scope(IpCidr::host(gw), cont_index, table);
        if v6 {
            // As the kernel reports it: IPv6 routes have no scope.
            gw_route.scope = Scope::Universe;
        }
        replace_route(pod, gw_route);
        self.step(SetupStep::PodDefaultRoute)?;
        let pod = self
            .state
            .pods
            .get_mut(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        replace_route(pod, Route::default_via(gw, cont_index, table));
        self.step(SetupStep::PodAddress)?;
        let pod = self
            .state
            .pods
            .get_mut(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        pod.addresses.push(Address {
            index: cont_index,
            cidr: ip,
            scope: Scope::Universe,
        });
        self.step(SetupStep::PodNeighbour)?;
        let pod = self
            .state
            .pods
            .get_mut(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        pod.neighbours.push(Neighbour {
            index: cont_index,
            ip: gw,
            mac: Some(host_mac),
            permanent: true,
        });
        if v6 {
            self.step(SetupStep::WaitDad)?;
        }
        let (route, rules) = expected_host_objects(spec, host_index);
        self.step(SetupStep::HostRoute)?;
        replace_route(&mut self.state.host, route);
        for (i, rule) in rules.into_iter().enumerate() {
            self.step(if i == 0 {
                SetupStep::ToPodRule
            } else {
                SetupStep::FromPodRule
            })?;
            add_rule(&mut self.state.host, rule);
        }
        if spec.host_table() == MAIN_TABLE {
            self.step(SetupStep::FromPodRule)?;
        }
        Ok(PodWiring {
            host_veth: spec.host_veth.clone(),
            host_ifindex: host_index,
            host_mac,
            container_ifname: spec.container_ifname.clone(),
            container_ifindex: cont_index,
            container_mac: cont_mac,
            ip: spec.ip,
            gateway: gw,
            host_table: spec.host_table(),
            mtu: spec.mtu,
        })
    }
}

impl PodNetwork for MemoryPodNetwork {
    async fn setup_interface(&self, spec: &PodIfSpec) -> Result<PodWiring> {
        spec.validate()?;
        let mut g = self.lock();
        let before = g.state.clone();
        let r = g.setup(spec);
        if r.is_err() {
            // Everything a failed ADD did is undone, as the real implementation does.
            g.state = MemoryState {
                next_index: g.state.next_index,
                next_mac: g.state.next_mac,
                ..before
            };
        }
        r
    }

    async fn teardown_pod(&self, t: &PodTeardown) -> Result<TeardownReport> {
        Ok(teardown_ip(&mut self.lock().state.host, t))
    }

    async fn setup_branch(&self, spec: &BranchSpec) -> Result<PodWiring> {
        spec.validate()?;
        let mut g = self.lock();
        let before = g.state.clone();
        let r = g.setup_branch(spec);
        if r.is_err() {
            g.state = MemoryState {
                next_index: g.state.next_index,
                next_mac: g.state.next_mac,
                ..before
            };
        }
        r
    }

    async fn teardown_branch(&self, t: &BranchTeardown) -> Result<TeardownReport> {
        let mut g = self.lock();
        let host = &mut g.state.host;
        let name = vlan_link_name(t.vlan_id);
        let table = crate::names::vlan_route_table_id(t.vlan_id);
        let ip = IpCidr::host(t.ip);
        let gone: Vec<u32> = host
            .links
            .iter()
            .filter(|l| l.name == name)
            .map(|l| l.index)
            .collect();
        remove_links(host, &gone);
        let f = RuleFilter {
            priority: Some(VLAN_RULE_PRIORITY),
            table: Some(table),
            ..RuleFilter::any(ip.family())
        };
        let before = host.rules.len();
        host.rules.retain(|r| !f.matches(r));
        let iif_rules = before - host.rules.len();
        host.routes.retain(|r| !(r.table == table && r.dst == ip));
        let mut report = teardown_ip(
            host,
            &PodTeardown {
                ip: t.ip,
                route_table: table,
            },
        );
        report.rules_deleted += iif_rules;
        Ok(report)
    }

    async fn check_branch(&self, spec: &BranchSpec) -> Result<Vec<PodDrift>> {
        spec.validate_for_check()?;
        let g = self.lock();
        let pod = g
            .state
            .pods
            .get(&spec.pod.netns)
            .ok_or_else(|| ns_not_found(&spec.pod.netns))?;
        Ok(diff_branch(spec, &g.state.host, pod))
    }

    async fn check_interface(&self, spec: &PodIfSpec) -> Result<Vec<PodDrift>> {
        spec.validate()?;
        let g = self.lock();
        let pod = g
            .state
            .pods
            .get(&spec.netns)
            .ok_or_else(|| ns_not_found(&spec.netns))?;
        Ok(diff_pod(spec, &g.state.host, pod))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::PodSpec;
    use std::net::{IpAddr, Ipv4Addr};

    fn spec(table: u32) -> PodSpec {
        PodSpec {
            netns: "/var/run/netns/pod-a".into(),
            host_veth: crate::names::host_veth_name("eni", "default", "web-0", 0),
            container_ifname: "eth0".into(),
            index: 0,
            ipv4: Ipv4Addr::new(10, 0, 1, 5),
            mtu: 9001,
            route_table: table,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn setup_then_check_reports_no_drift_and_records_rules() {
        let net = MemoryPodNetwork::new();
        let s = spec(3);
        net.add_netns(&s.netns);
        let w = block_on(net.setup_pod(&s)).expect("setup");
        assert_eq!(w.gateway, IpAddr::V4(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(w.host_table, 3);
        assert_eq!(block_on(net.check_pod(&s)).expect("check"), vec![]);
        let st = net.state();
        let prios: Vec<u32> = st.host.rules.iter().map(|r| r.priority).collect();
        assert_eq!(prios, vec![512, 1536]);
        assert_eq!(net.steps(), SetupStep::for_family(Family::V4));
    }

    #[test]
    fn a_failure_at_any_step_leaves_the_model_as_it_was() {
        for step in SetupStep::for_family(Family::V4) {
            let net = MemoryPodNetwork::new();
            let s = spec(3);
            net.add_netns(&s.netns);
            let before = net.state();
            net.fail_at(Some(step));
            let err = block_on(net.setup_pod(&s)).expect_err("must fail");
            assert!(matches!(err, NetError::Injected { .. }), "{step}: {err}");
            let after = net.state();
            assert_eq!(after.host.links, before.host.links, "{step}");
            assert_eq!(after.host.rules, before.host.rules, "{step}");
            assert_eq!(after.host.routes, before.host.routes, "{step}");
            assert_eq!(after.pods, before.pods, "{step}");
            assert_eq!(net.steps().last(), Some(&step));
        }
    }

    #[test]
    fn teardown_is_idempotent_and_survives_a_vanished_netns() {
        let net = MemoryPodNetwork::new();
        let s = spec(2);
        net.add_netns(&s.netns);
        block_on(net.setup_pod(&s)).expect("setup");
        net.remove_netns(&s.netns);
        assert!(
            net.state().host.links.is_empty(),
            "host peer dies with the pod netns"
        );
        let r1 = block_on(net.teardown_pod(&s.teardown())).expect("del 1");
        assert_eq!(r1.rules_deleted, 2);
        let r2 = block_on(net.teardown_pod(&s.teardown())).expect("del 2");
        assert_eq!(r2, TeardownReport::default());
        assert!(net.state().host.rules.is_empty());
    }

    #[test]
    fn check_finds_a_deleted_rule_and_a_missing_netns() {
        let net = MemoryPodNetwork::new();
        let s = spec(2);
        net.add_netns(&s.netns);
        block_on(net.setup_pod(&s)).expect("setup");
        net.lock().state.host.rules.retain(|r| r.priority != 1536);
        let drift = block_on(net.check_pod(&s)).expect("check");
        assert_eq!(drift.len(), 1);
        assert!(matches!(&drift[0], PodDrift::MissingRule { rule, .. } if rule.contains("1536")));
        net.remove_netns(&s.netns);
        assert!(block_on(net.check_pod(&s))
            .expect_err("gone")
            .is_not_found());
    }

    fn spec6() -> PodIfSpec {
        PodIfSpec {
            ip: "2001:db8:0:1:2::5".parse().expect("ip"),
            ..PodIfSpec::from(&spec(254))
        }
    }

    #[test]
    fn ipv6_setup_runs_every_step_with_inet6_objects_and_tears_down() {
        let net = MemoryPodNetwork::new();
        let s = spec6();
        net.add_netns(&s.netns);
        let w = block_on(net.setup_interface(&s)).expect("setup");
        assert_eq!(w.gateway, "fe80::1".parse::<IpAddr>().expect("gw"));
        assert_eq!(net.steps(), SetupStep::for_family(Family::V6));
        assert_eq!(net.steps().len(), SetupStep::ALL.len());
        assert_eq!(block_on(net.check_interface(&s)).expect("check"), vec![]);
        let st = net.state();
        assert_eq!(st.host.rules.len(), 1);
        assert_eq!(st.host.rules[0].family, Family::V6);
        assert_eq!(st.host.rules[0].to, Some(IpCidr::host(s.ip)));
        let pod = &st.pods[&s.netns];
        assert!(pod.addresses.iter().any(|a| a.cidr.prefix_len == 128));
        let r = block_on(net.teardown_pod(&s.teardown())).expect("del");
        assert_eq!(r.rules_deleted, 1);
        assert!(r.host_route_deleted);
        assert!(net.state().host.rules.is_empty());
        assert!(net.state().host.routes.is_empty());
    }

    #[test]
    fn ipv6_specs_refuse_link_local_addresses_and_small_mtus() {
        let mut s = spec6();
        s.ip = "fe80::5".parse().expect("ip");
        assert!(s.validate().is_err());
        let mut s = spec6();
        s.mtu = 1279;
        assert!(s.validate().is_err());
        s.mtu = 1280;
        s.validate().expect("1280 is the IPv6 minimum");
    }

    #[test]
    fn main_table_pods_get_no_from_pod_rule() {
        let net = MemoryPodNetwork::new();
        let s = spec(254);
        net.add_netns(&s.netns);
        block_on(net.setup_pod(&s)).expect("setup");
        let prios: Vec<u32> = net.state().host.rules.iter().map(|r| r.priority).collect();
        assert_eq!(prios, vec![512]);
    }

    #[test]
    fn invalid_specs_are_rejected_before_anything_happens() {
        let net = MemoryPodNetwork::new();
        let mut s = spec(2);
        net.add_netns(&s.netns);
        s.host_veth = "a-name-that-is-too-long".into();
        assert!(block_on(net.setup_pod(&s)).is_err());
        assert!(net.steps().is_empty());
        let mut s = spec(2);
        s.mtu = 10;
        assert!(block_on(net.setup_pod(&s)).is_err());
    }
}
