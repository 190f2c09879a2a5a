//! [`TokenSource`]: the latest access token of one session, kept current by
//! one owned background task, readable without an RPC.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{Instrument as _, debug, info, warn};

use super::ClientError;
use crate::pb;
use crate::pb::token_broker_client::TokenBrokerClient;
use crate::pb::watch_token_response::Event;
use crate::refresh::timing;
use crate::secret::AccessToken;

/// Streams that fail in a row before delivering a token, after which the
/// source polls `GetAccessToken` for a while.
const FALLBACK_AFTER: u32 = 3;
/// Longest pause between two polls: a final event (re-authentication,
/// deletion) is noticed at the next poll.
const POLL_CEILING: Duration = Duration::from_secs(60);
/// How long a fresh stream may stay silent before the source asks
/// `GetAccessToken` why.
const FIRST_TOKEN_PROBE: Duration = Duration::from_secs(1);

/// An access token handed out by a [`TokenSource`]. Cloning is an `Arc`
/// clone; `Debug` redacts the value, and its memory is zeroized when the
/// last clone drops.
#[derive(Clone)]
pub struct Token(Arc<TokenInner>);

struct TokenInner {
    secret: AccessToken,
    expires_at: SystemTime,
    generation: u64,
    scope: String,
}

impl Token {
    fn from_pb(token: pb::AccessToken) -> Result<Self, ClientError> {
        if !token.token_type.eq_ignore_ascii_case("bearer") {
            return Err(invalid_answer(format!(
                "token type {:?}, expected Bearer",
                token.token_type
            )));
        }
        let expires_at = token
            .expires_at
            .and_then(|at| SystemTime::try_from(at).ok())
            .ok_or_else(|| invalid_answer("a token without a readable expires_at".into()))?;
        if token.access_token.is_empty() {
            return Err(invalid_answer("an empty access token".into()));
        }
        Ok(Self(Arc::new(TokenInner {
            secret: AccessToken::new(token.access_token),
            expires_at,
            generation: token.generation,
            scope: token.scope,
        })))
    }

    /// The token itself, to put on a request. Never log it.
    pub fn expose_secret(&self) -> &str {
        self.0.secret.expose_secret()
    }

    /// `Bearer <token>` as an HTTP header value, marked sensitive (HTTP/2
    /// header compression never indexes it, `Debug` hides it).
    pub fn authorization(&self) -> Result<http::HeaderValue, ClientError> {
        let mut value = http::HeaderValue::try_from(format!("Bearer {}", self.expose_secret()))
            .map_err(|_| invalid_answer("an access token that is no valid header value".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// When the token expires (the broker's clock).
    pub fn expires_at(&self) -> SystemTime {
        self.0.expires_at
    }

    /// Life left on this machine's clock (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.0
            .expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    /// The session's generation this token belongs to (bumped by every refresh).
    pub fn generation(&self) -> u64 {
        self.0.generation
    }

    /// The scope granted with the token.
    pub fn scope(&self) -> &str {
        &self.0.scope
    }

    /// Whether more than `margin` of its life is left at `now`.
    fn usable_at(&self, now: SystemTime, margin: Duration) -> bool {
        now.checked_add(margin)
            .is_some_and(|limit| self.0.expires_at > limit)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &self.0.secret)
            .field("generation", &self.0.generation)
            .field("expires_at", &self.0.expires_at)
            .finish()
    }
}

fn invalid_answer(message: String) -> ClientError {
    ClientError::Unavailable {
        reason: "INVALID_ANSWER".into(),
        message: format!("the broker sent {message}"),
        retry_after: None,
    }
}

/// What the background task is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Connecting, or waiting to reconnect after a failure.
    #[default]
    Connecting,
    /// A `WatchToken` stream is open.
    Watching,
    /// Polling `GetAccessToken` (no stream could be had).
    Polling,
    /// Stopped for good by a final error (see [`SourceStatus::last_error`]).
    Ended,
    /// Closed by [`TokenSource::close`] or by dropping every clone.
    Closed,
}

/// A snapshot of a source's state, for health checks, metrics and tests.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SourceStatus {
    /// What the background task is doing.
    pub mode: Mode,
    /// Generation of the token held (usable or not).
    pub generation: Option<u64>,
    /// Expiry of the token held.
    pub expires_at: Option<SystemTime>,
    /// When the user must log in again at the latest, once the broker warned.
    pub reauth_due_at: Option<SystemTime>,
    /// The final error, or else the last failure since the last token.
    pub last_error: Option<ClientError>,
    /// Connections made to the broker so far.
    pub connections: u64,
}

/// Builds a [`TokenSource`]; every knob has a default fit for tokens that
/// live minutes (the broker's 30-minute Keycloak tokens).
#[derive(Clone)]
pub struct TokenSourceBuilder {
    session_id: String,
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    metadata: Vec<(String, String)>,
    expiry_margin: Duration,
    wait_timeout: Duration,
    min_ttl: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    watch_retry: Duration,
    connect_timeout: Duration,
    call_timeout: Duration,
    keep_alive: Duration,
}

impl fmt::Debug for TokenSourceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Metadata values may be credentials: keys only.
        let keys: Vec<&str> = self.metadata.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TokenSourceBuilder")
            .field("session_id", &self.session_id)
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("metadata_keys", &keys)
            .field("expiry_margin", &self.expiry_margin)
            .field("wait_timeout", &self.wait_timeout)
            .field("min_ttl", &self.min_ttl)
            .finish_non_exhaustive()
    }
}

impl TokenSourceBuilder {
    fn new(session_id: String) -> Self {
        Self {
            session_id,
            endpoints: Vec::new(),
            tls: None,
            metadata: Vec::new(),
            expiry_margin: Duration::from_secs(10),
            wait_timeout: Duration::from_secs(5),
            min_ttl: Duration::from_secs(60),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(10),
            watch_retry: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(3),
            call_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(15),
        }
    }

    /// A broker address (`http://host:port`, or `https://` with
    /// [`tls`](Self::tls)). Repeatable: reconnections go round the list.
    pub fn endpoint(mut self, uri: impl Into<String>) -> Self {
        self.endpoints.push(uri.into());
        self
    }

    /// Several broker addresses at once (see [`endpoint`](Self::endpoint)).
    pub fn endpoints<I: IntoIterator<Item = S>, S: Into<String>>(mut self, uris: I) -> Self {
        self.endpoints.extend(uris.into_iter().map(Into::into));
        self
    }

    /// TLS (and a client certificate, for a broker with `auth.source = "mtls"`).
    pub fn tls(mut self, tls: ClientTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// A metadata entry sent with every call to the broker (values are
    /// treated as sensitive and never printed).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// A token is handed out only while more than this is left of its life
    /// (default 10 s): room for the call that carries it, and for clock skew.
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.expiry_margin = margin;
        self
    }

    /// How long [`TokenSource::token`] waits for a usable token (default 5 s).
    pub fn wait_timeout(mut self, wait: Duration) -> Self {
        self.wait_timeout = wait;
        self
    }

    /// `min_ttl` of the `GetAccessToken` calls made when polling or probing
    /// (default 60 s, the broker's own default); must exceed the expiry margin.
    pub fn min_ttl(mut self, min_ttl: Duration) -> Self {
        self.min_ttl = min_ttl;
        self
    }

    /// Reconnection backoff: the first wait and the longest (defaults 200 ms, 10 s).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_cap = cap;
        self
    }

    /// How long to poll before trying a stream again (default 60 s).
    pub fn watch_retry(mut self, after: Duration) -> Self {
        self.watch_retry = after;
        self
    }

    /// Bound of one connection attempt (default 3 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Deadline of one `GetAccessToken` call (default 10 s).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Checks the configuration and starts the background task on the
    /// current Tokio runtime. Returns at once: the first token arrives in
    /// the background (await [`TokenSource::token`] to wait for it).
    pub fn build(self) -> Result<TokenSource, ClientError> {
        let config = |message: String| ClientError::Config { message };
        crate::session::SessionId::check(&self.session_id).map_err(|e| config(e.to_string()))?;
        if self.endpoints.is_empty() {
            return Err(config("no broker endpoint given".into()));
        }
        if self.min_ttl <= self.expiry_margin {
            return Err(config(format!(
                "min_ttl ({:?}) must exceed the expiry margin ({:?})",
                self.min_ttl, self.expiry_margin
            )));
        }
        if self.backoff_base.is_zero() || self.backoff_cap < self.backoff_base {
            return Err(config(
                "backoff needs a base above zero and a cap not below it".into(),
            ));
        }
        let mut endpoints = Vec::with_capacity(self.endpoints.len());
        for uri in &self.endpoints {
            let mut endpoint = Endpoint::from_shared(uri.clone())
                .map_err(|e| config(format!("endpoint {uri:?}: {e}")))?
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(self.keep_alive)
                .keep_alive_timeout(self.keep_alive)
                .keep_alive_while_idle(true);
            if let Some(tls) = &self.tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| config(format!("endpoint {uri:?}: TLS: {e}")))?;
            }
            endpoints.push(endpoint);
        }
        let mut metadata = Vec::with_capacity(self.metadata.len());
        for (key, value) in &self.metadata {
            let key = AsciiMetadataKey::from_bytes(key.as_bytes())
                .map_err(|_| config(format!("metadata key {key:?} is not a valid header name")))?;
            let mut value = AsciiMetadataValue::try_from(value.as_str())
                .map_err(|_| config(format!("metadata {key}: not a valid ASCII header value")))?;
            value.set_sensitive(true);
            metadata.push((key, value));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| config("build() must run inside a Tokio runtime".into()))?;

        let span = tracing::info_span!("token_source", session_id = %self.session_id);
        let shared = Arc::new(Shared {
            settings: Settings {
                session_id: self.session_id,
                endpoints,
                metadata: ExtraMetadata(Arc::new(metadata)),
                expiry_margin: self.expiry_margin,
                wait_timeout: self.wait_timeout,
                min_ttl: self.min_ttl,
                backoff_base: self.backoff_base,
                backoff_cap: self.backoff_cap,
                watch_retry: self.watch_retry,
                call_timeout: self.call_timeout,
            },
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            changes: watch::channel(()).0,
        });
        let cancel = CancellationToken::new();
        let task = runtime.spawn(run(shared.clone(), cancel.clone()).instrument(span));
        Ok(TokenSource {
            shared,
            owner: Arc::new(Owner {
                cancel,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

/// The latest access token of one session, kept current in the background
/// (see the [module documentation](super) for the guarantees).
///
/// Clones share one background task and one connection; the task stops
/// when the last clone is dropped, or on [`close`](Self::close).
#[derive(Clone)]
pub struct TokenSource {
    shared: Arc<Shared>,
    owner: Arc<Owner>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let snapshot = self.shared.snapshot.load();
        f.debug_struct("TokenSource")
            .field("session_id", &self.shared.settings.session_id)
            .field("mode", &snapshot.mode)
            .field("token", &snapshot.token)
            .finish()
    }
}

impl TokenSource {
    /// Starts configuring a source for `session_id`.
    pub fn builder(session_id: impl Into<String>) -> TokenSourceBuilder {
        TokenSourceBuilder::new(session_id.into())
    }

    /// The session this source follows.
    pub fn session_id(&self) -> &str {
        &self.shared.settings.session_id
    }

    /// A token with more than the expiry margin left, waiting up to the
    /// configured [`wait_timeout`](TokenSourceBuilder::wait_timeout) for one.
    pub async fn token(&self) -> Result<Token, ClientError> {
        self.token_within(self.shared.settings.wait_timeout).await
    }

    /// Like [`token`](Self::token), waiting at most `wait`.
    pub async fn token_within(&self, wait: Duration) -> Result<Token, ClientError> {
        let deadline = Instant::now() + wait;
        let mut changes = self.shared.changes.subscribe();
        loop {
            match self.read() {
                Read::Ready(token) => return Ok(token),
                Read::Fail(error) => return Err(error),
                Read::Wait(_) => {}
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(ClientError::Closed);
                    }
                }
                () = sleep_until(deadline) => {
                    return match self.read() {
                        Read::Ready(token) => Ok(token),
                        Read::Fail(error) | Read::Wait(error) => Err(error),
                    };
                }
            }
        }
    }

    /// The held token if it is usable now, else why not; never waits and
    /// never makes an RPC (for interceptors and other synchronous code).
    pub fn current(&self) -> Result<Token, ClientError> {
        match self.read() {
            Read::Ready(token) => Ok(token),
            Read::Fail(error) | Read::Wait(error) => Err(error),
        }
    }

    /// What the source is doing and what it holds.
    pub fn status(&self) -> SourceStatus {
        let snapshot = self.shared.snapshot.load();
        SourceStatus {
            mode: snapshot.mode,
            generation: snapshot.token.as_ref().map(Token::generation),
            expires_at: snapshot.token.as_ref().map(Token::expires_at),
            reauth_due_at: snapshot.reauth_due_at,
            last_error: snapshot.finished.clone().or_else(|| snapshot.error.clone()),
            connections: snapshot.connections,
        }
    }

    /// Notifications of every change of the source's state (a new token, a
    /// failure, a mode change), e.g. to react to re-authentication.
    pub fn subscribe(&self) -> Updates {
        Updates {
            receiver: self.shared.changes.subscribe(),
        }
    }

    /// Stops the background task (closing its connection) and waits for it
    /// to end. Every clone reads [`ClientError::Closed`] from then on.
    pub async fn close(&self) {
        self.owner.cancel.cancel();
        let task = match self.owner.task.lock() {
            Ok(mut task) => task.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(task) = task {
            // The task ends at its next await: it only ever waits inside a
            // select on the cancellation.
            let _ = task.await;
        } else {
            // Another clone is closing it: wait until the task says so.
            let mut updates = self.subscribe();
            while self.shared.snapshot.load().mode != Mode::Closed {
                if updates.changed().await.is_err() {
                    break;
                }
            }
        }
    }

    fn read(&self) -> Read {
        let settings = &self.shared.settings;
        let snapshot = self.shared.snapshot.load();
        if let Some(error) = &snapshot.finished {
            return Read::Fail(error.clone());
        }
        if let Some(token) = &snapshot.token
            && token.usable_at(SystemTime::now(), settings.expiry_margin)
        {
            return Read::Ready(token.clone());
        }
        match (&snapshot.token, &snapshot.error) {
            (_, Some(error)) if error.fails_fast() => Read::Fail(error.clone()),
            (Some(token), cause) => Read::Wait(ClientError::Expired {
                generation: token.generation(),
                cause: cause.clone().map(Box::new),
            }),
            (None, Some(error)) => Read::Wait(error.clone()),
            (None, None) => Read::Wait(ClientError::Unavailable {
                reason: "NO_TOKEN_YET".into(),
                message: "no token has arrived from the broker yet".into(),
                retry_after: None,
            }),
        }
    }
}

enum Read {
    Ready(Token),
    /// No waiting helps.
    Fail(ClientError),
    /// A token may still come; the error says why there is none now.
    Wait(ClientError),
}

/// Change notifications of a [`TokenSource`] (see [`TokenSource::subscribe`]).
#[derive(Debug)]
pub struct Updates {
    receiver: watch::Receiver<()>,
}

impl Updates {
    /// Waits for the next change; [`ClientError::Closed`] once the source
    /// is gone (every clone dropped and its task ended).
    pub async fn changed(&mut self) -> Result<(), ClientError> {
        self.receiver
            .changed()
            .await
            .map_err(|_| ClientError::Closed)
    }
}

/// Stops the task when the last [`TokenSource`] clone drops.
struct Owner {
    cancel: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Settings {
    session_id: String,
    endpoints: Vec<Endpoint>,
    metadata: ExtraMetadata,
    expiry_margin: Duration,
    wait_timeout: Duration,
    min_ttl: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    watch_retry: Duration,
    call_timeout: Duration,
}

/// State shared by the handles (readers) and the task (the one writer).
struct Shared {
    settings: Settings,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<()>,
}

impl Shared {
    fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        let mut next = Snapshot::clone(&self.snapshot.load());
        change(&mut next);
        self.snapshot.store(Arc::new(next));
        self.changes.send_replace(());
    }
}

#[derive(Debug, Clone, Default)]
struct Snapshot {
    token: Option<Token>,
    /// The last failure since the last token.
    error: Option<ClientError>,
    /// Set once, when the task ends.
    finished: Option<ClientError>,
    mode: Mode,
    reauth_due_at: Option<SystemTime>,
    connections: u64,
}

/// Extra metadata on every call to the broker.
#[derive(Clone)]
struct ExtraMetadata(Arc<Vec<(AsciiMetadataKey, AsciiMetadataValue)>>);

impl Interceptor for ExtraMetadata {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for (key, value) in self.0.iter() {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        Ok(request)
    }
}

type Client = TokenBrokerClient<InterceptedService<Channel, ExtraMetadata>>;

/// The background task: runs until a final error or cancellation, then
/// publishes why it ended (after its connection is closed).
async fn run(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut driver = Driver {
        shared: shared.clone(),
        next_endpoint: 0,
        failures: 0,
        streams_without_token: 0,
        poll_until: None,
    };
    let end = tokio::select! {
        end = driver.run() => end,
        () = cancel.cancelled() => ClientError::Closed,
    };
    drop(driver);
    match &end {
        ClientError::Closed => debug!("token source closed"),
        error => warn!(%error, "token source ended"),
    }
    shared.update(|s| {
        s.mode = match end {
            ClientError::Closed => Mode::Closed,
            _ => Mode::Ended,
        };
        s.token = None;
        s.finished = Some(end);
    });
}

enum WatchEnd {
    /// The broker will not stream to this caller: poll instead.
    Refused(ClientError),
    /// The stream failed or ended.
    Failed(ClientError),
}

struct Driver {
    shared: Arc<Shared>,
    next_endpoint: usize,
    /// Failures in a row, for the backoff.
    failures: u32,
    /// Streams in a row that failed before delivering a token.
    streams_without_token: u32,
    /// Polling instead of streaming until then.
    poll_until: Option<Instant>,
}

impl Driver {
    fn settings(&self) -> &Settings {
        &self.shared.settings
    }

    /// Connects, serves, reconnects after transient failures; returns the
    /// final error.
    async fn run(&mut self) -> ClientError {
        loop {
            let error = match self.connect().await {
                Ok(client) => self.serve(client).await,
                Err(error) => error,
            };
            if error.is_final() {
                return error;
            }
            self.failures = self.failures.saturating_add(1);
            let settings = self.settings();
            let backoff = timing::backoff(
                self.failures,
                settings.backoff_base,
                settings.backoff_cap,
                rand::random::<f64>(),
            );
            let wait = backoff.max(
                error
                    .retry_after()
                    .unwrap_or_default()
                    .min(settings.backoff_cap),
            );
            warn!(%error, retry_in_ms = wait.as_millis() as u64, "token source: broker call failed");
            self.record(error);
            self.shared.update(|s| s.mode = Mode::Connecting);
            sleep(wait).await;
        }
    }

    /// A new connection to the next endpoint.
    async fn connect(&mut self) -> Result<Client, ClientError> {
        let endpoints = &self.shared.settings.endpoints;
        let endpoint = &endpoints[self.next_endpoint % endpoints.len()];
        self.next_endpoint = self.next_endpoint.wrapping_add(1);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::transport("CONNECT", &e))?;
        debug!(endpoint = %endpoint.uri(), "token source connected");
        self.shared.update(|s| s.connections += 1);
        Ok(TokenBrokerClient::with_interceptor(
            channel,
            self.settings().metadata.clone(),
        ))
    }

    /// Streams (or polls) over one connection until it fails.
    async fn serve(&mut self, mut client: Client) -> ClientError {
        loop {
            if self.poll_until.is_some_and(|until| Instant::now() < until) {
                if let Err(error) = self.poll(&mut client).await {
                    return error;
                }
                self.poll_until = None;
                continue;
            }
            match self.watch(&mut client).await {
                WatchEnd::Refused(error) => {
                    info!(%error, "token source: no watch stream; polling GetAccessToken");
                    self.poll_until = Some(Instant::now() + self.settings().watch_retry);
                }
                WatchEnd::Failed(error) => return error,
            }
        }
    }

    async fn watch(&mut self, client: &mut Client) -> WatchEnd {
        let request = pb::WatchTokenRequest {
            session_id: self.settings().session_id.clone(),
        };
        let mut stream = match client.watch_token(request).await {
            Ok(answer) => answer.into_inner(),
            Err(status) => {
                let error = ClientError::from_status(&status);
                let refused = matches!(
                    status.code(),
                    Code::Unimplemented | Code::PermissionDenied | Code::ResourceExhausted
                );
                return if refused && !error.is_final() {
                    WatchEnd::Refused(error)
                } else {
                    self.stream_failed(error, false)
                };
            }
        };
        self.shared.update(|s| s.mode = Mode::Watching);
        let mut delivered = false;
        let mut probes_failed = 0u32;
        let mut probe_at = self.probe_at();
        loop {
            tokio::select! {
                message = stream.message() => {
                    let event = match message {
                        Ok(Some(message)) => message.event,
                        Ok(None) => {
                            let error = ClientError::Unavailable {
                                reason: "STREAM_ENDED".into(),
                                message: "the broker closed the watch stream without a final event".into(),
                                retry_after: None,
                            };
                            return self.stream_failed(error, delivered);
                        }
                        Err(status) => {
                            return self.stream_failed(ClientError::from_status(&status), delivered);
                        }
                    };
                    match event {
                        Some(Event::Token(token)) => match Token::from_pb(token) {
                            Ok(token) => {
                                delivered = true;
                                probes_failed = 0;
                                self.accept(token);
                                probe_at = self.probe_at();
                            }
                            Err(error) => return self.stream_failed(error, delivered),
                        },
                        Some(Event::ReauthWarning(warning)) => {
                            let due = warning.reauth_due_at.and_then(|t| SystemTime::try_from(t).ok());
                            warn!(?due, "the user must log in again soon");
                            self.shared.update(|s| s.reauth_due_at = due);
                        }
                        Some(Event::Ended(end)) => return WatchEnd::Failed(ended(&end)),
                        None => {}
                    }
                }
                () = sleep_until(probe_at) => {
                    // The held token reached its margin (or none came) and no
                    // newer one arrived: ask directly, which refreshes on
                    // demand or says why it cannot.
                    match self.get(client).await {
                        Ok(token) => {
                            probes_failed = 0;
                            self.accept(token);
                        }
                        Err(error) if error.is_final() => return WatchEnd::Failed(error),
                        Err(error) => {
                            probes_failed = probes_failed.saturating_add(1);
                            self.record(error);
                        }
                    }
                    let settings = self.settings();
                    let pause = timing::backoff(
                        probes_failed.max(1),
                        settings.backoff_base,
                        settings.backoff_cap,
                        rand::random::<f64>(),
                    );
                    probe_at = self.probe_at().max(Instant::now() + pause);
                }
            }
        }
    }

    /// A stream failed; three in a row without a token switch to polling.
    fn stream_failed(&mut self, error: ClientError, delivered: bool) -> WatchEnd {
        if delivered {
            self.streams_without_token = 0;
        } else {
            self.streams_without_token += 1;
            if self.streams_without_token >= FALLBACK_AFTER && !error.is_final() {
                self.streams_without_token = 0;
                info!(%error, "token source: streams keep failing; polling GetAccessToken for a while");
                self.poll_until = Some(Instant::now() + self.settings().watch_retry);
            }
        }
        WatchEnd::Failed(error)
    }

    /// Polls `GetAccessToken` until `poll_until`, or an error.
    async fn poll(&mut self, client: &mut Client) -> Result<(), ClientError> {
        self.shared.update(|s| s.mode = Mode::Polling);
        loop {
            let token = self.get(client).await?;
            let remaining = token.remaining();
            self.accept(token);
            let settings = self.settings();
            let delay = poll_delay(
                remaining,
                settings.min_ttl,
                settings.expiry_margin,
                settings.backoff_base,
                POLL_CEILING,
            );
            let until = self.poll_until.unwrap_or_else(Instant::now);
            let wake = Instant::now() + delay;
            if wake >= until {
                sleep_until(until).await;
                return Ok(());
            }
            sleep_until(wake).await;
        }
    }

    async fn get(&self, client: &mut Client) -> Result<Token, ClientError> {
        let settings = self.settings();
        let mut request = tonic::Request::new(pb::GetAccessTokenRequest {
            session_id: settings.session_id.clone(),
            min_ttl: Some(duration(settings.min_ttl)),
            force_refresh: false,
        });
        request.set_timeout(settings.call_timeout);
        let answer = client
            .get_access_token(request)
            .await
            .map_err(|status| ClientError::from_status(&status))?;
        let token = answer
            .into_inner()
            .token
            .ok_or_else(|| invalid_answer("an answer without a token".into()))?;
        Token::from_pb(token)
    }

    /// When to ask `GetAccessToken` while streaming: when the held token
    /// reaches its margin, or soon if none came.
    fn probe_at(&self) -> Instant {
        let margin = self.settings().expiry_margin;
        match &self.shared.snapshot.load().token {
            Some(token) => Instant::now() + token.remaining().saturating_sub(margin),
            None => Instant::now() + FIRST_TOKEN_PROBE,
        }
    }

    /// Holds `token` unless a newer generation is held and still usable.
    fn accept(&mut self, token: Token) {
        self.failures = 0;
        let margin = self.settings().expiry_margin;
        debug!(
            generation = token.generation(),
            "token source: token received"
        );
        self.shared.update(|s| {
            let newer = s.token.as_ref().is_none_or(|held| {
                token.generation() >= held.generation()
                    || !held.usable_at(SystemTime::now(), margin)
            });
            if newer {
                s.token = Some(token);
            }
            s.error = None;
        });
    }

    /// Remembers a failure for readers; a refusal of the caller also drops
    /// the held token (the broker no longer lets this caller have it).
    fn record(&self, error: ClientError) {
        self.shared.update(|s| {
            if matches!(error, ClientError::PermissionDenied { .. }) {
                s.token = None;
            }
            s.error = Some(error);
        });
    }
}

/// The final error a `SessionEnded` event stands for.
fn ended(end: &pb::SessionEnded) -> ClientError {
    use pb::session_ended::Reason;
    match Reason::try_from(end.reason) {
        Ok(Reason::ReauthenticationRequired) => ClientError::Reauthentication {
            description: end.description.clone(),
        },
        Ok(Reason::Deleted) => ClientError::SessionNotFound {
            description: "the session was deleted".into(),
        },
        _ => ClientError::SessionNotFound {
            description: format!(
                "the broker ended the session (reason {}): {}",
                end.reason, end.description
            ),
        },
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// When to poll `GetAccessToken` again after receiving a token with
/// `remaining` life: once less than `min_ttl` is left, the broker hands out
/// (or makes) a newer one, so ask just after that; a token shorter than
/// `min_ttl` (the provider grants no longer ones) is renewed halfway to its
/// margin. Never sooner than `floor`, never later than `ceiling`.
fn poll_delay(
    remaining: Duration,
    min_ttl: Duration,
    margin: Duration,
    floor: Duration,
    ceiling: Duration,
) -> Duration {
    let target = if remaining > min_ttl {
        remaining - min_ttl + floor
    } else {
        remaining.saturating_sub(margin) / 2
    };
    target.clamp(floor, ceiling.max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn poll_delay_asks_once_the_broker_would_refresh() {
        // (remaining, min_ttl, margin) → delay, with floor 200 ms, ceiling 60 s.
        let cases = [
            // A 30-minute token: capped at the ceiling.
            (1800 * S, 60 * S, 10 * S, 60 * S),
            // 90 s left, min_ttl 60 s: just after 30 s.
            (90 * S, 60 * S, 10 * S, 30 * S + 200 * MS),
            // Shorter than min_ttl: halfway to the margin.
            (50 * S, 60 * S, 10 * S, 20 * S),
            (3 * S, 60 * S, S, S),
            // At or inside the margin: the floor, never a tight loop.
            (10 * S, 60 * S, 10 * S, 200 * MS),
            (Duration::ZERO, 60 * S, 10 * S, 200 * MS),
        ];
        for (remaining, min_ttl, margin, expected) in cases {
            assert_eq!(
                poll_delay(remaining, min_ttl, margin, 200 * MS, 60 * S),
                expected,
                "remaining {remaining:?}, min_ttl {min_ttl:?}, margin {margin:?}"
            );
        }
    }

    fn pb_token(generation: u64, expires_in: Duration) -> pb::AccessToken {
        let at = SystemTime::now() + expires_in;
        pb::AccessToken {
            access_token: format!("secret-token-{generation}"),
            token_type: "bearer".into(),
            expires_at: Some(at.into()),
            scope: "openid".into(),
            generation,
        }
    }

    #[test]
    fn a_token_is_usable_only_outside_its_margin_and_debug_redacts_it() {
        let token = Token::from_pb(pb_token(3, 30 * S)).unwrap();
        let now = SystemTime::now();
        assert!(token.usable_at(now, 10 * S));
        assert!(!token.usable_at(now, 31 * S));
        assert!(!token.usable_at(now + 25 * S, 10 * S));
        let printed = format!("{token:?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(printed.contains("generation: 3"), "{printed}");
        let header = token.authorization().unwrap();
        assert!(header.is_sensitive());
        assert_eq!(header.to_str().unwrap(), "Bearer secret-token-3");
    }

    #[test]
    fn answers_that_are_not_bearer_tokens_are_refused() {
        let mut mac = pb_token(1, 30 * S);
        mac.token_type = "MAC".into();
        let mut no_expiry = pb_token(1, 30 * S);
        no_expiry.expires_at = None;
        let mut empty = pb_token(1, 30 * S);
        empty.access_token.clear();
        for answer in [mac, no_expiry, empty] {
            let error = Token::from_pb(answer).unwrap_err();
            assert!(
                matches!(&error, ClientError::Unavailable { reason, .. } if reason == "INVALID_ANSWER"),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_source_refuses_a_configuration_it_cannot_run_with() {
        let cases = [
            TokenSource::builder("alice"),
            TokenSource::builder("").endpoint("http://127.0.0.1:1"),
            TokenSource::builder("alice").endpoint("not a uri"),
            TokenSource::builder("alice")
                .endpoint("http://127.0.0.1:1")
                .min_ttl(S)
                .expiry_margin(S),
            TokenSource::builder("alice")
                .endpoint("http://127.0.0.1:1")
                .backoff(Duration::ZERO, S),
            TokenSource::builder("alice")
                .endpoint("http://127.0.0.1:1")
                .metadata("bad key", "v"),
        ];
        for builder in cases {
            let printed = format!("{builder:?}");
            let error = builder.build().unwrap_err();
            assert!(
                matches!(error, ClientError::Config { .. }),
                "{printed}: {error:?}"
            );
        }
    }

    #[test]
    fn building_outside_a_runtime_is_a_config_error() {
        let error = TokenSource::builder("alice")
            .endpoint("http://127.0.0.1:1")
            .build()
            .unwrap_err();
        assert!(
            matches!(&error, ClientError::Config { message } if message.contains("Tokio runtime")),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_reported_after_the_bounded_wait_and_close_ends_it() {
        // Port 1 on loopback: connection refused at once.
        let source = TokenSource::builder("alice")
            .endpoint("http://127.0.0.1:1")
            .backoff(10 * MS, 50 * MS)
            .build()
            .unwrap();
        let error = source.token_within(300 * MS).await.unwrap_err();
        assert!(
            matches!(&error, ClientError::Unavailable { reason, .. } if reason == "CONNECT" || reason == "NO_TOKEN_YET"),
            "{error:?}"
        );
        assert!(matches!(
            source.current(),
            Err(ClientError::Unavailable { .. })
        ));
        let clone = source.clone();
        source.close().await;
        assert_eq!(clone.status().mode, Mode::Closed);
        assert_eq!(clone.current().unwrap_err(), ClientError::Closed);
        assert_eq!(clone.token().await.unwrap_err(), ClientError::Closed);
        // Closing again (from another clone) returns at once.
        clone.close().await;
    }
}
