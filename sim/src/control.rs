//! Throttling (per-action token buckets), fault injection and the latency model. Pure: each
//! decision takes the time and a seeded generator.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::is_mutating;
use crate::rng::SimRng;

/// Size and refill rate of one action's token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BucketSpec {
    /// Maximum tokens (burst).
    pub capacity: f64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

/// The bucket AWS publishes for an action's category: `RunInstances` 1000 / 2 per s,
/// `TerminateInstances` 1000 / 20 per s, other mutating actions 200 / 5 per s, non-mutating
/// (`Describe*`) 100 / 20 per s.
pub fn aws_bucket(action: &str) -> BucketSpec {
    let (capacity, refill_per_sec) = match action {
        "RunInstances" => (1000.0, 2.0),
        "TerminateInstances" => (1000.0, 20.0),
        a if is_mutating(a) => (200.0, 5.0),
        _ => (100.0, 20.0),
    };
    BucketSpec {
        capacity,
        refill_per_sec,
    }
}

/// Throttling settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThrottleConfig {
    /// Throttle at all? Off by default so tests and benchmarks are not throttled.
    #[serde(default)]
    pub enabled: bool,
    /// Per-action buckets replacing [`aws_bucket`].
    #[serde(default)]
    pub buckets: BTreeMap<String, BucketSpec>,
}

#[derive(Debug, Clone, Serialize)]
struct Bucket {
    spec: BucketSpec,
    tokens: f64,
    last_ms: u64,
}

/// Per-action token buckets (one account, one region).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Throttle {
    /// Settings.
    pub config: ThrottleConfig,
    buckets: BTreeMap<String, Bucket>,
}

impl Throttle {
    /// Buckets per `config`, all full.
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            buckets: BTreeMap::new(),
        }
    }

    /// Takes a token for `action` at `now_ms`; false when the bucket is empty
    /// (`RequestLimitExceeded`).
    pub fn admit(&mut self, action: &str, now_ms: u64) -> bool {
        if !self.config.enabled {
            return true;
        }
        let spec = self
            .config
            .buckets
            .get(action)
            .copied()
            .unwrap_or_else(|| aws_bucket(action));
        let b = self.buckets.entry(action.to_owned()).or_insert(Bucket {
            spec,
            tokens: spec.capacity,
            last_ms: now_ms,
        });
        b.spec = spec;
        let dt = now_ms.saturating_sub(b.last_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + dt * spec.refill_per_sec).min(spec.capacity);
        b.last_ms = b.last_ms.max(now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Faults injected into one action (or all, under the key `*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    /// Probability of an error answer with `error_code` (default `InternalError`, HTTP 500).
    #[serde(default)]
    pub error_rate: f64,
    /// Code of injected errors (its HTTP status follows EC2: 503 for `RequestLimitExceeded`
    /// and `Unavailable`, 500 for `InternalError`, otherwise 400).
    #[serde(default)]
    pub error_code: Option<String>,
    /// Probability of HTTP 503 `Unavailable`.
    #[serde(default)]
    pub unavailable_rate: f64,
    /// Probability that the request is held `timeout_ms` and the connection then closed
    /// without an answer, with no state change.
    #[serde(default)]
    pub timeout_rate: f64,
    /// Probability that the call takes effect but its answer is lost (connection closed after
    /// `timeout_ms`): the case that leaks ENIs when a client does not use client tokens.
    #[serde(default)]
    pub lost_response_rate: f64,
    /// How long a timed-out request is held (default 30 s).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// What fault injection decided for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultDecision {
    /// Proceed normally.
    None,
    /// Answer with this error code and do nothing.
    Error(String),
    /// Hold for this long, then close the connection, doing nothing.
    Timeout(u64),
    /// Do the call, then hold for this long and close the connection.
    LoseResponse(u64),
}

/// Draws the fault for `action` from `faults` (`action` entry, else `*`).
pub fn draw_fault(
    faults: &BTreeMap<String, FaultSpec>,
    action: &str,
    rng: &mut SimRng,
) -> FaultDecision {
    let Some(f) = faults.get(action).or_else(|| faults.get("*")) else {
        return FaultDecision::None;
    };
    let timeout = f.timeout_ms.unwrap_or(30_000);
    let u = rng.unit();
    let mut edge = f.error_rate;
    if u < edge {
        return FaultDecision::Error(
            f.error_code
                .clone()
                .unwrap_or_else(|| "InternalError".into()),
        );
    }
    edge += f.unavailable_rate;
    if u < edge {
        return FaultDecision::Error("Unavailable".into());
    }
    edge += f.timeout_rate;
    if u < edge {
        return FaultDecision::Timeout(timeout);
    }
    edge += f.lost_response_rate;
    if u < edge {
        return FaultDecision::LoseResponse(timeout);
    }
    FaultDecision::None
}

/// Latency of one action: `base_ms` plus an exponential tail of mean `jitter_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencySpec {
    /// Fixed part.
    pub base_ms: f64,
    /// Mean of the random part.
    pub jitter_ms: f64,
}

/// The latency model: none (unit tests) or per action.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Per-action latency.
    #[serde(default)]
    pub actions: BTreeMap<String, LatencySpec>,
    /// Latency of actions not listed.
    #[serde(default)]
    pub default: Option<LatencySpec>,
}

impl LatencyModel {
    /// No added latency.
    pub fn none() -> Self {
        Self::default()
    }

    /// Latencies in the range observed for EC2 from inside a region: describes tens of ms,
    /// address assignment and ENI creation a few hundred, attach about a second.
    pub fn realistic() -> Self {
        let s = |base_ms, jitter_ms| LatencySpec { base_ms, jitter_ms };
        let mut actions = BTreeMap::new();
        for a in [
            "DescribeInstances",
            "DescribeNetworkInterfaces",
            "DescribeSubnets",
            "DescribeInstanceTypes",
        ] {
            actions.insert(a.to_owned(), s(40.0, 30.0));
        }
        for a in [
            "AssignPrivateIpAddresses",
            "UnassignPrivateIpAddresses",
            "AssignIpv6Addresses",
            "UnassignIpv6Addresses",
        ] {
            actions.insert(a.to_owned(), s(150.0, 100.0));
        }
        actions.insert("CreateNetworkInterface".into(), s(300.0, 150.0));
        actions.insert("AttachNetworkInterface".into(), s(700.0, 400.0));
        actions.insert("DetachNetworkInterface".into(), s(400.0, 200.0));
        actions.insert("DeleteNetworkInterface".into(), s(250.0, 100.0));
        actions.insert("RunInstances".into(), s(1500.0, 500.0));
        Self {
            actions,
            default: Some(s(100.0, 50.0)),
        }
    }

    /// A latency sample for `action` in milliseconds.
    pub fn sample(&self, action: &str, rng: &mut SimRng) -> u64 {
        let Some(s) = self.actions.get(action).or(self.default.as_ref()) else {
            return 0;
        };
        let tail = -s.jitter_ms * (1.0 - rng.unit()).ln();
        (s.base_ms + tail).max(0.0).round() as u64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refills_at_its_rate() {
        let mut t = Throttle::new(ThrottleConfig {
            enabled: true,
            buckets: BTreeMap::new(),
        });
        let ok = (0..150).filter(|_| t.admit("DescribeSubnets", 0)).count();
        assert_eq!(ok, 100);
        assert!(!t.admit("DescribeSubnets", 0));
        // Another action has its own bucket.
        assert!(t.admit("DescribeInstances", 0));
        // 20 tokens per second: after 1 s, 20 more.
        let ok = (0..50).filter(|_| t.admit("DescribeSubnets", 1000)).count();
        assert_eq!(ok, 20);
    }

    #[test]
    fn disabled_throttle_admits_everything() {
        let mut t = Throttle::default();
        assert!((0..10_000).all(|_| t.admit("AssignPrivateIpAddresses", 0)));
    }

    #[test]
    fn fault_rates_are_honoured_and_reproducible() {
        let mut f = BTreeMap::new();
        f.insert(
            "*".to_owned(),
            FaultSpec {
                error_rate: 0.25,
                timeout_rate: 0.25,
                ..Default::default()
            },
        );
        let run = |seed| {
            let mut r = SimRng::new(seed);
            (0..4000)
                .map(|_| draw_fault(&f, "AssignPrivateIpAddresses", &mut r))
                .collect::<Vec<_>>()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        let errors = a
            .iter()
            .filter(|d| matches!(d, FaultDecision::Error(c) if c == "InternalError"))
            .count();
        let timeouts = a
            .iter()
            .filter(|d| matches!(d, FaultDecision::Timeout(30_000)))
            .count();
        assert!((800..1200).contains(&errors), "{errors}");
        assert!((800..1200).contains(&timeouts), "{timeouts}");
    }

    #[test]
    fn latency_none_is_zero_and_realistic_is_ordered() {
        let mut r = SimRng::new(1);
        assert_eq!(
            LatencyModel::none().sample("AttachNetworkInterface", &mut r),
            0
        );
        let m = LatencyModel::realistic();
        let mean = |a: &str, r: &mut SimRng| (0..500).map(|_| m.sample(a, r)).sum::<u64>() / 500;
        assert!(mean("DescribeNetworkInterfaces", &mut r) < mean("AttachNetworkInterface", &mut r));
    }
}
