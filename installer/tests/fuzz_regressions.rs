//! Every settings input that made `fuzz.rs` fail, kept as a plain test with the literal input
//! (issue 14). Each failed before its fix.

use serde_json::Value;
use vpc_cni_installer::conflist::{render, TEMPLATE};
use vpc_cni_installer::error::InstallerError;
use vpc_cni_installer::settings::Settings;

fn aws_cni_entry(vars: &[(&str, &str)]) -> Value {
    let s = Settings::for_test(vars).expect("accepted");
    let v: Value = serde_json::from_str(&render(TEMPLATE, &s).expect("render")).expect("json");
    let mut entry = v["plugins"][0].clone();
    entry["cniVersion"] = v["cniVersion"].clone();
    entry
}

/// The log file came out as "/x/Debug": the level's placeholder inside it was expanded.
#[test]
fn a_placeholder_inside_a_value_is_not_expanded() {
    let e = aws_cni_entry(&[("AWS_VPC_K8S_PLUGIN_LOG_FILE", "/x/__PLUGINLOGLEVEL__")]);
    assert_eq!(e["pluginLogFile"], "/x/__PLUGINLOGLEVEL__");
}

/// POD_SECURITY_GROUP_ENFORCING_MODE=lax (accepted without ENABLE_POD_ENI, as the reference)
/// gave a conflist the plugin refused for every pod.
#[test]
fn an_unknown_sg_mode_gives_a_conflist_the_plugin_accepts() {
    let e = aws_cni_entry(&[("POD_SECURITY_GROUP_ENFORCING_MODE", "lax")]);
    vpc_cni_plugin::config::NetConf::parse(e.to_string().as_bytes()).expect("plugin accepts");
}

/// AWS_VPC_K8S_CNI_VETHPREFIX=¡ was accepted; the plugin refused every pod for it.
#[test]
fn a_veth_prefix_the_plugin_refuses_stops_the_entrypoint() {
    match Settings::for_test(&[("AWS_VPC_K8S_CNI_VETHPREFIX", "¡")]) {
        Err(InstallerError::Setting { var, .. }) => assert_eq!(var, "AWS_VPC_K8S_CNI_VETHPREFIX"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
