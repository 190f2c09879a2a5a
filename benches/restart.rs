//! Restart benchmark: how long the broker takes to load N stored sessions
//! from the embedded SQLite store and serve its first request.
//!
//! `cargo bench --bench restart` loads 1,000,000 sessions (or
//! `BENCH_SESSIONS`); as part of `cargo test --all-targets` it runs a
//! 1,000-session smoke version. It reports figures, never asserts timings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use tokenbroker::app;
use tokenbroker::config::Config;
use tokenbroker::oidc::RefreshExpiry;
use tokenbroker::pb;
use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokenbroker::secret::{AccessToken, RefreshToken};
use tokenbroker::session::{SessionId, SessionState};
use tokenbroker::store::seal::{KeyId, KeyRing};
use tokenbroker::store::{SqliteStore, StoredAccessToken, StoredSession};
use tokio::time::Instant;

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn session(i: usize, access: &str, refresh: &str, now: SystemTime) -> StoredSession {
    let refresh = RefreshToken::new(format!("{refresh}{i:08}"));
    StoredSession {
        id: SessionId::parse(&format!("tenant-{}/user-{i}", i % 100)).unwrap(),
        provider: "apiax".into(),
        labels: [("tier".to_string(), "standard".to_string())].into(),
        owner: None,
        registered_fingerprint: refresh.fingerprint(),
        refresh_token: refresh,
        access_token: Some(StoredAccessToken {
            token: AccessToken::new(format!("{access}{i:08}")),
            expires_at: now + Duration::from_secs(900 + (i % 900) as u64),
            issued_at: now,
            scope: "profile email".into(),
        }),
        refresh_expiry: RefreshExpiry::At(now + Duration::from_secs(1_209_600)),
        longest_refresh_lifetime_secs: Some(1_209_600),
        generation: 1,
        state: SessionState::Active,
        last_error: None,
        created_at: now,
        last_refresh_at: Some(now),
        reauth_due_at: None,
    }
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: usize = if full {
        std::env::var("BENCH_SESSIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000)
    } else {
        1_000
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyRing::generate(KeyId::new("bench").unwrap());
    let db = dir.path().join(tokenbroker::store::sqlite::DB_FILE);
    // Token sizes of a real Keycloak login: ~1.2 kB access JWT, ~0.6 kB refresh JWT.
    let access = "a".repeat(1_192);
    let refresh = "r".repeat(592);

    let store = SqliteStore::open(&db, keys.clone()).await.unwrap();
    let now = SystemTime::now();
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<StoredSession> = chunk
            .iter()
            .map(|&i| session(i, &access, &refresh, now))
            .collect();
        store.insert_many(&batch).await.unwrap();
    }
    let written = started.elapsed();
    store.close().await;
    let db_mib = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) as f64 / 1_048_576.0;

    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        keys: Some(keys.to_text().to_string()),
        ..Config::default()
    };
    config.auth.insecure_no_auth = true;
    let rss_before = rss_mib();
    let started = Instant::now();
    let running = app::start(&config).await.unwrap();
    let loaded = started.elapsed();
    let mut client = TokenBrokerClient::connect(format!("http://{}", running.addr))
        .await
        .unwrap();
    let token = client
        .get_access_token(pb::GetAccessTokenRequest {
            session_id: "tenant-7/user-7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    let first = started.elapsed();
    assert_eq!(token.generation, 1, "served from the store, not refreshed");
    let rss_after = rss_mib();
    running.shutdown().await.unwrap();

    println!(
        "restart benchmark: {n} sessions ({})",
        if full { "full" } else { "smoke" }
    );
    println!(
        "| sessions | database | write (setup) | load + start | first request served | RSS after load |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {n} | {db_mib:.0} MiB | {:.1} s | {:.2} s | {:.2} s | {:.0} MiB (+{:.0}) |",
        written.as_secs_f64(),
        loaded.as_secs_f64(),
        first.as_secs_f64(),
        rss_after,
        rss_after - rss_before
    );
}
