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
    // Refresh tokens idle out after 12 s; keep-alives fall due 4.8-6 s in.
    let mut t = TestBroker::new()
        .realm(|r| r.sso_session_idle_secs = 12)
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
    tokio::time::sleep(Duration::from_millis(6300)).await;
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

    // 60 overdue at 20/s: a 6 s window, cut to half the ~5.7 s the refresh
    // tokens have left: about a third land in the first second.
    tokio::time::sleep(SECOND).await;
    let early = refreshed(&t);
    assert!(
        early < 40,
        "{early} of 60 refreshed in the first second: a stampede"
    );
    for _ in 0..60 {
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
