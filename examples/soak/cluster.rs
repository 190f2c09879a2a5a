//! What the soak runs against: the dev IdP (in-process, so faults are
//! injected and counters read directly), `tokenbroker serve` processes (one
//! on SQLite, or N replicas on PostgreSQL through a TCP proxy the run can
//! cut), and a fresh database per run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rand::Rng as _;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use tokenbroker::devidp::{DevIdp, RealmSettings, RunningDevIdp};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{Mode, Opts};

/// The caller identity the load, the watchers and the churn use
/// (`l5d-client-id`; the brokers read Linkerd identities).
pub const CALLER: &str = "soak.default.serviceaccount.identity.linkerd.cluster.local";
/// An identity the policy grants nothing.
pub const STRANGER: &str = "stranger.default.serviceaccount.identity.linkerd.cluster.local";
/// The provider's request timeout in every broker.
pub const REQUEST_TIMEOUT_MS: u64 = 3_000;
/// `max_concurrent_refreshes` of every broker: also how many rotations a
/// killed broker can have received and not stored.
pub const MAX_CONCURRENT_REFRESHES: u64 = 64;
/// The PostgreSQL lease: at least 2 × the request timeout + 5 s. A replica
/// that received a rotation it cannot store is protected only for what is
/// left of its lease (renewed every third of it while the request runs, not
/// after), so a database restart plus the recovery must stay under two
/// thirds of it: 20 s covers the simulated restarts (5 s short, 8 s
/// default), and a killed replica's sessions wait at most that long.
const LEASE_SECS: u64 = 20;
/// How long a (re)started broker gets to report SERVING.
const START_LIMIT: Duration = Duration::from_secs(120);

/// The dev IdP of the run.
pub async fn start_idp(opts: &Opts, stop: CancellationToken) -> RunningDevIdp {
    let settings = RealmSettings {
        access_token_lifespan_secs: opts.access_lifetime,
        revoke_refresh_token: true,
        refresh_token_max_reuse: opts.max_reuse,
        ..RealmSettings::default()
    };
    DevIdp::start(settings, "127.0.0.1:0".parse().unwrap(), stop)
        .await
        .expect("the dev IdP starts")
}

/// A free TCP port on loopback (bound and released: a tiny race, fine for a
/// tool that runs alone).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `tokenbroker serve` process slot: the same port, data and config
/// across restarts.
#[derive(Debug)]
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The last exit the run caused (SIGKILL) or saw.
    pub exits: Vec<String>,
    /// Times it was started.
    pub starts: u32,
}

/// Every broker process of the run.
#[derive(Debug)]
pub struct Brokers {
    bin: PathBuf,
    pub replicas: Vec<Replica>,
}

/// Settings every broker gets.
#[derive(Debug, Clone)]
pub struct BrokerSetup {
    pub token_url: String,
    pub logout_url: String,
    pub revoke_url: String,
    pub per_replica_budget: u32,
    pub streams_per_caller: usize,
    /// HA: the store URL (through the proxy) and the shared key ring.
    pub postgres: Option<(String, String)>,
}

impl Brokers {
    /// Writes the policy and one config per replica; starts nothing yet.
    pub fn prepare(
        bin: &Path,
        work: &Path,
        mode: Mode,
        replicas: usize,
        setup: &BrokerSetup,
    ) -> Self {
        let policy = work.join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "# soak: the load's identity may do everything; nobody else anything.\n\
                 [[rules]]\ncallers = [\"{CALLER}\"]\nsessions = [\"*\"]\nallow = [\"*\"]\n"
            ),
        )
        .unwrap();
        let names = ["A", "B", "C", "D", "E", "F", "G"];
        let mut out = Vec::new();
        for i in 0..replicas {
            let name = names
                .get(i)
                .map_or_else(|| format!("R{i}"), |n| (*n).to_owned());
            let port = free_port();
            let data = work.join(format!("broker-{name}"));
            std::fs::create_dir_all(&data).unwrap();
            let store = match mode {
                Mode::Single => "sqlite",
                Mode::Ha => "postgres",
            };
            let mut text = format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nstore = \"{store}\"\n\
                 shutdown_grace_secs = 2\n\
                 [auth]\nsource = \"linkerd\"\npolicy_file = \"{}\"\nmax_streams_per_caller = {}\n\
                 [providers.apiax]\ntoken_url = \"{}\"\nlogout_url = \"{}\"\nrevoke_url = \"{}\"\n\
                 client_id = \"integration-api\"\nrequest_timeout_ms = {REQUEST_TIMEOUT_MS}\n\
                 connect_timeout_ms = 500\nmax_concurrent_refreshes = {MAX_CONCURRENT_REFRESHES}\n\
                 max_refreshes_per_second = {}\nbudget_max_wait_ms = 5000\n\
                 [refresh]\nbackoff_base_ms = 500\nbackoff_cap_secs = 10\n\
                 on_demand_backoff_cap_ms = 1000\n",
                data.display(),
                policy.display(),
                setup.streams_per_caller,
                setup.token_url,
                setup.logout_url,
                setup.revoke_url,
                setup.per_replica_budget,
            );
            let mut env = Vec::new();
            if let Some((url, keys)) = &setup.postgres {
                text.push_str(&format!(
                    "[postgres]\nmax_connections = 8\nlease_secs = {LEASE_SECS}\n\
                     connect_timeout_ms = 2000\n"
                ));
                // Secrets travel in the environment, not in the file.
                env.push(("TOKENBROKER_POSTGRES__URL".to_owned(), url.clone()));
                env.push(("TOKENBROKER_KEYS".to_owned(), keys.clone()));
            }
            let config = work.join(format!("broker-{name}.toml"));
            std::fs::write(&config, text).unwrap();
            out.push(Replica {
                log: work.join(format!("broker-{name}.log")),
                name,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                config,
                env,
                child: None,
                exits: Vec::new(),
                starts: 0,
            });
        }
        Self {
            bin: bin.to_path_buf(),
            replicas: out,
        }
    }

    /// Spawns replica `i` (not serving yet: see [`wait_serving`]).
    pub fn spawn(&mut self, i: usize) {
        let bin = self.bin.clone();
        let replica = &mut self.replicas[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&replica.log)
            .unwrap();
        let mut command = Command::new(&bin);
        command
            .args(["serve", "--config"])
            .arg(&replica.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env(
                "RUST_LOG",
                std::env::var("SOAK_BROKER_LOG").unwrap_or_else(|_| "info".to_owned()),
            );
        // No `TOKENBROKER_*` of the soak's own environment reaches a broker.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOKENBROKER_") {
                command.env_remove(key);
            }
        }
        for (key, value) in &replica.env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        replica.child = Some(child);
        replica.starts += 1;
    }

    /// SIGKILL and reap replica `i`.
    pub fn kill(&mut self, i: usize) {
        let replica = &mut self.replicas[i];
        if let Some(mut child) = replica.child.take() {
            let _ = child.kill();
            let status = child.wait();
            replica
                .exits
                .push(format!("killed by the soak (SIGKILL): {status:?}"));
        }
    }

    /// Replicas that exited without the soak killing them: (name, status).
    pub fn reap_unexpected(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for replica in &mut self.replicas {
            if let Some(child) = &mut replica.child
                && let Ok(Some(status)) = child.try_wait()
            {
                replica.child = None;
                replica.exits.push(format!("exited by itself: {status}"));
                out.push((replica.name.clone(), status.to_string()));
            }
        }
        out
    }

    /// SIGTERM every replica, wait (bounded) for the drain; returns each
    /// one's exit as text.
    pub fn stop_all(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for replica in &mut self.replicas {
            let Some(mut child) = replica.child.take() else {
                continue;
            };
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status.to_string(),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break "did not drain within 15 s: SIGKILL".to_owned();
                    }
                }
            };
            out.push((replica.name.clone(), status));
        }
        out
    }

    /// The last lines of every replica's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for replica in &self.replicas {
            let text = std::fs::read_to_string(&replica.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!(
                "---- broker {} ({}), last {n} log lines ----\n{}\n",
                replica.name,
                replica.log.display(),
                lines[lines.len().saturating_sub(n)..].join("\n")
            ));
        }
        out
    }
}

impl Drop for Brokers {
    fn drop(&mut self) {
        for replica in &mut self.replicas {
            if let Some(mut child) = replica.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A lazily connecting channel to `addr` (reconnects after a restart).
pub fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy()
}

/// Waits (bounded) until the broker on `channel` says SERVING; returns how
/// long that took, or `None` after [`START_LIMIT`].
pub async fn wait_serving(channel: &Channel) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < START_LIMIT {
        let mut health = HealthClient::new(channel.clone());
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(Duration::from_secs(2));
        if let Ok(answer) = health.check(request).await
            && answer.into_inner().status == ServingStatus::Serving as i32
        {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// A key ring of one random key, shared by every replica.
pub fn key_ring() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill(&mut key);
    format!(
        "soak:{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

// ---------------------------------------------------------------- PostgreSQL

/// A database `tb_soak_<random>` on the server at `server`, dropped (`WITH
/// (FORCE)`) by [`Database::drop_now`].
#[derive(Debug)]
pub struct Database {
    pub name: String,
    server: String,
    pub url: String,
}

impl Database {
    pub async fn create(server: &str) -> Result<Self, String> {
        let suffix: u64 = rand::rng().random();
        let name = format!("tb_soak_{suffix:016x}");
        let mut admin = admin(server).await?;
        sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
            .execute(&mut admin)
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        let _ = admin.close().await;
        Ok(Self {
            url: with_database(server, &name),
            name,
            server: server.to_owned(),
        })
    }

    /// Terminates every server process connected to this database (what a
    /// fast shutdown does to them); returns how many.
    pub async fn terminate_backends(&self) -> Result<u64, String> {
        let mut admin = admin(&self.server).await?;
        let killed: Vec<(bool,)> = sqlx::query_as(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut admin)
        .await
        .map_err(|e| format!("pg_terminate_backend: {e}"))?;
        let _ = admin.close().await;
        Ok(killed.iter().filter(|(done,)| *done).count() as u64)
    }

    pub async fn drop_now(&self) {
        match admin(&self.server).await {
            Ok(mut admin) => {
                let dropped = sqlx::query(&format!(
                    r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
                    self.name
                ))
                .execute(&mut admin)
                .await;
                if let Err(e) = dropped {
                    eprintln!("soak: could not drop database {}: {e}", self.name);
                }
                let _ = admin.close().await;
            }
            Err(e) => eprintln!("soak: could not drop database {}: {e}", self.name),
        }
    }
}

async fn admin(server: &str) -> Result<PgConnection, String> {
    match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(server)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(format!("connecting to {server}: {e}")),
        Err(_) => Err(format!("connecting to {server}: no answer within 10 s")),
    }
}

/// `server` with its database (the URL's path) replaced by `name`.
fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (server, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    let mut url = format!("{}/{name}", &base[..path_start]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let user = authority.strip_suffix(host).unwrap_or("");
    format!("{scheme}://{user}{addr}{path}")
}

/// The server address of a `postgres://` URL.
pub async fn server_addr(url: &str) -> Result<SocketAddr, String> {
    let rest = url.split_once("://").ok_or("not a URL")?.1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(&host)
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}

/// A TCP proxy between the replicas and PostgreSQL that the run can cut:
/// every connection closed and the port closed (new connections refused),
/// until it is reopened on the same port — what the replicas see of a
/// database restart. It runs on a thread of its own with its own runtime,
/// so a busy soak never slows the replicas' queries.
#[derive(Debug)]
pub struct PgProxy {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    commands: tokio::sync::mpsc::UnboundedSender<(ProxyCommand, tokio::sync::oneshot::Sender<()>)>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyCommand {
    /// Close the port; connections stay.
    Refuse,
    /// Close the port and every connection.
    Cut,
    /// Listen again on the same port.
    Reopen,
    /// Close everything and end the thread.
    Stop,
}

fn bind_reusing(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(256)
}

impl PgProxy {
    pub fn start(upstream: SocketAddr) -> Self {
        let (commands, mut received) = tokio::sync::mpsc::unbounded_channel::<(
            ProxyCommand,
            tokio::sync::oneshot::Sender<()>,
        )>();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let thread = std::thread::Builder::new()
            .name("soak-pg-proxy".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the proxy");
                runtime.block_on(async move {
                    let first = bind_reusing("127.0.0.1:0".parse().unwrap()).expect("the proxy binds");
                    let addr = first.local_addr().unwrap();
                    let _ = bound.send(addr);
                    let mut listener = Some(first);
                    let mut connections = JoinSet::new();
                    loop {
                        let accept = async {
                            match &listener {
                                Some(l) => l.accept().await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            command = received.recv() => {
                                let Some((command, done)) = command else {
                                    connections.shutdown().await;
                                    return;
                                };
                                match command {
                                    ProxyCommand::Refuse => listener = None,
                                    ProxyCommand::Cut => {
                                        listener = None;
                                        connections.shutdown().await;
                                    }
                                    ProxyCommand::Reopen => {
                                        listener = Some(bind_reusing(addr).expect("the proxy binds its port again"));
                                    }
                                    ProxyCommand::Stop => {
                                        connections.shutdown().await;
                                        let _ = done.send(());
                                        return;
                                    }
                                }
                                let _ = done.send(());
                            }
                            conn = accept => {
                                let Ok((mut client, _)) = conn else { continue };
                                counter.fetch_add(1, Ordering::Relaxed);
                                connections.spawn(async move {
                                    let _ = client.set_nodelay(true);
                                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                                        return;
                                    };
                                    let _ = server.set_nodelay(true);
                                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                });
                            }
                            Some(_) = connections.join_next(), if !connections.is_empty() => {}
                        }
                    }
                });
            })
            .expect("the proxy thread starts");
        let addr = bound_rx.recv().expect("the proxy reports its address");
        Self {
            addr,
            accepted,
            commands,
            thread: Mutex::new(Some(thread)),
        }
    }

    async fn send(&self, command: ProxyCommand) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.commands.send((command, done)).is_ok() {
            let _ = wait.await;
        }
    }

    /// Closes the port (new connections are refused); open ones stay.
    pub async fn refuse(&self) {
        self.send(ProxyCommand::Refuse).await;
    }

    /// Closes the port and every connection.
    pub async fn cut(&self) {
        self.send(ProxyCommand::Cut).await;
    }

    /// Accepts again, on the same port.
    pub async fn reopen(&self) {
        self.send(ProxyCommand::Reopen).await;
    }

    /// Closes everything and ends the proxy's thread.
    pub async fn stop(&self) {
        self.send(ProxyCommand::Stop).await;
        let thread = self.thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
