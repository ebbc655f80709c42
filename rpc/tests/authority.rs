//! Every `:authority` a real gRPC client sends over a unix socket is served (the vendored h2
//! patch, vendor/h2/PATCH.md), sent byte for byte by a raw HTTP/2 client: stock h2 resets
//! these streams with PROTOCOL_ERROR before the service sees them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Outcome, RawH2};
use vpc_cni_rpc::ServeLimits;

/// What clients send when they dial a unix socket, and the well-formed values.
const AUTHORITIES: &[(&str, Option<&str>)] = &[
    // gRPC C-core (Python grpcio 1.85) for `unix:/var/run/aws-node/ipamd.sock`.
    ("C-core", Some("var%2Frun%2Faws-node%2Fipamd.sock")),
    // A client that dials a bare path through its own dialer and uses it as the authority.
    ("raw path", Some("/var/run/aws-node/ipamd.sock")),
    // A client that passes the whole target.
    ("whole target", Some("unix:///var/run/aws-node/ipamd.sock")),
    // grpc-go 1.33 (and later) for `unix:///...`, and tonic's dummy URI.
    ("grpc-go", Some("localhost")),
    ("empty", Some("")),
    ("absent", None),
];

#[tokio::test]
async fn every_authority_real_clients_send_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(&dir.path().join("ipamd.sock"), ServeLimits::default()).await;
    let mut conn = RawH2::connect(&server.path).await;
    for (i, (client, authority)) in AUTHORITIES.iter().enumerate() {
        let stream = 2 * u32::try_from(i).unwrap() + 1;
        let pod = format!("pod-{i}");
        match conn.add_network(stream, *authority, &pod).await {
            Outcome::Reply(reply) => {
                assert!(reply.success, "{client}: {reply:?}");
                assert_eq!(
                    reply.network_policy_mode, pod,
                    "{client}: the request arrived"
                );
            }
            other => panic!("{client} authority {authority:?}: {other:?}"),
        }
    }
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn other_header_checks_still_reset_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(&dir.path().join("ipamd.sock"), ServeLimits::default()).await;
    let mut conn = RawH2::connect(&server.path).await;
    // An unparsable :path is still a protocol error (only :authority is relaxed).
    let block = common::hpack_literals(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/rpc.CNIBackend/AddNetwork\u{7f}"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
    ]);
    conn.send_headers(1, &block, true).await;
    assert_eq!(
        conn.outcome(1).await,
        Outcome::Reset(common::PROTOCOL_ERROR)
    );
    // So is a missing :scheme, with a path-like authority.
    let block = common::hpack_literals(&[
        (":method", "POST"),
        (":path", "/rpc.CNIBackend/AddNetwork"),
        (":authority", "/var/run/aws-node/ipamd.sock"),
    ]);
    conn.send_headers(3, &block, true).await;
    assert_eq!(
        conn.outcome(3).await,
        Outcome::Reset(common::PROTOCOL_ERROR)
    );
    // CONNECT, whose target is the authority, still refuses an unparsable one.
    let block =
        common::hpack_literals(&[(":method", "CONNECT"), (":authority", "var%2Frun%2Fx.sock")]);
    conn.send_headers(5, &block, true).await;
    assert_eq!(
        conn.outcome(5).await,
        Outcome::Reset(common::PROTOCOL_ERROR)
    );
    // The connection is still good for a proper call.
    assert!(matches!(
        conn.add_network(7, Some("var%2Frun%2Fx.sock"), "after").await,
        Outcome::Reply(r) if r.success
    ));
    drop(conn);
    server.stop().await;
}
