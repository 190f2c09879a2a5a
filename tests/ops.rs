//! Operations surface: Prometheus metrics on the admin port, gRPC server
//! reflection, and the plaintext health port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestBroker, next_event};
use tokenbroker::pb;

const SECOND: Duration = Duration::from_secs(1);

async fn channel(at: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{at}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("admin endpoint answers");
    assert!(response.status().is_success());
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    response.text().await.unwrap()
}

/// The base names of the series in an exposition.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|name| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn metrics_cover_every_exported_name_without_session_ids() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 3)
        .config(|c| c.admin_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let admin = t.broker.admin_addr.expect("admin endpoint configured");
    t.register("metrics-session-7f3a", "alice").await;
    t.get("metrics-session-7f3a", Some(SECOND), false)
        .await
        .unwrap();
    let missing = t
        .get("no-such-session-9c1e", None, false)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A watched session refreshes ahead of expiry from the timer queue.
    let mut stream = t.watch("metrics-session-7f3a").await;
    next_event(&mut stream, 5 * SECOND)
        .await
        .expect("current token");
    next_event(&mut stream, 10 * SECOND)
        .await
        .expect("the ahead-of-expiry refresh");

    let text = scrape(admin).await;
    let names = series_names(&text);
    for name in tokenbroker::metrics::ALL {
        assert!(names.contains(*name), "{name} is not exported:\n{text}");
    }
    assert!(
        text.contains(
            r#"tokenbroker_grpc_requests_total{method="GetAccessToken",code="NOT_FOUND"}"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"trigger="ahead""#), "{text}");
    assert!(text.contains("tokenbroker_watch_streams 1"), "{text}");
    assert!(text.contains("tokenbroker_store_up 1"), "{text}");
    assert!(
        !text.contains("metrics-session-7f3a"),
        "a session id in a label"
    );
    assert!(
        !text.contains("no-such-session-9c1e"),
        "a session id in a label"
    );
    assert!(!text.contains("eyJ"), "a token in the metrics");
    drop(stream);
    t.stop().await;
}

#[tokio::test]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let t = TestBroker::new().start().await;
    let mut client = ServerReflectionClient::new(channel(t.broker.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("a service list: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tokenbroker.v1.TokenBroker"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // The contract's file can be fetched by symbol (what grpcurl does).
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "tokenbroker.v1.TokenBroker".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one answer");
    let Some(MessageResponse::FileDescriptorResponse(files)) = response.message_response else {
        panic!("a file descriptor: {response:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    t.stop().await;
}

#[tokio::test]
async fn plaintext_health_port_follows_the_broker() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let t = TestBroker::new()
        .config(|c| c.health_listen = Some("127.0.0.1:0".parse().unwrap()))
        .start()
        .await;
    let at = t.broker.health_addr.expect("health port configured");
    assert_ne!(at, t.broker.addr);
    let mut health = HealthClient::new(channel(at).await);
    for service in ["", "tokenbroker.v1.TokenBroker"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    // Only health is served there.
    let mut broker = pb::token_broker_client::TokenBrokerClient::connect(format!("http://{at}"))
        .await
        .unwrap();
    let unimplemented = broker
        .get_session(pb::GetSessionRequest {
            session_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unimplemented.code(), tonic::Code::Unimplemented);
    t.stop().await;
}

#[tokio::test]
async fn the_callers_trace_context_reaches_the_idp() {
    let mut t = TestBroker::new().start().await;
    t.register("traced", "alice").await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = tonic::Request::new(pb::GetAccessTokenRequest {
        session_id: "traced".into(),
        min_ttl: None,
        force_refresh: true,
    });
    request
        .metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    t.client.get_access_token(request).await.unwrap();
    let seen = t.idp().traceparents();
    let last = seen.last().expect("the refresh carried a traceparent");
    assert!(
        last.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {last}"
    );
    assert_ne!(last, parent, "a child span, not the caller's span");
    assert!(last.ends_with("-01"), "sampling flag kept: {last}");

    // Without one (or with an invalid one), the refresh starts its own trace.
    let mut request = tonic::Request::new(pb::GetAccessTokenRequest {
        session_id: "traced".into(),
        min_ttl: None,
        force_refresh: true,
    });
    request
        .metadata_mut()
        .insert("traceparent", "garbage".parse().unwrap());
    t.client.get_access_token(request).await.unwrap();
    let seen = t.idp().traceparents();
    let own = seen.last().unwrap();
    assert_eq!(own.len(), 55, "{own}");
    assert!(!own.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{own}");
    t.stop().await;
}
