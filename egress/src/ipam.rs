//! The IPAM delegate (the reference's `ipam.ExecAdd`/`ExecDel`): the plugin named by
//! `ipam.type` (`host-local`), found on `CNI_PATH`, run with the same CNI environment and the
//! whole network config on stdin.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use vpc_cni_net::{Family, IpCidr};
use vpc_cni_plugin::env::Invocation;

use crate::error::EgressError;

/// What the IPAM plugin assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamResult {
    /// The address with the range's prefix length (e.g. `169.254.172.5/22`).
    pub ip: IpCidr,
    /// The range's gateway (host-local: the first address of the range).
    pub gateway: Option<IpAddr>,
    /// The routes of the IPAM config (`dst`, optional `gw`), of the same family.
    pub routes: Vec<(IpCidr, Option<IpAddr>)>,
}

/// The first executable file `name` in the `:`-separated `cni_path`.
pub fn find_plugin(cni_path: &str, name: &str) -> Option<PathBuf> {
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `CNI_ARGS` as `k=v;k=v` (the pairs ours parsed; their order carries no meaning).
fn cni_args(inv: &Invocation) -> String {
    inv.args
        .pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

fn exec(
    plugin: &str,
    command: &'static str,
    inv: &Invocation,
    stdin: &[u8],
) -> Result<String, EgressError> {
    let fail = |msg: String| EgressError::Ipam {
        plugin: plugin.to_string(),
        command,
        msg,
    };
    let path = find_plugin(&inv.path, plugin)
        .ok_or_else(|| fail(format!("not found on CNI_PATH {:?}", inv.path)))?;
    let mut child = Command::new(&path)
        .env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &inv.container_id)
        .env("CNI_NETNS", &inv.netns)
        .env("CNI_IFNAME", &inv.ifname)
        .env("CNI_ARGS", cni_args(inv))
        .env("CNI_PATH", &inv.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run {}: {e}", path.display())))?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin)
            .map_err(|e| fail(format!("writing its stdin: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    // A CNI error JSON on stdout; otherwise whatever it said on stderr.
    let msg = serde_json::from_str::<Value>(&stdout)
        .ok()
        .and_then(|v| {
            let m = v.get("msg")?.as_str()?.to_string();
            Some(match v.get("details").and_then(Value::as_str) {
                Some(d) if !d.is_empty() => format!("{m}: {d}"),
                _ => m,
            })
        })
        .unwrap_or_else(|| {
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        });
    Err(fail(msg))
}

fn parse_ip(v: &Value, key: &str) -> Option<IpAddr> {
    v.get(key)?.as_str()?.parse().ok()
}

/// Reads the first address of `family` (and the routes of that family) out of an IPAM
/// result of any version from 0.3.0 on.
pub fn parse_result(plugin: &str, stdout: &str, family: Family) -> Result<IpamResult, EgressError> {
    let v: Value = serde_json::from_str(stdout).map_err(|e| EgressError::Ipam {
        plugin: plugin.to_string(),
        command: "ADD",
        msg: format!("its result is not JSON ({e}): {stdout:?}"),
    })?;
    let fam_name = match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    };
    let ips = v
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let found = ips.iter().enumerate().find_map(|(i, ip)| {
        let cidr: IpCidr = ip.get("address")?.as_str()?.parse().ok()?;
        (cidr.family() == family).then(|| (i, cidr, parse_ip(ip, "gateway")))
    });
    let Some((i, ip, gateway)) = found else {
        return Err(EgressError::NoAddress {
            plugin: plugin.to_string(),
            family: fam_name,
        });
    };
    // A gateway of the other family cannot route the address: refused here, naming it,
    // rather than by netlink halfway through the wiring.
    let other_family = |field: String, g: IpAddr| EgressError::Ipam {
        plugin: plugin.to_string(),
        command: "ADD",
        msg: format!("its result has {field} {g}, not an {fam_name} address"),
    };
    if let Some(g) = gateway.filter(|g| Family::of(g) != family) {
        return Err(other_family(format!("ips[{i}].gateway"), g));
    }
    let mut routes = Vec::new();
    for (j, r) in v
        .get("routes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(dst) = r
            .get("dst")
            .and_then(Value::as_str)
            .and_then(|d| d.parse::<IpCidr>().ok())
            .filter(|d| d.family() == family)
        else {
            continue;
        };
        let gw = parse_ip(r, "gw");
        if let Some(g) = gw.filter(|g| Family::of(g) != family) {
            return Err(other_family(format!("routes[{j}].gw"), g));
        }
        routes.push((dst, gw));
    }
    Ok(IpamResult {
        ip,
        gateway,
        routes,
    })
}

/// IPAM ADD: the address for the egress interface.
pub fn add(
    plugin: &str,
    inv: &Invocation,
    stdin: &[u8],
    family: Family,
) -> Result<IpamResult, EgressError> {
    let out = exec(plugin, "ADD", inv, stdin)?;
    parse_result(plugin, &out, family)
}

/// IPAM DEL: releases whatever the container holds (host-local: idempotent).
pub fn del(plugin: &str, inv: &Invocation, stdin: &[u8]) -> Result<(), EgressError> {
    exec(plugin, "DEL", inv, stdin).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_local_results_of_each_version_parse() {
        let r = parse_result(
            "host-local",
            r#"{"cniVersion":"0.4.0","ips":[{"version":"4","address":"169.254.172.7/22","gateway":"169.254.172.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#,
            Family::V4,
        )
        .expect("v4");
        assert_eq!(r.ip.to_string(), "169.254.172.7/22");
        assert_eq!(r.gateway, Some("169.254.172.1".parse().expect("gw")));
        assert_eq!(r.routes, vec![("0.0.0.0/0".parse().expect("dst"), None)]);
        let r = parse_result(
            "host-local",
            r#"{"cniVersion":"1.0.0","ips":[{"address":"fd00::ac:5/118","gateway":"fd00::ac:1"}],"routes":[{"dst":"::/0"}]}"#,
            Family::V6,
        )
        .expect("v6");
        assert_eq!(r.ip.prefix_len, 118);
        assert!(matches!(
            parse_result(
                "host-local",
                r#"{"ips":[{"address":"10.0.0.1/24"}]}"#,
                Family::V6
            ),
            Err(EgressError::NoAddress { .. })
        ));
        assert!(matches!(
            parse_result("host-local", "not json", Family::V4),
            Err(EgressError::Ipam { .. })
        ));
    }

    #[test]
    fn a_gateway_of_the_other_family_is_refused_by_name() {
        // Found by fuzzing: accepted, then netlink failed halfway through the wiring.
        let e = parse_result(
            "host-local",
            r#"{"cniVersion":"1.0.0","dns":null,"ips":[{"address":"fd00::ac:5/118","gateway":"169.254.172.1"}],"routes":[]}"#,
            Family::V6,
        )
        .expect_err("v4 gateway");
        assert!(e.to_string().contains("ips[0].gateway"), "{e}");
        let e = parse_result(
            "host-local",
            r#"{"ips":[{"address":"169.254.172.7/22"}],"routes":[{"dst":"::/0"},{"dst":"0.0.0.0/0","gw":"fd00::1"}]}"#,
            Family::V4,
        )
        .expect_err("v6 route gw");
        assert!(e.to_string().contains("routes[1].gw"), "{e}");
    }

    #[test]
    fn plugins_are_found_on_cni_path_only_when_executable() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join("host-local");
        std::fs::write(&p, "#!/bin/sh\n").expect("write");
        let path = format!("/nonexistent:{}", dir.path().display());
        assert_eq!(find_plugin(&path, "host-local"), None, "not executable");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_plugin(&path, "host-local"), Some(p));
        assert_eq!(find_plugin("", "host-local"), None);
    }
}
