//! Host wiring done by ipamd (spec/cni.md 3.3–3.7) through the shared `vpc-cni-net` crate:
//! the primary ENI's MTU, each secondary ENI's route table, routes and rule 32765, and the
//! SNAT / connmark / mangle rules and fwmark rule 1024.
//!
//! This module only turns the daemon's configuration and ENI facts into `vpc_cni_net` values
//! ([`eni_spec`], [`snat_config`]) and calls a [`HostNetwork`]; the daemon passes a
//! `NetlinkHostNetwork` opened on its own namespace, tests a `MemoryHostNetwork` or a
//! `NetlinkHostNetwork` inside a test namespace.

use std::net::{IpAddr, Ipv4Addr};

use vpc_cni_net::host::{EniSpec, HostNetwork};
use vpc_cni_net::names::route_table_id;
use vpc_cni_net::snat::{RandomizeSnat as NetRandomize, SnatConfig};
use vpc_cni_net::{Family, IpCidr, Link, MacAddr, NetError, Netlink, Rule};

use crate::config::{Config, RandomizeSnat};
use crate::types::Ipv4Net;

/// Host wiring failures; each names the ENI.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The ENI's facts cannot be wired (bad MAC, primary ENI, IP outside the subnet...).
    #[error("ENI {eni} cannot be wired: {reason}")]
    InvalidEni {
        /// ENI id.
        eni: String,
        /// Why.
        reason: String,
    },
    /// A host operation failed.
    #[error("host {op} for {eni}")]
    Net {
        /// What was being done.
        op: &'static str,
        /// ENI id (or `node` for node-wide rules).
        eni: String,
        /// Cause.
        #[source]
        source: NetError,
    },
}

/// What host wiring needs to know about one ENI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEni {
    /// ENI id (for errors and logs).
    pub id: String,
    /// MAC (`02:ab:...`).
    pub mac: String,
    /// The ENI's primary IPv4 address.
    pub primary_ip: Ipv4Addr,
    /// Its subnet.
    pub subnet_cidr: Ipv4Net,
    /// Network card.
    pub network_card: u32,
    /// Device number.
    pub device_number: u32,
    /// Trunk ENI (no rule 32765).
    pub is_trunk: bool,
}

impl HostEni {
    /// The instance's primary ENI (card 0, device 0): its routes stay the OS's.
    pub fn is_primary(&self) -> bool {
        self.network_card == 0 && self.device_number == 0
    }
}

fn cidr(n: Ipv4Net) -> IpCidr {
    IpCidr {
        addr: IpAddr::V4(n.network()),
        prefix_len: n.prefix_len(),
    }
}

/// The `vpc_cni_net` spec of a secondary ENI: route table from
/// [`vpc_cni_net::names::route_table_id`], `AWS_VPC_ENI_MTU`. Refuses the primary ENI and
/// anything `EniSpec::validate` refuses, before the host is touched.
pub fn eni_spec(eni: &HostEni, mtu: u32) -> Result<EniSpec, HostError> {
    let invalid = |reason: String| HostError::InvalidEni {
        eni: eni.id.clone(),
        reason,
    };
    if eni.is_primary() {
        return Err(invalid("the primary ENI keeps the OS's routes".into()));
    }
    let mac: MacAddr = eni
        .mac
        .parse()
        .map_err(|_| invalid(format!("MAC {:?}", eni.mac)))?;
    let spec = EniSpec {
        mac,
        primary_ip: eni.primary_ip,
        subnet: cidr(eni.subnet_cidr),
        mtu,
        route_table: route_table_id(eni.network_card, eni.device_number),
        trunk: eni.is_trunk,
    };
    spec.validate().map_err(|e| invalid(e.to_string()))?;
    Ok(spec)
}

/// The SNAT / connmark configuration of spec 3.5–3.7 from the daemon's configuration, the
/// primary ENI's address and interface, and the VPC CIDRs (IMDS `vpc-ipv4-cidr-blocks`).
pub fn snat_config(
    cfg: &Config,
    primary_ip: Ipv4Addr,
    primary_if: &str,
    vpc_cidrs: &[Ipv4Net],
) -> SnatConfig {
    SnatConfig {
        primary_ip,
        primary_if: primary_if.to_owned(),
        vpc_cidrs: vpc_cidrs.iter().map(|c| cidr(*c)).collect(),
        exclude_cidrs: cfg.exclude_snat_cidrs.iter().map(|c| cidr(*c)).collect(),
        external_snat: cfg.external_snat,
        randomize: match cfg.randomize_snat {
            RandomizeSnat::Prng => NetRandomize::Prng,
            RandomizeSnat::HashRandom => NetRandomize::HashRandom,
            RandomizeSnat::None => NetRandomize::None,
        },
        node_port_support: cfg.node_port_support,
        veth_prefix: cfg.veth_prefix.clone(),
        connmark: cfg.connmark,
    }
}

/// Wires one secondary ENI (idempotent). The daemon calls it for each ENI at start-up, after
/// creating one, and for each ENI reconcile adopts.
pub async fn wire_eni<H: HostNetwork>(h: &H, eni: &HostEni, mtu: u32) -> Result<Link, HostError> {
    let spec = eni_spec(eni, mtu)?;
    let link = h.setup_eni(&spec).await.map_err(|source| HostError::Net {
        op: "setup ENI",
        eni: eni.id.clone(),
        source,
    })?;
    tracing::info!(eni = %eni.id, link = %link.name, table = spec.route_table, "ENI wired");
    Ok(link)
}

/// An ENI was freed or evicted: deletes its `from <primary IP>` rules. Returns how many went.
pub async fn unwire_eni<H: HostNetwork>(
    h: &H,
    eni: &str,
    primary_ip: Ipv4Addr,
) -> Result<usize, HostError> {
    h.teardown_eni(primary_ip)
        .await
        .map_err(|source| HostError::Net {
            op: "teardown ENI",
            eni: eni.to_owned(),
            source,
        })
}

/// What [`setup_node`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWiring {
    /// The primary interface's name.
    pub primary_if: String,
    /// Secondary ENIs wired (id, link name).
    pub wired: Vec<(String, String)>,
}

/// Start-up host wiring: the primary ENI's MTU (its link found by MAC), the SNAT / connmark
/// rules (with the primary interface's real name), then every secondary ENI of `enis` (the
/// primary ENI in the list is skipped). Stops at the first failure, naming the ENI.
pub async fn setup_node<H: HostNetwork>(
    h: &H,
    cfg: &Config,
    primary: &HostEni,
    vpc_cidrs: &[Ipv4Net],
    enis: &[HostEni],
) -> Result<NodeWiring, HostError> {
    let mac: MacAddr = primary.mac.parse().map_err(|_| HostError::InvalidEni {
        eni: primary.id.clone(),
        reason: format!("MAC {:?}", primary.mac),
    })?;
    let link = h
        .setup_primary_eni(mac, cfg.eni_mtu)
        .await
        .map_err(|source| HostError::Net {
            op: "set primary ENI MTU",
            eni: primary.id.clone(),
            source,
        })?;
    let snat = snat_config(cfg, primary.primary_ip, &link.name, vpc_cidrs);
    h.apply_snat(&snat).await.map_err(|source| HostError::Net {
        op: "apply SNAT rules",
        eni: "node".into(),
        source,
    })?;
    if cfg.enable_v6_egress {
        guard_egress(h, Family::V6).await?;
    }
    let mut wired = Vec::new();
    for e in enis.iter().filter(|e| !e.is_primary()) {
        let l = wire_eni(h, e, cfg.eni_mtu).await?;
        wired.push((e.id.clone(), l.name));
    }
    Ok(NodeWiring {
        primary_if: link.name,
        wired,
    })
}

/// The host side of IPv6 mode (spec/cni.md 2.5, 2.7): the primary ENI's MTU, and the filter
/// `FORWARD` reject of new connections to the IPv4 egress plugin's 169.254.172.0/22. No SNAT
/// and no per-ENI tables (pods use the main table). Returns the primary interface's name.
pub async fn setup_node_v6<H: HostNetwork>(
    h: &H,
    cfg: &Config,
    primary: &HostEni,
) -> Result<String, HostError> {
    let mac: MacAddr = primary.mac.parse().map_err(|_| HostError::InvalidEni {
        eni: primary.id.clone(),
        reason: format!("MAC {:?}", primary.mac),
    })?;
    let link = h
        .setup_primary_eni(mac, cfg.eni_mtu)
        .await
        .map_err(|source| HostError::Net {
            op: "set primary ENI MTU",
            eni: primary.id.clone(),
            source,
        })?;
    guard_egress(h, Family::V4).await?;
    Ok(link.name)
}

/// Inserts the egress guard of `family` (idempotent).
async fn guard_egress<H: HostNetwork>(h: &H, family: Family) -> Result<(), HostError> {
    let added = h
        .guard_egress(family)
        .await
        .map_err(|source| HostError::Net {
            op: "insert the egress guard rule",
            eni: "node".into(),
            source,
        })?;
    if added {
        tracing::info!(
            ?family,
            "egress-only pod addresses: new connections refused"
        );
    }
    Ok(())
}

/// After a checkpoint restore: normalises the `from <ip>` rules of every restored pod address
/// to one rule at 1536 (`configureIPRulesForPods`). Returns how many addresses had rules.
pub async fn normalize_pod_rules<H: HostNetwork>(
    h: &H,
    ips: &[Ipv4Addr],
) -> Result<usize, HostError> {
    let mut n = 0;
    for ip in ips {
        let t = h
            .normalize_pod_rules(*ip)
            .await
            .map_err(|source| HostError::Net {
                op: "normalize pod rules",
                eni: ip.to_string(),
                source,
            })?;
        n += usize::from(t.is_some());
    }
    Ok(n)
}

/// Priority of the `local` table rule in strict security-groups-for-pods mode (the
/// reference's `localRulePriority`): above it the plugin puts the `iif vlan...` rules of
/// branch pods at 10, so that their traffic to node addresses goes out through the branch.
pub const LOCAL_RULE_PRIORITY: u32 = 20;
/// The kernel's `local` routing table.
pub const LOCAL_TABLE: u32 = 255;

fn local_rule(priority: u32) -> Rule {
    Rule::new(Family::V4, priority, LOCAL_TABLE)
}

fn is_plain_local(r: &Rule, priority: u32) -> bool {
    r.priority == priority
        && r.table == LOCAL_TABLE
        && r.from.is_none()
        && r.to.is_none()
        && r.fwmark.is_none()
        && r.iif.is_none()
}

/// Strict mode (spec/cni.md 2.6, 3.3): moves the IPv4 `from all lookup local` rule from
/// priority 0 to [`LOCAL_RULE_PRIORITY`], adding the new one before deleting the old so the
/// node is never without a local rule. Idempotent: on a restart the rule is already at 20 and
/// nothing changes (the old rule is only deleted when it is listed, so the delete can never
/// select the rule at 20). Returns whether anything changed.
pub async fn move_local_rule(nl: &Netlink) -> Result<bool, HostError> {
    let net = |op: &'static str| {
        move |source: NetError| HostError::Net {
            op,
            eni: "node".into(),
            source,
        }
    };
    let rules = nl.rules(Family::V4).await.map_err(net("list rules"))?;
    let at_zero = rules.iter().any(|r| is_plain_local(r, 0));
    let at_new = rules.iter().any(|r| is_plain_local(r, LOCAL_RULE_PRIORITY));
    let mut changed = false;
    if !at_new {
        changed |= nl
            .rule_add(&local_rule(LOCAL_RULE_PRIORITY))
            .await
            .map_err(net("add the local rule at 20"))?;
    }
    if at_zero {
        changed |= nl
            .rule_delete(&local_rule(0))
            .await
            .map_err(net("delete the local rule at 0"))?;
    }
    if changed {
        tracing::info!(
            priority = LOCAL_RULE_PRIORITY,
            "security groups for pods, strict mode: local table rule moved from priority 0"
        );
    }
    Ok(changed)
}

/// The host verbs of security groups for pods, in the host namespace: object-safe so the
/// gRPC backend and the daemon hold an `Arc<dyn PodEniHost>`, and tests a fake.
#[async_trait::async_trait]
pub trait PodEniHost: Send + Sync {
    /// Index of the host link whose MAC is `mac` (the trunk ENI's); `None` when there is none.
    async fn link_index_by_mac(&self, mac: &str) -> Result<Option<u32>, HostError>;
    /// [`move_local_rule`].
    async fn move_local_rule(&self) -> Result<bool, HostError>;
}

/// [`PodEniHost`] over a netlink handle (the daemon's own namespace, or a test's).
#[derive(Debug)]
pub struct NetlinkPodEniHost(pub Netlink);

#[async_trait::async_trait]
impl PodEniHost for NetlinkPodEniHost {
    async fn link_index_by_mac(&self, mac: &str) -> Result<Option<u32>, HostError> {
        let parsed: MacAddr = mac.parse().map_err(|_| HostError::InvalidEni {
            eni: "trunk".into(),
            reason: format!("MAC {mac:?}"),
        })?;
        let link = self
            .0
            .link_by_mac(parsed)
            .await
            .map_err(|source| HostError::Net {
                op: "find the trunk link",
                eni: "trunk".into(),
                source,
            })?;
        Ok(link.map(|l| l.index))
    }

    async fn move_local_rule(&self) -> Result<bool, HostError> {
        move_local_rule(&self.0).await
    }
}

/// The host side as the daemon drives it: object-safe over any [`HostNetwork`] (the daemon
/// keeps one `Arc<dyn NodeHost>`; `None` when host networking is off).
#[async_trait::async_trait]
pub trait NodeHost: Send + Sync {
    /// [`setup_node`].
    async fn setup_node(
        &self,
        cfg: &Config,
        primary: &HostEni,
        vpc_cidrs: &[Ipv4Net],
        enis: &[HostEni],
    ) -> Result<NodeWiring, HostError>;
    /// [`wire_eni`]; returns the link's name.
    async fn wire(&self, eni: &HostEni, mtu: u32) -> Result<String, HostError>;
    /// [`unwire_eni`].
    async fn unwire(&self, eni: &str, primary_ip: Ipv4Addr) -> Result<usize, HostError>;
    /// [`normalize_pod_rules`].
    async fn normalize_pod_rules(&self, ips: &[Ipv4Addr]) -> Result<usize, HostError>;
    /// [`setup_node_v6`].
    async fn setup_node_v6(&self, cfg: &Config, primary: &HostEni) -> Result<String, HostError>;
}

/// A [`NodeHost`] over a [`HostNetwork`] (netlink in the daemon's namespace, or memory),
/// shared so that tests can inspect it.
#[derive(Debug)]
pub struct Host<H>(pub std::sync::Arc<H>);

#[async_trait::async_trait]
impl<H: HostNetwork + 'static> NodeHost for Host<H> {
    async fn setup_node(
        &self,
        cfg: &Config,
        primary: &HostEni,
        vpc_cidrs: &[Ipv4Net],
        enis: &[HostEni],
    ) -> Result<NodeWiring, HostError> {
        setup_node(self.0.as_ref(), cfg, primary, vpc_cidrs, enis).await
    }

    async fn wire(&self, eni: &HostEni, mtu: u32) -> Result<String, HostError> {
        wire_eni(self.0.as_ref(), eni, mtu).await.map(|l| l.name)
    }

    async fn unwire(&self, eni: &str, primary_ip: Ipv4Addr) -> Result<usize, HostError> {
        unwire_eni(self.0.as_ref(), eni, primary_ip).await
    }

    async fn normalize_pod_rules(&self, ips: &[Ipv4Addr]) -> Result<usize, HostError> {
        normalize_pod_rules(self.0.as_ref(), ips).await
    }

    async fn setup_node_v6(&self, cfg: &Config, primary: &HostEni) -> Result<String, HostError> {
        setup_node_v6(self.0.as_ref(), cfg, primary).await
    }
}

impl HostError {
    /// The ENI's link is not (yet) in the namespace: worth waiting for after an attach.
    pub fn is_link_missing(&self) -> bool {
        matches!(self, HostError::Net { source, .. } if matches!(source, NetError::LinkNotFound { .. }))
    }
}

/// Wires a just-attached ENI, waiting up to `wait` for its link to appear (on EC2 the device
/// shows up a few seconds after `AttachNetworkInterface` returns; the reference polls instance
/// metadata for it). Polls every 250 ms; any error other than a missing link fails at once.
pub async fn wire_when_present(
    host: &dyn NodeHost,
    eni: &HostEni,
    mtu: u32,
    wait: std::time::Duration,
) -> Result<String, HostError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match host.wire(eni, mtu).await {
            Err(e) if e.is_link_missing() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(eni = %eni.id, "ENI link not there yet");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpc_cni_net::host::ENI_RULE_PRIORITY;
    use vpc_cni_net::{MemoryHostNetwork, Rule};

    fn eni(device: u32, card: u32) -> HostEni {
        HostEni {
            id: format!("eni-{device}"),
            mac: format!("02:00:00:00:01:{device:02x}"),
            primary_ip: Ipv4Addr::new(10, 0, 2, 10 + device as u8),
            subnet_cidr: "10.0.2.0/24".parse().unwrap(),
            network_card: card,
            device_number: device,
            is_trunk: false,
        }
    }

    #[test]
    fn eni_specs_use_the_reference_route_table_and_refuse_what_cannot_be_wired() {
        let s = eni_spec(&eni(1, 0), 9001).unwrap();
        assert_eq!(s.route_table, 2);
        assert_eq!(s.mac.to_string(), "02:00:00:00:01:01");
        assert_eq!(s.subnet, "10.0.2.0/24".parse::<IpCidr>().unwrap());
        assert_eq!(eni_spec(&eni(2, 1), 9001).unwrap().route_table, 10_102);
        assert!(matches!(
            eni_spec(&eni(0, 0), 9001),
            Err(HostError::InvalidEni { .. })
        ));
        let mut bad = eni(1, 0);
        bad.mac = "zz".into();
        assert!(eni_spec(&bad, 9001).is_err());
        let mut outside = eni(1, 0);
        outside.primary_ip = Ipv4Addr::new(10, 9, 9, 9);
        let err = eni_spec(&outside, 9001).unwrap_err().to_string();
        assert!(err.contains("eni-1"), "{err}");
        assert!(eni_spec(&eni(1, 0), 10).is_err(), "MTU below the minimum");
    }

    #[test]
    fn snat_config_follows_the_configuration() {
        let cfg = Config::for_test(&[
            ("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "192.168.0.0/16"),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "hashrandom"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x100"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "cali"),
        ])
        .unwrap();
        let s = snat_config(
            &cfg,
            Ipv4Addr::new(10, 0, 0, 5),
            "ens5",
            &["10.0.0.0/16".parse().unwrap()],
        );
        assert_eq!(s.primary_if, "ens5");
        assert_eq!(s.vpc_cidrs, vec!["10.0.0.0/16".parse::<IpCidr>().unwrap()]);
        assert_eq!(
            s.exclude_cidrs,
            vec!["192.168.0.0/16".parse::<IpCidr>().unwrap()]
        );
        assert_eq!(s.randomize, NetRandomize::HashRandom);
        assert_eq!(s.connmark, 0x100);
        assert_eq!(s.veth_prefix, "cali");
        assert!(!s.external_snat);
        s.validate().unwrap();
    }

    #[tokio::test]
    async fn ipv6_mode_sets_the_primary_mtu_and_the_ipv4_egress_guard_and_no_snat() {
        let cfg = Config::for_test(&[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("AWS_VPC_ENI_MTU", "1500"),
        ])
        .unwrap();
        let h = MemoryHostNetwork::new();
        let primary = eni(0, 0);
        h.add_link("ens5", primary.mac.parse().unwrap());
        assert_eq!(setup_node_v6(&h, &cfg, &primary).await.unwrap(), "ens5");
        // Again at the next start: nothing doubles.
        setup_node_v6(&h, &cfg, &primary).await.unwrap();
        let st = h.state();
        assert!(st.links.iter().all(|l| l.mtu == 1500), "{:?}", st.links);
        assert_eq!(st.egress_guards, vec![Family::V4]);
        assert!(st.snat.is_none(), "no SNAT in IPv6 mode");
        assert!(
            st.rules.is_empty(),
            "pods use the main table: {:?}",
            st.rules
        );
    }

    #[tokio::test]
    async fn ipv6_egress_in_an_ipv4_cluster_guards_the_ula_range() {
        let cfg = Config::for_test(&[("ENABLE_V6_EGRESS", "true")]).unwrap();
        let h = MemoryHostNetwork::new();
        let primary = HostEni {
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            primary_ip: Ipv4Addr::new(10, 0, 0, 5),
            ..eni(0, 0)
        };
        h.add_link("ens5", primary.mac.parse().unwrap());
        setup_node(
            &h,
            &cfg,
            &primary,
            &["10.0.0.0/16".parse().unwrap()],
            std::slice::from_ref(&primary),
        )
        .await
        .unwrap();
        assert_eq!(h.state().egress_guards, vec![Family::V6]);
        let cfg = Config::for_test(&[]).unwrap();
        let h = MemoryHostNetwork::new();
        h.add_link("ens5", primary.mac.parse().unwrap());
        setup_node(
            &h,
            &cfg,
            &primary,
            &["10.0.0.0/16".parse().unwrap()],
            std::slice::from_ref(&primary),
        )
        .await
        .unwrap();
        assert!(h.state().egress_guards.is_empty());
    }

    #[tokio::test]
    async fn setup_node_sets_the_primary_mtu_snat_and_wires_each_secondary_eni() {
        let cfg = Config::for_test(&[("AWS_VPC_ENI_MTU", "1500")]).unwrap();
        let h = MemoryHostNetwork::new();
        let primary = HostEni {
            subnet_cidr: "10.0.0.0/24".parse().unwrap(),
            primary_ip: Ipv4Addr::new(10, 0, 0, 5),
            ..eni(0, 0)
        };
        h.add_link("ens5", primary.mac.parse().unwrap());
        h.add_link("ens6", eni(1, 0).mac.parse().unwrap());
        let mut trunk = eni(2, 0);
        trunk.is_trunk = true;
        h.add_link("ens7", trunk.mac.parse().unwrap());
        let w = setup_node(
            &h,
            &cfg,
            &primary,
            &["10.0.0.0/16".parse().unwrap()],
            &[primary.clone(), eni(1, 0), trunk.clone()],
        )
        .await
        .unwrap();
        assert_eq!(w.primary_if, "ens5");
        assert_eq!(
            w.wired,
            vec![
                ("eni-1".into(), "ens6".into()),
                ("eni-2".into(), "ens7".into())
            ]
        );
        let st = h.state();
        assert!(st.links.iter().all(|l| l.mtu == 1500), "{:?}", st.links);
        assert_eq!(st.snat.as_ref().unwrap().primary_if, "ens5");
        assert_eq!(st.snat.as_ref().unwrap().primary_ip, primary.primary_ip);
        let eni_rules: Vec<&Rule> = st
            .rules
            .iter()
            .filter(|r| r.priority == ENI_RULE_PRIORITY)
            .collect();
        assert_eq!(eni_rules.len(), 1, "trunk ENIs get no 32765 rule");
        assert_eq!(eni_rules[0].table, 2);
        // Freeing the ENI removes its rule.
        assert_eq!(
            unwire_eni(&h, "eni-1", eni(1, 0).primary_ip).await.unwrap(),
            1
        );
        assert!(h
            .state()
            .rules
            .iter()
            .all(|r| r.priority != ENI_RULE_PRIORITY));
    }

    #[tokio::test]
    async fn a_failed_eni_setup_names_the_eni() {
        let cfg = Config::for_test(&[]).unwrap();
        let h = MemoryHostNetwork::new();
        h.add_link("ens6", eni(1, 0).mac.parse().unwrap());
        h.fail_next_setup("route");
        let err = wire_eni(&h, &eni(1, 0), cfg.eni_mtu).await.unwrap_err();
        assert!(
            matches!(&err, HostError::Net { eni, .. } if eni == "eni-1"),
            "{err}"
        );
        // An ENI whose link is not there yet.
        let err = wire_eni(&h, &eni(3, 0), cfg.eni_mtu).await.unwrap_err();
        assert!(matches!(
            err,
            HostError::Net {
                source: NetError::LinkNotFound { .. },
                ..
            }
        ));
        wire_eni(&h, &eni(1, 0), cfg.eni_mtu).await.unwrap();
    }

    /// The real netlink implementation inside a test namespace (never the root one): a veth end
    /// with the ENI's MAC stands in for the ENI, its peer in a second namespace for the subnet.
    #[tokio::test]
    async fn netlink_wiring_in_a_test_namespace_installs_the_eni_table_and_rule() {
        use vpc_cni_net::testing::{skip_netns_test, TestNetns};
        use vpc_cni_net::{Family, Netlink, NetlinkHostNetwork, VethEnd};
        if skip_netns_test("ipamd host wiring") {
            return;
        }
        let node = TestNetns::new("ipamd-host").unwrap();
        let vpc = TestNetns::new("ipamd-vpc").unwrap();
        let e = eni(1, 0);
        let nl = Netlink::open(&node).unwrap();
        nl.create_veth(
            &VethEnd {
                name: "eth1".into(),
                mtu: 1500,
                mac: Some(e.mac.parse().unwrap()),
                up: false,
            },
            &VethEnd {
                name: "gw0".into(),
                mtu: 9001,
                mac: None,
                up: true,
            },
            Some(&vpc),
        )
        .await
        .unwrap();
        let h = NetlinkHostNetwork::new(node.try_clone().unwrap()).unwrap();
        for _ in 0..2 {
            let l = wire_eni(&h, &e, 9001).await.unwrap();
            assert_eq!((l.name.as_str(), l.mtu, l.up), ("eth1", 9001, true));
        }
        let rules = nl.rules(Family::V4).await.unwrap();
        let ours: Vec<_> = rules
            .iter()
            .filter(|r| r.priority == ENI_RULE_PRIORITY)
            .collect();
        assert_eq!(ours.len(), 1, "{rules:?}");
        assert_eq!(ours[0].table, 2);
        assert_eq!(nl.routes(Family::V4, Some(2)).await.unwrap().len(), 2);
        assert_eq!(unwire_eni(&h, &e.id, e.primary_ip).await.unwrap(), 1);
        assert!(nl
            .rules(Family::V4)
            .await
            .unwrap()
            .iter()
            .all(|r| r.priority != ENI_RULE_PRIORITY));
    }

    /// Strict mode's local rule move inside a test namespace (a new namespace has the
    /// kernel's `0: from all lookup local`), twice: the second run (a restart) changes nothing
    /// and the rule at 20 stays. The trunk's link is found by its MAC.
    #[tokio::test]
    async fn strict_mode_moves_the_local_rule_to_20_once_and_finds_the_trunk_link() {
        use vpc_cni_net::testing::{skip_netns_test, TestNetns};
        use vpc_cni_net::{Netlink, VethEnd};
        if skip_netns_test("ipamd local rule") {
            return;
        }
        let node = TestNetns::new("ipamd-sgp").unwrap();
        let nl = Netlink::open(&node).unwrap();
        let locals = |rules: &[Rule]| -> Vec<u32> {
            rules
                .iter()
                .filter(|r| is_plain_local(r, r.priority))
                .map(|r| r.priority)
                .collect()
        };
        assert_eq!(locals(&nl.rules(Family::V4).await.unwrap()), vec![0]);
        let host = NetlinkPodEniHost(Netlink::open(&node).unwrap());
        assert!(host.move_local_rule().await.unwrap(), "first run moves it");
        let after = nl.rules(Family::V4).await.unwrap();
        assert_eq!(locals(&after), vec![LOCAL_RULE_PRIORITY], "{after:?}");
        assert!(
            !host.move_local_rule().await.unwrap(),
            "a restart changes nothing"
        );
        assert_eq!(
            locals(&nl.rules(Family::V4).await.unwrap()),
            vec![LOCAL_RULE_PRIORITY]
        );
        let trunk_mac = "02:00:00:00:07:01";
        nl.create_veth(
            &VethEnd {
                name: "eth2".into(),
                mtu: 1500,
                mac: Some(trunk_mac.parse().unwrap()),
                up: false,
            },
            &VethEnd {
                name: "peer2".into(),
                mtu: 1500,
                mac: None,
                up: false,
            },
            None,
        )
        .await
        .unwrap();
        let eth2 = nl.require_link("eth2").await.unwrap();
        assert_eq!(
            host.link_index_by_mac(trunk_mac).await.unwrap(),
            Some(eth2.index)
        );
        assert_eq!(
            host.link_index_by_mac("02:00:00:00:07:99").await.unwrap(),
            None
        );
        assert!(host.link_index_by_mac("not-a-mac").await.is_err());
        drop(host);
        drop(nl);
        node.delete().unwrap();
    }
}
