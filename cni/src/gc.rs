//! GC (CNI 1.1): removes host rules left behind by pods that no longer exist.
//!
//! ipamd owns address garbage collection (it reconciles its datastore against the host veths
//! at start-up), and the `CNIBackend` protocol has no call to list allocations, so the plugin's
//! GC works on what it can see: a `to <podIP>/32 lookup main` rule at 512, or a
//! `from <podIP>/32` rule at 1536, is stale when the host has no `<podIP>/32` route through a
//! link in the main table. ADD adds the route before the rules and DEL removes the rules
//! before the route, so a live pod never shows a rule without its route. This is the leak of
//! the reference's issue #2048 / #3309 (spec cni.md 7.7).

use std::net::IpAddr;

use vpc_cni_net::pod::{FROM_POD_RULE_PRIORITY, TO_CONTAINER_RULE_PRIORITY};
use vpc_cni_net::{Family, Netlink, Route, Rule, MAIN_TABLE};

/// The pod rules in `rules` whose address has no host route in `main_routes`. Pure.
pub fn stale_pod_rules(rules: &[Rule], main_routes: &[Route]) -> Vec<Rule> {
    let routed = |ip: &IpAddr| {
        main_routes.iter().any(|r| {
            r.table == MAIN_TABLE
                && r.oif.is_some()
                && r.gateway.is_none()
                && r.dst.prefix_len == 32
                && r.dst.addr == *ip
        })
    };
    rules
        .iter()
        .filter(|r| r.family == Family::V4)
        .filter(|r| match r.priority {
            TO_CONTAINER_RULE_PRIORITY => {
                r.table == MAIN_TABLE
                    && r.from.is_none()
                    && r.to.is_some_and(|t| t.prefix_len == 32 && !routed(&t.addr))
            }
            FROM_POD_RULE_PRIORITY => {
                r.to.is_none()
                    && r.from
                        .is_some_and(|f| f.prefix_len == 32 && !routed(&f.addr))
            }
            _ => false,
        })
        .cloned()
        .collect()
}

/// Deletes the stale pod rules of the namespace behind `host`; returns how many went.
pub async fn sweep_stale_rules(host: &Netlink) -> vpc_cni_net::Result<usize> {
    let rules = host.rules(Family::V4).await?;
    let routes = host.routes(Family::V4, Some(MAIN_TABLE)).await?;
    let mut n = 0;
    for r in stale_pod_rules(&rules, &routes) {
        if host.rule_delete(&r).await? {
            tracing::info!(rule = %r, "GC: removed a stale pod rule");
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpc_cni_net::IpCidr;

    fn ip(s: &str) -> IpCidr {
        s.parse().expect("cidr")
    }

    #[test]
    fn rules_of_routed_pods_stay_and_orphans_go() {
        let live = ip("10.0.0.5/32");
        let dead = ip("10.0.0.6/32");
        let rules = vec![
            Rule::new(Family::V4, 512, MAIN_TABLE).to(live),
            Rule::new(Family::V4, 1536, 3).from(live),
            Rule::new(Family::V4, 512, MAIN_TABLE).to(dead),
            Rule::new(Family::V4, 1536, 3).from(dead),
            // Not ours: other priorities, wider prefixes.
            Rule::new(Family::V4, 1024, MAIN_TABLE).fwmark(0x80, 0x80),
            Rule::new(Family::V4, 32765, 3).from(ip("10.0.0.100/32")),
            Rule::new(Family::V4, 512, MAIN_TABLE).to(ip("10.1.0.0/16")),
        ];
        let routes = vec![
            Route::link_scope(live, 7, MAIN_TABLE),
            Route::default_via("10.0.0.1".parse().expect("ip"), 2, MAIN_TABLE),
        ];
        let stale = stale_pod_rules(&rules, &routes);
        assert_eq!(stale, vec![rules[2].clone(), rules[3].clone()]);
    }

    #[test]
    fn a_route_in_another_table_does_not_keep_a_rule() {
        let a = ip("10.0.0.7/32");
        let rules = vec![Rule::new(Family::V4, 512, MAIN_TABLE).to(a)];
        let routes = vec![Route::link_scope(a, 7, 3)];
        assert_eq!(stale_pod_rules(&rules, &routes).len(), 1);
    }
}
