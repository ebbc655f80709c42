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
