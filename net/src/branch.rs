//! Branch-ENI (security groups for pods) wiring, spec cni.md 2.6: what ADD builds for a pod
//! whose address lives on a branch ENI behind the node's trunk ENI, the branch link behind one
//! narrow verb ([`BranchLink`]), and the pure comparison CHECK uses.
//!
//! A branch pod gets the ordinary veth and pod-side wiring (spec 2.2, interface 0), then on the
//! host:
//! - every old `iif <hostVeth>` rule at priority [`VLAN_RULE_PRIORITY`] deleted;
//! - the branch link `vlan.eth.<vlanId>` carrying the branch ENI's MAC, with the IPv6 sysctls
//!   `accept_ra=0`, `accept_redirects=1`, `forwarding=0`, up; in table `vlanId+100`:
//!   `<gw>/32 dev vlan scope link` and `default via <gw> dev vlan`;
//! - [`SgMode::Strict`]: `<podIP> dev hostVeth scope link` in table `vlanId+100`, and rules at
//!   priority 10 `iif vlan.eth.<id> lookup vlanId+100` and `iif <hostVeth> lookup vlanId+100`;
//! - [`SgMode::Standard`]: the ordinary host wiring against table `vlanId+100` (`<podIP>/32`
//!   in main, `to <podIP> lookup main` at 512, `from <podIP> lookup vlanId+100` at 1536).
//!
//! Teardown is mode-agnostic (the pod may have been added under the other mode): delete the
//! branch link, delete every priority-10 rule for table `vlanId+100` of the family, delete the
//! strict-mode pod route in that table, then the ordinary IP-based teardown against it.
//!
//! The branch link comes from one of two implementations, chosen by [`BranchLinkKind`]:
//! [`VlanBranchLink`] (a real 802.1Q link on the trunk, as the reference) and
//! [`HotplugBranchLink`] (for a simulated fabric: the branch ENI is already a link of the node
//! carrying its MAC, and is renamed). Everything after the link is the same code.

use std::future::Future;
use std::net::IpAddr;

use crate::error::{NetError, Result};
use crate::names::vlan_route_table_id;
use crate::netlink::{Link, Netlink, Route, Rule};
use crate::pod::{link_route, PodIfSpec, FROM_POD_RULE_PRIORITY, TO_CONTAINER_RULE_PRIORITY};
use crate::types::{Family, IpCidr, MacAddr, MAIN_TABLE};

/// Priority of the strict-mode `iif` rules (the reference's `VlanRulePriority`).
pub const VLAN_RULE_PRIORITY: u32 = 10;
/// The largest 802.1Q VLAN id.
pub const MAX_VLAN_ID: u16 = 4094;

/// The branch link's name, `vlan.eth.<vlanId>`.
pub fn vlan_link_name(vlan_id: u16) -> String {
    format!("vlan.eth.{vlan_id}")
}

/// `podSGEnforcingMode`: how a branch pod's host side is wired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SgMode {
    /// `iif` rules at priority 10: all the pod's traffic crosses the branch ENI.
    #[default]
    Strict,
    /// The ordinary 512/1536 rules against the VLAN table.
    Standard,
}

/// Which [`BranchLink`] implementation makes the branch link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BranchLinkKind {
    /// A real 802.1Q VLAN link on the trunk ([`VlanBranchLink`]).
    #[default]
    Vlan,
    /// A link already plugged into the node with the branch MAC, renamed
    /// ([`HotplugBranchLink`]); for the simulated fabric.
    Hotplug,
}

impl BranchLinkKind {
    /// Parses `vlan` or `hotplug`.
    pub fn parse(s: &str) -> Option<BranchLinkKind> {
        match s {
            "vlan" => Some(BranchLinkKind::Vlan),
            "hotplug" => Some(BranchLinkKind::Hotplug),
            _ => None,
        }
    }

    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BranchLinkKind::Vlan => "vlan",
            BranchLinkKind::Hotplug => "hotplug",
        }
    }
}

/// The one verb pair the branch wiring needs from the fabric: make the branch link, and
/// remove it.
pub trait BranchLink: Send + Sync {
    /// Makes the branch link `name` for `vlan_id` with hardware address `mac` (on the trunk
    /// `trunk_ifindex` where that matters), replacing a link of that name, and returns its
    /// index. The link is left down.
    fn create(
        &self,
        trunk_ifindex: u32,
        vlan_id: u16,
        mac: MacAddr,
        name: &str,
    ) -> impl Future<Output = Result<u32>> + Send;

    /// Removes the branch link `name`; `false` when it was already gone.
    fn delete(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;
}

/// The reference's branch link: an 802.1Q VLAN link on the trunk ENI's host interface.
#[derive(Debug, Clone, Copy)]
pub struct VlanBranchLink<'a> {
    nl: &'a Netlink,
}

impl<'a> VlanBranchLink<'a> {
    /// Works in the namespace of `nl` (the node's).
    pub fn new(nl: &'a Netlink) -> VlanBranchLink<'a> {
        VlanBranchLink { nl }
    }
}

impl BranchLink for VlanBranchLink<'_> {
    async fn create(
        &self,
        trunk_ifindex: u32,
        vlan_id: u16,
        mac: MacAddr,
        name: &str,
    ) -> Result<u32> {
        // As the reference: an existing link of that name goes first (the trunk may have
        // changed since it was made).
        if self.nl.delete_link_by_name(name).await? {
            tracing::info!(link = name, "deleted the old VLAN link");
        }
        self.nl.add_vlan(name, trunk_ifindex, vlan_id, mac).await?;
        Ok(self.nl.require_link(name).await?.index)
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        self.nl.delete_link_by_name(name).await
    }
}

/// The simulated fabric's branch link: the test harness (or simulator) has plugged the branch
/// ENI into the node as its own link carrying the branch MAC, as EC2 hot-plugs an ENI; it is
/// found by MAC, set down and renamed `vlan.eth.<id>`.
#[derive(Debug, Clone, Copy)]
pub struct HotplugBranchLink<'a> {
    nl: &'a Netlink,
}

impl<'a> HotplugBranchLink<'a> {
    /// Works in the namespace of `nl` (the node's).
    pub fn new(nl: &'a Netlink) -> HotplugBranchLink<'a> {
        HotplugBranchLink { nl }
    }
}

/// The link a hot-plug create takes: the one carrying `mac`. A stale link named `name` that
/// is another link must go first (returned second).
pub fn hotplug_pick<'l>(
    links: &'l [Link],
    mac: MacAddr,
    name: &str,
) -> Result<(&'l Link, Option<&'l Link>)> {
    let found = links
        .iter()
        .find(|l| l.mac == Some(mac) && l.name == name)
        .or_else(|| links.iter().find(|l| l.mac == Some(mac)))
        .ok_or_else(|| NetError::LinkNotFound {
            what: format!("with the branch ENI's MAC {mac} (branchLink hotplug: the branch ENI must be plugged into the node first)"),
        })?;
    let stale = links
        .iter()
        .find(|l| l.name == name && l.index != found.index);
    Ok((found, stale))
}

impl BranchLink for HotplugBranchLink<'_> {
    async fn create(
        &self,
        trunk_ifindex: u32,
        vlan_id: u16,
        mac: MacAddr,
        name: &str,
    ) -> Result<u32> {
        let links = self.nl.links().await?;
        let (found, stale) = hotplug_pick(&links, mac, name)?;
        if let Some(s) = stale {
            self.nl.delete_link(s.index).await?;
            tracing::info!(link = name, "deleted an old branch link of the same name");
        }
        tracing::debug!(link = %found.name, %mac, vlan_id, trunk_ifindex, "taking the hot-plugged branch ENI");
        self.nl.set_down(found.index).await?;
        if found.name != name {
            self.nl.rename(found.index, name).await?;
        }
        Ok(found.index)
    }

    async fn delete(&self, name: &str) -> Result<bool> {
        self.nl.delete_link_by_name(name).await
    }
}

/// What to build for a branch-ENI pod (ipamd's `PodVlanId`, `PodENIMAC`, `PodENISubnetGW`,
/// `ParentIfIndex`, with the pod's one interface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BranchSpec {
    /// The pod's interface (index 0; `route_table` is `vlanId+100`).
    pub pod: PodIfSpec,
    /// The VLAN id (1..=4094).
    pub vlan_id: u16,
    /// The branch ENI's MAC (all zero in a CHECK from prevResult, which does not record it:
    /// the MAC is then not compared).
    pub eni_mac: MacAddr,
    /// The branch ENI's subnet gateway (`.1` of the subnet, or `fe80:ec2::1`).
    pub subnet_gw: IpAddr,
    /// The trunk ENI's host interface index.
    pub parent_ifindex: u32,
    /// Strict or standard.
    pub mode: SgMode,
    /// How the branch link is made.
    pub link: BranchLinkKind,
}

impl BranchSpec {
    /// The host route table, `vlanId + 100`.
    pub fn table(&self) -> u32 {
        vlan_route_table_id(self.vlan_id)
    }

    /// The branch link's name.
    pub fn vlan_name(&self) -> String {
        vlan_link_name(self.vlan_id)
    }

    /// Checks everything before anything is touched.
    pub fn validate(&self) -> Result<()> {
        self.pod.validate()?;
        if self.pod.index != 0 {
            return Err(NetError::invalid(format!(
                "branch-ENI pod interface index {} (a branch pod has one interface)",
                self.pod.index
            )));
        }
        if !(1..=MAX_VLAN_ID).contains(&self.vlan_id) {
            return Err(NetError::invalid(format!("PodVlanId {}", self.vlan_id)));
        }
        if self.eni_mac.0 == [0; 6] || self.eni_mac.0[0] & 1 != 0 {
            return Err(NetError::invalid(format!("PodENIMAC {}", self.eni_mac)));
        }
        if Family::of(&self.subnet_gw) != self.pod.family() || self.subnet_gw.is_unspecified() {
            return Err(NetError::invalid(format!(
                "PodENISubnetGW {} for pod address {}",
                self.subnet_gw, self.pod.ip
            )));
        }
        if self.link == BranchLinkKind::Vlan && self.parent_ifindex == 0 {
            return Err(NetError::invalid("ParentIfIndex 0 (no trunk interface)"));
        }
        if self.pod.route_table != self.table() {
            return Err(NetError::invalid(format!(
                "branch-ENI pod route table {} (must be {})",
                self.pod.route_table,
                self.table()
            )));
        }
        Ok(())
    }

    /// The checks CHECK can make from a prevResult, which records neither the branch ENI's
    /// MAC nor the trunk: names, MTU, address, VLAN id and gateway.
    pub fn validate_for_check(&self) -> Result<()> {
        self.pod.validate()?;
        if !(1..=MAX_VLAN_ID).contains(&self.vlan_id) {
            return Err(NetError::invalid(format!("VLAN id {}", self.vlan_id)));
        }
        if Family::of(&self.subnet_gw) != self.pod.family() || self.subnet_gw.is_unspecified() {
            return Err(NetError::invalid(format!(
                "branch gateway {} for pod address {}",
                self.subnet_gw, self.pod.ip
            )));
        }
        Ok(())
    }

    /// The teardown request matching this spec.
    pub fn teardown(&self) -> BranchTeardown {
        BranchTeardown {
            ip: self.pod.ip,
            vlan_id: self.vlan_id,
            link: self.link,
        }
    }
}

/// What a branch pod's DEL needs: its address and VLAN id (from prevResult or ipamd), and how
/// its branch link was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchTeardown {
    /// The pod's address.
    pub ip: IpAddr,
    /// The VLAN id.
    pub vlan_id: u16,
    /// How the branch link is removed.
    pub link: BranchLinkKind,
}

/// The host routes and rules of a wired branch pod (host veth `host_ifindex`, branch link
/// `vlan_ifindex`): the branch link's two routes, then the pod route and the mode's rules.
pub fn expected_branch_objects(
    spec: &BranchSpec,
    host_ifindex: u32,
    vlan_ifindex: u32,
) -> (Vec<Route>, Vec<Rule>) {
    let table = spec.table();
    let family = spec.pod.family();
    let ip = spec.pod.host_cidr();
    let mut routes = vec![
        link_route(IpCidr::host(spec.subnet_gw), vlan_ifindex, table),
        Route::default_via(spec.subnet_gw, vlan_ifindex, table),
    ];
    let rules = match spec.mode {
        SgMode::Strict => {
            routes.push(link_route(ip, host_ifindex, table));
            vec![
                Rule::new(family, VLAN_RULE_PRIORITY, table).iif(spec.vlan_name()),
                Rule::new(family, VLAN_RULE_PRIORITY, table).iif(spec.pod.host_veth.clone()),
            ]
        }
        SgMode::Standard => {
            routes.push(link_route(ip, host_ifindex, MAIN_TABLE));
            vec![
                Rule::new(family, TO_CONTAINER_RULE_PRIORITY, MAIN_TABLE).to(ip),
                Rule::new(family, FROM_POD_RULE_PRIORITY, table).from(ip),
            ]
        }
    };
    (routes, rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(mode: SgMode) -> BranchSpec {
        BranchSpec {
            pod: PodIfSpec {
                netns: PathBuf::from("/var/run/netns/p"),
                host_veth: "vlan0123456789a".into(),
                container_ifname: "eth0".into(),
                index: 0,
                ip: "10.1.2.3".parse().expect("ip"),
                mtu: 9001,
                route_table: 105,
            },
            vlan_id: 5,
            eni_mac: "0a:00:00:00:00:05".parse().expect("mac"),
            subnet_gw: "10.1.0.1".parse().expect("gw"),
            parent_ifindex: 3,
            mode,
            link: BranchLinkKind::Vlan,
        }
    }

    #[test]
    fn strict_pods_get_iif_rules_and_the_pod_route_in_the_vlan_table() {
        let (routes, rules) = expected_branch_objects(&spec(SgMode::Strict), 20, 30);
        let text: Vec<String> = rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "10: from all iif vlan.eth.5 lookup 105",
                "10: from all iif vlan0123456789a lookup 105"
            ]
        );
        assert_eq!(routes.len(), 3);
        assert_eq!(
            routes[0],
            Route::link_scope("10.1.0.1/32".parse().expect("c"), 30, 105)
        );
        assert_eq!(
            routes[1],
            Route::default_via("10.1.0.1".parse().expect("gw"), 30, 105)
        );
        assert_eq!(
            routes[2],
            Route::link_scope("10.1.2.3/32".parse().expect("c"), 20, 105)
        );
    }

    #[test]
    fn standard_pods_get_the_ordinary_rules_against_the_vlan_table() {
        let (routes, rules) = expected_branch_objects(&spec(SgMode::Standard), 20, 30);
        let text: Vec<String> = rules.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "512: from all to 10.1.2.3/32 lookup 254",
                "1536: from 10.1.2.3/32 lookup 105"
            ]
        );
        assert_eq!(
            routes[2],
            Route::link_scope("10.1.2.3/32".parse().expect("c"), 20, MAIN_TABLE)
        );
    }

    #[test]
    fn branch_specs_are_validated_naming_the_field() {
        spec(SgMode::Strict).validate().expect("valid");
        let mut s = spec(SgMode::Strict);
        s.vlan_id = 0;
        assert!(s
            .validate()
            .expect_err("vlan")
            .to_string()
            .contains("PodVlanId"));
        let mut s = spec(SgMode::Strict);
        s.eni_mac = MacAddr([1, 0, 0, 0, 0, 1]);
        assert!(s
            .validate()
            .expect_err("mac")
            .to_string()
            .contains("PodENIMAC"));
        let mut s = spec(SgMode::Strict);
        s.subnet_gw = "fe80:ec2::1".parse().expect("v6");
        assert!(s
            .validate()
            .expect_err("gw")
            .to_string()
            .contains("PodENISubnetGW"));
        let mut s = spec(SgMode::Strict);
        s.parent_ifindex = 0;
        assert!(s
            .validate()
            .expect_err("parent")
            .to_string()
            .contains("ParentIfIndex"));
        s.link = BranchLinkKind::Hotplug;
        s.validate().expect("hotplug needs no trunk index");
        let mut s = spec(SgMode::Strict);
        s.pod.route_table = 3;
        assert!(s.validate().is_err());
    }

    #[test]
    fn hotplug_takes_the_link_with_the_branch_mac_and_names_the_mac_when_none() {
        let mac: MacAddr = "0a:00:00:00:00:05".parse().expect("mac");
        let link = |index: u32, name: &str, m: Option<MacAddr>| Link {
            index,
            name: name.into(),
            mac: m,
            mtu: 1500,
            up: true,
            kind: None,
        };
        let links = vec![
            link(1, "lo", None),
            link(2, "vlan.eth.5", Some(MacAddr([2, 0, 0, 0, 0, 9]))),
            link(3, "br-eni1", Some(mac)),
        ];
        let (found, stale) = hotplug_pick(&links, mac, "vlan.eth.5").expect("found");
        assert_eq!(found.index, 3);
        assert_eq!(stale.map(|l| l.index), Some(2));
        let renamed = vec![link(3, "vlan.eth.5", Some(mac))];
        let (found, stale) = hotplug_pick(&renamed, mac, "vlan.eth.5").expect("again");
        assert_eq!((found.index, stale), (3, None));
        let e = hotplug_pick(&links[..2], mac, "vlan.eth.5").expect_err("none");
        assert!(e.to_string().contains("0a:00:00:00:00:05"), "{e}");
    }

    #[test]
    fn the_vlan_request_names_the_link_parent_id_mac_and_kind() {
        use rtnetlink::packet_route::link::{
            InfoData, InfoKind, InfoVlan, LinkAttribute, LinkInfo,
        };
        let mac: MacAddr = "0a:00:00:00:00:07".parse().expect("mac");
        let m = crate::netlink::vlan_link_message("vlan.eth.7", 4, 7, mac);
        let attrs = &m.attributes;
        assert!(
            attrs.contains(&LinkAttribute::IfName("vlan.eth.7".into())),
            "{attrs:?}"
        );
        assert!(attrs.contains(&LinkAttribute::Link(4)), "{attrs:?}");
        assert!(
            attrs.contains(&LinkAttribute::Address(mac.octets().to_vec())),
            "{attrs:?}"
        );
        let info = attrs
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .expect("IFLA_LINKINFO");
        assert!(info.contains(&LinkInfo::Kind(InfoKind::Vlan)), "{info:?}");
        assert!(
            info.contains(&LinkInfo::Data(InfoData::Vlan(vec![InfoVlan::Id(7)]))),
            "{info:?}"
        );
    }

    #[test]
    fn the_link_kind_parses_its_two_spellings_only() {
        assert_eq!(BranchLinkKind::parse("vlan"), Some(BranchLinkKind::Vlan));
        assert_eq!(
            BranchLinkKind::parse("hotplug"),
            Some(BranchLinkKind::Hotplug)
        );
        assert_eq!(BranchLinkKind::parse("VLAN"), None);
        assert_eq!(BranchLinkKind::default().as_str(), "vlan");
    }
}
