//! Prometheus metrics: the reference daemon's `awscni_*` families, plus ours.
//!
//! [`Metrics`] owns a [`prometheus::Registry`] holding every family of the reference daemon
//! (spec/ipamd.md section 6.1) with the same names, types and labels, so existing dashboards
//! and the `cni-metrics-helper` keep working, and the families we add (EC2 calls, throttles,
//! errors and latency by action, pool decisions, top-up latency, warm and cooling IPs). Every
//! family is a public field, so the daemon can update it directly; the helper methods record the
//! common events in all the families they concern at once.
//!
//! [`serve`] answers `GET /metrics` in the Prometheus text format (the reference binds all
//! interfaces on port 61678).
//!
//! The reference's `awscni_aws_api_latency_ms` is a summary without quantiles (only `_sum` and
//! `_count`); the `prometheus` crate has no summary type, so [`LatencySummaryVec`] provides one.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Summary};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::io::ec2::pacer::Ec2Outcome;
use crate::plan::pool::PoolDecision;
use crate::serve::introspect::{self, HttpListener, Route};

/// Default metrics bind address of the reference daemon (`:61678`, all interfaces).
pub const DEFAULT_METRICS_BIND: &str = ":61678";

/// Names of every metric family [`Metrics`] registers (without the process collector's
/// `process_*` families). A family with labels appears in a scrape once one of its label sets
/// has been used; the families whose label values are known in advance are pre-created (see
/// [`Metrics::new`] and [`Metrics::precreate_ec2_actions`]).
pub const METRIC_NAMES: &[&str] = &[
    // reference (spec/ipamd.md 6.1)
    "awscni_ipamd_error_count",
    "awscni_ipamd_action_inprogress",
    "awscni_eni_max",
    "awscni_ip_max",
    "awscni_reconcile_count",
    "awscni_add_ip_req_count",
    "awscni_del_ip_req_count",
    "awscni_pod_eni_error_count",
    "awscni_aws_api_latency_ms",
    "awscni_aws_api_error_count",
    "awscni_aws_utils_error_count",
    "awscni_ec2api_req_count",
    "awscni_ec2api_error_count",
    "awscni_eni_allocated",
    "awscni_total_ip_addresses",
    "awscni_assigned_ip_addresses",
    "awscni_force_removed_enis",
    "awscni_force_removed_ips",
    "awscni_total_ipv4_prefixes",
    "awscni_assigned_ip_per_cidr",
    "awscni_no_available_ip_addresses",
    "awscni_assigned_ip_per_eni",
    "awscni_ipamd_startup_duration_seconds",
    "awscni_ipamd_node_initialization_duration_seconds",
    "awscni_connmark_backend",
    "awscni_connmark_reconcile_total",
    "awscni_build_info",
    // ours
    "awscni_ec2_calls_total",
    "awscni_ec2_throttled_total",
    "awscni_ec2_errors_total",
    "awscni_ec2_call_duration_seconds",
    "awscni_pool_decisions_total",
    "awscni_pool_topup_duration_seconds",
    "awscni_cooldown_ip_addresses",
    "awscni_warm_ip_addresses",
    "awscni_orphaned_ips_released_total",
];

/// The `fn` label values of `awscni_ipamd_action_inprogress` used by the reference.
pub const ACTIONS_IN_PROGRESS: &[&str] = &[
    "nodeInit",
    "increaseDatastorePool",
    "decreaseDatastorePool",
    "nodeIPPoolReconcile",
];

/// Errors of the metrics layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered (a programming error: duplicate name or
    /// invalid label).
    #[error("cannot register metric family")]
    Register(#[source] prometheus::Error),
    /// The registry could not be encoded in the text format.
    #[error("cannot encode the metrics in the text format")]
    Encode(#[source] prometheus::Error),
    /// The bind address is not `host:port` or `:port`.
    #[error("invalid metrics bind address {0:?} (expected host:port or :port)")]
    BadBindAddress(String),
    /// The HTTP listener failed.
    #[error("metrics server")]
    Serve(#[source] introspect::IntrospectError),
}

/// A datastore snapshot for [`Metrics::set_pool`]: the unlabelled pool gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// ENIs in the datastore (`awscni_eni_allocated`).
    pub enis: i64,
    /// Addresses in the datastore, prefixes counted as 16 (`awscni_total_ip_addresses`).
    pub total_ips: i64,
    /// Addresses assigned to pods (`awscni_assigned_ip_addresses`).
    pub assigned_ips: i64,
    /// Unassigned addresses still in their cooldown period (`awscni_cooldown_ip_addresses`).
    pub cooldown_ips: i64,
    /// Addresses ready to hand out now: not assigned, not cooling (`awscni_warm_ip_addresses`).
    pub warm_ips: i64,
    /// IPv4 /28 prefixes in the datastore (`awscni_total_ipv4_prefixes`).
    pub ipv4_prefixes: i64,
}

/// A summary family with only `_sum` and `_count` per label set, like a Go `SummaryVec` with no
/// objectives (the reference's `awscni_aws_api_latency_ms`).
#[derive(Clone)]
pub struct LatencySummaryVec {
    desc: Arc<Desc>,
    labels: Arc<[String]>,
    series: Arc<Mutex<SummarySeries>>,
}

/// `(count, sum)` by label values.
type SummarySeries = BTreeMap<Vec<String>, (u64, f64)>;

impl LatencySummaryVec {
    /// A new family `name` with the given label names.
    pub fn new(name: &str, help: &str, labels: &[&str]) -> Result<Self, prometheus::Error> {
        let labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        let desc = Desc::new(
            name.to_owned(),
            help.to_owned(),
            labels.clone(),
            HashMap::new(),
        )?;
        Ok(LatencySummaryVec {
            desc: Arc::new(desc),
            labels: labels.into(),
            series: Arc::new(Mutex::new(BTreeMap::new())),
        })
    }

    /// Records one observation for the label values (in label-name order).
    ///
    /// # Panics
    /// If the number of values differs from the number of label names (a programming error,
    /// as with the `prometheus` crate's `with_label_values`).
    pub fn observe(&self, values: &[&str], value: f64) {
        assert_eq!(
            values.len(),
            self.labels.len(),
            "label values of {}",
            self.desc.fq_name
        );
        let key = values.iter().map(|v| (*v).to_owned()).collect();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = series.entry(key).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += value;
    }

    /// `(count, sum)` of a label set, if it was observed.
    pub fn get(&self, values: &[&str]) -> Option<(u64, f64)> {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.get(&key).copied()
    }
}

impl Collector for LatencySummaryVec {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        let metrics = series
            .iter()
            .map(|(values, (count, sum))| {
                let pairs = self
                    .labels
                    .iter()
                    .zip(values)
                    .map(|(name, value)| {
                        let mut pair = LabelPair::default();
                        pair.set_name(name.clone());
                        pair.set_value(value.clone());
                        pair
                    })
                    .collect();
                let mut summary = Summary::default();
                summary.set_sample_count(*count);
                summary.set_sample_sum(*sum);
                let mut metric = Metric::from_label(pairs);
                metric.set_summary(summary);
                metric
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(MetricType::SUMMARY);
        family.set_metric(metrics);
        vec![family]
    }
}

/// Marks an `awscni_ipamd_action_inprogress{fn}` action as running until dropped.
#[must_use = "the action counts as in progress only while the guard lives"]
pub struct InProgress {
    gauge: IntGauge,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Every metric family of the daemon, registered in a registry this struct owns.
///
/// Reference families keep the reference's names, types and labels. Ours are additive.
pub struct Metrics {
    registry: Registry,

    /// `awscni_ipamd_error_count{fn}`: ipamd internal errors by function.
    pub ipamd_error_count: IntCounterVec,
    /// `awscni_ipamd_action_inprogress{fn}`: actions running now (see [`Metrics::in_progress`]).
    pub ipamd_action_inprogress: IntGaugeVec,
    /// `awscni_eni_max`: `maxENI` minus unmanaged ENIs.
    pub eni_max: IntGauge,
    /// `awscni_ip_max`: `maxIPsPerENI × (maxENI − unmanaged)`.
    pub ip_max: IntGauge,
    /// `awscni_reconcile_count{fn}`: reconcile actions.
    pub reconcile_count: IntCounterVec,
    /// `awscni_add_ip_req_count`: AddNetwork calls.
    pub add_ip_req_count: IntCounter,
    /// `awscni_del_ip_req_count{reason}`: DelNetwork calls by request reason.
    pub del_ip_req_count: IntCounterVec,
    /// `awscni_pod_eni_error_count{fn}`: security-groups-for-pods errors.
    pub pod_eni_error_count: IntCounterVec,
    /// `awscni_aws_api_latency_ms{api,error,status}`: AWS call latency in milliseconds.
    pub aws_api_latency_ms: LatencySummaryVec,
    /// `awscni_aws_api_error_count{api,error}`: AWS API errors by error code.
    pub aws_api_error_count: IntCounterVec,
    /// `awscni_aws_utils_error_count{fn,error}`: errors of the AWS helper layer.
    pub aws_utils_error_count: IntCounterVec,
    /// `awscni_ec2api_req_count{fn}`: EC2 requests by operation.
    pub ec2api_req_count: IntCounterVec,
    /// `awscni_ec2api_error_count{fn}`: failed EC2 requests by operation.
    pub ec2api_error_count: IntCounterVec,
    /// `awscni_eni_allocated`: ENIs in the datastore.
    pub eni_allocated: IntGauge,
    /// `awscni_total_ip_addresses`: addresses in the datastore.
    pub total_ip_addresses: IntGauge,
    /// `awscni_assigned_ip_addresses`: addresses assigned to pods.
    pub assigned_ip_addresses: IntGauge,
    /// `awscni_force_removed_enis`: ENIs force-removed with pods on them.
    pub force_removed_enis: IntCounter,
    /// `awscni_force_removed_ips`: assigned addresses force-removed.
    pub force_removed_ips: IntCounter,
    /// `awscni_total_ipv4_prefixes`: IPv4 prefixes in the datastore.
    pub total_ipv4_prefixes: IntGauge,
    /// `awscni_assigned_ip_per_cidr{cidr}`: assigned addresses per /32 or /28.
    pub assigned_ip_per_cidr: IntGaugeVec,
    /// `awscni_no_available_ip_addresses`: assignments that failed for lack of addresses.
    pub no_available_ip_addresses: IntCounter,
    /// `awscni_assigned_ip_per_eni{eni}`: assigned addresses per ENI (see
    /// [`Metrics::remove_eni`]).
    pub assigned_ip_per_eni: IntGaugeVec,
    /// `awscni_ipamd_startup_duration_seconds{success,with_api_server,failure_reason}`.
    pub ipamd_startup_duration_seconds: HistogramVec,
    /// `awscni_ipamd_node_initialization_duration_seconds{success}`.
    pub ipamd_node_initialization_duration_seconds: HistogramVec,
    /// `awscni_connmark_backend{backend}`: 1 for the active connmark backend.
    pub connmark_backend: IntGaugeVec,
    /// `awscni_connmark_reconcile_total{result}`: `success` and `error` (both pre-created).
    pub connmark_reconcile_total: IntCounterVec,
    /// `awscni_build_info{version,goversion}`: constant 1.
    pub build_info: IntGaugeVec,

    /// `awscni_orphaned_ips_released_total`: addresses the orphan sweep released (their
    /// pod's host veth gone past the grace).
    pub orphaned_ips_released: IntCounter,
    /// `awscni_ec2_calls_total{action}`: EC2 calls by action, whatever their outcome.
    pub ec2_calls_total: IntCounterVec,
    /// `awscni_ec2_throttled_total{action}`: EC2 calls refused by throttling.
    pub ec2_throttled_total: IntCounterVec,
    /// `awscni_ec2_errors_total{action,code}`: failed EC2 calls, throttles included.
    pub ec2_errors_total: IntCounterVec,
    /// `awscni_ec2_call_duration_seconds{action}`: EC2 call latency.
    pub ec2_call_duration_seconds: HistogramVec,
    /// `awscni_pool_decisions_total{kind}`: pool decisions executed (kinds pre-created).
    pub pool_decisions_total: IntCounterVec,
    /// `awscni_pool_topup_duration_seconds`: from an assignment leaving the pool below target
    /// to the pool being back on target.
    pub pool_topup_duration_seconds: Histogram,
    /// `awscni_cooldown_ip_addresses`: unassigned addresses in their cooldown period.
    pub cooldown_ip_addresses: IntGauge,
    /// `awscni_warm_ip_addresses`: addresses ready to hand out now.
    pub warm_ip_addresses: IntGauge,

    topup_pending: Mutex<HashMap<u32, Instant>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const STARTUP_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];
const TOPUP_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<C: Collector + Clone + 'static>(&self, c: C) -> Result<C, MetricsError> {
        self.0
            .register(Box::new(c.clone()))
            .map_err(MetricsError::Register)?;
        Ok(c)
    }
    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
        self.add(IntCounter::new(name, help).map_err(MetricsError::Register)?)
    }
    fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).map_err(MetricsError::Register)?)
    }
    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        self.add(IntGauge::new(name, help).map_err(MetricsError::Register)?)
    }
    fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).map_err(MetricsError::Register)?)
    }
    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, MetricsError> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels).map_err(MetricsError::Register)?)
    }
}

impl Metrics {
    /// Creates and registers every family in a fresh registry, with the process collector
    /// (`process_*`) on Linux, `awscni_build_info{version=<crate version>,goversion="rust"}`
    /// set to 1, and these label values pre-created at 0 so they appear in the first scrape:
    /// `awscni_connmark_reconcile_total{result=success|error}` (as the reference),
    /// `awscni_pool_decisions_total{kind}` for every [`PoolDecision`] and
    /// `awscni_ipamd_action_inprogress{fn}` for every [`ACTIONS_IN_PROGRESS`] value.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let r = Reg(&registry);
        let fn_ = &["fn"][..];
        let metrics = Metrics {
            ipamd_error_count: r.counter_vec(
                "awscni_ipamd_error_count",
                "The number of errors encountered in ipamd",
                fn_,
            )?,
            ipamd_action_inprogress: r.gauge_vec(
                "awscni_ipamd_action_inprogress",
                "The number of ipamd actions in progress",
                fn_,
            )?,
            eni_max: r.gauge(
                "awscni_eni_max",
                "The maximum number of ENIs that can be attached to the instance, accounting for unmanaged ENIs",
            )?,
            ip_max: r.gauge(
                "awscni_ip_max",
                "The maximum number of IP addresses that can be allocated to the instance",
            )?,
            reconcile_count: r.counter_vec(
                "awscni_reconcile_count",
                "The number of times ipamd reconciles on ENIs and IP/Prefix addresses",
                fn_,
            )?,
            add_ip_req_count: r.counter(
                "awscni_add_ip_req_count",
                "The number of add IP address requests",
            )?,
            del_ip_req_count: r.counter_vec(
                "awscni_del_ip_req_count",
                "The number of delete IP address requests",
                &["reason"],
            )?,
            pod_eni_error_count: r.counter_vec(
                "awscni_pod_eni_error_count",
                "The number of errors encountered for pod ENIs",
                fn_,
            )?,
            aws_api_latency_ms: r.add(
                LatencySummaryVec::new(
                    "awscni_aws_api_latency_ms",
                    "AWS API call latency in ms",
                    &["api", "error", "status"],
                )
                .map_err(MetricsError::Register)?,
            )?,
            aws_api_error_count: r.counter_vec(
                "awscni_aws_api_error_count",
                "The number of times AWS API returns an error",
                &["api", "error"],
            )?,
            aws_utils_error_count: r.counter_vec(
                "awscni_aws_utils_error_count",
                "The number of errors not handled in awsutils library",
                &["fn", "error"],
            )?,
            ec2api_req_count: r.counter_vec(
                "awscni_ec2api_req_count",
                "The number of requests made to EC2 APIs by CNI",
                fn_,
            )?,
            ec2api_error_count: r.counter_vec(
                "awscni_ec2api_error_count",
                "The number of failed EC2 APIs requests",
                fn_,
            )?,
            eni_allocated: r.gauge(
                "awscni_eni_allocated",
                "The number of ENIs allocated",
            )?,
            total_ip_addresses: r.gauge(
                "awscni_total_ip_addresses",
                "The total number of IP addresses",
            )?,
            assigned_ip_addresses: r.gauge(
                "awscni_assigned_ip_addresses",
                "The number of IP addresses assigned to pods",
            )?,
            force_removed_enis: r.counter(
                "awscni_force_removed_enis",
                "The number of ENIs force removed while they had assigned pods",
            )?,
            force_removed_ips: r.counter(
                "awscni_force_removed_ips",
                "The number of IPs force removed while they had assigned pods",
            )?,
            orphaned_ips_released: r.counter(
                "awscni_orphaned_ips_released_total",
                "The number of assigned IPs released because their pod's host veth was gone past the grace",
            )?,
            total_ipv4_prefixes: r.gauge(
                "awscni_total_ipv4_prefixes",
                "The total number of IPv4 prefixes",
            )?,
            assigned_ip_per_cidr: r.gauge_vec(
                "awscni_assigned_ip_per_cidr",
                "The total number of IP addresses assigned per cidr",
                &["cidr"],
            )?,
            no_available_ip_addresses: r.counter(
                "awscni_no_available_ip_addresses",
                "The number of pod IP assignments that fail due to no available IP addresses",
            )?,
            assigned_ip_per_eni: r.gauge_vec(
                "awscni_assigned_ip_per_eni",
                "The number of IP addresses assigned per ENI",
                &["eni"],
            )?,
            ipamd_startup_duration_seconds: r.histogram_vec(
                "awscni_ipamd_startup_duration_seconds",
                "Time taken from ipamd process start until it is ready to serve requests",
                STARTUP_BUCKETS,
                &["success", "with_api_server", "failure_reason"],
            )?,
            ipamd_node_initialization_duration_seconds: r.histogram_vec(
                "awscni_ipamd_node_initialization_duration_seconds",
                "Time taken to initialize the node's IP address management",
                STARTUP_BUCKETS,
                &["success"],
            )?,
            connmark_backend: r.gauge_vec(
                "awscni_connmark_backend",
                "The connmark backend in use (1 for the active backend)",
                &["backend"],
            )?,
            connmark_reconcile_total: r.counter_vec(
                "awscni_connmark_reconcile_total",
                "The number of connmark rule reconciliations by result",
                &["result"],
            )?,
            build_info: r.gauge_vec(
                "awscni_build_info",
                "A metric with a constant '1' value labeled by version and the toolchain",
                &["version", "goversion"],
            )?,
            ec2_calls_total: r.counter_vec(
                "awscni_ec2_calls_total",
                "EC2 API calls made by ipamd, by action, whatever their outcome",
                &["action"],
            )?,
            ec2_throttled_total: r.counter_vec(
                "awscni_ec2_throttled_total",
                "EC2 API calls refused by throttling, by action",
                &["action"],
            )?,
            ec2_errors_total: r.counter_vec(
                "awscni_ec2_errors_total",
                "Failed EC2 API calls (throttles included), by action and AWS error code",
                &["action", "code"],
            )?,
            ec2_call_duration_seconds: r.histogram_vec(
                "awscni_ec2_call_duration_seconds",
                "EC2 API call latency in seconds, by action",
                LATENCY_BUCKETS,
                &["action"],
            )?,
            pool_decisions_total: r.counter_vec(
                "awscni_pool_decisions_total",
                "Warm-pool decisions executed, by kind (assign, create_eni, release, free_eni)",
                &["kind"],
            )?,
            pool_topup_duration_seconds: r.add(
                Histogram::with_opts(
                    HistogramOpts::new(
                        "awscni_pool_topup_duration_seconds",
                        "Time from an assignment leaving the warm pool below target to the pool being back on target",
                    )
                    .buckets(TOPUP_BUCKETS.to_vec()),
                )
                .map_err(MetricsError::Register)?,
            )?,
            cooldown_ip_addresses: r.gauge(
                "awscni_cooldown_ip_addresses",
                "Unassigned IP addresses still in their cooldown period",
            )?,
            warm_ip_addresses: r.gauge(
                "awscni_warm_ip_addresses",
                "IP addresses ready to be assigned now (not assigned, not cooling down)",
            )?,
            topup_pending: Mutex::new(HashMap::new()),
            registry,
        };
        #[cfg(target_os = "linux")]
        metrics
            .registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .map_err(MetricsError::Register)?;
        for result in ["success", "error"] {
            metrics
                .connmark_reconcile_total
                .with_label_values(&[result]);
        }
        for kind in PoolDecision::ALL {
            metrics
                .pool_decisions_total
                .with_label_values(&[kind.as_str()]);
        }
        for action in ACTIONS_IN_PROGRESS {
            metrics
                .ipamd_action_inprogress
                .with_label_values(&[*action]);
        }
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "rust"])
            .set(1);
        Ok(metrics)
    }

    /// The registry holding every family (give it to [`serve`]).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, MetricsError> {
        encode(&self.registry)
    }

    /// Pre-creates the `awscni_ec2_calls_total`, `awscni_ec2_throttled_total`,
    /// `awscni_ec2api_req_count` and `awscni_ec2_call_duration_seconds` series at 0 for these EC2 actions (operation names), so that
    /// dashboards see them before the first call. Error series are not pre-created: their
    /// `code` label is unknown in advance.
    pub fn precreate_ec2_actions(&self, actions: &[&str]) {
        for action in actions {
            self.ec2_calls_total.with_label_values(&[*action]);
            self.ec2_throttled_total.with_label_values(&[*action]);
            self.ec2api_req_count.with_label_values(&[*action]);
            self.ec2_call_duration_seconds.with_label_values(&[*action]);
        }
    }

    /// Records one EC2 call in every family that concerns it: the reference
    /// `awscni_ec2api_req_count`, `awscni_ec2api_error_count`, `awscni_aws_api_latency_ms`
    /// (status `200` or the error code) and `awscni_aws_api_error_count`, and our
    /// `awscni_ec2_calls_total`, `awscni_ec2_throttled_total`, `awscni_ec2_errors_total` and
    /// `awscni_ec2_call_duration_seconds`. `action` is the EC2 operation name, e.g.
    /// `AssignPrivateIpAddresses`.
    pub fn record_ec2_call(&self, action: &str, elapsed: Duration, outcome: Ec2Outcome<'_>) {
        self.ec2api_req_count.with_label_values(&[action]).inc();
        self.ec2_calls_total.with_label_values(&[action]).inc();
        // Created at 0 on the first call, so that throttle ratios exist for every action.
        let throttled = self.ec2_throttled_total.with_label_values(&[action]);
        self.ec2_call_duration_seconds
            .with_label_values(&[action])
            .observe(elapsed.as_secs_f64());
        let ms = elapsed.as_secs_f64() * 1000.0;
        match outcome {
            Ec2Outcome::Ok => {
                self.aws_api_latency_ms
                    .observe(&[action, "false", "200"], ms);
            }
            Ec2Outcome::Throttled { code } | Ec2Outcome::Failed { code } => {
                if matches!(outcome, Ec2Outcome::Throttled { .. }) {
                    throttled.inc();
                }
                self.ec2api_error_count.with_label_values(&[action]).inc();
                self.aws_api_error_count
                    .with_label_values(&[action, code])
                    .inc();
                self.ec2_errors_total
                    .with_label_values(&[action, code])
                    .inc();
                self.aws_api_latency_ms.observe(&[action, "true", code], ms);
            }
        }
    }

    /// Counts one executed pool decision.
    pub fn record_pool_decision(&self, kind: PoolDecision) {
        self.pool_decisions_total
            .with_label_values(&[kind.as_str()])
            .inc();
    }

    /// Sets the unlabelled pool gauges from a datastore snapshot (with several network cards
    /// the reference overwrites them with whichever datastore updated last; pass a sum over
    /// cards to avoid that).
    pub fn set_pool(&self, pool: &PoolSnapshot) {
        self.eni_allocated.set(pool.enis);
        self.total_ip_addresses.set(pool.total_ips);
        self.assigned_ip_addresses.set(pool.assigned_ips);
        self.cooldown_ip_addresses.set(pool.cooldown_ips);
        self.warm_ip_addresses.set(pool.warm_ips);
        self.total_ipv4_prefixes.set(pool.ipv4_prefixes);
    }

    /// Sets `awscni_assigned_ip_per_eni{eni}`.
    pub fn set_assigned_ip_per_eni(&self, eni: &str, assigned: i64) {
        self.assigned_ip_per_eni
            .with_label_values(&[eni])
            .set(assigned);
    }

    /// Deletes the `awscni_assigned_ip_per_eni` series of a removed ENI (as the reference).
    pub fn remove_eni(&self, eni: &str) {
        // An ENI that never had the series is not an error.
        let _ = self.assigned_ip_per_eni.remove_label_values(&[eni]);
    }

    /// Sets `awscni_assigned_ip_per_cidr{cidr}` (`cidr` is `a.b.c.d/32` or a `/28`).
    pub fn set_assigned_ip_per_cidr(&self, cidr: &str, assigned: i64) {
        self.assigned_ip_per_cidr
            .with_label_values(&[cidr])
            .set(assigned);
    }

    /// Deletes the `awscni_assigned_ip_per_cidr` series of a released CIDR.
    pub fn remove_cidr(&self, cidr: &str) {
        let _ = self.assigned_ip_per_cidr.remove_label_values(&[cidr]);
    }

    /// Marks an `awscni_ipamd_action_inprogress{fn}` action as running until the guard drops.
    pub fn in_progress(&self, action: &str) -> InProgress {
        let gauge = self.ipamd_action_inprogress.with_label_values(&[action]);
        gauge.inc();
        InProgress { gauge }
    }

    /// Records that network card `card` went below its warm target at `at` (typically right
    /// after an assignment). Only the first call of a low period counts: the top-up latency is
    /// measured from the moment the pool first went low.
    pub fn pool_below_target(&self, card: u32, at: Instant) {
        let mut pending = self
            .topup_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        pending.entry(card).or_insert(at);
    }

    /// Records that network card `card` is back on target at `at`; observes and returns the
    /// top-up latency when a low period was open, `None` otherwise.
    pub fn pool_on_target(&self, card: u32, at: Instant) -> Option<Duration> {
        let started = self
            .topup_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&card)?;
        let elapsed = at.saturating_duration_since(started);
        self.pool_topup_duration_seconds
            .observe(elapsed.as_secs_f64());
        Some(elapsed)
    }
}

/// A registry in the Prometheus text exposition format (version 0.0.4).
pub fn encode(registry: &Registry) -> Result<String, MetricsError> {
    let families = registry.gather();
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .map_err(MetricsError::Encode)?;
    String::from_utf8(out).map_err(|e| {
        MetricsError::Encode(prometheus::Error::Msg(format!(
            "text encoding is not UTF-8: {e}"
        )))
    })
}

/// Parses a metrics bind address: `host:port`, `[v6]:port`, or `:port` for all IPv4
/// interfaces (the reference's `:61678`).
pub fn parse_bind_address(bind: &str) -> Result<SocketAddr, MetricsError> {
    if let Some(port) = bind.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| MetricsError::BadBindAddress(bind.to_owned()))?;
        return Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            port,
        )));
    }
    bind.parse()
        .map_err(|_| MetricsError::BadBindAddress(bind.to_owned()))
}

fn metrics_route(registry: Registry) -> Route {
    Arc::new(move |path: String| {
        let registry = registry.clone();
        Box::pin(async move {
            if path != "/metrics" {
                return introspect::text_response(StatusCode::NOT_FOUND, "404 page not found\n");
            }
            match encode(&registry) {
                Ok(text) => Response::builder()
                    .status(StatusCode::OK)
                    .header(hyper::header::CONTENT_TYPE, prometheus::TEXT_FORMAT)
                    .body(Full::new(Bytes::from(text)))
                    .unwrap_or_else(|_| {
                        introspect::text_response(StatusCode::INTERNAL_SERVER_ERROR, "")
                    }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode metrics");
                    introspect::text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "cannot encode metrics\n",
                    )
                }
            }
        })
    })
}

/// A bound metrics listener (bind first to learn the port, then [`MetricsServer::run`]).
#[derive(Debug)]
pub struct MetricsServer {
    listener: HttpListener,
}

impl MetricsServer {
    /// Binds the TCP listener.
    pub async fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        let listener = HttpListener::bind(&addr.to_string())
            .await
            .map_err(MetricsError::Serve)?;
        Ok(MetricsServer { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.tcp_addr()
    }

    /// Serves `GET /metrics` from `registry` until `shutdown` completes.
    pub async fn run(
        self,
        registry: Registry,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), MetricsError> {
        self.listener
            .run(metrics_route(registry), shutdown)
            .await
            .map_err(MetricsError::Serve)
    }
}

/// Binds `addr` (retrying with backoff from 1 s to 1 min while the address is busy, as the
/// reference) and serves `GET /metrics` in the Prometheus text format until `shutdown`
/// completes. Other paths answer 404.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), MetricsError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let listener = match introspect::bind_with_backoff(&addr.to_string(), shutdown.as_mut()).await {
        Some(listener) => listener,
        None => return Ok(()),
    };
    tracing::info!(%addr, "serving Prometheus metrics");
    MetricsServer { listener }.run(registry, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape_value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_family_is_registered_once_and_appears_after_use() {
        let m = Metrics::new().expect("metrics");
        m.ipamd_error_count
            .with_label_values(&["decreaseIPPool"])
            .inc();
        m.reconcile_count
            .with_label_values(&["eniReconcileAdd"])
            .inc();
        m.add_ip_req_count.inc();
        m.del_ip_req_count.with_label_values(&["PodDeleted"]).inc();
        m.pod_eni_error_count.with_label_values(&["nodeInit"]).inc();
        m.aws_utils_error_count
            .with_label_values(&["FreeENIDeleteErr", "InvalidNetworkInterfaceID.NotFound"])
            .inc();
        m.record_ec2_call(
            "CreateNetworkInterface",
            Duration::from_millis(3),
            Ec2Outcome::Throttled {
                code: "RequestLimitExceeded",
            },
        );
        m.force_removed_enis.inc();
        m.force_removed_ips.inc();
        m.orphaned_ips_released.inc();
        m.set_assigned_ip_per_cidr("10.0.0.16/28", 2);
        m.no_available_ip_addresses.inc();
        m.set_assigned_ip_per_eni("eni-1", 2);
        m.ipamd_startup_duration_seconds
            .with_label_values(&["true", "false", ""])
            .observe(1.0);
        m.ipamd_node_initialization_duration_seconds
            .with_label_values(&["true"])
            .observe(0.5);
        m.connmark_backend.with_label_values(&["iptables"]).set(1);
        m.pool_topup_duration_seconds.observe(0.1);
        let text = m.encode().expect("encode");
        for name in METRIC_NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from the scrape"
            );
        }
        let families = m.registry().gather();
        let ours: Vec<&str> = families
            .iter()
            .map(|f| f.name())
            .filter(|n| n.starts_with("awscni_"))
            .collect();
        assert_eq!(ours.len(), METRIC_NAMES.len(), "{ours:?}");
    }

    #[test]
    fn reference_types_are_kept() {
        let m = Metrics::new().expect("metrics");
        m.record_ec2_call(
            "AttachNetworkInterface",
            Duration::from_millis(5),
            Ec2Outcome::Ok,
        );
        m.ipamd_startup_duration_seconds
            .with_label_values(&["true", "true", ""])
            .observe(3.0);
        let text = m.encode().expect("encode");
        for (name, ty) in [
            ("awscni_aws_api_latency_ms", "summary"),
            ("awscni_ec2api_req_count", "counter"),
            ("awscni_eni_max", "gauge"),
            ("awscni_ipamd_startup_duration_seconds", "histogram"),
            ("awscni_build_info", "gauge"),
            ("awscni_connmark_reconcile_total", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {ty}\n")),
                "{name} {ty}"
            );
        }
    }

    #[test]
    fn pre_created_series_are_scraped_at_zero() {
        let m = Metrics::new().expect("metrics");
        m.precreate_ec2_actions(&["AssignPrivateIpAddresses"]);
        let text = m.encode().expect("encode");
        for series in [
            r#"awscni_connmark_reconcile_total{result="success"}"#,
            r#"awscni_connmark_reconcile_total{result="error"}"#,
            r#"awscni_pool_decisions_total{kind="assign"}"#,
            r#"awscni_pool_decisions_total{kind="create_eni"}"#,
            r#"awscni_pool_decisions_total{kind="release"}"#,
            r#"awscni_pool_decisions_total{kind="free_eni"}"#,
            r#"awscni_ipamd_action_inprogress{fn="nodeInit"}"#,
            r#"awscni_ec2_calls_total{action="AssignPrivateIpAddresses"}"#,
            r#"awscni_ec2_throttled_total{action="AssignPrivateIpAddresses"}"#,
            r#"awscni_ec2_call_duration_seconds_count{action="AssignPrivateIpAddresses"}"#,
        ] {
            assert_eq!(scrape_value(&text, series), Some(0.0), "{series}");
        }
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            scrape_value(
                &text,
                &format!(r#"awscni_build_info{{goversion="rust",version="{version}"}}"#)
            ),
            Some(1.0)
        );
    }

    #[test]
    fn an_ec2_call_lands_in_reference_and_own_families() {
        let m = Metrics::new().expect("metrics");
        m.record_ec2_call(
            "AssignPrivateIpAddresses",
            Duration::from_millis(20),
            Ec2Outcome::Ok,
        );
        m.record_ec2_call(
            "AssignPrivateIpAddresses",
            Duration::from_millis(40),
            Ec2Outcome::Throttled {
                code: "RequestLimitExceeded",
            },
        );
        m.record_ec2_call(
            "CreateNetworkInterface",
            Duration::from_millis(10),
            Ec2Outcome::Failed {
                code: "InsufficientFreeAddressesInSubnet",
            },
        );
        let text = m.encode().expect("encode");
        let v = |s: &str| scrape_value(&text, s);
        assert_eq!(
            v(r#"awscni_ec2api_req_count{fn="AssignPrivateIpAddresses"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(r#"awscni_ec2api_error_count{fn="AssignPrivateIpAddresses"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(r#"awscni_ec2_calls_total{action="AssignPrivateIpAddresses"}"#),
            Some(2.0)
        );
        assert_eq!(
            v(r#"awscni_ec2_throttled_total{action="AssignPrivateIpAddresses"}"#),
            Some(1.0)
        );
        assert_eq!(
            v(
                r#"awscni_ec2_errors_total{action="AssignPrivateIpAddresses",code="RequestLimitExceeded"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                r#"awscni_ec2_errors_total{action="CreateNetworkInterface",code="InsufficientFreeAddressesInSubnet"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(r#"awscni_ec2_throttled_total{action="CreateNetworkInterface"}"#),
            Some(0.0)
        );
        assert_eq!(
            v(
                r#"awscni_aws_api_error_count{api="CreateNetworkInterface",error="InsufficientFreeAddressesInSubnet"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                r#"awscni_aws_api_latency_ms_count{api="AssignPrivateIpAddresses",error="false",status="200"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                r#"awscni_aws_api_latency_ms_sum{api="AssignPrivateIpAddresses",error="false",status="200"}"#
            ),
            Some(20.0)
        );
        assert_eq!(
            v(
                r#"awscni_aws_api_latency_ms_count{api="AssignPrivateIpAddresses",error="true",status="RequestLimitExceeded"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            v(r#"awscni_ec2_call_duration_seconds_count{action="AssignPrivateIpAddresses"}"#),
            Some(2.0)
        );
    }

    #[test]
    fn top_up_latency_runs_from_first_low_to_back_on_target_per_card() {
        let m = Metrics::new().expect("metrics");
        let t0 = Instant::now();
        assert_eq!(m.pool_on_target(0, t0), None, "no low period open");
        m.pool_below_target(0, t0);
        m.pool_below_target(0, t0 + Duration::from_millis(300));
        m.pool_below_target(1, t0 + Duration::from_millis(100));
        assert_eq!(
            m.pool_on_target(0, t0 + Duration::from_millis(1500)),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(m.pool_on_target(0, t0 + Duration::from_secs(2)), None);
        assert_eq!(
            m.pool_on_target(1, t0 + Duration::from_millis(600)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(m.pool_topup_duration_seconds.get_sample_count(), 2);
        assert!((m.pool_topup_duration_seconds.get_sample_sum() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn pool_snapshot_sets_reference_and_own_gauges() {
        let m = Metrics::new().expect("metrics");
        m.set_pool(&PoolSnapshot {
            enis: 2,
            total_ips: 32,
            assigned_ips: 10,
            cooldown_ips: 3,
            warm_ips: 19,
            ipv4_prefixes: 2,
        });
        m.record_pool_decision(PoolDecision::CreateEni);
        m.record_pool_decision(PoolDecision::CreateEni);
        let text = m.encode().expect("encode");
        let v = |s: &str| scrape_value(&text, s);
        assert_eq!(v("awscni_eni_allocated"), Some(2.0));
        assert_eq!(v("awscni_total_ip_addresses"), Some(32.0));
        assert_eq!(v("awscni_assigned_ip_addresses"), Some(10.0));
        assert_eq!(v("awscni_cooldown_ip_addresses"), Some(3.0));
        assert_eq!(v("awscni_warm_ip_addresses"), Some(19.0));
        assert_eq!(v("awscni_total_ipv4_prefixes"), Some(2.0));
        assert_eq!(
            v(r#"awscni_pool_decisions_total{kind="create_eni"}"#),
            Some(2.0)
        );
    }

    #[test]
    fn removed_eni_series_disappears() {
        let m = Metrics::new().expect("metrics");
        m.set_assigned_ip_per_eni("eni-a", 3);
        m.set_assigned_ip_per_eni("eni-b", 1);
        m.remove_eni("eni-a");
        m.remove_eni("eni-never-seen");
        let text = m.encode().expect("encode");
        assert!(!text.contains(r#"eni="eni-a""#));
        assert_eq!(
            scrape_value(&text, r#"awscni_assigned_ip_per_eni{eni="eni-b"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn in_progress_guard_counts_while_alive() {
        let m = Metrics::new().expect("metrics");
        let g = m.ipamd_action_inprogress.with_label_values(&["nodeInit"]);
        {
            let _a = m.in_progress("nodeInit");
            let _b = m.in_progress("nodeInit");
            assert_eq!(g.get(), 2);
        }
        assert_eq!(g.get(), 0);
    }

    #[test]
    fn bind_addresses_parse_like_the_reference() {
        assert_eq!(
            parse_bind_address(":61678").expect("parse"),
            "0.0.0.0:61678".parse().expect("addr")
        );
        assert_eq!(
            parse_bind_address("127.0.0.1:9").expect("parse"),
            "127.0.0.1:9".parse().expect("addr")
        );
        assert_eq!(
            parse_bind_address("[::1]:9").expect("parse"),
            "[::1]:9".parse().expect("addr")
        );
        assert!(parse_bind_address("61678").is_err());
        assert!(parse_bind_address(":port").is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_collector_is_registered() {
        let m = Metrics::new().expect("metrics");
        let text = m.encode().expect("encode");
        assert!(text.contains("process_resident_memory_bytes"));
    }

    #[tokio::test]
    async fn serves_the_text_format_on_get_metrics() {
        let m = Metrics::new().expect("metrics");
        m.add_ip_req_count.inc();
        let server = MetricsServer::bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = server.local_addr().expect("tcp");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(m.registry().clone(), async {
            let _ = stopped.await;
        }));
        let (status, headers, body) =
            introspect::test_support::http_get_tcp(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        assert_eq!(scrape_value(&body, "awscni_add_ip_req_count"), Some(1.0));
        let (status, _, _) = introspect::test_support::http_get_tcp(addr, "/other").await;
        assert_eq!(status, 404);
        stop.send(()).expect("server alive");
        task.await.expect("join").expect("clean shutdown");
    }
}
