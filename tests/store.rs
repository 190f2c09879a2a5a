//! Durability: the embedded SQLite store across restarts, encryption at
//! rest, keys, and a failing store — with the real server and dev IdP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{TestBroker, assert_error};
use tokenbroker::pb;
use tonic::Code;

const SECOND: Duration = Duration::from_secs(1);

/// Every byte of the database files (main file and write-ahead log).
fn database_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for name in ["tokenbroker.db", "tokenbroker.db-wal"] {
        if let Ok(b) = std::fs::read(dir.join(name)) {
            bytes.extend(b);
        }
    }
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn sessions_survive_a_restart_and_valid_tokens_are_reused() {
    let mut t = TestBroker::new().start().await;
    t.register("alice", "alice").await;
    let bob = t
        .register_with_token("bob", "bob", Duration::from_secs(600))
        .await;
    let (carol, _) = t.register("carol", "carol").await;
    t.idp().end_session(&carol.session_state);
    assert_error(
        t.get("carol", None, true).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    let alice_token = t.get("alice", None, false).await.unwrap();
    let before = t.idp().stats().token_requests;

    t.restart().await;

    // Valid access tokens come back from the store: no refresh.
    let again = t.get("alice", None, false).await.unwrap();
    assert_eq!(again.access_token, alice_token.access_token);
    assert_eq!(again.generation, alice_token.generation);
    let bob_token = t.get("bob", None, false).await.unwrap();
    assert_eq!(bob_token.access_token, bob.access_token);
    assert_eq!(
        t.idp().stats().token_requests,
        before,
        "no IdP call after the restart"
    );
    // REAUTH_REQUIRED is kept for inspection.
    let info = t.session("carol").await.unwrap();
    assert_eq!(info.state, pb::SessionState::ReauthRequired as i32);
    assert!(
        info.last_error
            .unwrap()
            .description
            .contains("Session not active")
    );
    assert_error(
        t.get("carol", None, false).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    // The rotated refresh token was stored: refreshing goes on.
    let next = t.get("alice", None, true).await.unwrap();
    assert_eq!(next.generation, alice_token.generation + 1);
    // And idempotent registration still recognises the login.
    let repeat = t
        .client
        .register_session(pb::RegisterSessionRequest {
            session_id: "bob".into(),
            refresh_token: bob.refresh_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!repeat.created);
    let stats = t.idp().stats();
    assert_eq!(stats.stale_presentations, 0, "{stats:?}");
    t.stop().await;
}

#[tokio::test]
async fn overdue_refreshes_are_spread_after_a_restart() {
    // Refresh tokens idle out after 20 s; keep-alives fall due 8-10 s in
    // (wide margins: the suite shares two cores with everything else).
    let mut t = TestBroker::new()
        .realm(|r| r.sso_session_idle_secs = 20)
        .config(|c| {
            c.providers
                .get_mut("apiax")
                .unwrap()
                .max_refreshes_per_second = 20
        })
        .start()
        .await;
    let mut families = Vec::new();
    for i in 0..60 {
        let login = t
            .register_with_token(&format!("s{i}"), &format!("u{i}"), Duration::from_secs(600))
            .await;
        families.push(login.session_state);
    }
    // The broker is down while every keep-alive falls due.
    let config = t.config.clone();
    let placeholder = tokenbroker::app::start(&tokenbroker::config::Config {
        store: tokenbroker::config::StoreKind::Memory,
        ..config.clone()
    })
    .await
    .unwrap();
    let old = std::mem::replace(&mut t.broker, placeholder);
    old.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    let refreshed = |t: &common::Running| {
        families
            .iter()
            .map(|f| t.idp().family(f).unwrap().refreshes_succeeded)
            .filter(|n| *n > 0)
            .count()
    };
    assert_eq!(refreshed(&t), 0);
    let fresh = tokenbroker::app::start(&config).await.unwrap();
    let placeholder = std::mem::replace(&mut t.broker, fresh);
    placeholder.shutdown().await.unwrap();

    // 60 overdue at 20/s: a 6 s window, cut to half the ~9.5 s the refresh
    // tokens have left: about a fifth land in the first second.
    tokio::time::sleep(SECOND).await;
    let early = refreshed(&t);
    assert!(
        early < 40,
        "{early} of 60 refreshed in the first second: a stampede"
    );
    for _ in 0..90 {
        if refreshed(&t) == 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        refreshed(&t),
        60,
        "every overdue keep-alive ran before its token lapsed"
    );
    let stats = t.idp().stats();
    assert_eq!(stats.refreshes_rejected, 0, "{stats:?}");
    t.stop().await;
}

#[tokio::test]
async fn no_token_bytes_reach_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TestBroker::new().data_dir(dir.path()).start().await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        let login = t
            .register_with_token(&format!("p{i}"), &format!("p{i}"), Duration::from_secs(600))
            .await;
        tokens.push(login.access_token.clone());
        tokens.push(login.refresh_token.clone());
        tokens.push(
            t.get(&format!("p{i}"), None, true)
                .await
                .unwrap()
                .access_token,
        );
    }
    t.stop().await;
    let bytes = database_bytes(dir.path());
    assert!(bytes.len() > 4096, "the database was written");
    for token in &tokens {
        assert!(
            !contains(&bytes, token.as_bytes()),
            "a token is readable in the database"
        );
        // Not even a recognisable piece of one.
        assert!(!contains(&bytes, &token.as_bytes()[..24]));
    }
    assert!(!contains(&bytes, b"eyJ"), "no JWT in the database");
    // The key lives in its own 0600 file, not in the database.
    let key_file = dir.path().join("tokenbroker.keys");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let db_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("tokenbroker.db"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(db_mode & 0o777, 0o600, "only the broker reads the database");
    let key_text = std::fs::read_to_string(&key_file).unwrap();
    let key_b64 = key_text
        .lines()
        .find(|l| !l.starts_with('#'))
        .unwrap()
        .split(':')
        .nth(1)
        .unwrap();
    assert!(!contains(&bytes, key_b64.trim().as_bytes()));
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = TestBroker::new().data_dir(dir.path()).start().await;
    t.register("quinn", "quinn").await;
    let key_file = dir.path().join("tokenbroker.keys");
    let original = std::fs::read(&key_file).unwrap();

    // Missing: refuse to start rather than generate a new key over sealed data.
    std::fs::remove_file(&key_file).unwrap();
    let error = t.restart_with(|_| {}).await.expect_err("no key, no start");
    assert!(
        error.to_string().contains("no key is configured"),
        "{error}"
    );
    assert!(
        !key_file.exists(),
        "no new key was generated over sealed data"
    );

    // Wrong: another key under the same id, or another id.
    let other = tempfile::tempdir().unwrap();
    let wrong = tokenbroker::store::seal::KeyRing::create_file(&other.path().join("k")).unwrap();
    let error = t
        .restart_with(|c| c.keys = Some(wrong.to_text().to_string()))
        .await
        .expect_err("a wrong key, no start");
    assert!(error.to_string().contains("sealed with key"), "{error}");

    // The right key (inline this time) opens everything again.
    let text = String::from_utf8(original).unwrap();
    t.restart_with(|c| c.keys = Some(text))
        .await
        .expect("the right key starts");
    t.get("quinn", None, false).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn a_key_rotation_under_load_leaves_every_session_usable() {
    use tokenbroker::store::seal::{KeyId, KeyRing};
    let dir = tempfile::tempdir().unwrap();
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 2)
        .data_dir(dir.path())
        .start()
        .await;
    for i in 0..10 {
        t.register(&format!("r{i}"), &format!("r{i}")).await;
    }
    // Load: forced and plain gets on every session, while the key rotates.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let mut client = t.client.clone();
        let stop = stop.clone();
        load.spawn(async move {
            let mut served = 0;
            for round in 0u32.. {
                if stop.is_cancelled() || round > 5_000 {
                    break;
                }
                let answer = client
                    .get_access_token(pb::GetAccessTokenRequest {
                        session_id: format!("r{}", (round + worker) % 10),
                        min_ttl: None,
                        force_refresh: round % 3 == 0,
                    })
                    .await;
                assert!(
                    answer.is_ok(),
                    "every call succeeds during the rotation: {answer:?}"
                );
                served += 1;
            }
            served
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let key_file = dir.path().join("tokenbroker.keys");
    let next = KeyRing::generate(KeyId::new("next").unwrap());
    let rotated = KeyRing::load_file(&key_file)
        .unwrap()
        .with_primary(next.clone())
        .unwrap();
    rotated.replace_file(&key_file).unwrap();
    let resealed = t
        .broker
        .reload_keys()
        .await
        .expect("reloaded while serving");
    assert!(resealed > 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let mut served = 0;
    while let Some(result) = load.join_next().await {
        served += result.unwrap();
    }
    assert!(served > 20, "the load ran: {served} calls");
    let by_key = t
        .broker
        .sqlite
        .as_ref()
        .unwrap()
        .rows_by_key()
        .await
        .unwrap();
    assert_eq!(by_key, vec![("next".to_string(), 10)]);

    // Only the new key from now on: every session still opens and refreshes.
    let only_new = next.to_text().to_string();
    t.restart_with(|c| c.keys = Some(only_new))
        .await
        .expect("the new key alone opens the store");
    for i in 0..10 {
        t.get(&format!("r{i}"), None, true)
            .await
            .expect("usable after the rotation");
    }
    assert_eq!(t.idp().stats().stale_presentations, 0);
    t.stop().await;
}

#[tokio::test]
async fn a_failing_store_turns_health_to_not_serving_and_publishes_nothing() {
    use tokenbroker::store::SqliteStore;
    use tokenbroker::store::seal::{KeyId, KeyRing};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenbroker.db");
    let keys = KeyRing::generate(KeyId::new("k1").unwrap());
    // A tiny page budget stands in for a full disk.
    let store = SqliteStore::open_with_pragmas(&path, keys, &[("max_page_count", "14".into())])
        .await
        .unwrap();
    let mut t = TestBroker::new()
        .store(std::sync::Arc::new(store))
        .start()
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", t.broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    assert_eq!(status_of(&mut health).await, ServingStatus::Serving as i32);

    let mut failure = None;
    for i in 0..200 {
        let login = t.idp().login(&format!("f{i}"));
        let answer = t
            .client
            .register_session(pb::RegisterSessionRequest {
                session_id: format!("f{i}"),
                refresh_token: login.refresh_token,
                labels: [("pad".to_string(), "x".repeat(250))].into(),
                ..Default::default()
            })
            .await;
        if let Err(status) = answer {
            failure = Some((i, status));
            break;
        }
    }
    let (i, status) = failure.expect("the store fills up");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(common::reason(&status), "STORE_UNAVAILABLE");
    assert!(status.message().contains("full"), "{status:?}");
    // Nothing the store refused is visible.
    assert_error(
        t.session(&format!("f{i}")).await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    let mut reported = status_of(&mut health).await;
    for _ in 0..40 {
        if reported == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        reported = status_of(&mut health).await;
    }
    assert_eq!(
        reported,
        ServingStatus::NotServing as i32,
        "health reports the failing store"
    );
    // Sessions the store accepted keep being served from memory.
    t.get("f0", None, false).await.unwrap();
    t.stop().await;

    async fn status_of(h: &mut HealthClient<tonic::transport::Channel>) -> i32 {
        h.check(HealthCheckRequest {
            service: "tokenbroker.v1.TokenBroker".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    }
}
