//! Opt-in phase timestamps, for latency work (the `latency` bench's breakdown).
//!
//! With `AWS_CNI_TIMING=1` in the plugin's environment, [`mark`] records named instants, the
//! pod-network steps that `vpc-cni-net` traces (`pod setup step`) are recorded too, and
//! [`report`] renders one line for stderr: each mark names the phase that starts there, with
//! its milliseconds (until the next mark). Without the variable, [`mark`] is one relaxed atomic load and nothing is recorded or
//! printed.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The environment variable that turns timing on (`1`).
pub const TIMING_VAR: &str = "AWS_CNI_TIMING";

static ON: AtomicBool = AtomicBool::new(false);
static MARKS: OnceLock<Mutex<Vec<(String, Instant)>>> = OnceLock::new();

fn marks() -> &'static Mutex<Vec<(String, Instant)>> {
    MARKS.get_or_init(|| Mutex::new(Vec::with_capacity(32)))
}

/// Turns timing on when `get_env` has `AWS_CNI_TIMING=1`, and records the `start` mark.
pub fn init(get_env: &dyn Fn(&str) -> Option<String>) {
    if get_env(TIMING_VAR).as_deref() == Some("1") {
        ON.store(true, Ordering::Relaxed);
        mark("start");
    }
}

/// Whether timing is on.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Records that phase `name` starts now (when timing is on).
pub fn mark(name: &str) {
    if enabled() {
        let now = Instant::now();
        if let Ok(mut m) = marks().lock() {
            m.push((name.to_owned(), now));
        }
    }
}

/// `timing: total=<ms> <phase>=<ms until the next mark> ...`, or `None` when timing is off
/// or nothing was recorded.
pub fn report() -> Option<String> {
    if !enabled() {
        return None;
    }
    let m = marks().lock().ok()?;
    let (first, last) = (m.first()?.1, m.last()?.1);
    let mut line = format!(
        "timing: total={:.3}",
        last.duration_since(first).as_secs_f64() * 1e3
    );
    for w in m.windows(2) {
        let _ = write!(
            line,
            " {}={:.3}",
            w[0].0,
            w[1].1.duration_since(w[0].1).as_secs_f64() * 1e3
        );
    }
    Some(line)
}

/// A tracing layer that turns `vpc-cni-net`'s `pod setup step` events into marks named after
/// the step (the mark is the instant the step starts).
#[derive(Debug, Default)]
pub struct StepLayer;

struct StepField(Option<String>);

impl Visit for StepField {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "step" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// The `step` of a `vpc-cni-net` `pod setup step` event (its `Display` name), if `event` is
/// one.
pub(crate) fn net_step(event: &Event<'_>) -> Option<String> {
    if !event.metadata().target().starts_with("vpc_cni_net") {
        return None;
    }
    let mut f = StepField(None);
    event.record(&mut f);
    f.0
}

impl<S: Subscriber> Layer<S> for StepLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if let Some(step) = net_step(event) {
            mark(&format!("step:{step}"));
        }
    }
}
