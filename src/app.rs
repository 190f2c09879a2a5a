//! Wiring and task ownership: builds the parts from a validated [`Config`],
//! serves gRPC, and shuts everything down in order. Nothing else lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tracing::{Instrument as _, info, warn};

use crate::auth::{IdentitySource, Policy, PolicyHandle};
use crate::broker::{Broker, BrokerSettings};
use crate::cli::{DevIdpArgs, ServeArgs, StoreArg};
use crate::config::{Config, ConfigError, LogFormat, StoreKind};
use crate::devidp::{DevIdp, RealmSettings};
use crate::grpc::TokenBrokerService;
use crate::grpc::gate::Gate;
use crate::oidc::TokenClient;
use crate::refresh::{Budget, Provider, Providers, Refresher, scheduler_channel};
use crate::session::{Registry, SessionId};
use crate::store::postgres::{PostgresOptions, PostgresStore};
use crate::store::seal::KeyRing;
use crate::store::{
    Change, Coordinator, MemoryStore, Monitored, SessionStore, SqliteStore, StoreError,
};

/// Why the service could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or read.
    #[error("session store: {0}")]
    Store(#[from] StoreError),
    /// A socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Server(String),
    /// The SQLite store could not be opened (or the key does not open it).
    #[error(transparent)]
    Open(#[from] crate::store::sqlite::OpenError),
    /// The PostgreSQL store could not be opened (or the key does not open it).
    #[error("{0}")]
    OpenShared(String),
    /// The key ring could not be loaded.
    #[error("encryption keys: {0}")]
    Keys(String),
    /// The access policy could not be loaded.
    #[error("access policy: {0}")]
    Policy(String),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {cause}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        cause: String,
    },
}

/// The store a config asks for, opened: the generic handle, and the SQLite
/// store itself when that is what it is (for key rotation).
#[derive(Debug)]
pub struct OpenedStore {
    /// The store.
    pub store: Arc<dyn SessionStore>,
    /// The SQLite store, when configured.
    pub sqlite: Option<Arc<SqliteStore>>,
    /// The PostgreSQL store, when configured (HA).
    pub postgres: Option<Arc<PostgresStore>>,
}

impl OpenedStore {
    fn plain(store: Arc<dyn SessionStore>) -> Self {
        Self {
            store,
            sqlite: None,
            postgres: None,
        }
    }
}

/// Opens the configured store: the SQLite file in `data_dir` (created with
/// its key file when the directory is new), or memory.
pub async fn open_store(config: &Config) -> Result<OpenedStore, AppError> {
    match config.store {
        StoreKind::Memory => {
            warn!("memory store: every session is lost when the process exits");
            Ok(OpenedStore::plain(Arc::new(MemoryStore::new())))
        }
        StoreKind::Sqlite => {
            let dir = &config.data_dir;
            create_data_dir(dir)?;
            let db = dir.join(crate::store::sqlite::DB_FILE);
            let keys = key_ring(config, &db)?;
            let sqlite = Arc::new(SqliteStore::open(&db, keys).await?);
            info!(path = %db.display(), "session store open");
            Ok(OpenedStore {
                store: sqlite.clone(),
                sqlite: Some(sqlite),
                postgres: None,
            })
        }
        StoreKind::Postgres => {
            let keys = match (&config.keys, &config.key_file) {
                (Some(text), _) => {
                    KeyRing::parse(text).map_err(|e| AppError::Keys(format!("`keys`: {e}")))?
                }
                (None, Some(path)) => KeyRing::load_file(path)
                    .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())))?,
                (None, None) => {
                    return Err(AppError::Keys(
                        "store = \"postgres\" needs key_file or TOKENBROKER_KEYS".into(),
                    ));
                }
            };
            let pg = &config.postgres;
            let url = pg.url.as_deref().unwrap_or_default();
            let options = PostgresOptions {
                max_connections: pg.max_connections,
                lease: Duration::from_secs(pg.lease_secs),
                connect_timeout: Duration::from_millis(pg.connect_timeout_ms),
            };
            let postgres = Arc::new(
                PostgresStore::open(url, keys, options)
                    .await
                    .map_err(|e| AppError::OpenShared(e.to_string()))?,
            );
            info!(
                replica = postgres.replica(),
                lease_secs = pg.lease_secs,
                "shared PostgreSQL session store open (HA mode)"
            );
            Ok(OpenedStore {
                store: postgres.clone(),
                sqlite: None,
                postgres: Some(postgres),
            })
        }
    }
}

fn create_data_dir(dir: &std::path::Path) -> Result<(), AppError> {
    let error = |e: std::io::Error| AppError::DataDir {
        path: dir.to_path_buf(),
        cause: e.to_string(),
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(error)
}

/// The default key file inside a data directory.
pub const DEFAULT_KEY_FILE: &str = "tokenbroker.keys";

/// The key file a config reads its ring from (`None`: keys are inline).
pub fn key_file_of(config: &Config) -> Option<std::path::PathBuf> {
    if config.keys.is_some() {
        return None;
    }
    Some(
        config
            .key_file
            .clone()
            .unwrap_or_else(|| config.data_dir.join(DEFAULT_KEY_FILE)),
    )
}

/// The key ring: inline `keys`, else `key_file`, else the data directory's
/// key file — generated only when the database does not exist yet.
pub fn key_ring(config: &Config, db: &std::path::Path) -> Result<KeyRing, AppError> {
    if let Some(text) = &config.keys {
        return KeyRing::parse(text).map_err(|e| AppError::Keys(format!("`keys`: {e}")));
    }
    if let Some(path) = &config.key_file {
        return KeyRing::load_file(path)
            .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())));
    }
    let path = config.data_dir.join(DEFAULT_KEY_FILE);
    if path.exists() {
        return KeyRing::load_file(&path)
            .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())));
    }
    if db.exists() {
        return Err(AppError::Keys(format!(
            "{} holds sealed sessions but no key is configured and {} is missing; \
             set key_file or TOKENBROKER_KEYS to the key that sealed them",
            db.display(),
            path.display()
        )));
    }
    let keys = KeyRing::create_file(&path)
        .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())))?;
    warn!(
        path = %path.display(),
        "generated a new encryption key next to the data; in production mount the key from a \
         secret (key_file or TOKENBROKER_KEYS) and back it up: without it the sessions cannot be read"
    );
    Ok(keys)
}

/// A running broker: its address and the handle to stop it.
#[derive(Debug)]
pub struct RunningBroker {
    /// Where gRPC is served.
    pub addr: SocketAddr,
    /// The use cases (for in-process inspection in tests).
    pub broker: Arc<Broker>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    grace: Duration,
    draining: CancellationToken,
    drain_delay: Duration,
    /// Where the admin HTTP endpoint (`/metrics`) listens, when configured.
    pub admin_addr: Option<SocketAddr>,
    /// Where the plaintext health port listens, when configured.
    pub health_addr: Option<SocketAddr>,
    /// The SQLite store, when configured (key rotation, closing).
    pub sqlite: Option<Arc<SqliteStore>>,
    /// The PostgreSQL store, when configured (key rotation, closing).
    pub postgres: Option<Arc<PostgresStore>>,
    key_file: Option<std::path::PathBuf>,
    /// The access policy, when a policy file is in force.
    pub policy: Option<PolicyHandle>,
}

/// The gate of the gRPC port: the configured identity source and policy.
/// Without one, every caller may do everything — said loudly.
fn gate(config: &Config) -> Result<(Arc<Gate>, Option<PolicyHandle>), AppError> {
    let limit = config.auth.max_streams_per_caller;
    match config.auth.source {
        None | Some(IdentitySource::None) => {
            warn!(
                "NO CALLER AUTHENTICATION: every process that reaches the port may read every \
                 session's tokens (auth.source = none / --insecure-no-auth); never run this way \
                 outside development"
            );
            let policy = PolicyHandle::new(Policy::allow_all(), None);
            Ok((
                Arc::new(Gate::new(IdentitySource::None, policy, limit)),
                None,
            ))
        }
        Some(source) => {
            let path = config.auth.policy_file.clone().ok_or_else(|| ConfigError {
                key: "auth.policy_file".into(),
                reason: "required with an identity source".into(),
            })?;
            let policy = PolicyHandle::load(path.clone())
                .map_err(|e| AppError::Policy(format!("{}: {e}", path.display())))?;
            info!(
                ?source,
                policy = %path.display(),
                rules = policy.current().rule_count(),
                "caller authentication on; default deny"
            );
            Ok((
                Arc::new(Gate::new(source, policy.clone(), limit)),
                Some(policy),
            ))
        }
    }
}

/// Builds the providers of a validated config.
pub fn providers(config: &Config) -> Result<Providers, ConfigError> {
    let mut built = Vec::with_capacity(config.providers.len());
    for (name, provider) in &config.providers {
        let client = TokenClient::new(config.endpoint(name, provider)?)
            .map_err(|e| crate::config::endpoint_error(name, &e))?;
        built.push(Provider {
            name: name.as_str().into(),
            client,
            budget: Budget::new(Config::budget(provider)),
        });
    }
    Providers::new(built, &config.default_provider).ok_or_else(|| ConfigError {
        key: "default_provider".into(),
        reason: "no such provider".into(),
    })
}

/// Validates `config`, opens the store, loads the sessions and starts serving.
pub async fn start(config: &Config) -> Result<RunningBroker, AppError> {
    config.validate()?;
    let opened = open_store(config).await?;
    let coordinator = opened.postgres.clone().map(|pg| pg as Arc<dyn Coordinator>);
    let mut running = start_with_parts(config, opened.store, coordinator).await?;
    running.sqlite = opened.sqlite;
    running.postgres = opened.postgres;
    running.key_file = key_file_of(config);
    Ok(running)
}

/// Like [`start`], over a store the caller built (tests inject failures this way).
pub async fn start_with_store(
    config: &Config,
    store: Arc<dyn SessionStore>,
) -> Result<RunningBroker, AppError> {
    start_with_parts(config, store, None).await
}

/// Like [`start_with_store`], coordinated with other replicas through
/// `coordinator` (HA mode) when there is one.
pub async fn start_with_parts(
    config: &Config,
    store: Arc<dyn SessionStore>,
    coordinator: Option<Arc<dyn Coordinator>>,
) -> Result<RunningBroker, AppError> {
    config.validate()?;
    // Everything read from files comes before any port is bound.
    let providers = providers(config)?;
    let (gate, policy) = gate(config)?;
    let tls = config.tls.as_ref().map(server_tls).transpose()?;
    let monitored = Arc::new(Monitored::new(store));
    let store_health = monitored.health();
    let store: Arc<dyn SessionStore> = monitored.clone();

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let registry = Arc::new(Registry::new());
    let (scheduler, scheduler_task) = scheduler_channel();
    let refresher = Refresher::new(
        registry.clone(),
        providers.clone(),
        store.clone(),
        config.policy(),
        tracker.clone(),
        scheduler,
        shutdown.clone(),
        coordinator.clone(),
    );
    refresher.spawn_scheduler(scheduler_task);
    let broker = Arc::new(Broker::new(
        registry,
        refresher,
        store,
        providers,
        BrokerSettings {
            default_min_ttl: Duration::from_secs(config.refresh.default_min_ttl_secs),
            max_token_bytes: config.max_token_bytes,
        },
        tracker.clone(),
        shutdown.clone(),
    ));
    // Page by page: the stored rows of a page are dropped once its sessions
    // are built, so a large store never sits in memory twice.
    // The next page is read and unsealed while this one is built.
    let (mut restored, mut overdue) = (0usize, Vec::new());
    let fetch = |after: Option<SessionId>| {
        let store = monitored.clone();
        // Aborted if start-up fails before it is awaited.
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            store.load_page(after.as_ref(), RESTORE_PAGE).await
        }))
    };
    let mut next = fetch(None);
    loop {
        let page = next
            .await
            .map_err(|e| StoreError::Backend(format!("loading sessions: {e}")))??;
        let Some(last) = page.last() else { break };
        next = fetch(Some(last.id.clone()));
        restored += page.len();
        broker.restore_page(page, &mut overdue);
    }
    let overdue = broker.spread_overdue(overdue);
    if let Some(coordinator) = coordinator {
        let (changes, received) = tokio::sync::mpsc::channel(1024);
        let following = shutdown.clone();
        tracker.spawn(
            async move { coordinator.follow(changes, following).await }
                .instrument(tracing::info_span!("store_listener")),
        );
        tracker.spawn(follow_changes(broker.clone(), monitored.clone(), received));
    }

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AppError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: config.listen,
        source,
    })?;
    if let Some(policy) = policy.clone().filter(|p| p.path().is_some()) {
        tracker.spawn(policy.watch_file(
            Duration::from_secs(config.auth.policy_poll_secs.max(1)),
            shutdown.clone(),
        ));
    }
    // Installed before the service and layer take their metric handles.
    let metrics = crate::metrics::install();
    let service =
        TokenBrokerService::new(broker.clone(), gate, config.max_message_bytes).into_server();
    let (health, health_service) = tonic_health::server::health_reporter();
    let draining = CancellationToken::new();
    tracker.spawn(report_health(
        health.clone(),
        store_health,
        draining.clone(),
        shutdown.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| AppError::Server(format!("reflection: {e}")))?;
    let admin_addr = match (config.admin_listen, metrics) {
        (Some(at), Some(metrics)) => {
            Some(spawn_admin(at, metrics, broker.clone(), &tracker, shutdown.clone()).await?)
        }
        (Some(_), None) => {
            warn!("admin_listen set, but another metrics recorder is installed: no /metrics");
            None
        }
        (None, _) => None,
    };
    let health_addr = match config.health_listen {
        Some(at) => {
            Some(spawn_health_port(at, health_service.clone(), &tracker, shutdown.clone()).await?)
        }
        None => None,
    };
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(config.auth.max_streams_per_connection)
        .layer(crate::grpc::observe::RpcMetricsLayer::new());
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| AppError::Server(e.to_string()))?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    info!(%addr, sessions = restored, overdue, "tokenbroker serving");
    Ok(RunningBroker {
        addr,
        broker,
        shutdown,
        tracker,
        server,
        grace: Duration::from_secs(config.shutdown_grace_secs),
        draining,
        drain_delay: Duration::from_secs(config.drain_delay_secs),
        admin_addr,
        health_addr,
        sqlite: None,
        postgres: None,
        key_file: None,
        policy,
    })
}

/// Sessions read from the store per page at start.
const RESTORE_PAGE: usize = 10_000;

/// Applies the shared store's changes to this replica until the feed ends
/// (at shutdown). A lost listening connection turns health NOT_SERVING until
/// it is back and every session has been compared with the store; a change
/// that cannot be applied (the database failing) is caught up the same way.
async fn follow_changes(
    broker: Arc<Broker>,
    store: Arc<Monitored>,
    mut changes: tokio::sync::mpsc::Receiver<Change>,
) {
    const RETRY: Duration = Duration::from_secs(1);
    let mut resync_at: Option<tokio::time::Instant> = None;
    loop {
        let resync_due = async {
            match resync_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            change = changes.recv() => {
                let Some(change) = change else { break };
                match change {
                    Change::Lost => {
                        warn!("lost the store's change feed: health NOT_SERVING until it is back");
                        store.report(false);
                        continue;
                    }
                    Change::Resync => {
                        resync_at = None;
                        let outcome = broker.resync().await;
                        if outcome.is_ok() {
                            store.report(true);
                        }
                        outcome
                    }
                    change => broker.apply_change(change).await,
                }
            }
            () = resync_due => {
                resync_at = None;
                let outcome = broker.resync().await;
                if outcome.is_ok() {
                    store.report(true);
                }
                outcome
            }
        };
        if let Err(error) = outcome {
            warn!(%error, "cannot apply the shared store's changes; catching up shortly");
            resync_at.get_or_insert(tokio::time::Instant::now() + RETRY);
        }
    }
}

/// Serves `/metrics` on `at` until shutdown; returns the bound address.
async fn spawn_admin(
    at: SocketAddr,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    broker: Arc<Broker>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AppError> {
    let listener = TcpListener::bind(at)
        .await
        .map_err(|source| AppError::Bind { addr: at, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr: at, source })?;
    let render = move || {
        broker.record_gauges();
        metrics.render()
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    tracker.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            warn!(%error, "admin endpoint failed");
        }
    });
    info!(%addr, "admin endpoint (/metrics) listening");
    Ok(addr)
}

/// Serves only `grpc.health.v1`, in plaintext, on `at` until shutdown (for
/// kubelet's gRPC probes when the main port requires client certificates).
async fn spawn_health_port<S>(
    at: SocketAddr,
    health: S,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AppError>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind(at)
        .await
        .map_err(|source| AppError::Bind { addr: at, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr: at, source })?;
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        );
    tracker.spawn(async move {
        if let Err(error) = server.await {
            warn!(%error, "health port failed");
        }
    });
    info!(%addr, "plaintext health port listening");
    Ok(addr)
}

/// The TLS settings of the gRPC port, read from their files.
fn server_tls(
    tls: &crate::config::TlsConfig,
) -> Result<tonic::transport::ServerTlsConfig, AppError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| ConfigError {
            key: format!("tls.{key}"),
            reason: format!("cannot read {}: {e}", path.display()),
        })
    };
    let identity = tonic::transport::Identity::from_pem(
        read("cert_file", &tls.cert_file)?,
        read("key_file", &tls.key_file)?,
    );
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config
            .client_ca_root(tonic::transport::Certificate::from_pem(read(
                "client_ca_file",
                ca,
            )?))
            .client_auth_optional(false);
    }
    Ok(config)
}

/// The gRPC health service name of the broker.
pub const HEALTH_SERVICE: &str = "tokenbroker.v1.TokenBroker";

/// SERVING while the store accepts writes, NOT_SERVING when it fails and
/// from the start of a drain. An IdP outage does not change it.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    mut store_health: tokio::sync::watch::Receiver<bool>,
    draining: CancellationToken,
    shutdown: CancellationToken,
) {
    use tonic_health::ServingStatus;
    loop {
        let healthy = *store_health.borrow_and_update();
        metrics::gauge!(crate::metrics::STORE_UP).set(if healthy { 1.0 } else { 0.0 });
        let status = if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if !healthy {
            warn!("session store failing: health NOT_SERVING");
        }
        for service in ["", HEALTH_SERVICE] {
            reporter.set_service_status(service, status).await;
        }
        tokio::select! {
            changed = store_health.changed() => if changed.is_err() { break },
            () = draining.cancelled() => break,
            () = shutdown.cancelled() => break,
        }
    }
    for service in ["", HEALTH_SERVICE] {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

impl RunningBroker {
    /// Re-reads the key file (its first key now seals) and re-seals every
    /// stored session not yet sealed under it, while serving. Returns how
    /// many sessions were re-sealed. Bound to SIGHUP by `serve`.
    pub async fn reload_keys(&self) -> Result<u64, AppError> {
        let Some(path) = &self.key_file else {
            return Err(AppError::Keys(
                "keys are inline (TOKENBROKER_KEYS) or the store keeps none: restart to change them"
                    .into(),
            ));
        };
        let keys = KeyRing::load_file(path)
            .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())))?;
        let primary = keys.primary().clone();
        let resealed = match (&self.sqlite, &self.postgres) {
            (Some(sqlite), _) => {
                sqlite.set_keys(keys).await?;
                sqlite.reseal(500).await?
            }
            (None, Some(postgres)) => {
                // Every replica re-seals; a row another one re-sealed first
                // is simply skipped (compare-and-swap on the generation).
                postgres
                    .set_keys(keys)
                    .await
                    .map_err(|e| AppError::OpenShared(e.to_string()))?;
                postgres.reseal(500).await?
            }
            (None, None) => {
                return Err(AppError::Keys(
                    "the memory store keeps no sealed data".into(),
                ));
            }
        };
        info!(key_id = %primary, resealed, "key ring reloaded");
        Ok(resealed)
    }

    /// A token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Drains: health NOT_SERVING at once, then (after `drain_delay_secs`,
    /// still serving meanwhile) stops accepting, ends watch streams with
    /// UNAVAILABLE, lets refreshes in flight land (within the grace period;
    /// each one's write or release ends its lease), then returns.
    pub async fn shutdown(self) -> Result<(), AppError> {
        info!(
            drain_delay_secs = self.drain_delay.as_secs(),
            "draining: health NOT_SERVING"
        );
        self.draining.cancel();
        if !self.drain_delay.is_zero() && !self.shutdown.is_cancelled() {
            tokio::select! {
                () = tokio::time::sleep(self.drain_delay) => {}
                () = self.shutdown.cancelled() => {}
            }
        }
        info!("shutting down");
        self.shutdown.cancel();
        let served = match tokio::time::timeout(self.grace, self.server).await {
            Ok(Ok(result)) => result.map_err(|e| AppError::Server(e.to_string())),
            Ok(Err(join)) => {
                warn!(error = %join, "gRPC server task failed");
                Ok(())
            }
            Err(_) => {
                warn!("gRPC connections did not close within the grace period");
                Ok(())
            }
        };
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tasks = self.tracker.len(),
                "refreshes still running after the grace period"
            );
        }
        if let Some(sqlite) = &self.sqlite {
            sqlite.close().await;
        }
        if let Some(postgres) = &self.postgres {
            postgres.close().await;
        }
        info!("stopped");
        served
    }
}

/// Runs until `signal` resolves, then shuts down.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), AppError> {
    let running = start(&config).await?;
    serve_until(&running, signal).await;
    running.shutdown().await
}

/// Waits for `signal` (or a shutdown from inside), reloading the key ring on SIGHUP.
async fn serve_until(running: &RunningBroker, signal: impl Future<Output = ()>) {
    let stop = running.shutdown_token();
    let mut hangups = crate::telemetry::Hangups::new();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => return,
            () = stop.cancelled() => return,
            () = hangups.recv() => {
                // The policy first (quick); an invalid one keeps the one in
                // force and says why.
                if let Some(policy) = &running.policy
                    && policy.reload().is_ok()
                {
                    info!("SIGHUP: access policy reloaded");
                }
                if running.key_file.is_some()
                    && (running.sqlite.is_some() || running.postgres.is_some())
                    && let Err(error) = running.reload_keys().await
                {
                    warn!(%error, "SIGHUP: key ring not reloaded");
                }
            }
        }
    }
}

/// `tokenbroker rekey`: re-seals every session in `data_dir` under the first
/// key of the key file; with `rotate`, first puts a newly generated key
/// there (keeping the old ones). Safe while `serve` runs on the same data:
/// rows it changes meanwhile are taken again; send it SIGHUP afterwards so
/// that it seals with the new key too.
pub async fn rekey(
    data_dir: &std::path::Path,
    key_file: Option<&std::path::Path>,
    rotate: bool,
) -> Result<(KeyRing, u64), AppError> {
    let path = key_file.map_or_else(
        || data_dir.join(DEFAULT_KEY_FILE),
        std::path::Path::to_path_buf,
    );
    let mut keys = KeyRing::load_file(&path)
        .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())))?;
    if rotate {
        let base = crate::store::seal::KeyId::timestamped(std::time::SystemTime::now());
        // Unique within the ring even when keys are made within one second.
        let id = (1..100)
            .map(|n| match n {
                1 => Ok(base.clone()),
                n => crate::store::seal::KeyId::new(&format!("{base}-{n}")),
            })
            .find(|id| id.as_ref().is_ok_and(|id| !keys.contains(id)))
            .unwrap_or(Ok(base))
            .map_err(|e| AppError::Keys(e.to_string()))?;
        let fresh = KeyRing::generate(id);
        keys = keys
            .with_primary(fresh)
            .map_err(|e| AppError::Keys(e.to_string()))?;
        keys.replace_file(&path)
            .map_err(|e| AppError::Keys(format!("{}: {e}", path.display())))?;
    }
    let db = data_dir.join(crate::store::sqlite::DB_FILE);
    if !db.exists() {
        return Err(AppError::DataDir {
            path: data_dir.to_path_buf(),
            cause: "holds no session database".into(),
        });
    }
    let store = SqliteStore::open(&db, keys.clone()).await?;
    let resealed = store.reseal(500).await?;
    store.close().await;
    Ok((keys, resealed))
}

/// The configuration of `serve`: file, environment, then flags.
pub fn serve_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let mut config = Config::load_from_process(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    match &args.store {
        Some(StoreArg::Memory) => config.store = StoreKind::Memory,
        Some(StoreArg::Sqlite) => config.store = StoreKind::Sqlite,
        Some(StoreArg::Postgres(url)) => {
            config.store = StoreKind::Postgres;
            if let Some(url) = url {
                config.postgres.url = Some(url.clone());
            }
        }
        None => {}
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(file) = &args.key_file {
        config.key_file = Some(file.clone());
    }
    if args.log_json {
        config.log_format = LogFormat::Json;
    }
    if args.insecure_no_auth || args.dev {
        config.auth.insecure_no_auth = true;
    }
    let default = config.default_provider.clone();
    let provider = config.providers.entry(default).or_default();
    if let Some(url) = &args.token_url {
        provider.token_url = url.clone();
        provider.logout_url = None;
        provider.revoke_url = None;
    }
    if let Some(client_id) = &args.client_id {
        provider.client_id = client_id.clone();
    }
    if args.dev && args.token_url.is_none() {
        // Checked again once the dev IdP is up; a placeholder for validation.
        provider.token_url = dev_token_url(args.dev_idp_listen, &RealmSettings::default().realm);
    }
    config.validate()?;
    Ok(config)
}

fn dev_token_url(addr: SocketAddr, realm: &str) -> String {
    format!("http://{addr}/realms/{realm}/protocol/openid-connect/token")
}

/// Runs `serve`: with `--dev`, an in-process dev IdP as the default provider.
pub async fn serve(
    mut config: Config,
    args: &ServeArgs,
    signal: impl Future<Output = ()>,
) -> Result<(), AppError> {
    if !args.dev {
        return run(config, signal).await;
    }
    warn!("--dev: development mode; every caller is allowed and the dev IdP issues test tokens");
    // A throwaway data directory unless one was given: removed on exit.
    let _scratch = match (&args.data_dir, config.store) {
        (None, StoreKind::Sqlite) => {
            let dir = tempfile::Builder::new()
                .prefix("tokenbroker-dev-")
                .tempdir()
                .map_err(|e| AppError::DataDir {
                    path: std::env::temp_dir(),
                    cause: e.to_string(),
                })?;
            config.data_dir = dir.path().to_path_buf();
            Some(dir)
        }
        _ => None,
    };
    let idp_shutdown = CancellationToken::new();
    let settings = RealmSettings {
        access_token_lifespan_secs: 120,
        ..RealmSettings::default()
    };
    let idp = DevIdp::start(settings.clone(), args.dev_idp_listen, idp_shutdown.clone())
        .await
        .map_err(|source| AppError::Bind {
            addr: args.dev_idp_listen,
            source,
        })?;
    if args.token_url.is_none() {
        let default = config.default_provider.clone();
        let provider = config.providers.entry(default).or_default();
        provider.token_url = idp.token_url();
        provider.logout_url = Some(idp.logout_url());
        provider.revoke_url = Some(idp.revoke_url());
        provider.client_id = settings.client_id.clone();
    }
    let running = start(&config).await?;
    print_walkthrough(running.addr, &idp.base_url(), &settings);
    serve_until(&running, signal).await;
    let result = running.shutdown().await;
    idp.shutdown().await;
    result
}

fn print_walkthrough(addr: SocketAddr, idp: &str, settings: &RealmSettings) {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            p.strip_prefix(&cwd).ok().map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| "tokenbroker".into());
    let addr_flag = if addr.to_string() == "127.0.0.1:50051" {
        String::new()
    } else {
        format!(" --addr http://{addr}")
    };
    println!(
        "\ntokenbroker is running in development mode
  gRPC     {addr}   (every caller is allowed)
  dev IdP  {idp}/realms/{realm}   (access tokens live {life} s; refresh tokens rotate; a replay ends the session)

Try it from another terminal:
  {exe} register{addr_flag} --dev-login alice --session-id alice
  {exe} get{addr_flag} alice
  {exe} watch{addr_flag} alice            # every new token, as it is refreshed ahead of expiry
  {exe} get{addr_flag} alice --force      # a refresh right now (the watch shows it)
  {exe} inspect{addr_flag} alice
  {exe} list{addr_flag}
  {exe} delete{addr_flag} alice           # logs alice out at the IdP; the watch ends
Stop with Ctrl-C.\n",
        realm = settings.realm,
        life = settings.access_token_lifespan_secs,
    );
}

/// Runs the dev IdP on its own until `signal`.
pub async fn dev_idp(args: &DevIdpArgs, signal: impl Future<Output = ()>) -> Result<(), AppError> {
    let settings = RealmSettings {
        realm: args.realm.clone(),
        client_id: args.client_id.clone(),
        access_token_lifespan_secs: args.access_token_lifespan,
        sso_session_idle_secs: args.sso_session_idle,
        sso_session_max_secs: args.sso_session_max,
        revoke_refresh_token: !args.no_revoke_refresh_token,
        refresh_token_max_reuse: args.max_reuse,
        ..RealmSettings::default()
    };
    let shutdown = CancellationToken::new();
    let idp = DevIdp::start(settings, args.listen, shutdown.clone())
        .await
        .map_err(|source| AppError::Bind {
            addr: args.listen,
            source,
        })?;
    println!(
        "dev IdP listening: token endpoint {}\nlog a user in: curl -s -X POST {}/admin/login -H 'content-type: application/json' -d '{{\"username\":\"alice\"}}'",
        idp.token_url(),
        idp.base_url()
    );
    signal.await;
    idp.shutdown().await;
    Ok(())
}
