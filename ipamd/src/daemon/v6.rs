//! IPv6 mode (`ENABLE_IPv6=true` with `ENABLE_PREFIX_DELEGATION=true`, spec/ipamd.md 3.1 and
//! spec/cni.md 2.5): every pod gets an address of one /80 prefix on the primary ENI.
//!
//! As the reference: no warm pool, no pool manager and no reconcile loop (a /80 holds 2^48
//! addresses, more than any node's pods), no leaked-ENI cleanup, no SNAT. Start-up: identity
//! and the node's IPv6 address from instance metadata; the primary ENI's /80s from EC2 (the
//! judge when metadata lags) and metadata; one /80 assigned through `AssignIpv6Addresses`
//! (`Ipv6PrefixCount=1`) when it has none; the checkpoint restored (its entries carry the
//! reference's `ipv6` field); with host networking, the primary ENI's MTU and the filter
//! `FORWARD` reject of new connections to the IPv4 egress plugin's addresses; then the same
//! servers as IPv4 mode.

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::io::ec2::pacer::Pacer;
use crate::io::imds::ImdsError;
use crate::serve::grpc::{Backend, ReplySettings};
use crate::serve::metrics::Metrics;
use crate::store::commit::{Clock, PoolState, TokioClock};
use crate::store::datastore::{DataStore, EniSpec, V6};
use crate::types::Ipv6Net;

use super::{
    restore_checkpoint, serve, serve_err, timed_start, DaemonError, Deps, MeteredEc2, NodeParts,
    Reporter, Serving,
};

/// A started IPv6-mode daemon.
pub struct DaemonV6 {
    state: Arc<PoolState<V6>>,
    metrics: Arc<Metrics>,
    serving: Serving,
    prefix: Ipv6Net,
}

impl std::fmt::Debug for DaemonV6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonV6")
            .field("prefix", &self.prefix)
            .field("metrics_addr", &self.serving.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl DaemonV6 {
    /// The shared state (the IPv6 datastore).
    pub fn state(&self) -> &Arc<PoolState<V6>> {
        &self.state
    }

    /// The /80 pods get their addresses from.
    pub fn prefix(&self) -> Ipv6Net {
        self.prefix
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` is served (when enabled).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.serving.metrics_addr
    }

    /// Where the introspection endpoints are served (TCP, when enabled).
    pub fn introspection_addr(&self) -> Option<std::net::SocketAddr> {
        self.serving.introspection_addr
    }

    /// SIGTERM: nothing is allocated in IPv6 mode after start; gRPC keeps serving.
    pub fn terminate(&self) {
        tracing::info!("terminating: still serving");
        self.state.set_terminating();
    }

    /// Stops every server and waits for them.
    pub async fn stop(self) {
        let _ = self.serving.shutdown.send(true);
        for t in self.serving.tasks {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}

/// Starts the daemon in IPv6 mode.
pub async fn start_v6(cfg: &Config, deps: Deps, parts: NodeParts) -> Result<DaemonV6, DaemonError> {
    let process_start = parts.process_start.unwrap_or_else(Instant::now);
    let metrics = Arc::new(Metrics::new().map_err(|e| serve_err("metrics")(e.to_string()))?);
    timed_start(
        &metrics.clone(),
        process_start,
        start_inner(cfg, deps, parts, metrics),
    )
    .await
}

async fn start_inner(
    cfg: &Config,
    deps: Deps,
    parts: NodeParts,
    metrics: Arc<Metrics>,
) -> Result<(DaemonV6, bool), DaemonError> {
    let _init = metrics.in_progress("nodeInit");
    let ec2: Arc<dyn crate::io::ec2::Ec2Api> = Arc::new(MeteredEc2 {
        inner: deps.ec2.clone(),
        metrics: metrics.clone(),
    });
    let pacer = Pacer::new(cfg.ec2);

    // 1. Identity; the node's IPv6 address (the primary ENI's first).
    let id = deps.imds.identity().await?;
    tracing::info!(instance = %id.instance_id, instance_type = %id.instance_type, region = %id.region, "instance (IPv6 mode)");
    let node_ipv6 = deps.imds.node_ipv6().await?;
    let primary = deps.imds.eni(&id.primary_mac, true).await?;
    let v6 = deps.imds.eni_v6(&id.primary_mac).await?;

    // 2. The primary ENI's /80s: EC2 is the judge, metadata may lag behind it.
    let eni_id = primary.interface_id.clone();
    let described = pacer
        .call("DescribeNetworkInterfaces", || {
            let (ec2, ids) = (ec2.clone(), vec![eni_id.clone()]);
            async move { ec2.describe_enis(&ids).await }
        })
        .await
        .map_err(|source| DaemonError::Ec2 {
            step: "describe the primary ENI",
            source,
        })?;
    let info = described
        .iter()
        .find(|e| e.id == eni_id)
        .ok_or_else(|| ImdsError::Missing {
            path: format!(
                "EC2 DescribeNetworkInterfaces {eni_id} (listed in meta-data/network/interfaces/macs/{}/)",
                id.primary_mac
            ),
        })?;
    let mut prefixes: Vec<Ipv6Net> = info.ipv6_prefixes.clone();
    for p in &v6.ipv6_prefixes {
        if !prefixes.contains(p) {
            prefixes.push(*p);
        }
    }
    if prefixes.is_empty() {
        if cfg.disable_provisioning {
            return Err(DaemonError::Unsupported(format!(
                "the primary ENI {eni_id} has no IPv6 /80 prefix and DISABLE_NETWORK_RESOURCE_PROVISIONING=true forbids assigning one"
            )));
        }
        let got = pacer
            .call("AssignIpv6Addresses", || {
                let (ec2, eni) = (ec2.clone(), eni_id.clone());
                async move { ec2.assign_ipv6_prefixes(&eni, 1).await }
            })
            .await
            .map_err(|source| DaemonError::Ec2 {
                step: "assign an IPv6 /80 to the primary ENI",
                source,
            })?;
        tracing::info!(eni = %eni_id, prefixes = ?got, "IPv6 prefix assigned");
        prefixes.extend(got);
    }
    let clock = Arc::new(TokioClock::new());
    let now = Clock::now(clock.as_ref());
    let mut ds = DataStore::new_v6(cfg.ip_cooldown);
    ds.add_eni(
        EniSpec {
            id: eni_id.clone(),
            mac: primary.mac.clone(),
            is_primary: true,
            is_trunk: false,
            is_efa: info.interface_type == "efa",
            device_number: 0,
            primary_ip: info
                .primary_ip
                .or(primary.primary_ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            subnet_id: primary.subnet_id.clone(),
            subnet_cidr: primary.subnet_cidr,
            excluded: false,
        },
        now,
    );
    for p in &prefixes {
        ds.add_cidr(&eni_id, *p, true)
            .map_err(DaemonError::Restore)?;
    }
    let prefix = prefixes
        .first()
        .map(|p| p.trunc())
        .ok_or_else(|| DaemonError::Ec2 {
            step: "assign an IPv6 /80 to the primary ENI",
            source: crate::io::ec2::Ec2Error::coded(
                "AssignIpv6Addresses",
                "BadAnswer",
                "EC2 answered with no prefix",
            ),
        })?;

    // 3. Checkpoint restore with normalisation.
    let veths_now = deps.veths.snapshot().await.map_err(DaemonError::Veths)?;
    let store = restore_checkpoint(cfg, &mut ds, &veths_now)?;
    let state = Arc::new(PoolState::new(ds, Box::new(store), clock));
    state.mutate_and_save(|_| ()).await?;

    // Host networking: the primary MTU and the egress guard; no SNAT in IPv6.
    if let Some(h) = &parts.host {
        let primary_host = crate::io::host::HostEni {
            id: eni_id.clone(),
            mac: primary.mac.clone(),
            primary_ip: info
                .primary_ip
                .or(primary.primary_ip())
                .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
            subnet_cidr: primary.subnet_cidr,
            network_card: 0,
            device_number: 0,
            is_trunk: false,
        };
        let name = h
            .setup_node_v6(cfg, &primary_host)
            .await
            .map_err(DaemonError::Host)?;
        tracing::info!(primary = %name, "host networking set up (IPv6 mode)");
    }

    // 4. Serving.
    let reporter = Arc::new(Reporter {
        metrics: metrics.clone(),
        k8s: parts.k8s.clone(),
        annotate_pod_ip: cfg.annotate_pod_ip,
        pool: std::sync::OnceLock::new(),
    });
    let backend = Backend::new(
        state.clone(),
        ReplySettings {
            vpc_cidrs: Vec::new(),
            vpc_v6_cidrs: v6.vpc_ipv6_cidrs.iter().map(ToString::to_string).collect(),
            external_snat: cfg.external_snat,
            network_policy_mode: cfg.network_policy_mode.clone(),
            node_ip: id.local_ipv4.to_string(),
            node_ipv6: node_ipv6.map(|a| a.to_string()).unwrap_or_default(),
            instance_id: id.instance_id.clone(),
            region: id.region.clone(),
        },
    )
    .with_events(reporter);
    let mut serving = serve(cfg, &state, backend, &metrics).await?;
    if let Some(t) = super::orphan_sweep(cfg, &state, &deps, &metrics, &serving.rx) {
        serving.tasks.push(t);
    }
    tracing::info!(prefix = %prefix, "IPv6 mode: pods get addresses of the /80; no warm pool");
    let with_api = parts.k8s.is_some();
    Ok((
        DaemonV6 {
            state,
            metrics,
            serving,
            prefix,
        },
        with_api,
    ))
}
