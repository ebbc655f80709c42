//! Kill points on ADD: named steps where a crash test can make the plugin SIGKILL itself, as
//! a node's OOM killer or the runtime's timeout would stop it (no destructor, no undo, no
//! result printed).
//!
//! `VPC_CNI_FAILPOINTS=name=N[,name=N...]` arms them: the Nth time the plugin reaches `name`
//! it kills itself. The same variable and syntax as ipamd's failpoints, with the plugin's own
//! names (unknown names are refused, naming the variable). Unset, each point costs one atomic
//! load. Tests only; documented in docs/settings.md.
//!
//! The wiring steps are `vpc-cni-net`'s `pod setup step` trace events: a point "after X" is
//! the instant the step following X starts (the [`StepLayer`] sees it).

use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::error::CniError;

use vpc_cni_net::failpoint::Failpoints;

/// The environment variable that arms kill points.
pub const ENV: &str = vpc_cni_net::failpoint::ENV;

/// ipamd answered AddNetwork with an address; nothing of the pod's wiring depends on it yet.
pub const IPAMD_ANSWERED: &str = "add-ipamd-answered";
/// The veth pair exists (host end in the node, container end in the pod), not yet up.
pub const VETH_CREATED: &str = "add-veth-created";
/// The pod's address is on its interface; neighbour, host route and rules not yet.
pub const POD_ADDRESS: &str = "add-pod-address";
/// The pod side is complete (IPv6: duplicate address detection done); no host route yet.
pub const POD_SIDE_DONE: &str = "add-pod-side-done";
/// The host route to the pod is in place; its rules not yet.
pub const HOST_ROUTE: &str = "add-host-route";
/// The host rule `to <pod> lookup main` (512) is in place; `from <pod>` (1536) not yet.
pub const TO_POD_RULE: &str = "add-to-pod-rule";
/// The host rules of an interface are in place (its wiring is complete).
pub const RULES: &str = "add-rules";
/// Everything is done and the result built; it is not printed yet.
pub const BEFORE_RESULT: &str = "add-before-result";

/// Every kill point, in the order an ADD reaches them (the veth may be built while ipamd is
/// still answering).
pub const ALL: &[&str] = &[
    IPAMD_ANSWERED,
    VETH_CREATED,
    POD_ADDRESS,
    POD_SIDE_DONE,
    HOST_ROUTE,
    TO_POD_RULE,
    RULES,
    BEFORE_RESULT,
];

/// The kill point at the start of `vpc-cni-net` setup step `step` (its `Display` name).
fn point_of_step(step: &str) -> Option<&'static str> {
    Some(match step {
        "HostVethSysctls" => VETH_CREATED,
        "PodNeighbour" => POD_ADDRESS,
        "HostRoute" => POD_SIDE_DONE,
        "ToPodRule" => HOST_ROUTE,
        "FromPodRule" => TO_POD_RULE,
        _ => return None,
    })
}

static POINTS: Failpoints = Failpoints::new("aws-cni");

/// Parses a [`ENV`] value: comma-separated `name=N`, a known name and N >= 1. Empty items
/// are skipped; a malformed one is an error naming the variable (code 4).
pub fn parse(value: &str) -> Result<Vec<(&'static str, u64)>, CniError> {
    vpc_cni_net::failpoint::parse(value, ALL)
        .map_err(|reason| CniError::InvalidEnvironment { var: ENV, reason })
}

/// Arms the points of `value` (once per process; later calls change nothing).
pub fn init(value: &str) -> Result<(), CniError> {
    let parsed = parse(value)?;
    if !parsed.is_empty() {
        POINTS.arm(parsed);
    }
    Ok(())
}

/// Whether any point is armed.
pub fn armed() -> bool {
    POINTS.armed()
}

/// Marks that ADD reached point `name`; SIGKILLs the process when it is armed and this is
/// its Nth time.
pub fn hit(name: &str) {
    POINTS.hit(name);
}

/// A tracing layer turning `vpc-cni-net`'s `pod setup step` events into kill points
/// (installed only when a point is armed).
#[derive(Debug, Default)]
pub struct StepLayer;

impl<S: Subscriber> Layer<S> for StepLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if let Some(point) = crate::timing::net_step(event)
            .as_deref()
            .and_then(point_of_step)
        {
            hit(point);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpc_cni_net::pod::SetupStep;

    #[test]
    fn parses_known_names_with_counts_and_names_the_variable_otherwise() {
        assert_eq!(
            parse("add-veth-created=1, add-rules=2,").expect("valid"),
            vec![(VETH_CREATED, 1), (RULES, 2)]
        );
        assert_eq!(parse("").expect("empty"), vec![]);
        for bad in ["add-rules", "nope=1", "add-rules=0", "add-rules=x", "=1"] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.code(), 4, "{bad}");
            assert!(e.to_string().contains(ENV), "{bad}: {e}");
        }
    }

    #[test]
    fn the_step_points_follow_the_net_crate_step_names() {
        // A renamed step in vpc-cni-net would silently disarm a point: the names must exist.
        let names: Vec<String> = SetupStep::ALL.iter().map(|s| s.to_string()).collect();
        for step in [
            "HostVethSysctls",
            "PodNeighbour",
            "HostRoute",
            "ToPodRule",
            "FromPodRule",
        ] {
            assert!(names.iter().any(|n| n == step), "{step}");
            assert!(point_of_step(step).is_some());
        }
        // Each point's step directly follows the step it is "after".
        let pos = |s: &str| names.iter().position(|n| n == s).expect("step");
        for (done, next) in [
            ("CreateVeth", "HostVethSysctls"),
            ("PodAddress", "PodNeighbour"),
            ("WaitDad", "HostRoute"),
            ("HostRoute", "ToPodRule"),
            ("ToPodRule", "FromPodRule"),
        ] {
            assert_eq!(pos(done) + 1, pos(next), "{done} -> {next}: {names:?}");
        }
    }

    #[test]
    fn an_unarmed_point_does_nothing() {
        hit(BEFORE_RESULT);
        assert!(!armed());
    }
}
