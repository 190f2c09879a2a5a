//! The test harness: a real dev IdP over HTTP and a real tokenbroker gRPC
//! server, both on 127.0.0.1:0, and a tonic client; [`process`] runs the
//! broker as real `tokenbroker serve` processes instead, and [`pg`] gives a
//! test a fresh PostgreSQL database.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod pg;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::app::{self, RunningBroker};
use tokenbroker::config::Config;
use tokenbroker::devidp::{DevIdp, LoginTokens, RealmSettings, RunningDevIdp};
use tokenbroker::pb;
use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokenbroker::store::SessionStore;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_types::StatusExt as _;

type ConfigTweak = Box<dyn FnOnce(&mut Config)>;

/// Builder for a broker wired to its own dev IdP.
pub struct TestBroker {
    realm: RealmSettings,
    tweaks: Vec<ConfigTweak>,
    store: Option<Arc<dyn SessionStore>>,
    data_dir: Option<std::path::PathBuf>,
}

/// A running pair.
pub struct Running {
    pub config: Config,
    pub scratch: Option<tempfile::TempDir>,
    pub idp: RunningDevIdp,
    pub broker: RunningBroker,
    pub client: TokenBrokerClient<Channel>,
    idp_shutdown: CancellationToken,
}

impl TestBroker {
    pub fn new() -> Self {
        Self {
            realm: RealmSettings::default(),
            tweaks: Vec::new(),
            store: None,
            data_dir: None,
        }
    }

    /// Keeps the SQLite store in this directory (e.g. across restarts);
    /// by default each broker gets a fresh temporary one.
    pub fn data_dir(mut self, dir: &std::path::Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Serves over this store instead of the configured one.
    pub fn store(mut self, store: Arc<dyn SessionStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Changes the dev IdP's realm settings.
    pub fn realm(mut self, f: impl FnOnce(&mut RealmSettings)) -> Self {
        f(&mut self.realm);
        self
    }

    /// Changes the broker's config.
    pub fn config(mut self, f: impl FnOnce(&mut Config) + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    pub async fn start(self) -> Running {
        let idp_shutdown = CancellationToken::new();
        let idp = DevIdp::start(
            self.realm,
            "127.0.0.1:0".parse().unwrap(),
            idp_shutdown.clone(),
        )
        .await
        .expect("dev IdP starts");
        let scratch = match &self.data_dir {
            Some(_) => None,
            None => Some(tempfile::tempdir().expect("a temporary data directory")),
        };
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| scratch.as_ref().unwrap().path().to_path_buf());
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shutdown_grace_secs: 5,
            data_dir,
            ..Config::default()
        };
        config.auth.insecure_no_auth = true;
        config.refresh.backoff_base_ms = 100;
        config.refresh.on_demand_backoff_cap_ms = 200;
        let provider = config.providers.get_mut("apiax").unwrap();
        provider.token_url = idp.token_url();
        provider.logout_url = Some(idp.logout_url());
        provider.revoke_url = Some(idp.revoke_url());
        provider.request_timeout_ms = 2_000;
        provider.connect_timeout_ms = 200;
        provider.max_concurrent_refreshes = 64;
        provider.max_refreshes_per_second = 10_000;
        for tweak in self.tweaks {
            tweak(&mut config);
        }
        let broker = match self.store {
            Some(store) => app::start_with_store(&config, store).await,
            None => app::start(&config).await,
        }
        .expect("broker starts");
        let client = TokenBrokerClient::connect(format!("http://{}", broker.addr))
            .await
            .expect("client connects");
        Running {
            config,
            scratch,
            idp,
            broker,
            client,
            idp_shutdown,
        }
    }
}

impl Running {
    pub fn idp(&self) -> &DevIdp {
        &self.idp.idp
    }

    /// Logs `user` in at the dev IdP and registers the refresh token only
    /// (the broker validates it with one refresh).
    pub async fn register(&mut self, session_id: &str, user: &str) -> (LoginTokens, pb::Session) {
        let login = self.idp().login(user);
        let answer = self
            .client
            .register_session(pb::RegisterSessionRequest {
                session_id: session_id.into(),
                refresh_token: login.refresh_token.clone(),
                ..Default::default()
            })
            .await
            .expect("registration succeeds")
            .into_inner();
        (login, answer.session.unwrap())
    }

    /// Registers with the login's access token, which expires in `expires_in`.
    pub async fn register_with_token(
        &mut self,
        session_id: &str,
        user: &str,
        expires_in: Duration,
    ) -> LoginTokens {
        let login = self.idp().login(user);
        self.client
            .register_session(pb::RegisterSessionRequest {
                session_id: session_id.into(),
                refresh_token: login.refresh_token.clone(),
                access_token: login.access_token.clone(),
                expires_in: Some(duration(expires_in)),
                refresh_expires_in: Some(duration(Duration::from_secs(login.refresh_expires_in))),
                scope: login.scope.clone(),
                ..Default::default()
            })
            .await
            .expect("registration succeeds");
        login
    }

    pub async fn get(
        &mut self,
        session_id: &str,
        min_ttl: Option<Duration>,
        force: bool,
    ) -> Result<pb::AccessToken, tonic::Status> {
        self.client
            .get_access_token(pb::GetAccessTokenRequest {
                session_id: session_id.into(),
                min_ttl: min_ttl.map(duration),
                force_refresh: force,
            })
            .await
            .map(|r| r.into_inner().token.unwrap())
    }

    /// Opens a watch stream that must be accepted.
    pub async fn watch(&mut self, session_id: &str) -> tonic::Streaming<pb::WatchTokenResponse> {
        self.client
            .watch_token(pb::WatchTokenRequest {
                session_id: session_id.into(),
            })
            .await
            .expect("watch accepted")
            .into_inner()
    }

    pub async fn session(&mut self, session_id: &str) -> Result<pb::Session, tonic::Status> {
        self.client
            .get_session(pb::GetSessionRequest {
                session_id: session_id.into(),
            })
            .await
            .map(|r| r.into_inner().session.unwrap())
    }

    /// Stops the broker and starts a new one on the same data and IdP.
    pub async fn restart(&mut self) {
        self.restart_with(|_| {}).await.expect("broker restarts");
    }

    /// Like [`Running::restart`], changing the config first; the broker
    /// stays stopped if it fails to start.
    pub async fn restart_with(
        &mut self,
        change: impl FnOnce(&mut Config),
    ) -> Result<(), tokenbroker::app::AppError> {
        change(&mut self.config);
        let config = self.config.clone();
        let placeholder = app::start(&Config {
            store: tokenbroker::config::StoreKind::Memory,
            ..config.clone()
        })
        .await
        .expect("placeholder broker");
        let old = std::mem::replace(&mut self.broker, placeholder);
        old.shutdown().await.expect("clean shutdown");
        let fresh = app::start(&config).await;
        let fresh = match fresh {
            Ok(fresh) => fresh,
            Err(error) => return Err(error),
        };
        let placeholder = std::mem::replace(&mut self.broker, fresh);
        placeholder.shutdown().await.expect("clean shutdown");
        self.client = TokenBrokerClient::connect(format!("http://{}", self.broker.addr))
            .await
            .expect("client connects");
        Ok(())
    }

    pub async fn stop(self) {
        self.broker.shutdown().await.expect("clean shutdown");
        self.idp_shutdown.cancel();
        self.idp.shutdown().await;
    }
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// The `ErrorInfo` reason of a status (panics if it has none).
pub fn reason(status: &tonic::Status) -> String {
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "tokenbroker.v1");
    info.reason
}

/// Asserts the code and reason of a failed call.
#[track_caller]
pub fn assert_error<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    expected_reason: &str,
) -> tonic::Status {
    let status = result.expect_err("the call must fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status), expected_reason, "{status:?}");
    status
}

/// Waits for the next stream message, bounded.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::WatchTokenResponse>,
    within: Duration,
) -> Option<pb::watch_token_response::Event> {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("a watch event in time")
        .expect("stream ok")
        .map(|m| m.event.expect("event set"))
}
