//! Every input that made a property of `fuzz.rs` fail, kept as a plain test with the literal
//! input (issue 14).

use vpc_cni_egress::config::EgressConf;

/// Bytes that are not UTF-8 inside a field's string were "failed to decode network config:
/// invalid unicode code point at line 1 column 17", naming no field.
#[test]
fn bytes_that_are_not_utf8_in_a_field_are_named() {
    let e = EgressConf::parse(b"{\"cniVersion\":\"a\x80\",\"name\":\"n\"}").expect_err("not UTF-8");
    let t = format!("{e}: {}", e.details());
    assert!(t.contains("field cniVersion"), "{t}");
    assert_eq!(e.code(), 6);
    let e = EgressConf::parse(b"{\"cniVersion\":\"0.4.0\",\"ipam\":{\"type\":\"h\xff\"}}")
        .expect_err("not UTF-8");
    assert!(e.to_string().contains("ipam.type"), "{e}");
    // A document that is not JSON at all still says so, without a field.
    let e = EgressConf::parse(b"{not json").expect_err("not json");
    assert_eq!(e.to_string(), "failed to decode network config");
}

/// An IPAM result whose gateway is of the other family was accepted; netlink then failed
/// halfway through the egress wiring.
#[test]
fn an_ipam_gateway_of_the_other_family_is_refused_by_name() {
    let e = vpc_cni_egress::ipam::parse_result(
        "host-local",
        r#"{"cniVersion":"1.0.0","dns":null,"ips":[{"address":"fd00::ac:5/118","gateway":"169.254.172.1"}],"routes":[]}"#,
        vpc_cni_net::Family::V6,
    )
    .expect_err("an IPv4 gateway for an IPv6 address");
    assert!(e.to_string().contains("ips[0].gateway"), "{e}");
}

/// A chained ADD whose prevResult has `interfaces` that is not a list ran IPAM (an address
/// was taken) and would have answered without the egress interfaces; it is refused, naming
/// the field, before IPAM runs (here IPAM is absent: an empty CNI_PATH).
#[test]
fn a_prev_result_whose_interfaces_is_not_a_list_is_refused_before_ipam() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().display().to_string();
    let conf = serde_json::json!({
        "cniVersion": "0.3.0", "name": "aws-cni", "type": "egress-cni", "enabled": "true",
        "nodeIP": "10.0.0.10", "ipam": {"type": "host-local"}, "pluginLogFile": "stderr",
        "prevResult": {"cniVersion": "0.3.0", "interfaces": false, "ips": []},
    });
    let get = |k: &str| -> Option<String> {
        Some(match k {
            "CNI_COMMAND" => "ADD".into(),
            "CNI_CONTAINERID" => "c1".into(),
            "CNI_NETNS" => "/var/run/netns/none".into(),
            "CNI_IFNAME" => "eth0".into(),
            "CNI_PATH" => path.clone(),
            _ => return None,
        })
    };
    let bytes = conf.to_string();
    let out = vpc_cni_egress::run(&get, &mut bytes.as_bytes());
    let v: serde_json::Value =
        serde_json::from_str(out.stdout.as_deref().expect("stdout")).expect("json");
    assert_eq!(v["code"], 7, "{v}");
    assert!(
        v["msg"]
            .as_str()
            .expect("msg")
            .contains("prevResult.interfaces"),
        "{v}"
    );
}
