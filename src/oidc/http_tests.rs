//! [`TokenClient`] against small axum servers on `127.0.0.1:0`, one per test, each failing the
//! way a real IdP or network can: what is sent, and how each failure is classified.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt as _;
use futures::stream;

use super::{Endpoint, ErrorClass, Outcome, RefreshError, RefreshExpiry, TokenClient, USER_AGENT};
use crate::secret::{ClientSecret, RefreshToken};

const KEYCLOAK_OK: &str = r#"{"access_token":"access-token-from-idp-0123","expires_in":1800,"refresh_expires_in":1209600,"refresh_token":"rotated-refresh-token-4567","token_type":"bearer","not-before-policy":0,"session_state":"6f1b7c9e","scope":"profile email"}"#;
const PRESENTED: &str = "presented-refresh-token-89ab";

/// Forms (and a few headers) a test server received, in order.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<HashMap<String, String>>>>);

impl Recorded {
    fn push(&self, headers: &HeaderMap, mut form: HashMap<String, String>) {
        for name in [header::USER_AGENT, header::ACCEPT, header::CONTENT_TYPE] {
            if let Some(value) = headers.get(&name) {
                form.insert(format!("header:{name}"), value.to_str().unwrap().to_owned());
            }
        }
        self.0.lock().unwrap().push(form);
    }

    fn take(&self) -> Vec<HashMap<String, String>> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

async fn start(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    let mut ep = Endpoint::new_default(
        "test-idp",
        format!("http://{addr}/token"),
        "integration-api",
    );
    ep.connect_timeout = Duration::from_millis(500);
    ep.request_timeout = Duration::from_secs(3);
    ep
}

fn presented() -> RefreshToken {
    RefreshToken::from(PRESENTED)
}

fn json(status: StatusCode, body: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// A token endpoint that records each form and answers `status` + `body`.
fn recording_idp(recorded: Recorded, status: StatusCode, body: &'static str) -> Router {
    let handler = move |State(recorded): State<Recorded>,
                        headers: HeaderMap,
                        Form(form): Form<HashMap<String, String>>| async move {
        recorded.push(&headers, form);
        json(status, body)
    };
    Router::new()
        .route("/token", post(handler))
        .route("/logout", post(handler))
        .route("/revoke", post(handler))
        .with_state(recorded)
}

#[tokio::test]
async fn refresh_posts_the_grant_form_and_reads_the_answer() {
    let recorded = Recorded::default();
    let addr = start(recording_idp(recorded.clone(), StatusCode::OK, KEYCLOAK_OK)).await;
    let client = TokenClient::new(endpoint(addr)).unwrap();

    let before = SystemTime::now();
    let grant = client.refresh(&presented()).await.unwrap();
    let after = SystemTime::now();

    let forms = recorded.take();
    assert_eq!(forms.len(), 1);
    let form = &forms[0];
    assert_eq!(form["grant_type"], "refresh_token");
    assert_eq!(form["client_id"], "integration-api");
    assert_eq!(form["refresh_token"], PRESENTED);
    assert!(!form.contains_key("client_secret"), "{form:?}");
    assert_eq!(
        form["header:content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(form["header:accept"], "application/json");
    assert_eq!(form["header:user-agent"], USER_AGENT);

    assert_eq!(
        grant.access_token.expose_secret(),
        "access-token-from-idp-0123"
    );
    assert_eq!(
        grant.refresh_token.as_ref().map(|t| t.expose_secret()),
        Some("rotated-refresh-token-4567")
    );
    assert!(before <= grant.sent_at && grant.sent_at <= after);
    assert_eq!(grant.expires_at, grant.sent_at + Duration::from_secs(1800));
    assert_eq!(
        grant.refresh_expiry,
        RefreshExpiry::At(grant.sent_at + Duration::from_secs(1_209_600))
    );
    assert_eq!(grant.scope, "profile email");
}

#[tokio::test]
async fn the_client_secret_is_sent_as_a_form_field_when_set() {
    let recorded = Recorded::default();
    let addr = start(recording_idp(recorded.clone(), StatusCode::OK, KEYCLOAK_OK)).await;
    let mut ep = endpoint(addr);
    ep.client_secret = Some(ClientSecret::from("client-secret-value"));
    let client = TokenClient::new(ep).unwrap();

    client.refresh(&presented()).await.unwrap();
    let forms = recorded.take();
    assert_eq!(forms[0]["client_secret"], "client-secret-value");
    assert_eq!(forms[0]["client_id"], "integration-api");
    assert_eq!(forms[0]["refresh_token"], PRESENTED);
}

#[tokio::test]
async fn idp_refusals_and_outages_are_classified() {
    let recorded = Recorded::default();
    let refusal = r#"{"error":"invalid_grant","error_description":"Stale token"}"#;
    let addr = start(recording_idp(
        recorded.clone(),
        StatusCode::BAD_REQUEST,
        refusal,
    ))
    .await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::RejectedSession);
    assert!(err.to_string().contains("Stale token"), "{err}");

    let outage = Router::new().route(
        "/token",
        post(|| async {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "7")],
                "<html>down</html>",
            )
        }),
    );
    let addr = start(outage).await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(err.outcome(), Outcome::NotProcessed);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn connection_refused_is_transient_and_not_processed() {
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.outcome(), Outcome::NotProcessed, "{err}");
}

#[tokio::test]
async fn a_timeout_after_sending_leaves_the_outcome_unknown() {
    let reached = Arc::new(AtomicBool::new(false));
    let flag = reached.clone();
    let slow = Router::new().route(
        "/token",
        post(move || async move {
            flag.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(10)).await;
            json(StatusCode::OK, KEYCLOAK_OK)
        }),
    );
    let addr = start(slow).await;
    let mut ep = endpoint(addr);
    ep.connect_timeout = Duration::from_millis(100);
    ep.request_timeout = Duration::from_millis(300);

    let started = tokio::time::Instant::now();
    let err = TokenClient::new(ep)
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(reached.load(Ordering::SeqCst), "the request was never sent");
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err}");
}

#[tokio::test]
async fn a_body_cut_after_the_headers_leaves_the_outcome_unknown() {
    let cut = Router::new().route(
        "/token",
        post(|| async {
            let head = stream::once(async {
                Ok::<_, io::Error>(Bytes::from_static(br#"{"access_token":"acc"#))
            });
            let tail = stream::once(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(io::Error::other("connection cut"))
            });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(head.chain(tail)))
                .unwrap()
        }),
    );
    let addr = start(cut).await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err}");
    assert!(err.to_string().contains("HTTP 200"), "{err}");
}

#[tokio::test]
async fn a_body_that_stalls_past_the_request_timeout_leaves_the_outcome_unknown() {
    let stall = Router::new().route(
        "/token",
        post(|| async {
            let head = stream::once(async { Ok::<_, io::Error>(Bytes::from_static(b"{")) });
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from_stream(head.chain(stream::pending())))
                .unwrap()
        }),
    );
    let addr = start(stall).await;
    let mut ep = endpoint(addr);
    ep.connect_timeout = Duration::from_millis(100);
    ep.request_timeout = Duration::from_millis(400);
    let started = tokio::time::Instant::now();
    let err = TokenClient::new(ep)
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err}");
}

#[tokio::test]
async fn an_oversized_streamed_body_is_cut_at_the_cap() {
    const CHUNK: usize = 64 * 1024;
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = produced.clone();
    let flood = Router::new().route(
        "/token",
        post(move || async move {
            let chunk = Bytes::from(vec![b' '; CHUNK]);
            // Up to 1 GiB, without a Content-Length: only reading can tell it is too long.
            let body = stream::iter(0..16 * 1024).map(move |_| {
                counter.fetch_add(CHUNK, Ordering::SeqCst);
                Ok::<_, io::Error>(chunk.clone())
            });
            Response::builder()
                .status(StatusCode::OK)
                .body(Body::from_stream(body))
                .unwrap()
        }),
    );
    let addr = start(flood).await;
    let ep = endpoint(addr);
    assert_eq!(ep.max_body_bytes, 256 * 1024);

    let err = TokenClient::new(ep)
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unreadable, "{err}");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err}");
    // The client hung up: the server stops producing long before 1 GiB (what it did produce
    // sat in socket buffers, not in the client).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = produced.load(Ordering::SeqCst);
    assert!(sent < 128 * 1024 * 1024, "server produced {sent} bytes");
}

#[tokio::test]
async fn a_declared_oversized_body_is_refused_before_reading() {
    let big = Router::new().route(
        "/token",
        post(|| async { (StatusCode::OK, vec![b' '; 10 * 1024 * 1024]) }),
    );
    let addr = start(big).await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unreadable, "{err}");
    assert!(err.outcome_unknown());

    // An error answer's status still counts: not processed.
    let big_error = Router::new().route(
        "/token",
        post(|| async { (StatusCode::BAD_REQUEST, vec![b' '; 10 * 1024 * 1024]) }),
    );
    let addr = start(big_error).await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unreadable, "{err}");
    assert_eq!(err.outcome(), Outcome::NotProcessed);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let followed = Arc::new(AtomicBool::new(false));
    let flag = followed.clone();
    let moved = Router::new()
        .route(
            "/token",
            post(|| async {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [(header::LOCATION, "/elsewhere")],
                )
            }),
        )
        .route(
            "/elsewhere",
            post(move || async move {
                flag.store(true, Ordering::SeqCst);
                json(StatusCode::OK, KEYCLOAK_OK)
            }),
        );
    let addr = start(moved).await;
    let err = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::RejectedConfig, "{err}");
    assert!(!followed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn logout_posts_to_the_logout_endpoint() {
    let recorded = Recorded::default();
    let record = recorded.clone();
    let idp = Router::new().route(
        "/logout",
        post(
            move |headers: HeaderMap, Form(form): Form<HashMap<String, String>>| async move {
                record.push(&headers, form);
                StatusCode::NO_CONTENT
            },
        ),
    );
    let addr = start(idp).await;
    let mut ep = endpoint(addr);
    ep.logout_url = Some(format!("http://{addr}/logout"));
    ep.revoke_url = Some(format!("http://{addr}/revoke"));
    ep.client_secret = Some(ClientSecret::from("client-secret-value"));

    TokenClient::new(ep)
        .unwrap()
        .logout(&presented())
        .await
        .unwrap();
    let forms = recorded.take();
    assert_eq!(forms.len(), 1);
    assert_eq!(forms[0]["client_id"], "integration-api");
    assert_eq!(forms[0]["refresh_token"], PRESENTED);
    assert_eq!(forms[0]["client_secret"], "client-secret-value");
}

#[tokio::test]
async fn logout_falls_back_to_revocation() {
    let recorded = Recorded::default();
    let addr = start(recording_idp(recorded.clone(), StatusCode::OK, "")).await;
    let mut ep = endpoint(addr);
    ep.revoke_url = Some(format!("http://{addr}/revoke"));

    TokenClient::new(ep)
        .unwrap()
        .logout(&presented())
        .await
        .unwrap();
    let forms = recorded.take();
    assert_eq!(forms.len(), 1);
    assert_eq!(forms[0]["token"], PRESENTED);
    assert_eq!(forms[0]["token_type_hint"], "refresh_token");
    assert_eq!(forms[0]["client_id"], "integration-api");
    assert!(!forms[0].contains_key("refresh_token"));
}

#[tokio::test]
async fn logout_without_an_endpoint_is_a_no_op_and_refusals_are_reported() {
    // Nothing listens here: a request would fail.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    TokenClient::new(endpoint(addr))
        .unwrap()
        .logout(&presented())
        .await
        .unwrap();

    let recorded = Recorded::default();
    let refusal = r#"{"error":"invalid_grant","error_description":"Session not active"}"#;
    let addr = start(recording_idp(recorded, StatusCode::BAD_REQUEST, refusal)).await;
    let mut ep = endpoint(addr);
    ep.logout_url = Some(format!("http://{addr}/logout"));
    let err = TokenClient::new(ep)
        .unwrap()
        .logout(&presented())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::RejectedSession);
}

/// Captures everything logged on this thread (the test runtime is single-threaded, so the
/// server's and the client's events alike).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_reaches_the_logs_or_the_errors() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let recorded = Recorded::default();
    let addr = start(recording_idp(recorded.clone(), StatusCode::OK, KEYCLOAK_OK)).await;
    let mut ep = endpoint(addr);
    ep.client_secret = Some(ClientSecret::from("client-secret-value"));
    let client = TokenClient::new(ep).unwrap();
    let grant = client.refresh(&presented()).await.unwrap();
    let mut printed = format!("{grant:?} {client:?}");

    // An IdP that quotes the presented token back.
    let echo = r#"{"error":"invalid_grant","error_description":"Invalid refresh token presented-refresh-token-89ab"}"#;
    let addr = start(recording_idp(recorded, StatusCode::BAD_REQUEST, echo)).await;
    let err: RefreshError = TokenClient::new(endpoint(addr))
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    printed.push_str(&format!("{err} {err:?}"));

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("token endpoint answered"),
        "nothing captured: {logs}"
    );
    assert!(logs.contains("test-idp"), "{logs}");
    for secret in [
        PRESENTED,
        "access-token-from-idp-0123",
        "rotated-refresh-token-4567",
        "client-secret-value",
    ] {
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
        assert!(!printed.contains(secret), "{secret} printed: {printed}");
    }
}

#[tokio::test]
async fn a_connect_timeout_is_not_processed() {
    // A listener that never accepts: once its accept queue is full, the kernel drops further
    // SYNs and a connect can only time out.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    while queued.len() < 64 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(stream) => queued.push(stream),
            Err(_) => break,
        }
    }
    assert!(queued.len() < 64, "the accept queue never filled");

    let mut ep = endpoint(addr);
    ep.connect_timeout = Duration::from_millis(200);
    ep.request_timeout = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let err = TokenClient::new(ep)
        .unwrap()
        .refresh(&presented())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(err.class(), ErrorClass::Transient, "{err}");
    assert_eq!(err.outcome(), Outcome::NotProcessed, "{err}");
    assert!(err.to_string().contains("connect"), "{err}");
    drop((listener, queued));
}

#[test]
fn a_client_is_built_for_https_and_refused_for_a_bad_endpoint() {
    let ep = Endpoint::new_default(
        "apiax",
        "https://auth.apiax.io/auth/realms/apiax/protocol/openid-connect/token",
        "integration-api",
    );
    let client = TokenClient::new(ep).unwrap();
    assert_eq!(client.endpoint().provider, "apiax");

    let err = TokenClient::new(Endpoint::new_default(
        "apiax",
        "http://idp.example/token",
        "c",
    ))
    .unwrap_err();
    assert_eq!(err.field(), Some("token_url"));
}
