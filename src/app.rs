//! Wiring and task ownership: builds the parts from a validated [`Config`],
//! serves gRPC, and shuts everything down in order. Nothing else lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::{Broker, BrokerSettings};
use crate::cli::{DevIdpArgs, ServeArgs, StoreArg};
use crate::config::{Config, ConfigError, LogFormat, StoreKind};
use crate::devidp::{DevIdp, RealmSettings};
use crate::grpc::TokenBrokerService;
use crate::oidc::TokenClient;
use crate::refresh::{Budget, Provider, Providers, Refresher, scheduler_channel};
use crate::session::Registry;
use crate::store::{MemoryStore, SessionStore, StoreError};

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
    Server(#[from] tonic::transport::Error),
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
}

/// Builds the providers of a validated config.
pub fn providers(config: &Config) -> Result<Providers, ConfigError> {
    let mut built = Vec::with_capacity(config.providers.len());
    for (name, provider) in &config.providers {
        let client = TokenClient::new(config.endpoint(name, provider))
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
    let store: Arc<dyn SessionStore> = match config.store {
        StoreKind::Memory => {
            warn!("memory store: every session is lost when the process exits");
            Arc::new(MemoryStore::new())
        }
    };
    start_with_store(config, store).await
}

/// Like [`start`], over a store the caller built (tests inject failures this way).
pub async fn start_with_store(
    config: &Config,
    store: Arc<dyn SessionStore>,
) -> Result<RunningBroker, AppError> {
    config.validate()?;
    let providers = providers(config)?;
    let stored = store.load_all().await?;

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
    let restored = broker.restore(stored);

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
    let service = TokenBrokerService::new(broker.clone()).into_server(config.max_message_bytes);
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    info!(%addr, sessions = restored, "tokenbroker serving");
    Ok(RunningBroker {
        addr,
        broker,
        shutdown,
        tracker,
        server,
        grace: Duration::from_secs(config.shutdown_grace_secs),
    })
}

impl RunningBroker {
    /// A token that stops the broker when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, ends watch streams, lets refreshes in flight land
    /// (within the grace period), then returns.
    pub async fn shutdown(self) -> Result<(), AppError> {
        info!("shutting down");
        self.shutdown.cancel();
        let served = match tokio::time::timeout(self.grace, self.server).await {
            Ok(Ok(result)) => result.map_err(AppError::from),
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
        info!("stopped");
        served
    }
}

/// Runs until `signal` resolves, then shuts down.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), AppError> {
    let running = start(&config).await?;
    tokio::select! {
        () = signal => {}
        () = running.shutdown.cancelled() => {}
    }
    running.shutdown().await
}

/// The configuration of `serve`: file, environment, then flags.
pub fn serve_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let mut config = Config::load_from_process(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(StoreArg::Memory) = args.store {
        config.store = StoreKind::Memory;
    }
    if args.log_json {
        config.log_format = LogFormat::Json;
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
    let stop = running.shutdown_token();
    tokio::select! {
        () = signal => {}
        () = stop.cancelled() => {}
    }
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
  gRPC     {addr}   (every caller is allowed; sessions live in memory)
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
