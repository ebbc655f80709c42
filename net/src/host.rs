//! Host-side verbs of ipamd (spec cni.md 3.3–3.7): per-ENI setup (link by MAC, MTU, address,
//! ENI route table, connected-route removal, rule 32765), ENI teardown, and the SNAT /
//! connmark / mangle / fwmark state — behind the [`HostNetwork`] trait with a netlink
//! implementation and an in-memory one.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, MutexGuard};

use crate::error::{NetError, Result};
use crate::netlink::{Link, Netlink, Route, Rule, RuleFilter};
use crate::netns::Netns;
use crate::snat::{self, ConnmarkBackend, SnatConfig};
use crate::types::{Family, IpCidr, MacAddr, Scope, MAIN_TABLE};

/// Priority of `from <ENI primary IP> lookup <ENI table>`.
pub const ENI_RULE_PRIORITY: u32 = 32765;

/// A secondary ENI to wire (also the primary ENI of network cards > 0, and trunk ENIs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniSpec {
    /// The ENI's MAC (how its link is found).
    pub mac: MacAddr,
    /// The ENI's primary IPv4 address.
    pub primary_ip: Ipv4Addr,
    /// The ENI's subnet (`10.0.2.0/24`).
    pub subnet: IpCidr,
    /// `AWS_VPC_ENI_MTU`.
    pub mtu: u32,
    /// The ENI's route table ([`crate::names::route_table_id`]); never main.
    pub route_table: u32,
    /// Trunk ENIs get no 32765 rule.
    pub trunk: bool,
}

impl EniSpec {
    /// Checks the spec before anything is touched.
    pub fn validate(&self) -> Result<()> {
        if self.subnet.family() != Family::V4 || !self.subnet.contains(&IpAddr::V4(self.primary_ip))
        {
            return Err(NetError::invalid(format!(
                "ENI {} primary IP {} outside subnet {}",
                self.mac, self.primary_ip, self.subnet
            )));
        }
        if self.subnet.prefix_len >= 31 {
            return Err(NetError::invalid(format!("ENI subnet {}", self.subnet)));
        }
        if self.route_table == MAIN_TABLE || self.route_table == 0 || self.route_table == 255 {
            return Err(NetError::invalid(format!(
                "ENI route table {}",
                self.route_table
            )));
        }
        if !(crate::pod::MIN_MTU..=crate::pod::MAX_MTU).contains(&self.mtu) {
            return Err(NetError::invalid(format!("MTU {}", self.mtu)));
        }
        Ok(())
    }

    /// The subnet gateway: subnet base + 1.
    pub fn gateway(&self) -> Ipv4Addr {
        match self.subnet.network() {
            IpAddr::V4(n) => Ipv4Addr::from(u32::from(n).wrapping_add(1)),
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The rule installed for this ENI: `from <primary>/32 lookup <table>` at 32765.
    pub fn rule(&self) -> Rule {
        Rule::new(Family::V4, ENI_RULE_PRIORITY, self.route_table)
            .from(IpCidr::host_v4(self.primary_ip))
    }

    /// The two routes of the ENI table: `gw/32 dev <link> scope link` and `default via gw`.
    pub fn routes(&self, ifindex: u32) -> [Route; 2] {
        let gw = IpAddr::V4(self.gateway());
        [
            Route::link_scope(IpCidr::host(gw), ifindex, self.route_table),
            Route::default_via(gw, ifindex, self.route_table),
        ]
    }
}

/// The host verbs ipamd needs, in our own nouns.
pub trait HostNetwork: Send + Sync {
    /// Primary ENI: finds its link by MAC and sets the MTU; its routes stay the OS's.
    fn setup_primary_eni(
        &self,
        mac: MacAddr,
        mtu: u32,
    ) -> impl Future<Output = Result<Link>> + Send;

    /// `SetupENINetwork` (spec 3.4) for a secondary ENI. Idempotent.
    fn setup_eni(&self, eni: &EniSpec) -> impl Future<Output = Result<Link>> + Send;

    /// An ENI is being freed: deletes every rule `from <primary IP>/32` (`DeleteRulesBySrc`).
    /// Returns how many went.
    fn teardown_eni(&self, primary_ip: Ipv4Addr) -> impl Future<Output = Result<usize>> + Send;

    /// Applies the SNAT, connmark and mangle rules and the 1024 fwmark rule (spec 3.5–3.7).
    /// Idempotent; stale rules in our chains are removed.
    fn apply_snat(&self, cfg: &SnatConfig) -> impl Future<Output = Result<()>> + Send;

    /// Names of host links (for checkpoint pruning by veth hash suffix).
    fn link_names(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Refuses new connections to the chained egress plugin's addresses of `family` (filter
    /// `FORWARD` reject at position 1, spec 2.7). Idempotent; `true` when the rule was added.
    fn guard_egress(&self, family: Family) -> impl Future<Output = Result<bool>> + Send;

    /// `configureIPRulesForPods` for one allocated pod address: when `from <ip>/32` rules exist,
    /// replaces them all with a single `from <ip>/32 lookup <table>` at 1536, keeping the first
    /// one's table. Returns that table, or `None` when there was no such rule (nothing done).
    fn normalize_pod_rules(&self, ip: Ipv4Addr)
        -> impl Future<Output = Result<Option<u32>>> + Send;
}

fn normalized_from_rule(ip: Ipv4Addr, existing: &[Rule]) -> Option<Rule> {
    let from = Some(IpCidr::host_v4(ip));
    existing.iter().find(|r| r.from == from).map(|r| {
        Rule::new(Family::V4, crate::pod::FROM_POD_RULE_PRIORITY, r.table).from(IpCidr::host_v4(ip))
    })
}

/// The real [`HostNetwork`], working in one namespace (the node's, or a test's).
#[derive(Debug)]
pub struct NetlinkHostNetwork {
    ns: Netns,
    nl: Netlink,
    backend: Option<ConnmarkBackend>,
}

impl NetlinkHostNetwork {
    /// Works in `ns`; the connmark backend is detected from `iptables --version` when SNAT is
    /// first applied. Must be called within a tokio runtime.
    pub fn new(ns: Netns) -> Result<NetlinkHostNetwork> {
        let nl = Netlink::open(&ns)?;
        Ok(NetlinkHostNetwork {
            ns,
            nl,
            backend: None,
        })
    }

    /// Forces a connmark backend instead of detecting it.
    pub fn with_connmark_backend(mut self, backend: ConnmarkBackend) -> NetlinkHostNetwork {
        self.backend = Some(backend);
        self
    }

    /// The namespace's netlink handle.
    pub fn netlink(&self) -> &Netlink {
        &self.nl
    }

    async fn link_by_mac(&self, mac: MacAddr) -> Result<Link> {
        self.nl
            .link_by_mac(mac)
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                what: format!("mac {mac}"),
            })
    }
}

impl HostNetwork for NetlinkHostNetwork {
    async fn setup_primary_eni(&self, mac: MacAddr, mtu: u32) -> Result<Link> {
        let link = self.link_by_mac(mac).await?;
        self.nl.set_mtu(link.index, mtu).await?;
        Ok(Link { mtu, ..link })
    }

    async fn setup_eni(&self, eni: &EniSpec) -> Result<Link> {
        eni.validate()?;
        let link = self.link_by_mac(eni.mac).await?;
        self.nl.set_mtu(link.index, eni.mtu).await?;
        self.nl.set_up(link.index).await?;
        let own = IpCidr {
            addr: IpAddr::V4(eni.primary_ip),
            prefix_len: eni.subnet.prefix_len,
        };
        let present = self.nl.addresses(Some(link.index)).await?;
        for a in present {
            if a.cidr.family() == Family::V4
                && crate::netlink::is_global_unicast(&a.cidr.addr)
                && a.cidr != own
            {
                self.nl.delete_address(link.index, a.cidr).await?;
            }
        }
        if !self
            .nl
            .addresses(Some(link.index))
            .await?
            .iter()
            .any(|a| a.cidr == own)
        {
            self.nl
                .add_address(link.index, own, Scope::Universe)
                .await?;
        }
        for r in eni.routes(link.index) {
            self.nl.route_delete(&r).await?;
            self.nl.route_replace(&r).await?;
        }
        let connected = Route {
            dst: eni.subnet.trunc(),
            gateway: None,
            oif: Some(link.index),
            table: MAIN_TABLE,
            scope: Scope::Link,
            pref_src: Some(IpAddr::V4(eni.primary_ip)),
        };
        self.nl.route_delete(&connected).await?;
        if !eni.trunk {
            let exists = self.nl.rules(Family::V4).await?.iter().any(|r| {
                r.from == Some(IpCidr::host_v4(eni.primary_ip)) && r.table == eni.route_table
            });
            if !exists {
                self.nl.rule_add(&eni.rule()).await?;
            }
        }
        tracing::info!(mac = %eni.mac, ip = %eni.primary_ip, table = eni.route_table, "ENI wired");
        self.nl
            .link_by_index(link.index)
            .await?
            .ok_or_else(|| NetError::LinkNotFound {
                what: format!("index {}", link.index),
            })
    }

    async fn teardown_eni(&self, primary_ip: Ipv4Addr) -> Result<usize> {
        self.nl
            .delete_rules(&RuleFilter {
                from: Some(IpCidr::host_v4(primary_ip)),
                ..RuleFilter::any(Family::V4)
            })
            .await
    }

    async fn apply_snat(&self, cfg: &SnatConfig) -> Result<()> {
        cfg.validate()?;
        let backend = match self.backend {
            Some(b) => b,
            None => snat::detect_connmark_backend(&self.ns)?,
        };
        let mut plan = snat::snat_plan(cfg);
        plan.extend(snat::mangle_plan(cfg));
        match backend {
            ConnmarkBackend::Iptables => {
                plan.extend(snat::connmark_iptables_plan(cfg));
                snat::apply_iptables(&self.ns, &plan)?;
            }
            ConnmarkBackend::Nftables => {
                // The nft table replaces the iptables connmark rules: make sure those are gone.
                let mut off = cfg.clone();
                off.external_snat = true;
                plan.extend(snat::connmark_iptables_plan(&off));
                snat::apply_iptables(&self.ns, &plan)?;
                snat::apply_nft(&self.ns, snat::connmark_nft_script(cfg).as_deref())?;
            }
        }
        // Rule 1024 is deleted and re-added (so a changed mark takes effect), or removed.
        let (rule, wanted) = snat::connmark_rule(cfg);
        self.nl
            .delete_rules(&RuleFilter {
                priority: Some(snat::CONNMARK_RULE_PRIORITY),
                ..RuleFilter::any(Family::V4)
            })
            .await?;
        if wanted {
            self.nl.rule_add(&rule).await?;
        }
        tracing::info!(
            external_snat = cfg.external_snat,
            ?backend,
            "host SNAT rules applied"
        );
        Ok(())
    }

    async fn link_names(&self) -> Result<Vec<String>> {
        Ok(self.nl.links().await?.into_iter().map(|l| l.name).collect())
    }

    async fn guard_egress(&self, family: Family) -> Result<bool> {
        snat::apply_egress_guard(&self.ns, family)
    }

    async fn normalize_pod_rules(&self, ip: Ipv4Addr) -> Result<Option<u32>> {
        let Some(rule) = normalized_from_rule(ip, &self.nl.rules(Family::V4).await?) else {
            return Ok(None);
        };
        self.nl
            .delete_rules(&RuleFilter {
                from: rule.from,
                ..RuleFilter::any(Family::V4)
            })
            .await?;
        self.nl.rule_add(&rule).await?;
        Ok(Some(rule.table))
    }
}

/// Recorded host state of [`MemoryHostNetwork`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryHost {
    /// Links (seed them with [`MemoryHostNetwork::add_link`]).
    pub links: Vec<Link>,
    /// ENIs wired, by MAC, with their spec.
    pub enis: Vec<EniSpec>,
    /// Rules.
    pub rules: Vec<Rule>,
    /// The last SNAT config applied.
    pub snat: Option<SnatConfig>,
    /// Families whose egress guard rule is in place.
    pub egress_guards: Vec<Family>,
}

/// An in-memory [`HostNetwork`] for tests of ipamd: it keeps links, wired ENIs, rules and the
/// applied SNAT config, and can be told to fail the next ENI setup.
#[derive(Debug, Default)]
pub struct MemoryHostNetwork {
    state: Mutex<(MemoryHost, Option<String>)>,
}

impl MemoryHostNetwork {
    /// No links.
    pub fn new() -> MemoryHostNetwork {
        MemoryHostNetwork::default()
    }

    fn lock(&self) -> MutexGuard<'_, (MemoryHost, Option<String>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a link (an ENI hot-plugged into the node).
    pub fn add_link(&self, name: &str, mac: MacAddr) {
        let mut g = self.lock();
        let index = g.0.links.len() as u32 + 2;
        g.0.links.push(Link {
            index,
            name: name.into(),
            mac: Some(mac),
            mtu: 1500,
            up: false,
            kind: None,
        });
    }

    /// Makes the next `setup_eni` fail with an injected error named `what`.
    pub fn fail_next_setup(&self, what: &str) {
        self.lock().1 = Some(what.into());
    }

    /// A copy of the state.
    pub fn state(&self) -> MemoryHost {
        self.lock().0.clone()
    }
}

impl HostNetwork for MemoryHostNetwork {
    async fn setup_primary_eni(&self, mac: MacAddr, mtu: u32) -> Result<Link> {
        let mut g = self.lock();
        let l =
            g.0.links
                .iter_mut()
                .find(|l| l.mac == Some(mac))
                .ok_or_else(|| NetError::LinkNotFound {
                    what: format!("mac {mac}"),
                })?;
        l.mtu = mtu;
        Ok(l.clone())
    }

    async fn setup_eni(&self, eni: &EniSpec) -> Result<Link> {
        eni.validate()?;
        let mut g = self.lock();
        if let Some(step) = g.1.take() {
            return Err(NetError::Injected { step });
        }
        let l =
            g.0.links
                .iter_mut()
                .find(|l| l.mac == Some(eni.mac))
                .ok_or_else(|| NetError::LinkNotFound {
                    what: format!("mac {}", eni.mac),
                })?;
        l.mtu = eni.mtu;
        l.up = true;
        let link = l.clone();
        g.0.enis.retain(|e| e.mac != eni.mac);
        g.0.enis.push(eni.clone());
        let rule = eni.rule();
        if !eni.trunk
            && !g
                .0
                .rules
                .iter()
                .any(|r| r.from == rule.from && r.table == rule.table)
        {
            g.0.rules.push(rule);
        }
        Ok(link)
    }

    async fn teardown_eni(&self, primary_ip: Ipv4Addr) -> Result<usize> {
        let mut g = self.lock();
        let from = Some(IpCidr::host_v4(primary_ip));
        let before = g.0.rules.len();
        g.0.rules.retain(|r| r.from != from);
        g.0.enis.retain(|e| e.primary_ip != primary_ip);
        Ok(before - g.0.rules.len())
    }

    async fn apply_snat(&self, cfg: &SnatConfig) -> Result<()> {
        cfg.validate()?;
        let mut g = self.lock();
        let (rule, wanted) = snat::connmark_rule(cfg);
        g.0.rules
            .retain(|r| r.priority != snat::CONNMARK_RULE_PRIORITY);
        if wanted {
            g.0.rules.push(rule);
        }
        g.0.snat = Some(cfg.clone());
        Ok(())
    }

    async fn link_names(&self) -> Result<Vec<String>> {
        Ok(self.lock().0.links.iter().map(|l| l.name.clone()).collect())
    }

    async fn guard_egress(&self, family: Family) -> Result<bool> {
        let mut g = self.lock();
        if g.0.egress_guards.contains(&family) {
            return Ok(false);
        }
        g.0.egress_guards.push(family);
        Ok(true)
    }

    async fn normalize_pod_rules(&self, ip: Ipv4Addr) -> Result<Option<u32>> {
        let mut g = self.lock();
        let Some(rule) = normalized_from_rule(ip, &g.0.rules) else {
            return Ok(None);
        };
        g.0.rules.retain(|r| r.from != rule.from);
        let table = rule.table;
        g.0.rules.push(rule);
        Ok(Some(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eni() -> EniSpec {
        EniSpec {
            mac: "02:00:00:00:01:01".parse().expect("mac"),
            primary_ip: Ipv4Addr::new(10, 0, 2, 10),
            subnet: "10.0.2.0/24".parse().expect("subnet"),
            mtu: 9001,
            route_table: 2,
            trunk: false,
        }
    }

    #[test]
    fn eni_gateway_is_subnet_base_plus_one_and_rule_is_32765() {
        let e = eni();
        assert_eq!(e.gateway(), Ipv4Addr::new(10, 0, 2, 1));
        assert_eq!(e.rule().to_string(), "32765: from 10.0.2.10/32 lookup 2");
        let [gw, def] = e.routes(7);
        assert_eq!(gw.dst.to_string(), "10.0.2.1/32");
        assert_eq!(gw.scope, Scope::Link);
        assert_eq!(def.gateway, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1))));
        assert_eq!(def.table, 2);
    }

    #[test]
    fn eni_specs_are_validated() {
        let mut e = eni();
        e.primary_ip = Ipv4Addr::new(10, 0, 3, 1);
        assert!(e.validate().is_err());
        let mut e = eni();
        e.route_table = 254;
        assert!(e.validate().is_err());
        assert!(eni().validate().is_ok());
    }

    #[test]
    fn memory_host_records_enis_rules_and_snat() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let h = MemoryHostNetwork::new();
        h.add_link("eth1", eni().mac);
        h.fail_next_setup("boom");
        assert!(matches!(
            rt.block_on(h.setup_eni(&eni())),
            Err(NetError::Injected { .. })
        ));
        let l = rt.block_on(h.setup_eni(&eni())).expect("setup");
        assert!(l.up && l.mtu == 9001);
        rt.block_on(h.setup_eni(&eni())).expect("again");
        assert_eq!(h.state().rules, vec![eni().rule()]);
        assert_eq!(
            rt.block_on(h.teardown_eni(eni().primary_ip)).expect("del"),
            1
        );
        assert!(h.state().rules.is_empty());
        let mut bad = eni();
        bad.mac = "02:00:00:00:09:09".parse().expect("mac");
        assert!(rt
            .block_on(h.setup_eni(&bad))
            .expect_err("no link")
            .is_not_found());
    }

    #[test]
    fn pod_rules_are_normalized_to_one_1536_rule_keeping_the_table() {
        let ip = Ipv4Addr::new(10, 0, 2, 33);
        let from = IpCidr::host_v4(ip);
        let old = vec![
            Rule::new(Family::V4, 1536, 3)
                .from(from)
                .to("10.0.0.0/16".parse().expect("c")),
            Rule::new(Family::V4, 1535, 3).from(from),
            Rule::new(Family::V4, 512, 254).to(from),
        ];
        assert_eq!(
            normalized_from_rule(ip, &old),
            Some(Rule::new(Family::V4, 1536, 3).from(from))
        );
        assert_eq!(
            normalized_from_rule(Ipv4Addr::new(10, 0, 2, 34), &old),
            None
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let h = MemoryHostNetwork::new();
        h.lock().0.rules = old;
        assert_eq!(
            rt.block_on(h.normalize_pod_rules(ip)).expect("norm"),
            Some(3)
        );
        assert_eq!(
            h.state().rules,
            vec![
                Rule::new(Family::V4, 512, 254).to(from),
                Rule::new(Family::V4, 1536, 3).from(from)
            ]
        );
    }
}
