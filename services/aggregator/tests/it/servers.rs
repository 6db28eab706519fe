//! The servers' own defences, over real sockets on `127.0.0.1:0`: idle and slow (slowloris) connections are closed,
//! the connection cap makes room for a new client by closing the longest-idle connections, the gRPC port closes a
//! connection that opens no stream, and a bad date is a 422 rather than a panic.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use license_sync_serve::testing::{closed_within, count_closed, idle_then_late, slowloris};

use crate::control::{Harness, PATIENCE};

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let harness = Harness::start(|config| {
        config.http_idle_timeout_secs = 1;
        config.http_header_read_timeout_ms = 30_000;
    })
    .await;
    let mut stream = TcpStream::connect(harness.server().http_addr)
        .await
        .expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("request");
    let mut answer = vec![0u8; 1024];
    let read = stream.read(&mut answer).await.expect("answer");
    assert!(
        String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"),
        "the request is answered first"
    );
    let closed = closed_within(&mut stream, PATIENCE).await;
    let closed = closed.expect("the idle kept-alive connection is closed");
    assert!(
        closed >= Duration::from_millis(900),
        "not before the idle timeout: {closed:?}"
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_after_the_header_read_timeout() {
    let harness = Harness::start(|config| {
        config.http_idle_timeout_secs = 60;
        config.http_header_read_timeout_ms = 500;
    })
    .await;
    let mut stream = TcpStream::connect(harness.server().http_addr)
        .await
        .expect("connect");
    let cut = slowloris(&mut stream).await;
    let cut = cut.expect("the slow client is cut");
    assert!(
        cut < Duration::from_secs(5),
        "cut after the header-read timeout, not the idle one: {cut:?}"
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn at_the_connection_cap_the_longest_idle_connections_make_room_for_a_new_client() {
    let harness = Harness::start(|config| {
        config.http_max_connections = 4;
        config.http_idle_timeout_secs = 60;
    })
    .await;
    let address = harness.server().http_addr;
    let (mut idle, late) = idle_then_late(address, 4, 3).await;
    let client = reqwest::Client::new();
    let answer = tokio::time::timeout(
        PATIENCE,
        client.get(format!("http://{address}/healthz")).send(),
    )
    .await
    .expect("a normal request is answered while idle sockets fill the cap")
    .expect("HTTP request");
    assert_eq!(answer.status(), 200);
    let closed = count_closed(&mut idle).await;
    assert!(
        closed >= 3,
        "the oldest idle connections were closed to make room: {closed} of 4"
    );
    drop(late);
    harness.shutdown().await;
}

#[tokio::test]
async fn the_grpc_port_closes_a_connection_that_opens_no_stream() {
    let harness = Harness::start(|config| {
        config.grpc_idle_timeout_secs = 1;
    })
    .await;
    let mut stream = TcpStream::connect(harness.server().grpc_addr)
        .await
        .expect("connect");
    // The HTTP/2 preface and an empty SETTINGS frame: a connection, but no stream.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let closed = closed_within(&mut stream, PATIENCE)
        .await
        .expect("the connection without a stream is closed");
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    harness.shutdown().await;
}

#[tokio::test]
async fn usage_history_dates_out_of_range_are_refused_with_the_accepted_range() {
    let harness = Harness::start(|_| {}).await;
    let client = reqwest::Client::new();
    for query in [
        "until=-9999-01-01",
        "since=-9999-01-01",
        "since=0001-01-01&until=0001-01-02",
        "until=9999-12-31",
    ] {
        let answer = client
            .get(format!(
                "http://{}/enterprises/acme/usage-history?{query}",
                harness.server().http_addr
            ))
            .bearer_auth(&harness.owner_token)
            .send()
            .await
            .expect("answered, not a dropped connection");
        let status = answer.status().as_u16();
        let body: serde_json::Value = answer.json().await.expect("JSON body");
        if query == "until=9999-12-31" {
            // The last accepted day: answered (with an empty history).
            assert_eq!(status, 200, "{query}: {body}");
            continue;
        }
        assert_eq!(status, 422, "{query}: {body}");
        let message = body["message"].as_str().expect("message");
        assert!(
            message.contains("1970-01-01") && message.contains("9999-12-31"),
            "{query}: the accepted range is named: {message}"
        );
    }
    harness.shutdown().await;
}
