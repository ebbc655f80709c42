//! Node termination (issue "End to end", scenario 4): an instance whose secondary ENIs were
//! not `DeleteOnTermination` is terminated; its ENIs are left `available` in EC2 (leaked), and
//! the leaked-ENI cleanup of another node's real `ipamd` deletes them once they are old
//! enough.
//!
//! How the scenario is set up, honestly:
//! - The victim node's ipamd attaches its secondary ENIs and marks them `DeleteOnTermination`
//!   as the reference does. To make them leak, the test first kills that ipamd (the node is
//!   going down; nothing can race the next step) and then clears `DeleteOnTermination` on them
//!   through the simulator, as if ipamd had crashed between `AttachNetworkInterface` and
//!   `ModifyNetworkInterfaceAttribute`.
//! - The cleanup deletes only ENIs whose `node.k8s.amazonaws.com/createdAt` tag is at least
//!   5 minutes old (`ipamd::run::reconcile::LEAKED_ENI_MIN_AGE`, against the wall clock). Instead of
//!   waiting, the test rewrites the tag through the simulator: one ENI gets a `createdAt` 10
//!   minutes in the past (deleted on the next run), the other an unparsable value (the cleanup
//!   must first tag it with the current time and keep it). Once the test has seen that tag
//!   and checked the ENI survived the run that wrote it, it plays the 5 minutes passing by
//!   backdating that tag too; a later run deletes it.
//! - The surviving node's ipamd runs the cleanup at once and every second
//!   (`VPC_CNI_LEAKED_ENI_DELAY=0s`, `VPC_CNI_LEAKED_ENI_INTERVAL=1s`).
//!
//! Both daemons run with `CLUSTER_NAME=e2e` (their ENIs carry the cluster tag and the cleanup
//! filters on it). Two decoys, as old and as `available` as the leaked ENIs, must survive:
//! another cluster's leaked ENI and a user's ENI that ipamd never created (no `aws-K8S-`
//! description, no instance tag). The survivor's own ENIs and pool are untouched throughout. Everything lives in namespaces
//! the test creates (deleted on drop, also on failure); ipamd processes are killed on drop.
//! Root only; skipped otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use ipamd::io::ec2::{DESCRIPTION_PREFIX, TAG_CLUSTER_NAME, TAG_CREATED_AT, TAG_INSTANCE_ID};
use ipamd::plan::reconcile::LEAKED_ENI_MIN_AGE;
use ipamd::types::{parse_rfc3339, rfc3339};

use vpc_cni_e2e::node::{leaks, wait_until, workspace_bin, Ipamd, SimNodeView, START_WAIT};
use vpc_cni_e2e::serve::serve;
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::skip_netns_test;
use vpc_sim::api::{CreateEni, EniAttribute, Reply, Request};
use vpc_sim::model::EniStatus;
use vpc_sim::sim::SimConfig;

/// The cluster both daemons belong to.
const CLUSTER: &str = "e2e";

/// Bounded wait for one cleanup run (every second) to act; generous for a busy machine.
const CLEANUP_WAIT: Duration = Duration::from_secs(60);

/// Wall-clock time since the Unix epoch (what ipamd's cleanup compares `createdAt` with).
fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// An ENI as the simulator holds it: status, attachment (instance, DeleteOnTermination), tags.
#[derive(Debug, Clone)]
struct EniState {
    status: EniStatus,
    attached_to: Option<(String, String, bool)>,
    description: String,
    tags: BTreeMap<String, String>,
}

/// The simulator's ENI `id`, if it still exists.
fn eni_state(c: &SimCluster, id: &str) -> Option<EniState> {
    c.sim.with(|s| {
        s.model().enis.get(id).map(|e| EniState {
            status: e.status,
            attached_to: e
                .attachment
                .as_ref()
                .map(|a| (a.instance_id.clone(), a.id.clone(), a.delete_on_termination)),
            description: e.description.clone(),
            tags: e.tags.clone(),
        })
    })
}

/// An `available` ENI created in-process with `description` and `tags`; its id.
fn create_available_eni(
    c: &SimCluster,
    subnet_id: &str,
    description: String,
    tags: BTreeMap<String, String>,
) -> anyhow::Result<String> {
    let r = c.call(Request::CreateNetworkInterface(CreateEni {
        subnet_id: subnet_id.to_owned(),
        description,
        secondary_count: Some(2),
        tags,
        ..CreateEni::default()
    }))?;
    let Reply::NetworkInterface { eni, .. } = r else {
        anyhow::bail!("CreateNetworkInterface: {r:?}");
    };
    Ok(eni.id)
}

/// Sets `createdAt` on `eni` through the simulator (`CreateTags` overwrites).
fn set_created_at(c: &SimCluster, eni: &str, value: &str) -> anyhow::Result<()> {
    c.call(Request::CreateTags {
        ids: vec![eni.to_owned()],
        tags: BTreeMap::from([(TAG_CREATED_AT.to_owned(), value.to_owned())]),
    })?;
    Ok(())
}

#[test]
fn a_terminated_nodes_leaked_enis_are_cleaned_up_by_another_node() -> anyhow::Result<()> {
    if skip_netns_test("node termination and leaked-ENI cleanup") {
        return Ok(());
    }
    let ipamd_bin = workspace_bin("ipamd")?;
    let tmp = tempfile::Builder::new()
        .prefix("vcn-node-term-")
        .tempdir()?;
    let c = SimCluster::new(SimConfig::default())?;
    let vpc = c.create_vpc("10.23.0.0/16")?;
    let subnet = c.create_subnet(&vpc, "10.23.0.0/20")?;
    let victim = c.run_instance(&subnet, "m5.large")?;
    let survivor = c.run_instance(&subnet, "m5.large")?;
    let server = serve(&c.fabric, c.sim.clone())?;

    // 1. The victim's ipamd grows to two warm secondary ENIs (an m5.large holds 3 ENIs of 9
    //    secondary addresses; WARM_ENI_TARGET counts the primary's free addresses as one).
    let victim_dir = tmp.path().join("victim");
    std::fs::create_dir_all(&victim_dir)?;
    let mut victim_ipamd = Ipamd::new(
        ipamd_bin.clone(),
        &victim.netns()?,
        &server,
        &victim.instance_id,
        &victim_dir,
    )?;
    victim_ipamd
        .env("CLUSTER_NAME", CLUSTER)
        .env("WARM_ENI_TARGET", "3")
        .env("DISABLE_LEAKED_ENI_CLEANUP", "true");
    victim_ipamd.start()?;
    let secondary = |c: &SimCluster| -> Vec<String> {
        SimNodeView::of(&c.sim, &victim.instance_id)
            .attached
            .into_keys()
            .filter(|id| *id != victim.primary_eni)
            .collect()
    };
    let grown = wait_until(
        "the victim to attach two secondary ENIs, DeleteOnTermination set",
        START_WAIT,
        || {
            let ids = secondary(&c);
            Ok(ids.len() == 2
                && ids.iter().all(|id| {
                    eni_state(&c, id)
                        .and_then(|e| e.attached_to)
                        .is_some_and(|a| a.2)
                }))
        },
    );
    grown.with_context(|| format!("--- victim ipamd ---\n{}", victim_ipamd.log_tail(60)))?;
    let leaked = secondary(&c);
    for id in &leaked {
        let e = eni_state(&c, id).context("ENI vanished")?;
        ensure!(
            e.description == format!("{DESCRIPTION_PREFIX}{}", victim.instance_id)
                && e.tags.get(TAG_INSTANCE_ID) == Some(&victim.instance_id)
                && e.tags.get(TAG_CLUSTER_NAME).map(String::as_str) == Some(CLUSTER),
            "{id} carries ipamd's description, instance and cluster tags: {e:?}"
        );
    }

    // Decoys, as old and available as the leaked ENIs will be: another cluster's leaked ENI
    // and a user's ENI.
    let long_ago = rfc3339(wall_now().saturating_sub(2 * LEAKED_ENI_MIN_AGE));
    let other_cluster = create_available_eni(
        &c,
        &subnet,
        format!("{DESCRIPTION_PREFIX}i-0123456789abcdef0"),
        BTreeMap::from([
            (TAG_INSTANCE_ID.to_owned(), "i-0123456789abcdef0".to_owned()),
            (TAG_CLUSTER_NAME.to_owned(), "another-cluster".to_owned()),
            (TAG_CREATED_AT.to_owned(), long_ago.clone()),
        ]),
    )?;
    let users = create_available_eni(
        &c,
        &subnet,
        "a user's ENI".to_owned(),
        BTreeMap::from([(TAG_CREATED_AT.to_owned(), long_ago)]),
    )?;

    // 2. The survivor's ipamd, cleanup at once and every second.
    let survivor_dir = tmp.path().join("survivor");
    std::fs::create_dir_all(&survivor_dir)?;
    let mut survivor_ipamd = Ipamd::new(
        ipamd_bin,
        &survivor.netns()?,
        &server,
        &survivor.instance_id,
        &survivor_dir,
    )?;
    survivor_ipamd
        .env("CLUSTER_NAME", CLUSTER)
        .env("VPC_CNI_LEAKED_ENI_DELAY", "0s")
        .env("VPC_CNI_LEAKED_ENI_INTERVAL", "1s");
    survivor_ipamd.start()?;
    let survivor_enis_before: BTreeSet<String> = SimNodeView::of(&c.sim, &survivor.instance_id)
        .attached
        .into_keys()
        .collect();

    // 3. The victim goes down: ipamd dies, its secondary ENIs lose DeleteOnTermination (see
    //    the module comment), their createdAt tags are rewritten, the instance terminates.
    victim_ipamd.kill()?;
    for id in &leaked {
        let (_, attachment_id, _) = eni_state(&c, id)
            .and_then(|e| e.attached_to)
            .with_context(|| format!("{id} is attached"))?;
        c.call(Request::ModifyNetworkInterfaceAttribute {
            eni_id: id.clone(),
            change: EniAttribute::DeleteOnTermination {
                attachment_id,
                value: false,
            },
        })?;
    }
    let (old, untagged) = (&leaked[0], &leaked[1]);
    let ten_minutes_ago = rfc3339(wall_now().saturating_sub(2 * LEAKED_ENI_MIN_AGE));
    set_created_at(&c, old, &ten_minutes_ago)?;
    set_created_at(&c, untagged, "not-a-date")?;
    // createdAt has whole seconds: a tag written from now on is at least this.
    let tag_floor = wall_now().saturating_sub(Duration::from_secs(1));
    c.terminate(&victim.instance_id)?;
    c.check_hooks()?;
    let view = SimNodeView::of(&c.sim, &victim.instance_id);
    ensure!(
        view.attached.is_empty()
            && view.unattached.keys().cloned().collect::<BTreeSet<_>>()
                == leaked.iter().cloned().collect(),
        "after termination the victim's secondary ENIs are left available and nothing stays \
         attached: {view:?}"
    );
    ensure!(
        eni_state(&c, &victim.primary_eni).is_none(),
        "the primary ENI (DeleteOnTermination) went with the instance"
    );

    // 4. A cleanup run deletes the old ENI and tags the unparsable one with the current time,
    //    keeping it.
    let first = wait_until(
        "the survivor's cleanup to delete the backdated ENI and re-tag the unparsable one",
        CLEANUP_WAIT,
        || {
            let tagged = eni_state(&c, untagged)
                .and_then(|e| e.tags.get(TAG_CREATED_AT).cloned())
                .is_some_and(|t| parse_rfc3339(&t).is_some());
            Ok(eni_state(&c, old).is_none() && tagged)
        },
    );
    first.with_context(|| {
        format!(
            "old: {:?}\nuntagged: {:?}\n--- survivor ipamd ---\n{}",
            eni_state(&c, old),
            eni_state(&c, untagged),
            survivor_ipamd.log_tail(60)
        )
    })?;
    let e = eni_state(&c, untagged)
        .context("the ENI with an unparsable createdAt was deleted in the run that tagged it")?;
    ensure!(
        e.status == EniStatus::Available && e.attached_to.is_none(),
        "{untagged} is still available: {e:?}"
    );
    let stamped = e
        .tags
        .get(TAG_CREATED_AT)
        .and_then(|t| parse_rfc3339(t))
        .context("createdAt parsable")?;
    ensure!(
        stamped >= tag_floor && stamped <= wall_now(),
        "the cleanup tags with the current time: {:?}, wall clock {:?}",
        e.tags.get(TAG_CREATED_AT),
        wall_now()
    );

    // 5. Five minutes "pass" for that ENI (its tag is backdated); a later run deletes it.
    let ten_minutes_ago = rfc3339(wall_now().saturating_sub(2 * LEAKED_ENI_MIN_AGE));
    set_created_at(&c, untagged, &ten_minutes_ago)?;
    let second = wait_until(
        "the survivor's cleanup to delete the re-tagged ENI once old enough",
        CLEANUP_WAIT,
        || Ok(eni_state(&c, untagged).is_none()),
    );
    second.with_context(|| {
        format!(
            "untagged: {:?}\n--- survivor ipamd ---\n{}",
            eni_state(&c, untagged),
            survivor_ipamd.log_tail(60)
        )
    })?;
    // The log line follows the DeleteNetworkInterface answer: wait for it (bounded).
    for id in &leaked {
        wait_until(
            &format!("the survivor's log to record deleting {id}"),
            CLEANUP_WAIT,
            || {
                Ok(survivor_ipamd
                    .log()
                    .lines()
                    .any(|l| l.contains("leaked ENI deleted") && l.contains(id.as_str())))
            },
        )
        .with_context(|| survivor_ipamd.log_tail(40))?;
    }

    // 6. Nothing of the victim is left in EC2; the decoys are; the survivor's ENIs and pool
    //    are untouched.
    let view = SimNodeView::of(&c.sim, &victim.instance_id);
    ensure!(
        view.attached.is_empty() && view.unattached.is_empty(),
        "nothing of the victim left in EC2: {view:?}"
    );
    for (id, what) in [(&other_cluster, "another cluster's"), (&users, "a user's")] {
        let e = eni_state(&c, id);
        ensure!(
            e.as_ref().is_some_and(|e| e.status == EniStatus::Available),
            "{what} ENI {id} is left alone by the cleanup: {e:?}"
        );
    }
    let sv = SimNodeView::of(&c.sim, &survivor.instance_id);
    let after: BTreeSet<String> = sv.attached.keys().cloned().collect();
    ensure!(
        after.is_superset(&survivor_enis_before),
        "the survivor keeps its ENIs: before {survivor_enis_before:?}, after {after:?}"
    );
    let mut diff = Vec::new();
    let agrees = wait_until("the survivor's ipamd to agree with EC2", START_WAIT, || {
        for (id, what) in [(&other_cluster, "another cluster's"), (&users, "a user's")] {
            let e = eni_state(&c, id);
            ensure!(
                e.as_ref().is_some_and(|e| e.status == EniStatus::Available),
                "{what} ENI {id} is left alone by the cleanup: {e:?}"
            );
        }
        let sv = SimNodeView::of(&c.sim, &survivor.instance_id);
        diff = leaks(&sv, &survivor_ipamd.view()?);
        Ok(diff.is_empty())
    });
    agrees.with_context(|| format!("differences: {diff:?}"))?;
    c.check_hooks()?;
    drop(survivor_ipamd);
    drop(victim_ipamd);
    drop(server);
    Ok(())
}
