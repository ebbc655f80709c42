//! Introspection HTTP endpoints of the reference daemon (spec/ipamd.md section 6.2).
//!
//! The daemon implements [`IntrospectSource`]; [`serve`] answers, on `host:port` or on a unix
//! socket (`unix:/path`):
//! - `GET /v1/enis`: the datastore per network card, [`EniInfos`] keyed by card index;
//! - `GET /v1/eni-configs`: the node's ENIConfig name as a JSON string (404 when the node
//!   cannot be read);
//! - `GET /v1/ipamd-env-settings` and `GET /v1/networkutils-env-settings`;
//! - `GET /` and any other path: `{"AvailableCommands":[...]}`.
//!
//! Connections get the reference's 5 s read and 5 s write timeouts (one request per
//! connection, at most 10 s in all), and [`HttpLimits`] (shared with the metrics listener):
//! request head at most 16 KiB (431 past it), no request body over 4 KiB nor of unknown length
//! (413), at most 64 connections at once (503 past it). The JSON shapes are the reference's, field for field;
//! an address's container id and interface name are not even representable here
//! ([`IpamKey`] holds only the network name and always writes them as `""`), because they
//! are what a caller needs to forge a DelNetwork.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// Default introspection bind address of the reference daemon.
pub const DEFAULT_INTROSPECTION_BIND: &str = "127.0.0.1:61679";

/// Read timeout of an introspection connection (the reference's `ReadTimeout`).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Write timeout of an introspection connection (the reference's `WriteTimeout`).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one client may make an introspection or metrics listener hold. Past each limit the
/// client gets a clear HTTP error (or, for a slow client, a closed connection) and every other
/// client is still served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// The request line and headers must arrive within this (slowloris); the connection is
    /// closed after it.
    pub read_timeout: Duration,
    /// The whole exchange is bounded by `read_timeout + write_timeout`.
    pub write_timeout: Duration,
    /// Request line plus headers, bytes; past it: `431 Request Header Fields Too Large`.
    pub max_header_bytes: usize,
    /// A declared request body longer than this, or one of unknown length (chunked): `413`.
    /// The endpoints take no body.
    pub max_body_bytes: u64,
    /// Connections at once; one more is answered `503 Service Unavailable` and closed.
    pub max_connections: usize,
}

/// Default of [`HttpLimits::max_header_bytes`] (16 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default of [`HttpLimits::max_body_bytes`] (4 KiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024;
/// Default of [`HttpLimits::max_connections`].
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 64;

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            read_timeout: READ_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
        }
    }
}

/// The commands listed by `GET /` (and any unknown path).
pub const AVAILABLE_COMMANDS: &[&str] = &[
    "/v1/enis",
    "/v1/eni-configs",
    "/v1/networkutils-env-settings",
    "/v1/ipamd-env-settings",
];

/// Errors of the introspection (and metrics) HTTP listeners.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// The bind address could not be bound.
    #[error("cannot listen on {bind}")]
    Bind {
        /// The bind address as given.
        bind: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bind address is malformed.
    #[error("invalid bind address {0:?} (expected host:port, :port or unix:/path)")]
    BadBindAddress(String),
}

/// What the daemon exposes to the introspection endpoints. Implemented by the daemon; the
/// server holds it in an `Arc` and calls it once per request.
pub trait IntrospectSource: Send + Sync + 'static {
    /// `GET /v1/enis`: the datastore of each managed network card, keyed by card index.
    fn enis(&self) -> impl Future<Output = BTreeMap<u32, EniInfos>> + Send;
    /// `GET /v1/eni-configs`: the ENIConfig name selected for this node (by the reference's
    /// label/annotation order), or `None` when the node cannot be read (answered with 404).
    fn eni_config_name(&self) -> impl Future<Output = Option<String>> + Send;
    /// `GET /v1/ipamd-env-settings`.
    fn ipamd_env_settings(&self) -> IpamdEnvSettings;
    /// `GET /v1/networkutils-env-settings`.
    fn networkutils_env_settings(&self) -> NetworkUtilsEnvSettings;
}

/// One network card's datastore (`datastore.ENIInfos` of the reference).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EniInfos {
    /// Addresses in the datastore (prefixes count 16).
    #[serde(rename = "TotalIPs")]
    pub total_ips: i64,
    /// Addresses assigned to pods.
    #[serde(rename = "AssignedIPs")]
    pub assigned_ips: i64,
    /// ENIs by id.
    #[serde(rename = "ENIs")]
    pub enis: BTreeMap<String, EniInfo>,
}

/// One ENI (`datastore.ENI`'s exported fields).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EniInfo {
    /// ENI id, `eni-...`.
    #[serde(rename = "ID")]
    pub id: String,
    /// The instance's primary ENI.
    #[serde(rename = "IsPrimary")]
    pub is_primary: bool,
    /// A trunk ENI (security groups for pods).
    #[serde(rename = "IsTrunk")]
    pub is_trunk: bool,
    /// An EFA ENI.
    #[serde(rename = "IsEFA")]
    pub is_efa: bool,
    /// Device number (0 is the primary ENI).
    #[serde(rename = "DeviceNumber")]
    pub device_number: i64,
    /// IPv4 /32s and /28 prefixes by CIDR string (`10.0.0.5/32`, `10.0.0.16/28`).
    #[serde(rename = "AvailableIPv4Cidrs")]
    pub available_ipv4_cidrs: BTreeMap<String, CidrInfo>,
    /// IPv6 prefixes by CIDR string.
    #[serde(rename = "IPv6Cidrs")]
    pub ipv6_cidrs: BTreeMap<String, CidrInfo>,
    /// Excluded from pod IP allocation (subnet exclusion).
    #[serde(rename = "IsExcludedForPodIPs")]
    pub is_excluded_for_pod_ips: bool,
    /// Host route table of the ENI.
    #[serde(rename = "RouteTableID")]
    pub route_table_id: i64,
    /// Subnet of the ENI.
    #[serde(rename = "SubnetID")]
    pub subnet_id: String,
}

/// A /32 or a prefix on an ENI (`datastore.CidrInfo`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CidrInfo {
    /// The CIDR, written as Go's `net.IPNet` (`{"IP":"10.0.0.16","Mask":"////8A=="}`).
    #[serde(rename = "Cidr")]
    pub cidr: IpNet,
    /// Addresses handed out from this CIDR at least once, by address.
    #[serde(rename = "IPAddresses")]
    pub ip_addresses: BTreeMap<String, AddressInfo>,
    /// A delegated prefix rather than a single secondary address.
    #[serde(rename = "IsPrefix")]
    pub is_prefix: bool,
    /// Address family as the reference fills it (usually `""`).
    #[serde(rename = "AddressFamily")]
    pub address_family: String,
}

/// One address (`datastore.AddressInfo`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AddressInfo {
    /// The address.
    #[serde(rename = "Address")]
    pub address: String,
    /// The owning sandbox's key, scrubbed.
    #[serde(rename = "IPAMKey")]
    pub ipam_key: IpamKey,
    /// Pod metadata.
    #[serde(rename = "IPAMMetadata")]
    pub ipam_metadata: IpamMetadata,
    /// When it was assigned (`None` = never: Go's zero time).
    #[serde(rename = "AssignedTime", serialize_with = "serialize_go_time")]
    pub assigned_time: Option<SystemTime>,
    /// When it was last unassigned (`None` = never).
    #[serde(rename = "UnassignedTime", serialize_with = "serialize_go_time")]
    pub unassigned_time: Option<SystemTime>,
}

/// The sandbox key of an address with the container id and interface name scrubbed by
/// construction: it is written `{"networkName":..,"containerID":"","ifName":""}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpamKey {
    /// CNI network name (`aws-cni`), empty for an unassigned address.
    pub network_name: String,
}

impl Serialize for IpamKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("IPAMKey", 3)?;
        st.serialize_field("networkName", &self.network_name)?;
        st.serialize_field("containerID", "")?;
        st.serialize_field("ifName", "")?;
        st.end()
    }
}

/// Pod metadata of an address (`datastore.IPAMMetadata`; empty fields omitted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IpamMetadata {
    /// Pod namespace.
    #[serde(rename = "k8sPodNamespace", skip_serializing_if = "String::is_empty")]
    pub k8s_pod_namespace: String,
    /// Pod name.
    #[serde(rename = "k8sPodName", skip_serializing_if = "String::is_empty")]
    pub k8s_pod_name: String,
    /// Interfaces of a multi-NIC pod.
    #[serde(rename = "interfacesCount", skip_serializing_if = "is_zero")]
    pub interfaces_count: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// An address and prefix length, serialized as Go's `net.IPNet`: `IP` as text and `Mask` as
/// the base64 of the mask bytes (4 for IPv4, 16 for IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
}

impl IpNet {
    /// The mask bytes.
    pub fn mask(&self) -> Vec<u8> {
        let bits = match self.addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let len = u32::from(self.prefix_len.min(bits));
        (0..bits / 8)
            .map(|i| {
                let start = u32::from(i) * 8;
                let ones = len.saturating_sub(start).min(8);
                if ones == 0 {
                    0
                } else {
                    0xffu8 << (8 - ones)
                }
            })
            .collect()
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s}: no /len"))?;
        let addr: IpAddr = addr.parse().map_err(|e| format!("{s}: {e}"))?;
        let prefix_len: u8 = len.parse().map_err(|e| format!("{s}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("{s}: prefix length over {max}"));
        }
        Ok(IpNet { addr, prefix_len })
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("IPNet", 2)?;
        st.serialize_field("IP", &self.addr.to_string())?;
        st.serialize_field("Mask", &base64(&self.mask()))?;
        st.end()
    }
}

/// `GET /v1/ipamd-env-settings` (the reference's ipamd `GetConfigForDebug`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IpamdEnvSettings {
    /// `WARM_IP_TARGET`.
    #[serde(rename = "WARM_IP_TARGET")]
    pub warm_ip_target: i64,
    /// `WARM_ENI_TARGET`.
    #[serde(rename = "WARM_ENI_TARGET")]
    pub warm_eni_target: i64,
    /// `AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG`.
    #[serde(rename = "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG")]
    pub custom_network_cfg: bool,
    /// `AWS_MANAGE_ENIS_NON_SCHEDULABLE`.
    #[serde(rename = "AWS_MANAGE_ENIS_NON_SCHEDULABLE")]
    pub manage_enis_non_schedulable: bool,
    /// `ENABLE_SUBNET_DISCOVERY`.
    #[serde(rename = "ENABLE_SUBNET_DISCOVERY")]
    pub enable_subnet_discovery: bool,
}

/// The SNAT port randomization mode, written as the reference's enum number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SnatMode {
    /// `none`: sequential ports (0).
    Sequential,
    /// `hashrandom`: `--random` (1).
    #[default]
    HashRandom,
    /// `prng`: `--random-fully` (2).
    Prng,
}

impl Serialize for SnatMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(match self {
            SnatMode::Sequential => 0,
            SnatMode::HashRandom => 1,
            SnatMode::Prng => 2,
        })
    }
}

/// `GET /v1/networkutils-env-settings` (the reference's networkutils `GetConfigForDebug`).
/// Empty CIDR lists are written as `null`, as the reference's nil slices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetworkUtilsEnvSettings {
    /// `AWS_VPC_K8S_CNI_CONNMARK`.
    #[serde(rename = "AWS_VPC_K8S_CNI_CONNMARK")]
    pub connmark: u32,
    /// `AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS` (valid entries).
    #[serde(
        rename = "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS",
        serialize_with = "serialize_nil_slice"
    )]
    pub exclude_snat_cidrs: Vec<String>,
    /// `AWS_VPC_K8S_CNI_EXTERNALSNAT`.
    #[serde(rename = "AWS_VPC_K8S_CNI_EXTERNALSNAT")]
    pub external_snat: bool,
    /// `AWS_EXTERNAL_SERVICE_CIDRS` (valid entries).
    #[serde(
        rename = "AWS_EXTERNAL_SERVICE_CIDRS",
        serialize_with = "serialize_nil_slice"
    )]
    pub external_service_cidrs: Vec<String>,
    /// `AWS_VPC_ENI_MTU`.
    #[serde(rename = "AWS_VPC_ENI_MTU")]
    pub eni_mtu: i64,
    /// `AWS_VPC_K8S_CNI_VETHPREFIX`.
    #[serde(rename = "AWS_VPC_K8S_CNI_VETHPREFIX")]
    pub veth_prefix: String,
    /// `AWS_VPC_CNI_NODE_PORT_SUPPORT`.
    #[serde(rename = "AWS_VPC_CNI_NODE_PORT_SUPPORT")]
    pub node_port_support: bool,
    /// `AWS_VPC_K8S_CNI_RANDOMIZESNAT` (0 none, 1 hashrandom, 2 prng).
    #[serde(rename = "AWS_VPC_K8S_CNI_RANDOMIZESNAT")]
    pub randomize_snat: SnatMode,
}

fn serialize_nil_slice<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        v.serialize(s)
    }
}

fn serialize_go_time<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&go_rfc3339_nano(*t))
}

/// A time as Go's `time.RFC3339Nano` in UTC (fraction without trailing zeros); `None` and
/// times before 1970 as Go's zero time `0001-01-01T00:00:00Z`.
pub fn go_rfc3339_nano(t: Option<SystemTime>) -> String {
    let Some(since) = t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) else {
        return "0001-01-01T00:00:00Z".to_owned();
    };
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let mut out = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = since.subsec_nanos();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        let _ = write!(out, ".{}", frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing shared with the metrics server
// ---------------------------------------------------------------------------------------------

/// A request handler: path in, response out.
pub(crate) type Route = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>> + Send + Sync,
>;

pub(crate) fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot serialize introspection response");
            text_response(StatusCode::INTERNAL_SERVER_ERROR, "serialization failed\n")
        }
    }
}

#[derive(Debug)]
enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound HTTP listener, TCP or unix socket, with its [`HttpLimits`].
#[derive(Debug)]
pub struct HttpListener {
    kind: ListenerKind,
    limits: HttpLimits,
}

impl HttpListener {
    /// Binds `host:port`, `:port` (all IPv4 interfaces) or `unix:/path` (a stale socket file at
    /// the path is replaced; it is removed again when the server stops).
    pub async fn bind(bind: &str) -> Result<HttpListener, IntrospectError> {
        let err = |source| IntrospectError::Bind {
            bind: bind.to_owned(),
            source,
        };
        if let Some(path) = bind.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(IntrospectError::BadBindAddress(bind.to_owned()));
            }
            let path = PathBuf::from(path);
            remove_stale_socket(&path).map_err(err)?;
            let listener = UnixListener::bind(&path).map_err(err)?;
            return Ok(HttpListener {
                kind: ListenerKind::Unix(listener, path),
                limits: HttpLimits::default(),
            });
        }
        let addr = match bind.strip_prefix(':') {
            Some(port) => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| IntrospectError::BadBindAddress(bind.to_owned()))?;
                format!("0.0.0.0:{port}")
            }
            None if bind.contains(':') => bind.to_owned(),
            None => return Err(IntrospectError::BadBindAddress(bind.to_owned())),
        };
        let listener = TcpListener::bind(addr.as_str()).await.map_err(err)?;
        Ok(HttpListener {
            kind: ListenerKind::Tcp(listener),
            limits: HttpLimits::default(),
        })
    }

    /// Replaces the default [`HttpLimits`].
    pub fn with_limits(mut self, limits: HttpLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The bound TCP address (`None` for a unix socket).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            ListenerKind::Tcp(l) => l.local_addr().ok(),
            ListenerKind::Unix(..) => None,
        }
    }

    /// Accepts and serves connections until `shutdown` completes.
    pub(crate) async fn run(
        self,
        route: Route,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), IntrospectError> {
        let mut shutdown = std::pin::pin!(shutdown);
        let limits = self.limits;
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        // Refusals are logged at most once a second, with how many there were.
        let (mut refused, mut last_warn) = (0u64, None::<tokio::time::Instant>);
        loop {
            let accepted = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.accept() => accepted,
            };
            let slot = match &accepted {
                Ok(_) => slots.clone().try_acquire_owned().ok(),
                Err(_) => None,
            };
            if accepted.is_ok() && slot.is_none() {
                refused += 1;
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                    tracing::warn!(
                        limit = limits.max_connections,
                        refused,
                        "HTTP listener: too many connections; answered 503"
                    );
                    (refused, last_warn) = (0, Some(now));
                }
            }
            match (accepted, slot) {
                (Ok(Conn::Tcp(stream)), Some(slot)) => {
                    tokio::spawn(serve_connection(stream, route.clone(), limits, slot));
                }
                (Ok(Conn::Unix(stream)), Some(slot)) => {
                    tokio::spawn(serve_connection(stream, route.clone(), limits, slot));
                }
                (Ok(Conn::Tcp(stream)), None) => {
                    tokio::spawn(refuse_busy(stream, limits));
                }
                (Ok(Conn::Unix(stream)), None) => {
                    tokio::spawn(refuse_busy(stream, limits));
                }
                (Err(e), _) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let ListenerKind::Unix(_, path) = &self.kind {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    async fn accept(&self) -> std::io::Result<Conn> {
        match &self.kind {
            ListenerKind::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
            ListenerKind::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The answer to a connection past [`HttpLimits::max_connections`].
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n";

/// Answers a connection over the limit with 503 and closes it; at most `read_timeout` and
/// 64 KiB of the request are read first, so the close does not reset the answer.
async fn refuse_busy<I>(mut io: I, limits: HttpLimits)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut buf = [0u8; 4096];
        let mut read = 0usize;
        // Read the request head (until a blank line) before answering.
        let mut tail = Vec::with_capacity(4);
        while read < 64 * 1024 {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            read += n;
            tail.extend_from_slice(&buf[..n]);
            if tail.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
            let keep = tail.len().saturating_sub(3);
            tail.drain(..keep);
        }
        io.write_all(BUSY_RESPONSE).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(limits.read_timeout, exchange).await;
}

/// Whether a request declares a body over `max` bytes, or one of unknown length.
fn body_too_large(req: &Request<Incoming>, max: u64) -> bool {
    let headers = req.headers();
    if headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > max)
}

async fn serve_connection<I>(
    io: I,
    route: Route,
    limits: HttpLimits,
    _slot: tokio::sync::OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let route = route.clone();
        async move {
            if body_too_large(&req, limits.max_body_bytes) {
                tracing::debug!(method = %req.method(), "http request body too large; 413");
                return Ok::<_, Infallible>(text_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body too large or of unknown length\n",
                ));
            }
            let path = req.uri().path().to_owned();
            tracing::debug!(method = %req.method(), path = %path, "http request");
            Ok::<_, Infallible>(route(path).await)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .keep_alive(false);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout(limits.read_timeout + limits.write_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "http connection ended with an error"),
        Err(_) => tracing::debug!("http connection timed out"),
    }
}

/// Binds, retrying with a backoff from 1 s doubling to 1 min (as the reference), until bound
/// or `shutdown` completes (`None`).
pub(crate) async fn bind_with_backoff<F: Future<Output = ()>>(
    bind: &str,
    mut shutdown: Pin<&mut F>,
) -> Option<HttpListener> {
    let mut delay = Duration::from_secs(1);
    loop {
        match HttpListener::bind(bind).await {
            Ok(listener) => return Some(listener),
            Err(e @ IntrospectError::BadBindAddress(_)) => {
                tracing::error!(error = %e, "not serving");
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, cause = ?std::error::Error::source(&e), retry_in = ?delay, "cannot listen, will retry");
            }
        }
        tokio::select! {
            () = shutdown.as_mut() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

fn introspect_route<S: IntrospectSource>(source: Arc<S>) -> Route {
    Arc::new(move |path: String| {
        let source = source.clone();
        Box::pin(async move {
            match path.as_str() {
                "/v1/enis" => json_response(StatusCode::OK, &source.enis().await),
                "/v1/eni-configs" => match source.eni_config_name().await {
                    Some(name) => json_response(StatusCode::OK, &name),
                    None => text_response(StatusCode::NOT_FOUND, "cannot read the node\n"),
                },
                "/v1/ipamd-env-settings" => {
                    json_response(StatusCode::OK, &source.ipamd_env_settings())
                }
                "/v1/networkutils-env-settings" => {
                    json_response(StatusCode::OK, &source.networkutils_env_settings())
                }
                _ => json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "AvailableCommands": AVAILABLE_COMMANDS }),
                ),
            }
        })
    })
}

/// A bound introspection listener (bind first to learn the port, then
/// [`IntrospectServer::run`]).
#[derive(Debug)]
pub struct IntrospectServer {
    listener: HttpListener,
}

impl IntrospectServer {
    /// Binds `host:port`, `:port` or `unix:/path`.
    pub async fn bind(bind: &str) -> Result<IntrospectServer, IntrospectError> {
        Ok(IntrospectServer {
            listener: HttpListener::bind(bind).await?,
        })
    }

    /// The bound TCP address (`None` for a unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.tcp_addr()
    }

    /// Serves the endpoints from `source` until `shutdown` completes.
    pub async fn run<S: IntrospectSource>(
        self,
        source: Arc<S>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), IntrospectError> {
        self.listener.run(introspect_route(source), shutdown).await
    }
}

/// Binds `bind` (`host:port`, `:port` or `unix:/path`; retried with backoff from 1 s to
/// 1 min while it fails, as the reference) and serves the introspection endpoints from
/// `source` until `shutdown` completes.
pub async fn serve<S: IntrospectSource>(
    bind: &str,
    source: Arc<S>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), IntrospectError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(listener) = bind_with_backoff(bind, shutdown.as_mut()).await else {
        return Ok(());
    };
    tracing::info!(bind, "serving introspection endpoints");
    IntrospectServer { listener }.run(source, shutdown).await
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A minimal HTTP/1.1 client over a real socket, for the server tests.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange<S>(mut stream: S, path: &str) -> (u16, String, String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8(raw).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head/body");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, head.to_owned(), body.to_owned())
    }

    /// `GET path` over TCP: (status, head, body).
    pub(crate) async fn http_get_tcp(
        addr: std::net::SocketAddr,
        path: &str,
    ) -> (u16, String, String) {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        exchange(stream, path).await
    }

    /// `GET path` over a unix socket: (status, head, body).
    pub(crate) async fn http_get_unix(sock: &std::path::Path, path: &str) -> (u16, String, String) {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .expect("connect");
        exchange(stream, path).await
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{http_get_tcp, http_get_unix};
    use super::*;
    use serde_json::{json, Value};

    struct Fixture {
        node_readable: bool,
    }

    fn sample_enis() -> BTreeMap<u32, EniInfos> {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000);
        let mut ips = BTreeMap::new();
        ips.insert(
            "10.0.0.17".to_owned(),
            AddressInfo {
                address: "10.0.0.17".to_owned(),
                ipam_key: IpamKey {
                    network_name: "aws-cni".to_owned(),
                },
                ipam_metadata: IpamMetadata {
                    k8s_pod_namespace: "default".to_owned(),
                    k8s_pod_name: "web-0".to_owned(),
                    interfaces_count: 0,
                },
                assigned_time: Some(t),
                unassigned_time: None,
            },
        );
        let mut cidrs = BTreeMap::new();
        cidrs.insert(
            "10.0.0.16/28".to_owned(),
            CidrInfo {
                cidr: "10.0.0.16/28".parse().expect("cidr"),
                ip_addresses: ips,
                is_prefix: true,
                address_family: String::new(),
            },
        );
        let mut enis = BTreeMap::new();
        enis.insert(
            "eni-0abc".to_owned(),
            EniInfo {
                id: "eni-0abc".to_owned(),
                is_primary: true,
                device_number: 0,
                available_ipv4_cidrs: cidrs,
                route_table_id: 254,
                subnet_id: "subnet-1".to_owned(),
                ..EniInfo::default()
            },
        );
        let mut out = BTreeMap::new();
        out.insert(
            0,
            EniInfos {
                total_ips: 16,
                assigned_ips: 1,
                enis,
            },
        );
        out
    }

    impl IntrospectSource for Fixture {
        async fn enis(&self) -> BTreeMap<u32, EniInfos> {
            sample_enis()
        }
        async fn eni_config_name(&self) -> Option<String> {
            self.node_readable.then(|| "us-west-2a".to_owned())
        }
        fn ipamd_env_settings(&self) -> IpamdEnvSettings {
            IpamdEnvSettings {
                warm_ip_target: 5,
                warm_eni_target: 1,
                custom_network_cfg: true,
                manage_enis_non_schedulable: false,
                enable_subnet_discovery: true,
            }
        }
        fn networkutils_env_settings(&self) -> NetworkUtilsEnvSettings {
            NetworkUtilsEnvSettings {
                connmark: 0x80,
                exclude_snat_cidrs: vec!["192.168.0.0/16".to_owned()],
                external_snat: false,
                external_service_cidrs: Vec::new(),
                eni_mtu: 9001,
                veth_prefix: "eni".to_owned(),
                node_port_support: true,
                randomize_snat: SnatMode::Prng,
            }
        }
    }

    #[test]
    fn go_time_format_matches_rfc3339_nano() {
        assert_eq!(go_rfc3339_nano(None), "0001-01-01T00:00:00Z");
        assert_eq!(go_rfc3339_nano(Some(UNIX_EPOCH)), "1970-01-01T00:00:00Z");
        assert_eq!(
            go_rfc3339_nano(Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000))),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(
            go_rfc3339_nano(Some(UNIX_EPOCH + Duration::new(951_782_400, 1))),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            go_rfc3339_nano(Some(UNIX_EPOCH + Duration::from_secs(4_107_542_399))),
            "2100-02-28T23:59:59Z"
        );
    }

    #[test]
    fn masks_are_go_ipnet_base64() {
        let m = |s: &str| base64(&s.parse::<IpNet>().expect("cidr").mask());
        assert_eq!(m("10.0.0.16/28"), "////8A==");
        assert_eq!(m("10.0.0.5/32"), "/////w==");
        assert_eq!(m("10.0.0.0/0"), "AAAAAA==");
        assert_eq!(m("2001:db8::/80"), "/////////////wAAAAAAAA==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.0".parse::<IpNet>().is_err());
    }

    #[test]
    fn enis_json_has_the_reference_shape_with_sandbox_ids_scrubbed() {
        let v = serde_json::to_value(sample_enis()).expect("json");
        let expected = json!({
          "0": {
            "TotalIPs": 16, "AssignedIPs": 1,
            "ENIs": {
              "eni-0abc": {
                "ID": "eni-0abc", "IsPrimary": true, "IsTrunk": false, "IsEFA": false,
                "DeviceNumber": 0,
                "AvailableIPv4Cidrs": {
                  "10.0.0.16/28": {
                    "Cidr": {"IP": "10.0.0.16", "Mask": "////8A=="},
                    "IPAddresses": {
                      "10.0.0.17": {
                        "Address": "10.0.0.17",
                        "IPAMKey": {"networkName": "aws-cni", "containerID": "", "ifName": ""},
                        "IPAMMetadata": {"k8sPodNamespace": "default", "k8sPodName": "web-0"},
                        "AssignedTime": "2023-11-14T22:13:20.123456Z",
                        "UnassignedTime": "0001-01-01T00:00:00Z"
                      }
                    },
                    "IsPrefix": true, "AddressFamily": ""
                  }
                },
                "IPv6Cidrs": {},
                "IsExcludedForPodIPs": false, "RouteTableID": 254, "SubnetID": "subnet-1"
              }
            }
          }
        });
        assert_eq!(v, expected);
    }

    async fn start(
        bind: &str,
        node_readable: bool,
    ) -> (
        Option<SocketAddr>,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), IntrospectError>>,
    ) {
        let server = IntrospectServer::bind(bind).await.expect("bind");
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(Arc::new(Fixture { node_readable }), async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    fn body_json(body: &str) -> Value {
        serde_json::from_str(body).expect("json body")
    }

    #[tokio::test]
    async fn serves_every_endpoint_over_tcp() {
        let (addr, stop, task) = start("127.0.0.1:0", true).await;
        let addr = addr.expect("tcp");

        let (status, head, body) = http_get_tcp(addr, "/v1/enis").await;
        assert_eq!(status, 200);
        assert!(head
            .to_ascii_lowercase()
            .contains("content-type: application/json"));
        assert_eq!(
            body_json(&body),
            serde_json::to_value(sample_enis()).expect("json")
        );

        let (status, _, body) = http_get_tcp(addr, "/v1/eni-configs").await;
        assert_eq!((status, body_json(&body)), (200, json!("us-west-2a")));

        let (status, _, body) = http_get_tcp(addr, "/v1/ipamd-env-settings").await;
        assert_eq!(status, 200);
        assert_eq!(
            body_json(&body),
            json!({"WARM_IP_TARGET": 5, "WARM_ENI_TARGET": 1,
                   "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": true,
                   "AWS_MANAGE_ENIS_NON_SCHEDULABLE": false,
                   "ENABLE_SUBNET_DISCOVERY": true})
        );

        let (status, _, body) = http_get_tcp(addr, "/v1/networkutils-env-settings").await;
        assert_eq!(status, 200);
        assert_eq!(
            body_json(&body),
            json!({"AWS_VPC_K8S_CNI_CONNMARK": 128,
                   "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": ["192.168.0.0/16"],
                   "AWS_VPC_K8S_CNI_EXTERNALSNAT": false,
                   "AWS_EXTERNAL_SERVICE_CIDRS": null,
                   "AWS_VPC_ENI_MTU": 9001,
                   "AWS_VPC_K8S_CNI_VETHPREFIX": "eni",
                   "AWS_VPC_CNI_NODE_PORT_SUPPORT": true,
                   "AWS_VPC_K8S_CNI_RANDOMIZESNAT": 2})
        );

        for path in ["/", "/v1/pods", "/nope"] {
            let (status, _, body) = http_get_tcp(addr, path).await;
            assert_eq!(status, 200, "{path}");
            let v = body_json(&body);
            let mut cmds: Vec<&str> = v["AvailableCommands"]
                .as_array()
                .expect("array")
                .iter()
                .map(|c| c.as_str().expect("string"))
                .collect();
            cmds.sort_unstable();
            let mut want = AVAILABLE_COMMANDS.to_vec();
            want.sort_unstable();
            assert_eq!(cmds, want, "{path}");
        }

        stop.send(()).expect("alive");
        task.await.expect("join").expect("clean stop");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_no_request_is_closed_by_the_read_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, stop, task) = start("127.0.0.1:0", true).await;
        let mut idle = tokio::net::TcpStream::connect(addr.expect("tcp"))
            .await
            .expect("connect");
        // Half a request line, then silence: the clock (paused, advanced by tokio when every
        // task waits) reaches the 5 s read timeout and the server hangs up.
        idle.write_all(b"GET /v1/en").await.expect("write");
        let mut buf = Vec::new();
        // The reference's 5 s read + 5 s write, and a second of slack.
        let limit = Duration::from_secs(11);
        let read = tokio::time::timeout(limit, idle.read_to_end(&mut buf)).await;
        assert!(
            read.is_ok(),
            "the server kept an idle connection open past its timeouts"
        );
        assert!(
            !String::from_utf8_lossy(&buf).contains("ENIs"),
            "no answer to an incomplete request"
        );
        stop.send(()).expect("alive");
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn eni_configs_is_404_when_the_node_cannot_be_read() {
        let (addr, stop, task) = start("127.0.0.1:0", false).await;
        let (status, _, _) = http_get_tcp(addr.expect("tcp"), "/v1/eni-configs").await;
        assert_eq!(status, 404);
        stop.send(()).expect("alive");
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn serves_on_a_unix_socket_and_removes_it_on_shutdown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("introspect.sock");
        // A stale socket from a previous run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
        let (addr, stop, task) = start(&format!("unix:{}", sock.display()), true).await;
        assert_eq!(addr, None);
        let (status, _, body) = http_get_unix(&sock, "/v1/eni-configs").await;
        assert_eq!((status, body_json(&body)), (200, json!("us-west-2a")));
        stop.send(()).expect("alive");
        task.await.expect("join").expect("clean stop");
        assert!(!sock.exists(), "socket file removed");
    }

    #[tokio::test]
    async fn refuses_to_replace_a_regular_file_and_bad_addresses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"keep me").expect("write");
        let err = IntrospectServer::bind(&format!("unix:{}", file.display()))
            .await
            .expect_err("must not replace a file");
        assert!(matches!(err, IntrospectError::Bind { .. }), "{err:?}");
        assert_eq!(std::fs::read(&file).expect("read"), b"keep me");
        for bad in ["unix:", "61679", ":port"] {
            assert!(
                matches!(
                    IntrospectServer::bind(bad).await,
                    Err(IntrospectError::BadBindAddress(_))
                ),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn serve_stops_while_waiting_to_bind() {
        let busy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = busy.local_addr().expect("addr").to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(
                &addr,
                Arc::new(Fixture {
                    node_readable: true,
                }),
                async {
                    let _ = stopped.await;
                },
            )
            .await
        });
        stop.send(()).expect("alive");
        task.await.expect("join").expect("stopped without serving");
    }
}

#[cfg(test)]
mod limit_tests {
    //! [`HttpLimits`] on a real loopback listener: each limit refuses the bad client with a
    //! clear answer while a good client is served.
    use super::test_support::http_get_tcp;
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn ok_route() -> Route {
        Arc::new(|path: String| {
            Box::pin(async move {
                if path == "/" {
                    text_response(StatusCode::OK, "ok\n")
                } else {
                    text_response(StatusCode::NOT_FOUND, "404 page not found\n")
                }
            })
        })
    }

    async fn start(
        limits: HttpLimits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<(), IntrospectError>>,
    ) {
        let listener = HttpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .with_limits(limits);
        let addr = listener.tcp_addr().expect("tcp");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(listener.run(ok_route(), async {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    /// Sends `raw` and reads the answer to the end: (status, whole text).
    async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("answered and closed");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    #[tokio::test]
    async fn headers_past_the_limit_get_431_and_a_normal_request_is_served() {
        let limits = HttpLimits {
            max_header_bytes: 4096,
            ..HttpLimits::default()
        };
        let (addr, stop, task) = start(limits).await;
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(8192)
        );
        let (status, text) = raw_exchange(addr, big.as_bytes()).await;
        assert_eq!(status, 431, "{text}");
        // Just under the limit: served.
        let fits = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Fits: {}\r\n\r\n",
            "a".repeat(3000)
        );
        let (status, text) = raw_exchange(addr, fits.as_bytes()).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(http_get_tcp(addr, "/").await.0, 200);
        let _ = stop.send(());
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn the_default_header_limit_refuses_40_kib_of_headers() {
        let (addr, stop, task) = start(HttpLimits::default()).await;
        let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..40 {
            raw.extend_from_slice(format!("X-H{i}: {}\r\n", "b".repeat(1000)).as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let (status, text) = raw_exchange(addr, &raw).await;
        assert_eq!(status, 431, "{text}");
        let _ = stop.send(());
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_or_of_unknown_length_gets_413() {
        let (addr, stop, task) = start(HttpLimits::default()).await;
        let declared = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            DEFAULT_MAX_BODY_BYTES + 1
        );
        let (status, text) = raw_exchange(addr, declared.as_bytes()).await;
        assert_eq!(status, 413, "{text}");
        assert!(text.contains("request body too large"), "{text}");
        let chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(raw_exchange(addr, chunked).await.0, 413);
        let small =
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(raw_exchange(addr, small).await.0, 200);
        let _ = stop.send(());
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn a_slow_client_is_cut_off_while_others_are_served() {
        let limits = HttpLimits {
            read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, stop, task) = start(limits).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        // One header byte every 50 ms, never finishing the head, for at most 30 s; the
        // server must close first. A good client is served meanwhile.
        let mut good_served = false;
        let mut closed = false;
        for i in 0..600 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"x").await.is_err() {
                closed = true;
                break;
            }
            let mut probe = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => {
                    // An error answer (408) is also a cut-off; the close follows.
                    closed = true;
                    break;
                }
                Err(_) => {}
            }
            if i == 2 {
                good_served = http_get_tcp(addr, "/").await.0 == 200;
            }
        }
        assert!(closed, "the slow client was never cut off");
        assert!(
            good_served,
            "the good client was served during the slow one"
        );
        let _ = stop.send(());
        task.await.expect("join").expect("clean stop");
    }

    #[tokio::test]
    async fn connections_past_the_limit_get_503_and_a_freed_slot_serves_the_next() {
        let limits = HttpLimits {
            max_connections: 2,
            ..HttpLimits::default()
        };
        let (addr, stop, task) = start(limits).await;
        // Two clients hold the slots with unfinished requests.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
            held.push(s);
        }
        // Accepting is asynchronous: the third may need a moment to see both slots taken.
        let mut refused = String::new();
        for _ in 0..50 {
            let (status, text) = raw_exchange(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if status == 503 {
                refused = text;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused.contains("too many connections"), "{refused:?}");
        // One held client finishes its request and is served.
        let mut first = held.remove(0);
        first
            .write_all(b"Host: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        first.read_to_end(&mut out).await.expect("read");
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
        drop(first);
        // Its slot is free: the next client is served.
        let mut served = false;
        for _ in 0..50 {
            let (status, _) = raw_exchange(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if status == 200 {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served);
        drop(held);
        let _ = stop.send(());
        task.await.expect("join").expect("clean stop");
    }
}
