//! End-to-end behaviour of the broker: a real tonic server and a real dev IdP
//! over HTTP on 127.0.0.1, driven through the generated gRPC client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::{TestBroker, assert_error, duration, next_event};
use tokenbroker::devidp::{Fault, FaultAction};
use tokenbroker::pb;
use tokenbroker::pb::watch_token_response::Event;
use tokenbroker::session::SessionId;
use tokenbroker::store::{InsertMode, MemoryStore, SessionStore, StoreError, StoredSession};
use tonic::Code;
use tonic_types::StatusExt as _;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn register_get_then_the_ahead_of_expiry_refresh_arrives_on_a_watch() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 3)
        .start()
        .await;
    let (login, session) = t.register("alice", "alice").await;
    assert_eq!(session.state, pb::SessionState::Active as i32);
    assert_eq!(session.generation, 1);

    // Registration validated the token with one refresh.
    assert_eq!(t.idp().stats().refreshes_succeeded, 1);
    let token = t.get("alice", Some(SECOND), false).await.unwrap();
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.generation, 1);
    assert_ne!(
        token.access_token, login.access_token,
        "a fresh token, not the login's"
    );

    let mut stream = t.watch("alice").await;
    let Some(Event::Token(first)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("the current token comes first");
    };
    assert_eq!(first.access_token, token.access_token);
    // At about 75% of the 3 s life, the watched session refreshes by itself.
    let Some(Event::Token(second)) = next_event(&mut stream, 10 * SECOND).await else {
        panic!("a refreshed token follows");
    };
    assert_eq!(second.generation, 2);
    assert_ne!(second.access_token, first.access_token);
    assert!(second.expires_at.unwrap().seconds >= first.expires_at.unwrap().seconds);
    let info = t.session("alice").await.unwrap();
    assert_eq!(info.generation, 2);
    assert!(info.last_refresh_at.is_some());
    assert_eq!(t.idp().stats().stale_presentations, 0);
    t.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_gets_on_an_expired_session_make_one_refresh() {
    let mut t = TestBroker::new().start().await;
    t.register_with_token("bob", "bob", Duration::ZERO).await;
    assert_eq!(t.idp().stats().refreshes_succeeded, 0);

    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut client = t.client.clone();
        calls.spawn(async move {
            client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: "bob".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().token.unwrap().access_token)
        });
    }
    let mut tokens = HashSet::new();
    while let Some(result) = calls.join_next().await {
        tokens.insert(result.unwrap().expect("every caller gets a token"));
    }
    assert_eq!(tokens.len(), 1, "all callers share the one new token");
    let stats = t.idp().stats();
    assert_eq!(stats.refreshes_succeeded, 1, "{stats:?}");
    assert_eq!(stats.token_requests, 1, "{stats:?}");
    t.stop().await;
}

#[tokio::test]
async fn no_refresh_token_is_presented_again_across_many_refreshes_and_forced_refreshes() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 2)
        .start()
        .await;
    let (login, _) = t.register("carol", "carol").await;
    let mut seen_generation = 1;
    for round in 0..40 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..8 {
            let mut client = t.client.clone();
            let force = (round + i) % 3 == 0;
            let min_ttl = if i % 2 == 0 { 1 } else { 5 };
            calls.spawn(async move {
                client
                    .get_access_token(pb::GetAccessTokenRequest {
                        session_id: "carol".into(),
                        min_ttl: Some(duration(Duration::from_secs(min_ttl))),
                        force_refresh: force,
                    })
                    .await
                    .map(|r| r.into_inner().token.unwrap())
            });
        }
        while let Some(result) = calls.join_next().await {
            let token = result.unwrap().expect("every call succeeds");
            seen_generation = seen_generation.max(token.generation);
        }
    }
    let family = t.idp().family(&login.session_state).unwrap();
    assert!(family.refreshes_succeeded >= 20, "{family:?}");
    assert_eq!(family.stale_presentations, 0, "{family:?}");
    assert_eq!(family.replays_rejected, 0, "{family:?}");
    assert_eq!(
        family.max_in_flight, 1,
        "never two presentations at once: {family:?}"
    );
    assert!(
        seen_generation > 20,
        "callers saw the refreshes: {seen_generation}"
    );
    assert!(
        seen_generation <= family.refreshes_succeeded,
        "one generation per refresh at most"
    );
    let info = t.session("carol").await.unwrap();
    assert_eq!(info.state, pb::SessionState::Active as i32);
    t.stop().await;
}

#[tokio::test]
async fn a_lost_answer_is_retried_once_and_without_reuse_ends_in_reauthentication() {
    let mut t = TestBroker::new().start().await;
    let (login, _) = t.register("dave", "dave").await;
    t.idp()
        .push_fault(Fault::once(FaultAction::DropAfterProcessing));
    assert_error(
        t.get("dave", None, true).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    let family = t.idp().family(&login.session_state).unwrap();
    // The retry presented the token whose successor was lost with the answer: once.
    assert_eq!(family.stale_presentations, 1, "{family:?}");
    let info = t.session("dave").await.unwrap();
    assert_eq!(info.state, pb::SessionState::ReauthRequired as i32);
    // Terminal: no further attempt reaches the IdP.
    let before = t.idp().stats().token_requests;
    assert_error(
        t.get("dave", None, false).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    assert_eq!(t.idp().stats().token_requests, before);
    t.stop().await;
}

#[tokio::test]
async fn a_lost_answer_is_retried_once_and_with_reuse_one_keeps_the_session() {
    let mut t = TestBroker::new()
        .realm(|r| r.refresh_token_max_reuse = 1)
        .start()
        .await;
    let (login, _) = t.register("erin", "erin").await;
    t.idp()
        .push_fault(Fault::once(FaultAction::DropAfterProcessing));
    let token = t.get("erin", None, true).await.expect("the retry succeeds");
    assert_eq!(token.generation, 2);
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(family.reuses_allowed, 1, "{family:?}");
    assert_eq!(family.replays_rejected, 0, "{family:?}");
    // The session goes on with the newest token.
    let next = t.get("erin", None, true).await.unwrap();
    assert_eq!(next.generation, 3);
    assert_eq!(
        t.idp()
            .family(&login.session_state)
            .unwrap()
            .replays_rejected,
        0
    );
    t.stop().await;
}

#[tokio::test]
async fn invalid_grant_requires_reauthentication_and_ends_watch_streams() {
    let mut t = TestBroker::new().start().await;
    let (login, _) = t.register("frank", "frank").await;
    let mut stream = t.watch("frank").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));

    assert!(t.idp().end_session(&login.session_state));
    let status = assert_error(
        t.get("frank", None, true).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    assert!(
        status.message().contains("Session not active"),
        "{status:?}"
    );
    let Some(Event::Ended(ended)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("watchers get the terminal event");
    };
    assert_eq!(
        ended.reason,
        pb::session_ended::Reason::ReauthenticationRequired as i32
    );
    assert!(
        next_event(&mut stream, 5 * SECOND).await.is_none(),
        "the stream ends"
    );
    let info = t.session("frank").await.unwrap();
    assert_eq!(info.state, pb::SessionState::ReauthRequired as i32);
    assert_eq!(
        info.last_error.unwrap().class,
        pb::ErrorClass::RejectedSession as i32
    );
    t.stop().await;
}

#[tokio::test]
async fn an_idp_outage_serves_the_cached_token_then_unavailable_then_recovers() {
    // Keycloak's default (no refresh-token revocation): a timed-out refresh
    // that the IdP did process costs nothing.
    let mut t = TestBroker::new()
        .realm(|r| r.revoke_refresh_token = false)
        .config(|c| c.providers.get_mut("apiax").unwrap().request_timeout_ms = 500)
        .start()
        .await;
    let (login, _) = t.register("grace", "grace").await;
    let cached = t.get("grace", None, false).await.unwrap();

    t.idp().set_faults(vec![Fault::always(FaultAction::Status {
        status: 500,
        body: r#"{"error":"unknown_error"}"#.into(),
        retry_after: None,
    })]);
    // Still valid for the default min_ttl: served from memory.
    let again = t.get("grace", None, false).await.unwrap();
    assert_eq!(again.access_token, cached.access_token);
    // Not valid for 2 h: the refresh fails.
    let status = assert_error(
        t.get("grace", Some(7200 * SECOND), false).await,
        Code::Unavailable,
        "PROVIDER_UNAVAILABLE",
    );
    assert!(
        status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .is_some()
    );

    // Timeouts: the IdP holds every answer past the broker's timeout.
    t.idp()
        .set_faults(vec![Fault::always(FaultAction::Delay { ms: 1500 })]);
    tokio::time::sleep(Duration::from_millis(300)).await; // past the on-demand backoff
    let status = assert_error(
        t.get("grace", Some(7200 * SECOND), true).await,
        Code::Unavailable,
        "PROVIDER_UNAVAILABLE",
    );
    assert!(status.get_details_retry_info().is_some());
    let info = t.session("grace").await.unwrap();
    assert_eq!(info.state, pb::SessionState::Active as i32);
    assert!(info.consecutive_failures >= 2, "{info:?}");
    assert_eq!(
        info.last_error.unwrap().class,
        pb::ErrorClass::Transient as i32
    );

    // The IdP comes back: the session recovers.
    t.idp().clear_faults();
    let mut recovered = None;
    for _ in 0..50 {
        match t.get("grace", Some(7200 * SECOND), false).await {
            Ok(token) => {
                recovered = Some(token);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let recovered = recovered.expect("the session recovers once the IdP is back");
    assert!(recovered.generation > cached.generation);
    let info = t.session("grace").await.unwrap();
    assert_eq!(info.consecutive_failures, 0);
    assert!(info.last_error.is_none());
    assert!(t.idp().family(&login.session_state).is_some());
    t.stop().await;
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let mut t = TestBroker::new().start().await;
    t.register("valid", "valid").await;
    let login = t.idp().login("someone");
    let register = |mutate: &dyn Fn(&mut pb::RegisterSessionRequest)| {
        let mut request = pb::RegisterSessionRequest {
            session_id: "s1".into(),
            refresh_token: login.refresh_token.clone(),
            ..Default::default()
        };
        mutate(&mut request);
        request
    };
    let cases: Vec<(&str, pb::RegisterSessionRequest)> = vec![
        (
            "oversized id",
            register(&|r| r.session_id = "a".repeat(129)),
        ),
        ("bad charset", register(&|r| r.session_id = "a b".into())),
        (
            "control char",
            register(&|r| r.session_id = "a\u{7}".into()),
        ),
        (
            "empty refresh token",
            register(&|r| r.refresh_token.clear()),
        ),
        (
            "oversized refresh token",
            register(&|r| r.refresh_token = "x".repeat(17 * 1024)),
        ),
        (
            "refresh token with spaces",
            register(&|r| r.refresh_token = "a b".into()),
        ),
        (
            "unknown provider",
            register(&|r| r.provider = "nope".into()),
        ),
        (
            "too many labels",
            register(&|r| r.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()),
        ),
        (
            "oversized label",
            register(&|r| {
                r.labels.insert("k".into(), "v".repeat(257));
            }),
        ),
        (
            "bad label key",
            register(&|r| {
                r.labels.insert("a b".into(), "v".into());
            }),
        ),
        (
            "negative expires_in",
            register(&|r| {
                r.access_token = "at".into();
                r.expires_in = Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                });
            }),
        ),
        (
            "expires_in without access token",
            register(&|r| r.expires_in = Some(duration(SECOND))),
        ),
    ];
    for (name, request) in cases {
        let status = assert_error(
            t.client.register_session(request).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert!(
            status.get_details_bad_request().is_some(),
            "{name}: {status:?}"
        );
    }
    // Nothing of the above reached the IdP or got stored.
    assert_eq!(t.idp().stats().refreshes_succeeded, 1);
    assert_error(t.session("s1").await, Code::NotFound, "SESSION_NOT_FOUND");

    let negative_ttl = t
        .client
        .get_access_token(pb::GetAccessTokenRequest {
            session_id: "valid".into(),
            min_ttl: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            force_refresh: false,
        })
        .await;
    assert_error(negative_ttl, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_error(
        t.get("", None, false).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        t.get(&"x".repeat(200), None, false).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        t.client
            .watch_token(pb::WatchTokenRequest {
                session_id: "bad id".into(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        t.client
            .delete_session(pb::DeleteSessionRequest {
                session_id: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        t.client
            .list_sessions(pb::ListSessionsRequest {
                page_size: 5000,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_error(
        t.client
            .list_sessions(pb::ListSessionsRequest {
                page_token: "not a token".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    // The broker is still healthy.
    t.get("valid", None, false).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn registration_is_idempotent_exclusive_and_replaceable() {
    let mut t = TestBroker::new().start().await;
    let login = t.idp().login("henry");
    let request = pb::RegisterSessionRequest {
        session_id: "henry".into(),
        refresh_token: login.refresh_token.clone(),
        labels: [("team".to_string(), "payments".to_string())].into(),
        ..Default::default()
    };
    let first = t
        .client
        .register_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = t
        .client
        .register_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created, "same id, same refresh token: idempotent");
    assert_eq!(
        t.idp().stats().refreshes_succeeded,
        1,
        "the repeat made no refresh"
    );

    let other = t.idp().login("henry");
    let mut different = request.clone();
    different.refresh_token = other.refresh_token.clone();
    assert_error(
        t.client.register_session(different.clone()).await,
        Code::AlreadyExists,
        "SESSION_EXISTS",
    );

    different.replace = true;
    let replaced = t
        .client
        .register_session(different)
        .await
        .unwrap()
        .into_inner();
    assert!(replaced.created);
    let token = t.get("henry", None, true).await.unwrap();
    assert!(token.generation > 1);
    // The refreshes after the replacement belong to the new login.
    assert!(
        t.idp()
            .family(&other.session_state)
            .unwrap()
            .refreshes_succeeded
            >= 1
    );

    // An empty id makes a fresh one.
    let generated = t
        .client
        .register_session(pb::RegisterSessionRequest {
            refresh_token: t.idp().login("ivy").refresh_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!generated.session.unwrap().session_id.is_empty());
    t.stop().await;
}

#[tokio::test]
async fn a_dead_refresh_token_fails_registration_and_is_not_stored() {
    let mut t = TestBroker::new().start().await;
    let login = t.idp().login("jack");
    t.idp().end_session(&login.session_state);
    let status = assert_error(
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: "jack".into(),
                refresh_token: login.refresh_token,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    assert!(
        !status.message().contains("eyJ"),
        "no token in errors: {status:?}"
    );
    assert_error(t.session("jack").await, Code::NotFound, "SESSION_NOT_FOUND");
    assert_error(
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: "garbage".into(),
                refresh_token: "not-a-token".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    t.stop().await;
}

#[tokio::test]
async fn a_wrong_client_id_is_a_provider_misconfiguration() {
    let mut t = TestBroker::new()
        .config(|c| c.providers.get_mut("apiax").unwrap().client_id = "someone-else".into())
        .start()
        .await;
    let login = t.idp().login("kate");
    assert_error(
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: "kate".into(),
                refresh_token: login.refresh_token,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "PROVIDER_MISCONFIGURED",
    );
    t.stop().await;
}

#[tokio::test]
async fn delete_logs_out_upstream_and_ends_streams() {
    let mut t = TestBroker::new().start().await;
    let (login, _) = t.register("leo", "leo").await;
    let mut stream = t.watch("leo").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    let answer = t
        .client
        .delete_session(pb::DeleteSessionRequest {
            session_id: "leo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.logged_out_upstream);
    assert_eq!(t.idp().stats().logouts, 1);
    let Some(Event::Ended(ended)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("watchers learn of the deletion");
    };
    assert_eq!(ended.reason, pb::session_ended::Reason::Deleted as i32);
    assert!(next_event(&mut stream, 5 * SECOND).await.is_none());
    assert_error(
        t.get("leo", None, false).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_error(
        t.client
            .delete_session(pb::DeleteSessionRequest {
                session_id: "leo".into(),
            })
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    // The IdP ended the SSO session: the old refresh token is dead there too.
    let family = t.idp().family(&login.session_state).unwrap();
    assert_ne!(format!("{:?}", family.state), "Active", "{family:?}");
    t.stop().await;
}

#[tokio::test]
async fn list_pages_and_filters_and_never_shows_tokens() {
    let mut t = TestBroker::new().start().await;
    for i in 0..7 {
        let login = t.idp().login(&format!("u{i}"));
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: format!("tenant-a/u{i}"),
                refresh_token: login.refresh_token,
                access_token: login.access_token,
                expires_in: Some(duration(Duration::from_secs(600))),
                labels: [(
                    "tier".to_string(),
                    if i % 2 == 0 { "gold" } else { "free" }.to_string(),
                )]
                .into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = t
            .client
            .list_sessions(pb::ListSessionsRequest {
                page_size: 3,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sessions.len() <= 3);
        ids.extend(page.sessions.iter().map(|s| s.session_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..7).map(|i| format!("tenant-a/u{i}")).collect();
    assert_eq!(ids, expected, "every session once, in id order");

    let gold = t
        .client
        .list_sessions(pb::ListSessionsRequest {
            label_selector: [("tier".to_string(), "gold".to_string())].into(),
            state: pb::SessionState::Active as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gold.sessions.len(), 4);
    let reauth = t
        .client
        .list_sessions(pb::ListSessionsRequest {
            state: pb::SessionState::ReauthRequired as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reauth.sessions.is_empty());
    t.stop().await;
}

#[tokio::test]
async fn watchers_are_warned_when_the_hard_maximum_nears() {
    // The SSO session maximum (60 s) caps the refresh token below what the
    // login promised (1 h): re-login is due, and watchers hear of it.
    let mut t = TestBroker::new()
        .realm(|r| {
            r.sso_session_max_secs = 60;
            r.sso_session_idle_secs = 3600;
        })
        .start()
        .await;
    let login = t.idp().login("mia");
    t.client
        .register_session(pb::RegisterSessionRequest {
            session_id: "mia".into(),
            refresh_token: login.refresh_token,
            access_token: login.access_token,
            expires_in: Some(duration(Duration::from_secs(600))),
            refresh_expires_in: Some(duration(Duration::from_secs(3600))),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = t.watch("mia").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    t.get("mia", None, true).await.unwrap();
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    let Some(Event::ReauthWarning(warning)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("a re-login warning follows the capped refresh");
    };
    let due = warning.reauth_due_at.unwrap().seconds;
    let info = t.session("mia").await.unwrap();
    assert_eq!(info.reauth_due_at.unwrap().seconds, due);
    assert_eq!(info.refresh_expires_at.unwrap().seconds, due);
    t.stop().await;
}

#[tokio::test]
async fn unknown_sessions_are_not_found_everywhere() {
    let mut t = TestBroker::new().start().await;
    assert_error(
        t.get("ghost", None, false).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_error(
        t.session("ghost").await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_error(
        t.client
            .watch_token(pb::WatchTokenRequest {
                session_id: "ghost".into(),
            })
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    assert_error(
        t.client
            .delete_session(pb::DeleteSessionRequest {
                session_id: "ghost".into(),
            })
            .await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    t.stop().await;
}

/// A memory store whose writes can be made to fail, or to lose their
/// acknowledgement after landing.
#[derive(Debug, Default)]
struct FlakyStore {
    inner: MemoryStore,
    failing: AtomicBool,
    lose_ack: AtomicBool,
    inserts_failing: AtomicBool,
    insert_loses_ack: AtomicBool,
}

#[async_trait::async_trait]
impl SessionStore for FlakyStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.load_all().await
    }
    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        if self.inserts_failing.load(SeqCst) {
            return Err(StoreError::Backend("disk full".into()));
        }
        let written = self.inner.insert(session, mode).await;
        if written.is_ok() && self.insert_loses_ack.swap(false, SeqCst) {
            return Err(StoreError::Backend("connection reset after commit".into()));
        }
        written
    }
    async fn update(&self, session: &StoredSession, expected: u64) -> Result<(), StoreError> {
        if self.failing.load(SeqCst) {
            return Err(StoreError::Backend("disk full".into()));
        }
        let written = self.inner.update(session, expected).await;
        if written.is_ok() && self.lose_ack.swap(false, SeqCst) {
            return Err(StoreError::Backend("connection reset after commit".into()));
        }
        written
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.delete(id).await
    }
}

#[tokio::test]
async fn a_rotation_that_cannot_be_stored_is_not_used_and_never_replayed() {
    let store = Arc::new(FlakyStore::default());
    let mut t = TestBroker::new().store(store.clone()).start().await;
    let (login, _) = t.register("nina", "nina").await;
    let first = t.get("nina", None, false).await.unwrap();

    store.failing.store(true, SeqCst);
    assert_error(
        t.get("nina", None, true).await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    // The IdP rotated, but the new access token is not handed out until stored.
    assert_eq!(
        t.idp()
            .family(&login.session_state)
            .unwrap()
            .refreshes_succeeded,
        2
    );
    let cached = t.get("nina", None, false).await.unwrap();
    assert_eq!(cached.generation, first.generation);
    assert_eq!(cached.access_token, first.access_token);
    let info = t.session("nina").await.unwrap();
    assert_eq!(info.last_error.unwrap().class, pb::ErrorClass::Store as i32);

    store.failing.store(false, SeqCst);
    let stored = t.get("nina", None, true).await.unwrap();
    assert_eq!(
        stored.generation, 2,
        "the held rotation is stored, then used"
    );
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(
        family.refreshes_succeeded, 2,
        "no refresh was needed for it"
    );
    let next = t.get("nina", None, true).await.unwrap();
    assert_eq!(next.generation, 3);
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(
        family.stale_presentations, 0,
        "the rotated-away token was never presented again: {family:?}"
    );
    assert_eq!(family.replays_rejected, 0);
    t.stop().await;
}

#[tokio::test]
async fn rate_limited_answers_carry_the_providers_retry_after() {
    let mut t = TestBroker::new().start().await;
    t.register("olga", "olga").await;
    t.idp().push_fault(Fault::once(FaultAction::Status {
        status: 429,
        body: String::new(),
        retry_after: Some("7".into()),
    }));
    let status = assert_error(
        t.get("olga", None, true).await,
        Code::Unavailable,
        "PROVIDER_UNAVAILABLE",
    );
    assert_eq!(
        status.get_details_retry_info().unwrap().retry_delay,
        Some(7 * SECOND)
    );
    // Callers are held off until then, without calling the IdP.
    let before = t.idp().stats().token_requests;
    let status = assert_error(
        t.get("olga", None, true).await,
        Code::Unavailable,
        "PROVIDER_UNAVAILABLE",
    );
    assert!(
        status
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap()
            <= 7 * SECOND
    );
    assert_eq!(t.idp().stats().token_requests, before);
    // The cached token is still good for ordinary calls.
    t.get("olga", None, false).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn idle_sessions_cost_only_keep_alive_refreshes() {
    // Access tokens of 1 s, refresh tokens idling out after 4 s: an idle
    // session is refreshed only to keep its refresh token alive.
    let mut t = TestBroker::new()
        .realm(|r| {
            r.access_token_lifespan_secs = 1;
            r.sso_session_idle_secs = 4;
        })
        .start()
        .await;
    let login = t.register_with_token("pia", "pia", SECOND).await;
    assert_eq!(login.refresh_expires_in, 4);
    // Keep-alive is due about 2 s in (half the 4 s window); wait for it.
    let mut refreshed = 0;
    for _ in 0..100 {
        refreshed = t
            .idp()
            .family(&login.session_state)
            .unwrap()
            .refreshes_succeeded;
        if refreshed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        refreshed, 1,
        "one keep-alive refresh, not one per 1 s access token"
    );
    // The IdP counts the refresh before the broker has stored it.
    let mut info = t.session("pia").await.unwrap();
    for _ in 0..100 {
        if info.generation == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = t.session("pia").await.unwrap();
    }
    assert_eq!(info.generation, 2);
    assert_eq!(
        t.idp()
            .family(&login.session_state)
            .unwrap()
            .refreshes_succeeded,
        1
    );
    assert_eq!(info.state, pb::SessionState::Active as i32);
    t.stop().await;
}

#[tokio::test]
async fn shutdown_ends_watch_streams_with_unavailable() {
    let mut t = TestBroker::new().start().await;
    t.register("quinn", "quinn").await;
    let mut stream = t.watch("quinn").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    t.broker.shutdown_token().cancel();
    let status = tokio::time::timeout(5 * SECOND, stream.message())
        .await
        .expect("the stream ends promptly")
        .expect_err("with a status");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(common::reason(&status), "SHUTTING_DOWN");
    t.stop().await;
}

#[tokio::test]
async fn a_commit_whose_acknowledgement_was_lost_is_recognised_not_replayed() {
    let store = Arc::new(FlakyStore::default());
    let mut t = TestBroker::new().store(store.clone()).start().await;
    let (login, _) = t.register("rita", "rita").await;
    store.lose_ack.store(true, SeqCst);
    // The write landed; the broker was told it failed.
    assert_error(
        t.get("rita", None, true).await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    for expected in 2..6 {
        let token = t
            .get("rita", None, true)
            .await
            .expect("the session goes on");
        assert_eq!(token.generation, expected);
    }
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(family.stale_presentations, 0, "{family:?}");
    assert_eq!(
        t.session("rita").await.unwrap().state,
        pb::SessionState::Active as i32
    );
    t.stop().await;
}

#[tokio::test]
async fn replacing_a_session_while_its_old_login_is_refreshing_keeps_the_new_login() {
    let mut t = TestBroker::new().start().await;
    let (old, _) = t.register("sam", "sam").await;
    // The old login's next refresh is slow, and the IdP has ended it meanwhile.
    t.idp()
        .push_fault(Fault::once(FaultAction::Delay { ms: 500 }));
    t.idp().end_session(&old.session_state);
    let forced = {
        let mut client = t.client.clone();
        tokio::spawn(async move {
            client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: "sam".into(),
                    min_ttl: None,
                    force_refresh: true,
                })
                .await
        })
    };
    while t.idp().stats().token_requests < 2 {
        tokio::task::yield_now().await;
    }
    let new = t.idp().login("sam");
    t.client
        .register_session(pb::RegisterSessionRequest {
            session_id: "sam".into(),
            refresh_token: new.refresh_token.clone(),
            access_token: new.access_token.clone(),
            expires_in: Some(duration(Duration::from_secs(300))),
            replace: true,
            ..Default::default()
        })
        .await
        .expect("the replacement succeeds");
    // The old login's refresh ended as the IdP said; the new login is untouched.
    assert_error(
        forced.await.unwrap(),
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    let info = t.session("sam").await.unwrap();
    assert_eq!(info.state, pb::SessionState::Active as i32);
    let token = t
        .get("sam", None, true)
        .await
        .expect("the new login refreshes");
    assert!(token.generation > info.generation - 1);
    assert_eq!(
        t.idp()
            .family(&new.session_state)
            .unwrap()
            .refreshes_succeeded,
        1
    );
    t.stop().await;
}

#[tokio::test]
async fn a_delete_whose_caller_gives_up_still_completes() {
    let mut t = TestBroker::new().start().await;
    t.register("tom", "tom").await;
    let mut stream = t.watch("tom").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    t.idp()
        .push_fault(Fault::once(FaultAction::Delay { ms: 600 }));
    let forced = {
        let mut client = t.client.clone();
        tokio::spawn(async move {
            client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: "tom".into(),
                    min_ttl: None,
                    force_refresh: true,
                })
                .await
        })
    };
    while t.idp().stats().token_requests < 2 {
        tokio::task::yield_now().await;
    }
    let mut request = tonic::Request::new(pb::DeleteSessionRequest {
        session_id: "tom".into(),
    });
    request.set_timeout(Duration::from_millis(100));
    let status = t
        .client
        .delete_session(request)
        .await
        .expect_err("the caller gives up");
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    // The refresh in flight lands first, then the deletion finishes on its own.
    assert!(forced.await.unwrap().is_ok());
    let Some(Event::Token(_)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("the refreshed token reaches the watcher");
    };
    let Some(Event::Ended(ended)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("then the deletion ends the stream");
    };
    assert_eq!(ended.reason, pb::session_ended::Reason::Deleted as i32);
    assert_error(t.session("tom").await, Code::NotFound, "SESSION_NOT_FOUND");
    assert_eq!(t.idp().stats().logouts, 1);
    t.stop().await;
}

#[tokio::test]
async fn a_misconfigured_provider_is_reported_as_such_while_backing_off() {
    let mut t = TestBroker::new().start().await;
    t.register("uma", "uma").await;
    t.idp().push_fault(Fault::once(FaultAction::Status {
        status: 401,
        body: r#"{"error":"invalid_client","error_description":"Invalid client credentials"}"#
            .into(),
        retry_after: None,
    }));
    assert_error(
        t.get("uma", None, true).await,
        Code::FailedPrecondition,
        "PROVIDER_MISCONFIGURED",
    );
    // Held off without calling the IdP, with the same reason.
    let before = t.idp().stats().token_requests;
    assert_error(
        t.get("uma", None, true).await,
        Code::FailedPrecondition,
        "PROVIDER_MISCONFIGURED",
    );
    assert_eq!(t.idp().stats().token_requests, before);
    t.stop().await;
}

#[tokio::test]
async fn a_refresh_token_valid_for_years_does_not_stop_the_timer_queue() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 2)
        .start()
        .await;
    let login = t.idp().login("vic");
    t.client
        .register_session(pb::RegisterSessionRequest {
            session_id: "vic".into(),
            refresh_token: login.refresh_token,
            access_token: login.access_token,
            expires_in: Some(duration(Duration::from_millis(500))),
            refresh_expires_in: Some(duration(Duration::from_secs(3 * 366 * 86_400))),
            ..Default::default()
        })
        .await
        .unwrap();
    // vic is idle: its wake-up at ~0.4 s plans a keep-alive three years out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    t.register("wes", "wes").await;
    let mut stream = t.watch("wes").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    let Some(Event::Token(next)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("the timer queue still runs: the ahead-of-expiry refresh arrives");
    };
    assert_eq!(next.generation, 2);
    let vic = t.session("vic").await.unwrap();
    assert!(vic.next_refresh_at.is_some());
    t.stop().await;
}

#[tokio::test]
async fn a_retried_registration_without_an_id_never_presents_the_token_again() {
    let mut t = TestBroker::new().start().await;
    let login = t.idp().login("xena");
    let request = pb::RegisterSessionRequest {
        refresh_token: login.refresh_token.clone(),
        ..Default::default()
    };
    let first = t
        .client
        .register_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = t
        .client
        .register_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && !retry.created);
    let id = first.session.unwrap().session_id;
    assert_eq!(
        retry.session.unwrap().session_id,
        id,
        "the retry finds the same session"
    );
    // The same token under an explicit other id is refused, not presented.
    let mut elsewhere = request.clone();
    elsewhere.session_id = "xena-2".into();
    assert_error(
        t.client.register_session(elsewhere).await,
        Code::AlreadyExists,
        "SESSION_EXISTS",
    );
    t.get(&id, None, true).await.expect("the session lives");
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(family.stale_presentations, 0, "{family:?}");
    assert_eq!(family.refreshes_succeeded, 2);
    t.stop().await;
}

#[tokio::test]
async fn a_registration_whose_store_write_failed_is_retried_with_the_rotated_grant() {
    let store = Arc::new(FlakyStore::default());
    let mut t = TestBroker::new().store(store.clone()).start().await;
    let login = t.idp().login("yara");
    let request = pb::RegisterSessionRequest {
        session_id: "yara".into(),
        refresh_token: login.refresh_token.clone(),
        ..Default::default()
    };
    store.inserts_failing.store(true, SeqCst);
    assert_error(
        t.client.register_session(request.clone()).await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    store.inserts_failing.store(false, SeqCst);
    let retried = t
        .client
        .register_session(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(retried.created);
    t.get("yara", None, true).await.expect("the session works");
    let family = t.idp().family(&login.session_state).unwrap();
    assert_eq!(
        family.stale_presentations, 0,
        "the rotated-away token was not presented again: {family:?}"
    );
    assert_eq!(family.refreshes_succeeded, 2);

    // An insert that lands but reports failure counts as done.
    let other = t.idp().login("yves");
    store.insert_loses_ack.store(true, SeqCst);
    let answer = t
        .client
        .register_session(pb::RegisterSessionRequest {
            session_id: "yves".into(),
            refresh_token: other.refresh_token,
            ..Default::default()
        })
        .await
        .expect("recognised as stored")
        .into_inner();
    assert!(answer.created);
    t.get("yves", None, false).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn a_replace_after_an_unacknowledged_rotation_keeps_both_logins_safe() {
    let store = Arc::new(FlakyStore::default());
    let mut t = TestBroker::new().store(store.clone()).start().await;
    let (old, _) = t.register("zoe", "zoe").await;
    store.lose_ack.store(true, SeqCst);
    assert_error(
        t.get("zoe", None, true).await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    let new = t.idp().login("zoe");
    let replaced = t
        .client
        .register_session(pb::RegisterSessionRequest {
            session_id: "zoe".into(),
            refresh_token: new.refresh_token.clone(),
            replace: true,
            ..Default::default()
        })
        .await
        .expect("the replacement settles the old rotation first")
        .into_inner();
    assert!(replaced.created);
    t.get("zoe", None, true)
        .await
        .expect("the new login refreshes");
    let family = t.idp().family(&new.session_state).unwrap();
    assert_eq!(family.stale_presentations, 0, "{family:?}");
    assert_eq!(
        t.idp()
            .family(&old.session_state)
            .unwrap()
            .stale_presentations,
        0
    );
    t.stop().await;
}

#[tokio::test]
async fn a_failed_replacement_leaves_the_session_refreshing() {
    let store = Arc::new(FlakyStore::default());
    let mut t = TestBroker::new()
        .store(store.clone())
        .realm(|r| r.access_token_lifespan_secs = 2)
        .start()
        .await;
    t.register("ada", "ada").await;
    let mut stream = t.watch("ada").await;
    assert!(matches!(
        next_event(&mut stream, 5 * SECOND).await,
        Some(Event::Token(_))
    ));
    store.inserts_failing.store(true, SeqCst);
    let new = t.idp().login("ada");
    assert_error(
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: "ada".into(),
                refresh_token: new.refresh_token,
                replace: true,
                ..Default::default()
            })
            .await,
        Code::Unavailable,
        "STORE_UNAVAILABLE",
    );
    let Some(Event::Token(next)) = next_event(&mut stream, 5 * SECOND).await else {
        panic!("the watched session keeps refreshing ahead of expiry");
    };
    assert_eq!(next.generation, 2);
    t.stop().await;
}

/// A memory store whose writes of new generations wait while it is closed.
#[derive(Debug, Default)]
struct GatedStore {
    inner: MemoryStore,
    closed: AtomicBool,
    opened: tokio::sync::Notify,
    waiting: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl SessionStore for GatedStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.load_all().await
    }
    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        self.inner.insert(session, mode).await
    }
    async fn update(&self, session: &StoredSession, expected: u64) -> Result<(), StoreError> {
        self.waiting.fetch_add(1, SeqCst);
        loop {
            let opened = self.opened.notified();
            if !self.closed.load(SeqCst) {
                break;
            }
            opened.await;
        }
        self.waiting.fetch_sub(1, SeqCst);
        self.inner.update(session, expected).await
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.delete(id).await
    }
}

/// Found by the soak (examples/soak): the refresh slot was released when the
/// IdP answered, before the rotation was stored, so a slow store let
/// hundreds of received-but-unstored rotations pile up — each one a session
/// lost (max reuse 0) when the process died. The slot now covers the write:
/// at most `max_concurrent_refreshes` rotations are ever at risk.
#[tokio::test]
async fn rotations_waiting_for_the_store_keep_their_refresh_slots() {
    let store = Arc::new(GatedStore::default());
    let mut t = TestBroker::new()
        .store(store.clone())
        .config(|c| {
            c.providers
                .get_mut("apiax")
                .unwrap()
                .max_concurrent_refreshes = 2;
        })
        .start()
        .await;
    for i in 0..6 {
        let id = format!("slot-{i}");
        t.register_with_token(&id, &id, 600 * SECOND).await;
    }
    assert_eq!(t.idp().stats().token_requests, 0);
    store.closed.store(true, SeqCst);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..6 {
        let mut client = t.client.clone();
        calls.spawn(async move {
            client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: format!("slot-{i}"),
                    min_ttl: None,
                    force_refresh: true,
                })
                .await
        });
    }
    // Two refreshes get slots, are answered, and wait for the store...
    for _ in 0..200 {
        if store.waiting.load(SeqCst) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(store.waiting.load(SeqCst), 2);
    // ...holding their slots: nothing more is presented meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        t.idp().stats().token_requests,
        2,
        "a refresh started while two rotations were not stored yet"
    );
    assert_eq!(store.waiting.load(SeqCst), 2);
    store.closed.store(false, SeqCst);
    store.opened.notify_waiters();
    while let Some(call) = calls.join_next().await {
        call.unwrap()
            .expect("every forced refresh succeeds once the store writes");
    }
    let stats = t.idp().stats();
    assert_eq!(stats.refreshes_succeeded, 6);
    assert_eq!(stats.stale_presentations, 0);
    t.stop().await;
}

/// Found by the soak (examples/soak): the presentation once more after a
/// lost answer did not count against the rate budget, so while the IdP
/// dropped connections it saw twice the configured refreshes per second.
/// Now every request waits for the rate. (An upper bound on requests per
/// elapsed time: a slow machine can only make it pass more easily.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_do_not_double_the_rate_at_the_idp() {
    const RATE: u32 = 10;
    let mut t = TestBroker::new()
        .config(|c| {
            c.providers
                .get_mut("apiax")
                .unwrap()
                .max_refreshes_per_second = RATE;
        })
        .start()
        .await;
    for i in 0..12 {
        let id = format!("lost-{i}");
        t.register_with_token(&id, &id, 600 * SECOND).await;
    }
    // Every connection closes before the IdP processes anything: each
    // refresh is presented twice, and fails.
    t.idp()
        .push_fault(Fault::always(FaultAction::DropBeforeProcessing));
    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..12 {
        let mut client = t.client.clone();
        calls.spawn(async move {
            client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: format!("lost-{i}"),
                    min_ttl: None,
                    force_refresh: true,
                })
                .await
        });
    }
    while let Some(call) = calls.join_next().await {
        let status = call.unwrap().expect_err("the IdP answers nothing");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let requests = t.idp().stats().token_requests;
    assert_eq!(requests, 24, "each refresh presented twice");
    // The rate limiter admits one at once and RATE a second after that.
    let allowed = 1.0 + elapsed * f64::from(RATE) + 1.0;
    assert!(
        requests as f64 <= allowed,
        "{requests} IdP requests in {elapsed:.2} s at {RATE}/s"
    );
    t.idp().clear_faults();
    t.stop().await;
}

/// Found by the soak (examples/soak): a registration's `expires_in` counts
/// from the registration, which comes after the login that issued the
/// token, and it was trusted over the token's own `exp`: the broker served
/// tokens it believed valid for seconds more after they had expired. The
/// JWT's `exp` now caps it, as it caps a refresh's lifetime.
#[tokio::test]
async fn a_registered_access_token_never_outlives_its_exp_claim() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 30)
        .start()
        .await;
    let login = t.idp().login("late");
    let exp =
        tokenbroker::oidc::jwt_exp(&login.access_token).expect("the dev IdP's JWT has an exp");
    // The caller claims half an hour; the token itself expires in 30 s.
    t.client
        .register_session(pb::RegisterSessionRequest {
            session_id: "late".into(),
            refresh_token: login.refresh_token.clone(),
            access_token: login.access_token.clone(),
            expires_in: Some(duration(1800 * SECOND)),
            scope: login.scope.clone(),
            ..Default::default()
        })
        .await
        .expect("registration succeeds");
    let info = t.session("late").await.unwrap();
    let believed = std::time::SystemTime::try_from(info.access_expires_at.unwrap()).unwrap();
    assert!(
        believed <= exp,
        "{believed:?} is after the token's exp {exp:?}"
    );
    // A caller that needs a minute gets a fresh token, not the login's.
    let token = t.get("late", Some(60 * SECOND), false).await.unwrap();
    assert_ne!(token.access_token, login.access_token);
    assert_eq!(t.idp().stats().refreshes_succeeded, 1);
    t.stop().await;
}

/// Found by the soak (examples/soak): a listing page larger than
/// `max_message_bytes` (1,000 sessions are ~200 KB; the default limit is
/// 64 KiB) was refused by the server with OUT_OF_RANGE instead of sent. A
/// page now ends where the message would overflow, and its token continues.
#[tokio::test]
async fn listing_pages_fit_the_message_limit() {
    let mut t = TestBroker::new()
        .config(|c| {
            c.max_message_bytes = 4096;
            c.max_token_bytes = 2048;
        })
        .start()
        .await;
    let mut ids = Vec::new();
    for i in 0..50 {
        let id = format!("page/{i:03}");
        let login = t.idp().login(&id);
        t.client
            .register_session(pb::RegisterSessionRequest {
                session_id: id.clone(),
                refresh_token: login.refresh_token.clone(),
                access_token: login.access_token.clone(),
                labels: [("note".to_owned(), "x".repeat(100))].into(),
                ..Default::default()
            })
            .await
            .expect("registration succeeds");
        ids.push(id);
    }
    let mut listed = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = t
            .client
            .list_sessions(pb::ListSessionsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("a page that fits")
            .into_inner();
        assert!(!page.sessions.is_empty());
        listed.extend(page.sessions.into_iter().map(|s| s.session_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 50, "pages make progress");
        page_token = page.next_page_token;
    }
    assert!(pages > 1, "50 sessions of ~200 bytes do not fit 4 KiB");
    assert_eq!(listed, ids, "every session once, in id order");
    t.stop().await;
}

/// A memory store whose generation writes answer `Conflict` (another replica
/// wrote first) while `conflicting` is set.
#[derive(Debug, Default)]
struct RacedStore {
    inner: MemoryStore,
    conflicting: AtomicBool,
}

#[async_trait::async_trait]
impl SessionStore for RacedStore {
    async fn load_all(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.inner.load_all().await
    }
    async fn get(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.inner.get(id).await
    }
    async fn insert(&self, session: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        self.inner.insert(session, mode).await
    }
    async fn update(&self, session: &StoredSession, expected: u64) -> Result<(), StoreError> {
        if self.conflicting.load(SeqCst) {
            return Err(StoreError::Conflict);
        }
        self.inner.update(session, expected).await
    }
    async fn delete(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.inner.delete(id).await
    }
}

/// Found by the soak in HA mode (examples/soak): when a refresh's write lost
/// the race to another replica, GetAccessToken answered with the token it
/// had found too short — 42 ms left against a min_ttl of 2 s. It now answers
/// UNAVAILABLE (retry), and the retry gets the newer generation.
#[tokio::test]
async fn a_refresh_that_lost_the_race_does_not_serve_a_token_below_min_ttl() {
    let store = Arc::new(RacedStore::default());
    let mut t = TestBroker::new().store(store.clone()).start().await;
    let login = t.register_with_token("raced", "raced", 10 * SECOND).await;
    store.conflicting.store(true, SeqCst);
    let answer = t.get("raced", Some(60 * SECOND), false).await;
    let status = answer.expect_err("the 10-s token does not satisfy a 60-s min_ttl");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "STORE_UNAVAILABLE"
    );
    // Without min_ttl pressure the held token is still served.
    let token = t.get("raced", Some(SECOND), false).await.unwrap();
    assert_eq!(token.access_token, login.access_token);
    t.stop().await;
}
