//! The controller's logic as one pure function: [`plan`] compares what the cluster wants
//! (nodes asking for a trunk, pods selected by SecurityGroupPolicies) with what EC2 has (the
//! trunk and branch ENIs carrying the controller's tags, and their trunk associations) and
//! returns the [`Action`]s that close the gap. It keeps no state of its own except
//! [`Memory`], when each orphaned branch was first seen (branches of deleted pods wait a
//! cool-down before deletion, as in the reference, so that kube-proxy and peers stop sending
//! to the address before it can be reused).
//!
//! Rules, in the reference's terms where it has them:
//! - Every node with an instance id gets a CNINode (name = node name), created if missing.
//! - A node asks for a trunk with the label `vpc.amazonaws.com/has-trunk-attached` (any
//!   value) or the CNINode feature `SecurityGroupsForPods`; it gets one trunk ENI on its
//!   instance, then the label `true`. A trunk attached to nothing is deleted.
//! - A pod is a branch pod when it is scheduled on a node with a trunk, not host-network, not
//!   finished, and selected by at least one SecurityGroupPolicy of its namespace; its groups
//!   are the union of those policies' groups (policies in name order, duplicates dropped).
//! - A pod keeps the branch its annotation names for as long as it exists and has not
//!   finished, whatever the policies say later (its network is wired to it); a branch nobody
//!   claims is adopted by the pod its `pod-uid` tag names if that pod still has no branch and
//!   is still selected (a restart between create and annotate), otherwise it is an orphan:
//!   disassociated and deleted once the cool-down has passed.
//! - A new branch takes the lowest VLAN id in `1..=max_vlan` not used on its trunk by any
//!   branch, associated or not (orphans included, until they are deleted).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::model::{
    BranchEni, Cluster, EniObs, Fleet, NodeObs, PodKey, PodObs, SubnetObs, TAG_TRUNK_ENI_ID,
};
use crate::policy;

/// EC2 tag (ours; the reference has none): the uid of the pod a branch was created for, so
/// that a controller restarted between creating and annotating adopts it instead of making a
/// second one.
pub const TAG_POD_UID: &str = "vpc-cni-rs/pod-uid";
/// Highest VLAN id the reference hands out (its `MaxAllocatableVlanIds` is 121, VLAN 0 unused).
pub const DEFAULT_MAX_VLAN: u16 = 120;

/// What the plan needs to know besides the observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// VLAN ids handed out are `1..=max_vlan`.
    pub max_vlan: u16,
    /// How long an orphaned branch waits before it is deleted.
    pub cooldown: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_vlan: DEFAULT_MAX_VLAN,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The only state kept between passes: when each orphaned branch was first seen (time since
/// an origin the caller picks). Losing it (a restart) only restarts the cool-downs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Orphan ENI id → first seen.
    pub orphan_since: BTreeMap<String, Duration>,
}

/// One step towards the desired state; [`crate::run`] executes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create the node's CNINode (owner: the node).
    CreateCniNode {
        /// Node name.
        node: String,
        /// Node uid.
        node_uid: String,
        /// Its `kubernetes.io/os`.
        os: String,
        /// Its instance.
        instance_id: String,
    },
    /// Create a trunk ENI in the instance's subnet with its security groups, attach it, then
    /// label the node.
    CreateTrunk {
        /// Node name.
        node: String,
        /// Instance.
        instance_id: String,
    },
    /// Set `vpc.amazonaws.com/has-trunk-attached=true` on the node.
    LabelTrunkAttached {
        /// Node name.
        node: String,
    },
    /// Delete a trunk ENI that is attached to nothing.
    DeleteTrunk {
        /// ENI id.
        eni: String,
    },
    /// Create a branch ENI with `groups` in the trunk's subnet, associate it with the trunk
    /// under `vlan`, annotate the pod (replacing whatever it had).
    CreateBranch {
        /// The pod.
        pod: PodKey,
        /// Its uid (the annotation patch's precondition, and the branch's tag).
        pod_uid: String,
        /// Its instance.
        instance_id: String,
        /// The trunk ENI.
        trunk: String,
        /// The trunk's subnet.
        subnet_id: String,
        /// That subnet's CIDRs (for the annotation).
        subnet: SubnetObs,
        /// VLAN id.
        vlan: u16,
        /// Security groups.
        groups: Vec<String>,
    },
    /// Associate an existing branch with the trunk under `vlan`, then annotate the pod.
    AssociateBranch {
        /// The pod.
        pod: PodKey,
        /// Its uid.
        pod_uid: String,
        /// The trunk ENI.
        trunk: String,
        /// The branch, as the annotation will read (association id filled in on success).
        branch: BranchEni,
    },
    /// Write the annotation for an associated branch the pod does not name yet.
    AnnotatePod {
        /// The pod.
        pod: PodKey,
        /// Its uid.
        pod_uid: String,
        /// The annotation's elements.
        branches: Vec<BranchEni>,
    },
    /// Disassociate (if associated) and delete a branch nobody claims.
    DeleteBranch {
        /// ENI id.
        eni: String,
        /// Its association, if any.
        association: Option<String>,
    },
}

/// Something the plan could not act on, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The object (`Node n1`, `SecurityGroupPolicy ns/p`, `Pod ns/p`).
    pub object: String,
    /// What is wrong, naming the field.
    pub why: String,
}

/// The result of [`plan`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Actions, in execution order (CNINodes, trunks, branch deletions, branch creations).
    pub actions: Vec<Action>,
    /// Problems found.
    pub warnings: Vec<Warning>,
    /// Branches kept as they are: (pod, ENI id).
    pub kept: Vec<(PodKey, String)>,
}

/// The security groups of the policies that select `pod`, in policy-name order without
/// duplicates (empty: not a branch pod). Unusable policies are skipped with a warning.
pub fn groups_for(pod: &PodObs, cluster: &Cluster, warnings: &mut Vec<Warning>) -> Vec<String> {
    let mut policies: Vec<_> = cluster
        .policies
        .iter()
        .filter(|p| p.namespace == pod.key.namespace)
        .collect();
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    let sa = cluster
        .service_accounts
        .get(&(pod.key.namespace.clone(), pod.service_account.clone()));
    let mut groups: Vec<String> = Vec::new();
    for p in policies {
        match policy::selects(&p.spec, &pod.labels, sa) {
            Ok(true) => {
                for g in &p.spec.security_groups.group_ids {
                    if !groups.contains(g) {
                        groups.push(g.clone());
                    }
                }
            }
            Ok(false) => {}
            Err(e) => {
                let w = Warning {
                    object: format!("SecurityGroupPolicy {}/{}", p.namespace, p.name),
                    why: e.to_string(),
                };
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
        }
    }
    groups
}

/// The instance a trunk serves: the one it is attached to.
fn trunk_instance(eni: &EniObs) -> Option<&str> {
    eni.attached_to.as_deref()
}

fn branch_eni_of(eni: &EniObs, vlan: u16, subnet: &SubnetObs, association: &str) -> BranchEni {
    BranchEni {
        eni_id: eni.id.clone(),
        if_address: eni.mac.clone(),
        private_ip: eni.private_ip.clone().unwrap_or_default(),
        ipv6_addr: eni.ipv6.clone().unwrap_or_default(),
        vlan_id: vlan,
        subnet_cidr: subnet.cidr.clone(),
        subnet_v6_cidr: subnet.ipv6_cidr.clone().unwrap_or_default(),
        association_id: association.to_owned(),
    }
}

/// Compares the cluster with the fleet; `now` is the time since the origin `memory` uses.
pub fn plan(
    cluster: &Cluster,
    fleet: &Fleet,
    settings: &Settings,
    memory: &mut Memory,
    now: Duration,
) -> Plan {
    let mut out = Plan::default();

    // Trunks: the attached one per instance; unattached ones go.
    let mut trunk_of: BTreeMap<&str, &EniObs> = BTreeMap::new();
    for eni in fleet.enis.iter().filter(|e| e.is_trunk()) {
        match trunk_instance(eni) {
            Some(instance) => {
                trunk_of.entry(instance).or_insert(eni);
            }
            None => out.actions.push(Action::DeleteTrunk {
                eni: eni.id.clone(),
            }),
        }
    }

    let mut instance_of: BTreeMap<&str, &str> = BTreeMap::new();
    for node in &cluster.nodes {
        let instance = match &node.instance_id {
            Ok(id) => id.as_str(),
            Err(why) => {
                if node.wants_trunk {
                    out.warnings.push(Warning {
                        object: format!("Node {}", node.name),
                        why: why.clone(),
                    });
                }
                continue;
            }
        };
        instance_of.insert(node.name.as_str(), instance);
        if !node.has_cni_node {
            out.actions.push(Action::CreateCniNode {
                node: node.name.clone(),
                node_uid: node.uid.clone(),
                os: node.os.clone(),
                instance_id: instance.to_owned(),
            });
        }
        plan_trunk(node, instance, trunk_of.get(instance).copied(), &mut out);
    }

    // Branches and their associations.
    let association_of: BTreeMap<&str, &crate::model::AssociationObs> = fleet
        .associations
        .iter()
        .map(|a| (a.branch.as_str(), a))
        .collect();
    let branches: BTreeMap<&str, &EniObs> = fleet
        .enis
        .iter()
        .filter(|e| !e.is_trunk() && e.trunk_tag().is_some())
        .map(|e| (e.id.as_str(), e))
        .collect();
    let mut used_vlans: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    for b in branches.values() {
        if let (Some(t), Some(v)) = (b.trunk_tag(), b.vlan_tag()) {
            used_vlans.entry(t).or_default().insert(v);
        }
    }
    for a in &fleet.associations {
        used_vlans
            .entry(a.trunk.as_str())
            .or_default()
            .insert(a.vlan);
    }

    // Pods on trunk nodes: claimed branches, and pods that need one.
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut needing: Vec<(&PodObs, &EniObs, Vec<String>)> = Vec::new();
    let mut pods: Vec<&PodObs> = cluster.pods.iter().collect();
    pods.sort_by(|a, b| a.key.cmp(&b.key));
    for pod in pods {
        if pod.host_network || pod.terminal {
            continue;
        }
        let Some(trunk) = pod
            .node
            .as_deref()
            .and_then(|n| instance_of.get(n))
            .and_then(|i| trunk_of.get(i))
            .copied()
        else {
            continue;
        };
        let named = match &pod.annotation {
            Some(Ok(list)) => list.first(),
            Some(Err(why)) => {
                out.warnings.push(Warning {
                    object: format!("Pod {}", pod.key),
                    why: why.clone(),
                });
                continue;
            }
            None => None,
        };
        if let Some(named) = named {
            if let Some(eni) = branches
                .get(named.eni_id.as_str())
                .filter(|e| e.trunk_tag() == Some(trunk.id.as_str()))
            {
                claimed.insert(eni.id.as_str());
                out.kept.push((pod.key.clone(), eni.id.clone()));
                if !association_of.contains_key(eni.id.as_str()) {
                    out.actions.push(Action::AssociateBranch {
                        pod: pod.key.clone(),
                        pod_uid: pod.uid.clone(),
                        trunk: trunk.id.clone(),
                        branch: BranchEni {
                            association_id: String::new(),
                            ..named.clone()
                        },
                    });
                }
                continue;
            }
            // The annotation names a branch EC2 no longer has: a new one if still selected.
            out.warnings.push(Warning {
                object: format!("Pod {}", pod.key),
                why: format!(
                    "annotation {} names {} which is not a branch of trunk {}",
                    crate::model::POD_ENI_ANNOTATION,
                    named.eni_id,
                    trunk.id
                ),
            });
        }
        let groups = groups_for(pod, cluster, &mut out.warnings);
        if !groups.is_empty() {
            needing.push((pod, trunk, groups));
        }
    }

    // Adoption: an unclaimed branch tagged with a needing pod's uid on the same trunk.
    let mut adopted: BTreeSet<&str> = BTreeSet::new();
    let mut still_needing = Vec::new();
    for (pod, trunk, groups) in needing {
        let found = branches.values().find(|b| {
            !claimed.contains(b.id.as_str())
                && !adopted.contains(b.id.as_str())
                && b.tags.get(TAG_POD_UID) == Some(&pod.uid)
                && b.tags.get(TAG_TRUNK_ENI_ID) == Some(&trunk.id)
                && b.vlan_tag().is_some()
        });
        let Some(b) = found else {
            still_needing.push((pod, trunk, groups));
            continue;
        };
        adopted.insert(b.id.as_str());
        claimed.insert(b.id.as_str());
        out.kept.push((pod.key.clone(), b.id.clone()));
        let subnet = fleet.subnets.get(&b.subnet_id).cloned().unwrap_or_default();
        match association_of.get(b.id.as_str()) {
            Some(a) => out.actions.push(Action::AnnotatePod {
                pod: pod.key.clone(),
                pod_uid: pod.uid.clone(),
                branches: vec![branch_eni_of(b, a.vlan, &subnet, &a.id)],
            }),
            None => out.actions.push(Action::AssociateBranch {
                pod: pod.key.clone(),
                pod_uid: pod.uid.clone(),
                trunk: trunk.id.clone(),
                branch: branch_eni_of(b, b.vlan_tag().unwrap_or_default(), &subnet, ""),
            }),
        }
    }

    // Orphans: every branch nobody claims, deleted after the cool-down.
    let mut orphans: BTreeSet<String> = BTreeSet::new();
    for b in branches.values() {
        if claimed.contains(b.id.as_str()) {
            continue;
        }
        orphans.insert(b.id.clone());
        let since = *memory.orphan_since.entry(b.id.clone()).or_insert(now);
        if now.saturating_sub(since) >= settings.cooldown {
            out.actions.push(Action::DeleteBranch {
                eni: b.id.clone(),
                association: association_of.get(b.id.as_str()).map(|a| a.id.clone()),
            });
        }
    }
    memory.orphan_since.retain(|eni, _| orphans.contains(eni));

    // New branches.
    for (pod, trunk, groups) in still_needing {
        let used = used_vlans.entry(trunk.id.as_str()).or_default();
        let Some(vlan) = (1..=settings.max_vlan).find(|v| !used.contains(v)) else {
            out.warnings.push(Warning {
                object: format!("Pod {}", pod.key),
                why: format!(
                    "trunk {} has no free VLAN id in 1..={}",
                    trunk.id, settings.max_vlan
                ),
            });
            continue;
        };
        used.insert(vlan);
        out.actions.push(Action::CreateBranch {
            pod: pod.key.clone(),
            pod_uid: pod.uid.clone(),
            instance_id: trunk_instance(trunk).unwrap_or_default().to_owned(),
            trunk: trunk.id.clone(),
            subnet_id: trunk.subnet_id.clone(),
            subnet: fleet
                .subnets
                .get(&trunk.subnet_id)
                .cloned()
                .unwrap_or_default(),
            vlan,
            groups,
        });
    }
    out
}

fn plan_trunk(node: &NodeObs, instance: &str, trunk: Option<&EniObs>, out: &mut Plan) {
    if !node.wants_trunk {
        return;
    }
    match trunk {
        None => out.actions.push(Action::CreateTrunk {
            node: node.name.clone(),
            instance_id: instance.to_owned(),
        }),
        Some(_) if !node.labelled_attached => out.actions.push(Action::LabelTrunkAttached {
            node: node.name.clone(),
        }),
        Some(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AssociationObs, PolicyObs, TAG_INSTANCE_ID, TAG_VLAN_ID};
    use crate::policy::{GroupIds, SecurityGroupPolicySpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    const TRUNK: &str = "eni-trunk1";
    const INSTANCE: &str = "i-0abc";

    fn node(name: &str, wants: bool, labelled: bool) -> NodeObs {
        NodeObs {
            name: name.into(),
            uid: format!("uid-{name}"),
            os: "linux".into(),
            instance_id: Ok(INSTANCE.into()),
            wants_trunk: wants,
            labelled_attached: labelled,
            has_cni_node: true,
        }
    }

    fn pod(name: &str, app: &str) -> PodObs {
        PodObs {
            key: PodKey {
                namespace: "ns".into(),
                name: name.into(),
            },
            uid: format!("uid-{name}"),
            node: Some("n1".into()),
            labels: [("app".to_owned(), app.to_owned())].into(),
            service_account: "default".into(),
            host_network: false,
            terminal: false,
            annotation: None,
        }
    }

    fn policy(name: &str, app: &str, groups: &[&str]) -> PolicyObs {
        PolicyObs {
            namespace: "ns".into(),
            name: name.into(),
            spec: SecurityGroupPolicySpec {
                pod_selector: Some(LabelSelector {
                    match_labels: Some([("app".to_owned(), app.to_owned())].into()),
                    ..LabelSelector::default()
                }),
                service_account_selector: None,
                security_groups: GroupIds {
                    group_ids: groups.iter().map(|g| (*g).to_owned()).collect(),
                },
            },
        }
    }

    fn eni(id: &str, trunk: bool, attached: Option<&str>, tags: &[(&str, &str)]) -> EniObs {
        EniObs {
            id: id.into(),
            interface_type: if trunk { "trunk" } else { "interface" }.into(),
            status: if attached.is_some() || !trunk {
                "in-use"
            } else {
                "available"
            }
            .into(),
            mac: format!("02:00:00:00:00:{:02x}", id.len()),
            private_ip: Some("10.0.1.9".into()),
            ipv6: None,
            subnet_id: "subnet-1".into(),
            security_groups: vec!["sg-1".into()],
            attached_to: attached.map(str::to_owned),
            tags: tags
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn branch(id: &str, vlan: u16, pod_uid: Option<&str>) -> EniObs {
        let vlan = vlan.to_string();
        let mut tags = vec![
            (TAG_TRUNK_ENI_ID, TRUNK),
            (TAG_VLAN_ID, vlan.as_str()),
            (TAG_INSTANCE_ID, INSTANCE),
        ];
        if let Some(uid) = pod_uid {
            tags.push((TAG_POD_UID, uid));
        }
        eni(id, false, None, &tags)
    }

    fn fleet(enis: Vec<EniObs>, assocs: &[(&str, &str, u16)]) -> Fleet {
        Fleet {
            enis,
            associations: assocs
                .iter()
                .map(|(id, b, v)| AssociationObs {
                    id: (*id).into(),
                    trunk: TRUNK.into(),
                    branch: (*b).into(),
                    vlan: *v,
                })
                .collect(),
            subnets: [(
                "subnet-1".to_owned(),
                SubnetObs {
                    cidr: "10.0.1.0/24".into(),
                    ipv6_cidr: None,
                },
            )]
            .into(),
        }
    }

    fn trunk_eni() -> EniObs {
        eni(TRUNK, true, Some(INSTANCE), &[(TAG_INSTANCE_ID, INSTANCE)])
    }

    fn now0() -> Settings {
        Settings {
            max_vlan: DEFAULT_MAX_VLAN,
            cooldown: Duration::ZERO,
        }
    }

    #[test]
    fn a_node_asking_for_a_trunk_gets_one_then_the_label() {
        let mut cluster = Cluster {
            nodes: vec![node("n1", true, false), node("n2", false, false)],
            ..Cluster::default()
        };
        cluster.nodes[1].instance_id = Ok("i-0other".into());
        cluster.nodes[1].has_cni_node = false;
        let p = plan(
            &cluster,
            &Fleet::default(),
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(
            p.actions,
            vec![
                Action::CreateTrunk {
                    node: "n1".into(),
                    instance_id: INSTANCE.into()
                },
                Action::CreateCniNode {
                    node: "n2".into(),
                    node_uid: "uid-n2".into(),
                    os: "linux".into(),
                    instance_id: "i-0other".into()
                },
            ]
        );
        let f = fleet(vec![trunk_eni()], &[]);
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(
            p.actions[0],
            Action::LabelTrunkAttached { node: "n1".into() }
        );
        cluster.nodes[0].labelled_attached = true;
        cluster.nodes[1].has_cni_node = true;
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(p.actions, vec![]);
        // A trunk attached to nothing is deleted; a node without provider id is reported.
        let loose = eni("eni-loose", true, None, &[(TAG_INSTANCE_ID, INSTANCE)]);
        cluster.nodes[0].instance_id = Err("spec.providerID: missing".into());
        let p = plan(
            &cluster,
            &fleet(vec![trunk_eni(), loose], &[]),
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(
            p.actions,
            vec![Action::DeleteTrunk {
                eni: "eni-loose".into()
            }]
        );
        assert_eq!(p.warnings[0].why, "spec.providerID: missing");
    }

    #[test]
    fn selected_pods_get_a_branch_with_the_union_of_groups_and_distinct_vlans() {
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![pod("a", "db"), pod("b", "web"), pod("c", "other")],
            policies: vec![
                policy("p2", "db", &["sg-2", "sg-1"]),
                policy("p1", "db", &["sg-1"]),
                policy("p3", "web", &["sg-3"]),
            ],
            ..Cluster::default()
        };
        // VLAN 1 is taken by an orphan awaiting its cool-down.
        let f = fleet(
            vec![trunk_eni(), branch("eni-old", 1, None)],
            &[("a-1", "eni-old", 1)],
        );
        let mut mem = Memory::default();
        let settings = Settings {
            cooldown: Duration::from_secs(30),
            ..Settings::default()
        };
        let p = plan(&cluster, &f, &settings, &mut mem, Duration::from_secs(5));
        let created: Vec<_> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::CreateBranch {
                    pod,
                    vlan,
                    groups,
                    trunk,
                    subnet,
                    ..
                } => Some((
                    pod.name.as_str(),
                    *vlan,
                    groups.clone(),
                    trunk.as_str(),
                    subnet.cidr.as_str(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            created,
            vec![
                (
                    "a",
                    2,
                    vec!["sg-1".to_owned(), "sg-2".to_owned()],
                    TRUNK,
                    "10.0.1.0/24"
                ),
                ("b", 3, vec!["sg-3".to_owned()], TRUNK, "10.0.1.0/24"),
            ]
        );
        assert!(!p
            .actions
            .iter()
            .any(|a| matches!(a, Action::DeleteBranch { .. })));
        assert_eq!(
            mem.orphan_since.get("eni-old"),
            Some(&Duration::from_secs(5))
        );
        // 30 s later the orphan goes, disassociated first.
        let p = plan(&cluster, &f, &settings, &mut mem, Duration::from_secs(35));
        assert!(p.actions.contains(&Action::DeleteBranch {
            eni: "eni-old".into(),
            association: Some("a-1".into())
        }));
    }

    #[test]
    fn annotated_pods_keep_their_branch_and_finished_or_gone_pods_release_it() {
        let mut a = pod("a", "db");
        let named = BranchEni {
            eni_id: "eni-a".into(),
            if_address: "m".into(),
            private_ip: "10.0.1.9".into(),
            ipv6_addr: String::new(),
            vlan_id: 1,
            subnet_cidr: "10.0.1.0/24".into(),
            subnet_v6_cidr: String::new(),
            association_id: "as-a".into(),
        };
        a.annotation = Some(Ok(vec![named.clone()]));
        let mut b = pod("b", "db");
        b.annotation = Some(Ok(vec![BranchEni {
            eni_id: "eni-b".into(),
            vlan_id: 2,
            ..named.clone()
        }]));
        b.terminal = true;
        // The policy was deleted: a keeps its branch all the same.
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![a.clone(), b],
            ..Cluster::default()
        };
        let f = fleet(
            vec![
                trunk_eni(),
                branch("eni-a", 1, Some("uid-a")),
                branch("eni-b", 2, Some("uid-b")),
                branch("eni-gone", 3, Some("uid-gone")),
            ],
            &[("as-a", "eni-a", 1), ("as-b", "eni-b", 2)],
        );
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(
            p.actions,
            vec![
                Action::DeleteBranch {
                    eni: "eni-b".into(),
                    association: Some("as-b".into())
                },
                Action::DeleteBranch {
                    eni: "eni-gone".into(),
                    association: None
                },
            ]
        );
        assert_eq!(p.kept, vec![(a.key.clone(), "eni-a".to_owned())]);
        // A named branch without its association is associated again.
        let f = fleet(vec![trunk_eni(), branch("eni-a", 1, Some("uid-a"))], &[]);
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![a.clone()],
            ..Cluster::default()
        };
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(
            p.actions,
            vec![Action::AssociateBranch {
                pod: a.key.clone(),
                pod_uid: "uid-a".into(),
                trunk: TRUNK.into(),
                branch: BranchEni {
                    association_id: String::new(),
                    ..named
                }
            }]
        );
    }

    #[test]
    fn a_restart_between_create_and_annotate_adopts_instead_of_doubling() {
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![pod("a", "db"), pod("b", "db")],
            policies: vec![policy("p", "db", &["sg-1"])],
            ..Cluster::default()
        };
        // a's branch was associated but not annotated; b's was created but not associated.
        let f = fleet(
            vec![
                trunk_eni(),
                branch("eni-a", 4, Some("uid-a")),
                branch("eni-b", 5, Some("uid-b")),
            ],
            &[("as-a", "eni-a", 4)],
        );
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(p.actions.len(), 2, "{:?}", p.actions);
        match &p.actions[0] {
            Action::AnnotatePod { pod, branches, .. } => {
                assert_eq!(pod.name, "a");
                assert_eq!(branches[0].eni_id, "eni-a");
                assert_eq!(branches[0].vlan_id, 4);
                assert_eq!(branches[0].association_id, "as-a");
                assert_eq!(branches[0].subnet_cidr, "10.0.1.0/24");
            }
            other => panic!("{other:?}"),
        }
        match &p.actions[1] {
            Action::AssociateBranch {
                pod, branch, trunk, ..
            } => {
                assert_eq!(pod.name, "b");
                assert_eq!(branch.eni_id, "eni-b");
                assert_eq!(branch.vlan_id, 5);
                assert_eq!(trunk, TRUNK);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_network_unscheduled_and_unparsable_pods_are_left_alone() {
        let mut h = pod("h", "db");
        h.host_network = true;
        let mut u = pod("u", "db");
        u.node = None;
        let mut bad = pod("bad", "db");
        bad.annotation = Some(Err("vpc.amazonaws.com/pod-eni: expected value".into()));
        let mut other_node = pod("o", "db");
        other_node.node = Some("n-without-trunk".into());
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![h, u, bad, other_node],
            policies: vec![policy("p", "db", &["sg-1"]), policy("broken", "db", &["x"])],
            ..Cluster::default()
        };
        let f = fleet(vec![trunk_eni()], &[]);
        let p = plan(
            &cluster,
            &f,
            &now0(),
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(p.actions, vec![]);
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert_eq!(p.warnings[0].object, "Pod ns/bad");
    }

    #[test]
    fn vlans_run_out_with_a_warning() {
        let cluster = Cluster {
            nodes: vec![node("n1", true, true)],
            pods: vec![pod("a", "db"), pod("b", "db")],
            policies: vec![policy("p", "db", &["sg-1"])],
            ..Cluster::default()
        };
        let settings = Settings {
            max_vlan: 1,
            cooldown: Duration::ZERO,
        };
        let p = plan(
            &cluster,
            &fleet(vec![trunk_eni()], &[]),
            &settings,
            &mut Memory::default(),
            Duration::ZERO,
        );
        assert_eq!(p.actions.len(), 1);
        assert!(
            p.warnings[0].why.contains("no free VLAN id"),
            "{:?}",
            p.warnings
        );
    }
}
