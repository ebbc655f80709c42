//! `egress-cni`: the VPC CNI's chained egress plugin (spec cni.md 2.7), a drop-in for the
//! reference's `cmd/egress-cni-plugin`.
//!
//! It runs after `aws-cni` and gives the pod a second, egress-only interface of the other IP
//! family: in an IPv6 cluster `v4if0` with an address from `169.254.172.0/22` (IPv4 traffic
//! leaves SNATed to the node's primary IPv4 address), in an IPv4 cluster `v6if0` with a ULA
//! from `fd00::ac:00/118` (SNATed to the node's IPv6 address). Addresses come from the IPAM
//! plugin of the config (`host-local`), run from `CNI_PATH`. `enabled` other than true makes
//! it a pass-through: ADD prints `prevResult` back byte for byte, DEL does nothing.
//!
//! The ADD result is `prevResult` with the host and container entries of the egress veth
//! appended to `interfaces` (its address is not added to `ips`).

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod ipam;
pub mod wiring;

use std::ffi::OsString;
use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};
use vpc_cni_net::{Family, Netns};
use vpc_cni_plugin::env::{Command, EnvOutcome, Invocation};
use vpc_cni_plugin::version::{version_info, CniVersion};

use crate::config::EgressConf;
use crate::error::EgressError;
use crate::wiring::EgressSpec;

/// What the process prints and returns.
#[derive(Debug)]
pub struct Output {
    /// stdout (a result or an error JSON), if any.
    pub stdout: Option<String>,
    /// stderr text, if any.
    pub stderr: Option<String>,
    /// The exit code.
    pub exit_code: u8,
}

fn fail(version: &str, e: &EgressError) -> Output {
    Output {
        stdout: Some(e.to_json(version).to_string()),
        stderr: None,
        exit_code: 1,
    }
}

fn version_hint(bytes: &[u8]) -> String {
    serde_json::from_slice::<Value>(bytes)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| v.parse::<CniVersion>().is_ok())
        .unwrap_or_else(|| CniVersion::CURRENT.as_str().to_string())
}

/// Runs one invocation from the process environment as `get_os` reads it
/// (`std::env::var_os`): a CNI variable that is set but not UTF-8 is refused, naming it.
pub fn run_os(get_os: &dyn Fn(&str) -> Option<OsString>, stdin: &mut dyn Read) -> Output {
    match vpc_cni_plugin::env::utf8_vars(get_os, &vpc_cni_plugin::env::CNI_VARS) {
        Ok(vars) => run(&|k| vars.get(k).cloned(), stdin),
        Err(e) => fail(CniVersion::CURRENT.as_str(), &EgressError::Cni(e)),
    }
}

/// Runs one invocation: `get_env` reads the CNI variables, `stdin` the network config.
pub fn run(get_env: &dyn Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Output {
    let inv = match Invocation::from_env(get_env) {
        Ok(EnvOutcome::About) => {
            return Output {
                stdout: None,
                stderr: Some(format!(
                    "egress-cni {}\nCNI protocol versions supported: {}\n",
                    env!("CARGO_PKG_VERSION"),
                    CniVersion::ALL.map(CniVersion::as_str).join(", ")
                )),
                exit_code: 0,
            }
        }
        Ok(EnvOutcome::Run(inv)) => inv,
        Err(e) => return fail(CniVersion::CURRENT.as_str(), &EgressError::Cni(e)),
    };
    if inv.command == Command::Version {
        return Output {
            stdout: Some(version_info().to_string()),
            stderr: None,
            exit_code: 0,
        };
    }
    let bytes = match vpc_cni_plugin::read_config(stdin) {
        Ok(b) => b,
        Err(e) => return fail(CniVersion::CURRENT.as_str(), &EgressError::Cni(e)),
    };
    let conf = match EgressConf::parse(&bytes) {
        Ok(c) => c,
        Err(e) => return fail(&version_hint(&bytes), &e),
    };
    vpc_cni_plugin::logging::init(&conf.log_target, conf.log_level);
    tracing::info!(
        command = %inv.command,
        container_id = %inv.container_id,
        netns = %inv.netns,
        cni_path = %inv.path,
        config = %String::from_utf8_lossy(&bytes),
        "egress-cni invoked"
    );
    let version = conf.cni_version.as_str();
    let out = match inv.command {
        Command::Add => add(&inv, &conf).map(Some),
        Command::Del => del(&inv, &conf).map(|()| None),
        Command::Check => check(&inv, &conf).map(|()| None),
        _ => Ok(None),
    };
    match out {
        Ok(stdout) => Output {
            stdout,
            stderr: None,
            exit_code: 0,
        },
        Err(e) => {
            tracing::error!(error = %e, details = %e.details(), "egress-cni failed");
            fail(version, &e)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, EgressError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| EgressError::Setup {
            what: "the runtime".into(),
            source: vpc_cni_net::NetError::invalid(format!("tokio runtime: {e}")),
        })
}

fn node_ns() -> Result<Netns, EgressError> {
    Netns::current().map_err(|source| EgressError::Setup {
        what: "the node namespace".into(),
        source,
    })
}

fn family_of(conf: &EgressConf) -> Result<Family, EgressError> {
    conf.node_ip
        .as_ref()
        .map(Family::of)
        .ok_or_else(|| EgressError::Config {
            field: "nodeIP".into(),
            reason: "is required when enabled".into(),
        })
}

/// ADD.
fn add(inv: &Invocation, conf: &EgressConf) -> Result<String, EgressError> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| EgressError::Config {
            field: "prevResult".into(),
            reason: "is required: egress-cni runs chained after aws-cni".into(),
        })?;
    if !conf.enabled {
        // The runtime gets exactly what it sent.
        return Ok(prev.get().to_string());
    }
    let mut result: Value = serde_json::from_str(prev.get()).map_err(|e| EgressError::Decode {
        what: "prevResult",
        source: e,
    })?;
    let Some(obj) = result.as_object_mut() else {
        return Err(EgressError::Config {
            field: "prevResult".into(),
            reason: "must be a JSON object".into(),
        });
    };
    // The result is prevResult with our two interfaces appended: checked before IPAM runs.
    match obj.get("interfaces") {
        None | Some(Value::Array(_)) => {}
        Some(Value::Null) => {
            obj.insert("interfaces".into(), json!([]));
        }
        Some(other) => {
            return Err(EgressError::Config {
                field: "prevResult.interfaces".into(),
                reason: format!("must be a list, not {other}"),
            })
        }
    }
    let family = family_of(conf)?;
    let node_ip = conf.node_ip.ok_or_else(|| EgressError::Config {
        field: "nodeIP".into(),
        reason: "is required when enabled".into(),
    })?;
    let assigned = ipam::add(&conf.ipam_type, inv, &conf.raw, family)?;
    let release = |why: &EgressError| {
        if let Err(e) = ipam::del(&conf.ipam_type, inv, &conf.raw) {
            tracing::warn!(error = %e, cause = %why, "IPAM DEL after a failed ADD failed");
        }
    };
    let spec = EgressSpec {
        family,
        netns: inv.netns.clone().into(),
        primary_ifname: inv.ifname.clone(),
        network: conf.name.clone(),
        container_id: inv.container_id.clone(),
        mtu: conf.mtu,
        node_ip,
        randomize: conf.randomize,
        ipam: assigned.clone(),
    };
    let wired = runtime().and_then(|rt| {
        let host = node_ns()?;
        rt.block_on(wiring::setup(&host, &spec))
            .map_err(|(what, source)| EgressError::Setup { what, source })
    });
    let w = match wired {
        Ok(w) => w,
        Err(e) => {
            release(&e);
            return Err(e);
        }
    };
    tracing::info!(ip = %assigned.ip, veth = %w.host_veth, node_ip = %node_ip, "egress interface added");
    if let Some(obj) = result.as_object_mut() {
        let ifaces = obj.entry("interfaces").or_insert_with(|| json!([]));
        if let Some(list) = ifaces.as_array_mut() {
            list.push(json!({"name": w.host_veth, "mac": w.host_mac.to_string()}));
            list.push(json!({
                "name": w.container_ifname,
                "mac": w.container_mac.to_string(),
                "sandbox": inv.netns,
            }));
        }
        obj.insert("cniVersion".into(), json!(conf.cni_version.as_str()));
    }
    Ok(result.to_string())
}

/// DEL.
fn del(inv: &Invocation, conf: &EgressConf) -> Result<(), EgressError> {
    if !conf.enabled {
        return Ok(());
    }
    let family = family_of(conf)?;
    ipam::del(&conf.ipam_type, inv, &conf.raw)?;
    let rt = runtime()?;
    let host = node_ns()?;
    let netns = (!inv.netns.is_empty()).then(|| Path::new(&inv.netns));
    let t = rt
        .block_on(wiring::teardown(
            &host,
            family,
            netns,
            &conf.name,
            &inv.container_id,
        ))
        .map_err(|(what, source)| EgressError::Teardown { what, source })?;
    tracing::info!(
        link = t.link_deleted,
        chain = t.chain_removed,
        "egress interface removed"
    );
    Ok(())
}

/// CHECK: the egress interface is in the pod and its SNAT chain and jump are on the node.
fn check(inv: &Invocation, conf: &EgressConf) -> Result<(), EgressError> {
    if !conf.cni_version.has_check() {
        return Err(EgressError::Cni(
            vpc_cni_plugin::error::CniError::IncompatibleVersion {
                version: conf.cni_version.to_string(),
                reason: "config version does not allow CHECK".into(),
            },
        ));
    }
    if !conf.enabled {
        return Ok(());
    }
    let family = family_of(conf)?;
    let missing = |what: String| EgressError::Setup {
        what,
        source: vpc_cni_net::NetError::invalid("missing"),
    };
    let rt = runtime()?;
    let pod_ns = Netns::open(&inv.netns).map_err(|source| EgressError::Setup {
        what: "the pod namespace".into(),
        source,
    })?;
    let present = rt.block_on(async {
        let pod = vpc_cni_net::Netlink::open(&pod_ns)?;
        pod.link_by_name(wiring::ifname(family)).await
    });
    match present {
        Ok(Some(_)) => {}
        Ok(None) => return Err(missing(format!("interface {}", wiring::ifname(family)))),
        Err(source) => {
            return Err(EgressError::Setup {
                what: "reading the pod namespace".into(),
                source,
            })
        }
    }
    let chain = wiring::chain_name(family, &conf.name, &inv.container_id);
    let host = node_ns()?;
    match wiring::snat_present(&host, family, &chain) {
        Ok(true) => Ok(()),
        Ok(false) => Err(missing(format!("SNAT chain {chain}"))),
        Err(source) => Err(EgressError::Setup {
            what: "reading the SNAT chain".into(),
            source,
        }),
    }
}
