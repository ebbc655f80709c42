//! The shell around [`crate::reconcile::plan`]: one [`Controller::pass`] observes the API server
//! and EC2, plans, and executes the actions one by one (a failed action is logged and retried
//! by the next pass, which observes again); [`Controller::run`] repeats passes every interval.
//! Multi-step actions undo what they did when a later step fails (a branch whose association
//! or annotation failed is deleted), and what an undo cannot reach is found by the next pass
//! from its tags.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::ec2::{ControllerEc2, NewEni};
use crate::k8s::{Involved, K8sError, Kube};
use crate::model::{
    BranchEni, Fleet, BRANCH_DESCRIPTION, TAG_INSTANCE_ID, TAG_TRUNK_ENI_ID, TAG_VLAN_ID,
    TRUNK_DESCRIPTION,
};
use crate::reconcile::{self, Action, Memory, Settings, Warning, TAG_POD_UID};
use ipamd::io::ec2::Ec2Error;

/// The controller's name (event source, user agent, logs).
pub const CONTROLLER_NAME: &str = "vpc-resource-controller";

/// Why a pass or an action failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The API server.
    #[error(transparent)]
    K8s(#[from] K8sError),
    /// EC2.
    #[error(transparent)]
    Ec2(#[from] Ec2Error),
    /// Something the plan needs is missing.
    #[error("{0}")]
    Other(String),
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// Actions executed successfully.
    pub done: Vec<Action>,
    /// Actions that failed, with why.
    pub failed: Vec<(Action, String)>,
    /// Problems the observation or the plan found.
    pub warnings: Vec<Warning>,
}

/// The controller: clients, settings and the orphan cool-down memory.
pub struct Controller {
    kube: Kube,
    ec2: Arc<dyn ControllerEc2>,
    settings: Settings,
    memory: Memory,
    origin: Instant,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("kube", &self.kube)
            .field("settings", &self.settings)
            .field("memory", &self.memory)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller with empty memory (as after a restart).
    pub fn new(kube: Kube, ec2: Arc<dyn ControllerEc2>, settings: Settings) -> Controller {
        Controller {
            kube,
            ec2,
            settings,
            memory: Memory::default(),
            origin: Instant::now(),
        }
    }

    /// What EC2 has: the owned ENIs, their trunks' associations, their subnets' CIDRs.
    pub async fn observe_fleet(&self) -> Result<Fleet, Ec2Error> {
        let enis = self.ec2.list_owned().await?;
        let trunks: Vec<String> = enis
            .iter()
            .filter(|e| e.is_trunk())
            .map(|e| e.id.clone())
            .collect();
        let associations = self.ec2.list_associations(&trunks).await?;
        let subnet_ids: BTreeSet<String> = enis.iter().map(|e| e.subnet_id.clone()).collect();
        let subnet_ids: Vec<String> = subnet_ids.into_iter().filter(|s| !s.is_empty()).collect();
        let subnets = self.ec2.describe_subnets(&subnet_ids).await?;
        Ok(Fleet {
            enis,
            associations,
            subnets,
        })
    }

    /// One observe–plan–execute pass.
    pub async fn pass(&mut self) -> Result<PassReport, RunError> {
        let (cluster, mut warnings) = self.kube.observe().await?;
        let fleet = self.observe_fleet().await?;
        let now = self.origin.elapsed();
        let plan = reconcile::plan(&cluster, &fleet, &self.settings, &mut self.memory, now);
        warnings.extend(plan.warnings);
        for w in &warnings {
            tracing::warn!(object = %w.object, why = %w.why, "not acted on");
        }
        let mut report = PassReport {
            warnings,
            ..PassReport::default()
        };
        for action in plan.actions {
            match self.execute(&action).await {
                Ok(()) => {
                    tracing::info!(?action, "done");
                    report.done.push(action);
                }
                Err(e) => {
                    let why = error_chain(&e);
                    tracing::warn!(?action, error = %why, "failed; the next pass retries");
                    self.report_failure(&action, &why).await;
                    report.failed.push((action, why));
                }
            }
        }
        Ok(report)
    }

    /// Passes every `interval` until `stop` resolves.
    pub async fn run(&mut self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            match self.pass().await {
                Ok(r) => tracing::debug!(
                    done = r.done.len(),
                    failed = r.failed.len(),
                    warnings = r.warnings.len(),
                    "pass"
                ),
                Err(e) => tracing::warn!(error = %error_chain(&e), "pass failed"),
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn report_failure(&self, action: &Action, why: &str) {
        let res = match action {
            Action::CreateBranch { pod, pod_uid, .. }
            | Action::AssociateBranch { pod, pod_uid, .. } => {
                self.kube
                    .event(
                        &Involved {
                            kind: "Pod",
                            namespace: &pod.namespace,
                            name: &pod.name,
                            uid: pod_uid,
                        },
                        "Warning",
                        "BranchAllocationFailed",
                        why,
                    )
                    .await
            }
            Action::CreateTrunk { node, .. } => {
                self.kube
                    .event(
                        &Involved {
                            kind: "Node",
                            namespace: "",
                            name: node,
                            uid: "",
                        },
                        "Warning",
                        "BranchTrunkENICreationFailed",
                        why,
                    )
                    .await
            }
            _ => return,
        };
        if let Err(e) = res {
            tracing::debug!(error = %error_chain(&e), "event not posted");
        }
    }

    async fn execute(&self, action: &Action) -> Result<(), RunError> {
        match action {
            Action::CreateCniNode {
                node,
                node_uid,
                os,
                instance_id,
            } => Ok(self
                .kube
                .create_cni_node(node, node_uid, os, instance_id)
                .await?),
            Action::CreateTrunk { node, instance_id } => self.create_trunk(node, instance_id).await,
            Action::LabelTrunkAttached { node } => Ok(self.kube.label_trunk_attached(node).await?),
            Action::DeleteTrunk { eni } => ignore_not_found(self.ec2.delete_eni(eni).await),
            Action::DeleteBranch { eni, association } => {
                self.delete_branch(eni, association.as_deref()).await
            }
            Action::AnnotatePod {
                pod,
                pod_uid,
                branches,
            } => Ok(self.kube.annotate_pod(pod, pod_uid, branches).await?),
            Action::AssociateBranch {
                pod,
                pod_uid,
                trunk,
                branch,
            } => {
                let association = self
                    .ec2
                    .associate(&branch.eni_id, trunk, branch.vlan_id)
                    .await?;
                let b = BranchEni {
                    association_id: association.clone(),
                    ..branch.clone()
                };
                if let Err(e) = self.kube.annotate_pod(pod, pod_uid, &[b]).await {
                    self.undo_branch(&branch.eni_id, Some(&association)).await;
                    return Err(e.into());
                }
                Ok(())
            }
            Action::CreateBranch {
                pod,
                pod_uid,
                instance_id,
                trunk,
                subnet_id,
                subnet,
                vlan,
                groups,
            } => {
                let tags = BTreeMap::from([
                    (TAG_VLAN_ID.to_owned(), vlan.to_string()),
                    (TAG_TRUNK_ENI_ID.to_owned(), trunk.clone()),
                    (TAG_INSTANCE_ID.to_owned(), instance_id.clone()),
                    (TAG_POD_UID.to_owned(), pod_uid.clone()),
                ]);
                let eni = self
                    .ec2
                    .create_eni(&NewEni {
                        subnet_id: subnet_id.clone(),
                        security_groups: groups.clone(),
                        description: BRANCH_DESCRIPTION.to_owned(),
                        trunk: false,
                        tags,
                    })
                    .await?;
                let association = match self.ec2.associate(&eni.id, trunk, *vlan).await {
                    Ok(a) => a,
                    Err(e) => {
                        self.undo_branch(&eni.id, None).await;
                        return Err(e.into());
                    }
                };
                let b = BranchEni {
                    eni_id: eni.id.clone(),
                    if_address: eni.mac.clone(),
                    private_ip: eni.private_ip.clone().unwrap_or_default(),
                    ipv6_addr: eni.ipv6.clone().unwrap_or_default(),
                    vlan_id: *vlan,
                    subnet_cidr: subnet.cidr.clone(),
                    subnet_v6_cidr: subnet.ipv6_cidr.clone().unwrap_or_default(),
                    association_id: association.clone(),
                };
                if let Err(e) = self.kube.annotate_pod(pod, pod_uid, &[b]).await {
                    self.undo_branch(&eni.id, Some(&association)).await;
                    return Err(e.into());
                }
                Ok(())
            }
        }
    }

    async fn create_trunk(&self, node: &str, instance_id: &str) -> Result<(), RunError> {
        let inst = self.ec2.describe_instance(instance_id).await?;
        let max = self.ec2.max_enis(&inst.instance_type).await?;
        // The highest free index, as the reference: ipamd fills indexes from the bottom.
        let index = (1..max)
            .rev()
            .find(|i| !inst.used_device_indexes.contains(i))
            .ok_or_else(|| {
                RunError::Other(format!(
                    "instance {instance_id} ({}) has no free device index for a trunk (max {max})",
                    inst.instance_type
                ))
            })?;
        let eni = self
            .ec2
            .create_eni(&NewEni {
                subnet_id: inst.subnet_id.clone(),
                security_groups: inst.security_groups.clone(),
                description: TRUNK_DESCRIPTION.to_owned(),
                trunk: true,
                tags: BTreeMap::from([(TAG_INSTANCE_ID.to_owned(), instance_id.to_owned())]),
            })
            .await?;
        let attachment = match self.ec2.attach(&eni.id, instance_id, index).await {
            Ok(a) => a,
            Err(e) => {
                if let Err(undo) = self.ec2.delete_eni(&eni.id).await {
                    tracing::warn!(eni = %eni.id, error = %undo, "unattached trunk left for the next pass");
                }
                return Err(e.into());
            }
        };
        if let Err(e) = self
            .ec2
            .set_delete_on_termination(&eni.id, &attachment)
            .await
        {
            tracing::warn!(eni = %eni.id, error = %e, "trunk attached without DeleteOnTermination");
        }
        tracing::info!(node, trunk = %eni.id, index, "trunk attached");
        Ok(self.kube.label_trunk_attached(node).await?)
    }

    async fn delete_branch(&self, eni: &str, association: Option<&str>) -> Result<(), RunError> {
        if let Some(a) = association {
            ignore_not_found(self.ec2.disassociate(a).await)?;
        }
        ignore_not_found(self.ec2.delete_eni(eni).await)
    }

    /// Best-effort rollback of a half-made branch; what fails is an orphan for the next pass.
    async fn undo_branch(&self, eni: &str, association: Option<&str>) {
        if let Err(e) = self.delete_branch(eni, association).await {
            tracing::warn!(eni, error = %error_chain(&e), "half-made branch left for the next pass");
        }
    }
}

fn ignore_not_found(r: Result<(), Ec2Error>) -> Result<(), RunError> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        other => Ok(other?),
    }
}

/// An error with its sources, `: `-joined.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
