//! Property-based fuzzing of what ipamd reads over HTTP: instance metadata answers (through
//! aws-config's IMDS client as [`AwsImds`] builds it), EC2 XML answers (through the real
//! `aws-sdk-ec2` client as [`AwsEc2`] builds it), and raw HTTP/1.1 requests to the real
//! introspection and metrics servers.
//!
//! The answers come from the VPC simulator on loopback through a mangling proxy in the test:
//! real answers of every call ipamd makes, then truncated, stripped of an element, given
//! unknown elements, values of the wrong type, endless pagination, huge bodies or bytes
//! that are not UTF-8. Each case: no panic, no hang (every call bounded), and a clear error
//! naming the key or EC2 action up to the caller, or values the daemon can use.
//!
//! Case budgets are small (`FUZZ_CASES` overrides them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipamd::config::SimSettings;
use ipamd::io::sim_backend::{self, SimNode, SIM_AZ, SIM_CREDENTIALS, SIM_REGION};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vpc_sim::sim::SimConfig;

fn cases(default: u32) -> PropConfig {
    let n = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    PropConfig {
        cases: n,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..PropConfig::default()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

// --- the mangling proxy -------------------------------------------------------------------

/// How one answer is spoiled.
#[derive(Debug, Clone)]
enum Spoil {
    /// The answer as it is.
    None,
    /// The first `n` per mille of the body.
    Truncate(u16),
    /// The `k`-th element removed.
    DropElement(u16),
    /// An unknown element inserted after the `k`-th tag.
    Unknown(u16),
    /// The `k`-th text value replaced.
    Text(u16, String),
    /// Endless pagination: a `nextToken` added to a describe answer.
    NextToken(String),
    /// The `k`-th element repeated `n` times.
    Repeat(u16, u16),
    /// Bytes that are not UTF-8 inserted at the `k`-th per mille.
    NotUtf8(u16),
    /// An empty body.
    Empty,
    /// Another status with the body.
    Status(u16),
    /// The text of the first element `<name>` replaced.
    Element(&'static str, String),
    /// (Text answers) the whole value replaced.
    Whole(String),
    /// (Text answers) the value's lines repeated `n` times.
    Lines(u16),
}

/// Start offsets of the opening tags `<name ...>` of the body, with their names.
fn open_tags(body: &[u8]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'<' && i + 1 < body.len() && body[i + 1].is_ascii_alphabetic() {
            let end = body[i + 1..]
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-'))
                .map_or(body.len(), |p| i + 1 + p);
            out.push((i, String::from_utf8_lossy(&body[i + 1..end]).into_owned()));
        }
        i += 1;
    }
    out
}

/// The byte range of the element opened at `start` (through its closing tag), if any.
fn element(body: &[u8], start: usize, name: &str) -> Option<std::ops::Range<usize>> {
    let close = format!("</{name}>");
    let rest = &body[start..];
    let at = rest
        .windows(close.len())
        .position(|w| w == close.as_bytes())?;
    Some(start..start + at + close.len())
}

/// Ranges of the text values (between `>` and `<`, not blank).
fn texts(body: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'>' {
            let s = i + 1;
            let e = body[s..]
                .iter()
                .position(|b| *b == b'<')
                .map_or(body.len(), |p| s + p);
            if body[s..e].iter().any(|b| !b.is_ascii_whitespace()) {
                out.push(s..e);
            }
            i = e;
        } else {
            i += 1;
        }
    }
    out
}

fn spoil(spoil: &Spoil, status: u16, body: Vec<u8>) -> (u16, Vec<u8>) {
    let mut b = body;
    match spoil {
        Spoil::None => {}
        Spoil::Truncate(pm) => {
            let n = b.len() * usize::from(*pm % 1000) / 1000;
            b.truncate(n);
        }
        Spoil::DropElement(k) => {
            let tags = open_tags(&b);
            if !tags.is_empty() {
                let (start, name) = &tags[usize::from(*k) % tags.len()];
                if let Some(r) = element(&b, *start, name) {
                    b.drain(r);
                }
            }
        }
        Spoil::Unknown(k) => {
            let tags = open_tags(&b);
            if !tags.is_empty() {
                let (start, _) = &tags[usize::from(*k) % tags.len()];
                let after = b[*start..]
                    .iter()
                    .position(|c| *c == b'>')
                    .map_or(b.len(), |p| start + p + 1);
                let x = b"<zzUnknownThing><deviceIndex>x</deviceIndex><item/></zzUnknownThing>";
                b.splice(after..after, x.iter().copied());
            }
        }
        Spoil::Text(k, v) => {
            let t = texts(&b);
            if !t.is_empty() {
                let r = t[usize::from(*k) % t.len()].clone();
                b.splice(r, v.bytes());
            }
        }
        Spoil::NextToken(tok) => {
            let tags = open_tags(&b);
            if let Some((start, _)) = tags.get(1) {
                let x = format!("<nextToken>{tok}</nextToken>");
                b.splice(*start..*start, x.bytes());
            }
        }
        Spoil::Repeat(k, n) => {
            let tags = open_tags(&b);
            if !tags.is_empty() {
                let (start, name) = &tags[usize::from(*k) % tags.len()];
                if let Some(r) = element(&b, *start, name) {
                    let one = b[r.clone()].to_vec();
                    let mut many = Vec::with_capacity(one.len() * usize::from(*n));
                    for _ in 0..*n {
                        many.extend_from_slice(&one);
                    }
                    b.splice(r.end..r.end, many);
                }
            }
        }
        Spoil::NotUtf8(pm) => {
            let at = b.len() * usize::from(*pm % 1000) / 1000;
            b.splice(at..at, [0xff, 0xfe, 0xc3]);
        }
        Spoil::Empty => b.clear(),
        Spoil::Status(s) => return (*s, b),
        Spoil::Whole(v) => b = v.clone().into_bytes(),
        Spoil::Element(name, v) => {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            let find = |hay: &[u8], pat: &str, from: usize| {
                hay[from..]
                    .windows(pat.len())
                    .position(|w| w == pat.as_bytes())
                    .map(|p| p + from)
            };
            if let Some(a) = find(&b, &open, 0) {
                let start = a + open.len();
                if let Some(end) = find(&b, &close, start) {
                    b.splice(start..end, v.bytes());
                }
            }
        }
        Spoil::Lines(n) => {
            let one = std::mem::take(&mut b);
            for _ in 0..*n {
                b.extend_from_slice(&one);
                b.push(b'\n');
            }
        }
    }
    (status, b)
}

/// What the proxy does with the answers: which requests to spoil, and how.
struct Plan {
    /// Spoil answers whose request (target line and body) contains this.
    matching: String,
    spoil: Spoil,
    /// Paths and EC2 actions asked for.
    seen: Vec<String>,
}

/// A proxy on loopback in front of `upstream`, spoiling the answers `plan` picks.
struct Proxy {
    addr: SocketAddr,
    plan: Arc<Mutex<Plan>>,
}

async fn read_head(s: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(p + 4);
            return Some((buf, rest));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(p) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = p + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
}

async fn relay(mut client: TcpStream, upstream: SocketAddr, plan: Arc<Mutex<Plan>>) {
    let Some((head, mut body)) = read_head(&mut client).await else {
        return;
    };
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let target = head.lines().next().unwrap_or("").to_owned();
    let action = String::from_utf8_lossy(&body)
        .split('&')
        .find_map(|kv| kv.strip_prefix("Action=").map(str::to_owned))
        .unwrap_or_default();
    let key = format!("{target} {action}");
    let how = {
        let mut p = plan.lock().unwrap();
        p.seen.push(key.clone());
        if !p.matching.is_empty() && key.contains(&p.matching) {
            p.spoil.clone()
        } else {
            Spoil::None
        }
    };
    // Endless pagination: every page asked for is the first page again, with a token.
    if matches!(how, Spoil::NextToken(_)) {
        let kept: Vec<&str> = std::str::from_utf8(&body)
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.starts_with("NextToken="))
            .collect();
        body = kept.join("&").into_bytes();
    }
    // Forward with `Connection: close`, so the answer ends with the connection.
    let mut up_head: Vec<String> = head
        .trim_end()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("connection:") && !l.starts_with("content-length:")
        })
        .map(str::to_owned)
        .collect();
    up_head.push(format!("Content-Length: {}", body.len()));
    up_head.push("Connection: close".into());
    let Ok(mut up) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut req = up_head.join("\r\n").into_bytes();
    req.extend_from_slice(b"\r\n\r\n");
    req.extend_from_slice(&body);
    if up.write_all(&req).await.is_err() {
        return;
    }
    let mut answer = Vec::new();
    if up.read_to_end(&mut answer).await.is_err() {
        return;
    }
    let Some(p) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return;
    };
    let ahead = String::from_utf8_lossy(&answer[..p]).into_owned();
    let mut abody = answer[p + 4..].to_vec();
    if header(&ahead, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        abody = dechunk(&abody);
    }
    let status: u16 = ahead
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let (status, abody) = spoil(&how, status, abody);
    let mut out = format!("HTTP/1.1 {status} X\r\n");
    for l in ahead.lines().skip(1) {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("content-length:")
            || lower.starts_with("transfer-encoding:")
            || lower.starts_with("connection:")
        {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        abody.len()
    ));
    let _ = client.write_all(out.as_bytes()).await;
    let _ = client.write_all(&abody).await;
    let _ = client.shutdown().await;
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let plan = Arc::new(Mutex::new(Plan {
            matching: String::new(),
            spoil: Spoil::None,
            seen: Vec::new(),
        }));
        let p = plan.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(relay(s, upstream, p.clone()));
            }
        });
        Proxy { addr, plan }
    }

    fn set(&self, matching: &str, spoil: Spoil) {
        let mut p = self.plan.lock().unwrap();
        p.matching = matching.to_owned();
        p.spoil = spoil;
        p.seen.clear();
    }

    fn seen(&self) -> Vec<String> {
        self.plan.lock().unwrap().seen.clone()
    }

    /// The proxy's URL with the path of `upstream_url` (the IMDS endpoint has one).
    fn url_for(&self, upstream_url: &str) -> String {
        let rest = upstream_url.trim_start_matches("http://");
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        format!("http://{}{}", self.addr, path)
    }
}

fn addr_of(url: &str) -> SocketAddr {
    let rest = url.trim_start_matches("http://");
    let host = rest.split('/').next().unwrap_or(rest);
    host.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Held by each test for its whole run: the proxies have one plan at a time, and the tests
/// share one runtime whose clients' timeouts must not be eaten by another test's load.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The simulated node (EC2 and IMDS) with a proxy in front of each, started once.
struct Bench {
    node: SimNode,
    ec2: Proxy,
    imds: Proxy,
}

fn bench() -> &'static Bench {
    static B: std::sync::OnceLock<Bench> = std::sync::OnceLock::new();
    B.get_or_init(|| {
        runtime().block_on(async {
            let node = sim_backend::start(
                &SimSettings {
                    instance_type: "m5.large".into(),
                    vpc_cidr: "10.0.0.0/16".parse().unwrap(),
                    subnet_cidr: "10.0.0.0/20".parse().unwrap(),
                    ipv6: true,
                },
                SimConfig::default(),
            )
            .await
            .expect("simulator");
            let ec2 = Proxy::start(addr_of(&node.ec2_url())).await;
            let imds = Proxy::start(addr_of(&node.imds_url())).await;
            // A second ENI at device 1, so that the per-interface keys of a secondary ENI
            // (device-number) are read too.
            use ipamd::io::ec2::Ec2Api;
            let direct = ipamd::io::ec2::aws::AwsEc2::new(&ipamd::io::ec2::aws::AwsSettings {
                region: SIM_REGION.into(),
                endpoint: Some(node.ec2_url()),
                http_timeout: Duration::from_secs(5),
                version: "fuzz".into(),
                static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
            })
            .await;
            let eni = direct
                .create_eni(&ipamd::io::ec2::CreateEni {
                    subnet_id: node.subnet_id.clone(),
                    security_groups: vec![node.security_group.clone()],
                    description: "aws-K8S-bench".into(),
                    tags: Default::default(),
                    addresses: ipamd::io::ec2::Addresses::Ips(2),
                })
                .await
                .expect("second ENI");
            direct
                .attach_eni(&eni.id, &node.instance_id, 1, 0)
                .await
                .expect("attach");
            Bench { node, ec2, imds }
        })
    })
}

/// Spoils that keep the body's shape but change one value to something of another type.
fn text_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("-1".to_owned()),
        Just("2147483647".to_owned()),
        Just("4294967295".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("1e9".to_owned()),
        Just(String::new()),
        Just("true".to_owned()),
        Just("10.0.0.300".to_owned()),
        Just("10.0.0.0/33".to_owned()),
        Just("::zz".to_owned()),
        Just("<b>".to_owned()),
        Just("&bogus;".to_owned()),
        "[a-z0-9:./-]{0,12}",
        any::<String>(),
    ]
}

fn a_spoil() -> impl Strategy<Value = Spoil> {
    prop_oneof![
        1 => Just(Spoil::None),
        2 => any::<u16>().prop_map(Spoil::Truncate),
        2 => any::<u16>().prop_map(Spoil::DropElement),
        1 => any::<u16>().prop_map(Spoil::Unknown),
        3 => (any::<u16>(), text_value()).prop_map(|(k, v)| Spoil::Text(k, v)),
        1 => "[a-z]{1,8}".prop_map(Spoil::NextToken),
        1 => (any::<u16>(), 1u16..2000).prop_map(|(k, n)| Spoil::Repeat(k, n)),
        1 => any::<u16>().prop_map(Spoil::NotUtf8),
        1 => Just(Spoil::Empty),
        1 => prop::sample::select(vec![201u16, 204, 302, 400, 404, 500, 503]).prop_map(Spoil::Status),
        3 => (prop::sample::select(ELEMENTS), text_value()).prop_map(|(e, v)| Spoil::Element(e, v)),
    ]
}

/// Elements of the EC2 answers whose values ipamd reads.
const ELEMENTS: &[&str] = &[
    "deviceIndex",
    "networkCardIndex",
    "maximumNetworkInterfaces",
    "ipv4AddressesPerInterface",
    "privateIpAddress",
    "primary",
    "ipv4Prefix",
    "ipv6Prefix",
    "cidrBlock",
    "availableIpAddressCount",
    "attachmentId",
    "networkInterfaceId",
    "macAddress",
    "status",
    "interfaceType",
    "key",
    "value",
    "bareMetal",
    "hypervisor",
];

// --- instance metadata --------------------------------------------------------------------

mod imds {
    use super::*;
    use ipamd::io::imds::{AwsImds, Imds, ImdsError, ImdsSettings};

    /// Every key ipamd reads (a suffix of its path).
    const KEYS: &[&str] = &[
        "dynamic/instance-identity/document",
        "meta-data/instance-id",
        "meta-data/instance-type",
        "meta-data/placement/availability-zone",
        "meta-data/mac",
        "meta-data/local-ipv4",
        "meta-data/ipv6",
        "interfaces/macs/ ",
        "/device-number",
        "/network-card",
        "/interface-id",
        "/subnet-id",
        "/subnet-ipv4-cidr-block",
        "/vpc-id",
        "/vpc-ipv4-cidr-blocks",
        "/security-group-ids",
        "/local-ipv4s",
        "/ipv4-prefix",
        "/ipv6s",
        "/ipv6-prefix",
        "/subnet-ipv6-cidr-blocks",
        "/vpc-ipv6-cidr-blocks",
    ];

    /// Spoils for a plain-text metadata value.
    fn value_spoil() -> impl Strategy<Value = Spoil> {
        prop_oneof![
            4 => text_value().prop_map(Spoil::Whole),
            1 => any::<u16>().prop_map(Spoil::Truncate),
            1 => any::<u16>().prop_map(Spoil::NotUtf8),
            1 => Just(Spoil::Empty),
            1 => (1u16..4000).prop_map(Spoil::Lines),
            1 => prop::sample::select(vec![400u16, 404]).prop_map(Spoil::Status),
        ]
    }

    /// Route table ids the kernel keeps for itself.
    fn usable_table(card: u32, dev: u32) -> bool {
        let t = if card == 0 {
            if dev == 0 {
                Some(254)
            } else {
                dev.checked_add(1)
            }
        } else {
            dev.checked_add(100u32.saturating_mul(card))
                .and_then(|x| x.checked_add(10_000))
        };
        t.is_some_and(|t| card == 0 && dev == 0 || !(253..=255).contains(&t) && t != 0)
    }

    fn names_a_path(e: &ImdsError, key: &str) -> bool {
        let (ImdsError::Missing { path }
        | ImdsError::Request { path, .. }
        | ImdsError::Parse { path, .. }
        | ImdsError::OutOfRange { path, .. }) = e;
        !path.is_empty()
            && (e.to_string().contains(key.trim())
                || e.to_string().contains("meta-data")
                || e.to_string().contains("dynamic"))
    }

    async fn read_all(imds: &AwsImds) -> Result<(), ImdsError> {
        let id = imds.identity().await?;
        let enis = imds.enis(&id.primary_mac).await?;
        for e in &enis {
            assert!(
                usable_table(e.network_card, e.device_number),
                "device-number {} network-card {} accepted",
                e.device_number,
                e.network_card
            );
            imds.eni_v6(&e.mac).await?;
        }
        imds.node_ipv6().await?;
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn every_imds_key_mangled_is_parsed_or_named(which in 0..KEYS.len(), how in value_spoil()) {
            let _one = exclusive();
            let b = bench();
            let key = KEYS[which];
            b.imds.set(key, how.clone());
            let imds = AwsImds::new(&ImdsSettings {
                endpoint: Some(b.imds.url_for(&b.node.imds_url())),
                http_timeout: Duration::from_secs(2),
            })
            .unwrap();
            let r = runtime().block_on(async {
                tokio::time::timeout(Duration::from_secs(60), read_all(&imds)).await
            });
            let r = r.map_err(|_| TestCaseError::fail(format!("IMDS reads hung with {key} spoiled by {how:?}")))?;
            if let Err(e) = &r {
                prop_assert!(names_a_path(e, key), "{} spoiled by {:?}: {}", key, how, e);
            }
            // Only metadata paths are asked for, whatever the MAC list says.
            for s in b.imds.seen() {
                let path = s.split_whitespace().nth(1).unwrap_or("");
                let path = &path[path.find("/latest/").unwrap_or(0)..];
                prop_assert!(
                    (path.starts_with("/latest/meta-data/") || path.starts_with("/latest/dynamic/") || path == "/latest/api/token")
                        && !path.split('/').any(|seg| seg == ".." || seg == "."),
                    "request for {:?} after {} spoiled by {:?}", path, key, how
                );
            }
        }
    }
}

// --- EC2 answers --------------------------------------------------------------------------

fn ec2_client() -> &'static ipamd::io::ec2::aws::AwsEc2 {
    ec2::client()
}

mod ec2 {
    use super::*;
    use ipamd::io::ec2::aws::{AwsEc2, AwsSettings};
    use ipamd::io::ec2::{Addresses, CreateEni, Ec2Api, Ec2Error};

    pub(super) fn client() -> &'static AwsEc2 {
        static C: std::sync::OnceLock<AwsEc2> = std::sync::OnceLock::new();
        C.get_or_init(|| {
            runtime().block_on(AwsEc2::new(&AwsSettings {
                region: SIM_REGION.into(),
                endpoint: Some(bench().ec2.url_for(&bench().node.ec2_url())),
                http_timeout: Duration::from_secs(2),
                version: "fuzz".into(),
                static_credentials: Some((SIM_CREDENTIALS.0.into(), SIM_CREDENTIALS.1.into())),
            }))
        })
    }

    /// The calls ipamd makes, by the action they send.
    const CALLS: &[&str] = &[
        "DescribeNetworkInterfaces",
        "DescribeNetworkInterfaces/leaked",
        "DescribeInstances",
        "DescribeInstanceTypes",
        "DescribeSubnets",
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "ModifyNetworkInterfaceAttribute",
        "AssignPrivateIpAddresses",
        "AssignPrivateIpAddresses/prefixes",
        "UnassignPrivateIpAddresses",
        "AssignIpv6Addresses",
        "CreateTags",
        "DetachNetworkInterface",
        "DeleteNetworkInterface",
    ];

    fn check_err(call: &str, e: &Ec2Error) -> Result<(), TestCaseError> {
        let action = call.split('/').next().unwrap_or(call);
        prop_assert_eq!(e.action, action);
        prop_assert!(!e.code.is_empty(), "{:?}", e);
        prop_assert!(e.to_string().contains(action));
        prop_assert!(
            e.to_string().len() < 64 * 1024,
            "error of {} bytes",
            e.to_string().len()
        );
        Ok(())
    }

    /// One call with its answer spoiled; the setup and clean-up calls around it are not.
    async fn one(call: &'static str, how: Spoil) -> Result<(), TestCaseError> {
        let b = bench();
        let c = client();
        let node = &b.node;
        let req = CreateEni {
            subnet_id: node.subnet_id.clone(),
            security_groups: vec![node.security_group.clone()],
            description: "aws-K8S-fuzz".into(),
            tags: [("fuzz".to_owned(), "1".to_owned())].into_iter().collect(),
            addresses: Addresses::Ips(1),
        };
        b.ec2.set("", Spoil::None);
        let eni = if call == "CreateNetworkInterface" {
            None
        } else {
            c.create_eni(&req).await.ok()
        };
        let needs_attachment = matches!(
            call,
            "ModifyNetworkInterfaceAttribute" | "DetachNetworkInterface"
        );
        let mut attachment = None;
        if let (Some(e), true) = (&eni, needs_attachment) {
            let used = c
                .used_device_indexes(&node.instance_id)
                .await
                .unwrap_or_default();
            let dev = (1..15u32)
                .find(|d| !used.iter().any(|(_, u)| u == d))
                .unwrap_or(2);
            attachment = c.attach_eni(&e.id, &node.instance_id, dev, 0).await.ok();
        }
        let eni_id = eni
            .as_ref()
            .map(|e| e.id.clone())
            .unwrap_or_else(|| "eni-0000".into());
        let action = call.split('/').next().unwrap_or(call);
        b.ec2.set(&format!(" {action}"), how.clone());
        let res: Result<String, Ec2Error> = match call {
            "DescribeNetworkInterfaces" => c
                .describe_enis(std::slice::from_ref(&eni_id))
                .await
                .map(|v| format!("{}", v.len())),
            "DescribeNetworkInterfaces/leaked" => c
                .describe_leaked_candidates(&node.vpc_id, Some("c"))
                .await
                .map(|v| format!("{}", v.len())),
            "DescribeInstances" => c
                .used_device_indexes(&node.instance_id)
                .await
                .map(|v| format!("{v:?}")),
            "DescribeInstanceTypes" => c.describe_instance_type("m5.large").await.map(|t| {
                // What the daemon computes from it (NodeLimits, prefix mode) must not overflow.
                assert!(
                    t.ipv4_per_eni
                        .checked_mul(16)
                        .and_then(|x| x.checked_mul(t.max_enis))
                        .is_some(),
                    "limits {t:?} accepted"
                );
                format!("{t:?}")
            }),
            "DescribeSubnets" => c
                .describe_subnets(&node.vpc_id, SIM_AZ)
                .await
                .map(|v| format!("{}", v.len())),
            "CreateNetworkInterface" => c.create_eni(&req).await.map(|e| e.id),
            "AttachNetworkInterface" => {
                let used = {
                    b.ec2.set("", Spoil::None);
                    let u = c
                        .used_device_indexes(&node.instance_id)
                        .await
                        .unwrap_or_default();
                    b.ec2.set(&format!(" {action}"), how.clone());
                    u
                };
                let dev = (1..15u32)
                    .find(|d| !used.iter().any(|(_, u)| u == d))
                    .unwrap_or(1);
                let r = c.attach_eni(&eni_id, &node.instance_id, dev, 0).await;
                if let Ok(a) = &r {
                    attachment = Some(a.clone());
                }
                r
            }
            "ModifyNetworkInterfaceAttribute" => c
                .set_delete_on_termination(&eni_id, attachment.as_deref().unwrap_or("eni-attach-0"))
                .await
                .map(|()| String::new()),
            "AssignPrivateIpAddresses" => c
                .assign(&eni_id, Addresses::Ips(2))
                .await
                .map(|a| format!("{a:?}")),
            "AssignPrivateIpAddresses/prefixes" => c
                .assign(&eni_id, Addresses::Prefixes(1))
                .await
                .map(|a| format!("{a:?}")),
            "UnassignPrivateIpAddresses" => {
                let ip = eni.as_ref().and_then(|e| e.secondary_ips.first().copied());
                c.unassign_ips(&eni_id, &ip.into_iter().collect::<Vec<_>>())
                    .await
                    .map(|()| String::new())
            }
            "AssignIpv6Addresses" => c
                .assign_ipv6_prefixes(&eni_id, 1)
                .await
                .map(|p| format!("{p:?}")),
            "CreateTags" => c
                .create_tags(
                    &eni_id,
                    &[("k".to_owned(), "v".to_owned())].into_iter().collect(),
                )
                .await
                .map(|()| String::new()),
            "DetachNetworkInterface" => c
                .detach_eni(attachment.as_deref().unwrap_or("eni-attach-0"))
                .await
                .map(|()| {
                    attachment = None;
                    String::new()
                }),
            "DeleteNetworkInterface" => c.delete_eni(&eni_id).await.map(|()| String::new()),
            other => unreachable!("{other}"),
        };
        if let Err(e) = &res {
            check_err(call, e)?;
        }
        // Clean up unspoiled: whatever the spoiled call did, the node is left as it was.
        b.ec2.set("", Spoil::None);
        if let Some(a) = attachment {
            let _ = c.detach_eni(&a).await;
        }
        if let Some(e) = eni {
            let _ = c.delete_eni(&e.id).await;
        }
        if call == "CreateNetworkInterface" {
            if let Ok(id) = res {
                let _ = c.delete_eni(&id).await;
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(96))]

        #[test]
        fn every_ec2_answer_mangled_is_parsed_or_a_clear_error(which in 0..CALLS.len(), how in a_spoil()) {
            let call = CALLS[which];
            let _one = exclusive();
            let _ = (bench(), client());
            let r = runtime().block_on(async {
                tokio::time::timeout(Duration::from_secs(60), one(call, how.clone())).await
            });
            match r {
                Ok(r) => r?,
                Err(_) => return Err(TestCaseError::fail(format!("{call} hung with its answer spoiled by {how:?}"))),
            }
        }
    }
}

// --- introspection and metrics servers ----------------------------------------------------

mod servers {
    use super::*;
    use std::collections::BTreeMap;

    use ipamd::serve::introspect::{
        EniInfos, IntrospectServer, IntrospectSource, IpamdEnvSettings, NetworkUtilsEnvSettings,
    };
    use ipamd::serve::metrics::{Metrics, MetricsServer};

    struct Source;

    impl IntrospectSource for Source {
        async fn enis(&self) -> BTreeMap<u32, EniInfos> {
            BTreeMap::new()
        }
        async fn eni_config_name(&self) -> Option<String> {
            Some("default".into())
        }
        fn ipamd_env_settings(&self) -> IpamdEnvSettings {
            IpamdEnvSettings::default()
        }
        fn networkutils_env_settings(&self) -> NetworkUtilsEnvSettings {
            NetworkUtilsEnvSettings::default()
        }
    }

    /// The two servers on loopback, started once: (introspection, metrics).
    fn servers() -> (SocketAddr, SocketAddr) {
        static S: std::sync::OnceLock<(SocketAddr, SocketAddr)> = std::sync::OnceLock::new();
        *S.get_or_init(|| {
            runtime().block_on(async {
                let i = IntrospectServer::bind("127.0.0.1:0").await.unwrap();
                let ia = i.local_addr().unwrap();
                tokio::spawn(i.run(Arc::new(Source), std::future::pending()));
                let m = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
                    .await
                    .unwrap();
                let ma = m.local_addr().unwrap();
                let metrics = Metrics::new().unwrap();
                tokio::spawn(m.run(metrics.registry().clone(), std::future::pending()));
                (ia, ma)
            })
        })
    }

    /// Sends `bytes`, half-closes, reads what comes back (bounded by the servers' own 5 s
    /// read and write timeouts, and 12 s here).
    async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Result<Vec<u8>, String> {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        // A server that hangs up early is fine: keep what it said.
        let _ = s.write_all(bytes).await;
        if half_close {
            let _ = s.shutdown().await;
        }
        let mut out = Vec::new();
        match tokio::time::timeout(Duration::from_secs(12), s.read_to_end(&mut out)).await {
            Ok(_) => Ok(out),
            Err(_) => Err("no end of answer within 12 s".into()),
        }
    }

    async fn good(addr: SocketAddr, path: &str) -> bool {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        exchange(addr, req.as_bytes(), false)
            .await
            .is_ok_and(|a| a.starts_with(b"HTTP/1.1 200"))
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        let base = prop_oneof![
            Just(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            Just(b"GET /v1/enis HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            Just(
                b"POST /v1/enis HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                    .to_vec()
            ),
            Just(b"GET /metrics HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec()),
            Just(b"GET /metrics HTTP/9.9\r\n\r\n".to_vec()),
            Just(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec()),
            Just(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
            Just(format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(70_000)).into_bytes()),
            Just(format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(2_000)).into_bytes()),
            Just(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "b".repeat(1 << 20)).into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..512),
        ];
        (
            base,
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        )
            .prop_map(|(mut b, edits)| {
                for (i, x) in edits {
                    if !b.is_empty() {
                        let i = i.index(b.len());
                        b[i] = x;
                    }
                }
                b
            })
    }

    proptest! {
        #![proptest_config(cases(64))]

        #[test]
        fn raw_http_bytes_never_stop_the_servers(bytes in request(), metrics in any::<bool>()) {
            let _one = exclusive();
            let (ia, ma) = servers();
            let addr = if metrics { ma } else { ia };
            runtime().block_on(async {
                let r = exchange(addr, &bytes, true).await;
                prop_assert!(r.is_ok(), "{:?}", r);
                prop_assert!(good(ia, "/v1/enis").await, "introspection stopped answering");
                prop_assert!(good(ma, "/metrics").await, "metrics stopped answering");
                Ok(())
            })?;
        }
    }
}

/// The bench works: unspoiled answers go through the proxy and parse.
#[test]
fn the_proxy_passes_real_answers() {
    use ipamd::io::ec2::Ec2Api;
    let _one = exclusive();
    let b = bench();
    let c = ec2_client();
    runtime().block_on(async {
        b.ec2.set("", Spoil::None);
        let subnets = c
            .describe_subnets(&b.node.vpc_id, SIM_AZ)
            .await
            .expect("subnets");
        assert!(!subnets.is_empty());
        let used = c
            .used_device_indexes(&b.node.instance_id)
            .await
            .expect("instances");
        assert!(!used.is_empty());
        let seen = b.ec2.seen();
        assert!(
            seen.iter().any(|s| s.ends_with(" DescribeSubnets")),
            "{seen:?}"
        );
    });
}

/// Found by `every_ec2_answer_mangled_is_parsed_or_a_clear_error` (`NextToken("again")`):
/// an endpoint that answers every page with the same `NextToken` kept the leaked-ENI scan
/// paging for ever (6,262 pages in 20 s here, its list growing); a repeated token now ends
/// it with an error.
#[test]
fn regression_endless_pagination_ends_with_an_error() {
    use ipamd::io::ec2::Ec2Api;
    let _one = exclusive();
    let b = bench();
    let c = ec2_client();
    runtime().block_on(async {
        b.ec2.set(
            " DescribeNetworkInterfaces",
            Spoil::NextToken("again".into()),
        );
        let leaked = tokio::time::timeout(
            Duration::from_secs(20),
            c.describe_leaked_candidates(&b.node.vpc_id, None),
        )
        .await;
        let pages = b.ec2.seen().len();
        b.ec2.set("", Spoil::None);
        let e = leaked
            .unwrap_or_else(|_| panic!("pagination still going after {pages} pages"))
            .expect_err("refused");
        assert_eq!(e.code, "BadAnswer");
        assert!(e.to_string().contains("NextToken"), "{e}");
        assert_eq!(pages, 2, "stops at the first repeat");
    });
}

/// Found by `every_imds_key_mangled_is_parsed_or_named` (`/network-card` = `2147483647`):
/// any `network-card` or `device-number` that parsed as a u32 was taken, and the ENI's route
/// table (`10000 + device + 100 × card`) then overflows; `device-number` 253 made table 254,
/// the main table. Both are now refused above 99, naming the key.
#[test]
fn regression_imds_device_and_card_numbers_past_99_are_refused() {
    use ipamd::io::imds::{AwsImds, Imds, ImdsError, ImdsSettings};
    let _one = exclusive();
    let b = bench();
    runtime().block_on(async {
        let imds = AwsImds::new(&ImdsSettings {
            endpoint: Some(b.imds.url_for(&b.node.imds_url())),
            http_timeout: Duration::from_secs(2),
        })
        .unwrap();
        for (key, value) in [
            ("/network-card", "2147483647"),
            ("/device-number", "253"),
            ("/device-number", "4294967295"),
        ] {
            b.imds.set(key, Spoil::Whole(value.into()));
            let id = imds.identity().await.expect("identity");
            let e = imds.enis(&id.primary_mac).await.expect_err("refused");
            assert!(
                matches!(e, ImdsError::OutOfRange { .. }),
                "{key}={value}: {e}"
            );
            assert!(e.to_string().contains(key.trim_start_matches('/')), "{e}");
        }
        b.imds.set("", Spoil::None);
        let id = imds.identity().await.expect("identity");
        assert!(imds.enis(&id.primary_mac).await.expect("enis").len() >= 2);
    });
}

/// Found with the `Element` spoil of `every_ec2_answer_mangled_is_parsed_or_a_clear_error`
/// (`maximumNetworkInterfaces` = `2147483647`): any positive limit was taken from
/// `DescribeInstanceTypes`, and the pool's addresses per ENI × 16 × ENIs then overflows.
#[test]
fn regression_absurd_instance_type_limits_are_refused() {
    use ipamd::io::ec2::Ec2Api;
    let _one = exclusive();
    let b = bench();
    let c = ec2_client();
    runtime().block_on(async {
        for element in ["maximumNetworkInterfaces", "ipv4AddressesPerInterface"] {
            b.ec2.set(
                " DescribeInstanceTypes",
                Spoil::Element(element, "2147483647".into()),
            );
            let e = c
                .describe_instance_type("m5.large")
                .await
                .expect_err("refused");
            assert_eq!(e.code, "BadAnswer");
            assert!(e.to_string().contains(element), "{e}");
        }
        b.ec2.set("", Spoil::None);
        let t = c.describe_instance_type("m5.large").await.expect("limits");
        assert!(t.max_enis >= 1 && t.ipv4_per_eni >= 1);
    });
}
