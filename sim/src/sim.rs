//! The simulator: the model plus everything around a call (throttling, faults, latency, the
//! call log, hooks, instance metadata with its propagation delay), still without IO. The HTTP
//! server is a thin shell over [`Simulator::handle_query`] and [`Simulator::imds_get`]; tests
//! can drive the same object in-process with [`Simulator::call`].

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::api::{Reply, Request};
use crate::control::{
    draw_fault, FaultDecision, FaultSpec, LatencyModel, Throttle, ThrottleConfig,
};
use crate::error::ApiError;
use crate::hooks::{Hooks, NoHooks};
use crate::imds::{CredentialSettings, InstanceMeta, MetaHistory, RoleCredentials};
use crate::model::{check_invariants, EniStatus, InstanceState, Model, ModelConfig};
use crate::query::{self, Params};
use crate::rng::SimRng;
use crate::xml;

/// Everything configurable about a simulator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SimConfig {
    /// Seed of every random choice (the model's and the control plane's).
    #[serde(default)]
    pub seed: u64,
    /// Region.
    #[serde(default)]
    pub region: Option<String>,
    /// How long detaching takes (ms).
    #[serde(default)]
    pub detach_delay_ms: u64,
    /// How long EC2 changes take to show in instance metadata (ms).
    #[serde(default)]
    pub imds_delay_ms: u64,
    /// Throttling.
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// Fault injection per action (`*` = every action).
    #[serde(default)]
    pub faults: BTreeMap<String, FaultSpec>,
    /// Latency model.
    #[serde(default)]
    pub latency: LatencyModel,
    /// Calls kept in the call log (0 = 100,000).
    #[serde(default)]
    pub call_log_limit: usize,
    /// Unix time (ms) of simulator time 0, used for timestamps in answers.
    #[serde(default)]
    pub epoch_ms: u64,
    /// Per-instance-type limit overrides (e.g. `{"m5.large": {"branch_interfaces": 2}}`).
    #[serde(default)]
    pub limit_overrides: BTreeMap<String, subnet_calc::limits::LimitOverrides>,
}

/// One entry of the call log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallRecord {
    /// Sequence number, from 1.
    pub seq: u64,
    /// Simulator time of the call.
    pub at_ms: u64,
    /// Action (or what the request named as its action).
    pub action: String,
    /// Request parameters.
    pub params: Vec<(String, String)>,
    /// `ok` or the error code.
    pub outcome: String,
    /// HTTP status answered (0 when the connection was dropped).
    pub http_status: u16,
    /// Added latency (ms).
    pub latency_ms: u64,
    /// Request id.
    pub request_id: String,
}

/// What the HTTP shell must do with an EC2 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// HTTP status.
    pub status: u16,
    /// XML body.
    pub body: String,
    /// Wait this long before answering.
    pub delay_ms: u64,
    /// Close the connection after the delay instead of answering.
    pub drop_connection: bool,
}

/// An IMDS answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsAnswer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
    /// TTL header to send back (token answers).
    pub ttl: Option<u64>,
}

/// The simulator. Not thread-safe by itself; the server wraps it in a mutex.
pub struct Simulator {
    model: Model,
    throttle: Throttle,
    faults: BTreeMap<String, FaultSpec>,
    latency: LatencyModel,
    rng: SimRng,
    hooks: Box<dyn Hooks>,
    calls: VecDeque<CallRecord>,
    call_limit: usize,
    seq: u64,
    imds: BTreeMap<String, MetaHistory>,
    imds_delay_ms: u64,
    tokens: HashMap<String, u64>,
    epoch_ms: u64,
    credentials: RoleCredentials,
    /// Draws for credentials only, so that fetching them does not change the other draws.
    credentials_rng: SimRng,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("model", &self.model)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// A simulator with an empty account.
    pub fn new(cfg: SimConfig) -> Self {
        let mut mc = ModelConfig {
            seed: cfg.seed,
            detach_delay_ms: cfg.detach_delay_ms,
            limit_overrides: cfg.limit_overrides,
            ..ModelConfig::default()
        };
        if let Some(r) = cfg.region {
            mc.region = r;
        }
        Self {
            model: Model::new(mc),
            throttle: Throttle::new(cfg.throttle),
            faults: cfg.faults,
            latency: cfg.latency,
            rng: SimRng::new(cfg.seed ^ 0x5EED_C0DE_0000_0001),
            hooks: Box::new(NoHooks),
            calls: VecDeque::new(),
            call_limit: if cfg.call_log_limit == 0 {
                100_000
            } else {
                cfg.call_log_limit
            },
            seq: 0,
            imds: BTreeMap::new(),
            imds_delay_ms: cfg.imds_delay_ms,
            tokens: HashMap::new(),
            epoch_ms: cfg.epoch_ms,
            credentials: RoleCredentials::new(CredentialSettings::default()),
            credentials_rng: SimRng::new(cfg.seed ^ 0xC4ED_0000_0000_0002),
        }
    }

    /// Replaces the instance role's credential settings (what was issued is forgotten).
    pub fn set_credentials(&mut self, settings: CredentialSettings) {
        self.credentials = RoleCredentials::new(settings);
    }

    /// The instance role's credentials: issued sets, and which key signed EC2 requests.
    pub fn credentials(&self) -> &RoleCredentials {
        &self.credentials
    }

    /// With [`CredentialSettings::check_signatures`]: whether an EC2 request with these
    /// `Authorization` and `X-Amz-Security-Token` headers is signed with issued, unexpired
    /// credentials (`Err`: the `AuthFailure` message).
    pub fn check_ec2_credentials(
        &mut self,
        authorization: Option<&str>,
        token: Option<&str>,
    ) -> Result<(), String> {
        self.credentials.check(unix_ms(), authorization, token)
    }

    /// Installs the hooks called after each state change.
    pub fn set_hooks(&mut self, hooks: Box<dyn Hooks>) {
        self.hooks = hooks;
    }

    /// Replaces the fault injection table.
    pub fn set_faults(&mut self, faults: BTreeMap<String, FaultSpec>) {
        self.faults = faults;
    }

    /// Replaces the throttling settings (buckets start full).
    pub fn set_throttle(&mut self, cfg: ThrottleConfig) {
        self.throttle = Throttle::new(cfg);
    }

    /// Replaces the latency model.
    pub fn set_latency(&mut self, latency: LatencyModel) {
        self.latency = latency;
    }

    /// Sets the metadata propagation delay.
    pub fn set_imds_delay(&mut self, ms: u64) {
        self.imds_delay_ms = ms;
    }

    /// The model (read-only).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The call log, oldest first.
    pub fn calls(&self) -> &VecDeque<CallRecord> {
        &self.calls
    }

    fn request_id(&mut self) -> String {
        let a = self.rng.next_u64();
        let b = self.rng.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0x3fff | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    fn log(&mut self, rec: CallRecord) {
        self.calls.push_back(rec);
        while self.calls.len() > self.call_limit {
            self.calls.pop_front();
        }
    }

    /// Runs one typed request in-process: no throttling, faults or latency; logged, hooks
    /// called, metadata updated.
    pub fn call(&mut self, now_ms: u64, req: Request) -> Result<Reply, ApiError> {
        let action = req.action().to_owned();
        let detail = vec![("Request".to_owned(), format!("{req:?}"))];
        let rid = self.request_id();
        let r = self.apply(now_ms, req);
        self.seq += 1;
        let rec = CallRecord {
            seq: self.seq,
            at_ms: now_ms,
            action,
            params: detail,
            outcome: r.as_ref().map_or_else(|e| e.code.clone(), |_| "ok".into()),
            http_status: r.as_ref().map_or_else(|e| e.http_status(), |_| 200),
            latency_ms: 0,
            request_id: rid,
        };
        self.log(rec);
        r
    }

    fn apply(&mut self, now_ms: u64, req: Request) -> Result<Reply, ApiError> {
        let r = self.model.execute(now_ms, req);
        for ev in self.model.drain_events() {
            ev.dispatch(self.hooks.as_mut());
        }
        for id in self.model.drain_dirty() {
            let meta = InstanceMeta::of(&self.model, &id);
            self.imds
                .entry(id)
                .or_default()
                .record(now_ms, meta, self.imds_delay_ms);
        }
        r
    }

    /// Handles one EC2 Query request (decoded form parameters) at `now_ms`.
    pub fn handle_query(&mut self, now_ms: u64, params: &Params) -> HttpAnswer {
        let rid = self.request_id();
        let action_name = params.get("Action").unwrap_or("").to_owned();
        let latency = self.latency.sample(&action_name, &mut self.rng);
        let mut drop_connection = false;
        let mut delay_ms = latency;
        let result: Result<(String, Reply), ApiError> = (|| {
            let action = query::action(params)?;
            if !self.throttle.admit(action, now_ms) {
                return Err(ApiError::new(
                    "RequestLimitExceeded",
                    "Request limit exceeded.",
                ));
            }
            let parsed = query::parse(params)?;
            match draw_fault(&self.faults, action, &mut self.rng) {
                FaultDecision::None => {}
                FaultDecision::Error(code) => {
                    return Err(ApiError::new(
                        &code,
                        "An internal error has occurred (injected fault).",
                    ));
                }
                FaultDecision::Timeout(ms) => {
                    drop_connection = true;
                    delay_ms = ms;
                    return Err(ApiError::new("RequestTimeout", "injected timeout"));
                }
                FaultDecision::LoseResponse(ms) => {
                    drop_connection = true;
                    delay_ms = ms;
                }
            }
            if parsed.dry_run {
                return Err(ApiError::new(
                    "DryRunOperation",
                    "Request would have succeeded, but DryRun flag is set.",
                ));
            }
            let reply = self.apply(now_ms, parsed.request)?;
            Ok((action.to_owned(), reply))
        })();
        let (status, body, outcome) = match result {
            Ok((action, reply)) => (
                200,
                xml::render(&action, &reply, &rid, self.epoch_ms),
                "ok".to_owned(),
            ),
            Err(e) => (e.http_status(), xml::error(&e, &rid), e.code),
        };
        self.seq += 1;
        let rec = CallRecord {
            seq: self.seq,
            at_ms: now_ms,
            action: action_name,
            params: params
                .pairs()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            outcome,
            http_status: if drop_connection { 0 } else { status },
            latency_ms: delay_ms,
            request_id: rid,
        };
        self.log(rec);
        HttpAnswer {
            status,
            body,
            delay_ms,
            drop_connection,
        }
    }

    /// `PUT /latest/api/token` with the TTL header value.
    pub fn imds_token(&mut self, now_ms: u64, ttl_header: Option<&str>) -> ImdsAnswer {
        let ttl = ttl_header
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|t| (1..=21_600).contains(t));
        let Some(ttl) = ttl else {
            return ImdsAnswer {
                status: 400,
                body: "Bad Request".into(),
                ttl: None,
            };
        };
        self.tokens.retain(|_, exp| *exp > now_ms);
        let token = format!(
            "AQAE{:016x}{:016x}==",
            self.rng.next_u64(),
            self.rng.next_u64()
        );
        self.tokens.insert(token.clone(), now_ms + ttl * 1000);
        ImdsAnswer {
            status: 200,
            body: token,
            ttl: Some(ttl),
        }
    }

    /// The instance IMDS serves when a request names none: the earliest-launched running
    /// instance.
    pub fn default_instance(&self) -> Option<String> {
        self.model
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Running)
            .min_by_key(|i| (i.launch_ms, i.id.clone()))
            .map(|i| i.id.clone())
    }

    /// `GET /latest/<path>` for `instance` (default: [`Self::default_instance`]) with `token`.
    pub fn imds_get(
        &mut self,
        now_ms: u64,
        instance: Option<&str>,
        token: Option<&str>,
        path: &str,
    ) -> ImdsAnswer {
        let valid = token
            .and_then(|t| self.tokens.get(t))
            .is_some_and(|exp| *exp > now_ms);
        if !valid {
            return ImdsAnswer {
                status: 401,
                body: "Unauthorized".into(),
                ttl: None,
            };
        }
        if let Some(md) = path.trim_start_matches('/').strip_prefix("meta-data/") {
            // Credentials expire in real time: clients compare them with their own clock.
            if let Some(ans) = self
                .credentials
                .get(unix_ms(), &mut self.credentials_rng, md)
            {
                return match ans {
                    Some(body) => ImdsAnswer {
                        status: 200,
                        body,
                        ttl: None,
                    },
                    None => ImdsAnswer {
                        status: 404,
                        body: "Not Found".into(),
                        ttl: None,
                    },
                };
            }
        }
        let id = match instance {
            Some(i) => Some(i.to_owned()),
            None => self.default_instance(),
        };
        let meta = id
            .as_ref()
            .and_then(|i| self.imds.get(i))
            .and_then(|h| h.visible(now_ms, self.imds_delay_ms));
        match meta.and_then(|m| m.get(path)) {
            Some(body) => ImdsAnswer {
                status: 200,
                body,
                ttl: None,
            },
            None => ImdsAnswer {
                status: 404,
                body: "Not Found".into(),
                ttl: None,
            },
        }
    }

    /// The admin view of the whole state.
    pub fn state_json(&self) -> serde_json::Value {
        let m = &self.model;
        let subnets: Vec<_> = m
            .subnets
            .keys()
            .filter_map(|id| m.subnet_view(id))
            .collect();
        let available: Vec<&String> = m
            .enis
            .values()
            .filter(|e| e.status == EniStatus::Available)
            .map(|e| &e.id)
            .collect();
        serde_json::json!({
            "summary": {
                "vpcs": m.vpcs.len(),
                "subnets": m.subnets.len(),
                "instances_running": m.instances.values().filter(|i| i.state == InstanceState::Running).count(),
                "enis": m.enis.len(),
                "enis_available": available,
                "secondary_ips": m.enis.values().map(|e| e.secondary_ips.len()).sum::<usize>(),
                "ipv4_prefixes": m.enis.values().map(|e| e.ipv4_prefixes.len()).sum::<usize>(),
                "trunks": m.enis.values().filter(|e| e.interface_type == "trunk").map(|e| &e.id).collect::<Vec<_>>(),
                "branches_associated": m.trunk_associations.len(),
                "calls": self.seq,
                "invariants": match check_invariants(m) { Ok(()) => "ok".to_owned(), Err(e) => e },
            },
            "vpcs": m.vpcs,
            "subnets": subnets,
            "security_groups": m.security_groups,
            "instances": m.instances,
            "network_interfaces": m.enis,
            "trunk_associations": m.trunk_associations,
            "imds_delay_ms": self.imds_delay_ms,
            "throttle": self.throttle,
            "faults": self.faults,
            "latency": self.latency,
        })
    }
}

/// Wall-clock Unix time in ms.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
