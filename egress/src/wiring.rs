//! The egress interface (spec cni.md 2.7): a second veth for the other IP family, addressed
//! by IPAM, routed through the host, and SNATed to the node's address of that family.
//!
//! - IPv4 egress (an IPv6 cluster): `net/ipv4/ip_forward=1`; `v4if0` with `<ip>/22`, the
//!   kernel's subnet route replaced by `<gw>/32 scope link src <ip>` and `<subnet> via <gw>
//!   src <ip>`, the IPAM routes via `<gw>`; the host end gets `<gw>/32 scope link` and the
//!   route `<ip>/32 dev <veth> scope link`; `iptables -t nat` chain `CNI-E4-…`.
//! - IPv6 egress (an IPv4 cluster): IPv6 off on the pod's primary interface; `v6if0` with the
//!   ULA, DAD waited for, the IPAM routes via the host end's link-local address; the host
//!   route `<ula>/128 dev <veth>`; `ip6tables -t nat` chain `CNI-E6-…`.
//!
//! Setup is undone on failure (host veth, SNAT chain and jump). Teardown deletes the egress
//! interface when the pod namespace is still there, and the SNAT chain and its POSTROUTING
//! jumps whether or not it is (the reference leaks the chain when the namespace is gone).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha512};
use vpc_cni_net::netlink::Link;
use vpc_cni_net::pod::wait_for_dad;
use vpc_cni_net::snat::iptables_in;
use vpc_cni_net::{
    sysctl, Family, IpCidr, MacAddr, NetError, Netlink, Netns, RandomizeSnat, Route, Scope,
    VethEnd, MAIN_TABLE,
};

use crate::ipam::IpamResult;

/// The pod-side interface of IPv4 egress.
pub const V4_IFNAME: &str = "v4if0";
/// The pod-side interface of IPv6 egress.
pub const V6_IFNAME: &str = "v6if0";
/// The longest iptables chain name the reference makes (`utils.MaxChainLength`).
pub const MAX_CHAIN_LEN: usize = 28;

/// The pod-side interface name of `family`'s egress.
pub fn ifname(family: Family) -> &'static str {
    match family {
        Family::V4 => V4_IFNAME,
        Family::V6 => V6_IFNAME,
    }
}

/// The SNAT chain of one container: `CNI-E4-`/`CNI-E6-` and the hex SHA-512 of
/// `<network name><container id>`, cut to 28 characters in all.
pub fn chain_name(family: Family, network: &str, container_id: &str) -> String {
    let prefix = match family {
        Family::V4 => "CNI-E4-",
        Family::V6 => "CNI-E6-",
    };
    let digest = Sha512::digest(format!("{network}{container_id}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let mut name = format!("{prefix}{hex}");
    name.truncate(MAX_CHAIN_LEN);
    name
}

/// The comment on every SNAT rule: `name: "<network>" id: "<container id>"`.
pub fn comment(network: &str, container_id: &str) -> String {
    format!("name: {network:?} id: {container_id:?}")
}

/// What to build.
#[derive(Clone, Debug)]
pub struct EgressSpec {
    /// The egress family (that of `node_ip`).
    pub family: Family,
    /// The pod's namespace.
    pub netns: PathBuf,
    /// The pod's primary interface (`CNI_IFNAME`; IPv6 is turned off on it for IPv6 egress).
    pub primary_ifname: String,
    /// The network name (`name`).
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// MTU of both ends.
    pub mtu: u32,
    /// The SNAT source.
    pub node_ip: IpAddr,
    /// The port flag.
    pub randomize: RandomizeSnat,
    /// What IPAM assigned.
    pub ipam: IpamResult,
}

/// What was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressWiring {
    /// The host end (`veth` and 8 random hex digits).
    pub host_veth: String,
    /// Its MAC.
    pub host_mac: MacAddr,
    /// The pod end (`v4if0`/`v6if0`).
    pub container_ifname: String,
    /// Its MAC.
    pub container_mac: MacAddr,
}

fn random_veth_name() -> Result<String, NetError> {
    let b = MacAddr::random_local()?.octets();
    Ok(format!(
        "veth{:02x}{:02x}{:02x}{:02x}",
        b[2], b[3], b[4], b[5]
    ))
}

fn s(v: &str) -> String {
    v.to_string()
}

/// The SNAT rules of one egress address: the chain's two rules and the POSTROUTING jump.
pub fn snat_rules(spec: &EgressSpec, chain: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let c = comment(&spec.network, &spec.container_id);
    let multicast = match spec.family {
        Family::V4 => "224.0.0.0/4",
        Family::V6 => "ff00::/8",
    };
    let accept = vec![
        s("-d"),
        s(multicast),
        s("-m"),
        s("comment"),
        s("--comment"),
        c.clone(),
        s("-j"),
        s("ACCEPT"),
    ];
    let mut snat = vec![
        s("-m"),
        s("comment"),
        s("--comment"),
        c.clone(),
        s("-j"),
        s("SNAT"),
        s("--to-source"),
        spec.node_ip.to_string(),
    ];
    match spec.randomize {
        RandomizeSnat::Prng => snat.push(s("--random-fully")),
        RandomizeSnat::HashRandom => snat.push(s("--random")),
        RandomizeSnat::None => {}
    }
    let jump = vec![
        s("-s"),
        IpCidr::host(spec.ipam.ip.addr).to_string(),
        s("-m"),
        s("comment"),
        s("--comment"),
        c,
        s("-j"),
        chain.to_string(),
    ];
    (vec![accept, snat], jump)
}

fn ipt(host: &Netns, family: Family, args: Vec<String>) -> Result<(bool, String), NetError> {
    iptables_in(host, family, &args)
}

fn ipt_must(host: &Netns, family: Family, args: Vec<String>) -> Result<(), NetError> {
    match ipt(host, family, args.clone())? {
        (true, _) => Ok(()),
        (false, err) => Err(NetError::Command {
            command: format!(
                "{} {}",
                vpc_cni_net::snat::iptables_bin(family),
                args.join(" ")
            ),
            status: "exit status: 1".into(),
            stderr: err,
        }),
    }
}

fn nat(op: &str, chain: &str, rest: &[String]) -> Vec<String> {
    let mut v = vec![s("-t"), s("nat"), s(op), s(chain)];
    v.extend(rest.iter().cloned());
    v
}

/// Creates (or empties) the chain, fills it and adds the POSTROUTING jump.
fn add_snat(host: &Netns, spec: &EgressSpec) -> Result<(), NetError> {
    let chain = chain_name(spec.family, &spec.network, &spec.container_id);
    let (rules, jump) = snat_rules(spec, &chain);
    // -N answers 1 when the chain exists (a retried ADD): then it is emptied instead.
    if !ipt(host, spec.family, nat("-N", &chain, &[]))?.0 {
        ipt_must(host, spec.family, nat("-F", &chain, &[]))?;
    }
    for r in rules {
        ipt_must(host, spec.family, nat("-A", &chain, &r))?;
    }
    if !ipt(host, spec.family, nat("-C", "POSTROUTING", &jump))?.0 {
        ipt_must(host, spec.family, nat("-A", "POSTROUTING", &jump))?;
    }
    Ok(())
}

/// Deletes every POSTROUTING rule jumping to `chain`, then flushes and deletes the chain.
/// Returns whether the chain was there.
pub fn remove_snat(host: &Netns, family: Family, chain: &str) -> Result<bool, NetError> {
    let list = [
        s("-t"),
        s("nat"),
        s("-L"),
        s("POSTROUTING"),
        s("--line-numbers"),
        s("-n"),
    ];
    let (ok, out) = ipt(host, family, list.to_vec())?;
    if ok {
        // `num target prot opt source destination ...`: newest first so numbers stay valid.
        let mut nums: Vec<u32> = out
            .lines()
            .filter_map(|l| {
                let mut cols = l.split_whitespace();
                let num = cols.next()?.parse::<u32>().ok()?;
                (cols.next()? == chain).then_some(num)
            })
            .collect();
        nums.sort_unstable_by(|a, b| b.cmp(a));
        for n in nums {
            ipt_must(host, family, nat("-D", "POSTROUTING", &[n.to_string()]))?;
        }
    }
    if !ipt(host, family, nat("-F", chain, &[]))?.0 {
        return Ok(false);
    }
    ipt_must(host, family, nat("-X", chain, &[]))?;
    Ok(true)
}

/// Whether `chain` exists and POSTROUTING jumps to it (CHECK).
pub fn snat_present(host: &Netns, family: Family, chain: &str) -> Result<bool, NetError> {
    if !ipt(host, family, nat("-S", chain, &[]))?.0 {
        return Ok(false);
    }
    let (ok, out) = ipt(host, family, nat("-S", "POSTROUTING", &[]))?;
    Ok(ok && out.lines().any(|l| l.ends_with(&format!("-j {chain}"))))
}

async fn host_link_local(host: &Netlink, index: u32) -> Result<IpAddr, NetError> {
    let deadline = tokio::time::Instant::now() + vpc_cni_net::pod::DAD_TIMEOUT;
    loop {
        let ll =
            host.addresses(Some(index)).await?.into_iter().find(
                |a| matches!(a.cidr.addr, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80),
            );
        if let Some(a) = ll {
            return Ok(a.cidr.addr);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NetError::invalid(format!(
                "host veth {index} has no IPv6 link-local address (IPv6 disabled on the node?)"
            )));
        }
        tokio::time::sleep(vpc_cni_net::pod::DAD_POLL).await;
    }
}

/// Adds `r`, retrying 5 × 100 ms while an identical route still exists (a dying pod's), as
/// the reference does.
async fn route_add_retrying(nl: &Netlink, r: &Route) -> Result<(), NetError> {
    let mut last = None;
    for _ in 0..5 {
        match nl.route_add(r).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_exists() => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| NetError::invalid("route add retries")))
}

fn step(what: &str) -> impl Fn(NetError) -> (String, NetError) + '_ {
    move |e| (what.to_string(), e)
}

async fn build(
    host_ns: &Netns,
    host: &Netlink,
    spec: &EgressSpec,
    host_veth: &str,
) -> Result<EgressWiring, (String, NetError)> {
    let pod_ns = Netns::open(&spec.netns).map_err(step("open the pod namespace"))?;
    let pod = Netlink::open(&pod_ns).map_err(step("open the pod namespace"))?;
    let cont_name = ifname(spec.family);
    if spec.family == Family::V4 {
        sysctl::write(host_ns, "net/ipv4/ip_forward", "1").map_err(step("net.ipv4.ip_forward"))?;
    } else {
        // The pod's primary interface carries no IPv6 in an IPv4 cluster.
        sysctl::write_all(
            &pod_ns,
            &[(
                format!("net/ipv6/conf/{}/disable_ipv6", spec.primary_ifname),
                "1".into(),
            )],
            true,
        )
        .map_err(step("IPv6 off on the primary interface"))?;
    }
    let host_mac = MacAddr::random_local().map_err(step("the host MAC"))?;
    host.add_veth(
        &VethEnd {
            name: host_veth.to_string(),
            mtu: spec.mtu,
            mac: Some(host_mac),
            up: false,
        },
        &VethEnd {
            name: cont_name.to_string(),
            mtu: spec.mtu,
            mac: None,
            up: false,
        },
        Some(&pod_ns),
    )
    .await
    .map_err(step("the egress veth"))?;
    let hl: Link = host
        .require_link(host_veth)
        .await
        .map_err(step("the host veth"))?;
    let cl: Link = pod
        .require_link(cont_name)
        .await
        .map_err(step("the egress interface"))?;
    if spec.family == Family::V6 {
        sysctl::write_all(
            &pod_ns,
            &[
                (
                    format!("net/ipv6/conf/{cont_name}/disable_ipv6"),
                    "0".into(),
                ),
                ("net/ipv6/conf/lo/disable_ipv6".into(), "0".into()),
            ],
            false,
        )
        .map_err(step("IPv6 on the egress interface"))?;
    }
    host.set_up(hl.index).await.map_err(step("host veth up"))?;
    pod.set_up(cl.index)
        .await
        .map_err(step("egress interface up"))?;
    let ip = spec.ipam.ip;
    pod.add_address(cl.index, ip, Scope::Universe)
        .await
        .map_err(step("the egress address"))?;
    let host_ip = IpCidr::host(ip.addr);
    match spec.family {
        Family::V4 => {
            let gw = spec.ipam.gateway.ok_or_else(|| {
                (
                    "the gateway".to_string(),
                    NetError::invalid("IPAM result without a gateway"),
                )
            })?;
            // The kernel's subnet route goes; the subnet is reached through the gateway.
            pod.route_delete(&Route {
                dst: ip.trunc(),
                gateway: None,
                oif: Some(cl.index),
                table: MAIN_TABLE,
                scope: Scope::Link,
                pref_src: None,
            })
            .await
            .map_err(step("the kernel's subnet route"))?;
            let mut gw_route = Route::link_scope(IpCidr::host(gw), cl.index, MAIN_TABLE);
            gw_route.pref_src = Some(ip.addr);
            pod.route_add(&gw_route)
                .await
                .map_err(step("the gateway route"))?;
            let mut subnet = Route::default_via(gw, cl.index, MAIN_TABLE);
            subnet.dst = ip.trunc();
            subnet.pref_src = Some(ip.addr);
            pod.route_add(&subnet)
                .await
                .map_err(step("the subnet route"))?;
            for (dst, via) in &spec.ipam.routes {
                let mut r = Route::default_via(via.unwrap_or(gw), cl.index, MAIN_TABLE);
                r.dst = *dst;
                pod.route_add(&r).await.map_err(step("an IPAM route"))?;
            }
            host.add_address(hl.index, IpCidr::host(gw), Scope::Link)
                .await
                .map_err(step("the host veth address"))?;
            route_add_retrying(host, &Route::link_scope(host_ip, hl.index, MAIN_TABLE))
                .await
                .map_err(step("the host route"))?;
        }
        Family::V6 => {
            wait_for_dad(&pod, cl.index, None)
                .await
                .map_err(step("DAD of the egress address"))?;
            let ll = host_link_local(host, hl.index)
                .await
                .map_err(step("the host link-local address"))?;
            wait_for_dad(host, hl.index, None)
                .await
                .map_err(step("DAD of the host veth"))?;
            for (dst, _) in &spec.ipam.routes {
                let mut r = Route::default_via(ll, cl.index, MAIN_TABLE);
                r.dst = *dst;
                pod.route_add(&r).await.map_err(step("an IPAM route"))?;
            }
            let mut hr = Route::link_scope(host_ip, hl.index, MAIN_TABLE);
            hr.scope = Scope::Universe;
            route_add_retrying(host, &hr)
                .await
                .map_err(step("the host route"))?;
        }
    }
    add_snat(host_ns, spec).map_err(step("SNAT"))?;
    Ok(EgressWiring {
        host_veth: host_veth.to_string(),
        host_mac,
        container_ifname: cont_name.to_string(),
        container_mac: cl.mac.unwrap_or_default(),
    })
}

/// ADD: builds the egress interface and its SNAT in `host_ns` (the node's namespace) and
/// `spec.netns`. On failure what was built is removed again (host veth, with its pod end and
/// their routes; SNAT chain and jump) and the error says which part failed.
pub async fn setup(host_ns: &Netns, spec: &EgressSpec) -> Result<EgressWiring, (String, NetError)> {
    let host = Netlink::open(host_ns).map_err(step("open the node namespace"))?;
    let host_veth = random_veth_name().map_err(step("the host veth name"))?;
    match build(host_ns, &host, spec, &host_veth).await {
        Ok(w) => Ok(w),
        Err(e) => {
            tracing::warn!(what = %e.0, error = %e.1, "egress setup failed; rolling back");
            if let Err(x) = host.delete_link_by_name(&host_veth).await {
                tracing::warn!(error = %x, "rollback: deleting the host veth failed");
            }
            let chain = chain_name(spec.family, &spec.network, &spec.container_id);
            if let Err(x) = remove_snat(host_ns, spec.family, &chain) {
                tracing::warn!(error = %x, "rollback: removing the SNAT chain failed");
            }
            Err(e)
        }
    }
}

/// What DEL removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressTeardown {
    /// The egress interface was still in the pod namespace and was deleted.
    pub link_deleted: bool,
    /// The SNAT chain was there and was removed (with its POSTROUTING jumps).
    pub chain_removed: bool,
}

/// DEL: deletes the egress interface when `netns` still exists (its host end dies with it),
/// and the SNAT chain of (`network`, `container_id`) with every POSTROUTING jump to it in
/// any case. Things already gone count as done.
pub async fn teardown(
    host_ns: &Netns,
    family: Family,
    netns: Option<&Path>,
    network: &str,
    container_id: &str,
) -> Result<EgressTeardown, (String, NetError)> {
    let mut out = EgressTeardown::default();
    if let Some(path) = netns {
        match Netns::open(path) {
            Ok(pod_ns) => {
                let pod = Netlink::open(&pod_ns).map_err(step("open the pod namespace"))?;
                out.link_deleted = pod
                    .delete_link_by_name(ifname(family))
                    .await
                    .map_err(step("the egress interface"))?;
            }
            Err(e) if e.is_not_found() => {
                tracing::info!(netns = %path.display(), "pod namespace already gone");
            }
            Err(e) => return Err(("open the pod namespace".into(), e)),
        }
    }
    let chain = chain_name(family, network, container_id);
    out.chain_removed = remove_snat(host_ns, family, &chain).map_err(step("SNAT"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_28_chars_of_prefix_and_sha512_hex() {
        let c4 = chain_name(Family::V4, "aws-cni", "abc");
        let c6 = chain_name(Family::V6, "aws-cni", "abc");
        assert_eq!(c4.len(), 28);
        assert!(c4.starts_with("CNI-E4-"));
        assert!(c6.starts_with("CNI-E6-"));
        assert_eq!(c4[7..], c6[7..]);
        // SHA-512("aws-cniabc"), first 21 hex digits.
        let d = Sha512::digest(b"aws-cniabc");
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&c4[7..], &hex[..21]);
        assert_ne!(c4, chain_name(Family::V4, "aws-cni", "abd"));
        assert_eq!(comment("aws-cni", "c1"), r#"name: "aws-cni" id: "c1""#);
    }

    fn spec(family: Family, randomize: RandomizeSnat) -> EgressSpec {
        let (ip, node): (IpCidr, IpAddr) = match family {
            Family::V4 => (
                "169.254.172.9/22".parse().expect("ip"),
                "10.0.0.10".parse().expect("n"),
            ),
            Family::V6 => (
                "fd00::ac:9/118".parse().expect("ip"),
                "2001:db8::10".parse().expect("n"),
            ),
        };
        EgressSpec {
            family,
            netns: "/x".into(),
            primary_ifname: "eth0".into(),
            network: "aws-cni".into(),
            container_id: "c1".into(),
            mtu: 9001,
            node_ip: node,
            randomize,
            ipam: IpamResult {
                ip,
                gateway: None,
                routes: vec![],
            },
        }
    }

    #[test]
    fn snat_rules_follow_the_family_and_the_randomize_flag() {
        let sp = spec(Family::V4, RandomizeSnat::Prng);
        let (rules, jump) = snat_rules(&sp, "CNI-E4-x");
        assert_eq!(rules[0][..2], [s("-d"), s("224.0.0.0/4")]);
        assert_eq!(rules[0].last().map(String::as_str), Some("ACCEPT"));
        assert!(rules[1].ends_with(&[s("--to-source"), s("10.0.0.10"), s("--random-fully")]));
        assert_eq!(jump[..2], [s("-s"), s("169.254.172.9/32")]);
        assert_eq!(jump.last().map(String::as_str), Some("CNI-E4-x"));
        let (rules, jump) = snat_rules(&spec(Family::V6, RandomizeSnat::HashRandom), "c");
        assert_eq!(rules[0][1], "ff00::/8");
        assert!(rules[1].ends_with(&[s("2001:db8::10"), s("--random")]));
        assert_eq!(jump[1], "fd00::ac:9/128");
        let (rules, _) = snat_rules(&spec(Family::V4, RandomizeSnat::None), "c");
        assert!(rules[1].ends_with(&[s("--to-source"), s("10.0.0.10")]));
    }
}
