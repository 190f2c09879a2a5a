//! The use cases: register, get, watch, inspect, list, delete. Transport
//! neutral: the gRPC adapter converts requests into these calls and maps
//! [`BrokerError`] to statuses.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::error::BrokerError;
use crate::oidc::{self, RefreshExpiry, RejectedTarget};
use crate::refresh::{self, Priority, Providers, Refresher, Trigger};
use crate::secret::{AccessToken, RefreshToken};
use crate::session::{
    EndReason, IssuedToken, LabelSet, Labels, Published, Registry, Session, SessionError,
    SessionId, SessionInner, SessionState, intern,
};
use crate::store::{Change, InsertMode, SessionStore, StoreError, StoredSession};
use crate::telemetry::TraceContext;

/// Broker-wide settings of the use cases.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `min_ttl` when a caller sets none.
    pub default_min_ttl: Duration,
    /// Largest accepted refresh or access token, in bytes.
    pub max_token_bytes: usize,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            default_min_ttl: Duration::from_secs(60),
            max_token_bytes: 16 * 1024,
        }
    }
}

/// An access token handed over at registration, from the same login.
#[derive(Debug)]
pub struct InitialToken {
    /// The token.
    pub access_token: AccessToken,
    /// Its remaining life; `None`: the JWT `exp`, else the provider default.
    pub expires_in: Option<Duration>,
    /// Granted scope.
    pub scope: String,
}

/// A validated registration.
#[derive(Debug)]
pub struct Registration {
    /// `None`: the broker makes an id.
    pub session_id: Option<SessionId>,
    /// The login's refresh token.
    pub refresh_token: RefreshToken,
    /// Provider name; empty for the default.
    pub provider: String,
    /// Optional access token of the same login.
    pub initial: Option<InitialToken>,
    /// Remaining life of the refresh token; zero: none (offline).
    pub refresh_expires_in: Option<Duration>,
    /// Caller labels.
    pub labels: Labels,
    /// Replace a session with the same id and another refresh token.
    pub replace: bool,
    /// The authenticated caller registering it (its owner), if any.
    pub owner: Option<Arc<str>>,
    /// The caller's trace context, sent on the registration's refresh.
    pub trace: Option<TraceContext>,
}

/// Session metadata (never a token).
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Id.
    pub id: SessionId,
    /// Provider name.
    pub provider: String,
    /// Lifecycle state.
    pub state: SessionState,
    /// Expiry of the current access token.
    pub access_expires_at: Option<SystemTime>,
    /// Expiry of the refresh token.
    pub refresh_expiry: RefreshExpiry,
    /// Generation.
    pub generation: u64,
    /// Last successful refresh.
    pub last_refresh_at: Option<SystemTime>,
    /// Next planned refresh.
    pub next_refresh_at: Option<SystemTime>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Last failure.
    pub last_error: Option<SessionError>,
    /// Labels.
    pub labels: Labels,
    /// Registration time.
    pub created_at: SystemTime,
    /// When the user must log in again, if known.
    pub reauth_due_at: Option<SystemTime>,
}

/// Filter and page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this state.
    pub state: Option<SessionState>,
    /// Only sessions carrying all of these labels.
    pub labels: Labels,
    /// Page size (1..=1000).
    pub page_size: usize,
    /// Only ids after this one.
    pub after: Option<SessionId>,
}

/// Who owns the session a registration resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingOwner<'a> {
    /// No such session yet.
    New,
    /// It exists without a recorded owner (registered without authentication).
    Unowned,
    /// It exists and this caller registered it.
    Owned(&'a str),
}

/// Asked by [`Broker::register`] whether the caller may register (or
/// replace) this id.
pub type RegisterCheck =
    Box<dyn Fn(&SessionId, ExistingOwner<'_>) -> Result<(), BrokerError> + Send + Sync>;

/// A check that allows every registration (no authentication).
pub fn allow_any_registration() -> RegisterCheck {
    Box::new(|_, _| Ok(()))
}

/// One event of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchEvent {
    /// A new access token.
    Token(Arc<IssuedToken>),
    /// The user must log in again by this time.
    ReauthWarning(SystemTime),
    /// The session ended; the stream ends after this.
    Ended(EndReason),
    /// The broker is shutting down; the stream ends after this.
    ShuttingDown,
}

/// The broker: the use cases over the registry, the refresh engine and the store.
#[derive(Debug)]
pub struct Broker {
    registry: Arc<Registry>,
    refresher: Refresher,
    store: Arc<dyn SessionStore>,
    providers: Providers,
    settings: BrokerSettings,
    reservations: DashMap<ReservationKey, watch::Receiver<()>>,
    held_grants: DashMap<(Arc<str>, [u8; 32]), HeldGrant>,
    /// Which session each registered refresh token (by fingerprint) belongs to.
    registered: TokenIndex,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

/// What a registration or deletion holds exclusively while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ReservationKey {
    /// A session id.
    Id(SessionId),
    /// A refresh token (by fingerprint), so that one token is never
    /// presented by two registrations at once.
    Token([u8; 32]),
}

/// A registration's refresh whose session could not be stored: the
/// provider rotated the caller's token, so a retry of the same
/// registration must use this grant instead of presenting the old token.
#[derive(Debug)]
struct HeldGrant {
    grant: oidc::TokenGrant,
    at: tokio::time::Instant,
}

/// How long a held grant waits for the registration to be retried.
const HELD_GRANT_TTL: Duration = Duration::from_secs(600);

impl Broker {
    /// A broker over these parts.
    pub fn new(
        registry: Arc<Registry>,
        refresher: Refresher,
        store: Arc<dyn SessionStore>,
        providers: Providers,
        settings: BrokerSettings,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry,
            refresher,
            store,
            providers,
            settings,
            reservations: DashMap::new(),
            held_grants: DashMap::new(),
            registered: TokenIndex::default(),
            tracker,
            shutdown,
        }
    }

    /// Broker-wide settings.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.registry.len()
    }

    /// Sets the gauges that describe the whole broker (at scrape time):
    /// sessions by state and the refresh queue's depth.
    pub fn record_gauges(&self) {
        let (mut active, mut ended) = (0usize, 0usize);
        self.registry.for_each(|session| {
            if session.published().ended.is_some() {
                ended += 1;
            } else {
                active += 1;
            }
        });
        metrics::gauge!(crate::metrics::SESSIONS, "state" => "active").set(active as f64);
        metrics::gauge!(crate::metrics::SESSIONS, "state" => "reauth_required").set(ended as f64);
        metrics::gauge!(crate::metrics::QUEUE_DEPTH).set(self.refresher.queue_depth() as f64);
    }

    /// Brings stored sessions back into memory and plans their refreshes.
    /// Access tokens still valid are kept (no refresh until due); sessions
    /// in `REAUTH_REQUIRED` stay for inspection. Refreshes that fell due
    /// while the broker was down are spread over a window long enough for
    /// the default provider's rate budget, so a restart never stampedes the
    /// IdP. Returns how many sessions were loaded and how many were overdue.
    pub fn restore(&self, stored: Vec<StoredSession>) -> (usize, usize) {
        let count = stored.len();
        let mut overdue = Vec::new();
        self.restore_page(stored, &mut overdue);
        (count, self.spread_overdue(overdue))
    }

    /// Brings one page of stored sessions into memory (see
    /// [`Broker::restore`]); the overdue ones are collected for
    /// [`Broker::spread_overdue`] once every page is in.
    pub fn restore_page(&self, stored: Vec<StoredSession>, overdue: &mut Vec<Arc<Session>>) {
        // Overdue sessions are parked an hour out until every page is in and
        // their real slots are known: the timer must not fire them at once.
        let parked = SystemTime::now() + Duration::from_secs(3600);
        for record in stored {
            self.registered
                .insert(record.registered_fingerprint, record.id.clone());
            let session = Arc::new(session_from_record(record));
            self.registry.insert(session.clone());
            if self.refresher.plan_not_before(&session, Some(parked)) {
                overdue.push(session);
            }
        }
    }

    /// Spreads the refreshes that fell due while the broker was down over a
    /// window sized to the rate budget; returns how many there were.
    pub fn spread_overdue(&self, overdue: Vec<Arc<Session>>) -> usize {
        let per_second = self
            .providers
            .default_provider()
            .budget
            .limits()
            .per_second
            .max(1);
        let window = restart_window(overdue.len(), per_second);
        let now = SystemTime::now();
        for session in &overdue {
            let lapses = match session.lock().refresh_expiry {
                RefreshExpiry::At(at) => Some(at),
                _ => None,
            };
            let at = restart_slot(now, window, lapses, rand::random());
            self.refresher.plan_not_before(session, Some(at));
        }
        if !overdue.is_empty() {
            info!(
                overdue = overdue.len(),
                window_secs = window.as_secs_f64(),
                "refreshes that fell due while stopped are spread out"
            );
        }
        overdue.len()
    }

    /// Registers a session (idempotent for the same id and refresh token).
    /// `authorize` is asked, while the id is held, whether the caller may
    /// register (or replace) the session it resolves to.
    ///
    /// Runs as an owned task: a caller that gives up never cuts a
    /// registration between the provider's rotation and the store write.
    pub async fn register(
        self: &Arc<Self>,
        request: Registration,
        authorize: RegisterCheck,
    ) -> Result<(SessionInfo, bool), BrokerError> {
        let this = self.clone();
        self.tracker
            .spawn(async move { this.register_owned(request, authorize).await })
            .await
            .unwrap_or(Err(BrokerError::ShuttingDown))
    }

    async fn register_owned(
        &self,
        request: Registration,
        authorize: RegisterCheck,
    ) -> Result<(SessionInfo, bool), BrokerError> {
        let provider = self
            .providers
            .get(&request.provider)
            .cloned()
            .ok_or_else(|| {
                BrokerError::invalid(
                    "provider",
                    format!("unknown provider {:?}", request.provider),
                )
            })?;
        let id = request
            .session_id
            .clone()
            .unwrap_or_else(SessionId::generate);
        let _id_held = self.reserve(ReservationKey::Id(id.clone())).await;

        let fingerprint = request.refresh_token.fingerprint();
        // Another replica may have registered it (HA).
        self.load_from_store(&id).await?;
        let existing = self.registry.get(&id);
        // Checked under the reservation: nothing can register or replace
        // this id between the check and the write.
        match &existing {
            None => authorize(&id, ExistingOwner::New)?,
            Some(session) => {
                let owner = session.lock().owner.clone();
                match owner.as_deref() {
                    Some(owner) => authorize(&id, ExistingOwner::Owned(owner))?,
                    None => authorize(&id, ExistingOwner::Unowned)?,
                }
            }
        }
        if let Some(session) = &existing {
            let inner = session.lock();
            if inner.registered_fingerprint == fingerprint {
                drop(inner);
                return Ok((self.info(session), false));
            }
            if !request.replace {
                return Err(BrokerError::SessionExists);
            }
        }
        let _token_held = self.reserve(ReservationKey::Token(fingerprint)).await;
        // The same login already registered under another id (e.g. a retry
        // of a registration that let the broker pick the id): presenting its
        // token again would be a replay.
        let other = self.registered.get(&fingerprint);
        if let Some(other) = other.filter(|other| *other != id) {
            return match (&request.session_id, self.registry.get(&other)) {
                (None, Some(session)) => {
                    let owner = session.lock().owner.clone();
                    match owner.as_deref() {
                        Some(owner) => authorize(&other, ExistingOwner::Owned(owner))?,
                        None => authorize(&other, ExistingOwner::Unowned)?,
                    }
                    Ok((self.info(&session), false))
                }
                _ => Err(BrokerError::SessionExists),
            };
        }

        // The first token: a grant held from an attempt whose store write
        // failed, handed over by the caller, or from one refresh (a dead
        // refresh token fails here and is not stored).
        let now = SystemTime::now();
        let endpoint = provider.client.endpoint();
        let held = self.take_held_grant(&provider.name, fingerprint);
        let from_grant = |grant: oidc::TokenGrant, presented: RefreshToken| {
            let token = IssuedToken {
                access_token: grant.access_token.clone(),
                expires_at: grant.expires_at,
                issued_at: grant.sent_at,
                scope: intern(&grant.scope),
                generation: 0,
            };
            let refresh_token = grant.refresh_token.clone().unwrap_or(presented);
            (refresh_token, token, grant.refresh_expiry, Some(grant))
        };
        let (refresh_token, token, refresh_expiry, grant) = match (held, request.initial) {
            (Some(grant), _) => from_grant(grant, request.refresh_token),
            (None, Some(initial)) => {
                // `expires_in` counts from now, later than the login that
                // issued the token: the JWT's own `exp` caps it, as it caps
                // a refresh's lifetime.
                let stated = initial.expires_in.map(|d| now + d);
                let exp = oidc::jwt_exp(initial.access_token.expose_secret());
                let expires_at = match (stated, exp) {
                    (Some(stated), Some(exp)) => stated.min(exp),
                    (stated, exp) => stated
                        .or(exp)
                        .unwrap_or(now + endpoint.default_access_lifetime),
                };
                let refresh_expiry = match request.refresh_expires_in {
                    Some(d) if d.is_zero() => RefreshExpiry::Never,
                    Some(d) => RefreshExpiry::At(now + d),
                    None => endpoint
                        .default_refresh_lifetime
                        .map_or(RefreshExpiry::Unknown, |d| RefreshExpiry::At(now + d)),
                };
                let token = IssuedToken {
                    access_token: initial.access_token,
                    expires_at,
                    issued_at: now,
                    scope: intern(&initial.scope),
                    generation: 0,
                };
                (request.refresh_token, token, refresh_expiry, None)
            }
            (None, None) => {
                let grant = self
                    .first_refresh(&provider, &request.refresh_token, request.trace)
                    .await?;
                from_grant(grant, request.refresh_token)
            }
        };
        let longest = match refresh_expiry {
            RefreshExpiry::At(at) => at.duration_since(token.issued_at).ok(),
            _ => None,
        };
        let fresh = |generation: u64| SessionInner {
            provider: provider.name.clone(),
            labels: LabelSet::from_map(&request.labels),
            owner: request.owner.clone(),
            refresh_token: refresh_token.clone(),
            registered_fingerprint: fingerprint,
            refresh_expiry,
            longest_refresh_lifetime: longest,
            generation,
            state: SessionState::Active,
            created_at: now,
            last_refresh_at: grant.as_ref().map(|g| g.sent_at),
            next_refresh_at: None,
            trouble: None,
            flight: None,
            flights_started: 0,
            deleting: false,
        };
        // Whatever the store said, a rotation the provider made must not be
        // lost: a retry of this registration picks it up.
        let keep_grant = || {
            if let Some(grant) = &grant {
                self.held_grants.insert(
                    (provider.name.clone(), fingerprint),
                    HeldGrant {
                        grant: grant.clone(),
                        at: tokio::time::Instant::now(),
                    },
                );
            }
        };

        let Some(session) = existing else {
            let token = Arc::new(IssuedToken {
                generation: 1,
                ..token
            });
            let session = Arc::new(Session::new(
                id.clone(),
                fresh(1),
                Published {
                    token: Some(token.clone()),
                    ended: None,
                    reauth_due_at: None,
                    owner: request.owner.clone(),
                },
            ));
            let record = refresh::record_of(&id, &session.lock(), Some(&token), None);
            if let Err(error) = self.insert(&record, InsertMode::New).await {
                keep_grant();
                return Err(store_error(error));
            }
            self.registered.insert(fingerprint, id.clone());
            self.registry.insert(session.clone());
            self.refresher.plan(&session);
            info!(session_id = %id, provider = %provider.name, "session registered");
            return Ok((self.info(&session), true));
        };

        // Replace: take the session's refresh slot so that no refresh of the
        // old login runs (or starts) while the new one is swapped in.
        let slot = self.refresher.take_slot(&session).await;
        // A rotation of the old login whose store write is still in doubt is
        // settled first, so that the generation below is the stored one.
        if let Err(error) = self.refresher.settle_pending(&session).await {
            keep_grant();
            slot.finish(Err(error.clone()));
            return Err(error);
        }
        let (expected, old_fingerprint) = {
            let current = session.lock();
            (current.generation, current.registered_fingerprint)
        };
        let generation = expected + 1;
        let token = Arc::new(IssuedToken {
            generation,
            ..token
        });
        let mut replacement = fresh(generation);
        replacement.created_at = session.lock().created_at;
        let record = refresh::record_of(&id, &replacement, Some(&token), None);
        if let Err(error) = self
            .insert(
                &record,
                InsertMode::Replace {
                    expected_generation: expected,
                },
            )
            .await
        {
            keep_grant();
            let error = match error {
                StoreError::Backend(description) => BrokerError::StoreUnavailable { description },
                other => BrokerError::StoreUnavailable {
                    description: format!("{other}; retry"),
                },
            };
            slot.finish(Err(error.clone()));
            return Err(error);
        }
        {
            // Swap in place so that open watch streams follow the new login.
            let mut current = session.lock();
            replacement.flight = current.flight.take();
            replacement.flights_started = current.flights_started;
            *current = replacement;
            session.publish(Published {
                token: Some(token.clone()),
                ended: None,
                reauth_due_at: None,
                owner: current.owner.clone(),
            });
        }
        self.registered.remove_if_owned(&old_fingerprint, &id);
        self.registered.insert(fingerprint, id.clone());
        slot.finish(Ok(token));
        info!(session_id = %id, provider = %provider.name, "session replaced");
        Ok((self.info(&session), true))
    }

    /// Inserts; a write reported as failed that landed all the same counts
    /// as written.
    async fn insert(&self, record: &StoredSession, mode: InsertMode) -> Result<(), StoreError> {
        match self.store.insert(record, mode).await {
            Err(StoreError::Backend(_) | StoreError::Conflict)
                if crate::store::holds(self.store.as_ref(), record).await =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// A grant held from an earlier registration attempt of this token whose
    /// store write failed: the provider rotated the token then, so it must
    /// not be presented (or stored) again.
    fn take_held_grant(
        &self,
        provider: &Arc<str>,
        fingerprint: [u8; 32],
    ) -> Option<oidc::TokenGrant> {
        self.held_grants
            .retain(|_, held| held.at.elapsed() < HELD_GRANT_TTL);
        let (_, held) = self.held_grants.remove(&(provider.clone(), fingerprint))?;
        info!("registration retried: using the rotation held from the failed attempt");
        Some(held.grant)
    }

    /// The registration refresh: one presentation of the caller's token.
    async fn first_refresh(
        &self,
        provider: &refresh::Provider,
        refresh_token: &RefreshToken,
        trace: Option<TraceContext>,
    ) -> Result<oidc::TokenGrant, BrokerError> {
        let _permit = provider
            .budget
            .acquire(Priority::Urgent)
            .await
            .map_err(|_| BrokerError::RateLimited {
                description: format!("refresh budget of provider {} exhausted", provider.name),
                retry_after: Duration::from_secs(1),
            })?;
        refresh::present(provider, refresh_token, trace.as_ref())
            .await
            .map_err(|error| registration_error(&provider.name, error))
    }

    /// Waits until nothing else holds `key`, then holds it.
    async fn reserve(&self, key: ReservationKey) -> Reservation<'_> {
        loop {
            let mut other = match self.reservations.entry(key.clone()) {
                dashmap::Entry::Vacant(slot) => {
                    let (tx, rx) = watch::channel(());
                    slot.insert(rx);
                    return Reservation {
                        map: &self.reservations,
                        key,
                        _held: tx,
                    };
                }
                dashmap::Entry::Occupied(slot) => slot.get().clone(),
            };
            // Resolves when the holder drops its sender.
            let _ = other.changed().await;
        }
    }

    /// In HA mode, brings a session that another replica registered into
    /// memory when it is not there yet (a registry miss asks the store).
    /// Nothing to do on a single node, or when the session is known.
    pub async fn ensure_loaded(&self, id: &str) -> Result<(), BrokerError> {
        if self.refresher.coordinator().is_none() || self.registry.get(id).is_some() {
            return Ok(());
        }
        match SessionId::parse(id) {
            Ok(id) => self.load_from_store(&id).await,
            Err(_) => Ok(()),
        }
    }

    async fn load_from_store(&self, id: &SessionId) -> Result<(), BrokerError> {
        if self.refresher.coordinator().is_none() || self.registry.get(id).is_some() {
            return Ok(());
        }
        match self.store.get(id).await {
            Ok(Some(record)) => {
                self.apply_record(record);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => Err(store_error(error)),
        }
    }

    /// Applies a stored version of a session: a new one joins the registry,
    /// a known one adopts it if it is newer.
    fn apply_record(&self, record: StoredSession) {
        let id = record.id.clone();
        let fingerprint = record.registered_fingerprint;
        match self.registry.get(&id) {
            Some(session) => {
                let old = session.lock().registered_fingerprint;
                if self.refresher.adopt(&session, record) && old != fingerprint {
                    self.registered.remove_if_owned(&old, &id);
                    self.registered.insert(fingerprint, id);
                }
            }
            None => {
                let session = Arc::new(session_from_record(record));
                let current = self.registry.insert_if_absent(session.clone());
                if Arc::ptr_eq(&current, &session) {
                    self.registered.insert(fingerprint, id);
                    self.refresher.plan(&session);
                }
            }
        }
    }

    /// Drops a session that another replica deleted.
    fn forget(&self, session: &Arc<Session>) {
        let fingerprint = session.lock().registered_fingerprint;
        self.registered.remove_if_owned(&fingerprint, session.id());
        self.refresher.forget(session);
    }

    /// Applies a change that the shared store reported (HA mode). Changes
    /// this replica made itself are recognised by their generation and
    /// skipped; so are sessions a local registration or deletion holds
    /// (it writes the newest state itself).
    pub async fn apply_change(&self, change: Change) -> Result<(), BrokerError> {
        match change {
            Change::Written { id, generation } => {
                if self.reserved(&id) {
                    return Ok(());
                }
                if let Some(session) = self.registry.get(&id) {
                    let inner = session.lock();
                    // Same generation: new only if it ended the session
                    // (this replica's own refreshes come back this way too).
                    if inner.generation > generation
                        || (inner.generation == generation
                            && inner.state == SessionState::ReauthRequired)
                    {
                        return Ok(());
                    }
                }
                self.refetch(&id).await
            }
            Change::Deleted { id } => {
                if !self.reserved(&id)
                    && let Some(session) = self.registry.get(&id)
                {
                    self.forget(&session);
                    info!(session_id = %id, "session deleted by another replica");
                }
                Ok(())
            }
            Change::Released { .. } | Change::Lost => Ok(()),
            Change::Resync => self.resync().await,
        }
    }

    async fn refetch(&self, id: &SessionId) -> Result<(), BrokerError> {
        match self.store.get(id).await.map_err(store_error)? {
            Some(record) => self.apply_record(record),
            None => {
                if let Some(session) = self.registry.get(id) {
                    self.forget(&session);
                }
            }
        }
        Ok(())
    }

    /// Compares every session with the store after changes may have been
    /// missed: newer versions are adopted, sessions gone from the store are
    /// dropped, new ones loaded.
    pub async fn resync(&self) -> Result<(), BrokerError> {
        let Some(coordinator) = self.refresher.coordinator() else {
            return Ok(());
        };
        let stored: HashMap<SessionId, u64> = coordinator
            .generations()
            .await
            .map_err(store_error)?
            .into_iter()
            .collect();
        let mut adopted = 0usize;
        for (id, generation) in &stored {
            let behind = self
                .registry
                .get(id)
                .is_none_or(|s| s.lock().generation < *generation);
            if behind && !self.reserved(id) {
                self.refetch(id).await?;
                adopted += 1;
            }
        }
        let mut dropped = 0usize;
        for session in self.registry.all() {
            if !stored.contains_key(session.id()) && !self.reserved(session.id()) {
                self.forget(&session);
                dropped += 1;
            } else {
                // The store is back: rotations held in memory are written now,
                // while this replica still holds their leases.
                self.refresher.settle_soon(&session);
            }
        }
        info!(
            sessions = stored.len(),
            adopted, dropped, "resynchronised with the shared store"
        );
        Ok(())
    }

    fn reserved(&self, id: &SessionId) -> bool {
        self.reservations
            .contains_key(&ReservationKey::Id(id.clone()))
    }

    /// A token valid for at least `min_ttl` (the default when `None`), or a
    /// newer one than any held when the call arrived (`force`).
    pub async fn get_token(
        &self,
        id: &str,
        min_ttl: Option<Duration>,
        force: bool,
        trace: Option<TraceContext>,
    ) -> Result<Arc<IssuedToken>, BrokerError> {
        let session = self.registry.get(id).ok_or(BrokerError::SessionNotFound)?;
        let now = SystemTime::now();
        session.touch(crate::session::unix_secs(now));
        let published = session.published();
        if let Some(reason) = &published.ended {
            return Err(ended_error(reason));
        }
        if force {
            let seen = published.token.as_ref().map_or(0, |t| t.generation);
            return self
                .refresher
                .refresh(&session, Trigger::Forced, Some(seen), trace)
                .await;
        }
        let min_ttl = min_ttl.unwrap_or(self.settings.default_min_ttl);
        if let Some(token) = &published.token
            && token.valid_for(now, min_ttl)
        {
            return Ok(token.clone());
        }
        // A token fresh from the provider satisfies the call even when the
        // provider grants less than `min_ttl`. A refresh may also hand back a
        // token that is not fresh, and then `min_ttl` holds: the one held
        // (another replica's write won the race: retry, the change feed
        // brings the newer one), or an older one of another replica's,
        // adopted instead of refreshing (one more refresh starts from it).
        let mut seen = published.token.as_ref().map(|t| t.generation);
        for _ in 0..2 {
            let token = self
                .refresher
                .refresh(&session, Trigger::OnDemand, None, trace)
                .await?;
            let now = SystemTime::now();
            if token.expires_at <= now {
                return Err(BrokerError::ProviderUnavailable {
                    provider: session.lock().provider.to_string(),
                    description: "the provider issued an already expired token".into(),
                    retry_after: Duration::from_secs(1),
                });
            }
            let fresh =
                Some(token.generation) > seen && token.remaining(now) > token.lifetime() / 2;
            if fresh || token.valid_for(now, min_ttl) {
                return Ok(token);
            }
            if Some(token.generation) <= seen {
                break;
            }
            seen = Some(token.generation);
        }
        Err(BrokerError::StoreUnavailable {
            description: "the session changed under the refresh; retry".into(),
        })
    }

    /// The session's current token if it stays valid for `min_ttl` (the
    /// default when `None`), counting as a use; `None` for anything else
    /// (unknown, ended, due for a refresh), which [`Broker::get_token`]
    /// then answers. No lock, no allocation: the hot path.
    pub fn cached_token(&self, id: &str, min_ttl: Option<Duration>) -> Option<Arc<IssuedToken>> {
        let session = self.registry.get(id)?;
        let now = SystemTime::now();
        let published = session.published();
        let token = published.token.as_ref()?;
        if published.ended.is_some()
            || !token.valid_for(now, min_ttl.unwrap_or(self.settings.default_min_ttl))
        {
            return None;
        }
        session.touch(crate::session::unix_secs(now));
        Some(token.clone())
    }

    /// A stream of the session's tokens and events.
    pub fn watch(&self, id: &SessionId) -> Result<TokenWatch, BrokerError> {
        let session = self.registry.get(id).ok_or(BrokerError::SessionNotFound)?;
        let receiver = session.subscribe();
        let published = session.published();
        let needs_token = published.ended.is_none()
            && published
                .token
                .as_ref()
                .is_none_or(|t| t.expires_at <= SystemTime::now());
        if needs_token {
            self.refresher.kick(&session, Trigger::OnDemand);
        } else {
            // A new watcher puts the session in use: plan its early refresh.
            self.refresher.plan(&session);
        }
        Ok(TokenWatch {
            receiver,
            last_generation: 0,
            warned: None,
            finished: false,
            shutdown: self.shutdown.clone(),
        })
    }

    /// Metadata of one session.
    pub fn inspect(&self, id: &SessionId) -> Result<SessionInfo, BrokerError> {
        let session = self.registry.get(id).ok_or(BrokerError::SessionNotFound)?;
        Ok(self.info(&session))
    }

    /// The caller that registered a session: `None` if there is no such
    /// session, `Some(None)` if it has no recorded owner.
    pub fn owner_of(&self, id: &str) -> Option<Option<Arc<str>>> {
        self.registry.get(id).map(|s| s.published().owner.clone())
    }

    /// A page of the sessions that `visible` admits (given id and owner),
    /// ordered by id, and whether more follow.
    pub fn list(
        &self,
        query: &ListQuery,
        visible: impl Fn(&SessionId, Option<&str>) -> bool,
    ) -> (Vec<SessionInfo>, bool) {
        let page_size = query.page_size.clamp(1, 1000);
        // Keep the page_size + 1 smallest matching ids in a max-heap.
        let mut heap: BinaryHeap<HeapEntry> = BinaryHeap::with_capacity(page_size + 1);
        for session in self.registry.all() {
            if query
                .after
                .as_ref()
                .is_some_and(|after| session.id() <= after)
            {
                continue;
            }
            if heap.len() > page_size && heap.peek().is_some_and(|top| session.id() >= top.0.id()) {
                continue;
            }
            {
                let inner = session.lock();
                if query.state.is_some_and(|s| s != inner.state)
                    || !visible(session.id(), inner.owner.as_deref())
                    || !inner.labels.matches(&query.labels)
                {
                    continue;
                }
            }
            heap.push(HeapEntry(session));
            if heap.len() > page_size + 1 {
                heap.pop();
            }
        }
        let mut page: Vec<Arc<Session>> = heap.into_sorted_vec().into_iter().map(|e| e.0).collect();
        let more = page.len() > page_size;
        page.truncate(page_size);
        (page.iter().map(|s| self.info(s)).collect(), more)
    }

    /// Logs the session out upstream (best effort), deletes it and ends its
    /// streams. Returns whether the provider confirmed the logout. Runs as an
    /// owned task, so a caller that gives up never leaves it half done.
    pub async fn delete(self: &Arc<Self>, id: &SessionId) -> Result<bool, BrokerError> {
        let this = self.clone();
        let id = id.clone();
        self.tracker
            .spawn(async move { this.delete_owned(&id).await })
            .await
            .unwrap_or(Err(BrokerError::ShuttingDown))
    }

    async fn delete_owned(&self, id: &SessionId) -> Result<bool, BrokerError> {
        let _id_held = self.reserve(ReservationKey::Id(id.clone())).await;
        self.load_from_store(id).await?;
        let session = self.registry.get(id).ok_or(BrokerError::SessionNotFound)?;
        // Never present the refresh token to the logout endpoint while a
        // refresh presents it too: wait for it, and hold off new ones.
        let slot = self.refresher.take_slot(&session).await;
        let (provider_name, refresh_token, state) = {
            let inner = session.lock();
            (
                inner.provider.clone(),
                inner.refresh_token.clone(),
                inner.state,
            )
        };
        let logged_out = match (state, self.providers.get(&provider_name)) {
            (SessionState::Active, Some(provider)) => {
                match provider.client.logout(&refresh_token).await {
                    Ok(()) => true,
                    Err(error) => {
                        warn!(session_id = %id, %error, "upstream logout failed; deleting anyway");
                        false
                    }
                }
            }
            _ => false,
        };
        if let Err(error) = self.store.delete(id).await {
            let error = store_error(error);
            slot.finish(Err(error.clone()));
            return Err(error);
        }
        let fingerprint = {
            let mut inner = session.lock();
            inner.deleting = true;
            inner.registered_fingerprint
        };
        self.registered.remove_if_owned(&fingerprint, id);
        self.registry.remove_exact(&session);
        self.refresher.plan(&session); // deleting: cancels the timer
        session.publish_with(|p| {
            p.token = None;
            p.ended = Some(EndReason::Deleted);
        });
        slot.finish(Err(BrokerError::SessionNotFound));
        info!(session_id = %id, logged_out, "session deleted");
        Ok(logged_out)
    }

    fn info(&self, session: &Session) -> SessionInfo {
        let published = session.published();
        let inner = session.lock();
        SessionInfo {
            id: session.id().clone(),
            provider: inner.provider.to_string(),
            state: inner.state,
            access_expires_at: published.token.as_ref().map(|t| t.expires_at),
            refresh_expiry: inner.refresh_expiry,
            generation: inner.generation,
            last_refresh_at: inner.last_refresh_at,
            next_refresh_at: inner.next_refresh_at,
            consecutive_failures: inner.trouble().consecutive_failures,
            last_error: inner.trouble().last_error.clone(),
            labels: inner.labels.to_map(),
            created_at: inner.created_at,
            reauth_due_at: published.reauth_due_at,
        }
    }
}

struct Reservation<'a> {
    map: &'a DashMap<ReservationKey, watch::Receiver<()>>,
    key: ReservationKey,
    _held: watch::Sender<()>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        // Remove first, so that waiters woken by the sender's drop find the slot free.
        self.map.remove(&self.key);
    }
}

struct HeapEntry(Arc<Session>);

impl PartialEq for HeapEntry {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}
impl Eq for HeapEntry {}
impl PartialOrd for HeapEntry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapEntry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id().cmp(other.0.id())
    }
}

/// Reads a watch stream one event at a time; a slow reader gets the latest
/// token, never a backlog, and never an expired one.
#[derive(Debug)]
pub struct TokenWatch {
    receiver: watch::Receiver<Arc<Published>>,
    last_generation: u64,
    warned: Option<SystemTime>,
    finished: bool,
    shutdown: CancellationToken,
}

impl TokenWatch {
    /// The next event; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        loop {
            if self.finished {
                return None;
            }
            let published = self.receiver.borrow_and_update().clone();
            if let Some(reason) = &published.ended {
                self.finished = true;
                return Some(WatchEvent::Ended(reason.clone()));
            }
            if let Some(token) = &published.token
                && token.generation > self.last_generation
                && token.expires_at > SystemTime::now()
            {
                self.last_generation = token.generation;
                return Some(WatchEvent::Token(token.clone()));
            }
            if let Some(due) = published.reauth_due_at
                && self.warned != Some(due)
            {
                self.warned = Some(due);
                return Some(WatchEvent::ReauthWarning(due));
            }
            tokio::select! {
                changed = self.receiver.changed() => if changed.is_err() {
                    // The session object is gone without an end event.
                    self.finished = true;
                    return Some(WatchEvent::Ended(EndReason::Deleted));
                },
                () = self.shutdown.cancelled() => {
                    self.finished = true;
                    return Some(WatchEvent::ShuttingDown);
                }
            }
        }
    }
}

/// How long overdue refreshes are spread over after a restart: long enough
/// that they fit the rate budget at half its capacity (leaving the other
/// half to callers), at least a second, at most ten minutes.
pub fn restart_window(overdue: usize, per_second: u32) -> Duration {
    let secs = 2.0 * overdue as f64 / f64::from(per_second.max(1));
    Duration::from_secs_f64(secs.clamp(1.0, 600.0))
}

/// When one overdue refresh runs after a restart: uniformly in the window,
/// but within the first half of the time its refresh token has left, so
/// spreading never lets a session lapse.
pub fn restart_slot(
    now: SystemTime,
    window: Duration,
    lapses: Option<SystemTime>,
    jitter: f64,
) -> SystemTime {
    let left = lapses.map_or(window, |at| {
        at.duration_since(now).unwrap_or(Duration::ZERO) / 2
    });
    now + window.min(left).mul_f64(jitter.clamp(0.0, 1.0))
}

fn ended_error(reason: &EndReason) -> BrokerError {
    match reason {
        EndReason::ReauthenticationRequired(description) => BrokerError::ReauthenticationRequired {
            description: description.clone(),
        },
        EndReason::Deleted => BrokerError::SessionNotFound,
    }
}

fn store_error(error: StoreError) -> BrokerError {
    match error {
        StoreError::Conflict => BrokerError::SessionExists,
        StoreError::NotFound => BrokerError::SessionNotFound,
        StoreError::Backend(description) => BrokerError::StoreUnavailable { description },
    }
}

fn registration_error(provider: &str, error: oidc::RefreshError) -> BrokerError {
    match &error {
        oidc::RefreshError::Rejected {
            target: RejectedTarget::Session,
            ..
        } => BrokerError::ReauthenticationRequired {
            description: error.to_string(),
        },
        oidc::RefreshError::Rejected {
            target: RejectedTarget::Config,
            ..
        } => BrokerError::ProviderMisconfigured {
            provider: provider.to_string(),
            description: error.to_string(),
        },
        _ => BrokerError::ProviderUnavailable {
            provider: provider.to_string(),
            description: error.to_string(),
            retry_after: error.retry_after().unwrap_or(Duration::from_secs(1)),
        },
    }
}

/// Which session each registered refresh token belongs to, by the first
/// 128 bits of its SHA-256 fingerprint: a collision is out of reach even for
/// billions of tokens, and each session carries 16 bytes less than with the
/// whole hash.
#[derive(Debug, Default)]
struct TokenIndex(DashMap<[u8; 16], SessionId, foldhash::fast::RandomState>);

impl TokenIndex {
    fn key(fingerprint: &[u8; 32]) -> [u8; 16] {
        let mut key = [0; 16];
        key.copy_from_slice(&fingerprint[..16]);
        key
    }

    fn insert(&self, fingerprint: [u8; 32], id: SessionId) {
        self.0.insert(Self::key(&fingerprint), id);
    }

    fn get(&self, fingerprint: &[u8; 32]) -> Option<SessionId> {
        self.0
            .get(&Self::key(fingerprint))
            .map(|entry| entry.value().clone())
    }

    /// Forgets the token if it is still `id`'s.
    fn remove_if_owned(&self, fingerprint: &[u8; 32], id: &SessionId) {
        self.0
            .remove_if(&Self::key(fingerprint), |_, owner| owner == id);
    }
}

fn session_from_record(record: StoredSession) -> Session {
    let (id, inner, published) = refresh::state_of(record);
    Session::new(id, inner, published)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_window_fits_half_the_rate_budget() {
        let cases = [
            (0, 50, 1.0),
            (10, 50, 1.0),
            (100, 50, 4.0),
            (30, 10, 6.0),
            (1_000_000, 50, 600.0),
            (5, 0, 10.0),
        ];
        for (overdue, per_second, secs) in cases {
            assert_eq!(
                restart_window(overdue, per_second),
                Duration::from_secs_f64(secs),
                "{overdue} at {per_second}/s"
            );
        }
    }

    #[test]
    fn restart_slots_never_outrun_the_refresh_token() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let window = Duration::from_secs(60);
        let cases = [
            // (lapses in, jitter, slot after now)
            (None, 0.5, 30.0),
            (Some(3600), 1.0, 60.0),
            (Some(20), 1.0, 10.0),
            (Some(20), 0.5, 5.0),
            (Some(0), 1.0, 0.0),
        ];
        for (lapses, jitter, expected) in cases {
            let lapses = lapses.map(|s| now + Duration::from_secs(s));
            assert_eq!(
                restart_slot(now, window, lapses, jitter),
                now + Duration::from_secs_f64(expected),
                "{lapses:?} {jitter}"
            );
        }
    }
}
