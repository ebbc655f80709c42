//! Every input that made a property of `fuzz.rs` fail, kept as a plain test with the literal
//! input (issue 14). Each test failed before the fix it names.

use serde_json::{json, Value};
use vpc_cni_plugin::config::NetConf;
use vpc_cni_plugin::error::CniError;
use vpc_cni_plugin::result::{DummyInfo, PrevResult};

fn text(e: &CniError) -> String {
    format!("{e}: {}", e.details())
}

fn conf_err(bytes: &[u8]) -> String {
    text(&NetConf::parse(bytes).expect_err("must be refused"))
}

/// A field of the wrong JSON type was "failed to decode network config: invalid type: null,
/// expected a string at line 1 column 143", naming no field.
#[test]
fn a_wrongly_typed_config_field_is_named() {
    let t = conf_err(br#"{"cniVersion": null}"#);
    assert!(t.contains("field cniVersion"), "{t}");
    let t = conf_err(br#"{"cniVersion":"1.0.0","name":3}"#);
    assert!(t.contains("field name"), "{t}");
    let t = conf_err(br#"{"cniVersion":"1.0.0","name":"n","poolRetryMs":"100"}"#);
    assert!(t.contains("field poolRetryMs"), "{t}");
    let t = conf_err(
        br#"{"cniVersion":"1.0.0","name":"n","cni.dev/valid-attachments":[{"containerID":"c"}]}"#,
    );
    assert!(t.contains("cni.dev/valid-attachments"), "{t}");
    // Not UTF-8 inside a string, and a duplicate key.
    let t = conf_err(b"{\"cniVersion\":\"1.0.0\",\"name\":\"a\xff\"}");
    assert!(t.contains("field name"), "{t}");
    let t = conf_err(br#"{"cniVersion":"1.0.0","name":"a","name":"b"}"#);
    assert!(t.contains("name"), "{t}");
    // The code stays 6 (decoding failure).
    assert_eq!(
        NetConf::parse(br#"{"name":3}"#).expect_err("type").code(),
        6
    );
}

/// An unknown `cniVersion` said "incompatible CNI version "2.0.0": supported versions are …",
/// without the field's name.
#[test]
fn an_unknown_cni_version_names_the_field() {
    let t = conf_err(br#"{"cniVersion":"2.0.0","name":"n"}"#);
    assert!(t.contains("cniVersion"), "{t}");
}

/// A prevResult field of the wrong type was "failed to decode prevResult: invalid type: null,
/// expected a sequence".
#[test]
fn a_wrongly_typed_prev_result_field_is_named() {
    let e = PrevResult::parse(&json!({"cniVersion": "0.3.0", "interfaces": null}))
        .expect_err("null interfaces");
    assert!(text(&e).contains("prevResult.interfaces"), "{}", text(&e));
    let e = PrevResult::parse(&json!({"ips": [{"interface": -1, "address": "10.0.0.1/32"}]}))
        .expect_err("negative index");
    assert!(
        text(&e).contains("prevResult.ips[0].interface"),
        "{}",
        text(&e)
    );
}

fn branch_prev(mac: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "enia"},
            {"name": "eth0", "sandbox": "/x"},
            {"name": "dummya", "mac": mac}
        ],
        "ips": [{"interface": 1, "address": "10.0.0.9/32"}]
    })
}

/// A dummy `mac` of "4294967295" made `attachments()` add 100 to u32::MAX: a panic in debug
/// builds, and table 99 (wrapped) in release, on DEL without ipamd.
#[test]
fn a_dummy_mac_past_any_vlan_id_is_not_a_vlan() {
    let p = PrevResult::parse(&branch_prev("4294967295")).expect("parse");
    assert_eq!(p.dummy(), Some(DummyInfo::Normal { device_number: 0 }));
    assert_eq!(
        p.attachments()[0].route_table,
        254,
        "main, as with no table"
    );
    let p = PrevResult::parse(&branch_prev("4094")).expect("parse");
    assert_eq!(p.dummy(), Some(DummyInfo::Branch { vlan_id: 4094 }));
    assert_eq!(p.attachments()[0].route_table, 4194);
    let p = PrevResult::parse(&branch_prev("4095")).expect("parse");
    assert_eq!(p.dummy(), Some(DummyInfo::Normal { device_number: 0 }));
}

/// An `ipamdSocket` longer than `sun_path` was accepted: ADD then spent its whole pool wait
/// (10 s) failing to dial it and answered "try again later".
#[test]
fn a_socket_path_that_cannot_be_dialled_is_refused() {
    for field in ["ipamdSocket", "npAgentSocket"] {
        let mut c = json!({"cniVersion": "1.0.0", "name": "n"});
        c[field] = json!(format!("/{}", "x".repeat(107)));
        let e = NetConf::parse(c.to_string().as_bytes()).expect_err("108 bytes");
        assert_eq!(e.code(), 7);
        assert!(text(&e).contains(field), "{}", text(&e));
        c[field] = json!("/run/a\u{0}b.sock");
        let e = NetConf::parse(c.to_string().as_bytes()).expect_err("NUL");
        assert!(text(&e).contains(field), "{}", text(&e));
        c[field] = json!(format!("/{}", "x".repeat(106)));
        NetConf::parse(c.to_string().as_bytes()).expect("107 bytes fit");
    }
}

/// A CNI variable that was set but not UTF-8 read as unset (`std::env::var(..).ok()`): a DEL
/// whose `CNI_ARGS` had such bytes went on without the pod's name and answered success.
#[test]
fn a_cni_variable_that_is_not_utf8_is_refused_by_name() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("no-ipamd.sock");
    let conf = json!({
        "cniVersion": "1.0.0", "name": "aws-cni", "type": "aws-cni",
        "pluginLogFile": "stderr", "ipamdSocket": socket, "poolWaitSeconds": 0,
    });
    let bad = std::ffi::OsStr::from_bytes(b"K8S_POD_NAME=web-\xff;K8S_POD_NAMESPACE=default");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aws-cni"))
        .env_clear()
        .env("CNI_COMMAND", "DEL")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_NETNS", "")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env("CNI_ARGS", bad)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    use std::io::Write;
    // The plugin refuses the variable before it reads stdin, so it may exit (closing the pipe)
    // before the write: a broken pipe here is the behaviour under test, not a failure.
    match child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("error json");
    assert_eq!(v["code"], 4, "{v}");
    assert!(v["msg"].as_str().expect("msg").contains("CNI_ARGS"), "{v}");

    // The same through the library, for each variable.
    for var in vpc_cni_plugin::env::CNI_VARS {
        let get = |k: &str| -> Option<std::ffi::OsString> {
            (k == var).then(|| std::ffi::OsStr::from_bytes(b"a\xfe").to_owned())
        };
        let out = vpc_cni_plugin::run_os(&get, &mut &b"{}"[..]);
        let v: Value = serde_json::from_str(out.stdout.as_deref().expect("stdout")).expect("json");
        assert_eq!(
            (out.exit_code, v["code"].as_u64()),
            (1, Some(4)),
            "{var}: {v}"
        );
        assert!(v["msg"].as_str().expect("msg").contains(var), "{var}: {v}");
    }
}

/// A key that itself fails to decode was named "?" ("field ?"); it is the document's (or the
/// enclosing field's) error.
#[test]
fn a_broken_key_is_not_named_question_mark() {
    let e = NetConf::parse(b"{not json").expect_err("not json");
    assert_eq!(e.to_string(), "failed to decode network config");
    let e = NetConf::parse(b"{\"cniVersion\":\"1.0.0\",\"runtimeConfig\":{\"a\xff\":1}}")
        .expect_err("key not UTF-8");
    assert!(e.to_string().ends_with("field runtimeConfig"), "{e}");
}

/// Found by fuzzing the installer: it writes any POD_SECURITY_GROUP_ENFORCING_MODE into the
/// conflist when ENABLE_POD_ENI is off (as the reference entrypoint), and the plugin refused
/// every pod with code 7 for it. Anything but strict is standard, as the reference reads it.
#[test]
fn an_unknown_pod_sg_enforcing_mode_does_not_fail_the_pod() {
    let c =
        NetConf::parse(br#"{"cniVersion":"0.4.0","name":"aws-cni","podSGEnforcingMode":"lax"}"#)
            .expect("accepted");
    assert_eq!(c.sg_mode, vpc_cni_plugin::config::SgEnforcingMode::Standard);
}

/// A prevResult whose dummy claims a branch-ENI pod (`mac` "4094") made DEL skip ipamd, so
/// the address ipamd had assigned to the container was never released. DEL still tears down
/// from prevResult as the reference's branch shortcut does, then also asks ipamd to release,
/// and removes the host wiring of a datastore address ipamd answers with.
#[test]
fn a_prev_result_claiming_a_branch_pod_does_not_keep_ipamds_address() {
    use vpc_cni_plugin::driver::Driver;
    use vpc_cni_plugin::env::{CniArgs, Command, Invocation};
    use vpc_cni_plugin::memory::{MemoryIpam, MemoryPolicyAgent};
    const NETNS: &str = "/var/run/netns/pod-1";
    let inv = |command| Invocation {
        command,
        container_id: "c1".into(),
        netns: NETNS.into(),
        ifname: "eth0".into(),
        args: CniArgs::parse("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0").expect("args"),
        path: "/opt/cni/bin".into(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let net = vpc_cni_net::MemoryPodNetwork::new();
    net.add_netns(NETNS);
    let ipam = MemoryIpam::new(
        vpc_cni_plugin::CLIENT_VERSION,
        MemoryIpam::pool(std::net::Ipv4Addr::new(10, 0, 1, 10), 1, 2, 3),
    );
    let d = Driver::new(
        ipam,
        net,
        MemoryPolicyAgent::default(),
        vpc_cni_plugin::CLIENT_VERSION,
    );
    let mut conf =
        NetConf::parse(br#"{"cniVersion":"0.4.0","name":"aws-cni","pluginLogFile":"stderr"}"#)
            .expect("conf");
    let r = rt.block_on(d.add(&inv(Command::Add), &conf)).expect("add");
    let mut prev = r.render(conf.cni_version);
    prev["interfaces"][2]["mac"] = json!("4094");
    conf.prev_result = Some(prev);
    rt.block_on(d.del(&inv(Command::Del), &conf)).expect("del");
    assert_eq!(d.ipam().assigned(), 0, "the address is released");
    let host = d.net().state().host;
    assert!(host.rules.is_empty() && host.routes.is_empty(), "{host:?}");
}

/// stdin was read to its end whatever its size (a runaway writer could make the plugin hold
/// gigabytes); past 16 MiB it is refused with code 7 naming stdin, without reading the rest.
#[test]
fn a_config_larger_than_the_bound_is_refused_unread() {
    use std::io::Read;
    let max = vpc_cni_plugin::MAX_CONFIG_BYTES;
    let mut endless = std::io::repeat(b' ');
    let e = vpc_cni_plugin::read_config(&mut endless).expect_err("endless stdin");
    assert_eq!(e.code(), 7);
    assert!(text(&e).contains("stdin"), "{}", text(&e));
    // Just under the bound, a config padded with whitespace still parses.
    let conf = br#"{"cniVersion":"1.0.0","name":"n"}"#;
    let pad = usize::try_from(max).expect("usize") - conf.len();
    let mut input = std::io::repeat(b' ').take(pad as u64).chain(&conf[..]);
    let bytes = vpc_cni_plugin::read_config(&mut input).expect("at the bound");
    NetConf::parse(&bytes).expect("parses");
    // Through the whole invocation: refused before anything else happens.
    let get = |k: &str| -> Option<String> {
        Some(match k {
            "CNI_COMMAND" => "DEL".into(),
            "CNI_CONTAINERID" => "c1".into(),
            "CNI_IFNAME" => "eth0".into(),
            "CNI_PATH" => "/opt/cni/bin".into(),
            _ => return None,
        })
    };
    let out = vpc_cni_plugin::run(&get, &mut std::io::repeat(b' ').take(max + 1));
    let v: Value = serde_json::from_str(out.stdout.as_deref().expect("stdout")).expect("json");
    assert_eq!((out.exit_code, v["code"].as_u64()), (1, Some(7)), "{v}");
}
