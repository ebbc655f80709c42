//! The gRPC socket's limits (`ServeLimits`): each refuses the client past it with a clear
//! error while another client is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Outcome, RawH2, TIMEOUT};
use tonic::Code;
use vpc_cni_rpc::{connect_unix, ServeLimits, TOO_MANY_CONNECTIONS};

/// One AddNetwork through the library client (a fresh connection), as the plugin makes it.
async fn good_call(path: &std::path::Path, pod: &str) -> Result<String, tonic::Status> {
    let mut client = connect_unix(path, TIMEOUT).await.map_err(|e| {
        tonic::Status::unavailable(format!("{e}: {:?}", std::error::Error::source(&e)))
    })?;
    let reply = client.add_network(common::add_request(pod)).await?;
    Ok(reply.into_inner().network_policy_mode)
}

#[tokio::test]
async fn an_oversized_message_fails_its_call_and_the_next_call_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServeLimits {
        max_message_bytes: 4096,
        ..ServeLimits::default()
    };
    let server = common::start(&dir.path().join("ipamd.sock"), limits).await;
    let mut client = connect_unix(&server.path, TIMEOUT).await.unwrap();
    let big = common::add_request(&"x".repeat(5000));
    let status = client.add_network(big).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large") && status.message().contains("4096"),
        "the error says what and which limit: {status:?}"
    );
    // Just under the limit, and on the same connection, calls are served.
    let fits = common::add_request(&"y".repeat(3000));
    let reply = client.add_network(fits).await.expect("under the limit");
    assert!(reply.into_inner().success);
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn the_default_message_limit_fits_real_requests_and_refuses_megabytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(&dir.path().join("ipamd.sock"), ServeLimits::default()).await;
    let mut client = connect_unix(&server.path, TIMEOUT).await.unwrap();
    // Kubernetes names are at most 253 bytes; a request with every field that long is served.
    let mut req = common::add_request(&"p".repeat(253));
    req.k8s_pod_namespace = "n".repeat(253);
    req.container_id = "c".repeat(253);
    req.netns = "/".repeat(4096);
    assert!(client.add_network(req).await.unwrap().into_inner().success);
    let status = client
        .add_network(common::add_request(&"x".repeat(2 << 20)))
        .await
        .expect_err("2 MiB is refused");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn a_connection_past_the_limit_gets_goaway_and_a_freed_slot_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServeLimits {
        max_connections: 2,
        ..ServeLimits::default()
    };
    let server = common::start(&dir.path().join("ipamd.sock"), limits).await;
    // The start-up health check's connection may still be winding down: wait for its slot.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(RawH2::connect(&server.path).await);
    }
    let mut refused = None;
    for _ in 0..100 {
        let mut extra = RawH2::connect(&server.path).await;
        match tokio::time::timeout(Duration::from_millis(200), extra.read()).await {
            Ok(Some(f)) if f.kind == common::GOAWAY => {
                refused = Some(f);
                break;
            }
            // Not refused: a slot was still free (the health check's); keep it held.
            _ => held.push(extra),
        }
    }
    let goaway = refused.expect("a connection past the limit is refused");
    assert_eq!(goaway.error_code(), common::ENHANCE_YOUR_CALM);
    assert_eq!(
        String::from_utf8_lossy(&goaway.payload[8..]),
        TOO_MANY_CONNECTIONS
    );
    assert_eq!(held.len(), 2, "exactly the limit is held");
    // The library client sees the refusal as an error, not a hang.
    let err = tokio::time::timeout(TIMEOUT, good_call(&server.path, "refused"))
        .await
        .expect("refused at once")
        .expect_err("no slot");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(format!("{err:?}").contains(TOO_MANY_CONNECTIONS), "{err:?}");
    // The held connections are served all along.
    assert!(matches!(
        held[0].add_network(1, Some("localhost"), "held").await,
        Outcome::Reply(r) if r.success
    ));
    // Closing one frees its slot for the next client.
    held.pop();
    let mut served = None;
    for _ in 0..100 {
        if let Ok(pod) = good_call(&server.path, "next").await {
            served = Some(pod);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served.as_deref(), Some("next"));
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_first_byte_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServeLimits {
        max_connections: 1,
        first_byte_timeout: Duration::from_millis(300),
        ..ServeLimits::default()
    };
    let server = common::start(&dir.path().join("ipamd.sock"), limits).await;
    // Dial and say nothing: the server sends its SETTINGS, then closes. (Retried while the
    // start-up health check's connection still holds the only slot: that one is refused
    // with a GOAWAY at once.)
    let mut buf = Vec::new();
    let mut silent = None;
    for _ in 0..100 {
        let mut stream = tokio::net::UnixStream::connect(&server.path).await.unwrap();
        buf.clear();
        let mut chunk = [0u8; 256];
        let refused = match tokio::time::timeout(
            Duration::from_millis(100),
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        )
        .await
        {
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                buf.windows(TOO_MANY_CONNECTIONS.len())
                    .any(|w| w == TOO_MANY_CONNECTIONS.as_bytes())
            }
            _ => false,
        };
        if !refused {
            silent = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut silent = silent.expect("a slot frees up");
    let read = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_to_end(&mut silent, &mut buf),
    )
    .await
    .expect("the server closes a silent connection (EOF or reset) before 30 s");
    if read.is_ok() {
        // At most the server's preface (a SETTINGS frame) came before the EOF.
        assert!(
            buf.len() < 64 && buf.get(3) == Some(&common::SETTINGS),
            "{buf:?}"
        );
    }
    // Its slot is free again: the one-connection server serves a real client.
    let mut served = None;
    for _ in 0..100 {
        if let Ok(pod) = good_call(&server.path, "after-silent").await {
            served = Some(pod);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(served.as_deref(), Some("after-silent"));
    server.stop().await;
}

#[tokio::test]
async fn streams_past_the_limit_are_refused_and_the_open_ones_finish() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServeLimits {
        max_concurrent_streams: 4,
        ..ServeLimits::default()
    };
    let server = common::start(&dir.path().join("ipamd.sock"), limits).await;
    let mut conn = RawH2::connect(&server.path).await;
    assert!(
        conn.server_settings
            .contains(&(common::SETTINGS_MAX_CONCURRENT_STREAMS, 4)),
        "the limit is advertised: {:?}",
        conn.server_settings
    );
    let block = common::grpc_headers("/rpc.CNIBackend/AddNetwork", Some("localhost"), &[]);
    // Four calls opened and left waiting for their request message.
    for stream in [1, 3, 5, 7] {
        conn.send_headers(stream, &block, false).await;
    }
    conn.send_headers(9, &block, false).await;
    assert_eq!(
        conn.outcome(9).await,
        Outcome::Reset(common::REFUSED_STREAM)
    );
    // Another client is served meanwhile.
    assert_eq!(good_call(&server.path, "other").await.unwrap(), "other");
    // The open calls complete once their messages arrive.
    for stream in [1, 3, 5, 7] {
        let msg = common::grpc_message(&common::add_request(&format!("s{stream}")));
        conn.send(common::DATA, 0x1, stream, &msg).await;
        assert!(
            matches!(conn.outcome(stream).await, Outcome::Reply(r) if r.network_policy_mode == format!("s{stream}")),
            "stream {stream}"
        );
    }
    // With the slots free again, the connection takes a new call.
    assert!(matches!(
        conn.add_network(11, Some("localhost"), "again").await,
        Outcome::Reply(r) if r.success
    ));
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn a_header_block_past_the_limit_is_refused_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ServeLimits {
        max_header_list_size: 8 * 1024,
        ..ServeLimits::default()
    };
    let server = common::start(&dir.path().join("ipamd.sock"), limits).await;
    let mut conn = RawH2::connect(&server.path).await;
    let big = "v".repeat(20 * 1024);
    let block = common::grpc_headers(
        "/rpc.CNIBackend/AddNetwork",
        Some("localhost"),
        &[("x-big", &big)],
    );
    conn.send_headers(1, &block, false).await;
    let outcome = conn.outcome(1).await;
    assert!(
        matches!(
            outcome,
            Outcome::NoMessage | Outcome::Reset(common::REFUSED_STREAM)
        ),
        "a 431 answer or REFUSED_STREAM, not a served call: {outcome:?}"
    );
    // A header block under the limit on the same connection is served.
    let small = "v".repeat(4 * 1024);
    let block = common::grpc_headers(
        "/rpc.CNIBackend/AddNetwork",
        Some("localhost"),
        &[("x-small", &small)],
    );
    conn.send_headers(3, &block, false).await;
    let msg = common::grpc_message(&common::add_request("small-headers"));
    conn.send(common::DATA, 0x1, 3, &msg).await;
    assert!(matches!(
        conn.outcome(3).await,
        Outcome::Reply(r) if r.network_policy_mode == "small-headers"
    ));
    assert_eq!(good_call(&server.path, "other").await.unwrap(), "other");
    drop(conn);
    server.stop().await;
}
