//! Caller identity and authorization through the mesh headers, the policy
//! decisions, policy reloads and the per-caller bounds — against the real
//! server and dev IdP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestBroker, assert_error, next_event};
use tokenbroker::auth::IdentitySource;
use tokenbroker::pb;
use tokenbroker::pb::watch_token_response::Event;
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);
const API: &str = "spiffe://cluster.local/ns/payments/sa/api";
const BATCH: &str = "spiffe://cluster.local/ns/payments/sa/batch";
const SUPPORT: &str = "spiffe://cluster.local/ns/ops/sa/support";
const EVIL: &str = "spiffe://cluster.local/ns/evil/sa/x";

const POLICY: &str = r#"
owner_only = true

[[rules]]
callers = ["spiffe://cluster.local/ns/payments/sa/*"]
sessions = ["payments/*"]
allow = ["*"]
"#;

const SUPPORT_RULE: &str = r#"
[[rules]]
callers = ["spiffe://cluster.local/ns/ops/sa/support"]
sessions = ["*"]
allow = ["inspect"]
any_owner = true
"#;

fn write_policy(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The element the local Envoy sidecar appends for a caller.
fn xfcc(uri: &str) -> String {
    format!("By=spiffe://cluster.local/ns/auth/sa/tokenbroker;Hash=0f1e2d;URI={uri}")
}

fn as_caller<T>(message: T, header: &str, value: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        tonic::metadata::MetadataKey::from_bytes(header.as_bytes()).unwrap(),
        value.parse().unwrap(),
    );
    request
}

fn xfcc_broker(policy: PathBuf) -> TestBroker {
    TestBroker::new().config(move |c| {
        c.auth.insecure_no_auth = false;
        c.auth.source = Some(IdentitySource::Xfcc);
        c.auth.policy_file = Some(policy);
    })
}

fn get(id: &str) -> pb::GetAccessTokenRequest {
    pb::GetAccessTokenRequest {
        session_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn xfcc_identities_and_every_policy_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), &format!("{POLICY}{SUPPORT_RULE}"));
    let mut t = xfcc_broker(policy).start().await;
    let login = t.idp().login("alice");
    let register = pb::RegisterSessionRequest {
        session_id: "payments/alice".into(),
        refresh_token: login.refresh_token.clone(),
        ..Default::default()
    };

    // No identity: UNAUTHENTICATED, and nothing reached the IdP.
    assert_error(
        t.client.register_session(register.clone()).await,
        Code::Unauthenticated,
        "CALLER_UNAUTHENTICATED",
    );
    // A header of a source that is not configured is ignored, not trusted.
    assert_error(
        t.client
            .register_session(as_caller(
                register.clone(),
                "l5d-client-id",
                "api.payments.serviceaccount.identity.linkerd.cluster.local",
            ))
            .await,
        Code::Unauthenticated,
        "CALLER_UNAUTHENTICATED",
    );
    assert_eq!(t.idp().stats().token_requests, 0);

    // The payments API registers and reads its session.
    let created = t
        .client
        .register_session(as_caller(
            register.clone(),
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .expect("allowed")
        .into_inner();
    assert!(created.created);
    t.client
        .get_access_token(as_caller(
            get("payments/alice"),
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .expect("the owner reads its token");

    // Spoofed: the caller sent a payments identity itself; the sidecar
    // appended the real one last. Only the last element counts.
    let spoofed = format!("URI={API},{}", xfcc(EVIL));
    assert_error(
        t.client
            .get_access_token(as_caller(
                get("payments/alice"),
                "x-forwarded-client-cert",
                &spoofed,
            ))
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    // Appended correctly after an earlier hop: the last element is the caller.
    let appended = format!("{},{}", xfcc(EVIL), xfcc(API));
    t.client
        .get_access_token(as_caller(
            get("payments/alice"),
            "x-forwarded-client-cert",
            &appended,
        ))
        .await
        .expect("the sidecar's element decides");

    // Another payments workload: the session is not its own (owner_only):
    // it may not know it exists.
    assert_error(
        t.client
            .get_access_token(as_caller(
                get("payments/alice"),
                "x-forwarded-client-cert",
                &xfcc(BATCH),
            ))
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    // Support may inspect any session, but not take its token or delete it.
    let info = t
        .client
        .get_session(as_caller(
            pb::GetSessionRequest {
                session_id: "payments/alice".into(),
            },
            "x-forwarded-client-cert",
            &xfcc(SUPPORT),
        ))
        .await
        .expect("support inspects")
        .into_inner();
    assert_eq!(info.session.unwrap().session_id, "payments/alice");
    assert_error(
        t.client
            .get_access_token(as_caller(
                get("payments/alice"),
                "x-forwarded-client-cert",
                &xfcc(SUPPORT),
            ))
            .await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    assert_error(
        t.client
            .delete_session(as_caller(
                pb::DeleteSessionRequest {
                    session_id: "payments/alice".into(),
                },
                "x-forwarded-client-cert",
                &xfcc(SUPPORT),
            ))
            .await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    // Registering outside one's sessions is refused as such.
    let mut elsewhere = register.clone();
    elsewhere.session_id = "hr/alice".into();
    elsewhere.refresh_token = t.idp().login("alice2").refresh_token;
    assert_error(
        t.client
            .register_session(as_caller(elsewhere, "x-forwarded-client-cert", &xfcc(API)))
            .await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    // Listing shows each caller what it may inspect.
    let list = |caller: &str| {
        let mut client = t.client.clone();
        let header = xfcc(caller);
        async move {
            client
                .list_sessions(as_caller(
                    pb::ListSessionsRequest::default(),
                    "x-forwarded-client-cert",
                    &header,
                ))
                .await
                .unwrap()
                .into_inner()
                .sessions
                .len()
        }
    };
    assert_eq!(list(API).await, 1);
    assert_eq!(list(SUPPORT).await, 1);
    assert_eq!(list(BATCH).await, 0);
    assert_eq!(list(EVIL).await, 0);
    // The owner deletes.
    t.client
        .delete_session(as_caller(
            pb::DeleteSessionRequest {
                session_id: "payments/alice".into(),
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .expect("the owner deletes");
    t.stop().await;
}

#[tokio::test]
async fn linkerd_identities() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(
        dir.path(),
        r#"
[[rules]]
callers = ["*.payments.serviceaccount.identity.linkerd.cluster.local"]
sessions = ["payments/*"]
allow = ["register", "get"]
"#,
    );
    let mut t = TestBroker::new()
        .config(move |c| {
            c.auth.insecure_no_auth = false;
            c.auth.source = Some(IdentitySource::Linkerd);
            c.auth.policy_file = Some(policy);
        })
        .start()
        .await;
    let api = "api.payments.serviceaccount.identity.linkerd.cluster.local";
    let register = pb::RegisterSessionRequest {
        session_id: "payments/carl".into(),
        refresh_token: t.idp().login("carl").refresh_token,
        ..Default::default()
    };
    t.client
        .register_session(as_caller(register, "l5d-client-id", api))
        .await
        .expect("allowed");
    t.client
        .get_access_token(as_caller(get("payments/carl"), "l5d-client-id", api))
        .await
        .expect("allowed");
    // Watch is not granted: the caller knows the session, so PERMISSION_DENIED.
    assert_error(
        t.client
            .watch_token(as_caller(
                pb::WatchTokenRequest {
                    session_id: "payments/carl".into(),
                },
                "l5d-client-id",
                api,
            ))
            .await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    let other = "web.default.serviceaccount.identity.linkerd.cluster.local";
    assert_error(
        t.client
            .get_access_token(as_caller(get("payments/carl"), "l5d-client-id", other))
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    // An XFCC header means nothing here.
    assert_error(
        t.client
            .get_access_token(as_caller(
                get("payments/carl"),
                "x-forwarded-client-cert",
                &xfcc(API),
            ))
            .await,
        Code::Unauthenticated,
        "CALLER_UNAUTHENTICATED",
    );
    assert_error(
        t.client
            .get_access_token(as_caller(
                get("payments/carl"),
                "l5d-client-id",
                "Not A Name!",
            ))
            .await,
        Code::Unauthenticated,
        "CALLER_UNAUTHENTICATED",
    );
    t.stop().await;
}

#[tokio::test]
async fn the_policy_reloads_without_dropping_streams_and_an_invalid_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let mut t = xfcc_broker(policy.clone()).start().await;
    t.client
        .register_session(as_caller(
            pb::RegisterSessionRequest {
                session_id: "payments/dora".into(),
                refresh_token: t.idp().login("dora").refresh_token,
                ..Default::default()
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap();
    let mut stream = t
        .client
        .watch_token(as_caller(
            pb::WatchTokenRequest {
                session_id: "payments/dora".into(),
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    let inspect = |caller: &str| {
        let mut client = t.client.clone();
        let header = xfcc(caller);
        async move {
            client
                .get_session(as_caller(
                    pb::GetSessionRequest {
                        session_id: "payments/dora".into(),
                    },
                    "x-forwarded-client-cert",
                    &header,
                ))
                .await
        }
    };
    assert_error(inspect(SUPPORT).await, Code::NotFound, "SESSION_NOT_FOUND");

    // A new rule, picked up without a restart.
    std::fs::write(&policy, format!("{POLICY}{SUPPORT_RULE}")).unwrap();
    t.broker
        .policy
        .as_ref()
        .unwrap()
        .reload()
        .expect("valid policy");
    inspect(SUPPORT).await.expect("support may inspect now");

    // An invalid policy is refused; the one in force stays.
    std::fs::write(
        &policy,
        "[[rules]]\ncallers = [\"*\"]\nallow = [\"everything\"]\n",
    )
    .unwrap();
    assert!(t.broker.policy.as_ref().unwrap().reload().is_err());
    inspect(SUPPORT)
        .await
        .expect("the previous policy still applies");
    assert_error(inspect(EVIL).await, Code::NotFound, "SESSION_NOT_FOUND");

    // The stream opened before the reloads is still live.
    t.client
        .get_access_token(as_caller(
            pb::GetAccessTokenRequest {
                session_id: "payments/dora".into(),
                force_refresh: true,
                ..Default::default()
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap();
    let Some(Event::Token(token)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("the watch stream survived the reloads");
    };
    assert_eq!(token.generation, 2);
    t.stop().await;
}

#[tokio::test]
async fn bounds_are_clear_errors_and_leave_the_broker_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let mut t = xfcc_broker(policy)
        .config(|c| {
            c.auth.max_streams_per_caller = 2;
            c.max_message_bytes = 8192;
            c.max_token_bytes = 4096;
        })
        .start()
        .await;
    t.client
        .register_session(as_caller(
            pb::RegisterSessionRequest {
                session_id: "payments/emil".into(),
                refresh_token: t.idp().login("emil").refresh_token,
                ..Default::default()
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap();
    let watch = |client: &mut tokenbroker::pb::token_broker_client::TokenBrokerClient<
        tonic::transport::Channel,
    >| {
        let mut client = client.clone();
        async move {
            client
                .watch_token(as_caller(
                    pb::WatchTokenRequest {
                        session_id: "payments/emil".into(),
                    },
                    "x-forwarded-client-cert",
                    &xfcc(API),
                ))
                .await
        }
    };
    let first = watch(&mut t.client).await.expect("first stream");
    let _second = watch(&mut t.client).await.expect("second stream");
    assert_error(
        watch(&mut t.client).await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
    // Another caller has its own budget.
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        match watch(&mut t.client).await {
            Ok(stream) => {
                reopened = Some(stream);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(reopened.is_some(), "a closed stream frees its slot");

    // An oversized request: INVALID_ARGUMENT naming the request.
    let status = assert_error(
        t.client
            .register_session(as_caller(
                pb::RegisterSessionRequest {
                    session_id: "payments/big".into(),
                    refresh_token: "r".repeat(4000),
                    access_token: "a".repeat(4000),
                    scope: "s".repeat(4000),
                    ..Default::default()
                },
                "x-forwarded-client-cert",
                &xfcc(API),
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert!(status.message().contains("8192"), "{status:?}");
    // A token over its own bound.
    assert_error(
        t.client
            .register_session(as_caller(
                pb::RegisterSessionRequest {
                    session_id: "payments/big".into(),
                    refresh_token: "r".repeat(5000),
                    ..Default::default()
                },
                "x-forwarded-client-cert",
                &xfcc(API),
            ))
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    // Still healthy.
    t.client
        .get_access_token(as_caller(
            get("payments/emil"),
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .expect("serving as before");
    t.stop().await;
}

#[tokio::test]
async fn without_authentication_watch_streams_are_bounded_per_connection() {
    let mut t = TestBroker::new()
        .config(|c| c.auth.max_streams_per_caller = 2)
        .start()
        .await;
    t.register("fay", "fay").await;
    let open = |client: &tokenbroker::pb::token_broker_client::TokenBrokerClient<
        tonic::transport::Channel,
    >| {
        let mut client = client.clone();
        async move {
            client
                .watch_token(pb::WatchTokenRequest {
                    session_id: "fay".into(),
                })
                .await
        }
    };
    let _a = open(&t.client).await.expect("first");
    let _b = open(&t.client).await.expect("second");
    assert_error(
        open(&t.client).await,
        Code::ResourceExhausted,
        "RATE_LIMITED",
    );
    // Another connection has its own budget.
    let other = tokenbroker::pb::token_broker_client::TokenBrokerClient::connect(format!(
        "http://{}",
        t.broker.addr
    ))
    .await
    .unwrap();
    let _c = open(&other).await.expect("a new connection may watch");
    t.get("fay", None, false).await.expect("still serving");
    t.stop().await;
}

#[tokio::test]
async fn sessions_registered_without_authentication_cannot_be_taken_over() {
    // Registered while the broker ran open: no owner recorded.
    let mut t = TestBroker::new().start().await;
    t.register("payments/old", "old").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    t.restart_with(move |c| {
        c.auth.insecure_no_auth = false;
        c.auth.source = Some(IdentitySource::Xfcc);
        c.auth.policy_file = Some(policy);
    })
    .await
    .unwrap();
    // A payments workload may register under payments/*, but the existing
    // ownerless session is nobody's to replace.
    let takeover = pb::RegisterSessionRequest {
        session_id: "payments/old".into(),
        refresh_token: t.idp().login("attacker").refresh_token,
        replace: true,
        ..Default::default()
    };
    assert_error(
        t.client
            .register_session(as_caller(takeover, "x-forwarded-client-cert", &xfcc(API)))
            .await,
        // A registering caller learns that the id is taken anyway.
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    // Only sessions it owns would do: nothing was presented to the IdP.
    assert_eq!(
        t.idp().stats().token_requests,
        1,
        "only the original registration"
    );
    let stats = t.idp().stats();
    assert_eq!(stats.logins, 2, "{stats:?}");
    t.stop().await;
}

#[tokio::test]
async fn a_registration_in_progress_cannot_be_replaced_by_another_caller() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let mut t = xfcc_broker(policy).start().await;
    // The victim's registration is slow at the IdP.
    t.idp().push_fault(tokenbroker::devidp::Fault::once(
        tokenbroker::devidp::FaultAction::Delay { ms: 400 },
    ));
    let victim = {
        let mut client = t.client.clone();
        let request = pb::RegisterSessionRequest {
            session_id: "payments/new".into(),
            refresh_token: t.idp().login("victim").refresh_token,
            ..Default::default()
        };
        tokio::spawn(async move {
            client
                .register_session(as_caller(request, "x-forwarded-client-cert", &xfcc(API)))
                .await
        })
    };
    while t.idp().stats().token_requests < 1 {
        tokio::task::yield_now().await;
    }
    let attack = pb::RegisterSessionRequest {
        session_id: "payments/new".into(),
        refresh_token: t.idp().login("attacker").refresh_token,
        replace: true,
        ..Default::default()
    };
    let attacked = t
        .client
        .register_session(as_caller(attack, "x-forwarded-client-cert", &xfcc(BATCH)))
        .await;
    assert!(victim.await.unwrap().is_ok(), "the victim registers");
    assert_error(attacked, Code::PermissionDenied, "CALLER_NOT_ALLOWED");
    t.client
        .get_access_token(as_caller(
            get("payments/new"),
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .expect("the victim's session is intact");
    t.stop().await;
}

#[tokio::test]
async fn revoking_access_ends_open_watch_streams() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write_policy(dir.path(), POLICY);
    let mut t = xfcc_broker(policy.clone()).start().await;
    t.client
        .register_session(as_caller(
            pb::RegisterSessionRequest {
                session_id: "payments/gus".into(),
                refresh_token: t.idp().login("gus").refresh_token,
                ..Default::default()
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap();
    let mut stream = t
        .client
        .watch_token(as_caller(
            pb::WatchTokenRequest {
                session_id: "payments/gus".into(),
            },
            "x-forwarded-client-cert",
            &xfcc(API),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    // The payments rule is withdrawn.
    std::fs::write(&policy, "owner_only = true\n").unwrap();
    t.broker.policy.as_ref().unwrap().reload().unwrap();
    t.broker
        .broker
        .get_token("payments/gus", None, true, None)
        .await
        .unwrap();
    let ended = tokio::time::timeout(5 * SECOND, stream.message())
        .await
        .expect("the stream reacts")
        .expect_err("the stream ends instead of delivering the new token");
    assert_eq!(ended.code(), Code::NotFound);
    t.stop().await;
}
