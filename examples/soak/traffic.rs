//! The traffic of a soak run and what it records: registrations, the
//! `GetAccessToken` load, watch streams, churn, the canary, abuse, the IdP
//! sampler and the broker monitor. Every task is spawned on one tracker and
//! stops with a cancellation token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokenbroker::devidp::{DevIdp, LoginTokens};
use tokenbroker::pb;
use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokenbroker::pb::watch_token_response::Event;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

use super::cluster::{self, Brokers, CALLER, Database, PgProxy, STRANGER};
use super::{Opts, progress};

/// How long a watch event may take from the broker's check to the soak.
const WATCH_DELIVERY_SLACK: Duration = Duration::from_secs(1);
/// Load connections per replica.
const LOAD_CHANNELS: usize = 4;
/// Watch streams per connection of their home replica (the broker allows
/// 200 HTTP/2 streams per connection; a replica also takes the streams of
/// one that died).
const STREAMS_PER_CHANNEL: usize = 50;
/// Bound of one call of the traffic (the server also gets it as a deadline).
const CALL_LIMIT: Duration = Duration::from_secs(8);

/// A session the run registered: its id, the IdP family and user behind it.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub family: String,
    pub user: String,
}

/// What the run believes about a session registered or deleted during the
/// run (canaries and churn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Registered (the call said so): must exist at the end.
    Present,
    /// The registration failed: it may or may not exist.
    MaybeRegistered,
    /// Deleted (the call said so): must be gone.
    Deleted,
    /// The deletion failed: it may or may not exist.
    MaybeDeleted,
}

/// A session registered during the run.
#[derive(Debug, Clone)]
pub struct Extra {
    pub session: Session,
    pub role: &'static str,
    pub expect: Expect,
}

/// Outcome counts by `CODE/REASON`.
#[derive(Debug, Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, key: impl Into<String>) {
        *self.0.lock().unwrap().entry(key.into()).or_default() += 1;
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap().clone()
    }
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }
}

/// Successes and failures per replica per 100 ms.
#[derive(Debug, Default)]
pub struct Timeline(Mutex<Vec<Vec<[u32; 2]>>>);

impl Timeline {
    pub fn record(&self, replica: usize, at: Duration, ok: bool) {
        let bucket = (at.as_millis() / 100) as usize;
        let mut all = self.0.lock().unwrap();
        if all.len() <= replica {
            all.resize(replica + 1, Vec::new());
        }
        let row = &mut all[replica];
        if row.len() <= bucket {
            row.resize(bucket + 1, [0, 0]);
        }
        row[bucket][usize::from(!ok)] += 1;
    }
    /// (ok, failed) summed over replicas, per 100 ms.
    pub fn merged(&self) -> Vec<[u32; 2]> {
        let all = self.0.lock().unwrap();
        let len = all.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = vec![[0u32, 0u32]; len];
        for row in all.iter() {
            for (i, cell) in row.iter().enumerate() {
                out[i][0] += cell[0];
                out[i][1] += cell[1];
            }
        }
        out
    }
    /// The first 100 ms bucket at or after `from` in which `replica` served a call.
    pub fn first_ok(&self, replica: usize, from: Duration) -> Option<Duration> {
        let all = self.0.lock().unwrap();
        let row = all.get(replica)?;
        let start = (from.as_millis() / 100) as usize;
        (start..row.len())
            .find(|&i| row[i][0] > 0)
            .map(|i| Duration::from_millis(i as u64 * 100))
    }
}

/// How late the soak's own runtime runs: a ticker's lateness over the last
/// two seconds. A token received at `t` left the broker no later than about
/// `t - lag` (the soak, not the broker, was slow in between).
#[derive(Debug, Default)]
pub struct Lag(
    Mutex<std::collections::VecDeque<(Instant, Duration)>>,
    Mutex<Duration>,
);

impl Lag {
    pub fn record(&self, late: Duration) {
        let now = Instant::now();
        {
            let mut max = self.1.lock().unwrap();
            *max = (*max).max(late);
        }
        let mut samples = self.0.lock().unwrap();
        samples.push_back((now, late));
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > Duration::from_secs(2))
        {
            samples.pop_front();
        }
    }
    /// The most the soak ever ran late.
    pub fn max_seen(&self) -> Duration {
        *self.1.lock().unwrap()
    }
    pub fn recent(&self) -> Duration {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, late)| *late)
            .max()
            .unwrap_or_default()
    }
}

/// When a token arrived, and what the call asked for.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    /// When the call was sent (not for watch streams): the broker answered later.
    pub asked_at: Option<SystemTime>,
    /// The `min_ttl` a `GetAccessToken` asked for (not forced).
    pub min_ttl: Option<Duration>,
    /// When the soak saw the token.
    pub received: SystemTime,
    /// The soak's own lateness then ([`Lag::recent`]).
    pub lag: Duration,
}

/// Checks of every token a caller or watcher received, against its own
/// `exp` claim (the dev IdP and the soak share the machine's clock).
#[derive(Debug, Default)]
pub struct TokenChecks {
    pub received: AtomicU64,
    /// Expired when the broker sent it: `exp` not after the receipt less
    /// the soak's own lateness.
    pub expired: AtomicU64,
    /// A `GetAccessToken` served with less than the `min_ttl` it asked for
    /// (`exp` before the call was sent plus `min_ttl`: the broker answered
    /// later, so it had even less).
    pub short: AtomicU64,
    /// Received after `exp`, the soak's own delays included (reported only).
    pub expired_on_arrival: AtomicU64,
    /// `expires_at` later than the JWT's `exp`: the broker believed a token
    /// valid longer than it is.
    pub beyond_exp: AtomicU64,
    /// No readable `exp` claim.
    pub unreadable: AtomicU64,
    /// The least time left at receipt, in ms.
    pub least_left_ms: Mutex<Option<i64>>,
    pub examples: Mutex<Vec<String>>,
}

/// The `exp` claim of a JWT (no signature check: the soak is not the audience).
pub fn jwt_exp(token: &str) -> Option<u64> {
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    json.get("exp")?.as_u64()
}

fn millis_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

impl TokenChecks {
    pub fn check(&self, what: &str, session: &str, token: &pb::AccessToken, receipt: Receipt) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let Some(exp) = jwt_exp(&token.access_token) else {
            self.unreadable.fetch_add(1, Ordering::Relaxed);
            self.example(format!(
                "{what} {session}: a token without a readable exp claim"
            ));
            return;
        };
        let exp_at = UNIX_EPOCH + Duration::from_secs(exp);
        let left_ms = millis_between(receipt.received, exp_at);
        {
            let mut least = self.least_left_ms.lock().unwrap();
            *least = Some(least.map_or(left_ms, |l| l.min(left_ms)));
        }
        if left_ms <= 0 {
            self.expired_on_arrival.fetch_add(1, Ordering::Relaxed);
        }
        // A watch event has no request to bound when it was sent: the broker
        // checks a token is unexpired just before sending it, and a loaded
        // broker may take a while to flush it; a second is allowed for that.
        let slack = if receipt.asked_at.is_none() {
            WATCH_DELIVERY_SLACK
        } else {
            Duration::ZERO
        };
        let sent_by = receipt.received - receipt.lag - slack;
        if exp_at <= sent_by {
            self.expired.fetch_add(1, Ordering::Relaxed);
            self.example(format!(
                "{what} {session}: generation {} received {} ms after its exp (the soak ran up \
                 to {} ms late)",
                token.generation,
                -left_ms,
                receipt.lag.as_millis()
            ));
        }
        if let (Some(asked_at), Some(min_ttl)) = (receipt.asked_at, receipt.min_ttl)
            && exp_at < asked_at + min_ttl
        {
            self.short.fetch_add(1, Ordering::Relaxed);
            self.example(format!(
                "{what} {session}: generation {} had {} ms left when asked for, below the \
                 min_ttl of {} ms",
                token.generation,
                millis_between(asked_at, exp_at),
                min_ttl.as_millis()
            ));
        }
        if let Some(at) = &token.expires_at {
            let (secs, nanos) = (at.seconds, at.nanos);
            if secs > exp as i64 || (secs == exp as i64 && nanos > 0) {
                self.beyond_exp.fetch_add(1, Ordering::Relaxed);
                let over = (secs - exp as i64) as f64 + f64::from(nanos) / 1e9;
                self.example(format!(
                    "{what} {session}: generation {} has expires_at {over:.3} s after its exp claim",
                    token.generation
                ));
            }
        }
    }

    fn example(&self, text: String) {
        let mut examples = self.examples.lock().unwrap();
        if examples.len() < 8 {
            examples.push(text);
        }
    }
}

/// What one watcher saw.
#[derive(Debug)]
pub struct Watcher {
    /// Which watcher (spreads them over the connections).
    pub index: usize,
    /// Index into `Run::base`.
    pub session: usize,
    pub home: usize,
    pub last_generation: AtomicU64,
    pub tokens: AtomicU64,
    pub streams: AtomicU64,
    pub open: AtomicBool,
    /// Intermediate generations never delivered (allowed: a stream carries
    /// the latest token, not a backlog).
    pub skipped: AtomicU64,
    /// A generation not newer than the previous one on the same stream.
    pub regressions: AtomicU64,
    /// After a reconnect, a first token older than one already seen (a
    /// lagging replica; reported, not an invariant).
    pub older_after_reconnect: AtomicU64,
    pub warnings: AtomicU64,
    /// Streams that closed without an `ended` event or an error status.
    pub closed_silently: AtomicU64,
    /// The terminal event, if one came: its reason.
    pub ended: Mutex<Option<String>>,
}

/// Everything the tasks of a run share.
pub struct Run {
    pub opts: Opts,
    /// Logs, configs and data.
    pub work: std::path::PathBuf,
    t0: OnceLock<Instant>,
    pub idp: DevIdp,
    pub channels: Vec<Vec<Channel>>,
    pub watch_channels: Vec<Vec<Channel>>,
    pub brokers: Mutex<Brokers>,
    pub database: Option<Database>,
    pub proxy: Option<PgProxy>,
    /// Sessions registered at the start (the load's and the watchers').
    pub base: Vec<Session>,
    pub extra: Mutex<Vec<Extra>>,
    pub watchers: Vec<Arc<Watcher>>,
    pub min_ttl: Duration,
    // What the traffic recorded.
    pub load: Tally,
    pub load_shed: AtomicU64,
    pub watch_errors: Tally,
    pub churn: Tally,
    pub canary: Tally,
    pub abuse: Tally,
    pub abuse_unexpected: Tally,
    pub timeline: Timeline,
    pub tokens: TokenChecks,
    pub lag: Lag,
    /// When the canary's forced refresh succeeded.
    pub canary_ok: Mutex<Vec<Duration>>,
    pub canary_session: Mutex<usize>,
    /// (time, IdP token requests) every 100 ms.
    pub idp_samples: Mutex<Vec<(Duration, u64)>>,
    /// Broken invariants seen while running (a broker exiting unasked).
    pub incidents: Mutex<Vec<String>>,
    /// Sessions the schedule ended at the IdP, and users it disabled.
    pub ended_at_idp: Mutex<Vec<String>>,
}

impl Run {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opts: Opts,
        work: &std::path::Path,
        idp: DevIdp,
        addrs: &[SocketAddr],
        base: Vec<Session>,
        brokers: Brokers,
        database: Option<Database>,
        proxy: Option<PgProxy>,
    ) -> Self {
        let replicas = addrs.len();
        let channels = load_channels(addrs);
        let per_replica = opts.watchers.div_ceil(replicas);
        let watch_channels = addrs
            .iter()
            .map(|&a| {
                (0..per_replica.div_ceil(STREAMS_PER_CHANNEL).max(1))
                    .map(|_| cluster::channel(a))
                    .collect()
            })
            .collect();
        let watchers = (0..opts.watchers)
            .map(|w| {
                Arc::new(Watcher {
                    index: w,
                    // Spread over the id space, so the load touches them too.
                    session: w * opts.sessions / opts.watchers.max(1),
                    home: w % replicas,
                    last_generation: AtomicU64::new(0),
                    tokens: AtomicU64::new(0),
                    streams: AtomicU64::new(0),
                    open: AtomicBool::new(false),
                    skipped: AtomicU64::new(0),
                    regressions: AtomicU64::new(0),
                    older_after_reconnect: AtomicU64::new(0),
                    warnings: AtomicU64::new(0),
                    closed_silently: AtomicU64::new(0),
                    ended: Mutex::new(None),
                })
            })
            .collect();
        let min_ttl = Duration::from_secs((opts.access_lifetime / 5).max(1));
        Self {
            opts,
            work: work.to_path_buf(),
            t0: OnceLock::new(),
            idp,
            channels,
            watch_channels,
            brokers: Mutex::new(brokers),
            database,
            proxy,
            base,
            extra: Mutex::new(Vec::new()),
            watchers,
            min_ttl,
            load: Tally::default(),
            load_shed: AtomicU64::new(0),
            watch_errors: Tally::default(),
            churn: Tally::default(),
            canary: Tally::default(),
            abuse: Tally::default(),
            abuse_unexpected: Tally::default(),
            timeline: Timeline::default(),
            tokens: TokenChecks::default(),
            lag: Lag::default(),
            canary_ok: Mutex::new(Vec::new()),
            canary_session: Mutex::new(0),
            idp_samples: Mutex::new(Vec::new()),
            incidents: Mutex::new(Vec::new()),
            ended_at_idp: Mutex::new(Vec::new()),
        }
    }

    /// Starts the run's clock (after set-up).
    pub fn start_clock(&self) {
        let _ = self.t0.set(Instant::now());
    }

    /// The start of the run (set-up before it is not counted).
    pub fn t0(&self) -> Instant {
        *self.t0.get_or_init(Instant::now)
    }

    pub fn now(&self) -> Duration {
        self.t0().elapsed()
    }

    pub fn replicas(&self) -> usize {
        self.channels.len()
    }

    pub fn channel(&self, replica: usize, k: usize) -> Channel {
        let row = &self.channels[replica % self.channels.len()];
        row[k % row.len()].clone()
    }

    pub fn client(&self, replica: usize, k: usize) -> TokenBrokerClient<Channel> {
        TokenBrokerClient::new(self.channel(replica, k)).max_decoding_message_size(1 << 20)
    }

    /// A client on one of `replica`'s watch connections, for watcher `w`.
    fn watch_client(&self, replica: usize, w: usize) -> TokenBrokerClient<Channel> {
        let row = &self.watch_channels[replica % self.watch_channels.len()];
        TokenBrokerClient::new(row[(w / self.replicas()) % row.len()].clone())
    }

    /// A receipt of a token seen now.
    pub fn receipt(&self, asked_at: Option<SystemTime>, min_ttl: Option<Duration>) -> Receipt {
        Receipt {
            asked_at,
            min_ttl,
            received: SystemTime::now(),
            lag: self.lag.recent(),
        }
    }

    pub fn incident(&self, text: String) {
        progress(self.t0(), format!("INCIDENT: {text}"));
        self.incidents.lock().unwrap().push(text);
    }

    pub fn session_by_id(&self, id: &str) -> Option<Session> {
        if let Some(i) = id
            .strip_prefix("soak/u")
            .and_then(|n| n.parse::<usize>().ok())
        {
            return self.base.get(i).cloned();
        }
        self.extra
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.session.id == id)
            .map(|e| e.session.clone())
    }
}

/// A request carrying the load's identity and a deadline.
pub fn request<T>(message: T, caller: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(caller) = caller {
        request
            .metadata_mut()
            .insert("l5d-client-id", caller.parse().unwrap());
    }
    request.set_timeout(CALL_LIMIT);
    request
}

/// `CODE/REASON` of a failed call; `CODE/transport` when the broker did not
/// answer (no `ErrorInfo`: connection refused or reset).
pub fn describe(status: &tonic::Status) -> String {
    let code = code_name(status.code());
    match status.get_details_error_info() {
        Some(info) => format!("{code}/{}", info.reason),
        None if matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) =>
        {
            format!("{code}/transport")
        }
        None => format!("{code}/-"),
    }
}

/// Whether the broker never answered (the call may go to another replica).
pub fn is_transport(status: &tonic::Status) -> bool {
    status.get_details_error_info().is_none()
        && matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        )
}

/// gRPC's name of a code (`UNAVAILABLE`).
pub fn code_name(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// A call bounded on the client side too (a broker that ignores the deadline
/// is reported as `HUNG`).
async fn bounded<T>(
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CALL_LIMIT + Duration::from_secs(4), call).await {
        Ok(answer) => answer.map(tonic::Response::into_inner),
        Err(_) => Err(tonic::Status::deadline_exceeded("HUNG: no answer")),
    }
}

/// The registration of a fresh login. With `with_access`, the login's access
/// token goes along (`expires_in` as the login answered it) and no refresh
/// is needed; without, the broker validates the refresh token by refreshing.
pub fn registration(
    id: &str,
    login: &LoginTokens,
    with_access: bool,
    role: &str,
) -> pb::RegisterSessionRequest {
    let mut request = pb::RegisterSessionRequest {
        session_id: id.to_owned(),
        refresh_token: login.refresh_token.clone(),
        refresh_expires_in: Some(pb_duration(Duration::from_secs(login.refresh_expires_in))),
        labels: [("soak".to_owned(), role.to_owned())].into(),
        ..Default::default()
    };
    if with_access {
        request.access_token = login.access_token.clone();
        request.expires_in = Some(pb_duration(Duration::from_secs(login.expires_in)));
        request.scope = login.scope.clone();
    }
    request
}

/// The load's connections: a few per replica.
pub fn load_channels(addrs: &[SocketAddr]) -> Vec<Vec<Channel>> {
    addrs
        .iter()
        .map(|&a| (0..LOAD_CHANNELS).map(|_| cluster::channel(a)).collect())
        .collect()
}

/// Registers one session, retrying what a busy broker answers at set-up.
async fn register_one(
    channels: &[Vec<Channel>],
    replica: usize,
    id: &str,
    login: &LoginTokens,
    with_access: bool,
    role: &str,
) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..20 {
        let row = &channels[(replica + attempt) % channels.len()];
        let mut client = TokenBrokerClient::new(row[attempt % row.len()].clone());
        let call = client.register_session(request(
            registration(id, login, with_access, role),
            Some(CALLER),
        ));
        match bounded(call).await {
            Ok(_) => return Ok(()),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
                ) =>
            {
                last = format!("{}: {}", describe(&status), status.message());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => {
                return Err(format!("{id}: {}: {}", describe(&status), status.message()));
            }
        }
    }
    Err(format!("{id}: {last}"))
}

/// Logs every base user in at the IdP and registers the session at once
/// (as a login flow would; one in ten without its access token, so the
/// broker refreshes it first), 32 at a time over the replicas.
pub async fn register_base(
    opts: &Opts,
    idp: &DevIdp,
    channels: &[Vec<Channel>],
) -> Result<Vec<Session>, String> {
    let next = Arc::new(AtomicUsize::new(0));
    let sessions: Arc<Mutex<Vec<Option<Session>>>> =
        Arc::new(Mutex::new(vec![None; opts.sessions]));
    let channels = Arc::new(channels.to_vec());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (idp, next, sessions, channels) = (
            idp.clone(),
            next.clone(),
            sessions.clone(),
            channels.clone(),
        );
        let n = opts.sessions;
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), String>(());
                }
                let user = format!("soak-user-{i}");
                let login = idp.login(&user);
                let session = Session {
                    id: format!("soak/u{i:06}"),
                    family: login.session_state.clone(),
                    user,
                };
                register_one(&channels, i, &session.id, &login, i % 10 != 3, "base").await?;
                sessions.lock().unwrap()[i] = Some(session);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    let sessions = sessions.lock().unwrap().drain(..).flatten().collect();
    Ok(sessions)
}

/// Registers a new canary session (the previous one may have been ended by
/// the IdP) and makes it current.
pub async fn new_canary(run: &Run) -> Result<(), String> {
    let n = run
        .extra
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.role == "canary")
        .count();
    let session = Session {
        id: format!("soak/canary-{n}"),
        family: String::new(),
        user: format!("soak-canary-{n}"),
    };
    let login = run.idp.login(&session.user);
    let session = Session {
        family: login.session_state.clone(),
        ..session
    };
    let index = {
        let mut extra = run.extra.lock().unwrap();
        extra.push(Extra {
            session: session.clone(),
            role: "canary",
            expect: Expect::MaybeRegistered,
        });
        extra.len() - 1
    };
    register_one(&run.channels, n, &session.id, &login, true, "canary").await?;
    run.extra.lock().unwrap()[index].expect = Expect::Present;
    *run.canary_session.lock().unwrap() = index;
    Ok(())
}

/// Starts every task of the run: the load, churn, canary and abuse on
/// `traffic` (stopped by `stop_traffic`, awaited before the final checks,
/// so that nothing changes a session while it is checked); the watchers,
/// the IdP sampler and the broker monitor on `watch` (stopped by
/// `stop_watch` after the final checks).
pub fn spawn_all(
    run: &Arc<Run>,
    traffic: &TaskTracker,
    stop_traffic: &CancellationToken,
    watch: &TaskTracker,
    stop_watch: &CancellationToken,
) {
    traffic.spawn(load(run.clone(), traffic.clone(), stop_traffic.clone()));
    traffic.spawn(churn(run.clone(), stop_traffic.clone()));
    traffic.spawn(canary(run.clone(), stop_traffic.clone()));
    traffic.spawn(abuse(run.clone(), stop_traffic.clone()));
    watch.spawn(sampler(run.clone(), stop_watch.clone()));
    watch.spawn(monitor(run.clone(), stop_watch.clone()));
    watch.spawn(lag_monitor(run.clone(), stop_watch.clone()));
    for watcher in &run.watchers {
        watch.spawn(watch_one(run.clone(), watcher.clone(), stop_watch.clone()));
    }
}

/// `GetAccessToken` at `--rate` per second on sessions picked uniformly,
/// replicas taken in turn; a call the broker never answered (a killed
/// replica) goes once to the next replica, as a mesh would retry it.
async fn load(run: Arc<Run>, tracker: TaskTracker, stop: CancellationToken) {
    let per_tick = run.opts.rate / 100.0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let in_flight = Arc::new(Semaphore::new(2048));
    let mut rng = StdRng::seed_from_u64(run.opts.seed ^ 0x10ad);
    let mut owed = 0.0;
    let mut next = 0usize;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        owed += per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                run.load_shed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let session = rng.random_range(0..run.base.len());
            next += 1;
            let (run, replica) = (run.clone(), next);
            tracker.spawn(async move {
                get_once(&run, session, replica).await;
                drop(permit);
            });
        }
    }
}

async fn get_once(run: &Run, session: usize, replica: usize) {
    let id = &run.base[session].id;
    let tries = if run.replicas() > 1 { 2 } else { 1 };
    for attempt in 0..tries {
        let r = (replica + attempt) % run.replicas();
        let mut client = run.client(r, replica / run.replicas());
        let call = client.get_access_token(request(
            pb::GetAccessTokenRequest {
                session_id: id.clone(),
                min_ttl: Some(pb_duration(run.min_ttl)),
                force_refresh: false,
            },
            Some(CALLER),
        ));
        let asked_at = SystemTime::now();
        let answer = bounded(call).await;
        let at = run.now();
        match answer {
            Ok(answer) => {
                if let Some(token) = &answer.token {
                    let receipt = run.receipt(Some(asked_at), Some(run.min_ttl));
                    run.tokens.check("GetAccessToken", id, token, receipt);
                }
                run.load.add("OK");
                run.timeline.record(r, at, true);
                return;
            }
            Err(status) => {
                run.load.add(describe(&status));
                // REAUTHENTICATION_REQUIRED is the contract's answer for a
                // session the IdP ended, not a symptom of a fault.
                let answered = status.code() == Code::FailedPrecondition;
                run.timeline.record(r, at, answered);
                if !is_transport(&status) {
                    return;
                }
            }
        }
    }
}

/// One `WatchToken` stream on one session, reopened (on the next replica in
/// HA) whenever it fails, until the session ends or the run stops.
async fn watch_one(run: Arc<Run>, w: Arc<Watcher>, stop: CancellationToken) {
    let id = run.base[w.session].id.clone();
    let mut replica = w.home;
    let mut opened_before = false;
    while !stop.is_cancelled() {
        let mut client = run.watch_client(replica, w.index);
        let mut open = tonic::Request::new(pb::WatchTokenRequest {
            session_id: id.clone(),
        });
        open.metadata_mut()
            .insert("l5d-client-id", CALLER.parse().unwrap());
        let opened = tokio::select! {
            () = stop.cancelled() => return,
            opened = tokio::time::timeout(CALL_LIMIT, client.watch_token(open)) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                run.watch_errors.add(format!("open: {}", describe(&status)));
                if status.code() == Code::FailedPrecondition {
                    *w.ended.lock().unwrap() = Some("REAUTHENTICATION_REQUIRED (at open)".into());
                    return;
                }
                pause(&stop, Duration::from_millis(300)).await;
                replica = (replica + 1) % run.replicas();
                continue;
            }
            Err(_) => {
                run.watch_errors.add("open: HUNG");
                replica = (replica + 1) % run.replicas();
                continue;
            }
        };
        w.streams.fetch_add(1, Ordering::Relaxed);
        w.open.store(true, Ordering::Relaxed);
        let mut last_on_stream = 0u64;
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return,
                message = stream.message() => message,
            };
            match message {
                Ok(Some(message)) => match message.event {
                    Some(Event::Token(token)) => {
                        let receipt = run.receipt(None, None);
                        run.tokens.check("WatchToken", &id, &token, receipt);
                        w.tokens.fetch_add(1, Ordering::Relaxed);
                        let g = token.generation;
                        if last_on_stream > 0 && g <= last_on_stream {
                            w.regressions.fetch_add(1, Ordering::Relaxed);
                        }
                        let before = w.last_generation.fetch_max(g, Ordering::Relaxed);
                        if last_on_stream == 0 && opened_before && g < before {
                            w.older_after_reconnect.fetch_add(1, Ordering::Relaxed);
                        }
                        if before > 0 && g > before + 1 {
                            w.skipped.fetch_add(g - before - 1, Ordering::Relaxed);
                        }
                        last_on_stream = g;
                    }
                    Some(Event::ReauthWarning(_)) => {
                        w.warnings.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Event::Ended(ended)) => {
                        let reason = pb::session_ended::Reason::try_from(ended.reason)
                            .map_or_else(|_| "UNKNOWN".to_owned(), |r| r.as_str_name().to_owned());
                        *w.ended.lock().unwrap() = Some(reason);
                        w.open.store(false, Ordering::Relaxed);
                        return;
                    }
                    None => {}
                },
                Ok(None) => {
                    w.closed_silently.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(status) => {
                    run.watch_errors
                        .add(format!("stream: {}", describe(&status)));
                    break;
                }
            }
        }
        w.open.store(false, Ordering::Relaxed);
        opened_before = true;
        pause(&stop, Duration::from_millis(200)).await;
        if run.replicas() > 1 {
            replica = (replica + 1) % run.replicas();
        }
    }
}

async fn pause(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(d) => {}
    }
}

/// Every second a new session (odd ones with their access token, even ones
/// refreshed at registration) asked for once; every third second the oldest
/// churned session still registered is deleted.
async fn churn(run: Arc<Run>, stop: CancellationToken) {
    let mut k = 0usize;
    loop {
        pause(&stop, Duration::from_secs(1)).await;
        if stop.is_cancelled() {
            return;
        }
        k += 1;
        let user = format!("soak-churn-{k}");
        let login = run.idp.login(&user);
        let session = Session {
            id: format!("soak/churn-{k}"),
            family: login.session_state.clone(),
            user,
        };
        let index = {
            let mut extra = run.extra.lock().unwrap();
            extra.push(Extra {
                session: session.clone(),
                role: "churn",
                expect: Expect::MaybeRegistered,
            });
            extra.len() - 1
        };
        let mut client = run.client(k, k);
        let call = client.register_session(request(
            registration(&session.id, &login, k % 2 == 1, "churn"),
            Some(CALLER),
        ));
        match bounded(call).await {
            Ok(_) => {
                run.churn.add("RegisterSession OK");
                run.extra.lock().unwrap()[index].expect = Expect::Present;
                let call = client.get_access_token(request(
                    pb::GetAccessTokenRequest {
                        session_id: session.id.clone(),
                        min_ttl: Some(pb_duration(run.min_ttl)),
                        force_refresh: false,
                    },
                    Some(CALLER),
                ));
                let asked_at = SystemTime::now();
                match bounded(call).await {
                    Ok(answer) => {
                        run.churn.add("GetAccessToken OK");
                        if let Some(token) = &answer.token {
                            let receipt = run.receipt(Some(asked_at), Some(run.min_ttl));
                            run.tokens
                                .check("GetAccessToken", &session.id, token, receipt);
                        }
                    }
                    Err(status) => run
                        .churn
                        .add(format!("GetAccessToken {}", describe(&status))),
                }
            }
            Err(status) => run
                .churn
                .add(format!("RegisterSession {}", describe(&status))),
        }
        if k.is_multiple_of(3) {
            let victim = {
                let extra = run.extra.lock().unwrap();
                extra
                    .iter()
                    .position(|e| e.role == "churn" && e.expect == Expect::Present)
            };
            if let Some(victim) = victim {
                let id = run.extra.lock().unwrap()[victim].session.id.clone();
                let call = client.delete_session(request(
                    pb::DeleteSessionRequest {
                        session_id: id.clone(),
                    },
                    Some(CALLER),
                ));
                let expect = match bounded(call).await {
                    Ok(_) => {
                        run.churn.add("DeleteSession OK");
                        Expect::Deleted
                    }
                    Err(status) => {
                        run.churn
                            .add(format!("DeleteSession {}", describe(&status)));
                        Expect::MaybeDeleted
                    }
                };
                run.extra.lock().unwrap()[victim].expect = expect;
            }
        }
    }
}

/// Every 250 ms a forced refresh of the canary session, replicas in turn:
/// its successes time the recovery after each fault. A canary the IdP ended
/// (a lost answer with max reuse 0) is replaced by a new one.
async fn canary(run: Arc<Run>, stop: CancellationToken) {
    let mut tick = 0usize;
    loop {
        pause(&stop, Duration::from_millis(250)).await;
        if stop.is_cancelled() {
            return;
        }
        tick += 1;
        let index = *run.canary_session.lock().unwrap();
        let id = run.extra.lock().unwrap()[index].session.id.clone();
        let mut client = run.client(tick, tick);
        let call = client.get_access_token(request(
            pb::GetAccessTokenRequest {
                session_id: id.clone(),
                min_ttl: None,
                force_refresh: true,
            },
            Some(CALLER),
        ));
        let asked_at = SystemTime::now();
        match bounded(call).await {
            Ok(answer) => {
                run.canary.add("OK");
                run.canary_ok.lock().unwrap().push(run.now());
                if let Some(token) = &answer.token {
                    let receipt = run.receipt(Some(asked_at), None);
                    run.tokens
                        .check("GetAccessToken (forced)", &id, token, receipt);
                }
            }
            Err(status) => {
                run.canary.add(describe(&status));
                if status.code() == Code::FailedPrecondition
                    && let Err(e) = new_canary(&run).await
                {
                    run.canary.add(format!("new canary failed: {e}"));
                }
            }
        }
    }
}

/// Samples the IdP's token request counter every 100 ms.
async fn sampler(run: Arc<Run>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let requests = run.idp.stats().token_requests;
        run.idp_samples.lock().unwrap().push((run.now(), requests));
    }
}

/// Measures how late the soak's own runtime runs (a 50 ms ticker).
async fn lag_monitor(run: Arc<Run>, stop: CancellationToken) {
    loop {
        let started = Instant::now();
        pause(&stop, Duration::from_millis(50)).await;
        if stop.is_cancelled() {
            return;
        }
        run.lag
            .record(started.elapsed().saturating_sub(Duration::from_millis(50)));
    }
}

/// Notices a broker that exits without the soak killing it.
async fn monitor(run: Arc<Run>, stop: CancellationToken) {
    loop {
        pause(&stop, Duration::from_millis(500)).await;
        if stop.is_cancelled() {
            return;
        }
        let exited = run.brokers.lock().unwrap().reap_unexpected();
        for (name, status) in exited {
            run.incident(format!("broker {name} exited unasked: {status}"));
        }
    }
}

// ---------------------------------------------------------------- abuse

/// What an abusive call may be answered with.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// This code (and reason); with `field`, a BadRequest naming it.
    Code(Code, &'static str, Option<&'static str>),
    /// A session lookup that misses: NOT_FOUND, or in HA while the
    /// database is down, UNAVAILABLE/STORE_UNAVAILABLE (the miss is looked up in it).
    Missing,
    /// A message over 16 × max_message_bytes: refused unread.
    Refused,
    /// Raw garbage: any gRPC status, as long as one comes.
    AnyStatus,
}

const ABUSE_CASES: usize = 17;

/// Ten abusive calls a second, cases in a seeded random order; each answer
/// is checked against what the contract promises.
async fn abuse(run: Arc<Run>, stop: CancellationToken) {
    let mut rng = StdRng::seed_from_u64(run.opts.seed ^ 0xab05e);
    let mut n = 0usize;
    loop {
        pause(&stop, Duration::from_millis(100)).await;
        if stop.is_cancelled() {
            return;
        }
        n += 1;
        let case = rng.random_range(0..ABUSE_CASES);
        let replica = n % run.replicas();
        let (name, want, answer) = abuse_case(&run, case, replica, &mut rng).await;
        let key = match &answer {
            Ok(()) => "OK".to_owned(),
            Err(status) => describe(status),
        };
        run.abuse.add(format!("{name}: {key}"));
        let fine = match (&answer, want) {
            // The broker was down (killed by the schedule): not an answer.
            (Err(status), _) if is_transport(status) => true,
            (Ok(()), Want::AnyStatus) => true,
            (Ok(()), _) => false,
            (Err(status), Want::AnyStatus) => !status.message().starts_with("HUNG"),
            (Err(status), Want::Refused) => {
                matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted)
            }
            (Err(status), Want::Missing) => {
                let reason = status
                    .get_details_error_info()
                    .map(|i| i.reason)
                    .unwrap_or_default();
                (status.code() == Code::NotFound && reason == "SESSION_NOT_FOUND")
                    || (run.replicas() > 1
                        && status.code() == Code::Unavailable
                        && reason == "STORE_UNAVAILABLE")
            }
            // In HA a lookup or a registration may need the database: while
            // it is cut (or its pool is exhausted) that is the contract's
            // answer. Validation and identity come first and never need it.
            (Err(status), Want::Code(code, _, _))
                if run.replicas() > 1
                    && !matches!(code, Code::InvalidArgument | Code::Unauthenticated)
                    && status.code() == Code::Unavailable
                    && status
                        .get_details_error_info()
                        .is_some_and(|i| i.reason == "STORE_UNAVAILABLE") =>
            {
                true
            }
            (Err(status), Want::Code(code, reason, field)) => {
                let info = status.get_details_error_info().map(|i| i.reason);
                let field_ok = field.is_none_or(|field| {
                    status
                        .get_details_bad_request()
                        .is_some_and(|bad| bad.field_violations.iter().any(|v| v.field == field))
                });
                status.code() == code && info.as_deref() == Some(reason) && field_ok
            }
        };
        if !fine {
            run.abuse_unexpected.add(format!(
                "{name}: answered {key} ({}) instead of {want:?}",
                answer.as_ref().err().map_or("", |s| s.message())
            ));
        }
    }
}

/// One abusive call of kind `case`.
async fn abuse_case(
    run: &Run,
    case: usize,
    replica: usize,
    rng: &mut StdRng,
) -> (&'static str, Want, Result<(), tonic::Status>) {
    use Want::Code as W;
    let mut client = run.client(replica, case);
    let real = run.base[rng.random_range(0..run.base.len())].id.clone();
    let get = |id: String, min_ttl: Option<prost_types::Duration>| pb::GetAccessTokenRequest {
        session_id: id,
        min_ttl,
        force_refresh: false,
    };
    let invalid = W(Code::InvalidArgument, "INVALID_ARGUMENT", None);
    let unauthenticated = W(Code::Unauthenticated, "CALLER_UNAUTHENTICATED", None);
    macro_rules! call {
        ($future:expr) => {
            bounded($future).await.map(|_| ())
        };
    }
    match case {
        0 => (
            "GetAccessToken without identity",
            unauthenticated,
            call!(client.get_access_token(request(get(real, None), None))),
        ),
        1 => (
            "GetAccessToken with a malformed identity",
            unauthenticated,
            call!(client.get_access_token(request(get(real, None), Some("Not_A.DNS name!")))),
        ),
        2 => (
            "GetAccessToken by a caller the policy ignores",
            Want::Missing,
            call!(client.get_access_token(request(get(real, None), Some(STRANGER)))),
        ),
        3 => (
            "GetAccessToken of an unknown session",
            Want::Missing,
            call!(client.get_access_token(request(
                get(format!("soak/nobody-{}", rng.random::<u32>()), None),
                Some(CALLER)
            ))),
        ),
        4 => {
            let id = match rng.random_range(0..4) {
                0 => String::new(),
                1 => "x".repeat(129),
                2 => "spaces are not allowed".to_owned(),
                _ => "ünïcödé/\u{0}".to_owned(),
            };
            (
                "GetAccessToken with an invalid id",
                W(
                    Code::InvalidArgument,
                    "INVALID_ARGUMENT",
                    Some("session_id"),
                ),
                call!(client.get_access_token(request(get(id, None), Some(CALLER)))),
            )
        }
        5 => {
            let ttl = if rng.random() {
                prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }
            } else {
                prost_types::Duration {
                    seconds: 25 * 3600,
                    nanos: 0,
                }
            };
            (
                "GetAccessToken with a bad min_ttl",
                W(Code::InvalidArgument, "INVALID_ARGUMENT", Some("min_ttl")),
                call!(client.get_access_token(request(get(real, Some(ttl)), Some(CALLER)))),
            )
        }
        6 => {
            let mut registration = pb::RegisterSessionRequest {
                session_id: format!("soak/abuse-{}", rng.random::<u32>()),
                refresh_token: "r".repeat(20_000),
                ..Default::default()
            };
            let field = match rng.random_range(0..3) {
                0 => "refresh_token",
                1 => {
                    registration.refresh_token = "has spaces in it".into();
                    "refresh_token"
                }
                _ => {
                    registration.refresh_token = "a-printable-token".into();
                    registration.labels = (0..40).map(|i| (format!("k{i}"), "v".into())).collect();
                    "labels"
                }
            };
            (
                "RegisterSession with a bad token or labels",
                W(Code::InvalidArgument, "INVALID_ARGUMENT", Some(field)),
                call!(client.register_session(request(registration, Some(CALLER)))),
            )
        }
        7 => (
            "RegisterSession of 100 KiB (over max_message_bytes)",
            W(Code::InvalidArgument, "INVALID_ARGUMENT", Some("request")),
            call!(client.register_session(request(
                pb::RegisterSessionRequest {
                    session_id: format!("soak/abuse-{}", rng.random::<u32>()),
                    refresh_token: "r".repeat(100 * 1024),
                    ..Default::default()
                },
                Some(CALLER)
            ))),
        ),
        8 => (
            "RegisterSession of 2 MiB (over 16 x max_message_bytes)",
            Want::Refused,
            call!(client.register_session(request(
                pb::RegisterSessionRequest {
                    session_id: "soak/abuse-huge".into(),
                    refresh_token: "r".repeat(2 << 20),
                    ..Default::default()
                },
                Some(CALLER)
            ))),
        ),
        9 => (
            "RegisterSession over a taken id with another token",
            W(Code::AlreadyExists, "SESSION_EXISTS", None),
            call!(client.register_session(request(
                pb::RegisterSessionRequest {
                    session_id: real,
                    refresh_token: format!("not-the-registered-token-{}", rng.random::<u64>()),
                    access_token: "an-access-token".into(),
                    ..Default::default()
                },
                Some(CALLER)
            ))),
        ),
        10 => (
            "RegisterSession by a caller the policy ignores",
            W(Code::PermissionDenied, "CALLER_NOT_ALLOWED", None),
            call!(client.register_session(request(
                pb::RegisterSessionRequest {
                    session_id: format!("soak/stranger-{}", rng.random::<u32>()),
                    refresh_token: "a-stranger-token".into(),
                    access_token: "an-access-token".into(),
                    ..Default::default()
                },
                Some(STRANGER)
            ))),
        ),
        11 => (
            "DeleteSession by a caller the policy ignores",
            Want::Missing,
            call!(client.delete_session(request(
                pb::DeleteSessionRequest { session_id: real },
                Some(STRANGER)
            ))),
        ),
        12 => {
            let answer = bounded(client.watch_token(request(
                pb::WatchTokenRequest {
                    session_id: format!("soak/nobody-{}", rng.random::<u32>()),
                },
                Some(CALLER),
            )))
            .await;
            (
                "WatchToken of an unknown session",
                Want::Missing,
                answer.map(|_| ()),
            )
        }
        13 => {
            let answer = bounded(
                client.watch_token(request(pb::WatchTokenRequest { session_id: real }, None)),
            )
            .await;
            (
                "WatchToken without identity",
                unauthenticated,
                answer.map(|_| ()),
            )
        }
        14 => {
            let query = if rng.random() {
                pb::ListSessionsRequest {
                    page_size: 5000,
                    ..Default::default()
                }
            } else {
                pb::ListSessionsRequest {
                    page_token: "not a token!".into(),
                    ..Default::default()
                }
            };
            (
                "ListSessions with a bad page",
                invalid,
                call!(client.list_sessions(request(query, Some(CALLER)))),
            )
        }
        15 => (
            "GetSession of an unknown session",
            Want::Missing,
            call!(client.get_session(request(
                pb::GetSessionRequest {
                    session_id: format!("soak/nobody-{}", rng.random::<u32>()),
                },
                Some(CALLER)
            ))),
        ),
        _ => (
            "raw garbage gRPC frame",
            Want::AnyStatus,
            raw_frame(run.channel(replica, case), rng).await,
        ),
    }
}

/// Sends a unary call whose body is garbage (random bytes, a frame whose
/// length lies, a compressed flag without an encoding, a mutated valid
/// request, two messages) to a random method; `Err(status)` with the gRPC
/// status the server answered, `Ok` for OK.
pub async fn raw_frame(channel: Channel, rng: &mut StdRng) -> Result<(), tonic::Status> {
    use axum::body::HttpBody as _;
    use tonic::codegen::Service as _;

    let methods = [
        "GetAccessToken",
        "RegisterSession",
        "GetSession",
        "ListSessions",
        "DeleteSession",
        "NoSuchMethod",
    ];
    let method = methods[rng.random_range(0..methods.len())];
    let frame = |flag: u8, declared: u32, payload: &[u8]| {
        let mut out = vec![flag];
        out.extend_from_slice(&declared.to_be_bytes());
        out.extend_from_slice(payload);
        out
    };
    let random =
        |rng: &mut StdRng, n: usize| (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>();
    let body = match rng.random_range(0..6) {
        0 => {
            let n = rng.random_range(0..40);
            random(rng, n)
        }
        1 => {
            let n = rng.random_range(0..200);
            let payload = random(rng, n);
            frame(0, payload.len() as u32, &payload)
        }
        2 => {
            let n = rng.random_range(0..50);
            let payload = random(rng, n);
            frame(
                0,
                payload.len() as u32 + rng.random_range(1..1000),
                &payload,
            )
        }
        3 => {
            let payload = random(rng, 20);
            frame(1, 20, &payload)
        }
        4 => {
            // A valid GetSessionRequest with bits flipped. Its id is none
            // of the load's: it goes to any method (DeleteSession too) with
            // the real caller's identity, and one flipped bit turns
            // "soak/u000001" into another real session's id ("u000021").
            let mut payload = prost::Message::encode_to_vec(&pb::GetSessionRequest {
                session_id: "soak/mutant-000001".into(),
            });
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..payload.len());
                payload[i] ^= 1 << rng.random_range(0..8);
            }
            frame(0, payload.len() as u32, &payload)
        }
        _ => {
            let payload = random(rng, 8);
            let mut two = frame(0, 8, &payload);
            two.extend(frame(0, 8, &payload));
            two
        }
    };
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("/tokenbroker.v1.TokenBroker/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("l5d-client-id", CALLER)
        .body(tonic::body::Body::new(axum::body::Body::from(body)))
        .unwrap();
    let mut service = channel;
    let exchange = async move {
        std::future::poll_fn(|cx| service.poll_ready(cx))
            .await
            .map_err(|e| tonic::Status::unavailable(format!("transport: {e}")))?;
        let response = service
            .call(request)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("transport: {e}")))?;
        let (parts, mut body) = response.into_parts();
        let mut status = parts.headers.get("grpc-status").cloned();
        let mut message = parts.headers.get("grpc-message").cloned();
        let mut read = 0usize;
        while status.is_none() {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
            match frame {
                None => break,
                Some(Err(e)) => return Err(tonic::Status::unavailable(format!("transport: {e}"))),
                Some(Ok(frame)) => match frame.into_trailers() {
                    Ok(trailers) => {
                        status = trailers.get("grpc-status").cloned();
                        message = trailers.get("grpc-message").cloned();
                    }
                    Err(frame) => {
                        read += frame.into_data().map_or(0, |d| d.len());
                        if read > 1 << 20 {
                            break;
                        }
                    }
                },
            }
        }
        let code = status
            .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
            .ok_or_else(|| {
                tonic::Status::unknown(format!("HUNG: HTTP {} without a grpc-status", parts.status))
            })?;
        let message = message
            .and_then(|v| v.to_str().ok().map(str::to_owned))
            .unwrap_or_default();
        match Code::from_i32(code) {
            Code::Ok => Ok(()),
            code => Err(tonic::Status::new(code, message)),
        }
    };
    match tokio::time::timeout(CALL_LIMIT, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(tonic::Status::deadline_exceeded("HUNG: no answer")),
    }
}
