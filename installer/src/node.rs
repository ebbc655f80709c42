//! The init step's node settings (spec/cni.md 3.1): find the primary interface by the primary
//! ENI's MAC address and set the node sysctls.
//!
//! - `net/ipv4/conf/<primary>/rp_filter = 2` (loose), always: NodePort and load-balancer
//!   traffic can arrive on the primary interface for a pod whose reverse route leaves by a
//!   secondary ENI.
//! - `net/ipv4/tcp_early_demux`, only if the file exists: `0` with `DISABLE_TCP_EARLY_DEMUX`,
//!   else `1`.
//! - `ENABLE_IPv6`: `net/ipv6/conf/all/disable_ipv6 = 0`.
//! - `ENABLE_IPv6` or `ENABLE_V6_EGRESS`: `net/ipv6/conf/all/forwarding = 1` and
//!   `net/ipv6/conf/<primary>/accept_ra = 2`.
//!
//! Sysctls are written under a configurable `/proc/sys` root from a thread inside the given
//! network namespace (`/proc/sys/net` shows the namespace of the thread that opens the file),
//! so tests point the whole step at a test namespace.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use vpc_cni_net::netlink::Netlink;
use vpc_cni_net::netns::Netns;
use vpc_cni_net::MacAddr;

use crate::error::InstallerError;

/// Default instance metadata endpoint.
pub const DEFAULT_IMDS_ENDPOINT: &str = "http://169.254.169.254";

/// Which optional sysctls the init step sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SysctlOptions {
    /// `DISABLE_TCP_EARLY_DEMUX`.
    pub disable_tcp_early_demux: bool,
    /// `ENABLE_IPv6`.
    pub enable_ipv6: bool,
    /// `ENABLE_V6_EGRESS`.
    pub enable_v6_egress: bool,
}

/// The sysctls (keys relative to `/proc/sys`, values) for primary interface `primary_if`;
/// `exists(key)` says whether a conditional key exists (only `tcp_early_demux` is).
pub fn node_sysctls(
    primary_if: &str,
    opts: SysctlOptions,
    exists: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    let mut out = vec![(
        format!("net/ipv4/conf/{primary_if}/rp_filter"),
        "2".to_owned(),
    )];
    let demux = "net/ipv4/tcp_early_demux";
    if exists(demux) {
        let v = if opts.disable_tcp_early_demux {
            "0"
        } else {
            "1"
        };
        out.push((demux.to_owned(), v.to_owned()));
    }
    if opts.enable_ipv6 {
        out.push(("net/ipv6/conf/all/disable_ipv6".to_owned(), "0".to_owned()));
    }
    if opts.enable_ipv6 || opts.enable_v6_egress {
        out.push(("net/ipv6/conf/all/forwarding".to_owned(), "1".to_owned()));
        out.push((
            format!("net/ipv6/conf/{primary_if}/accept_ra"),
            "2".to_owned(),
        ));
    }
    out
}

/// Writes `pairs` under `proc_sys` (e.g. `/proc/sys`) from the calling thread.
pub fn write_sysctls(proc_sys: &Path, pairs: &[(String, String)]) -> Result<(), InstallerError> {
    for (key, value) in pairs {
        if key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(InstallerError::BadName(key.clone()));
        }
        let path = proc_sys.join(key);
        std::fs::write(&path, value).map_err(|source| InstallerError::Io {
            op: "write sysctl",
            path,
            source,
        })?;
    }
    Ok(())
}

/// The name of the link in `ns` whose hardware address is `mac`.
pub fn interface_with_mac(ns: &Netns, mac: MacAddr) -> Result<String, InstallerError> {
    let net = |what: &str| {
        let what = what.to_owned();
        move |source| InstallerError::Net { what, source }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| InstallerError::Io {
            op: "start a runtime for",
            path: ns.path().to_path_buf(),
            source,
        })?;
    rt.block_on(async {
        let nl = Netlink::open(ns).map_err(net("open netlink"))?;
        nl.link_by_mac(mac).await.map_err(net("list links"))
    })?
    .map(|link| link.name)
    .ok_or_else(|| InstallerError::NoPrimaryInterface(mac.to_string()))
}

/// The whole sysctl part of the init step inside `ns`: finds the primary interface by `mac`,
/// then writes [`node_sysctls`] under `proc_sys` from a thread in `ns`. Returns the primary
/// interface and what was written.
pub fn set_node_sysctls(
    ns: &Netns,
    proc_sys: &Path,
    mac: MacAddr,
    opts: SysctlOptions,
) -> Result<(String, Vec<(String, String)>), InstallerError> {
    let primary = interface_with_mac(ns, mac)?;
    let pairs = ns
        .run(|| {
            let pairs = node_sysctls(&primary, opts, |key| proc_sys.join(key).exists());
            write_sysctls(proc_sys, &pairs).map(|()| pairs)
        })
        .map_err(|source| InstallerError::Net {
            what: format!("enter {}", ns.path().display()),
            source,
        })??;
    Ok((primary, pairs))
}

/// Reads the primary ENI's MAC address from the instance metadata service at `endpoint`
/// (`http://host[:port]`): IMDSv2 token first, then `latest/meta-data/mac`.
pub fn imds_mac(endpoint: &str, timeout: Duration) -> Result<MacAddr, InstallerError> {
    let (host, base) = split_endpoint(endpoint)?;
    let token = http(
        host,
        "PUT",
        &format!("{base}/latest/api/token"),
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        timeout,
    )?;
    let header = format!("X-aws-ec2-metadata-token: {}", token.trim());
    let mac = http(
        host,
        "GET",
        &format!("{base}/latest/meta-data/mac"),
        &header,
        timeout,
    )?;
    mac.trim()
        .parse()
        .map_err(|_| InstallerError::Imds(format!("not a MAC address: {:?}", mac.trim())))
}

/// One instance metadata value, `/latest/meta-data/<key>` (IMDSv2: a session token first).
/// `Ok(None)` when the service answers 404 (e.g. `ipv6` on an instance without IPv6).
pub fn imds_meta(
    endpoint: &str,
    key: &str,
    timeout: Duration,
) -> Result<Option<String>, InstallerError> {
    let (host, base) = split_endpoint(endpoint)?;
    let token = http(
        host,
        "PUT",
        &format!("{base}/latest/api/token"),
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        timeout,
    )?;
    let header = format!("X-aws-ec2-metadata-token: {}", token.trim());
    let path = format!("{base}/latest/meta-data/{key}");
    match http_status(host, "GET", &path, &header, timeout)? {
        (200, body) => Ok(Some(body.trim().to_owned())),
        (404, _) => Ok(None),
        (status, _) => Err(InstallerError::Imds(format!(
            "GET {path}: HTTP status {status}"
        ))),
    }
}

/// `http://host[:port][/base]` as `(host[:port], base)`, `base` without its trailing `/`
/// (empty for the plain endpoint; a path such as the simulator's `/<instance-id>` otherwise).
fn split_endpoint(endpoint: &str) -> Result<(&str, &str), InstallerError> {
    let rest = endpoint
        .strip_prefix("http://")
        .ok_or_else(|| InstallerError::Imds(format!("endpoint {endpoint:?} is not http://")))?;
    let (host, base) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if host.is_empty() {
        return Err(InstallerError::Imds(format!(
            "endpoint {endpoint:?} has no host"
        )));
    }
    Ok((host, base.trim_end_matches('/')))
}

/// One HTTP/1.1 request with `Connection: close`; the body of a 200 answer.
fn http(
    host: &str,
    method: &str,
    path: &str,
    header: &str,
    timeout: Duration,
) -> Result<String, InstallerError> {
    match http_status(host, method, path, header, timeout)? {
        (200, body) => Ok(body),
        (status, _) => Err(InstallerError::Imds(format!(
            "{method} {path}: HTTP status {status}"
        ))),
    }
}

/// One HTTP/1.1 request with `Connection: close`: the status code and the body.
fn http_status(
    host: &str,
    method: &str,
    path: &str,
    header: &str,
    timeout: Duration,
) -> Result<(u16, String), InstallerError> {
    let err = |e: std::io::Error| InstallerError::Imds(format!("{method} {path}: {e}"));
    let addr = host
        .to_socket_addrs()
        .or_else(|_| format!("{host}:80").to_socket_addrs())
        .map_err(err)?
        .next()
        .ok_or_else(|| InstallerError::Imds(format!("cannot resolve {host}")))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(err)?;
    stream.set_read_timeout(Some(timeout)).map_err(err)?;
    stream.set_write_timeout(Some(timeout)).map_err(err)?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{header}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(err)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(err)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| InstallerError::Imds(format!("{method} {path}: truncated answer")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| InstallerError::Imds(format!("{method} {path}: no HTTP status")))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn default_sysctls_set_loose_rp_filter_and_early_demux() {
        let pairs = node_sysctls("ens5", SysctlOptions::default(), |_| true);
        assert_eq!(
            pairs,
            vec![
                ("net/ipv4/conf/ens5/rp_filter".into(), "2".into()),
                ("net/ipv4/tcp_early_demux".into(), "1".into()),
            ]
        );
    }

    #[test]
    fn early_demux_is_skipped_when_missing_and_zero_when_disabled() {
        let opts = SysctlOptions {
            disable_tcp_early_demux: true,
            ..SysctlOptions::default()
        };
        assert_eq!(node_sysctls("eth0", opts, |_| false).len(), 1);
        assert!(node_sysctls("eth0", opts, |_| true)
            .contains(&("net/ipv4/tcp_early_demux".into(), "0".into())));
    }

    #[test]
    fn ipv6_and_v6_egress_knobs() {
        let v6 = node_sysctls(
            "eth0",
            SysctlOptions {
                enable_ipv6: true,
                ..SysctlOptions::default()
            },
            |_| false,
        );
        assert_eq!(
            v6[1..],
            [
                ("net/ipv6/conf/all/disable_ipv6".into(), "0".into()),
                ("net/ipv6/conf/all/forwarding".into(), "1".into()),
                ("net/ipv6/conf/eth0/accept_ra".into(), "2".into()),
            ]
        );
        let egress = node_sysctls(
            "eth0",
            SysctlOptions {
                enable_v6_egress: true,
                ..SysctlOptions::default()
            },
            |_| false,
        );
        assert_eq!(egress.len(), 3);
        assert!(!egress.iter().any(|(k, _)| k.ends_with("disable_ipv6")));
    }

    #[test]
    fn write_sysctls_writes_under_the_root_and_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("net/ipv4/conf/eth0")).unwrap();
        write_sysctls(
            root.path(),
            &[("net/ipv4/conf/eth0/rp_filter".into(), "2".into())],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("net/ipv4/conf/eth0/rp_filter")).unwrap(),
            "2"
        );
        let err = write_sysctls(root.path(), &[("net/../../etc".into(), "1".into())]);
        assert!(matches!(err, Err(InstallerError::BadName(_))));
        let err = write_sysctls(
            root.path(),
            &[("net/ipv4/conf/nope/rp_filter".into(), "2".into())],
        );
        assert!(matches!(err, Err(InstallerError::Io { .. })));
    }

    /// A fake IMDS answering the token and MAC requests; returns what it was asked.
    fn fake_imds(answers: Vec<&'static str>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short");
                    req.extend_from_slice(&buf[..n]);
                }
                seen.push(String::from_utf8_lossy(&req).into_owned());
                s.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        (format!("http://{addr}"), handle)
    }

    #[test]
    fn imds_mac_uses_a_session_token() {
        let (endpoint, server) = fake_imds(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntoken",
            "HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n0a:1b:2c:3d:4e:5f",
        ]);
        let mac = imds_mac(&endpoint, Duration::from_secs(5)).unwrap();
        assert_eq!(mac.to_string(), "0a:1b:2c:3d:4e:5f");
        let seen = server.join().unwrap();
        assert!(seen[0].starts_with("PUT /latest/api/token "), "{}", seen[0]);
        assert!(seen[0].contains("X-aws-ec2-metadata-token-ttl-seconds: 60"));
        assert!(
            seen[1].starts_with("GET /latest/meta-data/mac "),
            "{}",
            seen[1]
        );
        assert!(seen[1].contains("X-aws-ec2-metadata-token: token\r\n"));
    }

    #[test]
    fn imds_meta_answers_values_and_none_for_404() {
        let (endpoint, server) = fake_imds(vec![
            "HTTP/1.1 200 OK\r\n\r\nt",
            "HTTP/1.1 200 OK\r\n\r\n10.0.0.10\n",
            "HTTP/1.1 200 OK\r\n\r\nt",
            "HTTP/1.1 404 Not Found\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nt",
            "HTTP/1.1 500 Oops\r\n\r\n",
        ]);
        let t = Duration::from_secs(5);
        assert_eq!(
            imds_meta(&endpoint, "local-ipv4", t).unwrap().as_deref(),
            Some("10.0.0.10")
        );
        assert_eq!(imds_meta(&endpoint, "ipv6", t).unwrap(), None);
        assert!(imds_meta(&endpoint, "ipv6", t)
            .unwrap_err()
            .to_string()
            .contains("500"));
        let seen = server.join().unwrap();
        assert!(seen[1].starts_with("GET /latest/meta-data/local-ipv4 "));
        assert!(seen[3].starts_with("GET /latest/meta-data/ipv6 "));
    }

    #[test]
    fn an_endpoint_with_a_path_prefixes_every_request() {
        let (endpoint, server) = fake_imds(vec![
            "HTTP/1.1 200 OK\r\n\r\nt",
            "HTTP/1.1 200 OK\r\n\r\n0a:1b:2c:3d:4e:5f",
        ]);
        let mac = imds_mac(&format!("{endpoint}/i-0abc/"), Duration::from_secs(5)).unwrap();
        assert_eq!(mac.to_string(), "0a:1b:2c:3d:4e:5f");
        let seen = server.join().unwrap();
        assert!(
            seen[0].starts_with("PUT /i-0abc/latest/api/token "),
            "{}",
            seen[0]
        );
        assert!(
            seen[1].starts_with("GET /i-0abc/latest/meta-data/mac "),
            "{}",
            seen[1]
        );
        assert!(split_endpoint("http:///x").is_err());
        assert!(split_endpoint("https://h").is_err());
        assert_eq!(split_endpoint("http://h:1").unwrap(), ("h:1", ""));
    }

    #[test]
    fn imds_errors_are_reported() {
        let (endpoint, server) = fake_imds(vec!["HTTP/1.1 403 Forbidden\r\n\r\n"]);
        let err = imds_mac(&endpoint, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("403"), "{err}");
        server.join().unwrap();
        let (endpoint, server) = fake_imds(vec![
            "HTTP/1.1 200 OK\r\n\r\nt",
            "HTTP/1.1 200 OK\r\n\r\nnot-a-mac",
        ]);
        let err = imds_mac(&endpoint, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("not a MAC"), "{err}");
        server.join().unwrap();
    }
}
