//! Max pods per node.
//!
//! Two formulas are in use on EKS nodes today:
//! - the EKS AMI's `max-pods-calculator.sh` ([`Formula::Calculator`]): prefix delegation (Nitro
//!   only, CNI 1.9.0 and later), custom networking (one ENI fewer), `MAX_ENI`, and a ceiling of
//!   110 pods (30 vCPUs or fewer) or 250 pods (more than 30 vCPUs) unless `show_max_allowed`;
//! - `eni-max-pods.txt` and AL2023's nodeadm ([`Formula::EniMaxPods`]):
//!   `ENIs * (IPv4 per ENI - 1) + 2` on the default network card, no ceiling, no prefix term.
//!
//! Security groups for pods (`ENABLE_POD_ENI`, [`MaxPodsOptions::security_groups_for_pods`]):
//! on a trunking-compatible type the trunk ENI takes one of the node's ENI slots (ipamd keeps
//! it free), so one ENI fewer carries pod addresses; each branch-ENI pod needs no ENI slot
//! and no pool address, only one of the type's branch ENIs ([`crate::limits::TrunkLimits`]):
//! `max pods = (ENIs - 1) * (IPv4 per ENI - 1) + 2 + branch pods`, then the ceiling.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::limits::{trunk_limits_with, Hypervisor, InstanceLimits, LimitOverrides, TrunkLimits};

/// Kubelet's recommended ceiling for instances with 30 vCPUs or fewer.
pub const SMALL_INSTANCE_CEILING: u32 = 110;
/// Kubelet's recommended ceiling for instances with more than 30 vCPUs.
pub const LARGE_INSTANCE_CEILING: u32 = 250;
/// Host-network pods the formula adds (aws-node and kube-proxy).
pub const HOST_NETWORK_PODS: u32 = 2;
/// The VPC CNI version assumed when none is given.
pub const DEFAULT_CNI_VERSION: CniVersion = CniVersion {
    major: 1,
    minor: 23,
    patch: 1,
};

/// A VPC CNI version `X.Y.Z` (a leading `v` is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CniVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl CniVersion {
    /// Prefix delegation exists from 1.9.0 on.
    pub fn supports_prefix_delegation(&self) -> bool {
        self.major > 1 || (self.major == 1 && self.minor > 8)
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl FromStr for CniVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().trim_start_matches('v');
        let parts: Vec<&str> = t.split('.').collect();
        let num = |i: usize| -> Result<u32, String> {
            parts
                .get(i)
                .and_then(|p| p.split('-').next())
                .ok_or_else(|| format!("`{s}` is not a version X.Y.Z"))?
                .parse()
                .map_err(|_| format!("`{s}` is not a version X.Y.Z"))
        };
        if parts.len() != 3 {
            return Err(format!("`{s}` is not a version X.Y.Z"));
        }
        Ok(Self {
            major: num(0)?,
            minor: num(1)?,
            patch: num(2)?,
        })
    }
}

/// Which max-pods formula to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Formula {
    /// `max-pods-calculator.sh` of the EKS AMI.
    Calculator,
    /// `eni-max-pods.txt` / nodeadm: no ceiling, no prefix term.
    EniMaxPods,
}

/// Inputs besides the instance limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPodsOptions {
    /// Formula.
    pub formula: Formula,
    /// `--cni-prefix-delegation-enabled`.
    pub prefix_delegation: bool,
    /// `--cni-custom-networking-enabled`.
    pub custom_networking: bool,
    /// `--cni-max-eni N`.
    pub max_eni: Option<u32>,
    /// `--cni-version`.
    pub cni_version: CniVersion,
    /// `--show-max-allowed`: no 110/250 ceiling.
    pub show_max_allowed: bool,
    /// Security groups for pods (`ENABLE_POD_ENI=true`): a trunk ENI takes one ENI slot and
    /// branch-ENI pods are added up to the type's branch limit.
    pub security_groups_for_pods: bool,
    /// Branch-ENI pods to count (at most the type's branch limit); `None` = the limit.
    pub branch_pods: Option<u32>,
}

impl Default for MaxPodsOptions {
    fn default() -> Self {
        Self {
            formula: Formula::Calculator,
            prefix_delegation: false,
            custom_networking: false,
            max_eni: None,
            cni_version: DEFAULT_CNI_VERSION,
            show_max_allowed: false,
            security_groups_for_pods: false,
            branch_pods: None,
        }
    }
}

/// What security groups for pods adds to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BranchPods {
    /// The type takes a trunk ENI (and the node had a free ENI slot for it).
    pub trunk_attached: bool,
    /// The type's branch ENI limit (0 when not trunking compatible).
    pub branch_limit: u32,
    /// Branch-ENI pods counted in `max_allowed`.
    pub branch_pods: u32,
}

/// One network card's share of a multi-card node (`ENABLE_MULTI_NIC=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardPods {
    /// `NetworkCardIndex`.
    pub network_card: u32,
    /// The card's EC2 ENI limit (`NetworkCards[].MaximumNetworkInterfaces`).
    pub max_enis: u32,
    /// ENIs on this card whose addresses go to pods: the limit lowered by `MAX_ENI` (applied
    /// per card, as ipamd does), less the primary ENI under custom networking and the trunk
    /// ENI's slot on the default card.
    pub enis: u32,
    /// Pod addresses the card can hold: `enis x (IPv4 per ENI - 1)`, times 16 with prefix
    /// delegation.
    pub pod_addresses: u32,
    /// Subnet addresses the card takes when every slot is filled: each attached ENI's primary
    /// (the primary ENI and the trunk included) plus its pod addresses (a /28 takes 16).
    pub subnet_addresses_full: u32,
    /// Subnet addresses a card other than the default takes with no pod on it: ipamd forces
    /// `WARM_IP_TARGET=1`, `MINIMUM_IP_TARGET=1` there, so one ENI with its primary and one
    /// address (one /28 with prefix delegation). `None` on the default card, whose idle use
    /// follows the warm targets (see the planner).
    pub subnet_addresses_idle: Option<u32>,
}

/// Max pods, ENIs and subnet use over every network card (ipamd with `ENABLE_MULTI_NIC=true`).
///
/// Ordinary pods take an address on the default card first and fall through to the next card
/// when one is full, so the node holds as many of them as all cards have pod addresses.
/// A multi-NIC pod (`k8s.amazonaws.com/nicConfig: multi-nic-attachment`) takes one address on
/// every card, so the fullest card bounds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllCards {
    /// Every card, in card-index order.
    pub cards: Vec<CardPods>,
    /// ENIs counted for pods over every card.
    pub enis: u32,
    /// The formula over every card before any ceiling: pod addresses of all cards + 2 (+
    /// branch pods).
    pub max_allowed: u32,
    /// `max_allowed` with the same ceiling as the default-card answer.
    pub max_pods: u32,
    /// Max pods when every pod is a multi-NIC pod: the smallest card's pod addresses + 2 (+
    /// branch pods), with the ceiling.
    pub multi_nic_max_pods: u32,
    /// Subnet addresses every card takes when every slot is filled.
    pub subnet_addresses_full: u32,
}

/// The answer with the terms that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaxPods {
    /// Instance type.
    pub instance_type: String,
    /// The recommended (or, with `show_max_allowed`, the uncapped) max pods.
    pub max_pods: u32,
    /// The formula's value before any ceiling.
    pub max_allowed: u32,
    /// The ceiling applied, if any.
    pub ceiling: Option<u32>,
    /// ENIs counted (after `MAX_ENI` and custom networking).
    pub enis: u32,
    /// IPv4 addresses per ENI.
    pub ipv4_per_eni: u32,
    /// Whether the prefix-delegation term was applied.
    pub prefix_delegation_applied: bool,
    /// vCPUs (chooses the ceiling).
    pub vcpus: u32,
    /// IPv6 mode: no address term, the value is the 110/250 ceiling.
    pub ipv6: bool,
    /// Security groups for pods, when asked for.
    pub security_groups_for_pods: Option<BranchPods>,
    /// True when the type has more than one network card and `max_pods` / `enis` count the
    /// default card only, as `max-pods-calculator.sh`, `eni-max-pods.txt` and ipamd without
    /// `ENABLE_MULTI_NIC` do: the script-compatible answer. `all_cards` has the rest.
    pub default_card_only: bool,
    /// Every card's share (`ENABLE_MULTI_NIC=true`), for a type with more than one card.
    pub all_cards: Option<AllCards>,
    /// Why an option had no effect, or what to watch for.
    pub notes: Vec<String>,
}

/// Computes max pods for `limits` under `opts`, with the embedded trunk table's branch limits.
pub fn max_pods(limits: &InstanceLimits, opts: &MaxPodsOptions) -> MaxPods {
    let trunk = trunk_limits_with(&limits.instance_type, &LimitOverrides::default());
    max_pods_with_trunk(limits, &trunk, opts)
}

/// Computes max pods for `limits` and the trunk limits `trunk` under `opts`.
pub fn max_pods_with_trunk(
    limits: &InstanceLimits,
    trunk: &TrunkLimits,
    opts: &MaxPodsOptions,
) -> MaxPods {
    let mut notes = Vec::new();
    let mut enis = match opts.max_eni {
        Some(m) => m.min(limits.max_enis),
        None => limits.max_enis,
    };
    let sgp = opts.security_groups_for_pods.then(|| {
        let trunk_attached = trunk.trunking_compatible && enis >= 2;
        if !trunk.trunking_compatible {
            notes.push(format!(
                "security groups for pods: {} is not trunking compatible (no trunk ENI, no branch pods)",
                limits.instance_type
            ));
        } else if !trunk_attached {
            notes.push(
                "security groups for pods: no free ENI slot for the trunk ENI (MAX_ENI leaves only the primary)"
                    .into(),
            );
        }
        let limit = trunk.usable_branches();
        let wanted = opts.branch_pods.unwrap_or(limit);
        if wanted > limit {
            notes.push(format!(
                "--branch-pods {wanted}: {} carries at most {limit} branch ENIs",
                limits.instance_type
            ));
        }
        BranchPods {
            trunk_attached,
            branch_limit: limit,
            branch_pods: if trunk_attached { wanted.min(limit) } else { 0 },
        }
    });
    if sgp.as_ref().is_some_and(|b| b.trunk_attached) {
        enis -= 1;
    }
    if opts.custom_networking {
        enis = enis.saturating_sub(1);
    }
    let slots = limits.slots_per_eni();
    let pd_requested = opts.prefix_delegation && opts.formula == Formula::Calculator;
    let is_nitro = limits.hypervisor == Hypervisor::Nitro;
    let pd = pd_requested && is_nitro && opts.cni_version.supports_prefix_delegation();
    if pd_requested && !pd {
        if !opts.cni_version.supports_prefix_delegation() {
            notes.push(format!(
                "prefix delegation ignored: CNI {} predates 1.9.0",
                opts.cni_version
            ));
        } else if limits.bare_metal {
            notes.push(
                "prefix delegation ignored by the calculator script on bare metal (ipamd itself supports it)"
                    .into(),
            );
        } else {
            notes.push(format!(
                "prefix delegation ignored: {} hypervisor is not Nitro",
                limits.hypervisor
            ));
        }
    }
    if opts.prefix_delegation && opts.formula == Formula::EniMaxPods {
        notes.push("eni-max-pods.txt and nodeadm have no prefix-delegation term".into());
    }
    let per_eni = if pd { slots * 16 } else { slots };
    let branch = sgp.as_ref().map_or(0, |b| b.branch_pods);
    let max_allowed = enis * per_eni + HOST_NETWORK_PODS + branch;
    if opts.security_groups_for_pods && opts.formula == Formula::EniMaxPods {
        notes.push(
            "eni-max-pods.txt has no security-groups-for-pods term; the value counts the trunk slot and branch pods"
                .into(),
        );
    }
    let ceiling = match (opts.formula, opts.show_max_allowed) {
        (Formula::Calculator, false) if limits.vcpus > 30 => Some(LARGE_INSTANCE_CEILING),
        (Formula::Calculator, false) => Some(SMALL_INSTANCE_CEILING),
        _ => None,
    };
    let max_pods = ceiling.map_or(max_allowed, |c| c.min(max_allowed));
    if opts.custom_networking && opts.formula == Formula::EniMaxPods {
        notes.push(
            "eni-max-pods.txt ignores custom networking; kubelet may schedule more pods than the node has IPs"
                .into(),
        );
    }
    let trunk_slot = sgp.as_ref().is_some_and(|b| b.trunk_attached);
    let all_cards = (limits.network_cards > 1).then(|| {
        all_cards(
            limits,
            &CardTerms {
                max_eni: opts.max_eni,
                custom_networking: opts.custom_networking,
                trunk_slot,
                per_eni,
                prefix_delegation: pd,
                branch,
                ceiling,
            },
        )
    });
    MaxPods {
        instance_type: limits.instance_type.clone(),
        max_pods,
        max_allowed,
        ceiling: ceiling.filter(|c| *c < max_allowed),
        enis,
        ipv4_per_eni: limits.ipv4_per_eni,
        prefix_delegation_applied: pd,
        vcpus: limits.vcpus,
        ipv6: false,
        security_groups_for_pods: sgp,
        default_card_only: all_cards.is_some(),
        all_cards,
        notes,
    }
}

/// What the default-card answer settled that every card shares.
struct CardTerms {
    max_eni: Option<u32>,
    custom_networking: bool,
    trunk_slot: bool,
    per_eni: u32,
    prefix_delegation: bool,
    branch: u32,
    ceiling: Option<u32>,
}

fn all_cards(limits: &InstanceLimits, t: &CardTerms) -> AllCards {
    let default = limits.default_card.min(limits.network_cards.max(1) - 1);
    let address_cost = if t.prefix_delegation { 16 } else { 1 };
    let cards: Vec<CardPods> = limits
        .enis_per_card()
        .into_iter()
        .enumerate()
        .map(|(i, max)| {
            let card = i as u32;
            let on_default = card == default;
            let attachable = t.max_eni.map_or(max, |m| m.min(max));
            let mut enis = attachable;
            if on_default && t.trunk_slot {
                enis = enis.saturating_sub(1);
            }
            if on_default && t.custom_networking {
                enis = enis.saturating_sub(1);
            }
            let pod_addresses = enis * t.per_eni;
            // Attached ENIs: the pod ENIs, plus on the default card the primary (custom
            // networking) and the trunk, which are attached but carry no pod address.
            let attached = if on_default {
                enis + u32::from(t.custom_networking && attachable > 0) + u32::from(t.trunk_slot)
            } else {
                enis
            };
            CardPods {
                network_card: card,
                max_enis: max,
                enis,
                pod_addresses,
                subnet_addresses_full: attached + pod_addresses,
                subnet_addresses_idle: (!on_default && enis > 0).then_some(1 + address_cost),
            }
        })
        .collect();
    let enis = cards.iter().map(|c| c.enis).sum();
    let addresses: u32 = cards.iter().map(|c| c.pod_addresses).sum();
    let smallest = cards.iter().map(|c| c.pod_addresses).min().unwrap_or(0);
    let max_allowed = addresses + HOST_NETWORK_PODS + t.branch;
    let cap = |v: u32| t.ceiling.map_or(v, |c| c.min(v));
    AllCards {
        enis,
        max_allowed,
        max_pods: cap(max_allowed),
        multi_nic_max_pods: cap(smallest + HOST_NETWORK_PODS + t.branch),
        subnet_addresses_full: cards.iter().map(|c| c.subnet_addresses_full).sum(),
        cards,
    }
}

/// The `eni-max-pods.txt` value for `limits` (what ipamd uses without an API server).
pub fn eni_max_pods(limits: &InstanceLimits) -> u32 {
    limits.max_enis * limits.slots_per_eni() + HOST_NETWORK_PODS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{Catalog, LimitOverrides};

    fn sgp(t: &str, o: MaxPodsOptions) -> MaxPods {
        let l = Catalog::embedded()
            .lookup(t, &LimitOverrides::default())
            .expect(t);
        max_pods(
            &l,
            &MaxPodsOptions {
                security_groups_for_pods: true,
                ..o
            },
        )
    }

    #[test]
    fn security_groups_for_pods_trade_an_eni_slot_for_branch_pods() {
        // m5.large: 3 ENIs, 10 IPv4 per ENI, 9 branches: (3-1)*9 + 2 + 9 = 29.
        let m = sgp("m5.large", MaxPodsOptions::default());
        assert_eq!((m.enis, m.max_allowed, m.max_pods), (2, 29, 29));
        assert_eq!(
            m.security_groups_for_pods,
            Some(BranchPods {
                trunk_attached: true,
                branch_limit: 9,
                branch_pods: 9
            })
        );
        // m5.xlarge: 4 ENIs, 15 IPv4, 18 branches: (4-1)*14 + 2 + 18 = 62 (58 without).
        assert_eq!(sgp("m5.xlarge", MaxPodsOptions::default()).max_pods, 62);
        // Only 4 of the node's pods are branch pods: 44 + 4 = 48.
        let four = MaxPodsOptions {
            branch_pods: Some(4),
            ..Default::default()
        };
        assert_eq!(sgp("m5.xlarge", four).max_pods, 48);
        // More branch pods than the type carries: clamped to 18, with a note.
        let many = sgp(
            "m5.xlarge",
            MaxPodsOptions {
                branch_pods: Some(40),
                ..Default::default()
            },
        );
        assert_eq!(many.max_pods, 62);
        assert!(
            many.notes.iter().any(|n| n.contains("at most 18")),
            "{:?}",
            many.notes
        );
        // Custom networking too: 3 - 1 (trunk) - 1 (primary) = 1 pod ENI: 9 + 2 + 9 = 20.
        let cn = MaxPodsOptions {
            custom_networking: true,
            ..Default::default()
        };
        assert_eq!(sgp("m5.large", cn).max_pods, 20);
        // Prefix delegation: (3-1)*9*16 + 2 + 9 = 299, capped at 110 (2 vCPUs).
        let pd = sgp(
            "m5.large",
            MaxPodsOptions {
                prefix_delegation: true,
                ..Default::default()
            },
        );
        assert_eq!((pd.max_allowed, pd.max_pods), (299, 110));
        // m5.24xlarge: 15 ENIs, 50 IPv4, 107 branches, 96 vCPUs: 14*49 + 2 + 107 = 795 -> 250.
        let big = sgp("m5.24xlarge", MaxPodsOptions::default());
        assert_eq!((big.max_allowed, big.max_pods), (795, 250));
    }

    #[test]
    fn security_groups_for_pods_change_nothing_without_a_trunk() {
        // t3.medium is Nitro but not trunking compatible: 3*5 + 2 = 17 as without.
        let m = sgp("t3.medium", MaxPodsOptions::default());
        assert_eq!((m.enis, m.max_pods), (3, 17));
        assert_eq!(m.security_groups_for_pods.map(|b| b.branch_pods), Some(0));
        assert!(m
            .notes
            .iter()
            .any(|n| n.contains("not trunking compatible")));
        // MAX_ENI=1 leaves no slot for the trunk: 1*9 + 2 = 11, no branch pods.
        let one = sgp(
            "m5.large",
            MaxPodsOptions {
                max_eni: Some(1),
                ..Default::default()
            },
        );
        assert_eq!((one.enis, one.max_pods), (1, 11));
        assert!(!one
            .security_groups_for_pods
            .is_some_and(|b| b.trunk_attached));
        // Off: no trunk slot, no branch term (m5.large 29 either way, m5.xlarge 58).
        let l = Catalog::embedded()
            .lookup("m5.xlarge", &LimitOverrides::default())
            .expect("m5.xlarge");
        let off = max_pods(&l, &MaxPodsOptions::default());
        assert_eq!((off.max_pods, off.security_groups_for_pods), (58, None));
    }

    fn limits(t: &str) -> InstanceLimits {
        Catalog::embedded()
            .lookup(t, &LimitOverrides::default())
            .expect(t)
    }

    fn calc(t: &str, pd: bool, show: bool) -> u32 {
        let opts = MaxPodsOptions {
            prefix_delegation: pd,
            show_max_allowed: show,
            cni_version: "1.18.0".parse().expect("version"),
            ..Default::default()
        };
        max_pods(&limits(t), &opts).max_pods
    }

    /// spec/calculator.md 2.4: eni-max-pods.txt, sec show-max, sec recommended, PD recommended,
    /// PD show-max, for every documented type.
    #[test]
    fn documented_table_is_reproduced() {
        let rows: [(&str, [u32; 5]); 14] = [
            ("t3.small", [11, 11, 11, 110, 146]),
            ("t3.medium", [17, 17, 17, 110, 242]),
            ("m5.large", [29, 29, 29, 110, 434]),
            ("m5.xlarge", [58, 58, 58, 110, 898]),
            ("c5.2xlarge", [58, 58, 58, 110, 898]),
            ("m5.8xlarge", [234, 234, 234, 250, 3714]),
            ("m5.12xlarge", [234, 234, 234, 250, 3714]),
            ("m5.24xlarge", [737, 737, 250, 250, 11762]),
            ("c6in.32xlarge", [394, 394, 250, 250, 6274]),
            ("p5.48xlarge", [100, 100, 100, 250, 1570]),
            ("trn1.32xlarge", [247, 247, 247, 250, 3922]),
            ("t2.micro", [4, 4, 4, 4, 4]),
            ("m4.xlarge", [58, 58, 58, 58, 58]),
            ("m5.metal", [737, 737, 250, 250, 737]),
        ];
        for (t, want) in rows {
            let got = [
                eni_max_pods(&limits(t)),
                calc(t, false, true),
                calc(t, false, false),
                calc(t, true, false),
                calc(t, true, true),
            ];
            assert_eq!(got, want, "{t}");
        }
    }

    #[test]
    fn flag_cases_of_the_calculator_script() {
        let l = limits("m5.large");
        let old = MaxPodsOptions {
            prefix_delegation: true,
            cni_version: "1.8.0".parse().expect("v"),
            ..Default::default()
        };
        let r = max_pods(&l, &old);
        assert_eq!(r.max_pods, 29);
        assert!(r.notes[0].contains("1.9.0"), "{:?}", r.notes);
        let cn = MaxPodsOptions {
            custom_networking: true,
            ..Default::default()
        };
        assert_eq!(max_pods(&l, &cn).max_pods, 20);
        let x = limits("m5.xlarge");
        let cn_show = MaxPodsOptions {
            show_max_allowed: true,
            ..cn
        };
        assert_eq!(max_pods(&x, &cn_show).max_pods, 44);
        let eni2 = MaxPodsOptions {
            max_eni: Some(2),
            ..Default::default()
        };
        assert_eq!(max_pods(&x, &eni2).max_pods, 30);
        let eni2_pd = MaxPodsOptions {
            prefix_delegation: true,
            show_max_allowed: true,
            ..eni2
        };
        assert_eq!(max_pods(&x, &eni2_pd).max_pods, 450);
    }

    #[test]
    fn repository_test_expectations_hold() {
        let v = |s: &str| s.parse::<CniVersion>().expect("v");
        let o = |pd, show, ver| MaxPodsOptions {
            prefix_delegation: pd,
            show_max_allowed: show,
            cni_version: v(ver),
            ..Default::default()
        };
        assert_eq!(
            max_pods(&limits("m5.8xlarge"), &o(false, false, "1.11.2")).max_pods,
            234
        );
        assert_eq!(
            max_pods(&limits("m5.8xlarge"), &o(true, false, "1.11.2")).max_pods,
            250
        );
        assert_eq!(
            max_pods(&limits("c6in.32xlarge"), &o(false, true, "1.18.0")).max_pods,
            394
        );
        assert_eq!(
            max_pods(&limits("m4.xlarge"), &o(false, false, "1.7.5")).max_pods,
            58
        );
    }

    #[test]
    fn nodeadm_defaults_have_no_ceiling() {
        let o = MaxPodsOptions {
            formula: Formula::EniMaxPods,
            ..Default::default()
        };
        for (t, want) in [
            ("m5.large", 29),
            ("m5.24xlarge", 737),
            ("c6in.32xlarge", 394),
            ("p5.48xlarge", 100),
        ] {
            assert_eq!(max_pods(&limits(t), &o).max_pods, want, "{t}");
        }
        assert_eq!(eni_max_pods(&limits("t3.nano")), 4);
        assert_eq!(eni_max_pods(&limits("c5.18xlarge")), 737);
        assert_eq!(eni_max_pods(&limits("p4d.24xlarge")), 737);
    }

    fn cards(t: &str, o: MaxPodsOptions) -> (MaxPods, AllCards) {
        let m = max_pods(&limits(t), &o);
        let all = m.all_cards.clone().expect("a multi-card type");
        (m, all)
    }

    #[test]
    fn every_card_counts_when_multi_nic_is_on_and_the_script_answer_is_flagged() {
        let show = MaxPodsOptions {
            show_max_allowed: true,
            ..Default::default()
        };
        // p5.48xlarge: 32 cards x 2 ENIs, 50 IPv4 per ENI (49 pod slots), 192 vCPUs.
        let (m, all) = cards("p5.48xlarge", show);
        assert!(m.default_card_only);
        assert_eq!((m.enis, m.max_pods), (2, 100)); // the script: 2 * 49 + 2
        assert_eq!(all.cards.len(), 32);
        assert!(all
            .cards
            .iter()
            .all(|c| (c.max_enis, c.enis, c.pod_addresses) == (2, 2, 98)));
        assert_eq!(all.enis, 64);
        assert_eq!((all.max_allowed, all.max_pods), (3138, 3138)); // 64 * 49 + 2
        assert_eq!(all.multi_nic_max_pods, 100); // one address on each card: 98 + 2
        assert_eq!(all.subnet_addresses_full, 32 * (2 + 98));
        assert_eq!(all.cards[0].subnet_addresses_idle, None);
        assert_eq!(all.cards[1].subnet_addresses_idle, Some(2)); // primary + 1 (W=1, M=1)
                                                                 // With the ceiling: 250 for 192 vCPUs, over every card too.
        let (m, all) = cards("p5.48xlarge", MaxPodsOptions::default());
        assert_eq!(
            (m.max_pods, all.max_allowed, all.max_pods),
            (100, 3138, 250)
        );

        // trn1.32xlarge: 8 cards x 5 ENIs, 49 slots: 5 * 49 + 2 = 247 on the default card,
        // 40 * 49 + 2 = 1962 on all, 8 * (5 + 245) = 2000 subnet addresses when full.
        let (m, all) = cards("trn1.32xlarge", show);
        assert_eq!((m.max_pods, all.enis, all.max_pods), (247, 40, 1962));
        assert_eq!(
            (all.multi_nic_max_pods, all.subnet_addresses_full),
            (247, 2000)
        );

        // c6in.32xlarge: 2 cards x 8 ENIs: 394 (script), 16 * 49 + 2 = 786 on all.
        let (m, all) = cards("c6in.32xlarge", show);
        assert_eq!(
            (m.max_pods, all.max_pods, all.multi_nic_max_pods),
            (394, 786, 394)
        );
        assert_eq!(all.subnet_addresses_full, 2 * (8 + 392));

        // i7ie.48xlarge: 8 + 7 ENIs: 15 * 49 + 2 = 737; the 7-ENI card bounds multi-NIC pods.
        let (m, all) = cards("i7ie.48xlarge", show);
        assert_eq!(
            (m.max_pods, all.max_pods, all.multi_nic_max_pods),
            (394, 737, 345)
        );

        // One card: nothing to add, nothing flagged.
        let one = max_pods(&limits("m5.24xlarge"), &show);
        assert!(!one.default_card_only && one.all_cards.is_none());
    }

    #[test]
    fn card_terms_follow_max_eni_custom_networking_trunk_and_prefixes() {
        let show = MaxPodsOptions {
            show_max_allowed: true,
            ..Default::default()
        };
        // MAX_ENI applies per card: c6in.32xlarge with 4 -> 8 ENIs, 8 * 49 + 2 = 394.
        let (m, all) = cards(
            "c6in.32xlarge",
            MaxPodsOptions {
                max_eni: Some(4),
                ..show
            },
        );
        assert_eq!((m.max_pods, all.enis, all.max_pods), (198, 8, 394));
        // Custom networking loses the primary ENI on the default card only: 7 + 8 ENIs,
        // 15 * 49 + 2 = 737; the primary still takes its one address when full.
        let (m, all) = cards(
            "c6in.32xlarge",
            MaxPodsOptions {
                custom_networking: true,
                ..show
            },
        );
        assert_eq!((m.max_pods, all.enis, all.max_pods), (345, 15, 737));
        assert_eq!(all.cards[0].subnet_addresses_full, 8 + 7 * 49);
        assert_eq!(all.subnet_addresses_full, 8 + 343 + 8 + 392);
        assert_eq!(all.multi_nic_max_pods, 345);
        // Security groups for pods: the trunk takes a slot on the default card, 106 branch
        // pods: (7 + 8) * 49 + 2 + 106 = 843; the trunk's primary is in the subnet use.
        let (m, all) = cards(
            "c6in.32xlarge",
            MaxPodsOptions {
                security_groups_for_pods: true,
                ..show
            },
        );
        assert_eq!((m.max_pods, all.max_pods), (345 + 106, 843));
        assert_eq!(all.cards[0].subnet_addresses_full, 8 + 7 * 49);
        // Prefix delegation: 49 /28s per ENI = 784 addresses: 64 * 784 + 2 on p5.48xlarge;
        // an idle card holds its ENI's primary and one /28.
        let (m, all) = cards(
            "p5.48xlarge",
            MaxPodsOptions {
                prefix_delegation: true,
                ..show
            },
        );
        assert_eq!((m.max_pods, all.max_pods), (1570, 50178));
        assert_eq!(all.cards[5].subnet_addresses_idle, Some(17));
        assert_eq!(all.subnet_addresses_full, 32 * (2 + 2 * 784));
        // eni-max-pods has no ceiling over every card either.
        let (_, all) = cards(
            "trn1.32xlarge",
            MaxPodsOptions {
                formula: Formula::EniMaxPods,
                ..Default::default()
            },
        );
        assert_eq!(all.max_pods, 1962);
    }

    #[test]
    fn versions_parse_with_or_without_v() {
        assert_eq!("v1.23.1".parse::<CniVersion>(), Ok(DEFAULT_CNI_VERSION));
        assert!("1.2".parse::<CniVersion>().is_err());
        assert!("one.two.three".parse::<CniVersion>().is_err());
    }
}
