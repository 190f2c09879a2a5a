//! The fault schedule: what is injected, when, for how long, and how
//! recovery from it is timed.

use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use tokenbroker::devidp::{Fault as IdpFault, FaultAction};

use super::cluster::{self, REQUEST_TIMEOUT_MS};
use super::traffic::Run;
use super::{Mode, Opts, ScheduleKind, progress};

/// One kind of fault.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Every token request answered HTTP 500.
    Idp500,
    /// Every token request answered 429 with `Retry-After`.
    Idp429 { retry_after_secs: u64 },
    /// Every token request delayed (then processed), below the broker's
    /// request timeout.
    Latency { ms: u64 },
    /// Connections closed unanswered: `lost` requests after processing (the
    /// IdP rotated, the answer is lost), then every request before processing.
    Drops { lost: u32 },
    /// Unreadable answers: `lost` truncated after processing, then an HTML
    /// 502 page, a 200 with broken JSON, an oversized 200, a third each.
    Malformed { lost: u32 },
    /// The IdP ends `n` sessions (admin sign-out) and disables one user.
    IdpEndsSessions { n: usize },
    /// The IdP is down longer than an access token lives: HTML 503 pages,
    /// then connections closed unanswered.
    Outage,
    /// SIGKILL of a broker; restarted after the fault's length.
    BrokerKill { replica: usize },
    /// The database restarts: simulated (the proxy refuses connections and
    /// closes every one, the server terminates the test database's backends),
    /// or real with `--pg-restart-cmd`.
    DbRestart,
}

impl Fault {
    /// The name `--faults` selects it by.
    pub fn key(&self) -> &'static str {
        match self {
            Self::Idp500 => "idp500",
            Self::Idp429 { .. } => "idp429",
            Self::Latency { .. } => "latency",
            Self::Drops { .. } => "drops",
            Self::Malformed { .. } => "malformed",
            Self::IdpEndsSessions { .. } => "idp-ends",
            Self::Outage => "outage",
            Self::BrokerKill { .. } => "kill",
            Self::DbRestart => "db-restart",
        }
    }
}

/// Every fault name `--faults` accepts.
pub const FAULT_KEYS: &[&str] = &[
    "idp500",
    "idp429",
    "latency",
    "drops",
    "malformed",
    "idp-ends",
    "outage",
    "kill",
    "db-restart",
];

/// A fault, how long it lasts and the quiet time after it.
#[derive(Debug, Clone)]
pub struct Step {
    pub fault: Fault,
    pub length: Duration,
    pub gap: Duration,
}

/// The whole schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub warmup: Duration,
    pub steps: Vec<Step>,
}

impl Schedule {
    pub fn length(&self) -> Duration {
        self.warmup
            + self
                .steps
                .iter()
                .map(|s| s.length + s.gap)
                .sum::<Duration>()
    }
}

/// What happened during one fault, and how fast things recovered.
#[derive(Debug, Clone)]
pub struct Record {
    pub name: String,
    pub start: Duration,
    /// When the fault was lifted (for a broker kill: the restart).
    pub end: Duration,
    /// The first success after `end` of what the fault broke: a forced
    /// refresh (IdP and database faults), a call served by the restarted
    /// broker (broker kills). `None`: not within the run.
    pub first_ok: Option<Duration>,
    pub what_recovers: &'static str,
    /// The broker a kill restarted.
    pub replica: Option<usize>,
    pub notes: String,
    /// Whether recovery is expected (an IdP ending sessions has nothing to recover).
    pub recovers: bool,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The schedule for `opts`: every fault of the mode, `short` once and
/// compact, `default` with lengths scaled to the access lifetime and
/// repeated while it fits `--duration`.
pub fn schedule(opts: &Opts) -> Schedule {
    let life = opts.access_lifetime as f64;
    let outage = (life * 1.3).max(life + 3.0);
    let last = opts.replicas - 1;
    let one_cycle = |short: bool| -> Vec<Step> {
        let (f, g) = if short {
            (3.0, 2.5)
        } else {
            ((life / 2.0).max(5.0), life)
        };
        let step = |fault, length: f64, gap: f64| Step {
            fault,
            length: secs(length),
            gap: secs(gap),
        };
        let mut steps = Vec::new();
        if opts.mode == Mode::Single || !short {
            steps.extend([
                step(Fault::Idp500, f, g),
                step(
                    Fault::Idp429 {
                        retry_after_secs: if short { 2 } else { 5 },
                    },
                    f,
                    g + 1.0,
                ),
                step(
                    Fault::Latency {
                        ms: REQUEST_TIMEOUT_MS / 2,
                    },
                    f,
                    g,
                ),
                step(Fault::Drops { lost: 2 }, f, g),
                step(Fault::Malformed { lost: 2 }, f, g),
                step(
                    Fault::IdpEndsSessions {
                        n: (opts.sessions / 500).clamp(3, 20),
                    },
                    0.0,
                    1.0,
                ),
                step(
                    Fault::Outage,
                    outage,
                    if short { life } else { (life * 1.5).max(10.0) },
                ),
            ]);
        } else {
            steps.push(step(Fault::Idp500, 3.0, 2.5));
        }
        steps.push(step(
            Fault::BrokerKill { replica: last },
            if short { 1.0 } else { 2.0 },
            if short { 5.0 } else { g },
        ));
        if opts.mode == Mode::Ha {
            steps.push(step(
                Fault::DbRestart,
                if short { 5.0 } else { 8.0 },
                if short { 5.0 } else { g },
            ));
            if !short {
                steps.push(step(Fault::BrokerKill { replica: 0 }, 2.0, g));
            }
        }
        steps.retain(|s| opts.faults.iter().any(|f| f == s.fault.key()));
        steps
    };
    match opts.schedule {
        ScheduleKind::Short => Schedule {
            warmup: secs(4.0),
            steps: one_cycle(true),
        },
        ScheduleKind::Default => {
            let warmup = secs(life.max(10.0));
            let cycle = one_cycle(false);
            let mut steps = Vec::new();
            let mut used = warmup;
            'fill: while !cycle.is_empty() {
                for step in &cycle {
                    if used + step.length + step.gap > opts.duration {
                        break 'fill;
                    }
                    used += step.length + step.gap;
                    steps.push(step.clone());
                }
            }
            Schedule { warmup, steps }
        }
    }
}

/// Injects one fault, waits its length, lifts it.
pub async fn run_step(run: &Run, step: &Step) -> Record {
    let start = run.now();
    let idp = &run.idp;
    let mut notes = String::new();
    let mut what_recovers = "forced refresh";
    let mut recovers = true;
    let name;
    match &step.fault {
        Fault::Idp500 => {
            name = format!("IdP answers 500 for {:.0} s", step.length.as_secs_f64());
            progress(run.t0(), &name);
            idp.set_faults(vec![IdpFault::always(FaultAction::Status {
                status: 500,
                body: String::new(),
                retry_after: None,
            })]);
            tokio::time::sleep(step.length).await;
        }
        Fault::Idp429 { retry_after_secs } => {
            name = format!(
                "IdP answers 429, Retry-After {retry_after_secs} s, for {:.0} s",
                step.length.as_secs_f64()
            );
            progress(run.t0(), &name);
            idp.set_faults(vec![IdpFault::always(FaultAction::Status {
                status: 429,
                body: r#"{"error":"slow_down"}"#.into(),
                retry_after: Some(retry_after_secs.to_string()),
            })]);
            tokio::time::sleep(step.length).await;
        }
        Fault::Latency { ms } => {
            name = format!(
                "IdP latency {ms} ms (timeout {REQUEST_TIMEOUT_MS} ms) for {:.0} s",
                step.length.as_secs_f64()
            );
            progress(run.t0(), &name);
            idp.set_faults(vec![IdpFault::always(FaultAction::Delay { ms: *ms })]);
            tokio::time::sleep(step.length).await;
        }
        Fault::Drops { lost } => {
            name = format!(
                "IdP drops connections for {:.0} s ({lost} after processing)",
                step.length.as_secs_f64()
            );
            progress(run.t0(), &name);
            idp.set_faults(vec![
                IdpFault::times(FaultAction::DropAfterProcessing, *lost),
                IdpFault::always(FaultAction::DropBeforeProcessing),
            ]);
            tokio::time::sleep(step.length).await;
        }
        Fault::Malformed { lost } => {
            name = format!(
                "IdP answers malformed bodies for {:.0} s ({lost} truncated after processing)",
                step.length.as_secs_f64()
            );
            progress(run.t0(), &name);
            let third = step.length / 3;
            idp.set_faults(vec![
                IdpFault::times(FaultAction::TruncatedAfterProcessing, *lost),
                IdpFault::always(FaultAction::Html { status: 502 }),
            ]);
            tokio::time::sleep(third).await;
            idp.set_faults(vec![IdpFault::always(FaultAction::Status {
                status: 200,
                body: r#"{"access_token": "eyJhbGciOi"#.into(),
                retry_after: None,
            })]);
            tokio::time::sleep(third).await;
            idp.set_faults(vec![IdpFault::always(FaultAction::Oversized {
                bytes: 300_000,
            })]);
            tokio::time::sleep(step.length - 2 * third).await;
        }
        Fault::IdpEndsSessions { n } => {
            name = format!("IdP ends {n} sessions and disables 1 user");
            progress(run.t0(), &name);
            what_recovers = "-";
            recovers = false;
            let mut rng = StdRng::seed_from_u64(run.opts.seed ^ start.as_millis() as u64);
            let mut picks: Vec<usize> = (0..run.base.len()).collect();
            picks.shuffle(&mut rng);
            // One watched session among them, so a watcher sees the end.
            if let Some(w) = run.watchers.first() {
                picks.retain(|&i| i != w.session);
                picks.insert(0, w.session);
            }
            let mut ended = run.ended_at_idp.lock().unwrap();
            for (k, &i) in picks.iter().take(*n + 1).enumerate() {
                let session = &run.base[i];
                if k == *n {
                    idp.disable_user(&session.user);
                    ended.push(format!("{} (user disabled)", session.id));
                } else if idp.end_session(&session.family) {
                    ended.push(format!("{} (signed out)", session.id));
                }
            }
        }
        Fault::Outage => {
            name = format!(
                "IdP down for {:.0} s (access tokens live {} s)",
                step.length.as_secs_f64(),
                run.opts.access_lifetime
            );
            progress(run.t0(), &name);
            idp.set_faults(vec![IdpFault::always(FaultAction::Html { status: 503 })]);
            tokio::time::sleep(step.length / 2).await;
            idp.set_faults(vec![IdpFault::always(FaultAction::DropBeforeProcessing)]);
            tokio::time::sleep(step.length - step.length / 2).await;
        }
        Fault::BrokerKill { replica } => {
            let replica_name = run.brokers.lock().unwrap().replicas[*replica].name.clone();
            name = format!(
                "SIGKILL broker {replica_name}, restarted after {:.0} s",
                step.length.as_secs_f64()
            );
            progress(run.t0(), &name);
            what_recovers = "call served by it";
            run.brokers.lock().unwrap().kill(*replica);
            tokio::time::sleep(step.length).await;
            run.brokers.lock().unwrap().spawn(*replica);
            let end = run.now();
            let serving = cluster::wait_serving(&run.channel(*replica, 0)).await;
            notes = match serving {
                Some(took) => format!("serving {:.1} s after the restart", took.as_secs_f64()),
                None => "never served again".to_owned(),
            };
            return Record {
                name,
                start,
                end,
                first_ok: None,
                what_recovers,
                replica: Some(*replica),
                notes,
                recovers,
            };
        }
        Fault::DbRestart => {
            name = match &run.opts.pg_restart_cmd {
                Some(_) => "PostgreSQL restarted (--pg-restart-cmd)".to_owned(),
                None => format!(
                    "PostgreSQL restart, simulated: connections cut and refused for {:.0} s",
                    step.length.as_secs_f64()
                ),
            };
            progress(run.t0(), &name);
            if let Some(command) = run.opts.pg_restart_cmd.clone() {
                let log = run.work.join("pg-restart.log");
                let started = std::time::Instant::now();
                let status = tokio::task::spawn_blocking(move || {
                    let out = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)?;
                    std::process::Command::new("sh")
                        .args(["-c", &command])
                        .stdin(std::process::Stdio::null())
                        .stdout(out.try_clone()?)
                        .stderr(out)
                        .status()
                })
                .await;
                notes = match status {
                    Ok(Ok(status)) => format!(
                        "restart command {status} after {:.1} s",
                        started.elapsed().as_secs_f64()
                    ),
                    other => format!("restart command failed: {other:?}"),
                };
            } else if let (Some(proxy), Some(db)) = (&run.proxy, &run.database) {
                // As a fast shutdown: no new connections, every backend
                // terminated by the server, then nothing left open.
                proxy.refuse().await;
                notes = match db.terminate_backends().await {
                    Ok(n) => format!("{n} backends terminated"),
                    Err(e) => format!("pg_terminate_backend failed: {e}"),
                };
                proxy.cut().await;
                tokio::time::sleep(step.length).await;
                proxy.reopen().await;
            }
        }
    }
    idp.clear_faults();
    Record {
        name,
        start,
        end: run.now(),
        first_ok: None,
        what_recovers,
        replica: None,
        notes,
        recovers,
    }
}
