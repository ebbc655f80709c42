//! Shared by the socket tests: a small in-test ipamd, and a raw HTTP/2 client that writes
//! frames byte by byte, so a test can send what a library client never would (any
//! `:authority`, more streams than the server allows, a header block past the limit).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use vpc_cni_rpc::{
    bind_unix, check_client_version, check_health, health_service_with_limit, serve_listener_with,
    AddNetworkReply, AddNetworkRequest, CniBackend, CniBackendServer, DelNetworkReply,
    DelNetworkRequest, HealthHandle, IpAllocationMetadata, ServeError, ServeLimits,
};

pub const VERSION: &str = "v-test";
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Answers every AddNetwork with 10.0.0.7 and echoes the pod name in `NetworkPolicyMode`;
/// DelNetwork succeeds.
pub struct FakeIpamd;

#[tonic::async_trait]
impl CniBackend for FakeIpamd {
    async fn add_network(
        &self,
        request: Request<AddNetworkRequest>,
    ) -> Result<Response<AddNetworkReply>, Status> {
        let r = request.into_inner();
        check_client_version(&r.client_version, VERSION)?;
        Ok(Response::new(AddNetworkReply {
            success: true,
            ip_allocation_metadata: vec![IpAllocationMetadata {
                i_pv4_addr: "10.0.0.7".into(),
                ..Default::default()
            }],
            network_policy_mode: r.k8s_pod_name,
            ..Default::default()
        }))
    }

    async fn del_network(
        &self,
        request: Request<DelNetworkRequest>,
    ) -> Result<Response<DelNetworkReply>, Status> {
        check_client_version(&request.into_inner().client_version, VERSION)?;
        Ok(Response::new(DelNetworkReply {
            success: true,
            ..Default::default()
        }))
    }
}

pub struct Running {
    pub path: PathBuf,
    pub health: HealthHandle,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

/// Serves [`FakeIpamd`] and health on `path` with `limits`; returns once health answers.
pub async fn start(path: &Path, limits: ServeLimits) -> Running {
    let (health, health_server) = health_service_with_limit(limits.max_message_bytes).await;
    health.set_serving().await;
    let routes = Routes::new(
        CniBackendServer::new(FakeIpamd).max_decoding_message_size(limits.max_message_bytes),
    )
    .add_service(health_server);
    let listener = bind_unix(path).expect("bind");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_listener_with(listener, routes, limits, async {
        let _ = stopped.await;
    }));
    for _ in 0..500 {
        if check_health(path, "", TIMEOUT).await.is_ok() {
            return Running {
                path: path.to_path_buf(),
                health,
                stop,
                task,
            };
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server on {} never answered", path.display());
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("server task did not panic")
            .expect("server stopped cleanly");
    }
}

pub fn add_request(pod: &str) -> AddNetworkRequest {
    AddNetworkRequest {
        client_version: VERSION.into(),
        k8s_pod_name: pod.into(),
        k8s_pod_namespace: "default".into(),
        container_id: "c1".into(),
        if_name: "eth0".into(),
        network_name: "aws-cni".into(),
        ..Default::default()
    }
}

// HTTP/2 frame types and error codes (RFC 9113).
pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;
pub const PROTOCOL_ERROR: u32 = 1;
pub const REFUSED_STREAM: u32 = 7;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 3;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// How the server answered one gRPC call on a stream.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// A response with a message, decoded.
    Reply(AddNetworkReply),
    /// A response without a message (an error status in trailers).
    NoMessage,
    /// The stream was reset with this error code.
    Reset(u32),
    /// The connection was closed with a GOAWAY (error code, debug data).
    GoAway(u32, String),
    /// The connection ended without either.
    Closed,
}

/// One HTTP/2 connection driven frame by frame.
pub struct RawH2 {
    pub io: UnixStream,
    /// The server's SETTINGS (identifier, value), as received.
    pub server_settings: Vec<(u16, u32)>,
}

/// HPACK integer with an `n`-bit prefix whose high bits are `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing and without Huffman coding: exactly
/// the bytes given reach the server.
pub fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The request headers of a gRPC call to `method` with `authority` (`None`: no
/// `:authority` at all) and any extra fields.
pub fn grpc_headers(method: &str, authority: Option<&str>, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![(":method", "POST"), (":scheme", "http"), (":path", method)];
    if let Some(a) = authority {
        fields.push((":authority", a));
    }
    fields.extend_from_slice(&[("content-type", "application/grpc"), ("te", "trailers")]);
    fields.extend_from_slice(extra);
    hpack_literals(&fields)
}

/// A length-prefixed gRPC message.
pub fn grpc_message(m: &impl prost::Message) -> Vec<u8> {
    let body = m.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(&body);
    out
}

impl RawH2 {
    /// Dials `path`, sends the preface and an empty SETTINGS, and acknowledges the server's.
    pub async fn connect(path: &Path) -> RawH2 {
        let mut io = UnixStream::connect(path).await.expect("dial");
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut conn = RawH2 {
            io,
            server_settings: Vec::new(),
        };
        conn.send(SETTINGS, 0, 0, &[]).await;
        loop {
            let f = conn.read().await.expect("server SETTINGS");
            if f.kind == SETTINGS && f.flags & 1 == 0 {
                conn.server_settings = f
                    .payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                conn.send(SETTINGS, 1, 0, &[]).await;
                return conn;
            }
        }
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.io.write_all(&frame).await.unwrap();
    }

    /// Sends a header block on `stream`, split into HEADERS and CONTINUATION frames of at
    /// most 16 KiB; `end_stream` sets END_STREAM on the HEADERS frame.
    pub async fn send_headers(&mut self, stream: u32, block: &[u8], end_stream: bool) {
        let chunks: Vec<&[u8]> = if block.is_empty() {
            vec![block]
        } else {
            block.chunks(16 * 1024).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.iter().enumerate() {
            let end_headers = if i == last { 0x4 } else { 0 };
            if i == 0 {
                let es = if end_stream { 0x1 } else { 0 };
                self.send(HEADERS, end_headers | es, stream, chunk).await;
            } else {
                self.send(CONTINUATION, end_headers, stream, chunk).await;
            }
        }
    }

    /// The next frame, or `None` when the connection is closed (or reset).
    pub async fn read(&mut self) -> Option<Frame> {
        let mut head = [0u8; 9];
        self.io.read_exact(&mut head).await.ok()?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        self.io.read_exact(&mut payload).await.ok()?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream,
            payload,
        })
    }

    /// Reads until `stream` is answered (or reset, or the connection goes away), answering
    /// PINGs on the way.
    pub async fn outcome(&mut self, stream: u32) -> Outcome {
        let mut data = Vec::new();
        loop {
            let Some(f) = tokio::time::timeout(TIMEOUT, self.read())
                .await
                .expect("the server answers within the timeout")
            else {
                return Outcome::Closed;
            };
            match f.kind {
                PING if f.flags & 1 == 0 => self.send(PING, 1, 0, &f.payload).await,
                GOAWAY => {
                    let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                    return Outcome::GoAway(f.error_code(), debug);
                }
                RST_STREAM if f.stream == stream => return Outcome::Reset(f.error_code()),
                DATA if f.stream == stream => data.extend_from_slice(&f.payload),
                HEADERS if f.stream == stream && f.flags & 1 == 1 => {
                    // Trailers (or a trailers-only response): the call is over.
                    if data.len() < 5 {
                        return Outcome::NoMessage;
                    }
                    let reply =
                        AddNetworkReply::decode(&data[5..]).expect("the reply message decodes");
                    return Outcome::Reply(reply);
                }
                _ => {}
            }
        }
    }

    /// A whole AddNetwork call on `stream` with `authority`.
    pub async fn add_network(
        &mut self,
        stream: u32,
        authority: Option<&str>,
        pod: &str,
    ) -> Outcome {
        let block = grpc_headers("/rpc.CNIBackend/AddNetwork", authority, &[]);
        self.send_headers(stream, &block, false).await;
        self.send(DATA, 0x1, stream, &grpc_message(&add_request(pod)))
            .await;
        self.outcome(stream).await
    }
}
