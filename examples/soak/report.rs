//! The end of a run: every session asked, every watcher checked against the
//! session's final generation, the IdP's counters read; then one table and
//! the exit status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokenbroker::devidp::IdpStats;
use tokenbroker::pb;
use tonic::Code;

use super::cluster::{self, CALLER};
use super::faults::Record;
use super::traffic::{Expect, Run, Session, describe, request};
use super::{Mode, progress};

/// How a session answered at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Active, and served a token valid for at least a second.
    Served,
    /// REAUTH_REQUIRED (by GetSession or by GetAccessToken).
    Reauth,
    /// NOT_FOUND.
    Absent,
    /// Anything else: active but no token within a minute, errors.
    Broken(String),
}

/// What the verification found.
#[derive(Debug)]
pub struct Report {
    pub records: Vec<Record>,
    pub load_end: Duration,
    pub checked: usize,
    pub served: usize,
    /// Sessions that should exist and do not, or exist and cannot serve.
    pub lost: Vec<String>,
    /// Sessions deleted (the call said so) that exist again.
    pub came_back: Vec<String>,
    /// REAUTH_REQUIRED sessions, by the IdP's rejection reasons.
    pub reauth_by_reason: BTreeMap<String, u64>,
    /// REAUTH_REQUIRED sessions whose family the IdP never rejected.
    pub reauth_unexplained: Vec<String>,
    pub watch_checked: usize,
    pub watch_missed: Vec<String>,
    pub stats: IdpStats,
    /// Peak IdP token requests over 1-s windows, and when.
    pub peak: f64,
    pub peak_at: Duration,
    /// The budget over all replicas, and the most a rate limiter with no
    /// burst admits in a window (one more per replica at the window's edge).
    pub budget_total: u32,
    pub peak_limit: f64,
    pub verify_time: Duration,
    /// How long the replicas' listings took to show every session.
    pub listings_agreed: Option<Duration>,
}

/// Asks every session, checks every watcher, reads the IdP.
pub async fn verify(run: &Arc<Run>, mut records: Vec<Record>, load_end: Duration) -> Report {
    let started = Instant::now();
    for i in 0..run.replicas() {
        if cluster::wait_serving(&run.channel(i, 0)).await.is_none() {
            run.incident(format!("broker #{i} not SERVING at the end"));
        }
    }

    // 1. Every session the run registered (or deleted) answers as expected.
    let mut expected: Vec<(Session, Expect)> = run
        .base
        .iter()
        .map(|s| (s.clone(), Expect::Present))
        .collect();
    expected.extend(
        run.extra
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.session.clone(), e.expect)),
    );
    let ends = ask_all(run, &expected).await;
    let mut lost = Vec::new();
    let mut came_back = Vec::new();
    let mut reauth = Vec::new();
    let mut served = 0;
    for ((session, expect), end) in expected.iter().zip(&ends) {
        match (expect, end) {
            (_, End::Broken(why)) => lost.push(format!("{}: {why}", session.id)),
            (Expect::Present, End::Absent) => lost.push(format!("{}: NOT_FOUND", session.id)),
            (Expect::Deleted, End::Served | End::Reauth) => {
                came_back.push(session.id.clone());
            }
            (_, End::Served) => served += 1,
            (_, End::Reauth) => reauth.push(session.clone()),
            (_, End::Absent) => {}
        }
    }
    // Every replica lists every session that exists.
    let existing: BTreeSet<&str> = expected
        .iter()
        .zip(&ends)
        .filter(|(_, end)| matches!(end, End::Served | End::Reauth))
        .map(|((s, _), _)| s.id.as_str())
        .collect();
    // (In HA a replica learns of sessions through the change feed: it may
    // lag, so the listings get 30 s to agree.)
    let listing_started = Instant::now();
    let mut listing_problems = Vec::new();
    loop {
        listing_problems.clear();
        for replica in 0..run.replicas() {
            match list_all(run, replica).await {
                Ok(listed) => {
                    let missing: Vec<&&str> = existing
                        .iter()
                        .filter(|id| !listed.contains(**id))
                        .collect();
                    for id in missing.iter().take(20) {
                        listing_problems
                            .push(format!("{id}: missing from broker #{replica}'s listing"));
                    }
                }
                Err(e) => listing_problems.push(format!("ListSessions on broker #{replica}: {e}")),
            }
        }
        if listing_problems.is_empty() || listing_started.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let listings_agreed = listing_problems
        .is_empty()
        .then(|| listing_started.elapsed());
    lost.extend(listing_problems);

    // 2. Re-authentication only where the IdP rejected the session.
    let mut reauth_by_reason: BTreeMap<String, u64> = BTreeMap::new();
    let mut reauth_unexplained = Vec::new();
    for session in &reauth {
        match run.idp.family(&session.family) {
            Some(family) if family.refreshes_rejected > 0 => {
                let reasons: Vec<&str> = family
                    .rejected_by_reason
                    .keys()
                    .map(String::as_str)
                    .collect();
                *reauth_by_reason.entry(reasons.join(" + ")).or_default() += 1;
            }
            other => reauth_unexplained.push(format!(
                "{}: REAUTH_REQUIRED, IdP family {}",
                session.id,
                other.map_or_else(
                    || "unknown".to_owned(),
                    |f| format!(
                        "{:?}, {} refreshes, none rejected",
                        f.state, f.refreshes_succeeded
                    )
                )
            )),
        }
    }

    // 3. Watchers: a forced refresh of every watched active session (on
    // another replica than the watcher's in HA) must reach its stream; a
    // session that ended must have ended its stream.
    let mut watch_missed = Vec::new();
    let mut waits = Vec::new();
    let mut forcing = tokio::task::JoinSet::new();
    for w in &run.watchers {
        let index = w.session;
        let end = &ends[index];
        let id = run.base[index].id.clone();
        match end {
            End::Served => {
                if let Some(reason) = w.ended.lock().unwrap().clone() {
                    watch_missed.push(format!(
                        "{id}: stream ended ({reason}) but the session is active"
                    ));
                    continue;
                }
                let (run, w) = (run.clone(), w.clone());
                forcing.spawn(async move {
                    let forced = force(&run, &id, (w.home + 1) % run.replicas()).await;
                    (w, id, forced)
                });
                // At most 16 at a time.
                while forcing.len() >= 16 {
                    if let Some(Ok(done)) = forcing.join_next().await {
                        settle_forced(done, &mut waits, &mut watch_missed);
                    }
                }
            }
            End::Reauth => waits.push((w.clone(), id, 0)),
            _ => {}
        }
    }
    while let Some(done) = forcing.join_next().await {
        if let Ok(done) = done {
            settle_forced(done, &mut waits, &mut watch_missed);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let pending: Vec<_> = waits
            .iter()
            .filter(|(w, _, generation)| {
                if *generation == 0 {
                    w.ended.lock().unwrap().is_none()
                } else {
                    w.last_generation.load(Ordering::Relaxed) < *generation
                }
            })
            .collect();
        if pending.is_empty() || Instant::now() > deadline {
            for (w, id, generation) in pending {
                watch_missed.push(if *generation == 0 {
                    format!("{id}: session REAUTH_REQUIRED, its stream never got the ended event")
                } else {
                    format!(
                        "{id}: stream at generation {} never got the final generation {generation}",
                        w.last_generation.load(Ordering::Relaxed)
                    )
                });
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 4. Recovery of each fault.
    let canary_ok = run.canary_ok.lock().unwrap().clone();
    for record in &mut records {
        record.first_ok = match record.what_recovers {
            "forced refresh" => canary_ok.iter().copied().find(|&t| t >= record.end),
            "call served by it" => run
                .timeline
                .first_ok(record.replica.unwrap_or(0), record.end),
            _ => None,
        };
    }

    let stats = run.idp.stats();
    let (peak, peak_at) = peak_rate(&run.idp_samples.lock().unwrap());
    let per_replica = run.opts.budget.div_ceil(run.replicas() as u32);
    let budget_total = per_replica * run.replicas() as u32;
    Report {
        records,
        load_end,
        checked: expected.len(),
        served,
        lost,
        came_back,
        reauth_by_reason,
        reauth_unexplained,
        watch_checked: waits.len(),
        watch_missed,
        stats,
        peak,
        peak_at,
        budget_total,
        peak_limit: f64::from(budget_total) + run.replicas() as f64,
        verify_time: started.elapsed(),
        listings_agreed,
    }
}

/// Where a watcher's final forced refresh leaves it: waiting for that
/// generation, or (the session ended at the IdP since it was asked) for
/// its stream's end.
type Forced = (Arc<super::traffic::Watcher>, String, Result<u64, String>);

fn settle_forced(
    (w, id, forced): Forced,
    waits: &mut Vec<(Arc<super::traffic::Watcher>, String, u64)>,
    missed: &mut Vec<String>,
) {
    match forced {
        Ok(generation) => waits.push((w, id, generation)),
        Err(e) if e.starts_with("FAILED_PRECONDITION/REAUTHENTICATION_REQUIRED") => {
            waits.push((w, id, 0));
        }
        Err(e) => missed.push(format!("{id}: final forced refresh failed: {e}")),
    }
}

/// Asks every session, 64 at a time, on the replicas in turn.
async fn ask_all(run: &Arc<Run>, expected: &[(Session, Expect)]) -> Vec<End> {
    let ids: Arc<Vec<String>> = Arc::new(expected.iter().map(|(s, _)| s.id.clone()).collect());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ends = Arc::new(std::sync::Mutex::new(vec![End::Absent; ids.len()]));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (run, ids, next, ends) = (run.clone(), ids.clone(), next.clone(), ends.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    return;
                };
                let end = ask(&run, id, i % run.replicas()).await;
                ends.lock().unwrap()[i] = end;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let done = ends.lock().unwrap().clone();
    progress(run.t0(), format!("asked {} sessions", done.len()));
    done
}

/// One session at the end: its state, and a token if it is active
/// (retrying what a busy broker answers, for up to a minute).
async fn ask(run: &Run, id: &str, replica: usize) -> End {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut client = run.client(replica, 0);
        let answer = client
            .get_session(request(
                pb::GetSessionRequest {
                    session_id: id.to_owned(),
                },
                Some(CALLER),
            ))
            .await;
        let state = match answer {
            Ok(answer) => answer.into_inner().session.map_or(0, |s| s.state),
            Err(status) if status.code() == Code::NotFound => return End::Absent,
            Err(status) => {
                last = format!("GetSession {}", describe(&status));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if state == pb::SessionState::ReauthRequired as i32 {
            return End::Reauth;
        }
        let asked_at = SystemTime::now();
        let answer = client
            .get_access_token(request(
                pb::GetAccessTokenRequest {
                    session_id: id.to_owned(),
                    min_ttl: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    force_refresh: false,
                },
                Some(CALLER),
            ))
            .await;
        match answer {
            Ok(answer) => {
                if let Some(token) = &answer.get_ref().token {
                    let receipt = run.receipt(Some(asked_at), Some(Duration::from_secs(1)));
                    run.tokens
                        .check("GetAccessToken (final)", id, token, receipt);
                }
                return End::Served;
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                let reauth = tonic_types::StatusExt::get_details_error_info(&status)
                    .is_some_and(|i| i.reason == "REAUTHENTICATION_REQUIRED");
                if reauth {
                    return End::Reauth;
                }
                return End::Broken(format!("GetAccessToken {}", describe(&status)));
            }
            Err(status) if status.code() == Code::NotFound => return End::Absent,
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
                ) =>
            {
                last = format!("GetAccessToken {}", describe(&status));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => return End::Broken(format!("GetAccessToken {}", describe(&status))),
        }
    }
    End::Broken(format!("no token within a minute (last: {last})"))
}

/// Every session id broker `replica` lists.
async fn list_all(run: &Run, replica: usize) -> Result<BTreeSet<String>, String> {
    let mut out = BTreeSet::new();
    let mut page_token = String::new();
    for _ in 0..10_000 {
        let mut client = run.client(replica, 0);
        let page = client
            .list_sessions(request(
                pb::ListSessionsRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                Some(CALLER),
            ))
            .await
            .map_err(|s| describe(&s))?
            .into_inner();
        out.extend(page.sessions.into_iter().map(|s| s.session_id));
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
    Err("more than 10,000 pages".to_owned())
}

/// A forced refresh of `id` on `replica`; its generation.
async fn force(run: &Run, id: &str, replica: usize) -> Result<u64, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        let mut client = run.client(replica, 1);
        let answer = client
            .get_access_token(request(
                pb::GetAccessTokenRequest {
                    session_id: id.to_owned(),
                    min_ttl: None,
                    force_refresh: true,
                },
                Some(CALLER),
            ))
            .await;
        match answer {
            Ok(answer) => return Ok(answer.into_inner().token.map_or(0, |t| t.generation)),
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
                ) =>
            {
                last = describe(&status);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(status) => return Err(describe(&status)),
        }
    }
    Err(format!("not within 30 s (last: {last})"))
}

/// The highest rate over any window of at least a second between two
/// samples, and when that window started.
fn peak_rate(samples: &[(Duration, u64)]) -> (f64, Duration) {
    let mut peak = (0.0, Duration::ZERO);
    let mut j = 0;
    for (i, &(t0, c0)) in samples.iter().enumerate() {
        j = j.max(i);
        while j < samples.len() && samples[j].0 < t0 + Duration::from_secs(1) {
            j += 1;
        }
        let Some(&(t1, c1)) = samples.get(j) else {
            break;
        };
        let rate = c1.saturating_sub(c0) as f64 / (t1 - t0).as_secs_f64();
        if rate > peak.0 {
            peak = (rate, t0);
        }
    }
    peak
}

/// The value of the IdP's request counter at `t` (the sample at or before).
fn requests_at(samples: &[(Duration, u64)], t: Duration) -> u64 {
    samples
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .map_or(0, |(_, c)| *c)
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints the table; returns the exit status (1 if an invariant broke).
pub fn print(run: &Run, report: &Report, exits: &[(String, String)]) -> i32 {
    let o = &run.opts;
    let mut rows: Vec<[String; 4]> = Vec::new();
    let mut broken: Vec<String> = Vec::new();
    let mut check = |name: &str, measured: String, limit: &str, ok: bool| {
        if !ok {
            broken.push(name.to_owned());
        }
        rows.push([
            name.to_owned(),
            measured,
            limit.to_owned(),
            if ok { "ok".into() } else { "**BROKEN**".into() },
        ]);
    };
    let t = &run.tokens;
    let received = t.received.load(Ordering::Relaxed);
    let expired = t.expired.load(Ordering::Relaxed);
    let beyond = t.beyond_exp.load(Ordering::Relaxed);
    let unreadable = t.unreadable.load(Ordering::Relaxed);
    let short = t.short.load(Ordering::Relaxed);
    check(
        "tokens served already expired (exp claim vs the time it was sent)",
        format!("{} of {}", expired, thousands(received)),
        "0",
        expired == 0 && unreadable == 0,
    );
    check(
        "tokens served with less than the min_ttl asked for",
        thousands(short),
        "0",
        short == 0,
    );
    check(
        "tokens whose expires_at is later than their exp claim",
        thousands(beyond),
        "0",
        beyond == 0,
    );
    let s = &report.stats;
    check(
        "replays of a rotated refresh token seen by the IdP",
        thousands(s.replays_rejected),
        "0",
        s.replays_rejected == 0,
    );
    // A session may only be lost to a rotated token coming back where the
    // answer was lost: the faults that lose answers after processing, and
    // the refreshes a killed broker had received but not stored (at most
    // its refresh slots). (Presentations are not counted: once the IdP has
    // ended a family, a second replica's stale try is refused harmlessly.)
    let lost_by_faults = ["drop_after_processing", "truncated_after_processing"]
        .iter()
        .map(|k| s.faults_by_kind.get(*k).copied().unwrap_or(0))
        .sum::<u64>();
    let kills = report
        .records
        .iter()
        .filter(|r| r.name.starts_with("SIGKILL"))
        .count() as u64;
    let killed_bound = lost_by_faults + kills * cluster::MAX_CONCURRENT_REFRESHES;
    check(
        "sessions the IdP ended because a rotated refresh token came back",
        format!(
            "{} ({} stale presentations, {} reuses allowed)",
            s.sessions_killed, s.stale_presentations, s.reuses_allowed
        ),
        &format!(
            "<= {killed_bound} ({lost_by_faults} answers lost by faults + {} per SIGKILL)",
            cluster::MAX_CONCURRENT_REFRESHES
        ),
        s.sessions_killed <= killed_bound,
    );
    check(
        "concurrent presentations of one session at the IdP (max)",
        s.max_in_flight_per_family.to_string(),
        "<= 1",
        s.max_in_flight_per_family <= 1,
    );
    check(
        "sessions lost",
        format!(
            "{} of {}",
            report.lost.len(),
            thousands(report.checked as u64)
        ),
        "0",
        report.lost.is_empty(),
    );
    check(
        "deleted sessions that came back",
        report.came_back.len().to_string(),
        "0",
        report.came_back.is_empty(),
    );
    let reauth: u64 = report.reauth_by_reason.values().sum();
    check(
        "sessions sent to re-authentication the IdP had not rejected",
        format!(
            "{} of {} re-authenticating",
            report.reauth_unexplained.len(),
            reauth + report.reauth_unexplained.len() as u64
        ),
        "0",
        report.reauth_unexplained.is_empty(),
    );
    check(
        "peak IdP token requests per second (1-s windows)",
        format!(
            "{:.0}/s at {:.0} s; budget {}/s",
            report.peak,
            report.peak_at.as_secs_f64(),
            report.budget_total
        ),
        &format!("<= {:.0}/s", report.peak_limit),
        report.peak <= report.peak_limit,
    );
    check(
        "watch streams that missed the final generation or end",
        format!("{} of {}", report.watch_missed.len(), report.watch_checked),
        "0",
        report.watch_missed.is_empty(),
    );
    let regressions: u64 = run
        .watchers
        .iter()
        .map(|w| w.regressions.load(Ordering::Relaxed))
        .sum();
    let silent: u64 = run
        .watchers
        .iter()
        .map(|w| w.closed_silently.load(Ordering::Relaxed))
        .sum();
    check(
        "watch streams going back a generation / closing without a status",
        format!("{regressions} / {silent}"),
        "0 / 0",
        regressions == 0 && silent == 0,
    );
    let unexpected = run.abuse_unexpected.total();
    check(
        "abusive calls answered against the contract",
        format!("{} of {}", unexpected, thousands(run.abuse.total())),
        "0",
        unexpected == 0,
    );
    let incidents = run.incidents.lock().unwrap().clone();
    check(
        "brokers that exited unasked or stopped serving",
        incidents.len().to_string(),
        "0",
        incidents.is_empty(),
    );
    let unrecovered: Vec<&Record> = report
        .records
        .iter()
        .filter(|r| r.recovers && r.first_ok.is_none())
        .collect();
    check(
        "faults not recovered from within the run",
        format!("{} of {}", unrecovered.len(), report.records.len()),
        "0",
        unrecovered.is_empty(),
    );

    // Faults, one row each.
    let samples = run.idp_samples.lock().unwrap().clone();
    let timeline = run.timeline.merged();
    for r in &report.records {
        let requests = requests_at(&samples, r.end).saturating_sub(requests_at(&samples, r.start));
        let end_bucket = (r.end.as_millis() / 100) as usize;
        // Callers are clean once a whole second passes without a failed call.
        let mut clean = None;
        let mut b = end_bucket;
        while b < timeline.len() {
            let window = &timeline[b..(b + 10).min(timeline.len())];
            if let Some(k) = window.iter().rposition(|c| c[1] > 0) {
                b += k + 1;
            } else {
                clean = Some(Duration::from_millis((b - end_bucket) as u64 * 100));
                break;
            }
        }
        let until = clean.map_or(timeline.len(), |c| {
            end_bucket + (c.as_millis() / 100) as usize
        });
        let start_bucket = (r.start.as_millis() / 100) as usize;
        let failed: u64 = timeline
            .iter()
            .take(until.max(start_bucket))
            .skip(start_bucket)
            .map(|c| u64::from(c[1]))
            .sum();
        let recovery = match (r.recovers, r.first_ok) {
            (false, _) => "nothing to recover".to_owned(),
            (true, Some(at)) => format!(
                "{} +{:.1} s",
                r.what_recovers,
                at.saturating_sub(r.end).as_secs_f64()
            ),
            (true, None) => format!("{}: none", r.what_recovers),
        };
        let clean = match clean {
            _ if !r.recovers => "—".to_owned(),
            Some(c) => format!("callers clean +{:.1} s", c.as_secs_f64()),
            None => "callers never clean".to_owned(),
        };
        let notes = if r.notes.is_empty() {
            String::new()
        } else {
            format!("; {}", r.notes)
        };
        rows.push([
            format!("fault at {:.0} s: {}", r.start.as_secs_f64(), r.name),
            format!(
                "{recovery}; {clean}; {} calls failed; {} IdP requests during{notes}",
                thousands(failed),
                thousands(requests)
            ),
            "recovers".into(),
            if !r.recovers || r.first_ok.is_some() {
                "ok".into()
            } else {
                "**BROKEN**".into()
            },
        ]);
    }

    // What was served, by outcome.
    let info = |rows: &mut Vec<[String; 4]>, name: String, measured: String| {
        rows.push([name, measured, String::new(), String::new()]);
    };
    let load = run.load.snapshot();
    let calls: u64 = load.values().sum();
    info(
        &mut rows,
        "GetAccessToken calls (load)".into(),
        format!(
            "{} in {:.0} s = {:.0}/s (asked {}/s; {} not sent: generator saturated)",
            thousands(calls),
            report.load_end.as_secs_f64(),
            calls as f64 / report.load_end.as_secs_f64().max(1.0),
            o.rate,
            run.load_shed.load(Ordering::Relaxed)
        ),
    );
    for (key, n) in &load {
        info(&mut rows, format!("  GetAccessToken {key}"), thousands(*n));
    }
    let least = t.least_left_ms.lock().unwrap().unwrap_or(0);
    info(
        &mut rows,
        "tokens checked (load, watchers, churn, canary, final)".into(),
        format!(
            "{}; least time left at receipt {:.1} s (min_ttl asked {} s); {} expired on \
             arrival counting the soak's own delays (it ran up to {} ms late)",
            thousands(received),
            least as f64 / 1000.0,
            run.min_ttl.as_secs(),
            t.expired_on_arrival.load(Ordering::Relaxed),
            run.lag.max_seen().as_millis()
        ),
    );
    for (name, tally) in [
        ("canary forced refresh", &run.canary),
        ("churn", &run.churn),
    ] {
        let snap = tally.snapshot();
        info(
            &mut rows,
            name.into(),
            snap.iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v)))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    let abuse = run.abuse.snapshot();
    let mut by_case: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (key, n) in &abuse {
        let (case, answer) = key.split_once(": ").unwrap_or((key, ""));
        by_case
            .entry(case)
            .or_default()
            .push(format!("{answer} {}", thousands(*n)));
    }
    for (case, answers) in by_case {
        info(&mut rows, format!("  abuse: {case}"), answers.join("; "));
    }

    // Watchers.
    let sum = |f: &dyn Fn(&super::traffic::Watcher) -> u64| -> u64 {
        run.watchers.iter().map(|w| f(w)).sum()
    };
    let ended: BTreeMap<String, u64> = run
        .watchers
        .iter()
        .filter_map(|w| w.ended.lock().unwrap().clone())
        .fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r).or_default() += 1;
            m
        });
    info(
        &mut rows,
        format!("watch streams ({} sessions)", run.watchers.len()),
        format!(
            "{} opened, {} tokens delivered, {} intermediate generations skipped (latest-only \
             delivery), {} reauth warnings, {} older after a reconnect, ended: {:?}",
            thousands(sum(&|w| w.streams.load(Ordering::Relaxed))),
            thousands(sum(&|w| w.tokens.load(Ordering::Relaxed))),
            thousands(sum(&|w| w.skipped.load(Ordering::Relaxed))),
            sum(&|w| w.warnings.load(Ordering::Relaxed)),
            sum(&|w| w.older_after_reconnect.load(Ordering::Relaxed)),
            ended
        ),
    );
    let watch_errors = run.watch_errors.snapshot();
    if !watch_errors.is_empty() {
        info(
            &mut rows,
            "  watch reopened after".into(),
            watch_errors
                .iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v)))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }

    // The IdP's view.
    info(
        &mut rows,
        "IdP token requests / refreshes granted / rejected".into(),
        format!(
            "{} / {} / {} (faults applied to {})",
            thousands(s.token_requests),
            thousands(s.refreshes_succeeded),
            thousands(s.refreshes_rejected),
            thousands(s.faults_injected)
        ),
    );
    info(
        &mut rows,
        "  IdP rejections by reason".into(),
        format!("{:?}", s.rejected_by_reason),
    );
    info(
        &mut rows,
        "sessions at the end: served / re-authenticating (by IdP reason)".into(),
        format!(
            "{} / {} {:?}; ended at the IdP by the schedule: {}",
            thousands(report.served as u64),
            reauth,
            report.reauth_by_reason,
            run.ended_at_idp.lock().unwrap().len()
        ),
    );
    if o.mode == Mode::Ha {
        info(
            &mut rows,
            "replicas' listings agreed after".into(),
            report.listings_agreed.map_or_else(
                || "never (within 30 s)".to_owned(),
                |d| format!("{:.1} s", d.as_secs_f64()),
            ),
        );
    }
    info(
        &mut rows,
        "brokers at the end (SIGTERM)".into(),
        exits
            .iter()
            .map(|(n, s)| format!("{n}: {s}"))
            .collect::<Vec<_>>()
            .join("; "),
    );

    let mode = match o.mode {
        Mode::Single => "one broker on SQLite".to_owned(),
        Mode::Ha => format!("{} replicas on PostgreSQL", o.replicas),
    };
    println!(
        "\n## soak: {mode}, {} sessions, {} calls/s, {} watch streams, access tokens live {} s, \
         IdP budget {}/s, max reuse {}, {:.0} s of load, seed {}\n",
        thousands(o.sessions as u64),
        o.rate,
        o.watchers,
        o.access_lifetime,
        o.budget,
        o.max_reuse,
        report.load_end.as_secs_f64(),
        o.seed
    );
    println!("| check | measured | must be | |");
    println!("|---|---|---|---|");
    for [a, b, c, d] in &rows {
        println!("| {a} | {b} | {c} | {d} |");
    }
    println!();
    let details: Vec<(&str, Vec<String>)> = vec![
        ("sessions lost", report.lost.clone()),
        ("deleted sessions back", report.came_back.clone()),
        (
            "re-authentication without an IdP rejection",
            report.reauth_unexplained.clone(),
        ),
        ("watchers", report.watch_missed.clone()),
        ("tokens", t.examples.lock().unwrap().clone()),
        (
            "abuse",
            run.abuse_unexpected
                .snapshot()
                .into_iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect(),
        ),
        ("incidents", incidents),
    ];
    for (what, list) in details {
        for line in list.iter().take(10) {
            println!("{what}: {line}");
        }
        if list.len() > 10 {
            println!("{what}: … {} more", list.len() - 10);
        }
    }
    if broken.is_empty() {
        println!(
            "RESULT soak: every invariant held ({:.0} s verification)",
            report.verify_time.as_secs_f64()
        );
        0
    } else {
        println!("RESULT soak: BROKEN: {}", broken.join("; "));
        1
    }
}
