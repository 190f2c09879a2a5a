//! Crash safety of a real `tokenbroker serve` process: it is killed with
//! SIGKILL many times, at random moments, while refreshes run against the dev
//! IdP, and restarted on the same data directory each time.
//!
//! What must hold (DESIGN §3, §5):
//! - nothing committed is lost: every session survives every restart (never
//!   `NOT_FOUND`), and a generation handed to a caller is never undone;
//! - no refresh token is presented after a newer one was persisted: the IdP
//!   never sees a replay (`Stale token`), and each of its stale presentations
//!   is the single re-presentation of the stored token after an answer that
//!   the kill lost;
//! - with revoke-refresh-token off, or max reuse 1, every session survives;
//!   with max reuse 0 every session ends either alive or cleanly in
//!   `REAUTH_REQUIRED`, which then costs no IdP call (no retry loop).
//!
//! The IdP's counters make this checkable. `G` = refresh tokens the IdP issued
//! for a session (its family `generation`), `P` = refreshes the broker
//! persisted (its `generation`), so `G - P` = rotations whose answer a kill
//! lost. Every such loss makes the broker's next presentation of that session
//! a stale one (the stored token is presented once more), and a persisted
//! refresh brings it back in step; so once a final refresh has landed,
//! `stale_presentations == G - P` exactly. A broker that presented a token
//! whose successor it had persisted would add a stale presentation without a
//! lost rotation.
//!
//! Between a kill and the next start the test waits until the IdP has been
//! quiet for 100 ms: a request the dead process sent is processed (or not)
//! before the new process presents anything. (An IdP that held such a request
//! back and processed it after the new process had rotated the token would
//! see a replay no client can prevent.) At the end, one more kill and restart
//! checks that the outcome itself is durable.
//!
//! Each scenario prints its seed and its numbers (`--nocapture`); `CRASH_SEED=<n>` replays the same random
//! choices (the timing of the processes is not reproducible).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{Serve, ServeCommand, connect};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenbroker::devidp::{
    DevIdp, FamilyState, FamilyStats, Fault, FaultAction, LoginTokens, RealmSettings,
};
use tokenbroker::pb;
use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

/// Sessions per scenario.
const SESSIONS: usize = 16;
/// Kill/restart rounds per scenario.
const ROUNDS: usize = 16;
/// Concurrent callers while the broker runs.
const DRIVERS: usize = 4;
/// Bound of one whole scenario.
const SCENARIO_LIMIT: Duration = Duration::from_secs(80);
/// Bound of one gRPC call: far above any answer of a live broker (the longest
/// injected delay is 300 ms), so a call that hits it is hung, not slow.
const CALL_LIMIT: Duration = Duration::from_secs(8);

/// The dev IdP's `error_description` for a reuse over the budget.
const REUSE_EXCEEDED: &str = "Maximum allowed refresh token reuse exceeded";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Keycloak's default: any unexpired token of a live session works.
    RevokeOff,
    /// Revoke refresh token on, max reuse 1: one re-presentation is allowed.
    ReuseOne,
    /// Revoke refresh token on, max reuse 0: any re-presentation ends the session.
    Strict,
}

impl Mode {
    fn realm(self) -> RealmSettings {
        let (revoke, reuse) = match self {
            Mode::RevokeOff => (false, 0),
            Mode::ReuseOne => (true, 1),
            Mode::Strict => (true, 0),
        };
        // Access tokens keep the default 30 min: every refresh in the run is
        // one a caller asked for (forced, or a `min_ttl` above what is left),
        // none happens in the background while counters are read.
        RealmSettings {
            revoke_refresh_token: revoke,
            refresh_token_max_reuse: reuse,
            ..RealmSettings::default()
        }
    }

    /// Whether a session may end in `REAUTH_REQUIRED`.
    fn may_lose_sessions(self) -> bool {
        self == Mode::Strict
    }

    /// Whether every session gets one successful refresh after each restart,
    /// before the next kill. With max reuse 1 the IdP accepts the stored token
    /// once more, not twice: if the re-presentation after a kill were lost to
    /// the next kill too, no client could keep the session. So this mode
    /// settles every in-doubt refresh before the next kill; the other modes
    /// kill at any time, also during the first refreshes after a start.
    fn settles_after_restart(self) -> bool {
        self == Mode::ReuseOne
    }

    fn seed_offset(self) -> u64 {
        match self {
            Mode::RevokeOff => 1,
            Mode::ReuseOne => 2,
            Mode::Strict => 3,
        }
    }
}

fn session_id(i: usize) -> String {
    format!("crash-{i:02}")
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap(),
        nanos: i32::try_from(d.subsec_nanos()).unwrap(),
    }
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

fn is_reauth(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition && reason(status) == "REAUTHENTICATION_REQUIRED"
}

/// What the callers saw.
#[derive(Debug, Default)]
struct Tally {
    tokens: u64,
    /// Tolerated errors by `code/reason`.
    errors: BTreeMap<String, u64>,
    /// Answers that break the contract.
    violations: Vec<String>,
}

/// State shared by the scenario and its caller tasks.
struct Shared {
    mode: Mode,
    /// Per session, the highest generation any caller was handed: it was
    /// persisted before it was handed out, so no restart may go below it.
    handed_out: Vec<AtomicU64>,
    /// Per session, the IdP's count of its presentations when a restart
    /// first found it in `REAUTH_REQUIRED`: it must never grow after that.
    ended_at_presentations: Mutex<Vec<Option<u64>>>,
    tally: Mutex<Tally>,
}

impl Shared {
    fn record(&self, session: usize, result: Result<pb::AccessToken, tonic::Status>) {
        let mut tally = self.tally.lock().unwrap();
        match result {
            Ok(token) => {
                tally.tokens += 1;
                self.handed_out[session].fetch_max(token.generation, SeqCst);
            }
            Err(status) => {
                let tolerated = match status.code() {
                    // The broker was killed under the call, or was not up yet.
                    Code::Unavailable | Code::Unknown | Code::Cancelled => true,
                    Code::FailedPrecondition => is_reauth(&status) && self.mode.may_lose_sessions(),
                    _ => false,
                };
                if tolerated {
                    *tally
                        .errors
                        .entry(format!("{:?}/{}", status.code(), reason(&status)))
                        .or_default() += 1;
                } else {
                    tally
                        .violations
                        .push(format!("{}: {status:?}", session_id(session)));
                }
            }
        }
    }
}

async fn get_token(
    client: &mut TokenBrokerClient<Channel>,
    session: usize,
    force: bool,
    min_ttl: Option<Duration>,
) -> Result<pb::AccessToken, tonic::Status> {
    let call = client.get_access_token(pb::GetAccessTokenRequest {
        session_id: session_id(session),
        min_ttl: min_ttl.map(duration),
        force_refresh: force,
    });
    match timeout(CALL_LIMIT, call).await {
        Ok(answer) => answer.map(|r| r.into_inner().token.expect("a token")),
        Err(_) => Err(tonic::Status::deadline_exceeded("call hung")),
    }
}

async fn get_session(
    client: &mut TokenBrokerClient<Channel>,
    session: usize,
) -> Result<pb::Session, tonic::Status> {
    let call = client.get_session(pb::GetSessionRequest {
        session_id: session_id(session),
    });
    match timeout(CALL_LIMIT, call).await {
        Ok(answer) => answer.map(|r| r.into_inner().session.expect("a session")),
        Err(_) => Err(tonic::Status::deadline_exceeded("call hung")),
    }
}

/// One caller: forced and plain `GetAccessToken` over random sessions until
/// stopped. Plain calls ask for a random `min_ttl` up to the access token's
/// whole life, so some of them refresh on demand (and share a flight).
async fn caller(
    mut client: TokenBrokerClient<Channel>,
    shared: Arc<Shared>,
    mut rng: StdRng,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let session = rng.random_range(0..SESSIONS);
        let force = rng.random_bool(0.5);
        let min_ttl = (!force).then(|| Duration::from_secs(rng.random_range(1..=1800)));
        let result = get_token(&mut client, session, force, min_ttl).await;
        shared.record(session, result);
        sleep(Duration::from_millis(rng.random_range(0..10))).await;
    }
}

/// Waits until the IdP has no token request in flight: a request that the
/// killed process sent is processed (or not) before the next process starts,
/// as when a restart takes longer than the IdP's answer. (A request held back
/// longer would race with the new process, which no client can order.)
async fn settle_idp(idp: &DevIdp) {
    // A request is counted once the IdP has read it: wait for a quiet spell
    // (no new request for 100 ms) with nothing in flight.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = idp.stats().token_requests;
    loop {
        sleep(Duration::from_millis(100)).await;
        let stats = idp.stats();
        if stats.in_flight == 0 && stats.token_requests == seen {
            return;
        }
        seen = stats.token_requests;
        assert!(
            Instant::now() < deadline,
            "IdP requests still in flight after 10 s: {stats:?}"
        );
    }
}

/// Numbers of one scenario, for the log.
#[derive(Debug, Default)]
struct Report {
    kills: u64,
    /// Kills while the IdP had token requests in flight.
    kills_mid_request: u64,
    /// Kills during start-up (before the process served).
    startup_kills: u64,
    rounds_with_delay: u64,
    /// Σ (IdP-issued − broker-persisted) rotations: answers lost to kills.
    lost_rotations: u64,
    /// The most rotations one kill lost.
    max_lost_per_kill: u64,
    stale_presentations: u64,
    reuses_allowed: u64,
    reauth_sessions: u64,
    token_requests: u64,
    tokens_handed_out: u64,
    tolerated_errors: BTreeMap<String, u64>,
    elapsed: Duration,
}

struct Scenario {
    rng: StdRng,
    idp: DevIdp,
    token_url: String,
    dir: tempfile::TempDir,
    starts: usize,
    report: Report,
}

impl Scenario {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) -> Serve {
        self.starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("serve-{:03}.log", self.starts));
        ServeCommand::new(&self.token_url, log)
            .arg("--data-dir")
            .arg(self.data_dir())
            .spawn()
    }

    /// Starts a process that serves, sometimes after killing one or two
    /// attempts during start-up (store open, migrations, loading sessions).
    async fn start(&mut self) -> (Serve, TokenBrokerClient<Channel>) {
        while self.rng.random_bool(0.15) {
            let mut serve = self.spawn();
            sleep(Duration::from_millis(self.rng.random_range(0..60))).await;
            serve.kill().await;
            self.report.startup_kills += 1;
        }
        let mut serve = self.spawn();
        let addr = serve.serving_addr().await;
        let client = connect(addr).await;
        (serve, client)
    }
}

async fn run(mode: Mode) -> Report {
    let base_seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("crash {mode:?}: CRASH_SEED={base_seed}");
    let started = Instant::now();

    let idp_shutdown = CancellationToken::new();
    let running_idp = tokenbroker::devidp::DevIdp::start(
        mode.realm(),
        "127.0.0.1:0".parse().unwrap(),
        idp_shutdown.clone(),
    )
    .await
    .expect("dev IdP starts");
    let mut s = Scenario {
        rng: StdRng::seed_from_u64(base_seed.wrapping_add(mode.seed_offset())),
        idp: running_idp.idp.clone(),
        token_url: running_idp.token_url(),
        dir: tempfile::tempdir().expect("a temporary directory"),
        starts: 0,
        report: Report::default(),
    };
    let shared = Arc::new(Shared {
        mode,
        handed_out: (0..SESSIONS).map(|_| AtomicU64::new(0)).collect(),
        ended_at_presentations: Mutex::new(vec![None; SESSIONS]),
        tally: Mutex::new(Tally::default()),
    });

    // First start: a new data directory (its key file is generated), no kill.
    let mut serve = s.spawn();
    let addr = serve.serving_addr().await;
    let mut client = connect(addr).await;
    let mut logins: Vec<LoginTokens> = Vec::new();
    for i in 0..SESSIONS {
        let login = s.idp.login(&format!("user-{i:02}"));
        let answer = timeout(
            CALL_LIMIT,
            client.register_session(pb::RegisterSessionRequest {
                session_id: session_id(i),
                refresh_token: login.refresh_token.clone(),
                ..Default::default()
            }),
        )
        .await
        .expect("registration in time")
        .expect("registration succeeds")
        .into_inner();
        let session = answer.session.expect("a session");
        assert_eq!(session.generation, 1, "registration refreshed once");
        shared.handed_out[i].store(1, SeqCst);
        logins.push(login);
    }

    for round in 0..ROUNDS {
        if mode.settles_after_restart() {
            settle_sessions(&mut client, &shared).await;
        }
        if s.rng.random_bool(0.7) {
            // Hold the next few token requests at the IdP, so that the kill
            // is likely to land while they are in flight.
            let ms = s.rng.random_range(100..=300);
            let times = s.rng.random_range(1..=3);
            s.idp
                .push_fault(Fault::times(FaultAction::Delay { ms }, times));
            s.report.rounds_with_delay += 1;
        }
        let stop = CancellationToken::new();
        let mut callers = tokio::task::JoinSet::new();
        for _ in 0..DRIVERS {
            let rng = StdRng::seed_from_u64(s.rng.random());
            callers.spawn(caller(client.clone(), shared.clone(), rng, stop.clone()));
        }
        sleep(Duration::from_millis(s.rng.random_range(50..=400))).await;
        serve.kill().await;
        s.report.kills += 1;
        if s.idp.stats().in_flight > 0 {
            s.report.kills_mid_request += 1;
        }
        stop.cancel();
        timeout(Duration::from_secs(20), async {
            while let Some(joined) = callers.join_next().await {
                joined.expect("caller task");
            }
        })
        .await
        .expect("callers stop in time");
        settle_idp(&s.idp).await;
        s.idp.clear_faults();

        (serve, client) = s.start().await;
        let lost = check_restored(&mut client, &shared, &s.idp, &logins, round).await;
        // A kill costs at most the refreshes in flight: one per caller.
        let lost_now = lost - s.report.lost_rotations;
        assert!(
            lost_now <= DRIVERS as u64,
            "round {round}: one kill lost {lost_now} rotations, with {DRIVERS} callers"
        );
        s.report.max_lost_per_kill = s.report.max_lost_per_kill.max(lost_now);
        s.report.lost_rotations = lost;
    }

    // Final: no faults, the last restart done. Every session is there; each
    // live one refreshes once more (which also settles a refresh the last kill
    // left in doubt), then the counters must add up.
    let mut finals = Vec::new();
    for (i, login) in logins.iter().enumerate() {
        let before = get_session(&mut client, i)
            .await
            .unwrap_or_else(|e| panic!("{} after the last restart: {e:?}", session_id(i)));
        if before.state == pb::SessionState::Active as i32 {
            match get_token(&mut client, i, true, None).await {
                Ok(token) => {
                    shared.handed_out[i].fetch_max(token.generation, SeqCst);
                }
                Err(status) if is_reauth(&status) && mode.may_lose_sessions() => {}
                Err(status) => panic!("{}: final forced refresh: {status:?}", session_id(i)),
            }
        }
        settle_idp(&s.idp).await;
        let after = get_session(&mut client, i).await.expect("session");
        let family = s.idp.family(&login.session_state).expect("family");
        finals.push((i, after, family));
    }

    let tally = std::mem::take(&mut *shared.tally.lock().unwrap());
    assert!(
        tally.violations.is_empty(),
        "{mode:?}: calls broke the contract: {:#?}",
        tally.violations
    );
    let lost_at_last_restart = std::mem::take(&mut s.report.lost_rotations);
    let mut expected = Vec::new();
    for (i, session, family) in &finals {
        let ended_at = shared.ended_at_presentations.lock().unwrap()[*i];
        let generation = check_final(
            mode,
            &mut client,
            &s.idp,
            *i,
            session,
            family,
            s.report.kills + s.report.startup_kills,
            shared.handed_out[*i].load(SeqCst),
            ended_at,
        )
        .await;
        expected.push((session.state, generation));
        let lost = family.generation - session.generation;
        s.report.lost_rotations += lost;
        s.report.stale_presentations += family.stale_presentations;
        s.report.reuses_allowed += family.reuses_allowed;
        if session.state == pb::SessionState::ReauthRequired as i32 {
            s.report.reauth_sessions += 1;
        }
    }
    assert_eq!(
        s.report.lost_rotations, lost_at_last_restart,
        "{mode:?}: rotations were lost without a kill"
    );
    let stats = s.idp.stats();
    assert_eq!(stats.replays_rejected, 0, "{mode:?}: {stats:?}");
    s.report.token_requests = stats.token_requests;
    s.report.tokens_handed_out = tally.tokens;
    s.report.tolerated_errors = tally.errors;

    // The run must have exercised the risk: kills that lost rotations.
    assert!(
        s.report.lost_rotations > 0,
        "{mode:?}: no kill landed between the IdP's rotation and the broker's commit; \
         the test proved nothing: {:#?}",
        s.report
    );

    // One more kill and restart with nothing in flight: the outcome is
    // durable — live sessions at the generation handed out last, ended ones
    // still ended, and answered without an IdP call.
    serve.kill().await;
    s.report.kills += 1;
    settle_idp(&s.idp).await;
    let requests = s.idp.stats().token_requests;
    let mut serve = s.spawn();
    let mut client = connect(serve.serving_addr().await).await;
    for (i, (state, generation)) in expected.into_iter().enumerate() {
        let session = get_session(&mut client, i).await.expect("session");
        assert_eq!(
            (session.state, session.generation),
            (state, generation),
            "{mode:?}: {} changed across a restart: {session:?}",
            session_id(i)
        );
        if state == pb::SessionState::ReauthRequired as i32 {
            let status = get_token(&mut client, i, false, None)
                .await
                .expect_err("still ended");
            assert!(is_reauth(&status), "{status:?}");
        }
    }
    assert_eq!(
        s.idp.stats().token_requests,
        requests,
        "{mode:?}: an ended session was presented again after a restart"
    );

    serve.kill().await;
    idp_shutdown.cancel();
    running_idp.shutdown().await;
    s.report.elapsed = started.elapsed();
    s.report
}

/// With max reuse 1: one successful refresh of every session before the next
/// kill (see [`Mode::settles_after_restart`]).
async fn settle_sessions(client: &mut TokenBrokerClient<Channel>, shared: &Shared) {
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let mut client = client.clone();
        calls.spawn(async move { (i, get_token(&mut client, i, true, None).await) });
    }
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.expect("settle task");
        let token =
            result.unwrap_or_else(|e| panic!("{}: refresh after restart: {e:?}", session_id(i)));
        shared.handed_out[i].fetch_max(token.generation, SeqCst);
    }
}

/// After a restart: every session is there, and none went back behind a
/// generation that was handed out before the kill. Returns the rotations lost
/// so far, Σ (IdP generation − broker generation).
async fn check_restored(
    client: &mut TokenBrokerClient<Channel>,
    shared: &Shared,
    idp: &DevIdp,
    logins: &[LoginTokens],
    round: usize,
) -> u64 {
    let mut lost = 0;
    for (i, login) in logins.iter().enumerate() {
        let session = get_session(client, i).await.unwrap_or_else(|e| {
            panic!(
                "round {round}: {} after restart: {e:?} (a session vanished?)",
                session_id(i)
            )
        });
        let handed_out = shared.handed_out[i].load(SeqCst);
        assert!(
            session.generation >= handed_out,
            "round {round}: {} restored at generation {} but generation {handed_out} had \
             been handed out: a committed refresh was lost",
            session_id(i),
            session.generation
        );
        if !shared.mode.may_lose_sessions() {
            assert_eq!(
                session.state,
                pb::SessionState::Active as i32,
                "round {round}: {session:?}"
            );
        }
        let family = idp.family(&login.session_state).expect("family");
        if session.state == pb::SessionState::ReauthRequired as i32 {
            // Ended durably: no later process presents its token again.
            let mut ended = shared.ended_at_presentations.lock().unwrap();
            let first = *ended[i].get_or_insert(family.presentations);
            assert_eq!(
                family.presentations, first,
                "round {round}: an ended session was presented again: {family:?}"
            );
        } else {
            assert!(
                shared.ended_at_presentations.lock().unwrap()[i].is_none(),
                "round {round}: an ended session came back: {session:?}"
            );
        }
        assert!(
            family.generation >= session.generation,
            "round {round}: the broker is ahead of the IdP: {session:?}\n{family:?}"
        );
        lost += family.generation - session.generation;
    }
    lost
}

#[allow(clippy::too_many_arguments)]
async fn check_final(
    mode: Mode,
    client: &mut TokenBrokerClient<Channel>,
    idp: &DevIdp,
    i: usize,
    session: &pb::Session,
    family: &FamilyStats,
    kills: u64,
    handed_out: u64,
    ended_at_presentations: Option<u64>,
) -> u64 {
    let id = session_id(i);
    let g = family.generation;
    let p = session.generation;
    let context = format!("{mode:?} {id}: broker {session:?}\nIdP {family:?}");
    assert!(p >= handed_out, "{context}\nhanded out {handed_out}");
    assert!(
        g >= p,
        "the broker persisted more than the IdP issued: {context}"
    );
    assert_eq!(
        family.replays_rejected, 0,
        "a replay reached the IdP: {context}"
    );
    assert!(
        family.stale_presentations <= kills,
        "more stale presentations than kills ({kills}): {context}"
    );
    assert!(
        family.max_in_flight <= 1,
        "two presentations of one session at once: {context}"
    );
    let active = session.state == pb::SessionState::Active as i32;
    if active {
        assert_eq!(family.state, FamilyState::Active, "{context}");
        // The final refresh landed: every lost rotation was followed by exactly
        // one stale presentation, and there was no other.
        assert_eq!(
            family.stale_presentations,
            g - p,
            "stale presentations other than one per lost answer: {context}"
        );
        match mode {
            Mode::RevokeOff => assert_eq!(family.reuses_allowed, 0, "{context}"),
            Mode::ReuseOne => assert_eq!(
                family.reuses_allowed, family.stale_presentations,
                "{context}"
            ),
            Mode::Strict => assert_eq!(
                family.stale_presentations, 0,
                "a live session with max reuse 0 was never re-presented: {context}"
            ),
        }
        let token = get_token(client, i, true, None)
            .await
            .unwrap_or_else(|e| panic!("a live session refreshes: {e:?}\n{context}"));
        assert_eq!(token.generation, p + 1, "{context}");
        p + 1
    } else {
        assert!(
            mode.may_lose_sessions(),
            "a session was lost with {mode:?}: {context}"
        );
        assert_eq!(
            session.state,
            pb::SessionState::ReauthRequired as i32,
            "{context}"
        );
        // It ended because the stored token was presented once more after a
        // rotation lost to a kill — never by a replay.
        assert_eq!(family.state, FamilyState::ReuseExceeded, "{context}");
        assert!(g > p, "ended without a lost rotation: {context}");
        assert!(family.stale_presentations >= 1, "{context}");
        assert!(
            family
                .rejected_by_reason
                .get(REUSE_EXCEEDED)
                .is_some_and(|n| *n >= 1),
            "{context}"
        );
        // Terminal: answered without calling the IdP (no retry loop).
        let presented = family.presentations;
        if let Some(ended_at) = ended_at_presentations {
            assert_eq!(presented, ended_at, "presented after it ended: {context}");
        }
        let requests = idp.stats().token_requests;
        for force in [false, true] {
            let status = get_token(client, i, force, None)
                .await
                .expect_err("a re-authentication error");
            assert!(is_reauth(&status), "{status:?}\n{context}");
        }
        let after = idp.family(&family.session_state).unwrap();
        assert_eq!(after.presentations, presented, "{context}");
        assert_eq!(idp.stats().token_requests, requests, "{context}");
        p
    }
}

async fn scenario(mode: Mode) {
    let report = timeout(SCENARIO_LIMIT, run(mode))
        .await
        .unwrap_or_else(|_| panic!("{mode:?}: scenario exceeded {SCENARIO_LIMIT:?}"));
    eprintln!("crash {mode:?}: {report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_with_revoke_refresh_token_off_keep_every_session() {
    scenario(Mode::RevokeOff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_with_max_reuse_one_keep_every_session() {
    scenario(Mode::ReuseOne).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_with_max_reuse_zero_end_sessions_only_cleanly() {
    scenario(Mode::Strict).await;
}
