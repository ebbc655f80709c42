//! Configuration: the reference daemon's environment variables (spec/ipamd.md section 1), our
//! own settings, and the command-line flags that override paths and addresses.
//!
//! Everything is parsed and validated here, before anything touches EC2 or the network
//! (parse, validate, then act). Parsing is pure: it reads variables through a lookup function,
//! so the tests are tables of `(variables, expected)`.
//!
//! Where the reference daemon silently falls back to a default on a bad value, we reject the
//! value at start with a message naming the variable. Each such place is marked
//! "reference: falls back" below and listed in the README.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use subnet_calc::policy::{PoolConfig, Rules, Timers};

use crate::types::Ipv4Net;

/// A configuration error: always names the variable (or flag) and the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("{var}={value:?}: {why}")]
    Invalid {
        /// Variable or flag name.
        var: String,
        /// The value given.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// A combination of settings the daemon refuses.
    #[error("{0}")]
    Combination(String),
}

fn invalid(var: &str, value: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

/// Which EC2 and instance-metadata endpoints the daemon talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Real AWS (or whatever `AWS_EC2_ENDPOINT` and `AWS_EC2_METADATA_SERVICE_ENDPOINT` name).
    Aws,
    /// The embedded VPC simulator, started in-process on loopback (explicitly selected).
    Sim,
}

/// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomizeSnat {
    /// `--random-fully` (default).
    Prng,
    /// `--random`.
    HashRandom,
    /// No port randomisation.
    None,
}

/// `POD_SECURITY_GROUP_ENFORCING_MODE`: how branch-ENI pods (security groups for pods) are
/// routed on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSgMode {
    /// `strict` (default): all of a branch pod's traffic goes through its branch ENI, even to
    /// the node; ipamd moves the `local` table rule from priority 0 to 20.
    Strict,
    /// `standard`: branch pods are routed like other pods for node-local traffic.
    Standard,
}

/// Settings of the embedded simulator backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimSettings {
    /// Instance type of the simulated node (`VPC_CNI_SIM_INSTANCE_TYPE`, default `m5.large`).
    pub instance_type: String,
    /// VPC CIDR (`VPC_CNI_SIM_VPC_CIDR`, default `10.0.0.0/16`).
    pub vpc_cidr: Ipv4Net,
    /// Node subnet CIDR (`VPC_CNI_SIM_SUBNET_CIDR`, default `10.0.0.0/20`).
    pub subnet_cidr: Ipv4Net,
    /// Dual stack: the VPC gets an Amazon-provided IPv6 /56 and the subnet its first /64
    /// (on with `ENABLE_IPv6=true`).
    pub ipv6: bool,
}

/// EC2 call pacing: a token bucket per call class, and retries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ec2Pacing {
    /// Mutating calls per second (`VPC_CNI_EC2_MUTATING_RATE`, default 5, AWS's refill rate).
    pub mutating_per_sec: u32,
    /// Burst of mutating calls (`VPC_CNI_EC2_MUTATING_BURST`, default 20).
    pub mutating_burst: u32,
    /// Describe calls per second (`VPC_CNI_EC2_DESCRIBE_RATE`, default 20).
    pub describe_per_sec: u32,
    /// Burst of describe calls (`VPC_CNI_EC2_DESCRIBE_BURST`, default 20).
    pub describe_burst: u32,
    /// Attempts per call on throttling and 5xx (`VPC_CNI_EC2_MAX_ATTEMPTS`, default 8).
    pub max_attempts: u32,
    /// First retry delay (`VPC_CNI_EC2_RETRY_BASE`, default 200ms); doubles up to 20 s, plus
    /// up to 30 % jitter.
    pub retry_base: Duration,
}

/// The daemon's whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `ENABLE_IPv4`.
    pub enable_ipv4: bool,
    /// `ENABLE_IPv6`.
    pub enable_ipv6: bool,
    /// `ENABLE_PREFIX_DELEGATION` (requested; effective only on Nitro or bare metal).
    pub prefix_delegation: bool,
    /// `WARM_ENI_TARGET`.
    pub warm_eni_target: u32,
    /// `WARM_IP_TARGET` (0 = unset).
    pub warm_ip_target: u32,
    /// `MINIMUM_IP_TARGET` (0 = unset).
    pub minimum_ip_target: u32,
    /// `WARM_PREFIX_TARGET`.
    pub warm_prefix_target: u32,
    /// `MAX_ENI` (`None` = the instance limit).
    pub max_eni: Option<u32>,
    /// `IP_COOLDOWN_PERIOD`.
    pub ip_cooldown: Duration,
    /// `AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`.
    pub custom_networking: bool,
    /// `ENI_CONFIG_ANNOTATION_DEF`.
    pub eni_config_annotation: String,
    /// `ENI_CONFIG_LABEL_DEF`.
    pub eni_config_label: String,
    /// `ENABLE_SUBNET_DISCOVERY`.
    pub subnet_discovery: bool,
    /// `CLUSTER_NAME`.
    pub cluster_name: String,
    /// `ADDITIONAL_ENI_TAGS` (reserved keys dropped).
    pub additional_eni_tags: BTreeMap<String, String>,
    /// `MANAGE_UNTAGGED_ENI`.
    pub manage_untagged_eni: bool,
    /// `AWS_MANAGE_ENIS_NON_SCHEDULABLE`.
    pub manage_enis_non_schedulable: bool,
    /// `DISABLE_NETWORK_RESOURCE_PROVISIONING`.
    pub disable_provisioning: bool,
    /// `DISABLE_LEAKED_ENI_CLEANUP`.
    pub disable_leaked_eni_cleanup: bool,
    /// `ENABLE_IMDS_ONLY_MODE`.
    pub imds_only: bool,
    /// `ENABLE_POD_ENI` (security groups for pods; IPv4 only).
    pub enable_pod_eni: bool,
    /// `POD_SECURITY_GROUP_ENFORCING_MODE` (read only with `ENABLE_POD_ENI=true`; default
    /// strict).
    pub pod_sg_mode: PodSgMode,
    /// `ENABLE_MULTI_NIC`.
    pub enable_multi_nic: bool,
    /// `ANNOTATE_POD_IP`.
    pub annotate_pod_ip: bool,
    /// `NETWORK_POLICY_ENFORCING_MODE`, lower-cased (`""` when unset).
    pub network_policy_mode: String,
    /// `AWS_VPC_K8S_CNI_BACKING_STORE`.
    pub backing_store: PathBuf,
    /// `MY_NODE_NAME`.
    pub node_name: String,
    /// `MY_POD_NAME`.
    pub pod_name: String,
    /// `INTROSPECTION_BIND_ADDRESS`.
    pub introspection_bind: String,
    /// `DISABLE_INTROSPECTION`.
    pub disable_introspection: bool,
    /// `METRICS_BIND_ADDRESS` (the reference hard-codes `:61678`).
    pub metrics_bind: String,
    /// `DISABLE_METRICS`.
    pub disable_metrics: bool,
    /// `AWS_VPC_K8S_CNI_LOGLEVEL`.
    pub log_level: String,
    /// `AWS_VPC_K8S_CNI_LOG_FILE`.
    pub log_file: String,
    /// `VPC_CNI_VERSION`.
    pub vpc_cni_version: String,
    /// `HTTP_TIMEOUT`.
    pub http_timeout: Duration,
    /// `AWS_EC2_ENDPOINT` (applied to the EC2 client, unlike the reference).
    pub ec2_endpoint: Option<String>,
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub imds_endpoint: Option<String>,
    /// `CLUSTER_ENDPOINT`.
    pub cluster_endpoint: Option<String>,
    /// `IPAMD_GRPC_SOCKET`.
    pub grpc_socket: PathBuf,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`.
    pub external_snat: bool,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS`.
    pub exclude_snat_cidrs: Vec<Ipv4Net>,
    /// `AWS_EXTERNAL_SERVICE_CIDRS`.
    pub external_service_cidrs: Vec<Ipv4Net>,
    /// `AWS_VPC_K8S_CNI_RANDOMIZESNAT`.
    pub randomize_snat: RandomizeSnat,
    /// `AWS_VPC_CNI_NODE_PORT_SUPPORT`.
    pub node_port_support: bool,
    /// `AWS_VPC_K8S_CNI_CONNMARK`.
    pub connmark: u32,
    /// `AWS_VPC_ENI_MTU`.
    pub eni_mtu: u32,
    /// `AWS_VPC_K8S_CNI_VETHPREFIX`.
    pub veth_prefix: String,
    /// `ENABLE_V6_EGRESS`.
    pub enable_v6_egress: bool,
    /// Our pool rules (one setting per improvement).
    pub rules: Rules,
    /// The demand flavour's settings (`VPC_CNI_POLICY=demand`); `None`: fixed targets.
    pub demand: Option<subnet_calc::policy::DemandSettings>,
    /// Pool loop period (`VPC_CNI_POOL_TICK`, default 5 s as the reference).
    pub pool_tick: Duration,
    /// Release gate (`VPC_CNI_DECREASE_INTERVAL`, default 30 s).
    pub decrease_interval: Duration,
    /// Minimum ENI age before freeing (`VPC_CNI_MIN_ENI_AGE`, default 60 s).
    pub min_eni_age: Duration,
    /// Growth pause after subnet exhaustion (`VPC_CNI_INSUFFICIENT_CAPACITY_BACKOFF`, 120 s).
    pub insufficient_backoff: Duration,
    /// Reconcile period (`VPC_CNI_RECONCILE_INTERVAL`, default 60 s); the orphan sweep runs
    /// at the same period.
    pub reconcile_interval: Duration,
    /// The orphan sweep: releases an assignment older than [`orphan_grace`](Self::orphan_grace)
    /// whose pod's host veth is absent on two consecutive sweeps (`VPC_CNI_ORPHAN_SWEEP`,
    /// default on).
    pub orphan_sweep: bool,
    /// How old an assignment must be before the orphan sweep may release it
    /// (`VPC_CNI_ORPHAN_GRACE`, default 5 min: well above the runtime's ADD timeout).
    pub orphan_grace: Duration,
    /// EC2 pacing.
    pub ec2: Ec2Pacing,
    /// Host networking: ENI routes and rules, SNAT, MTU (`VPC_CNI_HOST_NETWORKING`; default
    /// on with the `aws` backend, off with `sim`, whose ENIs do not exist on this host).
    pub host_networking: bool,
    /// How long to wait for a new ENI's link to appear after its attach
    /// (`VPC_CNI_ENI_LINK_WAIT`, default 30 s).
    pub eni_link_wait: Duration,
    /// First leaked-ENI cleanup after this long (`VPC_CNI_LEAKED_ENI_DELAY`; unset: a random
    /// 0–300 s, as the reference).
    pub leaked_eni_first_delay: Option<Duration>,
    /// Leaked-ENI cleanup period (`VPC_CNI_LEAKED_ENI_INTERVAL`, default 1 h).
    pub leaked_eni_interval: Duration,
    /// Backend (`IPAMD_BACKEND` / `--backend`, default `aws`).
    pub backend: Backend,
    /// Simulator settings (backend `sim`).
    pub sim: SimSettings,
    /// What gRPC clients may make ipamd hold on its socket (`VPC_CNI_GRPC_MAX_CONNECTIONS`,
    /// `VPC_CNI_GRPC_MAX_STREAMS`, `VPC_CNI_GRPC_MAX_MESSAGE_BYTES`; the other fields keep
    /// the `vpc_cni_rpc` defaults).
    pub grpc_limits: vpc_cni_rpc::ServeLimits,
}

/// Command-line flags: every path and address, and the backend. A flag beats its variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Parser)]
#[command(
    name = "ipamd",
    version,
    about = "Node IP address management daemon (AWS VPC CNI compatible)"
)]
pub struct Flags {
    /// gRPC unix socket (env `IPAMD_GRPC_SOCKET`).
    #[arg(long)]
    pub grpc_socket: Option<String>,
    /// Checkpoint file (env `AWS_VPC_K8S_CNI_BACKING_STORE`).
    #[arg(long)]
    pub backing_store: Option<String>,
    /// Metrics listen address (env `METRICS_BIND_ADDRESS`).
    #[arg(long)]
    pub metrics_bind_address: Option<String>,
    /// Introspection listen address or `unix:/path` (env `INTROSPECTION_BIND_ADDRESS`).
    #[arg(long)]
    pub introspection_bind_address: Option<String>,
    /// EC2 endpoint URL (env `AWS_EC2_ENDPOINT`).
    #[arg(long)]
    pub ec2_endpoint: Option<String>,
    /// Instance metadata endpoint URL (env `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
    #[arg(long)]
    pub imds_endpoint: Option<String>,
    /// `aws` or `sim` (env `IPAMD_BACKEND`).
    #[arg(long)]
    pub backend: Option<String>,
}

/// The gRPC socket's limits: each variable a whole number of at least 1.
fn grpc_limits(env: &Env<'_>) -> Result<vpc_cni_rpc::ServeLimits, ConfigError> {
    let d = vpc_cni_rpc::ServeLimits::default();
    let at_least_one = |var: &str, default: u32| -> Result<u32, ConfigError> {
        let n = env.count(var, default)?;
        if n == 0 {
            return Err(invalid(var, "0", "must be 1 or above"));
        }
        Ok(n)
    };
    let conns = u32::try_from(d.max_connections).unwrap_or(u32::MAX);
    let message = u32::try_from(d.max_message_bytes).unwrap_or(u32::MAX);
    Ok(vpc_cni_rpc::ServeLimits {
        max_connections: at_least_one("VPC_CNI_GRPC_MAX_CONNECTIONS", conns)? as usize,
        max_concurrent_streams: at_least_one("VPC_CNI_GRPC_MAX_STREAMS", d.max_concurrent_streams)?,
        max_message_bytes: at_least_one("VPC_CNI_GRPC_MAX_MESSAGE_BYTES", message)? as usize,
        ..d
    })
}

/// Default checkpoint path.
pub const DEFAULT_BACKING_STORE: &str = "/var/run/aws-node/ipam.json";
/// Default gRPC socket.
pub const DEFAULT_GRPC_SOCKET: &str = "/var/run/aws-node/ipamd.sock";

struct Env<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Env<'_> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.lookup)(var)
    }

    /// A non-empty value, trimmed.
    fn get(&self, var: &str) -> Option<String> {
        self.raw(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn string(&self, var: &str, default: &str) -> String {
        self.get(var).unwrap_or_else(|| default.to_owned())
    }

    /// Go `strconv.ParseBool`. Reference: falls back to the default on a bad value.
    fn bool(&self, var: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => parse_bool(&v).ok_or_else(|| {
                invalid(
                    var,
                    &v,
                    "expected a boolean (1 t T TRUE true True 0 f F FALSE false False)",
                )
            }),
        }
    }

    fn int(&self, var: &str) -> Result<Option<i64>, ConfigError> {
        match self.get(var) {
            None => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| invalid(var, &v, "expected an integer")),
        }
    }

    /// A non-negative count. Reference: falls back to the default on bad or negative values.
    fn count(&self, var: &str, default: u32) -> Result<u32, ConfigError> {
        match self.int(var)? {
            None => Ok(default),
            Some(n) => u32::try_from(n)
                .map_err(|_| invalid(var, &n.to_string(), "must be a whole number 0 or above")),
        }
    }

    fn duration(&self, var: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(var) {
            None => Ok(default),
            Some(v) => {
                let d = parse_duration(&v).ok_or_else(|| {
                    invalid(
                        var,
                        &v,
                        "expected a duration: seconds, or a number with ms, s, m or h",
                    )
                })?;
                at_most_max_duration(var, &v, d)
            }
        }
    }

    /// Whole seconds, 0 or above (`IP_COOLDOWN_PERIOD`, `HTTP_TIMEOUT`), at most
    /// [`MAX_DURATION`].
    fn seconds(&self, var: &str, n: i64) -> Result<Duration, ConfigError> {
        let d = Duration::from_secs(n.unsigned_abs());
        at_most_max_duration(var, &n.to_string(), d)
    }
}

/// The longest duration a setting takes (365 days): a longer one is refused, so that no
/// deadline or timer computed from a setting can overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

fn at_most_max_duration(var: &str, value: &str, d: Duration) -> Result<Duration, ConfigError> {
    if d > MAX_DURATION {
        return Err(invalid(var, value, "must be at most 365 days"));
    }
    Ok(d)
}

impl Env<'_> {
    fn cidrs(&self, var: &str) -> Result<Vec<Ipv4Net>, ConfigError> {
        let Some(v) = self.get(var) else {
            return Ok(Vec::new());
        };
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<Ipv4Net>()
                    .map_err(|e| invalid(var, s, format!("not an IPv4 CIDR: {e}")))
            })
            .collect()
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `30` (seconds), `500ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

fn parse_u32_maybe_hex(v: &str) -> Option<u64> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Names of our own settings (documented in the README).
pub mod ours {
    /// The policy preset the switches below start from: `ours` (default) or `reference`
    /// (`Rules::REFERENCE`, the AWS VPC CNI's ipamd). A switch that is set overrides its preset
    /// value.
    pub const POLICY: &str = "VPC_CNI_POLICY";
    /// `Rules::exclude_cooling`.
    pub const EXCLUDE_COOLDOWN_IPS: &str = "VPC_CNI_EXCLUDE_COOLDOWN_IPS";
    /// `Rules::stable_shrink`.
    pub const STABLE_SHRINK: &str = "VPC_CNI_STABLE_SHRINK";
    /// `Rules::grow_past_minimum`.
    pub const GROW_PAST_MINIMUM: &str = "VPC_CNI_GROW_PAST_MINIMUM";
    /// `Rules::prefix_fallback`.
    pub const PREFIX_FALLBACK: &str = "VPC_CNI_PREFIX_FALLBACK";
    /// `Rules::immediate_top_up`.
    pub const IMMEDIATE_TOP_UP: &str = "VPC_CNI_IMMEDIATE_TOP_UP";
    /// Demand flavour (`VPC_CNI_POLICY=demand`): how far back requests are remembered.
    pub const DEMAND_WINDOW: &str = "VPC_CNI_DEMAND_WINDOW";
    /// Demand flavour: the time EC2 takes to grow the pool.
    pub const DEMAND_LEAD_TIME: &str = "VPC_CNI_DEMAND_LEAD_TIME";
    /// Demand flavour: how much of the recent rise in use a growth brings.
    pub const DEMAND_GROW_BATCH: &str = "VPC_CNI_DEMAND_GROW_BATCH";
    /// Demand flavour: how long addresses stay unused before they are released.
    pub const DEMAND_HOLD: &str = "VPC_CNI_DEMAND_HOLD";
    /// Demand flavour: warm addresses kept with no recent demand.
    pub const DEMAND_MIN_WARM: &str = "VPC_CNI_DEMAND_MIN_WARM";
    /// Demand flavour: the fewest addresses one release gives back.
    pub const DEMAND_MIN_RELEASE: &str = "VPC_CNI_DEMAND_MIN_RELEASE";
    /// Demand flavour: the fewest addresses one growth asks for.
    pub const DEMAND_MIN_GROW: &str = "VPC_CNI_DEMAND_MIN_GROW";
}

impl Config {
    /// Reads the process environment and `flags`.
    pub fn from_env(flags: &Flags) -> Result<Config, ConfigError> {
        Self::parse(&|k| std::env::var(k).ok(), flags)
    }

    /// Parses and validates: `lookup` answers environment variables.
    pub fn parse(
        lookup: &dyn Fn(&str) -> Option<String>,
        flags: &Flags,
    ) -> Result<Config, ConfigError> {
        let env = Env { lookup };
        let enable_ipv6 = env.bool("ENABLE_IPv6", false)?;
        // Reference: code default false and start-up fails unless one family is on; the
        // manifest always sets ENABLE_IPv4=true. We default to IPv4 when neither is set.
        let enable_ipv4 = env.bool("ENABLE_IPv4", !enable_ipv6)?;
        if enable_ipv4 == enable_ipv6 {
            return Err(ConfigError::Combination(
                "exactly one of ENABLE_IPv4 and ENABLE_IPv6 must be true (no dual stack)".into(),
            ));
        }
        let prefix_delegation = env.bool("ENABLE_PREFIX_DELEGATION", false)?;
        let warm_eni_target = env.count("WARM_ENI_TARGET", 1)?;
        let warm_ip_target = env.count("WARM_IP_TARGET", 0)?;
        let minimum_ip_target = env.count("MINIMUM_IP_TARGET", 0)?;
        let warm_prefix_target = env.count("WARM_PREFIX_TARGET", 0)?;
        let max_eni = match env.int("MAX_ENI")? {
            Some(n) if n >= 1 => Some(
                u32::try_from(n).map_err(|_| invalid("MAX_ENI", &n.to_string(), "too large"))?,
            ),
            _ => None,
        };
        let ip_cooldown = match env.int("IP_COOLDOWN_PERIOD")? {
            None => Duration::from_secs(30),
            Some(n) if n < 0 => {
                return Err(invalid(
                    "IP_COOLDOWN_PERIOD",
                    &n.to_string(),
                    "must be 0 or above",
                ))
            }
            Some(n) => env.seconds("IP_COOLDOWN_PERIOD", n)?,
        };
        let additional_eni_tags = match env.get("ADDITIONAL_ENI_TAGS") {
            None => BTreeMap::new(),
            Some(v) => {
                // Reference: invalid JSON is ignored.
                let map: BTreeMap<String, String> = serde_json::from_str(&v).map_err(|e| {
                    invalid(
                        "ADDITIONAL_ENI_TAGS",
                        &v,
                        format!("expected a JSON object of strings: {e}"),
                    )
                })?;
                map.into_iter()
                    .filter(|(k, _)| {
                        let keep = !k.contains("k8s.amazonaws.com");
                        if !keep {
                            tracing::warn!(key = %k, "ADDITIONAL_ENI_TAGS: reserved key dropped");
                        }
                        keep
                    })
                    .collect()
            }
        };
        let network_policy_mode = match env.get("NETWORK_POLICY_ENFORCING_MODE") {
            None => String::new(),
            Some(v) => {
                let l = v.to_ascii_lowercase();
                if !["none", "strict", "standard"].contains(&l.as_str()) {
                    return Err(invalid(
                        "NETWORK_POLICY_ENFORCING_MODE",
                        &v,
                        "expected none, strict or standard",
                    ));
                }
                l
            }
        };
        let http_timeout = match env.int("HTTP_TIMEOUT")? {
            None => Duration::from_secs(10),
            // Reference: values below 10 are ignored (10 is used).
            Some(n) if n < 10 => {
                return Err(invalid(
                    "HTTP_TIMEOUT",
                    &n.to_string(),
                    "must be at least 10 (seconds)",
                ))
            }
            Some(n) => env.seconds("HTTP_TIMEOUT", n)?,
        };
        let randomize_snat = match env.get("AWS_VPC_K8S_CNI_RANDOMIZESNAT").as_deref() {
            None | Some("prng") => RandomizeSnat::Prng,
            Some("hashrandom") => RandomizeSnat::HashRandom,
            Some("none") => RandomizeSnat::None,
            // Reference: an invalid value means prng.
            Some(v) => {
                return Err(invalid(
                    "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
                    v,
                    "expected prng, hashrandom or none",
                ))
            }
        };
        let connmark = match env.get("AWS_VPC_K8S_CNI_CONNMARK") {
            None => 0x80,
            Some(v) => match parse_u32_maybe_hex(&v) {
                Some(n) if n >= 1 && n <= u64::from(u32::MAX) => n as u32,
                _ => {
                    return Err(invalid(
                        "AWS_VPC_K8S_CNI_CONNMARK",
                        &v,
                        "expected a mark in 1..=0xffffffff (decimal or 0x hex)",
                    ))
                }
            },
        };
        // IPv6 needs at least the IPv6 minimum link MTU.
        let min_mtu = if enable_ipv6 { 1280 } else { 576 };
        let eni_mtu = match env.int("AWS_VPC_ENI_MTU")? {
            None => 9001,
            Some(n) if (min_mtu..=9001).contains(&n) => n as u32,
            Some(n) => {
                return Err(invalid(
                    "AWS_VPC_ENI_MTU",
                    &n.to_string(),
                    if enable_ipv6 {
                        "must be in 1280..=9001 with ENABLE_IPv6=true"
                    } else {
                        "must be in 576..=9001"
                    },
                ))
            }
        };
        let veth_prefix = env.string("AWS_VPC_K8S_CNI_VETHPREFIX", "eni");
        // The plugin's rule (cni/src/config.rs `veth_prefix`): ipamd finds pods' host veths by
        // this prefix, so both must accept the same values.
        if veth_prefix.len() > 4
            || ["eth", "lo", "vlan"].contains(&veth_prefix.as_str())
            || !veth_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "AWS_VPC_K8S_CNI_VETHPREFIX",
                &veth_prefix,
                "at most 4 characters among letters, digits, '_' and '-', and not eth, lo or vlan",
            ));
        }
        let enable_pod_eni = env.bool("ENABLE_POD_ENI", false)?;
        if enable_pod_eni && enable_ipv6 {
            return Err(ConfigError::Combination(
                "ENABLE_POD_ENI=true does not work with ENABLE_IPv6=true: security groups for pods are IPv4 only in this daemon".into(),
            ));
        }
        // Validated only when security groups for pods are on, as the reference.
        let pod_sg_mode = if enable_pod_eni {
            const VAR: &str = "POD_SECURITY_GROUP_ENFORCING_MODE";
            match env.get(VAR).map(|v| v.to_ascii_lowercase()).as_deref() {
                None | Some("strict") => PodSgMode::Strict,
                Some("standard") => PodSgMode::Standard,
                Some(_) => {
                    return Err(invalid(
                        VAR,
                        &env.string(VAR, ""),
                        "expected strict or standard",
                    ))
                }
            }
        } else {
            PodSgMode::Strict
        };
        let enable_multi_nic = env.bool("ENABLE_MULTI_NIC", false)?;
        if enable_multi_nic {
            return Err(ConfigError::Combination(
                "ENABLE_MULTI_NIC=true: network cards above 0 are not managed by this daemon yet"
                    .into(),
            ));
        }
        let imds_only = env.bool("ENABLE_IMDS_ONLY_MODE", false)?;
        let preset = match env
            .get(ours::POLICY)
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("ours") | Some("demand") => Rules::OURS,
            Some("reference") => Rules::REFERENCE,
            Some(_) => {
                return Err(invalid(
                    ours::POLICY,
                    &env.string(ours::POLICY, ""),
                    "expected ours, reference or demand",
                ))
            }
        };
        // The demand settings are read (and a malformed value refused) whatever the flavour,
        // so a typo shows before the flavour is switched on.
        let d = subnet_calc::policy::DemandSettings::default();
        let settings = subnet_calc::policy::DemandSettings {
            window: env.duration(ours::DEMAND_WINDOW, d.window)?,
            lead_time: env.duration(ours::DEMAND_LEAD_TIME, d.lead_time)?,
            grow_batch: env.duration(ours::DEMAND_GROW_BATCH, d.grow_batch)?,
            hold: env.duration(ours::DEMAND_HOLD, d.hold)?,
            min_warm: env.count(ours::DEMAND_MIN_WARM, d.min_warm)?,
            min_release: env.count(ours::DEMAND_MIN_RELEASE, d.min_release)?,
            min_grow: env.count(ours::DEMAND_MIN_GROW, d.min_grow)?,
            // An explicit WARM_ENI_TARGET is a floor like the IP targets.
            eni_target_is_floor: env.get("WARM_ENI_TARGET").is_some(),
        };
        if let Err((field, why)) = settings.validate() {
            if field == "window" && settings.window < settings.lead_time {
                // A relation between two settings: name both (either may be the one set).
                return Err(ConfigError::Combination(format!(
                    "{}={:?} must be at least {}={:?}",
                    ours::DEMAND_WINDOW,
                    env.string(
                        ours::DEMAND_WINDOW,
                        &format!("{}s", settings.window.as_secs())
                    ),
                    ours::DEMAND_LEAD_TIME,
                    env.string(
                        ours::DEMAND_LEAD_TIME,
                        &format!("{}s", settings.lead_time.as_secs())
                    ),
                )));
            }
            let var = match field {
                "window" => ours::DEMAND_WINDOW,
                "lead_time" => ours::DEMAND_LEAD_TIME,
                "hold" => ours::DEMAND_HOLD,
                "grow_batch" => ours::DEMAND_GROW_BATCH,
                _ => ours::POLICY,
            };
            return Err(invalid(var, &env.string(var, ""), why));
        }
        let demand = (env
            .get(ours::POLICY)
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
            == Some("demand"))
        .then_some(settings);
        let rules = Rules {
            exclude_cooling: env.bool(ours::EXCLUDE_COOLDOWN_IPS, preset.exclude_cooling)?,
            stable_shrink: env.bool(ours::STABLE_SHRINK, preset.stable_shrink)?,
            grow_past_minimum: env.bool(ours::GROW_PAST_MINIMUM, preset.grow_past_minimum)?,
            prefix_fallback: env.bool(ours::PREFIX_FALLBACK, preset.prefix_fallback)?,
            immediate_top_up: env.bool(ours::IMMEDIATE_TOP_UP, preset.immediate_top_up)?,
        };
        let pick = |flag: &Option<String>, var: &str| -> Option<String> {
            flag.clone()
                .filter(|s| !s.is_empty())
                .or_else(|| env.get(var))
        };
        let backend = match pick(&flags.backend, "IPAMD_BACKEND").as_deref() {
            None | Some("aws") => Backend::Aws,
            Some("sim") => Backend::Sim,
            Some(v) => return Err(invalid("IPAMD_BACKEND", v, "expected aws or sim")),
        };
        let sim_net = |var: &str, default: &str| -> Result<Ipv4Net, ConfigError> {
            let v = env.string(var, default);
            v.parse()
                .map_err(|e| invalid(var, &v, format!("not an IPv4 CIDR: {e}")))
        };
        let sim = SimSettings {
            instance_type: env.string("VPC_CNI_SIM_INSTANCE_TYPE", "m5.large"),
            vpc_cidr: sim_net("VPC_CNI_SIM_VPC_CIDR", "10.0.0.0/16")?,
            subnet_cidr: sim_net("VPC_CNI_SIM_SUBNET_CIDR", "10.0.0.0/20")?,
            ipv6: enable_ipv6,
        };
        let positive = |var: &str, default: u32| -> Result<u32, ConfigError> {
            let n = env.count(var, default)?;
            if n == 0 {
                return Err(invalid(var, "0", "must be above 0"));
            }
            Ok(n)
        };
        let ec2 = Ec2Pacing {
            mutating_per_sec: positive("VPC_CNI_EC2_MUTATING_RATE", 5)?,
            mutating_burst: positive("VPC_CNI_EC2_MUTATING_BURST", 20)?,
            describe_per_sec: positive("VPC_CNI_EC2_DESCRIBE_RATE", 20)?,
            describe_burst: positive("VPC_CNI_EC2_DESCRIBE_BURST", 20)?,
            max_attempts: positive("VPC_CNI_EC2_MAX_ATTEMPTS", 8)?,
            retry_base: env.duration("VPC_CNI_EC2_RETRY_BASE", Duration::from_millis(200))?,
        };
        let url = |v: Option<String>, var: &str| -> Result<Option<String>, ConfigError> {
            match v {
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    Err(invalid(var, &u, "expected an http:// or https:// URL"))
                }
                other => Ok(other),
            }
        };
        let pool_tick = env.duration("VPC_CNI_POOL_TICK", Duration::from_secs(5))?;
        if pool_tick.is_zero() {
            return Err(invalid("VPC_CNI_POOL_TICK", "0", "must be above 0"));
        }
        let cfg = Config {
            enable_ipv4,
            enable_ipv6,
            prefix_delegation,
            warm_eni_target,
            warm_ip_target,
            minimum_ip_target,
            warm_prefix_target,
            max_eni,
            ip_cooldown,
            custom_networking: env.bool("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", false)?,
            eni_config_annotation: env
                .string("ENI_CONFIG_ANNOTATION_DEF", "k8s.amazonaws.com/eniConfig"),
            eni_config_label: env.string("ENI_CONFIG_LABEL_DEF", "k8s.amazonaws.com/eniConfig"),
            subnet_discovery: env.bool("ENABLE_SUBNET_DISCOVERY", true)?,
            cluster_name: env.string("CLUSTER_NAME", ""),
            additional_eni_tags,
            manage_untagged_eni: env.bool("MANAGE_UNTAGGED_ENI", true)?,
            manage_enis_non_schedulable: env.bool("AWS_MANAGE_ENIS_NON_SCHEDULABLE", false)?,
            disable_provisioning: env.bool("DISABLE_NETWORK_RESOURCE_PROVISIONING", false)?
                || imds_only,
            disable_leaked_eni_cleanup: env.bool("DISABLE_LEAKED_ENI_CLEANUP", false)? || imds_only,
            imds_only,
            enable_pod_eni,
            pod_sg_mode,
            enable_multi_nic,
            annotate_pod_ip: env.bool("ANNOTATE_POD_IP", false)?,
            network_policy_mode,
            backing_store: PathBuf::from(
                pick(&flags.backing_store, "AWS_VPC_K8S_CNI_BACKING_STORE")
                    .unwrap_or_else(|| DEFAULT_BACKING_STORE.into()),
            ),
            node_name: env.string("MY_NODE_NAME", ""),
            pod_name: env.string("MY_POD_NAME", ""),
            introspection_bind: pick(
                &flags.introspection_bind_address,
                "INTROSPECTION_BIND_ADDRESS",
            )
            .unwrap_or_else(|| "127.0.0.1:61679".into()),
            disable_introspection: env.bool("DISABLE_INTROSPECTION", false)?,
            metrics_bind: pick(&flags.metrics_bind_address, "METRICS_BIND_ADDRESS")
                .unwrap_or_else(|| ":61678".into()),
            disable_metrics: env.bool("DISABLE_METRICS", false)?,
            log_level: env.string("AWS_VPC_K8S_CNI_LOGLEVEL", "DEBUG"),
            log_file: env.string(
                "AWS_VPC_K8S_CNI_LOG_FILE",
                "/host/var/log/aws-routed-eni/ipamd.log",
            ),
            vpc_cni_version: env.string("VPC_CNI_VERSION", ""),
            http_timeout,
            ec2_endpoint: url(
                pick(&flags.ec2_endpoint, "AWS_EC2_ENDPOINT"),
                "AWS_EC2_ENDPOINT",
            )?,
            imds_endpoint: url(
                pick(&flags.imds_endpoint, "AWS_EC2_METADATA_SERVICE_ENDPOINT"),
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            )?,
            cluster_endpoint: env.get("CLUSTER_ENDPOINT"),
            grpc_socket: PathBuf::from(
                pick(&flags.grpc_socket, "IPAMD_GRPC_SOCKET")
                    .unwrap_or_else(|| DEFAULT_GRPC_SOCKET.into()),
            ),
            external_snat: env.bool("AWS_VPC_K8S_CNI_EXTERNALSNAT", false)?,
            exclude_snat_cidrs: env.cidrs("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS")?,
            external_service_cidrs: env.cidrs("AWS_EXTERNAL_SERVICE_CIDRS")?,
            randomize_snat,
            node_port_support: env.bool("AWS_VPC_CNI_NODE_PORT_SUPPORT", true)?,
            connmark,
            eni_mtu,
            veth_prefix,
            enable_v6_egress: env.bool("ENABLE_V6_EGRESS", false)?,
            rules,
            demand,
            pool_tick,
            decrease_interval: env
                .duration("VPC_CNI_DECREASE_INTERVAL", Duration::from_secs(30))?,
            min_eni_age: env.duration("VPC_CNI_MIN_ENI_AGE", Duration::from_secs(60))?,
            insufficient_backoff: env.duration(
                "VPC_CNI_INSUFFICIENT_CAPACITY_BACKOFF",
                Duration::from_secs(120),
            )?,
            reconcile_interval: env
                .duration("VPC_CNI_RECONCILE_INTERVAL", Duration::from_secs(60))?,
            orphan_sweep: env.bool("VPC_CNI_ORPHAN_SWEEP", true)?,
            orphan_grace: {
                let d = env.duration("VPC_CNI_ORPHAN_GRACE", Duration::from_secs(300))?;
                if d.is_zero() {
                    return Err(invalid("VPC_CNI_ORPHAN_GRACE", "0", "must be above 0"));
                }
                d
            },
            ec2,
            host_networking: env.bool("VPC_CNI_HOST_NETWORKING", backend == Backend::Aws)?,
            eni_link_wait: env.duration("VPC_CNI_ENI_LINK_WAIT", Duration::from_secs(30))?,
            leaked_eni_first_delay: match env.get("VPC_CNI_LEAKED_ENI_DELAY") {
                None => None,
                Some(_) => Some(env.duration("VPC_CNI_LEAKED_ENI_DELAY", Duration::ZERO)?),
            },
            leaked_eni_interval: {
                let d = env.duration("VPC_CNI_LEAKED_ENI_INTERVAL", Duration::from_secs(3600))?;
                if d.is_zero() {
                    return Err(invalid(
                        "VPC_CNI_LEAKED_ENI_INTERVAL",
                        "0",
                        "must be above 0",
                    ));
                }
                d
            },
            backend,
            sim,
            grpc_limits: grpc_limits(&env)?,
        };
        if cfg.enable_ipv6 && !cfg.prefix_delegation {
            return Err(ConfigError::Combination(
                "ENABLE_IPv6=true needs ENABLE_PREFIX_DELEGATION=true (pods get addresses of a /80 prefix)".into(),
            ));
        }
        if cfg.enable_ipv6 && cfg.custom_networking {
            return Err(ConfigError::Combination(
                "ENABLE_IPv6=true does not work with AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true"
                    .into(),
            ));
        }
        // The reference entrypoint compares the three targets as strings; "all ≤ 0" refuses.
        // IPv6 mode keeps no warm pool (one /80 serves every pod): the targets do not apply.
        if cfg.prefix_delegation
            && !cfg.enable_ipv6
            && cfg.warm_ip_target == 0
            && cfg.minimum_ip_target == 0
            && cfg.warm_prefix_target == 0
        {
            return Err(ConfigError::Combination(
                "ENABLE_PREFIX_DELEGATION=true needs WARM_PREFIX_TARGET, WARM_IP_TARGET or MINIMUM_IP_TARGET above 0".into(),
            ));
        }
        Ok(cfg)
    }

    /// The pool policy settings, with `prefix_delegation` the effective mode.
    pub fn pool_config(&self, prefix_delegation: bool) -> PoolConfig {
        PoolConfig {
            rules: self.rules,
            prefix_delegation,
            warm_eni_target: self.warm_eni_target,
            warm_ip_target: self.warm_ip_target,
            minimum_ip_target: self.minimum_ip_target,
            warm_prefix_target: self.warm_prefix_target,
            custom_networking: self.custom_networking,
            timers: Timers {
                ip_cooldown: self.ip_cooldown,
                decrease_interval: self.decrease_interval,
                min_eni_age: self.min_eni_age,
                insufficient_capacity_backoff: self.insufficient_backoff,
                ..Timers::default()
            },
        }
    }

    /// Checkpoint path of network card `card` (`ipam.json`, `ipam-nic-1.json`, ...).
    pub fn checkpoint_path(&self, card: u32) -> PathBuf {
        checkpoint_path(&self.backing_store, card)
    }

    /// The ENI tags every managed ENI carries (create time adds `createdAt`).
    pub fn eni_tags(&self, instance_id: &str) -> BTreeMap<String, String> {
        let mut t = self.additional_eni_tags.clone();
        t.insert(crate::io::ec2::TAG_INSTANCE_ID.into(), instance_id.into());
        if !self.cluster_name.is_empty() {
            t.insert(
                crate::io::ec2::TAG_CLUSTER_NAME.into(),
                self.cluster_name.clone(),
            );
            t.insert("eks:eni:owner".into(), "amazon-vpc-cni".into());
        }
        t
    }

    /// The `/v1/ipamd-env-settings` introspection document.
    pub fn ipamd_env_settings(&self) -> serde_json::Value {
        serde_json::json!({
            "WARM_IP_TARGET": self.warm_ip_target,
            "WARM_ENI_TARGET": self.warm_eni_target,
            "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": self.custom_networking,
            "AWS_MANAGE_ENIS_NON_SCHEDULABLE": self.manage_enis_non_schedulable,
            "ENABLE_SUBNET_DISCOVERY": self.subnet_discovery,
        })
    }

    /// The `/v1/networkutils-env-settings` introspection document.
    pub fn networkutils_env_settings(&self) -> serde_json::Value {
        let join = |v: &[Ipv4Net]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        serde_json::json!({
            "AWS_VPC_K8S_CNI_CONNMARK": self.connmark,
            "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": join(&self.exclude_snat_cidrs),
            "AWS_VPC_K8S_CNI_EXTERNALSNAT": self.external_snat,
            "AWS_EXTERNAL_SERVICE_CIDRS": join(&self.external_service_cidrs),
            "AWS_VPC_ENI_MTU": self.eni_mtu,
            "AWS_VPC_K8S_CNI_VETHPREFIX": self.veth_prefix,
            "AWS_VPC_CNI_NODE_PORT_SUPPORT": self.node_port_support,
            "AWS_VPC_K8S_CNI_RANDOMIZESNAT": match self.randomize_snat {
                RandomizeSnat::Prng => "prng",
                RandomizeSnat::HashRandom => "hashrandom",
                RandomizeSnat::None => "none",
            },
        })
    }

    /// A configuration for tests: defaults plus `vars`.
    pub fn for_test(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Self::parse(&|k| map.get(k).cloned(), &Flags::default())
    }
}

/// Checkpoint path of network card `card`: the base path for card 0, `.json` replaced by
/// `-nic-N.json` above.
pub fn checkpoint_path(base: &std::path::Path, card: u32) -> PathBuf {
    if card == 0 {
        return base.to_path_buf();
    }
    let s = base.to_string_lossy();
    match s.strip_suffix(".json") {
        Some(stem) => PathBuf::from(format!("{stem}-nic-{card}.json")),
        None => PathBuf::from(format!("{s}-nic-{card}.json")),
    }
}

/// The gateway of an IPv4 subnet (its base address + 1).
pub fn subnet_gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_var(vars: &[(&str, &str)]) -> String {
        match Config::for_test(vars) {
            Err(ConfigError::Invalid { var, .. }) => var,
            Err(ConfigError::Combination(m)) => format!("combination: {m}"),
            Ok(_) => "ok".into(),
        }
    }

    #[test]
    fn defaults_match_the_reference() {
        let c = Config::for_test(&[]).unwrap();
        assert!(c.enable_ipv4 && !c.enable_ipv6 && !c.prefix_delegation);
        assert_eq!(
            (
                c.warm_eni_target,
                c.warm_ip_target,
                c.minimum_ip_target,
                c.warm_prefix_target
            ),
            (1, 0, 0, 0)
        );
        assert_eq!(c.max_eni, None);
        assert_eq!(c.ip_cooldown, Duration::from_secs(30));
        assert_eq!(
            c.backing_store,
            PathBuf::from("/var/run/aws-node/ipam.json")
        );
        assert_eq!(c.grpc_socket, PathBuf::from("/var/run/aws-node/ipamd.sock"));
        assert_eq!(c.metrics_bind, ":61678");
        assert_eq!(c.introspection_bind, "127.0.0.1:61679");
        assert_eq!(c.eni_config_label, "k8s.amazonaws.com/eniConfig");
        assert_eq!(c.eni_config_annotation, "k8s.amazonaws.com/eniConfig");
        assert!(c.subnet_discovery && c.manage_untagged_eni && c.node_port_support);
        assert!(!c.external_snat && !c.custom_networking && !c.annotate_pod_ip);
        assert_eq!(
            (c.connmark, c.eni_mtu, c.veth_prefix.as_str()),
            (0x80, 9001, "eni")
        );
        assert_eq!(c.randomize_snat, RandomizeSnat::Prng);
        assert_eq!(c.http_timeout, Duration::from_secs(10));
        assert_eq!(c.network_policy_mode, "");
        assert_eq!(c.rules, Rules::OURS);
        assert_eq!(c.pool_tick, Duration::from_secs(5));
        assert_eq!(c.backend, Backend::Aws);
        assert_eq!(c.ec2_endpoint, None);
    }

    #[test]
    fn bad_values_are_rejected_naming_the_variable() {
        let table: &[(&[(&str, &str)], &str)] = &[
            (&[("WARM_ENI_TARGET", "-1")], "WARM_ENI_TARGET"),
            (&[("WARM_ENI_TARGET", "x")], "WARM_ENI_TARGET"),
            (&[("WARM_IP_TARGET", "-3")], "WARM_IP_TARGET"),
            (&[("MINIMUM_IP_TARGET", "1.5")], "MINIMUM_IP_TARGET"),
            (&[("WARM_PREFIX_TARGET", "two")], "WARM_PREFIX_TARGET"),
            (&[("MAX_ENI", "lots")], "MAX_ENI"),
            (&[("IP_COOLDOWN_PERIOD", "-1")], "IP_COOLDOWN_PERIOD"),
            (&[("IP_COOLDOWN_PERIOD", "abc")], "IP_COOLDOWN_PERIOD"),
            (
                &[("ENABLE_PREFIX_DELEGATION", "yes")],
                "ENABLE_PREFIX_DELEGATION",
            ),
            (&[("ADDITIONAL_ENI_TAGS", "{bad")], "ADDITIONAL_ENI_TAGS"),
            (
                &[("NETWORK_POLICY_ENFORCING_MODE", "loose")],
                "NETWORK_POLICY_ENFORCING_MODE",
            ),
            (&[("HTTP_TIMEOUT", "5")], "HTTP_TIMEOUT"),
            (
                &[("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "always")],
                "AWS_VPC_K8S_CNI_RANDOMIZESNAT",
            ),
            (
                &[("AWS_VPC_K8S_CNI_CONNMARK", "0")],
                "AWS_VPC_K8S_CNI_CONNMARK",
            ),
            (&[("AWS_VPC_ENI_MTU", "575")], "AWS_VPC_ENI_MTU"),
            (&[("AWS_VPC_ENI_MTU", "9002")], "AWS_VPC_ENI_MTU"),
            (
                &[("AWS_VPC_K8S_CNI_VETHPREFIX", "veths")],
                "AWS_VPC_K8S_CNI_VETHPREFIX",
            ),
            (
                &[("AWS_VPC_K8S_CNI_VETHPREFIX", "eth")],
                "AWS_VPC_K8S_CNI_VETHPREFIX",
            ),
            (
                &[("AWS_VPC_K8S_CNI_VETHPREFIX", "e.n")],
                "AWS_VPC_K8S_CNI_VETHPREFIX",
            ),
            (
                &[("AWS_VPC_K8S_CNI_VETHPREFIX", "é")],
                "AWS_VPC_K8S_CNI_VETHPREFIX",
            ),
            (
                &[("AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS", "10.0.0.0/8,nope")],
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
            ),
            (
                &[("AWS_EXTERNAL_SERVICE_CIDRS", "1.2.3.4/33")],
                "AWS_EXTERNAL_SERVICE_CIDRS",
            ),
            (
                &[("AWS_EC2_ENDPOINT", "localhost:4566")],
                "AWS_EC2_ENDPOINT",
            ),
            (&[("IPAMD_BACKEND", "gcp")], "IPAMD_BACKEND"),
            (
                &[("VPC_CNI_EXCLUDE_COOLDOWN_IPS", "maybe")],
                "VPC_CNI_EXCLUDE_COOLDOWN_IPS",
            ),
            (&[("VPC_CNI_POOL_TICK", "5 sec")], "VPC_CNI_POOL_TICK"),
            (
                &[("VPC_CNI_EC2_MUTATING_RATE", "0")],
                "VPC_CNI_EC2_MUTATING_RATE",
            ),
        ];
        for (vars, var) in table {
            assert_eq!(err_var(vars), *var, "for {vars:?}");
            let msg = Config::for_test(vars).unwrap_err().to_string();
            assert!(msg.contains(var), "message {msg:?} names {var}");
        }
    }

    #[test]
    fn ipv6_mode_needs_prefix_delegation_and_names_both_variables() {
        let msg = Config::for_test(&[("ENABLE_IPv6", "true")])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("ENABLE_IPv6") && msg.contains("ENABLE_PREFIX_DELEGATION"),
            "{msg}"
        );
        let c = Config::for_test(&[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ])
        .expect("IPv6 with prefix delegation");
        assert!(c.enable_ipv6 && !c.enable_ipv4 && c.prefix_delegation);
        let msg = Config::for_test(&[
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
            ("AWS_VPC_ENI_MTU", "1000"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("AWS_VPC_ENI_MTU") && msg.contains("1280"),
            "{msg}"
        );
    }

    #[test]
    fn pod_eni_is_accepted_in_ipv4_with_a_validated_enforcing_mode() {
        let c = Config::for_test(&[("ENABLE_POD_ENI", "true")]).expect("SGP in IPv4");
        assert!(c.enable_pod_eni);
        assert_eq!(c.pod_sg_mode, PodSgMode::Strict, "strict by default");
        let c = Config::for_test(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "Standard"),
        ])
        .expect("standard");
        assert_eq!(c.pod_sg_mode, PodSgMode::Standard);
        let msg = Config::for_test(&[
            ("ENABLE_POD_ENI", "true"),
            ("POD_SECURITY_GROUP_ENFORCING_MODE", "loose"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("POD_SECURITY_GROUP_ENFORCING_MODE") && msg.contains("loose"),
            "{msg}"
        );
        // Without ENABLE_POD_ENI the mode is not read at all (as the reference).
        let c = Config::for_test(&[("POD_SECURITY_GROUP_ENFORCING_MODE", "loose")])
            .expect("mode ignored without SGP");
        assert!(!c.enable_pod_eni);
        // IPv6 is refused, naming both variables.
        let msg = Config::for_test(&[
            ("ENABLE_POD_ENI", "true"),
            ("ENABLE_IPv6", "true"),
            ("ENABLE_PREFIX_DELEGATION", "true"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("ENABLE_POD_ENI") && msg.contains("ENABLE_IPv6"),
            "{msg}"
        );
    }

    #[test]
    fn combinations_are_refused() {
        for vars in [
            &[("ENABLE_IPv4", "false")][..],
            &[("ENABLE_IPv4", "true"), ("ENABLE_IPv6", "true")],
            &[("ENABLE_IPv6", "true")],
            &[
                ("ENABLE_IPv6", "true"),
                ("ENABLE_PREFIX_DELEGATION", "true"),
                ("AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG", "true"),
            ],
            &[
                ("ENABLE_POD_ENI", "true"),
                ("ENABLE_IPv6", "true"),
                ("ENABLE_PREFIX_DELEGATION", "true"),
            ],
            &[("ENABLE_MULTI_NIC", "true")],
            &[("ENABLE_PREFIX_DELEGATION", "true")],
        ] {
            assert!(err_var(vars).starts_with("combination"), "{vars:?}");
        }
    }

    #[test]
    fn values_parse_as_the_reference_does() {
        let c = Config::for_test(&[
            ("ENABLE_PREFIX_DELEGATION", "T"),
            ("WARM_PREFIX_TARGET", "1"),
            ("WARM_IP_TARGET", " 5 "),
            ("MAX_ENI", "-1"),
            ("IP_COOLDOWN_PERIOD", "0"),
            (
                "ADDITIONAL_ENI_TAGS",
                r#"{"team":"a","node.k8s.amazonaws.com/x":"y"}"#,
            ),
            ("NETWORK_POLICY_ENFORCING_MODE", "Strict"),
            ("AWS_VPC_K8S_CNI_CONNMARK", "0x4000"),
            (
                "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
                "10.1.0.0/16, 192.168.0.0/24",
            ),
            ("AWS_VPC_K8S_CNI_RANDOMIZESNAT", "none"),
            ("ENABLE_IMDS_ONLY_MODE", "1"),
            ("CLUSTER_NAME", "c1"),
        ])
        .unwrap();
        assert!(c.prefix_delegation);
        assert_eq!(c.warm_ip_target, 5);
        assert_eq!(c.max_eni, None);
        assert_eq!(c.ip_cooldown, Duration::ZERO);
        assert_eq!(c.additional_eni_tags.len(), 1);
        assert_eq!(c.network_policy_mode, "strict");
        assert_eq!(c.connmark, 0x4000);
        assert_eq!(c.exclude_snat_cidrs.len(), 2);
        assert_eq!(c.randomize_snat, RandomizeSnat::None);
        assert!(c.disable_provisioning && c.disable_leaked_eni_cleanup);
        let tags = c.eni_tags("i-1");
        assert_eq!(
            tags.get("node.k8s.amazonaws.com/instance_id")
                .map(String::as_str),
            Some("i-1")
        );
        assert_eq!(
            tags.get("cluster.k8s.amazonaws.com/name")
                .map(String::as_str),
            Some("c1")
        );
        assert_eq!(
            tags.get("eks:eni:owner").map(String::as_str),
            Some("amazon-vpc-cni")
        );
        assert_eq!(
            Config::for_test(&[("MAX_ENI", "2")]).unwrap().max_eni,
            Some(2)
        );
    }

    #[test]
    fn each_improvement_is_its_own_switch() {
        for var in [
            ours::EXCLUDE_COOLDOWN_IPS,
            ours::STABLE_SHRINK,
            ours::GROW_PAST_MINIMUM,
            ours::PREFIX_FALLBACK,
            ours::IMMEDIATE_TOP_UP,
        ] {
            let r = Config::for_test(&[(var, "false")]).unwrap().rules;
            let off = [
                r.exclude_cooling,
                r.stable_shrink,
                r.grow_past_minimum,
                r.prefix_fallback,
                r.immediate_top_up,
            ]
            .iter()
            .filter(|b| !**b)
            .count();
            assert_eq!(off, 1, "{var} turns exactly one rule off");
        }
    }

    #[test]
    fn the_policy_preset_selects_reference_or_ours_and_switches_override_it() {
        let rules = |vars: &[(&str, &str)]| Config::for_test(vars).unwrap().rules;
        assert_eq!(rules(&[]), Rules::OURS);
        assert_eq!(rules(&[(ours::POLICY, "ours")]), Rules::OURS);
        assert_eq!(rules(&[(ours::POLICY, "reference")]), Rules::REFERENCE);
        assert_eq!(rules(&[(ours::POLICY, " Reference ")]), Rules::REFERENCE);
        let mixed = rules(&[
            (ours::POLICY, "reference"),
            (ours::IMMEDIATE_TOP_UP, "true"),
        ]);
        assert_eq!(
            mixed,
            Rules {
                immediate_top_up: true,
                ..Rules::REFERENCE
            }
        );
        assert_eq!(err_var(&[(ours::POLICY, "fast")]), ours::POLICY);
    }

    #[test]
    fn flags_beat_variables() {
        let vars: BTreeMap<String, String> = [
            ("IPAMD_GRPC_SOCKET", "/env.sock"),
            ("AWS_VPC_K8S_CNI_BACKING_STORE", "/env/ipam.json"),
            ("METRICS_BIND_ADDRESS", "127.0.0.1:1"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let flags = Flags {
            grpc_socket: Some("/flag.sock".into()),
            backend: Some("sim".into()),
            ..Default::default()
        };
        let c = Config::parse(&|k| vars.get(k).cloned(), &flags).unwrap();
        assert_eq!(c.grpc_socket, PathBuf::from("/flag.sock"));
        assert_eq!(c.backing_store, PathBuf::from("/env/ipam.json"));
        assert_eq!(c.metrics_bind, "127.0.0.1:1");
        assert_eq!(c.backend, Backend::Sim);
    }

    #[test]
    fn checkpoint_paths_per_card() {
        let base = std::path::Path::new("/var/run/aws-node/ipam.json");
        assert_eq!(checkpoint_path(base, 0), base);
        assert_eq!(
            checkpoint_path(base, 1),
            PathBuf::from("/var/run/aws-node/ipam-nic-1.json")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("1d"), None);
    }
}

#[cfg(test)]
mod demand_tests {
    use super::*;

    #[test]
    fn the_demand_flavour_takes_its_settings_and_names_a_bad_one() {
        let c = Config::for_test(&[
            (ours::POLICY, "demand"),
            (ours::DEMAND_HOLD, "15m"),
            (ours::DEMAND_MIN_WARM, "3"),
        ])
        .unwrap();
        let d = c.demand.expect("demand settings");
        assert_eq!(d.hold, Duration::from_secs(900));
        assert_eq!(d.min_warm, 3);
        assert!(!d.eni_target_is_floor);
        assert_eq!(c.rules, Rules::OURS);
        let c = Config::for_test(&[(ours::POLICY, "Demand"), ("WARM_ENI_TARGET", "1")]).unwrap();
        assert!(c.demand.expect("demand").eni_target_is_floor);
        assert!(Config::for_test(&[]).unwrap().demand.is_none());
        let e = Config::for_test(&[(ours::POLICY, "demand"), (ours::DEMAND_WINDOW, "30s")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(ours::DEMAND_WINDOW), "{e}");
        let e = Config::for_test(&[(ours::POLICY, "demand"), (ours::DEMAND_MIN_GROW, "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains(ours::DEMAND_MIN_GROW), "{e}");
    }
}
