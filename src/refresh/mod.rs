//! The refresh engine: single-flight refreshes, persist-before-use, rotation
//! discipline, backoff, the IdP budget and the timer queue.
//!
//! Invariants (DESIGN §3):
//! - **Single-flight.** At most one refresh per session runs at any moment: a
//!   [`Flight`] marker in the session's inner state, set and cleared under its
//!   mutex; callers that arrive meanwhile join it. The flight runs in its own
//!   owned task, so a caller that gives up never cuts a refresh in half.
//! - **Persist before use.** A rotated refresh token is written through the
//!   store (compare-and-swap on the generation) before the new access token is
//!   published. If the write fails, the new refresh token is kept in memory as
//!   the only one that may be presented, and the write is retried first thing
//!   on the next attempt; the new access token is not handed out until then.
//! - **Rotation discipline.** Only the newest refresh token is ever presented.
//!   When an answer is lost (the provider may have rotated the token), the same
//!   token is presented once more at once; a rejection then ends the session
//!   (`REAUTH_REQUIRED`), never a loop.
//! - **One refresher across replicas** (HA mode, with a [`Coordinator`]):
//!   before presenting, a flight claims the session's lease in the shared
//!   store at the generation it holds, and renews it while the request runs;
//!   the write of the new generation ends the lease. A replica that finds
//!   the lease held waits for the new generation (callers) or steps back
//!   (background work); one that finds the generation moved adopts the
//!   stored session instead of refreshing.

mod budget;
mod provider;
mod scheduler;
pub mod timing;

pub use budget::{Budget, BudgetExhausted, BudgetLimits, BudgetPermit, Escalation, Priority};
pub use provider::{Provider, Providers};
pub use scheduler::{SchedulerHandle, SchedulerTask, channel as scheduler_channel};
pub use timing::Policy;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument as _, debug, info_span, warn};

use crate::error::BrokerError;
use crate::oidc::{RefreshError, RefreshExpiry, RejectedTarget, TokenGrant};
use crate::secret::RefreshToken;
use crate::session::{
    EndReason, ErrorClass, IssuedToken, LabelSet, Published, Registry, Session, SessionError,
    SessionId, SessionInner, SessionState, Trouble, intern, unix_secs,
};
use crate::store::{
    Claim, Coordinator, SessionStore, StoreError, StoredAccessToken, StoredSession,
};
use crate::telemetry::TraceContext;

/// The result every caller of one refresh shares.
pub type FlightResult = Result<Arc<IssuedToken>, BrokerError>;

/// A refresh in flight; clone it to wait for its result.
#[derive(Debug, Clone)]
pub struct Flight {
    seq: u64,
    done: watch::Receiver<Option<FlightResult>>,
    escalation: Arc<Escalation>,
}

impl Flight {
    fn new(seq: u64) -> (Self, watch::Sender<Option<FlightResult>>) {
        let (tx, rx) = watch::channel(None);
        let flight = Self {
            seq,
            done: rx,
            escalation: Arc::default(),
        };
        (flight, tx)
    }

    /// Sequence number of this flight within its session.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Waits for the flight to land.
    pub async fn wait(mut self) -> FlightResult {
        match self.done.wait_for(Option::is_some).await {
            Ok(result) => result.clone().unwrap_or(Err(BrokerError::ShuttingDown)),
            // The flight task was dropped without an answer: the runtime is going away.
            Err(_) => Err(BrokerError::ShuttingDown),
        }
    }
}

/// A rotation received from the provider whose store write failed.
#[derive(Debug, Clone)]
pub struct PendingCommit {
    record: StoredSession,
    token: Arc<IssuedToken>,
    expected_generation: u64,
}

/// The session's single-flight slot, held for an exclusive change.
/// Finish it with the outcome that waiting callers should see; dropping it
/// unfinished frees the slot and tells them to retry.
#[derive(Debug)]
pub struct Slot {
    refresher: Refresher,
    session: Arc<Session>,
    done: Option<watch::Sender<Option<FlightResult>>>,
}

impl Slot {
    /// Frees the slot; callers that waited on it get `outcome`.
    pub fn finish(mut self, outcome: FlightResult) {
        self.release(outcome);
    }

    fn release(&mut self, outcome: FlightResult) {
        if let Some(done) = self.done.take() {
            self.session.lock().flight = None;
            done.send_replace(Some(outcome));
            // The timer skipped the session while the slot was held.
            self.refresher.plan(&self.session);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release(Err(BrokerError::StoreUnavailable {
            description: "the session changed concurrently; retry".into(),
        }));
    }
}

/// Why a refresh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A caller needs a token valid for longer than the current one.
    OnDemand,
    /// A caller asked for a token newer than the one it has seen.
    Forced,
    /// A session in use nears the end of its access token's life.
    Ahead,
    /// An idle session's refresh token nears its idle timeout.
    KeepAlive,
}

impl Trigger {
    fn priority(self) -> Priority {
        match self {
            Self::OnDemand | Self::Forced => Priority::Urgent,
            Self::Ahead | Self::KeepAlive => Priority::Background,
        }
    }

    /// Stable lowercase name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnDemand => "on_demand",
            Self::Forced => "forced",
            Self::Ahead => "ahead",
            Self::KeepAlive => "keep_alive",
        }
    }
}

/// Presents a refresh token to the provider. When the answer is lost (the
/// provider may or may not have rotated the token), presents the same token
/// exactly once more: if the provider never saw the first request this keeps
/// the session; if it did, the session was lost with the answer anyway, unless
/// the provider allows a reuse, in which case the retry succeeds. The second
/// request waits for the provider's rate budget like any other (the caller
/// already holds a slot), so lost answers never double the rate at the IdP.
pub async fn present(
    provider: &Provider,
    refresh_token: &RefreshToken,
    trace: Option<&TraceContext>,
) -> Result<TokenGrant, RefreshError> {
    let client = &provider.client;
    let child = trace.map(TraceContext::child);
    match client.refresh_traced(refresh_token, child.as_ref()).await {
        Err(error) if error.outcome_unknown() => {
            warn!(
                provider = %client.endpoint().provider,
                %error,
                "refresh outcome unknown; presenting the stored refresh token once more"
            );
            provider.budget.pace().await;
            let child = trace.map(TraceContext::child);
            client.refresh_traced(refresh_token, child.as_ref()).await
        }
        outcome => outcome,
    }
}

/// Error class of a provider failure, for session metadata.
pub fn error_class(error: &RefreshError) -> ErrorClass {
    match error {
        RefreshError::Rejected {
            target: RejectedTarget::Session,
            ..
        } => ErrorClass::RejectedSession,
        RefreshError::Rejected {
            target: RejectedTarget::Config,
            ..
        } => ErrorClass::RejectedConfig,
        RefreshError::Transient { .. } => ErrorClass::Transient,
        RefreshError::Unreadable { .. } => ErrorClass::Unreadable,
    }
}

/// Builds the durable record of a session from its inner state and token.
pub fn record_of(
    id: &SessionId,
    inner: &SessionInner,
    token: Option<&IssuedToken>,
    reauth_due_at: Option<SystemTime>,
) -> StoredSession {
    StoredSession {
        id: id.clone(),
        provider: inner.provider.to_string(),
        labels: inner.labels.to_map(),
        owner: inner.owner.as_deref().map(str::to_owned),
        refresh_token: inner.refresh_token.clone(),
        registered_fingerprint: inner.registered_fingerprint,
        access_token: token.map(|t| StoredAccessToken {
            token: t.access_token.clone(),
            expires_at: t.expires_at,
            issued_at: t.issued_at,
            scope: t.scope.to_string(),
        }),
        refresh_expiry: inner.refresh_expiry,
        longest_refresh_lifetime_secs: inner.longest_refresh_lifetime.map(|d| d.as_secs()),
        generation: inner.generation,
        state: inner.state,
        last_error: inner.trouble().last_error.clone(),
        created_at: inner.created_at,
        last_refresh_at: inner.last_refresh_at,
        reauth_due_at,
    }
}

/// The in-memory state of a stored session (the inverse of [`record_of`]):
/// its id, inner state with no failure bookkeeping or flight, and the view
/// callers see (no token once it has ended).
pub fn state_of(record: StoredSession) -> (SessionId, SessionInner, Published) {
    let last_error = record
        .last_error
        .filter(|e| e.class == ErrorClass::RejectedSession);
    let ended = (record.state == SessionState::ReauthRequired).then(|| {
        EndReason::ReauthenticationRequired(last_error.as_ref().map_or_else(
            || "refresh token rejected".into(),
            |e| e.description.clone(),
        ))
    });
    let token = record.access_token.filter(|_| ended.is_none()).map(|t| {
        Arc::new(IssuedToken {
            access_token: t.token,
            expires_at: t.expires_at,
            issued_at: t.issued_at,
            scope: intern(&t.scope),
            generation: record.generation,
        })
    });
    let owner: Option<Arc<str>> = record.owner.map(Into::into);
    let inner = SessionInner {
        provider: intern(&record.provider),
        labels: LabelSet::from_map(&record.labels),
        owner: owner.clone(),
        refresh_token: record.refresh_token,
        registered_fingerprint: record.registered_fingerprint,
        refresh_expiry: record.refresh_expiry,
        longest_refresh_lifetime: record
            .longest_refresh_lifetime_secs
            .map(Duration::from_secs),
        generation: record.generation,
        state: record.state,
        created_at: record.created_at,
        last_refresh_at: record.last_refresh_at,
        next_refresh_at: None,
        trouble: last_error.map(|error| {
            Box::new(Trouble {
                last_error: Some(error),
                ..Trouble::default()
            })
        }),
        flight: None,
        flights_started: 0,
        deleting: false,
    };
    let published = Published {
        token,
        ended,
        reauth_due_at: record.reauth_due_at,
        owner,
    };
    (record.id, inner, published)
}

/// The refresh engine. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Refresher {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    registry: Arc<Registry>,
    providers: Providers,
    store: Arc<dyn SessionStore>,
    policy: Policy,
    tracker: TaskTracker,
    scheduler: SchedulerHandle,
    shutdown: CancellationToken,
    coordinator: Option<Arc<dyn Coordinator>>,
    /// Mixed into the per-session jitter so that replicas do not all fall
    /// due for the same session at the same moment (0 on a single node).
    jitter_salt: u64,
}

impl Refresher {
    /// An engine over these parts. Flights are spawned on `tracker`. With a
    /// `coordinator`, refreshes are coordinated with other replicas.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        registry: Arc<Registry>,
        providers: Providers,
        store: Arc<dyn SessionStore>,
        policy: Policy,
        tracker: TaskTracker,
        scheduler: SchedulerHandle,
        shutdown: CancellationToken,
        coordinator: Option<Arc<dyn Coordinator>>,
    ) -> Self {
        let jitter_salt = coordinator.as_ref().map_or(0, |c| {
            use std::hash::{Hash as _, Hasher as _};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            c.replica().hash(&mut hasher);
            hasher.finish()
        });
        Self {
            shared: Arc::new(Shared {
                registry,
                providers,
                store,
                policy,
                tracker,
                scheduler,
                shutdown,
                coordinator,
                jitter_salt,
            }),
        }
    }

    /// Sessions planned in the timer queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.scheduler.depth()
    }

    /// The coordinator of replicas, in HA mode.
    pub fn coordinator(&self) -> Option<&Arc<dyn Coordinator>> {
        self.shared.coordinator.as_ref()
    }

    fn jitter(&self, id: &SessionId, generation: u64) -> f64 {
        timing::jitter_for(id.as_str(), generation ^ self.shared.jitter_salt)
    }

    /// Runs the timer queue on the tracker until shutdown.
    pub fn spawn_scheduler(&self, task: SchedulerTask) {
        let this = self.clone();
        let shutdown = self.shared.shutdown.clone();
        self.shared.tracker.spawn(
            task.run(shutdown, move |id| this.on_due(&id))
                .instrument(info_span!("refresh_scheduler")),
        );
    }

    /// The schedule policy.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }

    /// A token fresh from a refresh of `session`: joins the refresh in flight
    /// or starts one. With `seen_generation`, a token of a newer generation
    /// than that one, once it exists, satisfies the call without a new refresh.
    pub async fn refresh(
        &self,
        session: &Arc<Session>,
        trigger: Trigger,
        seen_generation: Option<u64>,
        trace: Option<TraceContext>,
    ) -> FlightResult {
        match self.start_or_join(session, trigger, seen_generation, trace) {
            Ok(flight) => flight.wait().await,
            Err(done) => done,
        }
    }

    /// Starts a refresh if none is in flight, without waiting for it.
    pub fn kick(&self, session: &Arc<Session>, trigger: Trigger) {
        let _ = self.start_or_join(session, trigger, None, None);
    }

    /// The flight to wait for, or the answer right away.
    fn start_or_join(
        &self,
        session: &Arc<Session>,
        trigger: Trigger,
        seen_generation: Option<u64>,
        trace: Option<TraceContext>,
    ) -> Result<Flight, FlightResult> {
        let now = SystemTime::now();
        let inner = session.lock();
        if inner.deleting {
            return Err(Err(BrokerError::SessionNotFound));
        }
        if inner.state == SessionState::ReauthRequired {
            return Err(Err(reauth_error(&inner)));
        }
        if let Some(flight) = &inner.flight {
            if trigger.priority() == Priority::Urgent {
                flight.escalation.raise();
            }
            return Ok(flight.clone());
        }
        if let Some(seen) = seen_generation
            && let Some(token) = session.published().token.clone()
            && token.generation > seen
        {
            return Err(Ok(token));
        }
        if trigger.priority() == Priority::Urgent
            && let Some(wait) = inner
                .trouble()
                .retry_not_before
                .and_then(|at| at.duration_since(now).ok())
        {
            return Err(Err(unavailable(&inner, wait)));
        }
        if self.shared.shutdown.is_cancelled() {
            return Err(Err(BrokerError::ShuttingDown));
        }
        Ok(self.launch(session, inner, trigger, trace))
    }

    /// Starts a flight while the caller holds the session's lock, so that
    /// whatever the caller checked still holds when the flight is marked.
    fn launch(
        &self,
        session: &Arc<Session>,
        mut inner: std::sync::MutexGuard<'_, SessionInner>,
        trigger: Trigger,
        trace: Option<TraceContext>,
    ) -> Flight {
        inner.flights_started += 1;
        let (flight, tx) = Flight::new(inner.flights_started);
        inner.flight = Some(flight.clone());
        let provider = inner.provider.clone();
        drop(inner);

        let this = self.clone();
        let session = session.clone();
        let escalation = flight.escalation.clone();
        // Work no caller asked for starts its own trace.
        let trace = trace.unwrap_or_else(TraceContext::root);
        let span = info_span!(
            "refresh",
            session_id = %session.id(),
            %provider,
            trigger = trigger.as_str(),
            seq = flight.seq,
            trace_id = %trace.trace_id(),
        );
        self.shared.tracker.spawn(
            async move {
                let result = this.execute(&session, trigger, &escalation, &trace).await;
                {
                    let mut inner = session.lock();
                    inner.flight = None;
                    if result.is_err() {
                        // Every failure waits before the next background attempt,
                        // whatever path it took: no hot loop.
                        let floor = SystemTime::now() + this.shared.policy.backoff_base;
                        if inner.trouble().retry_at.is_none_or(|at| at < floor) {
                            inner.trouble_mut().retry_at = Some(floor);
                        }
                    }
                }
                tx.send_replace(Some(result));
                this.plan(&session);
            }
            .instrument(span),
        );
        flight
    }

    /// Takes the session's single-flight slot for an exclusive change
    /// (replace, delete): waits for the refresh in flight to land (raising
    /// its priority), then holds the slot so that no refresh starts until
    /// [`Slot::finish`]. Callers that need a token meanwhile wait for the
    /// change and share its outcome.
    pub async fn take_slot(&self, session: &Arc<Session>) -> Slot {
        loop {
            let running = {
                let mut inner = session.lock();
                match &inner.flight {
                    Some(flight) => {
                        flight.escalation.raise();
                        flight.clone()
                    }
                    None => {
                        inner.flights_started += 1;
                        let (flight, tx) = Flight::new(inner.flights_started);
                        inner.flight = Some(flight);
                        return Slot {
                            refresher: self.clone(),
                            session: session.clone(),
                            done: Some(tx),
                        };
                    }
                }
            };
            let _ = running.wait().await;
        }
    }

    async fn execute(
        &self,
        session: &Arc<Session>,
        trigger: Trigger,
        escalation: &Escalation,
        trace: &TraceContext,
    ) -> FlightResult {
        if let Some(token) = self.retry_pending_commit(session).await? {
            return Ok(token);
        }
        let (provider_name, refresh_token, generation, refresh_expiry) = {
            let inner = session.lock();
            (
                inner.provider.clone(),
                inner.refresh_token.clone(),
                inner.generation,
                inner.refresh_expiry,
            )
        };
        let Some(provider) = self.shared.providers.get(&provider_name).cloned() else {
            return Err(BrokerError::ProviderMisconfigured {
                provider: provider_name.to_string(),
                description: "provider is no longer configured".into(),
            });
        };
        if timing::refresh_token_lapsed(
            refresh_expiry,
            SystemTime::now(),
            self.shared.policy.clock_skew,
        ) {
            return self
                .end_session(session, generation, "refresh token expired".into())
                .await;
        }
        let mut waited = Duration::ZERO;
        let (permit, leased) = loop {
            let budget_started = tokio::time::Instant::now();
            let permit = provider
                .budget
                .acquire_escalating(trigger.priority(), escalation)
                .await;
            metrics::histogram!(
                crate::metrics::BUDGET_WAIT,
                "provider" => provider.name.to_string(),
                "priority" => if trigger.priority() == Priority::Urgent { "urgent" } else { "background" },
            )
            .record(budget_started.elapsed().as_secs_f64());
            let permit = permit.map_err(|_| BrokerError::RateLimited {
                description: format!("refresh budget of provider {} exhausted", provider.name),
                retry_after: Duration::from_secs(1),
            })?;
            let Some(coordinator) = &self.shared.coordinator else {
                break (permit, None);
            };
            let claim = coordinator.claim(session.id(), generation).await;
            let claimed = match &claim {
                Ok(Claim::Granted) => "granted",
                Ok(Claim::Held { .. }) => "held",
                Ok(Claim::Moved) => "moved",
                Ok(Claim::Gone) => "gone",
                Err(_) => "error",
            };
            metrics::counter!(crate::metrics::LEASE_CLAIMS, "outcome" => claimed).increment(1);
            let claim = claim.map_err(|e| BrokerError::StoreUnavailable {
                description: format!("cannot claim the refresh lease: {e}"),
            })?;
            match claim {
                Claim::Granted => break (permit, Some(coordinator)),
                Claim::Moved | Claim::Gone => {
                    drop(permit);
                    return self.reload(session).await;
                }
                Claim::Held { remaining } => {
                    drop(permit);
                    let urgent = trigger.priority() == Priority::Urgent || escalation.is_raised();
                    if !urgent {
                        // Background work: the holder's new generation
                        // arrives by notification; look again once its
                        // lease would have lapsed.
                        session.lock().trouble_mut().retry_at =
                            Some(SystemTime::now() + remaining + Duration::from_secs(1));
                        return current_or_retry(session, StoreError::Conflict);
                    }
                    if self.shared.shutdown.is_cancelled() {
                        return Err(BrokerError::ShuttingDown);
                    }
                    if waited > coordinator.lease() + Duration::from_secs(5) {
                        return Err(BrokerError::StoreUnavailable {
                            description: "another replica holds this session's refresh; retry"
                                .into(),
                        });
                    }
                    let pause = remaining.clamp(Duration::from_millis(20), LEASE_POLL);
                    let mut changes = session.subscribe();
                    let _ = tokio::time::timeout(pause, changes.changed()).await;
                    waited += pause;
                    if session.lock().generation != generation {
                        // Adopted from the other replica meanwhile.
                        return settled(session);
                    }
                }
            }
        };
        debug!(provider = %provider.name, "refreshing");
        let upstream_started = tokio::time::Instant::now();
        let outcome = match leased {
            Some(coordinator) => {
                renewing(
                    coordinator.as_ref(),
                    session.id(),
                    present(&provider, &refresh_token, Some(trace)),
                )
                .await
            }
            None => present(&provider, &refresh_token, Some(trace)).await,
        };
        let answered = match &outcome {
            Ok(_) => "ok",
            Err(error) => match error_class(error) {
                ErrorClass::RejectedSession => "rejected",
                ErrorClass::RejectedConfig => "rejected_config",
                ErrorClass::Unreadable => "unreadable",
                _ => "transient",
            },
        };
        metrics::histogram!(
            crate::metrics::UPSTREAM_SECONDS,
            "provider" => provider.name.to_string(),
            "outcome" => answered,
        )
        .record(upstream_started.elapsed().as_secs_f64());
        metrics::gauge!(crate::metrics::PROVIDER_UP, "provider" => provider.name.to_string())
            .set(if answered == "transient" { 0.0 } else { 1.0 });
        let result = match outcome {
            Ok(grant) => self.commit(session, grant, generation).await,
            Err(error) => self.fail(session, &provider, error, generation).await,
        };
        // The slot is held until the rotation is stored: a rotation received
        // but not yet written is lost if the process dies, so at most
        // `max_concurrent_refreshes` sessions are ever at risk, and a slow
        // store slows the refreshes instead of piling rotations up in memory.
        drop(permit);
        let counted = match (answered, &result) {
            ("ok", Err(BrokerError::StoreUnavailable { .. })) => "store_failed",
            (answered, _) => answered,
        };
        metrics::counter!(
            crate::metrics::REFRESHES,
            "provider" => provider.name.to_string(),
            "trigger" => trigger.as_str(),
            "outcome" => counted,
        )
        .increment(1);
        if let Some(coordinator) = leased
            && result.is_err()
            && session.lock().trouble().pending.is_none()
        {
            // No new generation was written (a write ends the lease by
            // itself): let another replica try. A rotation held in memory
            // keeps the lease, since the stored token must not be presented.
            if let Err(error) = coordinator.release(session.id()).await {
                debug!(%error, "could not release the refresh lease; it lapses");
            }
        }
        result
    }

    /// Takes the stored version of a session that another replica changed.
    async fn reload(&self, session: &Arc<Session>) -> FlightResult {
        match self.shared.store.get(session.id()).await {
            Ok(Some(record)) => {
                self.adopt(session, record);
                settled(session)
            }
            Ok(None) => {
                self.forget(session);
                Err(BrokerError::SessionNotFound)
            }
            Err(error) => Err(BrokerError::StoreUnavailable {
                description: format!("cannot reload the session: {error}"),
            }),
        }
    }

    /// Applies a stored version of `session` newer than the one in memory
    /// (written by another replica): its tokens, generation and state.
    /// Returns whether anything changed.
    pub fn adopt(&self, session: &Arc<Session>, record: StoredSession) -> bool {
        let mut inner = session.lock();
        let newer = record.generation > inner.generation
            || (record.generation == inner.generation
                && record.state == SessionState::ReauthRequired
                && inner.state == SessionState::Active);
        if !newer || inner.deleting {
            return false;
        }
        // The stored version replaces ours whole — a rotation of ours that
        // never got stored included: the stored lineage wins, and ours is
        // never presented. Only the flight marker stays with the session.
        let generation = record.generation;
        let (_, mut fresh, published) = state_of(record);
        fresh.flight = inner.flight.take();
        fresh.flights_started = inner.flights_started;
        *inner = fresh;
        session.publish(published);
        drop(inner);
        debug!(session_id = %session.id(), generation, "adopted the stored session");
        self.plan(session);
        true
    }

    /// Retries the store write of a held rotation now (the store is back).
    pub fn settle_soon(&self, session: &Arc<Session>) {
        let mut inner = session.lock();
        if inner.trouble().pending.is_none() || inner.flight.is_some() {
            return;
        }
        inner.trouble_mut().retry_at = None;
        self.launch(session, inner, Trigger::KeepAlive, None);
    }

    /// Drops a session deleted elsewhere: ends its streams and its timer.
    pub fn forget(&self, session: &Arc<Session>) {
        session.lock().deleting = true;
        self.shared.registry.remove_exact(session);
        self.plan(session);
        session.publish_with(|p| {
            p.token = None;
            p.ended = Some(EndReason::Deleted);
        });
    }

    /// Stores a new rotation, then publishes its access token.
    async fn commit(
        &self,
        session: &Arc<Session>,
        grant: TokenGrant,
        expected: u64,
    ) -> FlightResult {
        let generation = expected + 1;
        let token = Arc::new(IssuedToken {
            access_token: grant.access_token,
            expires_at: grant.expires_at,
            issued_at: grant.sent_at,
            scope: intern(&grant.scope),
            generation,
        });
        let record = {
            let inner = session.lock();
            let granted = match grant.refresh_expiry {
                RefreshExpiry::At(at) => at.duration_since(grant.sent_at).ok(),
                _ => None,
            };
            let previous_due = session.published().reauth_due_at;
            let reauth_due_at = match grant.refresh_expiry {
                RefreshExpiry::At(at)
                    if granted.is_some_and(|g| {
                        timing::hard_max_near(inner.longest_refresh_lifetime, g)
                    }) =>
                {
                    Some(at)
                }
                _ => previous_due,
            };
            let mut record = record_of(session.id(), &inner, Some(&token), reauth_due_at);
            record.generation = generation;
            if let Some(rotated) = grant.refresh_token {
                record.refresh_token = rotated;
            }
            if grant.refresh_expiry != RefreshExpiry::Unknown {
                record.refresh_expiry = grant.refresh_expiry;
            }
            record.longest_refresh_lifetime_secs = inner
                .longest_refresh_lifetime
                .max(granted)
                .map(|d| d.as_secs());
            record.last_refresh_at = Some(grant.sent_at);
            record.last_error = None;
            record
        };
        self.store_and_apply(session, record, token, expected).await
    }

    async fn store_and_apply(
        &self,
        session: &Arc<Session>,
        record: StoredSession,
        token: Arc<IssuedToken>,
        expected: u64,
    ) -> FlightResult {
        let written = match self.shared.store.update(&record, expected).await {
            Err(StoreError::Conflict)
                if crate::store::holds(self.shared.store.as_ref(), &record).await =>
            {
                Ok(())
            }
            other => other,
        };
        match written {
            Ok(()) => {
                let mut inner = session.lock();
                if inner.generation != expected {
                    // Replaced in memory meanwhile (the store would have refused too).
                    return current_or_retry(session, StoreError::Conflict);
                }
                inner.refresh_token = record.refresh_token.clone();
                inner.generation = record.generation;
                inner.refresh_expiry = record.refresh_expiry;
                inner.longest_refresh_lifetime = record
                    .longest_refresh_lifetime_secs
                    .map(Duration::from_secs);
                inner.last_refresh_at = record.last_refresh_at;
                inner.clear_trouble();
                let reauth_due_at = record.reauth_due_at;
                session.publish_with(|p| {
                    p.token = Some(token.clone());
                    p.reauth_due_at = reauth_due_at;
                });
                drop(inner);
                debug!(generation = record.generation, "refreshed");
                Ok(token)
            }
            Err(error @ (StoreError::Conflict | StoreError::NotFound)) => {
                warn!(%error, "the stored session changed under the refresh; result dropped");
                session.lock().drop_pending();
                current_or_retry(session, error)
            }
            Err(StoreError::Backend(cause)) => {
                let mut inner = session.lock();
                if inner.generation != expected {
                    // Replaced or adopted meanwhile: that version is current.
                    return current_or_retry(session, StoreError::Conflict);
                }
                // The provider rotated: the old refresh token must never be
                // presented again, so the new one becomes the current one now,
                // and its access token waits until the write succeeds.
                inner.refresh_token = record.refresh_token.clone();
                inner.trouble_mut().consecutive_failures += 1;
                let description = format!("refresh could not be stored: {cause}");
                inner.trouble_mut().last_error = Some(SessionError {
                    class: ErrorClass::Store,
                    description: description.clone(),
                    at: SystemTime::now(),
                });
                let retry = timing::backoff(
                    inner.trouble().consecutive_failures,
                    self.shared.policy.backoff_base,
                    self.shared.policy.on_demand_backoff_cap,
                    rand::random(),
                );
                inner.trouble_mut().retry_at = Some(SystemTime::now() + retry);
                inner.trouble_mut().pending = Some(Box::new(PendingCommit {
                    record,
                    token,
                    expected_generation: expected,
                }));
                warn!(error = %cause, "rotated refresh token not stored yet; holding it in memory");
                Err(BrokerError::StoreUnavailable { description })
            }
        }
    }

    /// Stores a rotation whose write failed earlier, if there is one (the
    /// caller holds the session's slot).
    pub async fn settle_pending(&self, session: &Arc<Session>) -> Result<(), BrokerError> {
        self.retry_pending_commit(session).await.map(drop)
    }

    /// Writes a rotation that failed to store earlier. `Some(token)` when it
    /// landed and its access token is still good to hand out.
    async fn retry_pending_commit(
        &self,
        session: &Arc<Session>,
    ) -> Result<Option<Arc<IssuedToken>>, BrokerError> {
        let Some(pending) = session.lock().trouble().pending.clone() else {
            return Ok(None);
        };
        let token = self
            .store_and_apply(
                session,
                pending.record,
                pending.token,
                pending.expected_generation,
            )
            .await?;
        let fresh_enough = token.remaining(SystemTime::now()) > token.lifetime() / 2;
        Ok(fresh_enough.then_some(token))
    }

    async fn fail(
        &self,
        session: &Arc<Session>,
        provider: &Provider,
        error: RefreshError,
        generation: u64,
    ) -> FlightResult {
        let class = error_class(&error);
        if class == ErrorClass::RejectedSession {
            return self
                .end_session(session, generation, error.to_string())
                .await;
        }
        let now = SystemTime::now();
        let policy = &self.shared.policy;
        let jitter: f64 = rand::random();
        let (failures, for_callers) = {
            let mut inner = session.lock();
            inner.trouble_mut().consecutive_failures += 1;
            let failures = inner.trouble().consecutive_failures;
            inner.trouble_mut().last_error = Some(SessionError {
                class,
                description: error.to_string(),
                at: now,
            });
            let retry_after = error.retry_after();
            let background = timing::retry_delay(
                failures,
                retry_after,
                policy.backoff_base,
                policy.backoff_cap,
                jitter,
            );
            let for_callers = retry_after.unwrap_or_else(|| {
                timing::backoff(
                    failures,
                    policy.backoff_base,
                    policy.on_demand_backoff_cap,
                    jitter,
                )
            });
            inner.trouble_mut().retry_at = Some(now + background);
            inner.trouble_mut().retry_not_before = Some(now + for_callers);
            (failures, for_callers)
        };
        warn!(provider = %provider.name, class = ?class, %error, failures, "refresh failed");
        Err(match class {
            ErrorClass::RejectedConfig => BrokerError::ProviderMisconfigured {
                provider: provider.name.to_string(),
                description: error.to_string(),
            },
            _ => BrokerError::ProviderUnavailable {
                provider: provider.name.to_string(),
                description: error.to_string(),
                retry_after: for_callers,
            },
        })
    }

    /// Moves a session to `REAUTH_REQUIRED`, durably, and tells its watchers.
    async fn end_session(
        &self,
        session: &Arc<Session>,
        generation: u64,
        description: String,
    ) -> FlightResult {
        let error = SessionError {
            class: ErrorClass::RejectedSession,
            description: description.clone(),
            at: SystemTime::now(),
        };
        let record = {
            let inner = session.lock();
            let mut record = record_of(
                session.id(),
                &inner,
                None,
                session.published().reauth_due_at,
            );
            record.state = SessionState::ReauthRequired;
            record.last_error = Some(error.clone());
            record
        };
        // Stored first, so that no caller sees an end that a crash would undo.
        if let Err(error) = self.shared.store.update(&record, generation).await {
            // The provider rejected the token anyway: on a restart the session
            // is rejected again and lands here once more.
            warn!(%error, "could not store the end of the session");
        }
        {
            let mut inner = session.lock();
            inner.state = SessionState::ReauthRequired;
            inner.trouble_mut().last_error = Some(error);
            inner.next_refresh_at = None;
        }
        warn!(reason = %description, "session needs re-authentication");
        session.publish_with(|p| {
            p.token = None;
            p.ended = Some(EndReason::ReauthenticationRequired(description.clone()));
        });
        self.shared.scheduler.cancel(session.id().clone());
        Err(BrokerError::ReauthenticationRequired { description })
    }

    /// Plans the session's next wake-up in the timer queue.
    pub fn plan(&self, session: &Arc<Session>) {
        self.plan_not_before(session, None);
    }

    /// Like [`Refresher::plan`], but a plan that is already due moves to
    /// `floor` (used to spread overdue refreshes after a restart). Returns
    /// whether the session was due.
    pub fn plan_not_before(&self, session: &Arc<Session>, floor: Option<SystemTime>) -> bool {
        let published = session.published();
        let now = SystemTime::now();
        let mut inner = session.lock();
        let planned = self.planned_at(session, &inner, &published, true);
        let due = planned.is_some_and(|at| at <= now);
        let at = match (planned, floor) {
            (Some(at), Some(floor)) if at <= now => Some(floor),
            (at, _) => at,
        };
        inner.next_refresh_at = at;
        drop(inner);
        match at {
            Some(at) => {
                let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
                self.shared
                    .scheduler
                    .schedule(session.id().clone(), tokio::time::Instant::now() + wait);
            }
            None => self.shared.scheduler.cancel(session.id().clone()),
        }
        due
    }

    fn planned_at(
        &self,
        session: &Session,
        inner: &SessionInner,
        published: &Published,
        in_use: bool,
    ) -> Option<SystemTime> {
        if inner.state != SessionState::Active || inner.deleting || published.ended.is_some() {
            return None;
        }
        if inner.trouble().pending.is_some() {
            // A rotation held in memory is written at the next retry, not at
            // the next planned refresh: until then only this process knows
            // the session's refresh token.
            return Some(inner.trouble().retry_at.unwrap_or_else(SystemTime::now));
        }
        let policy = &self.shared.policy;
        let token = published
            .token
            .as_ref()
            .map(|t| (t.issued_at, t.expires_at));
        let last_refresh = inner
            .last_refresh_at
            .or(token.map(|(issued, _)| issued))
            .unwrap_or(inner.created_at);
        let jitter = self.jitter(session.id(), inner.generation);
        let planned = match published.reauth_due_at {
            // The hard maximum caps the refresh token: keep-alives cannot
            // extend it, so only check for the lapse when it comes.
            Some(due) => {
                let lapse_check = due
                    .checked_add(policy.clock_skew + Duration::from_secs(1))
                    .unwrap_or(due);
                let early = token.filter(|_| in_use).map(|(issued, expires)| {
                    timing::early_refresh_at(issued, expires, policy, jitter)
                });
                Some(early.map_or(lapse_check, |e| e.min(lapse_check)))
            }
            None => timing::next_refresh_at(
                token,
                inner.refresh_expiry,
                last_refresh,
                in_use,
                policy,
                jitter,
            ),
        };
        match (planned, inner.trouble().retry_at) {
            (Some(planned), Some(retry)) => Some(planned.max(retry)),
            (planned, _) => planned,
        }
    }

    /// The timer fired for `id`: refresh if the session is in use or its
    /// refresh token needs keeping alive, else plan the next check.
    fn on_due(&self, id: &SessionId) {
        let Some(session) = self.shared.registry.get(id) else {
            return;
        };
        let now = SystemTime::now();
        let inner = session.lock();
        if inner.flight.is_some() || inner.deleting || self.shared.shutdown.is_cancelled() {
            return;
        }
        // Read under the lock: a flight publishes before it clears its marker,
        // so this is the newest token.
        let published = session.published();
        let in_use = session.watchers() > 0
            || published
                .token
                .as_ref()
                .is_none_or(|t| session.last_used() >= unix_secs(t.issued_at));
        let trigger = match self.planned_at(&session, &inner, &published, in_use) {
            None => return,
            Some(at) if at > now + Duration::from_millis(500) => {
                drop(inner);
                // Not due for this usage pattern yet: plan with the real one.
                let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
                self.shared
                    .scheduler
                    .schedule(id.clone(), tokio::time::Instant::now() + wait);
                return;
            }
            Some(_) => {
                let early_due = published.token.as_ref().is_none_or(|t| {
                    now >= timing::early_refresh_at(
                        t.issued_at,
                        t.expires_at,
                        &self.shared.policy,
                        self.jitter(id, inner.generation),
                    )
                });
                if in_use && early_due {
                    Trigger::Ahead
                } else {
                    Trigger::KeepAlive
                }
            }
        };
        if inner.state == SessionState::Active {
            self.launch(&session, inner, trigger, None);
        }
    }
}

fn reauth_error(inner: &SessionInner) -> BrokerError {
    BrokerError::ReauthenticationRequired {
        description: inner.trouble().last_error.as_ref().map_or_else(
            || "refresh token rejected".to_string(),
            |e| e.description.clone(),
        ),
    }
}

fn unavailable(inner: &SessionInner, retry_after: Duration) -> BrokerError {
    if let Some(error) = &inner.trouble().last_error
        && error.class == ErrorClass::RejectedConfig
    {
        return BrokerError::ProviderMisconfigured {
            provider: inner.provider.to_string(),
            description: error.description.clone(),
        };
    }
    BrokerError::ProviderUnavailable {
        provider: inner.provider.to_string(),
        description: inner.trouble().last_error.as_ref().map_or_else(
            || "provider unavailable".to_string(),
            |e| e.description.clone(),
        ),
        retry_after,
    }
}

/// How long a caller's flight waits between claims while another replica
/// holds the lease (a notification of the new generation ends it sooner).
const LEASE_POLL: Duration = Duration::from_millis(200);

/// Runs `work` (a presentation) while renewing this replica's lease on `id`
/// every third of its length, so that a slow request never outlives it.
async fn renewing<T>(
    coordinator: &dyn Coordinator,
    id: &SessionId,
    work: impl std::future::Future<Output = T>,
) -> T {
    let every = (coordinator.lease() / 3).max(Duration::from_millis(100));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticker.tick() => match coordinator.renew(id).await {
                Ok(true) => {}
                Ok(false) => warn!("refresh lease lost while the request runs"),
                Err(error) => warn!(%error, "cannot renew the refresh lease"),
            },
        }
    }
}

/// The session's outcome after another replica changed it.
fn settled(session: &Session) -> FlightResult {
    let published = session.published();
    match (&published.ended, &published.token) {
        (Some(EndReason::Deleted), _) => Err(BrokerError::SessionNotFound),
        (Some(EndReason::ReauthenticationRequired(description)), _) => {
            Err(BrokerError::ReauthenticationRequired {
                description: description.clone(),
            })
        }
        (None, Some(token)) if token.expires_at > SystemTime::now() => Ok(token.clone()),
        _ => Err(BrokerError::StoreUnavailable {
            description: "the stored session has no valid token; retry".into(),
        }),
    }
}

fn current_or_retry(session: &Session, error: StoreError) -> FlightResult {
    let published = session.published();
    match (&published.ended, &published.token) {
        (None, Some(token)) if token.expires_at > SystemTime::now() => Ok(token.clone()),
        (Some(EndReason::Deleted), _) => Err(BrokerError::SessionNotFound),
        _ => Err(BrokerError::StoreUnavailable {
            description: format!("{error}; retry"),
        }),
    }
}
