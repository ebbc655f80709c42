//! EC2 pacing: a `governor` rate limiter per call class (mutating and describe), retries with
//! exponential backoff and jitter on throttling, 5xx and transport errors, and counts per
//! action. Every EC2 call of the daemon goes through one [`Pacer`].

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Ec2Pacing;
use crate::io::ec2::{Ec2Error, Ec2Result};

/// How an EC2 call ended, for the metrics' `record_ec2_call`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ec2Outcome<'a> {
    /// The call succeeded.
    Ok,
    /// EC2 throttled the call (`RequestLimitExceeded` and friends); `code` is the AWS error code.
    Throttled {
        /// AWS error code, e.g. `RequestLimitExceeded`.
        code: &'a str,
    },
    /// The call failed for another reason; `code` is the AWS error code (or a short class such
    /// as `Timeout` when there is none).
    Failed {
        /// AWS error code, e.g. `InsufficientFreeAddressesInSubnet`.
        code: &'a str,
    },
}

/// governor's clock over tokio's (so paused-clock tests drive the rate limiters too): time
/// since the pacer was made.
#[derive(Debug, Clone, Copy)]
pub struct TokioRateClock {
    start: Instant,
}

impl TokioRateClock {
    /// Starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for TokioRateClock {
    fn default() -> Self {
        Self::new()
    }
}

impl governor::clock::Clock for TokioRateClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Limiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    TokioRateClock,
    governor::middleware::NoOpMiddleware<Duration>,
>;

fn limiter(per_sec: u32, burst: u32, clock: TokioRateClock) -> Limiter {
    let one = std::num::NonZeroU32::MIN;
    let rate = std::num::NonZeroU32::new(per_sec).unwrap_or(one);
    let burst = std::num::NonZeroU32::new(burst).unwrap_or(one);
    governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(rate).allow_burst(burst),
        clock,
    )
}

/// EC2 call counts of one action.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ec2CallStats {
    /// Calls made (each attempt counts).
    pub calls: u64,
    /// Attempts that were retried.
    pub retries: u64,
    /// Attempts EC2 throttled.
    pub throttles: u64,
    /// Attempts that failed (throttles included).
    pub errors: u64,
    /// Calls that failed for good.
    pub failures: u64,
}

/// Told about every EC2 attempt: action, latency, outcome (the daemon passes
/// `Metrics::record_ec2_call`).
pub type Ec2Observer = Arc<dyn Fn(&'static str, Duration, Ec2Outcome<'_>) + Send + Sync>;

/// EC2 pacing (a `governor` rate limiter per call class: mutating and describe) and retries,
/// counted per action.
pub struct Pacer {
    cfg: Ec2Pacing,
    clock: TokioRateClock,
    mutating: Limiter,
    describe: Limiter,
    seed: Mutex<u64>,
    counts: Mutex<BTreeMap<&'static str, Ec2CallStats>>,
    observer: Mutex<Option<Ec2Observer>>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacer")
            .field("cfg", &self.cfg)
            .field("counts", &*lock(&self.counts))
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Pacer {
    /// Pacing per `cfg`.
    pub fn new(cfg: Ec2Pacing) -> Self {
        let clock = TokioRateClock::new();
        Self {
            cfg,
            clock,
            mutating: limiter(cfg.mutating_per_sec, cfg.mutating_burst, clock),
            describe: limiter(cfg.describe_per_sec, cfg.describe_burst, clock),
            seed: Mutex::new(0x9e37_79b9_7f4a_7c15),
            counts: Mutex::new(BTreeMap::new()),
            observer: Mutex::new(None),
        }
    }

    /// Sets the observer told about every attempt (metrics).
    pub fn set_observer(&self, observer: Ec2Observer) {
        *lock(&self.observer) = Some(observer);
    }

    /// Counts per action so far.
    pub fn stats(&self) -> BTreeMap<&'static str, Ec2CallStats> {
        lock(&self.counts).clone()
    }

    fn jitter(&self) -> f64 {
        let mut s = lock(&self.seed);
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s % 1000) as f64 / 1000.0
    }

    /// The delay before retry `attempt` (1-based): base × 2^(attempt-1), capped at 20 s, plus
    /// up to 30 % jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.cfg.retry_base.as_secs_f64() * 2f64.powi(attempt.min(16) as i32 - 1);
        let d = base.min(20.0);
        Duration::from_secs_f64(d * (1.0 + 0.3 * self.jitter()))
    }

    /// Waits for the rate limiter of `action`'s class.
    async fn pace(&self, action: &str) {
        let l = if crate::io::ec2::is_mutating(action) {
            &self.mutating
        } else {
            &self.describe
        };
        loop {
            match l.check() {
                Ok(()) => return,
                Err(not_until) => {
                    use governor::clock::Clock as _;
                    let wait = not_until.wait_time_from(self.clock.now());
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    fn observe(&self, action: &'static str, elapsed: Duration, res: Result<(), &Ec2Error>) {
        let obs = lock(&self.observer).clone();
        let mut counts = lock(&self.counts);
        let c = counts.entry(action).or_default();
        c.calls += 1;
        let outcome = match res {
            Ok(()) => Ec2Outcome::Ok,
            Err(e) => {
                c.errors += 1;
                if e.kind == crate::io::ec2::ErrorKind::Throttled {
                    c.throttles += 1;
                    Ec2Outcome::Throttled { code: &e.code }
                } else {
                    Ec2Outcome::Failed { code: &e.code }
                }
            }
        };
        drop(counts);
        if let Some(o) = obs {
            o(action, elapsed, outcome);
        }
    }

    /// Runs one EC2 call with pacing and retries.
    pub async fn call<T, F, Fut>(&self, action: &'static str, f: F) -> Ec2Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Ec2Result<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.pace(action).await;
            let t0 = Instant::now();
            let res = f().await;
            self.observe(action, t0.elapsed(), res.as_ref().map(|_| ()));
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() && attempt < self.cfg.max_attempts => {
                    lock(&self.counts).entry(action).or_default().retries += 1;
                    tracing::debug!(action, attempt, code = %e.code, "EC2 call retried");
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(e) => {
                    lock(&self.counts).entry(action).or_default().failures += 1;
                    return Err(e);
                }
            }
        }
    }
}
