//! The HTTP shell: the EC2 Query API, IMDSv2 and the admin JSON view on loopback listeners,
//! over one shared [`Simulator`].
//!
//! IMDS serves every instance on one listener: `http://ADDR/<instance-id>/latest/...` is that
//! instance's metadata (so `AWS_EC2_METADATA_SERVICE_ENDPOINT=http://ADDR/<instance-id>/` points
//! an SDK client at it), and `http://ADDR/latest/...` is the earliest-launched running instance.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::control::{FaultSpec, LatencyModel, ThrottleConfig};
use crate::query::Params;
use crate::sim::Simulator;

/// Errors of the server shell.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A simulator shared between the listeners, with the clock it runs on.
#[derive(Clone)]
pub struct Shared {
    sim: Arc<Mutex<Simulator>>,
    start: Instant,
}

impl Shared {
    /// Wraps `sim`; simulator time 0 is now.
    pub fn new(sim: Simulator) -> Self {
        Self {
            sim: Arc::new(Mutex::new(sim)),
            start: Instant::now(),
        }
    }

    /// Milliseconds since start: the simulator clock.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs `f` with the simulator locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut Simulator) -> R) -> R {
        let mut g = match self.sim.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut g)
    }
}

/// Where the servers listen once started.
#[derive(Debug)]
pub struct Running {
    /// EC2 Query API address.
    pub ec2: SocketAddr,
    /// IMDS address.
    pub imds: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting connections.
    pub fn shutdown(self) {
        for t in self.tasks {
            t.abort();
        }
    }

    /// The endpoint URL of the EC2 API.
    pub fn ec2_url(&self) -> String {
        format!("http://{}", self.ec2)
    }

    /// The IMDS endpoint URL of one instance (for `AWS_EC2_METADATA_SERVICE_ENDPOINT`).
    pub fn imds_url(&self, instance_id: &str) -> String {
        format!("http://{}/{instance_id}/", self.imds)
    }
}

type Body = Full<Bytes>;

fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn read_body(req: Request<Incoming>) -> Option<Bytes> {
    Limited::new(req.into_body(), 4 << 20)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes())
}

/// The request was deliberately left unanswered (injected timeout).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by fault injection")]
struct Dropped;

async fn ec2(shared: Shared, req: Request<Incoming>) -> Result<Response<Body>, Dropped> {
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (authorization, token) = (header("authorization"), header("x-amz-security-token"));
    if let Err(message) =
        shared.with(|s| s.check_ec2_credentials(authorization.as_deref(), token.as_deref()))
    {
        let e = crate::error::ApiError::new("AuthFailure", message);
        let body = crate::xml::error(&e, "00000000-0000-4000-8000-000000000000");
        return Ok(reply(401, "text/xml;charset=UTF-8", body));
    }
    let query = req.uri().query().map(|q| q.as_bytes().to_vec());
    let is_post = req.method() == Method::POST;
    let body = if is_post {
        read_body(req).await.unwrap_or_default()
    } else {
        Bytes::new()
    };
    let form: &[u8] = if is_post {
        &body
    } else {
        query.as_deref().unwrap_or_default()
    };
    let params = Params::from_form(form);
    let now = shared.now_ms();
    let ans = shared.with(|s| s.handle_query(now, &params));
    if ans.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(ans.delay_ms)).await;
    }
    if ans.drop_connection {
        return Err(Dropped);
    }
    Ok(reply(ans.status, "text/xml;charset=UTF-8", ans.body))
}

async fn imds(shared: Shared, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let (instance, rest) = match path.strip_prefix("/i-") {
        Some(r) => {
            let (id, rest) = r.split_once('/').unwrap_or((r, ""));
            (Some(format!("i-{id}")), format!("/{rest}"))
        }
        None => (None, path.clone()),
    };
    let Some(rel) = rest.strip_prefix("/latest/") else {
        return Ok(reply(404, "text/plain", "Not Found"));
    };
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let now = shared.now_ms();
    if rel == "api/token" {
        if req.method() != Method::PUT {
            return Ok(reply(405, "text/plain", "Method Not Allowed"));
        }
        let ttl = header("x-aws-ec2-metadata-token-ttl-seconds");
        let a = shared.with(|s| s.imds_token(now, ttl.as_deref()));
        let mut r = reply(a.status, "text/plain", a.body);
        if let Some(t) = a.ttl.and_then(|t| t.to_string().parse().ok()) {
            r.headers_mut()
                .insert("x-aws-ec2-metadata-token-ttl-seconds", t);
        }
        return Ok(r);
    }
    if req.method() != Method::GET {
        return Ok(reply(405, "text/plain", "Method Not Allowed"));
    }
    let token = header("x-aws-ec2-metadata-token");
    let a = shared.with(|s| {
        if instance
            .as_ref()
            .is_some_and(|i| !s.model().instances.contains_key(i))
        {
            return crate::sim::ImdsAnswer {
                status: 404,
                body: "Not Found".into(),
                ttl: None,
            };
        }
        s.imds_get(now, instance.as_deref(), token.as_deref(), rel)
    });
    Ok(reply(a.status, "text/plain", a.body))
}

async fn admin(shared: Shared, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let json = |v: serde_json::Value| reply(200, "application/json", v.to_string());
    let bad = |e: String| {
        reply(
            400,
            "application/json",
            serde_json::json!({ "error": e }).to_string(),
        )
    };
    if method == Method::GET {
        return Ok(match path.as_str() {
            "/v1/state" => json(shared.with(|s| s.state_json())),
            "/v1/calls" => {
                let since: u64 = form_urlencoded::parse(query.as_bytes())
                    .find(|(k, _)| k == "since")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                json(shared.with(|s| {
                    let calls: Vec<_> = s.calls().iter().filter(|c| c.seq > since).collect();
                    serde_json::json!(calls)
                }))
            }
            "/v1/imds" => json(shared.with(|s| {
                let ids: Vec<&String> = s.model().instances.keys().collect();
                serde_json::json!({ "default_instance": s.default_instance(), "instances": ids })
            })),
            _ => reply(404, "application/json", "{\"error\":\"not found\"}"),
        });
    }
    if method != Method::PUT {
        return Ok(reply(
            405,
            "application/json",
            "{\"error\":\"method not allowed\"}",
        ));
    }
    let body = read_body(req).await.unwrap_or_default();
    Ok(match path.as_str() {
        "/v1/faults" => {
            match serde_json::from_slice::<std::collections::BTreeMap<String, FaultSpec>>(&body) {
                Ok(f) => {
                    shared.with(|s| s.set_faults(f));
                    json(serde_json::json!({ "ok": true }))
                }
                Err(e) => bad(e.to_string()),
            }
        }
        "/v1/throttle" => match serde_json::from_slice::<ThrottleConfig>(&body) {
            Ok(t) => {
                shared.with(|s| s.set_throttle(t));
                json(serde_json::json!({ "ok": true }))
            }
            Err(e) => bad(e.to_string()),
        },
        "/v1/latency" => match serde_json::from_slice::<LatencyModel>(&body) {
            Ok(l) => {
                shared.with(|s| s.set_latency(l));
                json(serde_json::json!({ "ok": true }))
            }
            Err(e) => bad(e.to_string()),
        },
        "/v1/imds-delay" => match serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["ms"].as_u64())
        {
            Some(ms) => {
                shared.with(|s| s.set_imds_delay(ms));
                json(serde_json::json!({ "ok": true }))
            }
            None => bad("expected {\"ms\": N}".into()),
        },
        _ => reply(404, "application/json", "{\"error\":\"not found\"}"),
    })
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn serve<F, Fut, E>(listener: TcpListener, shared: Shared, handler: F) -> JoinHandle<()>
where
    F: Fn(Shared, Request<Incoming>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handler(shared.clone(), req));
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

/// Binds the three listeners and starts serving `shared` on them (port 0 picks a free port).
pub async fn start(
    shared: Shared,
    ec2_addr: SocketAddr,
    imds_addr: SocketAddr,
    admin_addr: SocketAddr,
) -> Result<Running, ServerError> {
    let (l1, l2, l3) = (
        bind(ec2_addr).await?,
        bind(imds_addr).await?,
        bind(admin_addr).await?,
    );
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let (ec2_a, imds_a, admin_a) = (
        local(&l1, ec2_addr),
        local(&l2, imds_addr),
        local(&l3, admin_addr),
    );
    let tasks = vec![
        serve(l1, shared.clone(), ec2),
        serve(l2, shared.clone(), imds),
        serve(l3, shared, admin),
    ];
    Ok(Running {
        ec2: ec2_a,
        imds: imds_a,
        admin: admin_a,
        tasks,
    })
}
