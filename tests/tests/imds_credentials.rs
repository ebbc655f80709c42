//! ipamd on its instance role (issue 14): no static credentials in its environment, so the
//! SDK's default chain takes them from instance metadata. The simulator serves the role's
//! credentials (IMDSv2 token, `iam/security-credentials/` listing the role, the role's
//! document) with a short lifetime and checks that every EC2 request is signed (SigV4
//! `Credential=`) with an access key id it issued, unexpired, with its
//! `X-Amz-Security-Token`; anything else is `AuthFailure`.
//!
//! - Rotation: the daemon keeps working across several rotations; EC2 requests after the
//!   first set expired are signed with a later one; none was refused.
//! - No secret access key or session token in ipamd's log or introspection answers.
//! - A malformed credentials document: start-up fails with an error naming the credentials,
//!   bounded in time, no panic, no secret in the log.
//! - The check itself: the harness's static credentials are refused (`AuthFailure`).
//!
//! Root only; skipped otherwise.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use vpc_cni_e2e::demo::{add_request, del_request};
use vpc_cni_e2e::node::{wait_until, workspace_bin, Ipamd, START_WAIT};
use vpc_cni_e2e::serve::{serve, SimServer};
use vpc_cni_e2e::SimCluster;
use vpc_cni_net::testing::skip_netns_test;
use vpc_sim::imds::CredentialSettings;
use vpc_sim::sim::SimConfig;

/// Lifetime of each credential set the simulator issues.
const LIFETIME: Duration = Duration::from_secs(30);
/// The simulator issues a new set when the current one has less than this left (the SDK
/// refreshes 10-15 s before the expiration).
const ROTATE_BEFORE: Duration = Duration::from_secs(15);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Node {
    c: SimCluster,
    server: SimServer,
    instance_id: String,
    ns: vpc_cni_net::Netns,
}

fn node(settings: CredentialSettings) -> anyhow::Result<Node> {
    let c = SimCluster::new(SimConfig {
        seed: 14,
        ..SimConfig::default()
    })?;
    let vpc = c.create_vpc("10.9.0.0/16")?;
    let s = c.create_subnet(&vpc, "10.9.0.0/20")?;
    let inst = c.run_instance(&s, "m5.large")?;
    let ns = inst.netns()?;
    let server = serve(&c.fabric, c.sim.clone())?;
    c.sim.with(|s| s.set_credentials(settings));
    Ok(Node {
        instance_id: inst.instance_id.clone(),
        c,
        server,
        ns,
    })
}

fn ipamd(n: &Node, dir: &Path) -> anyhow::Result<Ipamd> {
    let mut d = Ipamd::new(
        workspace_bin("ipamd")?,
        &n.ns,
        &n.server,
        &n.instance_id,
        dir,
    )?;
    d.unset_env("AWS_ACCESS_KEY_ID")
        .unset_env("AWS_SECRET_ACCESS_KEY")
        .env("WARM_IP_TARGET", "2")
        .env("VPC_CNI_RECONCILE_INTERVAL", "1s")
        .env("VPC_CNI_LEAKED_ENI_DELAY", "0s")
        .env("VPC_CNI_LEAKED_ENI_INTERVAL", "2s")
        .env("VPC_CNI_EC2_MAX_ATTEMPTS", "3")
        .env("VPC_CNI_EC2_RETRY_BASE", "50ms");
    Ok(d)
}

fn checked(malformed: bool) -> CredentialSettings {
    CredentialSettings {
        lifetime_ms: LIFETIME.as_millis() as u64,
        rotate_before_ms: ROTATE_BEFORE.as_millis() as u64,
        check_signatures: true,
        malformed,
        ..CredentialSettings::default()
    }
}

/// The secrets the simulator issued that appear in `text`.
fn secrets_in(n: &Node, text: &str) -> Vec<String> {
    n.c.sim.with(|s| {
        s.credentials()
            .issued()
            .iter()
            .flat_map(|c| [c.secret_access_key.clone(), c.token.clone()])
            .filter(|secret| text.contains(secret.as_str()))
            .map(|secret| format!("{}...", &secret[..8]))
            .collect()
    })
}

/// An ADD then its DEL over ipamd's socket (the pod churn that keeps the daemon busy).
fn pod_round_trip(d: &Ipamd, pod: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = d.socket();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let r = loop {
            let mut client =
                vpc_cni_rpc::connect_unix_direct(&socket, Duration::from_secs(10)).await?;
            let r = client.add_network(add_request(pod)).await?.into_inner();
            if r.success || tokio::time::Instant::now() >= deadline {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        ensure!(r.success, "AddNetwork {pod}: {r:?}");
        let mut client = vpc_cni_rpc::connect_unix_direct(&socket, Duration::from_secs(10)).await?;
        let r = client.del_network(del_request(pod)).await?.into_inner();
        ensure!(r.success, "DelNetwork {pod}: {r:?}");
        Ok(())
    })
}

#[test]
fn ipamd_works_on_rotating_instance_role_credentials_and_never_shows_them() -> anyhow::Result<()> {
    if skip_netns_test("ipamd on IMDS instance-role credentials") {
        return Ok(());
    }
    let tmp = tempfile::Builder::new().prefix("vcn-creds-").tempdir()?;
    let n = node(checked(false))?;
    let mut d = ipamd(&n, tmp.path())?;
    d.start()?;
    pod_round_trip(&d, "p0").context("first pod")?;
    let first =
        n.c.sim
            .with(|s| s.credentials().issued().first().cloned())
            .context("no credentials were fetched from IMDS")?;
    // Until EC2 accepted requests signed with a set issued once the first had expired (the
    // leaked-ENI cleanup describes every 2 s; pods come and go meanwhile).
    let mut pods = 1;
    wait_until(
        "EC2 requests signed with a set issued after the first one expired",
        LIFETIME * 3,
        || {
            pod_round_trip(&d, &format!("p{pods}"))?;
            pods += 1;
            std::thread::sleep(Duration::from_millis(500));
            Ok(n.c.sim.with(|s| {
                let c = s.credentials();
                c.issued()
                    .iter()
                    .filter(|i| i.issued_ms >= first.expires_ms)
                    .any(|i| c.signed_by().get(&i.access_key_id).is_some_and(|n| *n > 0))
            }))
        },
    )
    .with_context(|| format!("--- ipamd log (tail) ---\n{}", d.log_tail(60)))?;
    ensure!(
        unix_ms() > first.expires_ms,
        "the first set has not expired yet"
    );
    pod_round_trip(&d, "last").context("a pod after the rotations")?;
    let (issued, signed, refused) = n.c.sim.with(|s| {
        let c = s.credentials();
        (c.issued().len(), c.signed_by().clone(), c.refused())
    });
    eprintln!(
        "credentials: {issued} sets issued, EC2 requests per key {signed:?}, {refused} refused; {} pods",
        pods + 1
    );
    ensure!(
        refused == 0,
        "{refused} EC2 requests refused: {}",
        d.log_tail(40)
    );
    ensure!(signed.len() >= 2, "one key signed everything: {signed:?}");
    // No secret in the log or in any introspection answer.
    let mut seen = secrets_in(&n, &d.log());
    for path in [
        "/v1/enis",
        "/v1/eni-configs",
        "/v1/networkutils-env-settings",
        "/v1/ipamd-env-settings",
    ] {
        if let Ok(v) = d.introspect(path) {
            seen.extend(secrets_in(&n, &v.to_string()));
        }
    }
    ensure!(
        seen.is_empty(),
        "secrets in ipamd's log or introspection: {seen:?}"
    );
    d.kill()?;
    Ok(())
}

#[test]
fn a_malformed_credentials_document_fails_start_up_with_a_clear_error() -> anyhow::Result<()> {
    if skip_netns_test("malformed IMDS credentials") {
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("vcn-creds-bad-")
        .tempdir()?;
    let n = node(checked(true))?;
    let mut d = ipamd(&n, tmp.path())?;
    d.spawn()?;
    let status = d
        .wait_exit(START_WAIT)
        .context("ipamd hung on malformed credentials")?;
    let log = d.log();
    ensure!(!status.success(), "start-up succeeded: {log}");
    ensure!(!log.contains("panicked"), "ipamd panicked: {log}");
    ensure!(
        log.to_lowercase().contains("credentials"),
        "the error does not name the credentials: {}",
        d.log_tail(30)
    );
    let seen = secrets_in(&n, &log);
    ensure!(seen.is_empty(), "secrets in ipamd's log: {seen:?}");
    ensure!(
        n.c.sim.with(|s| s.credentials().signed_by().is_empty()),
        "an EC2 request was signed with credentials from a malformed document"
    );
    Ok(())
}

#[test]
fn with_the_check_on_credentials_not_issued_by_imds_are_refused() -> anyhow::Result<()> {
    if skip_netns_test("EC2 signature check") {
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("vcn-creds-static-")
        .tempdir()?;
    let n = node(checked(false))?;
    let mut d = ipamd(&n, tmp.path())?;
    // The harness's static pair, which IMDS never issued.
    d.env("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret");
    d.spawn()?;
    let status = d
        .wait_exit(START_WAIT)
        .context("ipamd hung on AuthFailure")?;
    ensure!(
        !status.success(),
        "start-up succeeded with foreign credentials"
    );
    let log = d.log();
    ensure!(
        log.contains("AuthFailure"),
        "no AuthFailure: {}",
        d.log_tail(30)
    );
    ensure!(n.c.sim.with(|s| s.credentials().refused()) > 0);
    Ok(())
}
