//! The reconciler: gathers instance metadata's and EC2's view, asks
//! [`crate::plan::reconcile`] for a plan, and [`apply`]s it to the datastore (checkpoint
//! written) and EC2 (tags); and the leaked-ENI cleanups (hourly, and this instance's own
//! leftovers at start).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::io::ec2::pacer::Pacer;
use crate::io::ec2::{Ec2Api, Ec2Error, EniInfo, TAG_CREATED_AT};
use crate::plan::reconcile::{
    known_enis, needs_ec2, plan, select_leaked, select_own_leftovers, Action, AdoptedEni, ImdsEni,
    LeakedAction, Plan, ReconcileInput, ReconcileSettings, LEAKED_ENI_MIN_AGE,
};
use crate::store::commit::PoolState;
use crate::store::datastore::{DataStore, EniSpec, IpamKey};
use crate::types::Ipv4Net;

/// Reconcile failures.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The checkpoint could not be written after a forced change.
    #[error("reconcile: checkpoint")]
    Checkpoint(#[from] crate::store::commit::StateError),
    /// An EC2 call failed.
    #[error("reconcile: EC2 {op}")]
    Ec2 {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: Ec2Error,
    },
}

/// What [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// ENIs added to the datastore: the daemon wires their host side ([`crate::io::host`]).
    pub adopted: Vec<AdoptedEni>,
    /// ENIs removed: the daemon deletes their host rules (by primary IP).
    pub evicted_enis: Vec<(String, Ipv4Addr)>,
    /// /32s and /28s added.
    pub added_cidrs: usize,
    /// /32s and /28s force-removed (`awscni_force_removed_ips`).
    pub evicted_cidrs: usize,
    /// Pods that lost their address.
    pub lost_pods: Vec<IpamKey>,
    /// ENIs tagged.
    pub tagged: Vec<String>,
    /// Tagging failures (kept going).
    pub tag_errors: Vec<Ec2Error>,
    /// ENIs left unchanged because IMDS and EC2 disagree.
    pub disputed: Vec<String>,
    /// Attached unmanaged ENIs.
    pub unmanaged: Vec<String>,
}

/// Applies a plan: datastore changes in one checkpointed step, then tags through EC2 (a tag
/// failure is reported, not fatal).
pub async fn apply(
    plan: Plan,
    state: &PoolState,
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
) -> Result<ApplyReport, ReconcileError> {
    let now = state.now();
    let mut report = ApplyReport {
        disputed: plan.disputed.clone(),
        unmanaged: plan.unmanaged.clone(),
        ..ApplyReport::default()
    };
    let ds_actions: Vec<&Action> = plan
        .actions
        .iter()
        .filter(|a| !matches!(a, Action::TagEni { .. }))
        .collect();
    if !ds_actions.is_empty() {
        let r = state
            .mutate_and_save(|ds| {
                let mut r = ApplyReport::default();
                for a in &ds_actions {
                    apply_one(ds, a, now, &mut r);
                }
                r
            })
            .await?;
        report.adopted = r.adopted;
        report.evicted_enis = r.evicted_enis;
        report.added_cidrs = r.added_cidrs;
        report.evicted_cidrs = r.evicted_cidrs;
        report.lost_pods = r.lost_pods;
    }
    for a in &plan.actions {
        if let Action::TagEni { eni, tags } = a {
            let res = pacer
                .call("CreateTags", || ec2.create_tags(eni, tags))
                .await;
            match res {
                Ok(()) => report.tagged.push(eni.clone()),
                Err(e) => {
                    tracing::warn!(eni, error = %e, "ENI not tagged");
                    report.tag_errors.push(e);
                }
            }
        }
    }
    for k in &report.lost_pods {
        tracing::warn!(container = %k.short_container(), "pod lost its address: no longer on the ENI");
    }
    Ok(report)
}

fn apply_one(ds: &mut DataStore, a: &Action, now: Duration, r: &mut ApplyReport) {
    match a {
        Action::AdoptEni { eni, ips, prefixes } => {
            ds.add_eni(
                EniSpec {
                    id: eni.id.clone(),
                    mac: eni.mac.clone(),
                    is_primary: eni.device_number == 0 && eni.network_card == 0,
                    is_trunk: eni.is_trunk,
                    is_efa: eni.is_efa,
                    device_number: eni.device_number,
                    primary_ip: eni.primary_ip,
                    subnet_id: eni.subnet_id.clone(),
                    subnet_cidr: eni.subnet_cidr,
                    excluded: false,
                },
                now,
            );
            r.added_cidrs += add(ds, &eni.id, ips, prefixes);
            tracing::info!(eni = %eni.id, "ENI adopted by reconcile");
            r.adopted.push(eni.clone());
        }
        Action::AddAddresses { eni, ips, prefixes } => {
            r.added_cidrs += add(ds, eni, ips, prefixes);
        }
        Action::EvictAddresses { eni, cidrs, .. } => {
            for c in cidrs {
                if let Ok(lost) = ds.remove_cidr(eni, *c, true) {
                    r.evicted_cidrs += 1;
                    r.lost_pods.extend(lost);
                }
            }
        }
        Action::EvictEni {
            eni, primary_ip, ..
        } => {
            let n = ds.eni(eni).map_or(0, |e| e.cidrs.len());
            if let Ok(lost) = ds.remove_eni(eni, true) {
                tracing::warn!(eni, "ENI no longer attached: removed");
                r.evicted_cidrs += n;
                r.lost_pods.extend(lost);
                r.evicted_enis.push((eni.clone(), *primary_ip));
            }
        }
        Action::TagEni { .. } => {}
    }
}

fn add(ds: &mut DataStore, eni: &str, ips: &[Ipv4Addr], prefixes: &[Ipv4Net]) -> usize {
    let mut n = 0;
    for ip in ips {
        if ds.add_cidr(eni, Ipv4Net::host(*ip), false).is_ok() {
            n += 1;
        }
    }
    for p in prefixes {
        if ds.add_cidr(eni, *p, true).is_ok() {
            n += 1;
        }
    }
    n
}

/// One reconcile run: compares the datastore with IMDS, asks EC2 about the ENIs that differ
/// (one `DescribeNetworkInterfaces`, none when IMDS agrees), plans and applies. An EC2 failure
/// changes nothing (the next run tries again). The ENIs in `freeing` (the pool manager's
/// [`freeing_enis`](crate::run::pool::PoolManager::freeing_enis)) are left out of IMDS's
/// list: never adopted while their detach is under way.
pub async fn reconcile_once(
    state: &PoolState,
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    imds: &[ImdsEni],
    released: &BTreeMap<Ipv4Net, Duration>,
    freeing: &BTreeSet<String>,
    s: &ReconcileSettings,
) -> Result<ApplyReport, ReconcileError> {
    let kept: Vec<ImdsEni>;
    let imds = if imds.iter().any(|e| freeing.contains(&e.id)) {
        kept = imds
            .iter()
            .filter(|e| !freeing.contains(&e.id))
            .cloned()
            .collect();
        &kept[..]
    } else {
        imds
    };
    let known = known_enis(&state.lock());
    let ask = needs_ec2(&known, imds);
    if ask.is_empty() {
        return Ok(ApplyReport::default());
    }
    let described = describe_dropping_missing(ec2, pacer, ask).await;
    let described = match described {
        Ok(d) => d,
        Err(source) => {
            tracing::warn!(error = %source, "reconcile: EC2 unavailable, nothing changed");
            return Err(ReconcileError::Ec2 {
                op: "describe ENIs",
                source,
            });
        }
    };
    // The datastore may have changed during the EC2 call: plan on a fresh view.
    let known = known_enis(&state.lock());
    let p = plan(
        &ReconcileInput {
            known: &known,
            imds,
            ec2: Some(&described),
            released,
            now: state.now(),
        },
        s,
    );
    apply(p, state, ec2, pacer).await
}

/// `DescribeNetworkInterfaces` of `ids`; an id EC2 reports as not found is dropped from the
/// batch and the call repeated (reference `DescribeAllENIs`), so a missing ENI is simply
/// absent from the answer.
pub async fn describe_dropping_missing(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    mut ids: Vec<String>,
) -> Result<Vec<EniInfo>, Ec2Error> {
    loop {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let batch = ids.clone();
        match pacer
            .call("DescribeNetworkInterfaces", || ec2.describe_enis(&batch))
            .await
        {
            Ok(v) => return Ok(v),
            Err(e) if e.is_not_found() => {
                let bad = ids.iter().position(|id| e.message.contains(id.as_str()));
                match bad {
                    Some(i) => {
                        ids.remove(i);
                    }
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Deletes this instance's own leftover ENIs ([`select_own_leftovers`]); returns those deleted.
pub async fn cleanup_own_leftovers(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
    instance_id: &str,
) -> Result<LeakedReport, Ec2Error> {
    let cluster = cluster.filter(|c| !c.is_empty());
    let cands = leaked_candidates(ec2, pacer, vpc_id, cluster).await?;
    let mut report = LeakedReport::default();
    for eni in select_own_leftovers(&cands, instance_id) {
        delete_into(
            ec2,
            pacer,
            eni,
            "own ENI left unattached by an earlier run deleted",
            &mut report,
        )
        .await;
    }
    Ok(report)
}

/// The VPC's available ENIs tagged with an instance id (and the cluster, when set).
async fn leaked_candidates(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
) -> Result<Vec<EniInfo>, Ec2Error> {
    pacer
        .call("DescribeNetworkInterfaces", || {
            ec2.describe_leaked_candidates(vpc_id, cluster)
        })
        .await
}

/// Deletes `eni` ("already gone" counts as deleted) and records the outcome in `report`.
async fn delete_into(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    eni: String,
    deleted: &'static str,
    report: &mut LeakedReport,
) {
    let r = pacer
        .call("DeleteNetworkInterface", || async {
            match ec2.delete_eni(&eni).await {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            }
        })
        .await;
    match r {
        Ok(()) => {
            tracing::info!(eni, "{deleted}");
            report.deleted.push(eni);
        }
        Err(e) => report.errors.push(e),
    }
}

/// What [`cleanup_leaked`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeakedReport {
    /// ENIs deleted.
    pub deleted: Vec<String>,
    /// ENIs tagged with `createdAt`.
    pub tagged: Vec<String>,
    /// Failures (kept going).
    pub errors: Vec<Ec2Error>,
}

/// One leaked-ENI cleanup run (the daemon calls it hourly after a random 0–300 s delay, unless
/// `DISABLE_LEAKED_ENI_CLEANUP`).
pub async fn cleanup_leaked(
    ec2: &dyn Ec2Api,
    pacer: &Pacer,
    vpc_id: &str,
    cluster: Option<&str>,
    now: Duration,
) -> Result<LeakedReport, Ec2Error> {
    let cluster = cluster.filter(|c| !c.is_empty());
    let cands = leaked_candidates(ec2, pacer, vpc_id, cluster).await?;
    let mut report = LeakedReport::default();
    for a in select_leaked(&cands, cluster, now, LEAKED_ENI_MIN_AGE) {
        match a {
            LeakedAction::Tag { eni, created_at } => {
                let tags = BTreeMap::from([(TAG_CREATED_AT.to_owned(), created_at)]);
                match pacer
                    .call("CreateTags", || ec2.create_tags(&eni, &tags))
                    .await
                {
                    Ok(()) => report.tagged.push(eni),
                    Err(e) => report.errors.push(e),
                }
            }
            LeakedAction::Delete { eni } => {
                delete_into(ec2, pacer, eni, "leaked ENI deleted", &mut report).await
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
