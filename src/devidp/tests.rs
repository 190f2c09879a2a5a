//! The dev IdP over real HTTP (reqwest against the server on 127.0.0.1:0).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::*;

const STALE: &str = "Stale token";
const REUSE: &str = "Maximum allowed refresh token reuse exceeded";
const SESSION: &str = "Session not active";
const EXPIRED: &str = "Token is not active";
const INVALID: &str = "Invalid refresh token";

async fn start(settings: RealmSettings) -> RunningDevIdp {
    DevIdp::start(
        settings,
        "127.0.0.1:0".parse().unwrap(),
        CancellationToken::new(),
    )
    .await
    .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// An HTTP answer, read whole.
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        Self {
            status,
            headers,
            text,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The new refresh token of a 200, or panics with the error.
    fn rotated(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.text);
        self.json()["refresh_token"].as_str().unwrap().to_owned()
    }

    /// `error_description` of an `invalid_grant` 400, or `"ok"` for a 200.
    fn outcome(&self) -> String {
        if self.status == 200 {
            return "ok".to_owned();
        }
        assert_eq!(self.status, 400, "{}", self.text);
        let body = self.json();
        assert_eq!(body["error"], "invalid_grant", "{}", self.text);
        body["error_description"].as_str().unwrap().to_owned()
    }
}

async fn post_form(http: &reqwest::Client, url: &str, form: &[(&str, &str)]) -> Answer {
    Answer::read(http.post(url).form(form).send().await.unwrap()).await
}

async fn refresh(http: &reqwest::Client, idp: &RunningDevIdp, token: &str) -> Answer {
    Answer::read(refresh_request(http, idp, token).send().await.unwrap()).await
}

fn refresh_request(
    http: &reqwest::Client,
    idp: &RunningDevIdp,
    token: &str,
) -> reqwest::RequestBuilder {
    http.post(idp.token_url()).form(&[
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("refresh_token", token),
    ])
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn generation(idp: &RunningDevIdp, session: &str) -> u64 {
    idp.idp.family(session).unwrap().generation
}

#[tokio::test]
async fn refresh_rotates_and_answers_like_keycloak() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    assert_eq!(login.token_type, "Bearer");
    assert_eq!(login.expires_in, 1800);
    assert_eq!(login.refresh_expires_in, 1_209_600);

    let answer = refresh(&http, &idp, &login.refresh_token).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let body = answer.json();
    let mut keys: Vec<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "expires_in",
            "not-before-policy",
            "refresh_expires_in",
            "refresh_token",
            "scope",
            "session_state",
            "token_type"
        ]
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["not-before-policy"], 0);
    assert_eq!(body["session_state"], login.session_state.as_str());
    assert_eq!(body["scope"], "profile email");
    assert_eq!(body["expires_in"], 1800);
    let rei = body["refresh_expires_in"].as_u64().unwrap();
    assert!((1_209_598..=1_209_600).contains(&rei), "{rei}");
    let rotated = answer.rotated();
    assert_ne!(rotated, login.refresh_token);

    let access = claims(body["access_token"].as_str().unwrap());
    assert_eq!(access["typ"], "Bearer");
    assert_eq!(access["sid"], login.session_state.as_str());
    assert_eq!(access["azp"], "integration-api");
    assert_eq!(access["scope"], "profile email");
    assert_eq!(access["preferred_username"], "alice");
    assert_eq!(
        access["exp"].as_u64().unwrap() - access["iat"].as_u64().unwrap(),
        1800
    );
    assert!(access["jti"].is_string() && access["sub"].is_string());
    assert_eq!(
        access["iss"].as_str().unwrap(),
        idp.base_url() + "/realms/apiax"
    );
    let refresh_claims = claims(&rotated);
    assert_eq!(refresh_claims["typ"], "Refresh");
    assert_eq!(refresh_claims["seq"], 1);
    assert_eq!(refresh_claims["sid"], login.session_state.as_str());

    // The newest token works, also under the old `/auth` prefix.
    let old_style = idp.token_url().replace("/realms/", "/auth/realms/");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("refresh_token", rotated.as_str()),
    ];
    let again = post_form(&http, &old_style, &form).await;
    assert_eq!(again.outcome(), "ok");

    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.generation, 2);
    assert_eq!(fam.refreshes_succeeded, 2);
    assert_eq!(fam.stale_presentations, 0);
    assert_eq!(fam.state, FamilyState::Active);
    assert_eq!(fam.max_in_flight, 1);
    let stats = idp.idp.stats();
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.refreshes_succeeded, 2);
    assert_eq!(stats.logins, 1);
    assert_eq!(stats.active_sessions, 1);
    assert_eq!(stats.in_flight, 0);
    idp.shutdown().await;
}

#[tokio::test]
async fn refresh_expires_in_shrinks_to_the_hard_max() {
    let idp = start(RealmSettings {
        sso_session_idle_secs: 600,
        sso_session_max_secs: 1000,
        ..RealmSettings::default()
    })
    .await;
    let http = client();
    let login = idp.idp.login("alice");
    assert_eq!(login.refresh_expires_in, 600);
    assert_eq!(login.expires_in, 1000);

    idp.idp.set_time_offset(500);
    let r1 = refresh(&http, &idp, &login.refresh_token).await;
    let rei = r1.json()["refresh_expires_in"].as_u64().unwrap();
    assert!(
        (498..=500).contains(&rei),
        "min(idle 600, max left 500): {rei}"
    );

    idp.idp.set_time_offset(900);
    let r2 = refresh(&http, &idp, &r1.rotated()).await;
    let body = r2.json();
    let rei = body["refresh_expires_in"].as_u64().unwrap();
    assert!((98..=100).contains(&rei), "{rei}");
    // The access token is capped by the session's end too.
    assert_eq!(body["expires_in"].as_u64().unwrap(), rei);

    // Past the hard max: the newest token has expired with the session.
    idp.idp.set_time_offset(1100);
    assert_eq!(refresh(&http, &idp, &r2.rotated()).await.outcome(), EXPIRED);
    assert_eq!(
        idp.idp.family(&login.session_state).unwrap().state,
        FamilyState::MaxExpired
    );
    idp.shutdown().await;
}

#[tokio::test]
async fn replay_kills_the_family_when_revoke_is_on() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    let r1 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    let r2 = refresh(&http, &idp, &r1).await.rotated();

    // The login token is neither the newest (r2) nor the last used (r1).
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        STALE
    );
    // The whole family is gone: the newest token fails too.
    assert_eq!(refresh(&http, &idp, &r2).await.outcome(), SESSION);

    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.state, FamilyState::ReplayDetected);
    assert_eq!(fam.replays_rejected, 1);
    assert_eq!(fam.stale_presentations, 1);
    assert_eq!(fam.refreshes_succeeded, 2);
    assert_eq!(fam.rejected_by_reason.get(STALE), Some(&1));
    assert_eq!(fam.rejected_by_reason.get(SESSION), Some(&1));
    let stats = idp.idp.stats();
    assert_eq!(stats.replays_rejected, 1);
    assert_eq!(stats.sessions_killed, 1);
    assert_eq!(stats.refreshes_rejected, 2);
    assert_eq!(stats.active_sessions, 0);
    idp.shutdown().await;
}

#[tokio::test]
async fn reusing_the_last_token_without_budget_kills_the_family() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    let r1 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        REUSE
    );
    assert_eq!(refresh(&http, &idp, &r1).await.outcome(), SESSION);
    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.state, FamilyState::ReuseExceeded);
    assert_eq!(fam.stale_presentations, 1);
    assert_eq!(fam.reuses_allowed, 0);
    idp.shutdown().await;
}

#[tokio::test]
async fn max_reuse_one_allows_exactly_one_reuse() {
    let idp = start(RealmSettings {
        refresh_token_max_reuse: 1,
        ..RealmSettings::default()
    })
    .await;
    let http = client();

    // One reuse, then one too many.
    let login = idp.idp.login("alice");
    let _r1 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    let r1b = refresh(&http, &idp, &login.refresh_token).await.rotated();
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        REUSE
    );
    assert_eq!(refresh(&http, &idp, &r1b).await.outcome(), SESSION);
    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.reuses_allowed, 1);
    assert_eq!(fam.stale_presentations, 2);
    assert_eq!(fam.state, FamilyState::ReuseExceeded);

    // After a reuse, the newest token carries on, and the one it superseded is a replay.
    let login = idp.idp.login("bob");
    let a1 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    let a2 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    let a3 = refresh(&http, &idp, &a2).await.rotated();
    assert_eq!(refresh(&http, &idp, &a1).await.outcome(), STALE);
    assert_eq!(refresh(&http, &idp, &a3).await.outcome(), SESSION);

    let stats = idp.idp.stats();
    assert_eq!(stats.reuses_allowed, 2);
    assert_eq!(stats.replays_rejected, 1);
    assert_eq!(stats.sessions_killed, 2);
    idp.shutdown().await;
}

#[tokio::test]
async fn old_tokens_work_when_revoke_is_off() {
    let idp = start(RealmSettings {
        revoke_refresh_token: false,
        ..RealmSettings::default()
    })
    .await;
    let http = client();
    let login = idp.idp.login("alice");
    let r1 = refresh(&http, &idp, &login.refresh_token).await.rotated();
    let _r2 = refresh(&http, &idp, &r1).await.rotated();
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );
    assert_eq!(refresh(&http, &idp, &r1).await.outcome(), "ok");
    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.state, FamilyState::Active);
    assert_eq!(fam.stale_presentations, 3);
    assert_eq!(fam.replays_rejected, 0);
    assert_eq!(fam.reuses_allowed, 0);
    idp.shutdown().await;
}

#[tokio::test]
async fn expired_tokens_and_sessions() {
    // Real time, short lifespans: the access token's lifetime and an idle-expired session.
    let idp = start(RealmSettings {
        access_token_lifespan_secs: 1,
        sso_session_idle_secs: 1,
        ..RealmSettings::default()
    })
    .await;
    let http = client();
    let login = idp.idp.login("alice");
    assert_eq!(login.expires_in, 1);
    assert_eq!(login.refresh_expires_in, 1);
    let access = claims(&login.access_token);
    assert_eq!(
        access["exp"].as_u64().unwrap() - access["iat"].as_u64().unwrap(),
        1
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        EXPIRED
    );
    assert_eq!(
        idp.idp.family(&login.session_state).unwrap().state,
        FamilyState::IdleExpired
    );

    // The clock offset instead of waiting: 15 days on, a 14-day refresh token is dead.
    idp.idp.update_settings(|s| *s = RealmSettings::default());
    let login = idp.idp.login("bob");
    idp.idp.set_time_offset(15 * 24 * 3600);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        EXPIRED
    );
    idp.idp.set_time_offset(0);

    // A session past SSO Session Max (shortened after login) with an unexpired token.
    let login = idp.idp.login("carol");
    idp.idp.update_settings(|s| s.sso_session_max_secs = 0);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        SESSION
    );
    assert_eq!(
        idp.idp.family(&login.session_state).unwrap().state,
        FamilyState::MaxExpired
    );
    let stats = idp.idp.stats();
    assert_eq!(stats.rejected_by_reason.get(EXPIRED), Some(&2));
    assert_eq!(stats.rejected_by_reason.get(SESSION), Some(&1));
    idp.shutdown().await;
}

#[tokio::test]
async fn client_authentication_and_request_errors() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    let url = idp.token_url();
    let rt = login.refresh_token.as_str();

    let unknown = post_form(
        &http,
        &url,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "nope"),
            ("refresh_token", rt),
        ],
    )
    .await;
    assert_eq!(unknown.status, 401);
    assert_eq!(
        unknown.json(),
        json!({"error": "invalid_client", "error_description": "Invalid client or Invalid client credentials"})
    );

    let no_client = post_form(
        &http,
        &url,
        &[("grant_type", "refresh_token"), ("refresh_token", rt)],
    )
    .await;
    assert_eq!(no_client.status, 400);
    assert_eq!(no_client.json()["error"], "invalid_client");

    let missing = post_form(
        &http,
        &url,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "integration-api"),
        ],
    )
    .await;
    assert_eq!(missing.status, 400);
    assert_eq!(
        missing.json(),
        json!({"error": "invalid_request", "error_description": "Missing parameter: refresh_token"})
    );

    let password = post_form(
        &http,
        &url,
        &[("grant_type", "password"), ("client_id", "integration-api")],
    )
    .await;
    assert_eq!(password.status, 400);
    assert_eq!(password.json()["error"], "unsupported_grant_type");

    let other_realm = url.replace("/realms/apiax/", "/realms/other/");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("refresh_token", rt),
    ];
    let nowhere = post_form(&http, &other_realm, &form).await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.json()["error"], "Realm does not exist");

    // None of these touched the session.
    assert_eq!(generation(&idp, &login.session_state), 0);

    // A confidential client: the secret by form or HTTP Basic, and nothing else.
    idp.idp
        .update_settings(|s| s.client_secret = Some("s3cr3t".to_owned()));
    let no_secret = refresh(&http, &idp, rt).await;
    assert_eq!(no_secret.status, 401);
    assert_eq!(no_secret.json()["error"], "unauthorized_client");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("client_secret", "wrong"),
        ("refresh_token", rt),
    ];
    let wrong = post_form(&http, &url, &form).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.json()["error"], "unauthorized_client");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("client_secret", "s3cr3t"),
        ("refresh_token", rt),
    ];
    let by_form = post_form(&http, &url, &form).await.rotated();
    let basic = http
        .post(&url)
        .basic_auth("integration-api", Some("s3cr3t"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", by_form.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(Answer::read(basic).await.outcome(), "ok");

    let stats = idp.idp.stats();
    assert_eq!(
        stats
            .rejected_by_reason
            .get("Invalid client or Invalid client credentials"),
        Some(&3)
    );
    idp.shutdown().await;
}

#[tokio::test]
async fn garbage_and_foreign_tokens_are_invalid() {
    let idp = start(RealmSettings::default()).await;
    let other = DevIdp::new(RealmSettings::default());
    let http = client();
    let login = idp.idp.login("alice");

    assert_eq!(refresh(&http, &idp, "not-a-jwt").await.outcome(), INVALID);
    // Signed by another IdP (another random key).
    let foreign = other.login("alice");
    assert_eq!(
        refresh(&http, &idp, &foreign.refresh_token).await.outcome(),
        INVALID
    );
    // An access token is not a refresh token.
    assert_eq!(
        refresh(&http, &idp, &login.access_token).await.outcome(),
        INVALID
    );
    // A tampered payload breaks the signature.
    let mut parts: Vec<String> = login.refresh_token.split('.').map(str::to_owned).collect();
    let mut payload = claims(&login.refresh_token);
    payload["seq"] = json!(7);
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload.to_string());
    assert_eq!(
        refresh(&http, &idp, &parts.join(".")).await.outcome(),
        INVALID
    );

    assert_eq!(generation(&idp, &login.session_state), 0);
    assert_eq!(idp.idp.stats().rejected_by_reason.get(INVALID), Some(&4));
    idp.shutdown().await;
}

#[tokio::test]
async fn logout_revocation_admin_end_and_disabled_user() {
    let idp = start(RealmSettings::default()).await;
    let http = client();

    // Logout ends the session.
    let login = idp.idp.login("alice");
    let form = [
        ("client_id", "integration-api"),
        ("refresh_token", login.refresh_token.as_str()),
    ];
    let out = post_form(&http, &idp.logout_url(), &form).await;
    assert_eq!(out.status, 204);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        SESSION
    );
    assert_eq!(
        idp.idp.family(&login.session_state).unwrap().state,
        FamilyState::LoggedOut
    );
    // Again, for a session already gone: still 204, as Keycloak.
    assert_eq!(post_form(&http, &idp.logout_url(), &form).await.status, 204);
    let garbage = post_form(
        &http,
        &idp.logout_url(),
        &[("client_id", "integration-api"), ("refresh_token", "junk")],
    )
    .await;
    assert_eq!(garbage.outcome(), INVALID);

    // Revocation: 200 for anything, and a live refresh token's session ends.
    let login = idp.idp.login("bob");
    let junk = post_form(
        &http,
        &idp.revoke_url(),
        &[("client_id", "integration-api"), ("token", "junk")],
    )
    .await;
    assert_eq!(junk.status, 200);
    let form = [
        ("client_id", "integration-api"),
        ("token", login.refresh_token.as_str()),
    ];
    assert_eq!(post_form(&http, &idp.revoke_url(), &form).await.status, 200);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        SESSION
    );
    assert_eq!(
        idp.idp.family(&login.session_state).unwrap().state,
        FamilyState::Revoked
    );

    // Admin "sign out".
    let login = idp.idp.login("carol");
    let end = http
        .post(format!(
            "{}/admin/sessions/{}/end",
            idp.base_url(),
            login.session_state
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(end.status().as_u16(), 204);
    assert!(!idp.idp.end_session(&login.session_state));
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        SESSION
    );

    // A disabled user keeps the session but cannot refresh.
    let login = idp.idp.login("dave");
    idp.idp.disable_user("dave");
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "User disabled"
    );
    idp.idp.enable_user("dave");
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );

    let stats = idp.idp.stats();
    assert_eq!(stats.logouts, 2);
    assert_eq!(stats.revocations, 2);
    assert_eq!(stats.active_sessions, 1);
    idp.shutdown().await;
}

#[tokio::test]
async fn status_html_and_oversized_faults_are_not_processed() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    idp.idp.set_faults(vec![
        Fault::once(FaultAction::Status {
            status: 503,
            body: "<html><body>down for maintenance</body></html>".to_owned(),
            retry_after: Some("7".to_owned()),
        }),
        Fault::once(FaultAction::Status {
            status: 429,
            body: r#"{"error":"too_many_requests"}"#.to_owned(),
            retry_after: Some("Wed, 21 Oct 2026 07:28:00 GMT".to_owned()),
        }),
        Fault::once(FaultAction::Html { status: 502 }),
        Fault::once(FaultAction::Oversized {
            bytes: 3 * 1024 * 1024 + 5,
        }),
    ]);

    let a = refresh(&http, &idp, &login.refresh_token).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.header("retry-after"), Some("7"));
    assert!(a.header("content-type").unwrap().starts_with("text/html"));
    assert!(a.text.contains("maintenance"));

    let b = refresh(&http, &idp, &login.refresh_token).await;
    assert_eq!(b.status, 429);
    assert_eq!(
        b.header("retry-after"),
        Some("Wed, 21 Oct 2026 07:28:00 GMT")
    );
    assert_eq!(b.header("content-type"), Some("application/json"));

    let c = refresh(&http, &idp, &login.refresh_token).await;
    assert_eq!(c.status, 502);
    assert!(c.header("content-type").unwrap().starts_with("text/html"));
    assert!(c.text.contains("502 Bad Gateway"));

    let d = refresh_request(&http, &idp, &login.refresh_token)
        .send()
        .await
        .unwrap();
    assert_eq!(d.status().as_u16(), 200);
    assert!(d.content_length().is_none(), "streamed, no Content-Length");
    let body = d.bytes().await.unwrap();
    assert_eq!(body.len(), 3 * 1024 * 1024 + 5);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());

    // Nothing was processed: the login token is still the only one, and it works.
    assert_eq!(generation(&idp, &login.session_state), 0);
    assert!(idp.idp.faults().is_empty());
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );
    let stats = idp.idp.stats();
    assert_eq!(stats.faults_injected, 4);
    assert_eq!(stats.faults_by_kind.get("status"), Some(&2));
    assert_eq!(stats.token_requests, 5);
    assert_eq!(stats.refreshes_succeeded, 1);
    idp.shutdown().await;
}

#[tokio::test]
async fn drop_before_processing_fails_the_client_and_keeps_the_token() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    // Warm the pool so the drop also hits a reused keep-alive connection.
    idp.idp
        .push_fault(Fault::once(FaultAction::Html { status: 500 }));
    assert_eq!(refresh(&http, &idp, &login.refresh_token).await.status, 500);

    idp.idp
        .push_fault(Fault::times(FaultAction::DropBeforeProcessing, 2));
    for _ in 0..2 {
        let err = refresh_request(&http, &idp, &login.refresh_token)
            .send()
            .await
            .expect_err("the connection is closed without an answer");
        assert!(!err.is_timeout(), "{err:?}");
    }
    assert_eq!(generation(&idp, &login.session_state), 0);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );
    idp.shutdown().await;
}

#[tokio::test]
async fn drop_after_processing_rotates_while_the_client_fails() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    idp.idp
        .push_fault(Fault::once(FaultAction::DropAfterProcessing));
    let err = refresh_request(&http, &idp, &login.refresh_token)
        .send()
        .await
        .expect_err("the answer is never sent");
    assert!(!err.is_timeout(), "{err:?}");
    // The IdP rotated: the client's token is now the "current" one, and it has no budget.
    assert_eq!(generation(&idp, &login.session_state), 1);
    assert_eq!(idp.idp.stats().refreshes_succeeded, 1);
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        REUSE
    );

    // With Refresh Token Max Reuse 1 the same retry keeps the session (DESIGN §3).
    idp.idp.update_settings(|s| s.refresh_token_max_reuse = 1);
    let login = idp.idp.login("bob");
    idp.idp
        .push_fault(Fault::once(FaultAction::DropAfterProcessing));
    assert!(
        refresh_request(&http, &idp, &login.refresh_token)
            .send()
            .await
            .is_err()
    );
    let retried = refresh(&http, &idp, &login.refresh_token).await.rotated();
    assert_eq!(refresh(&http, &idp, &retried).await.outcome(), "ok");
    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.reuses_allowed, 1);
    assert_eq!(fam.generation, 3);
    assert_eq!(
        idp.idp.stats().faults_by_kind.get("drop_after_processing"),
        Some(&2)
    );
    idp.shutdown().await;
}

#[tokio::test]
async fn drops_still_fail_the_client_when_someone_else_serves_the_router() {
    // No `DevIdp::start`, so no connection kill switch: the fallback body fails mid-stream.
    let idp = DevIdp::new(RealmSettings::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/realms/apiax/protocol/openid-connect/token",
        listener.local_addr().unwrap()
    );
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, idp.router())
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    let http = client();
    let login = idp.login("alice");
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("refresh_token", login.refresh_token.as_str()),
    ];
    idp.set_faults(vec![
        Fault::once(FaultAction::DropAfterProcessing),
        Fault::once(FaultAction::DropBeforeProcessing),
    ]);
    for expected_generation in [1, 1] {
        let outcome = match http.post(&url).form(&form).send().await {
            Ok(response) => response.text().await.map(drop),
            Err(err) => Err(err),
        };
        assert!(outcome.is_err(), "the client must not get an answer");
        assert_eq!(
            idp.family(&login.session_state).unwrap().generation,
            expected_generation
        );
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn truncated_after_processing_rotates_and_answers_half_a_body() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    idp.idp
        .push_fault(Fault::once(FaultAction::TruncatedAfterProcessing));
    let answer = refresh(&http, &idp, &login.refresh_token).await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.text.starts_with("{\"access_token\":\""),
        "{}",
        answer.text
    );
    assert!(serde_json::from_str::<Value>(&answer.text).is_err());
    assert_eq!(generation(&idp, &login.session_state), 1);
    idp.shutdown().await;
}

#[tokio::test]
async fn delay_outlives_a_client_timeout_and_shows_concurrency() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    idp.idp
        .push_fault(Fault::once(FaultAction::Delay { ms: 700 }));
    let err = refresh_request(&http, &idp, &login.refresh_token)
        .timeout(Duration::from_millis(150))
        .send()
        .await
        .expect_err("the client gives up first");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(generation(&idp, &login.session_state), 0, "still waiting");
    // The IdP carries on and rotates although nobody listens any more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while generation(&idp, &login.session_state) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delayed refresh never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(idp.idp.stats().refreshes_succeeded, 1);
    assert_eq!(idp.idp.stats().in_flight, 0);

    // Two presentations of one session at once: the counter sees both in flight.
    let login = idp.idp.login("bob");
    idp.idp
        .push_fault(Fault::times(FaultAction::Delay { ms: 300 }, 2));
    let (a, b) = tokio::join!(
        refresh(&http, &idp, &login.refresh_token),
        refresh(&http, &idp, &login.refresh_token)
    );
    let mut outcomes = [a.outcome(), b.outcome()];
    outcomes.sort();
    assert_eq!(outcomes, [REUSE.to_owned(), "ok".to_owned()]);
    let fam = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(fam.max_in_flight, 2);
    assert_eq!(fam.in_flight, 0);
    assert_eq!(idp.idp.stats().max_in_flight_per_family, 2);
    idp.shutdown().await;
}

#[tokio::test]
async fn unbounded_fault_applies_until_cleared() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    idp.idp.push_fault(Fault::always(FaultAction::Status {
        status: 500,
        body: String::new(),
        retry_after: None,
    }));
    for _ in 0..3 {
        assert_eq!(refresh(&http, &idp, &login.refresh_token).await.status, 500);
    }
    idp.idp.clear_faults();
    assert_eq!(
        refresh(&http, &idp, &login.refresh_token).await.outcome(),
        "ok"
    );
    idp.shutdown().await;
}

#[tokio::test]
async fn admin_api_round_trip() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let admin = |path: &str| format!("{}/admin/{path}", idp.base_url());

    let login = http
        .post(admin("login"))
        .header("content-type", "application/json")
        .body(json!({"username": "alice"}).to_string())
        .send()
        .await
        .unwrap();
    let login = Answer::read(login).await;
    assert_eq!(login.status, 200, "{}", login.text);
    let tokens: LoginTokens = serde_json::from_str(&login.text).unwrap();
    assert_eq!(tokens.token_type, "Bearer");
    assert_eq!(tokens.expires_in, 1800);
    let r1 = refresh(&http, &idp, &tokens.refresh_token).await.rotated();

    let faults =
        json!([{"action": {"type": "status", "status": 503, "retry_after": "2"}, "times": 1}]);
    let put = http
        .put(admin("faults"))
        .header("content-type", "application/json")
        .body(faults.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 204);
    let listed = Answer::read(http.get(admin("faults")).send().await.unwrap()).await;
    assert_eq!(listed.json()[0]["action"]["type"], "status");
    let faulted = refresh(&http, &idp, &r1).await;
    assert_eq!(faulted.status, 503);
    assert_eq!(faulted.header("retry-after"), Some("2"));
    let push = http
        .post(admin("faults"))
        .header("content-type", "application/json")
        .body(json!({"action": {"type": "drop_before_processing"}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(push.status().as_u16(), 204);
    assert_eq!(idp.idp.faults().len(), 1);
    let cleared = http.delete(admin("faults")).send().await.unwrap();
    assert_eq!(cleared.status().as_u16(), 204);
    assert!(idp.idp.faults().is_empty());
    let bad = http
        .put(admin("faults"))
        .header("content-type", "application/json")
        .body(r#"[{"action":{"type":"explode"}}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);

    let settings = http
        .put(admin("settings"))
        .header("content-type", "application/json")
        .body(json!({"refresh_token_max_reuse": 3, "client_secret": "abc"}).to_string())
        .send()
        .await
        .unwrap();
    let settings = Answer::read(settings).await;
    assert_eq!(settings.status, 200, "{}", settings.text);
    assert_eq!(settings.json()["refresh_token_max_reuse"], 3);
    assert_ne!(settings.json()["client_secret"], "abc");
    assert_eq!(idp.idp.settings().refresh_token_max_reuse, 3);
    assert_eq!(idp.idp.settings().client_secret.as_deref(), Some("abc"));
    let unknown = http
        .put(admin("settings"))
        .header("content-type", "application/json")
        .body(json!({"revoke_refresh_tokens": false}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 400);

    let offset = http
        .put(admin("time-offset"))
        .header("content-type", "application/json")
        .body(json!({"offset_secs": 60}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(offset.status().as_u16(), 204);
    assert_eq!(idp.idp.time_offset(), 60);

    let disable = http
        .post(admin("users/alice/disable"))
        .send()
        .await
        .unwrap();
    assert_eq!(disable.status().as_u16(), 204);
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("client_secret", "abc"),
        ("refresh_token", r1.as_str()),
    ];
    assert_eq!(
        post_form(&http, &idp.token_url(), &form).await.outcome(),
        "User disabled"
    );

    let stats = Answer::read(http.get(admin("stats")).send().await.unwrap()).await;
    let stats: IdpStats = serde_json::from_str(&stats.text).unwrap();
    assert_eq!(stats.logins, 1);
    assert_eq!(stats.refreshes_succeeded, 1);
    assert_eq!(stats.faults_injected, 1);
    assert_eq!(stats.token_requests, 3);
    assert_eq!(stats.rejected_by_reason.get("User disabled"), Some(&1));
    assert_eq!(stats, idp.idp.stats());

    let family = Answer::read(
        http.get(admin(&format!("sessions/{}", tokens.session_state)))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let family: FamilyStats = serde_json::from_str(&family.text).unwrap();
    assert_eq!(family.username, "alice");
    assert_eq!(family.generation, 1);
    let all = Answer::read(http.get(admin("sessions")).send().await.unwrap()).await;
    assert_eq!(all.json().as_array().unwrap().len(), 1);
    let missing = http.get(admin("sessions/nope")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let missing = http.post(admin("sessions/nope/end")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    idp.shutdown().await;
}

#[tokio::test]
async fn discovery_and_padding() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    for prefix in ["", "/auth"] {
        let url = format!(
            "{}{prefix}/realms/apiax/.well-known/openid-configuration",
            idp.base_url()
        );
        let doc = Answer::read(http.get(url).send().await.unwrap())
            .await
            .json();
        let token_endpoint = doc["token_endpoint"].as_str().unwrap().to_owned();
        assert_eq!(
            token_endpoint,
            idp.token_url()
                .replace("/realms/", &format!("{prefix}/realms/"))
        );
    }

    let plain = idp.idp.login("alice").access_token.len();
    idp.idp.update_settings(|s| s.access_token_padding = 600);
    let padded = idp.idp.login("alice").access_token.len();
    let growth = padded - plain;
    assert!((805..=816).contains(&growth), "{plain} -> {padded}");
    idp.shutdown().await;
}

#[tokio::test]
async fn shutdown_is_prompt_even_with_a_delayed_request() {
    let idp = start(RealmSettings::default()).await;
    let http = client();
    let login = idp.idp.login("alice");
    let url = idp.token_url();
    idp.idp
        .push_fault(Fault::once(FaultAction::Delay { ms: 60_000 }));
    let pending = tokio::spawn(refresh_request(&http, &idp, &login.refresh_token).send());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session = login.session_state.clone();
    let handle = idp.idp.clone();
    tokio::time::timeout(Duration::from_secs(3), idp.shutdown())
        .await
        .expect("shutdown within the grace period");
    assert!(pending.await.unwrap().is_err());
    assert_eq!(handle.family(&session).unwrap().generation, 0);
    let form = [("grant_type", "refresh_token")];
    assert!(http.post(url).form(&form).send().await.is_err());
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

// Current-thread runtime: the server's tasks run on this thread, under this subscriber.
#[tokio::test(flavor = "current_thread")]
async fn logs_never_contain_tokens() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let idp = start(RealmSettings {
        client_secret: Some("client-secret-value".to_owned()),
        ..RealmSettings::default()
    })
    .await;
    let http = client();
    let login = idp.idp.login("alice");
    let mut seen = vec![login.access_token.clone(), login.refresh_token.clone()];
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", "integration-api"),
        ("client_secret", "client-secret-value"),
        ("refresh_token", login.refresh_token.as_str()),
    ];
    let answer = post_form(&http, &idp.token_url(), &form).await;
    let body = answer.json();
    seen.push(body["access_token"].as_str().unwrap().to_owned());
    seen.push(body["refresh_token"].as_str().unwrap().to_owned());
    // A rejection and a fault.
    assert_eq!(
        post_form(&http, &idp.token_url(), &form).await.outcome(),
        REUSE
    );
    idp.idp
        .push_fault(Fault::once(FaultAction::DropAfterProcessing));
    let _dropped = http.post(idp.token_url()).form(&form).send().await;
    idp.idp.update_settings(|_| {});
    tracing::debug!(settings = ?idp.idp.settings(), idp = ?idp.idp, tokens = ?login, "dump");
    idp.shutdown().await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("refresh granted"), "{logs}");
    assert!(logs.contains("refresh rejected"), "{logs}");
    assert!(!logs.contains("client-secret-value"));
    for token in &seen {
        for part in token.split('.') {
            assert!(!logs.contains(part), "a token part leaked into the logs");
        }
    }
}
