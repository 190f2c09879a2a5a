//! Soak-and-chaos run of issue 8: a reliability proof that reports what it
//! survived.
//!
//! Starts the dev IdP in-process (revoke-refresh-token on, short access
//! lifetimes), one `tokenbroker serve` on SQLite or N replicas on one
//! PostgreSQL database (through a TCP proxy the run can cut), registers
//! thousands of sessions, and drives them for a set time: `GetAccessToken` at
//! a set rate, `WatchToken` streams, registrations and deletions, a canary
//! forcing refreshes, and abuse (malformed, oversized and unauthenticated
//! requests, unknown sessions, raw garbage gRPC frames). Meanwhile a schedule
//! injects faults: IdP 500s, 429s with `Retry-After`, latency spikes, dropped
//! connections, malformed bodies, sessions ended at the IdP, a full IdP
//! outage longer than a token's lifetime, SIGKILL and restart of a broker,
//! and (HA) a database restart.
//!
//! Every invariant is measured independently of the broker: expiry from the
//! token's own `exp` claim at receipt, replays and concurrency from the dev
//! IdP's counters, lost sessions and re-authentications by asking every
//! session at the end and comparing with the IdP's record of what it
//! rejected, the refresh rate from the IdP's request counter, watchers from
//! what each stream delivered. One table at the end; the exit status is 1 if
//! an invariant broke (named in the table and on the last line), 2 if the run
//! could not be set up.
//!
//! ```text
//! cargo build --release --bin tokenbroker --example soak
//! target/release/examples/soak --mode single --sessions 10000 --rate 500 \
//!     --watchers 1000 --duration 600 --access-lifetime 30 --budget 600
//! ```
//!
//! `tests/soak.rs` runs the `short` schedule (every fault once, about two
//! minutes, single mode and a short HA section) under `cargo test`.

// A chaos tool measures wall time: std `Instant::now` is the right clock,
// and its setup aborts the run with a message when something is missing.
#![allow(
    clippy::disallowed_methods,
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code
)]

mod cluster;
mod faults;
mod report;
mod traffic;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Single broker on SQLite, or replicas on PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Single,
    Ha,
}

/// Which fault schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// Every fault, with lengths scaled to the access lifetime, repeated
    /// until `--duration` is used up.
    Default,
    /// Every fault of the mode once, short (CI).
    Short,
}

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Opts {
    pub mode: Mode,
    pub replicas: usize,
    pub sessions: usize,
    pub rate: f64,
    pub watchers: usize,
    pub duration: Duration,
    pub access_lifetime: u64,
    pub budget: u32,
    pub seed: u64,
    pub schedule: ScheduleKind,
    /// The fault kinds the schedule may use (all by default).
    pub faults: Vec<String>,
    pub max_reuse: u32,
    pub pg_url: String,
    pub pg_restart_cmd: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub keep: bool,
    pub broker_bin: PathBuf,
}

const HELP: &str = "\
soak [--flag value]...   a soak-and-chaos run of tokenbroker; prints one table,
                         exits 1 if an invariant broke, 2 if it could not start

  --mode single|ha          one broker on SQLite, or replicas on PostgreSQL (single)
  --replicas N              HA replicas (3)
  --sessions N              sessions registered at the start (2000)
  --rate R                  GetAccessToken calls per second (200)
  --watchers N              WatchToken streams, one per session (200)
  --duration SECS           length of the run after set-up (600; short: its own length,
                            about a minute; a longer one pads it with quiet load)
  --access-lifetime SECS    the dev IdP's access token lifespan (20)
  --budget N                IdP refreshes per second over all replicas (300;
                            each replica gets N / replicas)
  --seed N                  sessions picked, abuse payloads (random, printed)
  --schedule default|short  faults repeated to fill --duration, or each once (default)
  --faults a,b,...          only these faults (default all of the mode: idp500, idp429,
                            latency, drops, malformed, idp-ends, outage, kill, db-restart)
  --max-reuse N             the IdP's refresh token max reuse (0: a lost answer
                            costs the session, as in Keycloak's default)
  --pg-url URL              HA: a server where a database may be created
                            ($TB_TEST_PG_URL, else postgres://postgres@127.0.0.1:5432/test)
  --pg-restart-cmd CMD      HA: restart the server for real with this shell command
                            (default: simulated, see the README)
  --work-dir DIR            logs, configs and SQLite files (default: a temporary
                            directory, kept when an invariant breaks)
  --keep                    keep the work directory
  --broker-bin PATH         the tokenbroker binary (default: next to this one)";

fn parse_opts(args: &[String], default_bin: Option<&str>) -> Result<Opts, String> {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    let mut i = 0;
    while i < args.len() {
        let Some(key) = args[i].strip_prefix("--") else {
            return Err(format!("unexpected argument {:?}", args[i]));
        };
        let value = match args.get(i + 1) {
            Some(v) if !v.starts_with("--") => {
                i += 1;
                v.clone()
            }
            _ => "true".to_owned(),
        };
        kv.insert(key.to_owned(), value);
        i += 1;
    }
    const KNOWN: &[&str] = &[
        "mode",
        "replicas",
        "sessions",
        "rate",
        "watchers",
        "duration",
        "access-lifetime",
        "budget",
        "seed",
        "schedule",
        "faults",
        "max-reuse",
        "pg-url",
        "pg-restart-cmd",
        "work-dir",
        "keep",
        "broker-bin",
        "help",
    ];
    if let Some(unknown) = kv.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown flag --{unknown}"));
    }
    fn num<T: std::str::FromStr>(
        kv: &BTreeMap<String, String>,
        key: &str,
        default: T,
    ) -> Result<T, String> {
        match kv.get(key) {
            None => Ok(default),
            Some(v) => v
                .replace('_', "")
                .parse()
                .map_err(|_| format!("--{key}: cannot read {v:?}")),
        }
    }
    let mode = match kv.get("mode").map_or("single", String::as_str) {
        "single" => Mode::Single,
        "ha" => Mode::Ha,
        other => return Err(format!("--mode: single or ha, not {other:?}")),
    };
    let schedule = match kv.get("schedule").map_or("default", String::as_str) {
        "default" => ScheduleKind::Default,
        "short" => ScheduleKind::Short,
        other => return Err(format!("--schedule: default or short, not {other:?}")),
    };
    let replicas = match mode {
        Mode::Single => 1,
        Mode::Ha => num(&kv, "replicas", 3usize)?.clamp(2, 7),
    };
    let broker_bin = match kv.get("broker-bin") {
        Some(bin) => PathBuf::from(bin),
        None => match default_bin {
            Some(bin) => PathBuf::from(bin),
            None => {
                // target/<profile>/examples/soak → target/<profile>/tokenbroker
                let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                let dir = exe.parent().ok_or("no directory")?;
                let dir = if dir.ends_with("examples") || dir.ends_with("deps") {
                    dir.parent().ok_or("no directory")?
                } else {
                    dir
                };
                dir.join("tokenbroker")
            }
        },
    };
    let opts = Opts {
        mode,
        replicas,
        sessions: num(&kv, "sessions", 2000usize)?.max(10),
        rate: num(&kv, "rate", 200.0f64)?.max(1.0),
        watchers: num(&kv, "watchers", 200usize)?,
        duration: Duration::from_secs_f64(
            num(
                &kv,
                "duration",
                if schedule == ScheduleKind::Short {
                    0.0f64
                } else {
                    600.0
                },
            )?
            .max(0.0),
        ),
        access_lifetime: num(&kv, "access-lifetime", 20u64)?.max(5),
        budget: num(&kv, "budget", 300u32)?.max(replicas as u32),
        seed: num(&kv, "seed", rand::random::<u32>() as u64)?,
        schedule,
        faults: match kv.get("faults") {
            None => faults::FAULT_KEYS.iter().map(|k| (*k).to_owned()).collect(),
            Some(list) => {
                let list: Vec<String> = list.split(',').map(|k| k.trim().to_owned()).collect();
                if let Some(bad) = list
                    .iter()
                    .find(|k| !faults::FAULT_KEYS.contains(&k.as_str()))
                {
                    return Err(format!("--faults: unknown fault {bad:?}"));
                }
                list
            }
        },
        max_reuse: num(&kv, "max-reuse", 0u32)?,
        pg_url: kv.get("pg-url").cloned().unwrap_or_else(|| {
            std::env::var("TB_TEST_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
        }),
        pg_restart_cmd: kv.get("pg-restart-cmd").cloned(),
        work_dir: kv.get("work-dir").map(PathBuf::from),
        keep: kv.contains_key("keep"),
        broker_bin,
    };
    if opts.watchers > opts.sessions {
        return Err("--watchers: at most one per session".to_owned());
    }
    if kv.contains_key("help") {
        return Err(String::new());
    }
    Ok(opts)
}

/// Runs the soak with `args` (flags only); returns the exit status: 0 all
/// invariants held, 1 one broke, 2 the run could not be set up.
pub fn entry(args: Vec<String>, default_broker_bin: Option<&str>) -> i32 {
    let opts = match parse_opts(&args, default_broker_bin) {
        Ok(opts) => opts,
        Err(e) if e.is_empty() => {
            println!("{HELP}");
            return 0;
        }
        Err(e) => {
            eprintln!("soak: {e}\n\n{HELP}");
            return 2;
        }
    };
    if !opts.broker_bin.exists() {
        eprintln!(
            "soak: no tokenbroker binary at {} (build it, or give --broker-bin)",
            opts.broker_bin.display()
        );
        return 2;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(opts))
}

/// The work directory: the given one, or a temporary one (kept on failure).
fn work_dir(opts: &Opts) -> (Option<tempfile::TempDir>, PathBuf) {
    if let Some(dir) = &opts.work_dir {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        return (None, dir.clone());
    }
    let base = ["/work", "/tmp"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("soak-")
        .tempdir_in(base)
        .unwrap();
    let path = tmp.path().to_path_buf();
    (Some(tmp), path)
}

/// Prints a progress line (stderr) with the time since `t0`.
pub fn progress(t0: Instant, text: impl std::fmt::Display) {
    eprintln!("soak {:>7.1}s  {text}", t0.elapsed().as_secs_f64());
}

async fn run(opts: Opts) -> i32 {
    let (tmp, work) = work_dir(&opts);
    let setup_started = Instant::now();
    eprintln!(
        "soak: {:?} mode, {} sessions, {} calls/s, {} watchers, access tokens live {} s, \
         IdP budget {}/s, seed {}, work dir {}",
        opts.mode,
        opts.sessions,
        opts.rate,
        opts.watchers,
        opts.access_lifetime,
        opts.budget,
        opts.seed,
        work.display()
    );
    let idp_stop = CancellationToken::new();
    let idp = cluster::start_idp(&opts, idp_stop.clone()).await;

    // HA: a fresh database, reached through a proxy the run can cut.
    let mut database = None;
    let mut proxy = None;
    let mut postgres = None;
    if opts.mode == Mode::Ha {
        let db = match cluster::Database::create(&opts.pg_url).await {
            Ok(db) => db,
            Err(e) => {
                eprintln!(
                    "soak: no PostgreSQL for HA mode ({e}); give --pg-url, or run under \
                     scripts/pg-for-tests"
                );
                return 2;
            }
        };
        let upstream = match cluster::server_addr(&db.url).await {
            Ok(addr) => addr,
            Err(e) => {
                eprintln!("soak: {e}");
                db.drop_now().await;
                return 2;
            }
        };
        let p = cluster::PgProxy::start(upstream);
        postgres = Some((cluster::via(&db.url, p.addr), cluster::key_ring()));
        proxy = Some(p);
        database = Some(db);
    }

    let setup = cluster::BrokerSetup {
        token_url: idp.token_url(),
        logout_url: idp.logout_url(),
        revoke_url: idp.revoke_url(),
        per_replica_budget: opts.budget.div_ceil(opts.replicas as u32),
        streams_per_caller: opts.watchers + 200,
        postgres,
    };
    let mut brokers =
        cluster::Brokers::prepare(&opts.broker_bin, &work, opts.mode, opts.replicas, &setup);
    for i in 0..opts.replicas {
        brokers.spawn(i);
    }
    let addrs: Vec<_> = brokers.replicas.iter().map(|r| r.addr).collect();
    let brokers = std::sync::Mutex::new(brokers);
    let base = match prepare(&opts, &idp.idp, &addrs, &brokers).await {
        Ok(base) => base,
        Err(e) => {
            eprintln!("soak: the run could not be set up: {e}");
            eprintln!("{}", brokers.lock().unwrap().log_tails(40));
            let _ = tokio::task::block_in_place(|| brokers.lock().unwrap().stop_all());
            if let Some(proxy) = &proxy {
                proxy.stop().await;
            }
            if let Some(db) = &database {
                db.drop_now().await;
            }
            idp_stop.cancel();
            idp.shutdown().await;
            if let Some(tmp) = tmp {
                eprintln!("soak: logs and data kept in {}", tmp.keep().display());
            }
            return 2;
        }
    };
    let run = Arc::new(traffic::Run::new(
        opts.clone(),
        &work,
        idp.idp.clone(),
        &addrs,
        base,
        brokers.into_inner().unwrap(),
        database,
        proxy,
    ));
    let outcome = drive(&run, setup_started).await;

    // Tear down, whatever happened.
    // Draining waits on the processes (blocking, bounded).
    let exits = tokio::task::block_in_place(|| run.brokers.lock().unwrap().stop_all());
    if let Some(proxy) = &run.proxy {
        proxy.stop().await;
    }
    if let Some(db) = &run.database {
        db.drop_now().await;
    }
    idp_stop.cancel();
    idp.shutdown().await;

    let code = match outcome {
        Ok(report) => {
            let code = report::print(&run, &report, &exits);
            if code != 0 {
                eprintln!("{}", run.brokers.lock().unwrap().log_tails(30));
            }
            code
        }
        Err(e) => {
            eprintln!("soak: the run could not be set up: {e}");
            eprintln!("{}", run.brokers.lock().unwrap().log_tails(40));
            2
        }
    };
    if code != 0 || opts.keep {
        if let Some(tmp) = tmp {
            let kept = tmp.keep();
            eprintln!("soak: logs and data kept in {}", kept.display());
        } else {
            eprintln!("soak: logs and data in {}", work.display());
        }
    }
    code
}

/// Waits for every broker, then logs in and registers the base sessions.
async fn prepare(
    opts: &Opts,
    idp: &tokenbroker::devidp::DevIdp,
    addrs: &[std::net::SocketAddr],
    brokers: &std::sync::Mutex<cluster::Brokers>,
) -> Result<Vec<traffic::Session>, String> {
    for (i, &addr) in addrs.iter().enumerate() {
        if cluster::wait_serving(&cluster::channel(addr))
            .await
            .is_none()
        {
            return Err(format!(
                "broker {} did not report SERVING",
                brokers.lock().unwrap().replicas[i].name
            ));
        }
    }
    let channels = traffic::load_channels(addrs);
    traffic::register_base(opts, idp, &channels).await
}

/// Traffic, faults, verification. Errors are set-up failures.
async fn drive(run: &Arc<traffic::Run>, setup_started: Instant) -> Result<report::Report, String> {
    traffic::new_canary(run).await?;
    let setup_time = setup_started.elapsed();
    let schedule = faults::schedule(&run.opts);
    run.start_clock();
    progress(
        run.t0(),
        format!(
            "set up in {:.1} s: {} sessions registered; running {} faults over {:.0} s",
            setup_time.as_secs_f64(),
            run.base.len(),
            schedule.steps.len(),
            schedule.length().max(run.opts.duration).as_secs_f64()
        ),
    );

    let traffic = TaskTracker::new();
    let watch = TaskTracker::new();
    let traffic_stop = CancellationToken::new();
    let watch_stop = CancellationToken::new();
    traffic::spawn_all(run, &traffic, &traffic_stop, &watch, &watch_stop);

    let mut records = Vec::new();
    tokio::time::sleep(schedule.warmup).await;
    for step in &schedule.steps {
        let record = faults::run_step(run, step).await;
        progress(run.t0(), format!("{} ended", record.name));
        records.push(record);
        tokio::time::sleep(step.gap).await;
    }
    let until = run.opts.duration;
    while run.t0().elapsed() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    run.idp.clear_faults();
    let load_end = run.t0().elapsed();
    traffic_stop.cancel();
    traffic.close();
    if tokio::time::timeout(Duration::from_secs(30), traffic.wait())
        .await
        .is_err()
    {
        run.incident("traffic calls still running 30 s after the load stopped".to_owned());
    }
    progress(run.t0(), "load stopped; verifying");

    let report = report::verify(run, records, load_end).await;

    watch_stop.cancel();
    watch.close();
    if tokio::time::timeout(Duration::from_secs(30), watch.wait())
        .await
        .is_err()
    {
        eprintln!("soak: some watch tasks did not stop within 30 s");
    }
    Ok(report)
}

fn main() {
    std::process::exit(entry(std::env::args().skip(1).collect(), None));
}
