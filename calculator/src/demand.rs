//! Demand-driven sizing of the warm pool ([`crate::policy::Flavour::Demand`]).
//!
//! Instead of a fixed number of warm addresses (a whole ENI by default), the pool keeps what the
//! node's own recent demand says it needs while EC2 grows the pool:
//!
//! - **low level**: the most pod-address requests seen within one [`DemandSettings::lead_time`]
//!   (the time EC2 takes to grow the pool) over the last [`DemandSettings::window`], at least
//!   [`DemandSettings::min_warm`]; the user's explicit `WARM_IP_TARGET`, `WARM_PREFIX_TARGET` and
//!   (when set) `WARM_ENI_TARGET` raise it, `MINIMUM_IP_TARGET` bounds the total from below;
//! - **grow**: below the low level, one EC2 call brings the pool to the low level plus a
//!   *step*, the requests expected over [`DemandSettings::grow_batch`] at the recent rate (so one
//!   call serves several arrivals: hysteresis between growing and shrinking);
//! - **shrink**: only what stays above the most addresses in use (assigned or cooling) over the
//!   last [`DemandSettings::hold`], plus the grow level, is surplus; it is released in one batch,
//!   and only when it is at least one step (or a whole empty ENI can be freed instead).
//!
//! The history is a [`DemandState`]: a plain serde value the daemon keeps between decisions,
//! writes next to its checkpoint, and restores or rebuilds after a restart
//! ([`DemandState::restore`], [`DemandState::rebuild`]). A state younger than `hold` never
//! releases (it cannot know the recent peak), and a rebuilt state counts the running pods'
//! recent assignments as demand, so a restart resets neither into waste nor into waiting.
//!
//! Time is the caller's clock in whole seconds (`now.as_secs()`); ipamd's clock is Unix time,
//! so a saved state stays valid across restarts.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Width of one history bucket, seconds.
pub const BUCKET_SECONDS: u64 = 60;

/// Settings of the demand-driven flavour (ipamd: `VPC_CNI_DEMAND_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemandSettings {
    /// How far back demand (requests and bursts) is remembered (default 30 min).
    #[serde(with = "secs")]
    pub window: Duration,
    /// The time EC2 takes to grow the pool, call and attach included (default 10 s): the pool
    /// keeps as many warm addresses as the most requests seen within this long.
    #[serde(with = "secs")]
    pub lead_time: Duration,
    /// A growth brings the pool this much of the recent rise in use above its low level
    /// (default 10 min).
    #[serde(with = "secs")]
    pub grow_batch: Duration,
    /// Addresses are released only when they were unused (neither assigned nor cooling) for
    /// this long (default 10 min).
    #[serde(with = "secs")]
    pub hold: Duration,
    /// Warm addresses kept with no recent demand (default 1).
    pub min_warm: u32,
    /// The fewest addresses one release call gives back (default 4): smaller surpluses stay,
    /// so frees are batched.
    pub min_release: u32,
    /// The fewest addresses one growth call asks for, room on the ENI allowing (default 1).
    pub min_grow: u32,
    /// `WARM_ENI_TARGET` was set explicitly, so it is a floor like the IP targets (ipamd: the
    /// variable is present in the environment). Otherwise it is the reference's default and
    /// demand replaces it.
    pub eni_target_is_floor: bool,
}

impl Default for DemandSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(1800),
            lead_time: Duration::from_secs(10),
            grow_batch: Duration::from_secs(600),
            hold: Duration::from_secs(600),
            min_warm: 1,
            min_release: 4,
            min_grow: 1,
            eni_target_is_floor: false,
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let span = crate::timeline::Span::deserialize(d)?;
        Ok(Duration::from_secs(span.0))
    }
}

impl DemandSettings {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let min = |name: &'static str, d: Duration, at_least: u64| {
            if d.as_secs() < at_least {
                Err((name, format!("must be at least {at_least} s")))
            } else {
                Ok(())
            }
        };
        min("lead_time", self.lead_time, 1)?;
        min("window", self.window, BUCKET_SECONDS)?;
        min("hold", self.hold, BUCKET_SECONDS)?;
        if self.window < self.lead_time {
            return Err(("window", "must be at least lead_time".into()));
        }
        Ok(())
    }

    fn keep_buckets(&self) -> u64 {
        self.window
            .max(self.hold)
            .as_secs()
            .div_ceil(BUCKET_SECONDS)
            + 1
    }
}

/// One minute of history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Minute index: `seconds / 60` of the bucket's start.
    pub minute: u64,
    /// Pod-address requests in the minute.
    pub requests: u32,
    /// Most requests seen within two consecutive lead-time intervals while this bucket was
    /// current (covers any window of one lead time).
    pub burst: u32,
    /// Most addresses in use (assigned or cooling) seen in the minute.
    pub peak_used: u32,
    /// Fewest addresses in use seen in the minute (`u32::MAX` before the first observation).
    pub min_used: u32,
}

/// The demand history a daemon keeps between decisions (serde: store it with the checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DemandState {
    /// Seconds at which the request history starts (for the rate).
    pub since: u64,
    /// Seconds from which the peak in use is known: releases wait until `hold` after it (a
    /// rebuild, or a restore after a long gap, moves it to the restart).
    pub hold_since: u64,
    /// Index of the current lead-time interval (`seconds / lead_time`).
    pub lead_index: u64,
    /// Requests in the current lead-time interval.
    pub lead_current: u32,
    /// Requests in the previous lead-time interval.
    pub lead_previous: u32,
    /// Per-minute history, oldest first, at most `max(window, hold)` long.
    pub buckets: VecDeque<Bucket>,
}

/// What the history says at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Estimate {
    /// Most requests within one lead time over the window.
    pub burst: u32,
    /// Requests over the window.
    pub requests: u32,
    /// Seconds of history the window covers (at most `window`).
    pub span: u64,
    /// Most addresses in use over the hold period.
    pub peak_used: u32,
    /// Fewest addresses in use over the window (`u32::MAX` without observations).
    pub min_used: u32,
    /// The history covers the whole hold period (releases allowed).
    pub settled: bool,
}

impl Estimate {
    /// Requests expected over `d` at the recent rate, rounded up.
    pub fn expected_over(&self, d: Duration) -> u32 {
        scale(self.requests, d, self.span)
    }

    /// Growth in use expected over `d`: the rise from the window's lowest use to `used`, at the
    /// rate it took, rounded up (0 when use did not rise).
    pub fn growth_over(&self, used: u32, d: Duration) -> u32 {
        if self.min_used == u32::MAX {
            return 0;
        }
        scale(used.saturating_sub(self.min_used), d, self.span)
    }
}

fn scale(n: u32, d: Duration, span: u64) -> u32 {
    if n == 0 {
        return 0;
    }
    let v = u64::from(n) * d.as_secs();
    u32::try_from(v.div_ceil(span.max(BUCKET_SECONDS))).unwrap_or(u32::MAX)
}

impl DemandState {
    /// An empty history starting at `now`.
    pub fn new(now: Duration) -> Self {
        Self {
            since: now.as_secs(),
            hold_since: now.as_secs(),
            ..Default::default()
        }
    }

    /// A history rebuilt after a restart without a saved state: the running pods' assignment
    /// times (from the checkpoint) count as requests, `used` addresses (assigned and cooling)
    /// are in use now, and no release happens until `hold` has passed.
    pub fn rebuild(
        settings: &DemandSettings,
        now: Duration,
        assigned_at: impl IntoIterator<Item = Duration>,
        used: u32,
    ) -> Self {
        let mut times: Vec<u64> = assigned_at
            .into_iter()
            .map(|t| t.as_secs())
            .filter(|t| *t <= now.as_secs() && now.as_secs() - *t < settings.window.as_secs())
            .collect();
        times.sort_unstable();
        let mut s = Self::new(now);
        if !times.is_empty() {
            // The pods assigned over the window are known (those that left since are not).
            s.since = now.as_secs().saturating_sub(settings.window.as_secs());
        }
        for t in times {
            s.record(settings, Duration::from_secs(t), 1);
        }
        s.observe(settings, now, used);
        s
    }

    /// A saved state taken back after a restart at `now`: history older than the window is
    /// dropped; a clock that went backwards, or a gap in the history longer than the hold
    /// period, restarts the hold (no release until `hold` has passed). `used` addresses are in
    /// use now.
    pub fn restore(mut self, settings: &DemandSettings, now: Duration, used: u32) -> Self {
        let n = now.as_secs();
        let last = self
            .buckets
            .back()
            .map(|b| b.minute * BUCKET_SECONDS)
            .unwrap_or(self.since);
        if last > n || self.since > n || self.hold_since > n {
            return Self::rebuild(settings, now, std::iter::empty(), used);
        }
        let gap = n - last;
        self.expire(settings, now);
        self.observe(settings, now, used);
        if gap >= settings.hold.as_secs() {
            self.hold_since = n;
        }
        self
    }

    fn expire(&mut self, settings: &DemandSettings, now: Duration) {
        let minute = now.as_secs() / BUCKET_SECONDS;
        let keep = settings.keep_buckets();
        while self
            .buckets
            .front()
            .is_some_and(|b| b.minute + keep <= minute)
        {
            self.buckets.pop_front();
        }
    }

    fn current(&mut self, settings: &DemandSettings, now: Duration) -> &mut Bucket {
        let minute = now.as_secs() / BUCKET_SECONDS;
        if self.buckets.back().is_none_or(|b| b.minute < minute) {
            self.expire(settings, now);
            self.buckets.push_back(Bucket {
                minute,
                min_used: u32::MAX,
                ..Default::default()
            });
        }
        // A time before the newest bucket (clock jitter) counts in the newest.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    /// Within the first lead time of the history: the node's initial fill (pods scheduled as
    /// the node became ready), which sets the baseline rather than the demand.
    fn initial_fill(&self, settings: &DemandSettings, now: Duration) -> bool {
        now.as_secs() < self.since + settings.lead_time.as_secs()
    }

    fn record(&mut self, settings: &DemandSettings, now: Duration, n: u32) {
        if self.initial_fill(settings, now) {
            let b = self.current(settings, now);
            b.requests = b.requests.saturating_add(n);
            return;
        }
        let lead = settings.lead_time.as_secs().max(1);
        let k = now.as_secs() / lead;
        if k == self.lead_index + 1 {
            self.lead_previous = self.lead_current;
            self.lead_current = 0;
        } else if k > self.lead_index + 1 {
            self.lead_previous = 0;
            self.lead_current = 0;
        }
        self.lead_index = self.lead_index.max(k);
        self.lead_current = self.lead_current.saturating_add(n);
        let burst = self.lead_current.saturating_add(self.lead_previous);
        let b = self.current(settings, now);
        b.requests = b.requests.saturating_add(n);
        b.burst = b.burst.max(burst);
    }

    /// `n` pods asked for an address at `now` (call on every pod-address request, those that
    /// must wait included).
    pub fn note_requests(&mut self, settings: &DemandSettings, now: Duration, n: u32) {
        if n > 0 {
            self.record(settings, now, n);
        }
    }

    /// `used` addresses (assigned or in cooldown) are in use at `now` (call before every
    /// decision).
    pub fn observe(&mut self, settings: &DemandSettings, now: Duration, used: u32) {
        let initial = self.initial_fill(settings, now);
        let b = self.current(settings, now);
        b.peak_used = b.peak_used.max(used);
        if !initial {
            b.min_used = b.min_used.min(used);
        }
    }

    /// The history's estimate at `now`.
    pub fn estimate(&self, settings: &DemandSettings, now: Duration) -> Estimate {
        let n = now.as_secs();
        let minute = n / BUCKET_SECONDS;
        // A bucket is in the last `d` when its minute is within `d`'s whole minutes of now.
        let window_from =
            (minute + 1).saturating_sub(settings.window.as_secs().div_ceil(BUCKET_SECONDS));
        let hold_from =
            (minute + 1).saturating_sub(settings.hold.as_secs().div_ceil(BUCKET_SECONDS));
        let oldest = window_from.min(hold_from);
        let mut e = Estimate {
            min_used: u32::MAX,
            ..Default::default()
        };
        for b in self.buckets.iter().rev().take_while(|b| b.minute >= oldest) {
            if b.minute >= window_from {
                e.burst = e.burst.max(b.burst);
                e.requests = e.requests.saturating_add(b.requests);
                e.min_used = e.min_used.min(b.min_used);
            }
            if b.minute >= hold_from {
                e.peak_used = e.peak_used.max(b.peak_used);
            }
        }
        e.span = n.saturating_sub(self.since).min(settings.window.as_secs());
        e.settled = n.saturating_sub(self.hold_since) >= settings.hold.as_secs();
        e
    }
}

/// The demand input of one decision: the settings and the node's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand<'a> {
    /// Settings.
    pub settings: &'a DemandSettings,
    /// History, observed up to the decision.
    pub state: &'a DemandState,
    /// Pods waiting for an address now: their request failed for lack of one and was not
    /// served since (0 when unknown). A growth adds them to its size.
    pub waiting: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn bursts_within_a_lead_time_are_remembered_for_the_window() {
        let cfg = DemandSettings::default();
        let mut st = DemandState::new(s(0));
        st.note_requests(&cfg, s(100), 3);
        st.note_requests(&cfg, s(105), 4);
        st.note_requests(&cfg, s(300), 1);
        let e = st.estimate(&cfg, s(310));
        assert_eq!((e.burst, e.requests), (7, 8));
        assert!(!e.settled);
        // Requests far apart do not add up.
        st.note_requests(&cfg, s(400), 2);
        st.note_requests(&cfg, s(430), 2);
        assert_eq!(st.estimate(&cfg, s(431)).burst, 7);
        // After the window, the burst is forgotten.
        let late = s(430 + 1800 + 120);
        st.observe(&cfg, late, 0);
        let e = st.estimate(&cfg, late);
        assert_eq!((e.burst, e.requests), (0, 0));
        assert!(e.settled);
    }

    #[test]
    fn the_peak_in_use_covers_the_hold_period_only() {
        let cfg = DemandSettings::default();
        let mut st = DemandState::new(s(0));
        st.observe(&cfg, s(10), 20);
        st.observe(&cfg, s(70), 5);
        assert_eq!(st.estimate(&cfg, s(80)).peak_used, 20);
        st.observe(&cfg, s(700), 5);
        assert_eq!(st.estimate(&cfg, s(700)).peak_used, 5);
    }

    #[test]
    fn the_rate_scales_to_the_batch() {
        let e = Estimate {
            requests: 30,
            span: 1800,
            ..Default::default()
        };
        assert_eq!(e.expected_over(s(600)), 10);
        assert_eq!(Estimate::default().expected_over(s(600)), 0);
    }

    #[test]
    fn a_restored_state_round_trips_and_a_gap_restarts_the_hold() {
        let cfg = DemandSettings::default();
        let mut st = DemandState::new(s(1_000_000));
        st.note_requests(&cfg, s(1_000_100), 5);
        st.observe(&cfg, s(1_000_700), 12);
        let text = serde_json::to_string(&st).expect("serialises");
        let back: DemandState = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, st);
        // A quick restart keeps the history and the hold.
        let r = back.clone().restore(&cfg, s(1_000_720), 12);
        let e = r.estimate(&cfg, s(1_000_720));
        assert_eq!((e.burst, e.peak_used, e.settled), (5, 12, true));
        // A long gap: the hold starts again.
        let r = back.restore(&cfg, s(1_000_700 + 900), 3);
        assert!(!r.estimate(&cfg, s(1_000_700 + 900)).settled);
        // A clock that went backwards: rebuilt.
        let r = st.restore(&cfg, s(10), 3);
        assert_eq!((r.since, r.hold_since), (10, 10));
    }

    #[test]
    fn a_rebuilt_state_counts_recent_assignments_and_holds() {
        let cfg = DemandSettings::default();
        let now = s(10_000);
        let times = [s(9_990), s(9_992), s(9_995), s(5_000)];
        let st = DemandState::rebuild(&cfg, now, times, 9);
        let e = st.estimate(&cfg, now);
        assert_eq!((e.burst, e.requests, e.peak_used), (3, 3, 9));
        assert!(
            !e.settled,
            "no release before a full hold after the restart"
        );
        assert!(st.estimate(&cfg, s(10_000 + 600)).settled);
    }

    #[test]
    fn settings_validate_and_parse_durations() {
        let d: DemandSettings = serde_yaml::from_str("{lead_time: 5s, hold: 15m}").expect("parses");
        assert_eq!((d.lead_time, d.hold), (s(5), s(900)));
        assert!(d.validate().is_ok());
        let bad = DemandSettings {
            lead_time: s(0),
            ..d
        };
        assert_eq!(bad.validate().map_err(|e| e.0), Err("lead_time"));
        assert!(serde_yaml::from_str::<DemandSettings>("{leadtime: 5}").is_err());
    }
}
