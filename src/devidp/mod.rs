//! A Keycloak-faithful development identity provider, with fault injection.
//!
//! It serves one realm with one client and answers the refresh grant the way Keycloak's
//! token endpoint does — same JSON, same errors, same rotation rules — so the broker's
//! rotation discipline can be tested against it and judged by its counters. It runs
//! in-process in tests (`DevIdp::start` on `127.0.0.1:0`), behind `tokenbroker serve --dev`
//! and as `tokenbroker dev-idp`. **Development only:** tokens are HS256 under a random key
//! made at start-up, state lives in memory, and the admin API has no authentication.
//!
//! # Endpoints
//!
//! All paths are also served under `/auth` (Keycloak before 17), e.g.
//! `/auth/realms/apiax/protocol/openid-connect/token`.
//!
//! | endpoint | answer |
//! |---|---|
//! | `POST /realms/{realm}/protocol/openid-connect/token` | refresh grant (form `grant_type=refresh_token`, `client_id`, `refresh_token`, `client_secret` or HTTP Basic for a confidential client) |
//! | `POST /realms/{realm}/protocol/openid-connect/logout` | form `client_id`, `refresh_token`: ends the session, 204 |
//! | `POST /realms/{realm}/protocol/openid-connect/revoke` | RFC 7009, form `token`, `client_id`: 200 for any token; a live refresh token ends its session |
//! | `GET /realms/{realm}/.well-known/openid-configuration` | discovery document (issuer and the endpoints above) |
//!
//! Success is `200` with `Cache-Control: no-store` and
//! `{"access_token", "expires_in", "refresh_expires_in", "refresh_token", "token_type": "Bearer",
//! "not-before-policy": 0, "session_state", "scope"}`. Errors are Keycloak's
//! `{"error", "error_description"}`:
//!
//! | condition | status | `error` | `error_description` |
//! |---|---|---|---|
//! | no `client_id` | 400 | `invalid_client` | `Missing client_id parameter` |
//! | unknown `client_id` | 401 | `invalid_client` | `Invalid client or Invalid client credentials` |
//! | wrong or missing secret (confidential client) | 401 | `unauthorized_client` | `Invalid client or Invalid client credentials` |
//! | no `grant_type` | 400 | `invalid_request` | `Missing form parameter: grant_type` |
//! | another grant type | 400 | `unsupported_grant_type` | `Unsupported grant_type` |
//! | no `refresh_token` | 400 | `invalid_request` | `Missing parameter: refresh_token` |
//! | bad signature, garbage, an access token | 400 | `invalid_grant` | `Invalid refresh token` |
//! | refresh token past its `exp` | 400 | `invalid_grant` | `Token is not active` |
//! | token of another client | 400 | `invalid_grant` | `Unmatching clients` |
//! | session logged out, revoked, ended, killed, idle or max expired | 400 | `invalid_grant` | `Session not active` |
//! | user disabled | 400 | `invalid_grant` | `User disabled` |
//! | replay of a rotated token (revoke on) | 400 | `invalid_grant` | `Stale token` |
//! | reuse over `refresh_token_max_reuse` | 400 | `invalid_grant` | `Maximum allowed refresh token reuse exceeded` |
//! | unknown realm | 404 | `Realm does not exist` | — |
//!
//! Checks run in Keycloak's order: realm, grant type, client, token signature, expiry,
//! client match, session, user, rotation.
//!
//! # Sessions and rotation
//!
//! A login (`DevIdp::login`, `POST /admin/login`) opens an SSO session — a token family —
//! whose id is the `session_state` (a UUID, also the `sid` claim). Access tokens are JWTs
//! with `exp`, `iat`, `jti`, `iss`, `sub`, `typ: "Bearer"`, `azp`, `sid`, `session_state`,
//! `scope`, `preferred_username` (and `pad` when padded). Refresh tokens are JWTs with
//! `typ: "Refresh"`, `sid`, `jti`, `iat`, `exp`, `azp` and `seq`, the token's position in its
//! family (0 for the login's).
//!
//! - `expires_in` = min(access token lifespan, time left to SSO Session Max).
//! - `refresh_expires_in` = min(SSO Session Idle, SSO Session Max − time since login),
//!   recomputed at every refresh: it shrinks toward the hard maximum. A session not refreshed
//!   within SSO Session Idle ends.
//! - Every refresh issues a new refresh token. With `revoke_refresh_token` (the default
//!   here): a token that is neither the newest of its family nor the one presented last is a
//!   replay: `Stale token`, and the whole family is ended (its newest token then gets
//!   `Session not active`). The token presented last may be presented again
//!   `refresh_token_max_reuse` more times, each time issuing new tokens; one more is
//!   `Maximum allowed refresh token reuse exceeded` and ends the family. This is Keycloak's
//!   `validateTokenReuse`, by sequence number rather than by issue second. (Keycloak itself
//!   detaches the client session and may answer `Client session not active` afterwards.)
//! - With `revoke_refresh_token` off (Keycloak's default), any unexpired token of a live
//!   session works.
//! - Disabling a user keeps their sessions but refuses their refreshes (`User disabled`).
//!
//! The clock is the wall clock plus an offset ([`DevIdp::set_time_offset`], like Keycloak's
//! test-suite `setTimeOffset`), so tests can expire tokens and sessions without sleeping.
//!
//! # Settings
//!
//! [`RealmSettings`], with Keycloak's names and defaults except `revoke_refresh_token`:
//! `realm` (`apiax`), `client_id` (`integration-api`), `client_secret` (none: public client),
//! `access_token_lifespan_secs` (1800), `sso_session_idle_secs` (14 days),
//! `sso_session_max_secs` (30 days), `revoke_refresh_token` (**true**),
//! `refresh_token_max_reuse` (0), `access_token_padding` (0 bytes; about 450 gives
//! ~1,200-byte access tokens), `scope` (`profile email`). They can be changed at run time;
//! the change applies to the next request.
//!
//! # Counters
//!
//! [`IdpStats`] (global) and [`FamilyStats`] (per session): token requests, logins,
//! refreshes succeeded, rejections by `error_description`, `stale_presentations` (a
//! refresh token presented after a newer one of its family was issued — replays and allowed
//! reuses alike, counted even when the request is then rejected for another reason),
//! `replays_rejected`, `reuses_allowed`, sessions killed, logouts, revocations, faults
//! injected, and concurrency: `in_flight` and `max_in_flight` per family (requests of one
//! session between arrival and answer; more than 1 means the client presented a session's
//! refresh tokens concurrently — a `Delay` fault widens the window to make this visible).
//!
//! # Fault injection
//!
//! A queue of [`Fault`]s, each applying its [`FaultAction`] to the next `times` token
//! requests (`None`: until cleared), in order. Logout, revocation and the admin API are
//! never faulted. Actions: `Status` (any status/body, optional `Retry-After`, not
//! processed), `Delay` (then processed — even if the client has given up), `Html` (a proxy's
//! error page), `Oversized` (a streamed 200 body of n bytes, not processed),
//! `DropBeforeProcessing` (the connection is closed without an answer),
//! `DropAfterProcessing` (processed — the token rotates and is counted — then the connection
//! is closed without an answer), `TruncatedAfterProcessing` (processed, then half of the JSON).
//! Dropped connections are closed before any byte of the answer is written, so an HTTP
//! client gets a transport error. (When the router is served by someone else's server
//! rather than [`DevIdp::start`], the drop falls back to a 200 whose body fails mid-stream.)
//!
//! # Admin API (JSON, unauthenticated: bind it to loopback)
//!
//! | endpoint | effect |
//! |---|---|
//! | `POST /admin/login` `{"username": "alice"}` | a login; answers its tokens like the 1FA/2FA login ([`LoginTokens`]) |
//! | `GET /admin/stats` | [`IdpStats`] |
//! | `GET /admin/sessions`, `GET /admin/sessions/{session_state}` | [`FamilyStats`] (404 if unknown) |
//! | `POST /admin/sessions/{session_state}/end` | ends the session: 204, or 404 if not active |
//! | `POST /admin/users/{username}/disable`, `…/enable` | 204 |
//! | `GET`/`PUT`/`POST`/`DELETE /admin/faults` | list / replace with a JSON list / append one / clear |
//! | `GET`/`PUT /admin/settings` | the settings (secret masked) / apply a partial object, answers the result |
//! | `GET`/`PUT /admin/time-offset` `{"offset_secs": 3600}` | shift the IdP's clock |
//!
//! Fault JSON: `{"action": {"type": "status", "status": 503, "body": "<html>…", "retry_after":
//! "5"}, "times": 1}`; other types: `delay` (`ms`), `drop_before_processing`,
//! `drop_after_processing`, `truncated_after_processing`, `html` (`status`), `oversized`
//! (`bytes`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use tokenbroker::devidp::{DevIdp, Fault, FaultAction, RealmSettings};
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let idp = DevIdp::start(RealmSettings::default(), "127.0.0.1:0".parse().unwrap(), shutdown).await?;
//! let login = idp.idp.login("alice");
//! idp.idp.push_fault(Fault::once(FaultAction::DropAfterProcessing));
//! // … point the broker at idp.token_url() with login.refresh_token …
//! assert_eq!(idp.idp.family(&login.session_state).unwrap().replays_rejected, 0);
//! idp.shutdown().await;
//! # Ok(()) }
//! ```

mod fault;
mod http;
mod realm;
pub mod remote;
mod settings;
mod stats;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use fault::{Fault, FaultAction};
pub use settings::RealmSettings;
pub use stats::{FamilyState, FamilyStats, IdpStats};

use fault::FaultQueue;
use realm::Realm;

/// How long `shutdown` waits for the server and its in-flight requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The tokens of a login, as the 1FA/2FA login answers them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginTokens {
    /// The access token (a JWT).
    pub access_token: String,
    /// The refresh token (a JWT), generation 0 of the new session.
    pub refresh_token: String,
    /// Access token lifetime, seconds.
    pub expires_in: u64,
    /// Refresh token lifetime, seconds.
    pub refresh_expires_in: u64,
    /// The session id.
    pub session_state: String,
    /// Granted scope.
    pub scope: String,
    /// `Bearer`.
    pub token_type: String,
}

impl std::fmt::Debug for LoginTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginTokens")
            .field("access_token", &"[redacted]")
            .field("refresh_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("refresh_expires_in", &self.refresh_expires_in)
            .field("session_state", &self.session_state)
            .field("scope", &self.scope)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// The dev IdP: a handle on its shared state (cheap to clone).
#[derive(Clone)]
pub struct DevIdp {
    inner: Arc<Inner>,
}

struct Inner {
    realm: Mutex<Realm>,
    faults: Mutex<FaultQueue>,
    /// Seconds added to the wall clock.
    time_offset: AtomicI64,
    /// Cancels pending `Delay` faults when the server shuts down.
    shutdown: CancellationToken,
    /// Token requests being processed; processing outlives a client that went away.
    tasks: TaskTracker,
    /// `traceparent` headers of the latest token requests (at most 64).
    traceparents: Mutex<std::collections::VecDeque<String>>,
}

impl std::fmt::Debug for DevIdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIdp")
            .field("settings", &self.settings())
            .field("time_offset", &self.time_offset())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex; a panic elsewhere while holding it leaves counters that are still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DevIdp {
    /// A dev IdP with `settings`, not serving yet: see [`DevIdp::router`] and [`DevIdp::start`].
    pub fn new(settings: RealmSettings) -> Self {
        Self::with_shutdown(settings, CancellationToken::new())
    }

    fn with_shutdown(settings: RealmSettings, shutdown: CancellationToken) -> Self {
        Self {
            inner: Arc::new(Inner {
                realm: Mutex::new(Realm::new(settings)),
                faults: Mutex::new(FaultQueue::default()),
                time_offset: AtomicI64::new(0),
                shutdown,
                tasks: TaskTracker::new(),
                traceparents: Mutex::default(),
            }),
        }
    }

    /// The HTTP routes (token, logout, revoke, discovery, admin), also under `/auth`.
    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Binds `addr`, spawns the server and returns once it accepts connections. The server
    /// stops when `shutdown` is cancelled or [`RunningDevIdp::shutdown`] is called; dropping
    /// the returned handle does not stop it.
    pub async fn start(
        settings: RealmSettings,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> std::io::Result<RunningDevIdp> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = shutdown.child_token();
        let idp = Self::with_shutdown(settings, stop.clone());
        let base_url = base_url(addr);
        idp.with_realm(|realm| realm.set_base_url(base_url));
        let app = idp
            .router()
            .into_make_service_with_connect_info::<http::ConnKill>();
        let tasks = idp.inner.tasks.clone();
        let signal = stop.clone();
        let task = tokio::spawn(
            async move {
                let served = axum::serve(http::KillableListener::new(listener), app)
                    .with_graceful_shutdown(signal.cancelled_owned())
                    .await;
                if let Err(err) = served {
                    tracing::warn!(error = %err, "dev idp: server failed");
                }
                tasks.close();
                if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("dev idp: token requests still running at shutdown");
                }
                tracing::debug!("dev idp: stopped");
            }
            .instrument(tracing::debug_span!("devidp", %addr)),
        );
        tracing::debug!(%addr, "dev idp: listening");
        Ok(RunningDevIdp {
            idp,
            addr,
            stop,
            task,
        })
    }

    fn with_realm<R>(&self, f: impl FnOnce(&mut Realm) -> R) -> R {
        f(&mut lock(&self.inner.realm))
    }

    /// The IdP's clock: Unix seconds, with the time offset.
    fn now(&self) -> u64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let wall = i64::try_from(wall).unwrap_or(i64::MAX);
        let now = wall.saturating_add(self.inner.time_offset.load(Ordering::Relaxed));
        u64::try_from(now).unwrap_or(0)
    }

    /// Logs `username` in (any name works; the user is created on first login): a new
    /// session and its first tokens. A disabled user gets tokens, but no refresh.
    pub fn login(&self, username: &str) -> LoginTokens {
        let now = self.now();
        let tokens = self.with_realm(|realm| realm.login(now, username));
        tracing::debug!(session_state = %tokens.session_state, "dev idp: login");
        tokens.into()
    }

    /// Appends a fault to the queue.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.inner.faults).push(fault);
    }

    /// Replaces the fault queue.
    pub fn set_faults(&self, faults: Vec<Fault>) {
        lock(&self.inner.faults).set(faults);
    }

    /// Empties the fault queue.
    pub fn clear_faults(&self) {
        lock(&self.inner.faults).clear();
    }

    /// The faults still queued (with their remaining `times`).
    pub fn faults(&self) -> Vec<Fault> {
        lock(&self.inner.faults).list()
    }

    /// The next token request's fault, counted.
    fn take_fault(&self) -> Option<FaultAction> {
        let action = lock(&self.inner.faults).take()?;
        self.with_realm(|realm| realm.count_fault(action.kind()));
        tracing::debug!(fault = action.kind(), "dev idp: injecting fault");
        Some(action)
    }

    /// Changes the settings; the next request sees the change.
    pub fn update_settings(&self, f: impl FnOnce(&mut RealmSettings)) {
        self.with_realm(|realm| f(&mut realm.settings));
    }

    /// The current settings.
    pub fn settings(&self) -> RealmSettings {
        self.with_realm(|realm| realm.settings.clone())
    }

    /// Shifts the IdP's clock by `secs` (may be negative) from the wall clock.
    pub fn set_time_offset(&self, secs: i64) {
        self.inner.time_offset.store(secs, Ordering::Relaxed);
    }

    /// The clock shift set by [`DevIdp::set_time_offset`].
    pub fn time_offset(&self) -> i64 {
        self.inner.time_offset.load(Ordering::Relaxed)
    }

    /// The `traceparent` headers of the latest token requests (at most 64),
    /// oldest first: tests check that trace context reaches the IdP.
    pub fn traceparents(&self) -> Vec<String> {
        lock(&self.inner.traceparents).iter().cloned().collect()
    }

    pub(crate) fn record_traceparent(&self, value: &str) {
        let mut seen = lock(&self.inner.traceparents);
        if seen.len() == 64 {
            seen.pop_front();
        }
        seen.push_back(value.to_owned());
    }

    /// Global counters.
    pub fn stats(&self) -> IdpStats {
        let now = self.now();
        self.with_realm(|realm| realm.stats(now))
    }

    /// Counters of one session, `None` if the IdP never issued it.
    pub fn family(&self, session_state: &str) -> Option<FamilyStats> {
        let now = self.now();
        self.with_realm(|realm| realm.family(now, session_state))
    }

    /// Counters of every session, oldest first.
    pub fn families(&self) -> Vec<FamilyStats> {
        let now = self.now();
        self.with_realm(|realm| realm.families(now))
    }

    /// Ends a session (admin "Sign out"). Returns whether it was active.
    pub fn end_session(&self, session_state: &str) -> bool {
        let now = self.now();
        self.with_realm(|realm| realm.end_session(now, session_state))
    }

    /// Disables a user: their refreshes fail with `User disabled`, sessions are kept.
    pub fn disable_user(&self, username: &str) {
        self.with_realm(|realm| realm.set_user_disabled(username, true));
    }

    /// Enables a user again.
    pub fn enable_user(&self, username: &str) {
        self.with_realm(|realm| realm.set_user_disabled(username, false));
    }
}

/// `http://ip:port` for a bound address; an unspecified IP becomes loopback.
fn base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A dev IdP serving HTTP.
#[derive(Debug)]
pub struct RunningDevIdp {
    /// The IdP's state, to log in, inject faults and read counters.
    pub idp: DevIdp,
    /// The bound address.
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningDevIdp {
    /// `http://127.0.0.1:port` (loopback when bound to an unspecified address).
    pub fn base_url(&self) -> String {
        base_url(self.addr)
    }

    fn endpoint(&self, name: &str) -> String {
        format!(
            "{}/realms/{}/protocol/openid-connect/{name}",
            self.base_url(),
            self.idp.settings().realm
        )
    }

    /// The realm's token endpoint.
    pub fn token_url(&self) -> String {
        self.endpoint("token")
    }

    /// The realm's logout endpoint.
    pub fn logout_url(&self) -> String {
        self.endpoint("logout")
    }

    /// The realm's RFC 7009 revocation endpoint.
    pub fn revoke_url(&self) -> String {
        self.endpoint("revoke")
    }

    /// Stops accepting, cancels pending delays, and waits (bounded) for the server to end.
    pub async fn shutdown(self) {
        let Self { stop, mut task, .. } = self;
        stop.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("dev idp: server did not stop in time, aborting it");
            task.abort();
        }
    }
}
