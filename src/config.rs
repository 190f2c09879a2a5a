//! Typed configuration: defaults, then a TOML file, then `TOKENBROKER_*`
//! environment variables (`__` separates nesting levels, e.g.
//! `TOKENBROKER_PROVIDERS__APIAX__CLIENT_ID`), then command-line flags.
//! Everything is validated before any port is bound, with errors that name
//! the offending key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::oidc::Endpoint;
use crate::refresh::{BudgetLimits, Policy};
use crate::secret::ClientSecret;

/// The production Apiax token endpoint.
pub const APIAX_TOKEN_URL: &str =
    "https://auth.apiax.io/auth/realms/apiax/protocol/openid-connect/token";
/// The Apiax client used for refresh grants.
pub const APIAX_CLIENT_ID: &str = "integration-api";

/// A configuration error, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    /// Dotted key path, e.g. `providers.apiax.token_url`.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// `TOKENBROKER_*` variables that belong to command-line flags, not to
/// config keys (`--config`, and the client commands' `--addr`).
pub const FLAG_VARIABLES: &[&str] = &["TOKENBROKER_CONFIG", "TOKENBROKER_ADDR"];

/// Where sessions are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// One SQLite file under `data_dir` (the default).
    Sqlite,
    /// In process memory: lost on exit (tests and demos).
    Memory,
    /// PostgreSQL at `postgres.url`, shared by several replicas (HA).
    Postgres,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Admin HTTP address (`/metrics`); off when unset.
    pub admin_listen: Option<SocketAddr>,
    /// A plaintext gRPC port serving only `grpc.health.v1` (for kubelet's
    /// gRPC probes when the main port uses mTLS); off when unset.
    pub health_listen: Option<SocketAddr>,
    /// Provider used when a registration names none.
    pub default_provider: String,
    /// Identity providers by name.
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Refresh schedule and backoff.
    pub refresh: RefreshConfig,
    /// Session store.
    pub store: StoreKind,
    /// Directory of the SQLite store (and of a generated key file).
    pub data_dir: PathBuf,
    /// Key ring file (`KEY_ID:BASE64` lines, the first seals); default
    /// `<data_dir>/tokenbroker.keys`, generated when the data directory is new.
    pub key_file: Option<PathBuf>,
    /// The key ring inline (same format, lines or commas), e.g. from
    /// `TOKENBROKER_KEYS`; takes precedence over `key_file`. Never printed.
    pub keys: Option<String>,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_bytes: usize,
    /// Largest refresh or access token accepted, in bytes.
    pub max_token_bytes: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// OTLP/gRPC collector to export traces to, e.g. `http://otel-collector:4317`
    /// (needs a build with the `otlp` feature); off when unset.
    pub otlp_endpoint: Option<String>,
    /// Seconds that in-flight work gets to finish on shutdown.
    pub shutdown_grace_secs: u64,
    /// Seconds between turning health NOT_SERVING and closing the port on
    /// shutdown, so that load balancers stop sending calls first.
    pub drain_delay_secs: u64,
    /// Serve gRPC over TLS (required for `auth.source = "mtls"`).
    pub tls: Option<TlsConfig>,
    /// Caller authentication and authorization.
    pub auth: AuthConfig,
    /// The PostgreSQL store (`store = "postgres"`).
    pub postgres: PostgresConfig,
}

/// The shared PostgreSQL store of several replicas (HA mode).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL, e.g. `postgres://tokenbroker@db:5432/tokenbroker`
    /// (best from `TOKENBROKER_POSTGRES__URL`: it may hold a password).
    /// Never printed.
    pub url: Option<String>,
    /// Connections in this replica's pool, counting the one the claim batcher
    /// keeps and the one that listens for changes; below 3 counts as 3.
    pub max_connections: u32,
    /// Seconds a replica's refresh lease on a session lasts without renewal.
    /// Must outlast two upstream requests (a presentation and its one retry).
    pub lease_secs: u64,
    /// Milliseconds to wait for a connection before a call fails.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            lease_secs: 45,
            connect_timeout_ms: 5000,
        }
    }
}

/// Who may call, and what they may do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Where caller identities come from: `mtls`, `xfcc` (Istio/Envoy),
    /// `linkerd`, or `none` (everyone may do everything; logged loudly).
    /// Unset: `serve` refuses to start unless `insecure_no_auth`.
    pub source: Option<crate::auth::IdentitySource>,
    /// The policy file (TOML); required with a source other than `none`.
    pub policy_file: Option<PathBuf>,
    /// Run without any identity source (implied by `--dev`).
    pub insecure_no_auth: bool,
    /// Concurrent watch streams per caller (per connection without auth).
    pub max_streams_per_caller: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// How often the policy file is checked for changes (it also reloads on SIGHUP).
    pub policy_poll_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            source: None,
            policy_file: None,
            insecure_no_auth: false,
            max_streams_per_caller: 100,
            max_streams_per_connection: 200,
            policy_poll_secs: 5,
        }
    }
}

/// TLS on the gRPC port.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the server.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM bundle of the CAs that sign client certificates; when set, every
    /// client must present a certificate signed by one of them.
    pub client_ca_file: Option<PathBuf>,
}

/// One identity provider (an OpenID Connect token endpoint).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Token endpoint URL.
    pub token_url: String,
    /// OAuth client id.
    pub client_id: String,
    /// Client secret for confidential clients.
    pub client_secret: Option<String>,
    /// Logout endpoint; derived from a Keycloak token URL when unset.
    pub logout_url: Option<String>,
    /// RFC 7009 revocation endpoint; derived from a Keycloak token URL when unset.
    pub revoke_url: Option<String>,
    /// TCP/TLS connect timeout.
    pub connect_timeout_ms: u64,
    /// Whole-request timeout.
    pub request_timeout_ms: u64,
    /// Allow a plain `http://` URL to a non-loopback host.
    pub allow_insecure_http: bool,
    /// PEM bundle of extra root certificates to trust for this provider
    /// (system roots are always trusted).
    pub ca_file: Option<PathBuf>,
    /// Refreshes in flight at once.
    pub max_concurrent_refreshes: usize,
    /// Refreshes started per second.
    pub max_refreshes_per_second: u32,
    /// Longest a waiting caller queues for the budget.
    pub budget_max_wait_ms: u64,
    /// Access token lifetime when the answer gives none.
    pub default_access_lifetime_secs: u64,
    /// Refresh token lifetime when the answer gives none (0: unknown).
    pub default_refresh_lifetime_secs: u64,
    /// Largest token-endpoint answer read, in bytes.
    pub max_response_bytes: usize,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            token_url: APIAX_TOKEN_URL.into(),
            client_id: APIAX_CLIENT_ID.into(),
            client_secret: None,
            logout_url: None,
            revoke_url: None,
            connect_timeout_ms: 5_000,
            request_timeout_ms: 15_000,
            allow_insecure_http: false,
            ca_file: None,
            max_concurrent_refreshes: 32,
            max_refreshes_per_second: 50,
            budget_max_wait_ms: 10_000,
            default_access_lifetime_secs: 1_800,
            default_refresh_lifetime_secs: 1_209_600,
            max_response_bytes: 256 * 1024,
        }
    }
}

/// Refresh schedule and backoff.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Fraction of an access token's life after which sessions in use refresh.
    pub early_ratio: f64,
    /// Width of the jitter window around `early_ratio`.
    pub jitter_ratio: f64,
    /// First backoff step.
    pub backoff_base_ms: u64,
    /// Longest backoff between background retries.
    pub backoff_cap_secs: u64,
    /// Longest an on-demand caller is held off after a failure without `Retry-After`.
    pub on_demand_backoff_cap_ms: u64,
    /// How long before an idle refresh token lapses it is refreshed.
    pub keepalive_lead_secs: u64,
    /// Tolerated clock skew.
    pub clock_skew_secs: u64,
    /// `min_ttl` of `GetAccessToken` when unset.
    pub default_min_ttl_secs: u64,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            early_ratio: p.early_ratio,
            jitter_ratio: p.jitter_ratio,
            backoff_base_ms: p.backoff_base.as_millis() as u64,
            backoff_cap_secs: p.backoff_cap.as_secs(),
            on_demand_backoff_cap_ms: p.on_demand_backoff_cap.as_millis() as u64,
            keepalive_lead_secs: p.keepalive_lead.as_secs(),
            clock_skew_secs: p.clock_skew.as_secs(),
            default_min_ttl_secs: 60,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            admin_listen: None,
            health_listen: None,
            default_provider: "apiax".into(),
            providers: BTreeMap::from([("apiax".to_string(), ProviderConfig::default())]),
            refresh: RefreshConfig::default(),
            store: StoreKind::Sqlite,
            data_dir: PathBuf::from("data"),
            key_file: None,
            keys: None,
            max_message_bytes: 64 * 1024,
            max_token_bytes: 16 * 1024,
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            shutdown_grace_secs: 20,
            drain_delay_secs: 0,
            tls: None,
            auth: AuthConfig::default(),
            postgres: PostgresConfig::default(),
        }
    }
}

impl Config {
    /// Defaults, then `file` (if any), then `TOKENBROKER_*` variables from `env`.
    /// `env` is passed in so tests never touch the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // figment's own `Env` provider reads the process environment; taking
        // the variables as an argument keeps tests away from it. Values parse
        // like TOML scalars (numbers, booleans), else stay strings.
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOKENBROKER_") && !FLAG_VARIABLES.contains(&k.as_str()))
            .collect();
        for (key, value) in vars {
            let path = key["TOKENBROKER_".len()..]
                .to_ascii_lowercase()
                .replace("__", ".");
            let value = scalar(&value);
            figment = figment.merge(Serialized::global(&path, value));
        }
        let config: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            ConfigError::new(
                if key.is_empty() {
                    "config".to_string()
                } else {
                    key
                },
                e.kind.to_string(),
            )
        })?;
        Ok(config)
    }

    /// Loads from the real process environment.
    pub fn load_from_process(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load(file, std::env::vars())
    }

    /// Checks every value; the first problem names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.providers.contains_key(&self.default_provider) {
            return Err(ConfigError::new(
                "default_provider",
                format!(
                    "no provider named {:?} is configured",
                    self.default_provider
                ),
            ));
        }
        for (name, provider) in &self.providers {
            let key = |field: &str| format!("providers.{name}.{field}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::new(
                    format!("providers.{name}"),
                    "provider names use A-Z a-z 0-9 - _",
                ));
            }
            if provider.client_id.is_empty() {
                return Err(ConfigError::new(key("client_id"), "must not be empty"));
            }
            for (field, value) in [
                ("connect_timeout_ms", provider.connect_timeout_ms),
                ("request_timeout_ms", provider.request_timeout_ms),
                (
                    "default_access_lifetime_secs",
                    provider.default_access_lifetime_secs,
                ),
            ] {
                if value == 0 {
                    return Err(ConfigError::new(key(field), "must be greater than 0"));
                }
            }
            if provider.max_concurrent_refreshes == 0 {
                return Err(ConfigError::new(
                    key("max_concurrent_refreshes"),
                    "must be greater than 0",
                ));
            }
            if provider.max_refreshes_per_second == 0 {
                return Err(ConfigError::new(
                    key("max_refreshes_per_second"),
                    "must be greater than 0",
                ));
            }
            self.endpoint(name, provider)?
                .validate()
                .map_err(|e| endpoint_error(name, &e))?;
        }
        let r = &self.refresh;
        if !(0.1..=0.95).contains(&r.early_ratio) {
            return Err(ConfigError::new(
                "refresh.early_ratio",
                "must be between 0.1 and 0.95",
            ));
        }
        if !(0.0..=0.5).contains(&r.jitter_ratio) {
            return Err(ConfigError::new(
                "refresh.jitter_ratio",
                "must be between 0 and 0.5",
            ));
        }
        if r.backoff_base_ms == 0 {
            return Err(ConfigError::new(
                "refresh.backoff_base_ms",
                "must be greater than 0",
            ));
        }
        if r.backoff_cap_secs * 1000 < r.backoff_base_ms {
            return Err(ConfigError::new(
                "refresh.backoff_cap_secs",
                "must not be below backoff_base_ms",
            ));
        }
        use crate::auth::IdentitySource;
        match (self.auth.source, self.auth.insecure_no_auth) {
            (None, false) => {
                return Err(ConfigError::new(
                    "auth.source",
                    "no caller identity source is configured: set auth.source (mtls, xfcc, \
                     linkerd or none) with a policy file, or pass --insecure-no-auth",
                ));
            }
            (Some(IdentitySource::Mtls), _)
                if self
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_ca_file.as_ref())
                    .is_none() =>
            {
                return Err(ConfigError::new(
                    "tls.client_ca_file",
                    "auth.source = \"mtls\" needs [tls] with client_ca_file",
                ));
            }
            (Some(source), _)
                if source != IdentitySource::None && self.auth.policy_file.is_none() =>
            {
                return Err(ConfigError::new(
                    "auth.policy_file",
                    "an identity source needs a policy file (default deny)",
                ));
            }
            _ => {}
        }
        if self.auth.max_streams_per_caller == 0 || self.auth.max_streams_per_connection == 0 {
            return Err(ConfigError::new(
                "auth.max_streams_per_caller",
                "must be greater than 0",
            ));
        }
        if self.store == StoreKind::Postgres {
            self.validate_postgres()?;
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(ConfigError::new(
                    "otlp_endpoint",
                    "must be an http:// or https:// URL of an OTLP/gRPC collector",
                ));
            }
            if !cfg!(feature = "otlp") {
                return Err(ConfigError::new(
                    "otlp_endpoint",
                    "this build has no OTLP exporter: build with `cargo build --features otlp`",
                ));
            }
        }
        if self.max_message_bytes < 4096 {
            return Err(ConfigError::new(
                "max_message_bytes",
                "must be at least 4096",
            ));
        }
        if self.max_token_bytes == 0 || self.max_token_bytes > self.max_message_bytes {
            return Err(ConfigError::new(
                "max_token_bytes",
                "must be between 1 and max_message_bytes",
            ));
        }
        Ok(())
    }

    fn validate_postgres(&self) -> Result<(), ConfigError> {
        let pg = &self.postgres;
        match pg.url.as_deref() {
            None | Some("") => {
                return Err(ConfigError::new(
                    "postgres.url",
                    "store = \"postgres\" needs a connection URL (TOKENBROKER_POSTGRES__URL)",
                ));
            }
            Some(url) if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) => {
                return Err(ConfigError::new(
                    "postgres.url",
                    "must start with postgres:// or postgresql://",
                ));
            }
            Some(_) => {}
        }
        if pg.max_connections == 0 {
            return Err(ConfigError::new(
                "postgres.max_connections",
                "must be greater than 0",
            ));
        }
        if pg.connect_timeout_ms == 0 {
            return Err(ConfigError::new(
                "postgres.connect_timeout_ms",
                "must be greater than 0",
            ));
        }
        // A lease must outlast a presentation and its one retry, so that no
        // other replica can claim the session while a request may still be
        // on its way to the provider.
        let slowest = self
            .providers
            .values()
            .map(|p| p.request_timeout_ms)
            .max()
            .unwrap_or(0);
        let needed_ms = 2 * slowest + 5000;
        if pg.lease_secs * 1000 < needed_ms {
            return Err(ConfigError::new(
                "postgres.lease_secs",
                format!(
                    "must be at least {} s: two upstream requests (request_timeout_ms of \
                     the slowest provider) plus 5 s",
                    needed_ms.div_ceil(1000)
                ),
            ));
        }
        if self.keys.is_none() && self.key_file.is_none() {
            return Err(ConfigError::new(
                "key_file",
                "store = \"postgres\" needs the replicas' shared key ring: set key_file \
                 or TOKENBROKER_KEYS (keys are never generated for a shared database)",
            ));
        }
        Ok(())
    }

    /// The token-endpoint settings of one provider (reads its `ca_file`).
    pub fn endpoint(&self, name: &str, provider: &ProviderConfig) -> Result<Endpoint, ConfigError> {
        let mut endpoint = Endpoint::new_default(name, &provider.token_url, &provider.client_id);
        endpoint.client_secret = provider.client_secret.clone().map(ClientSecret::new);
        endpoint.logout_url = provider
            .logout_url
            .clone()
            .or_else(|| keycloak_sibling(&provider.token_url, "logout"));
        endpoint.revoke_url = provider
            .revoke_url
            .clone()
            .or_else(|| keycloak_sibling(&provider.token_url, "revoke"));
        endpoint.connect_timeout = Duration::from_millis(provider.connect_timeout_ms);
        endpoint.request_timeout = Duration::from_millis(provider.request_timeout_ms);
        endpoint.max_body_bytes = provider.max_response_bytes;
        endpoint.default_access_lifetime =
            Duration::from_secs(provider.default_access_lifetime_secs);
        endpoint.default_refresh_lifetime = (provider.default_refresh_lifetime_secs > 0)
            .then(|| Duration::from_secs(provider.default_refresh_lifetime_secs));
        endpoint.allow_insecure_http = provider.allow_insecure_http;
        if let Some(path) = &provider.ca_file {
            endpoint.extra_roots_pem = Some(std::fs::read(path).map_err(|e| {
                ConfigError::new(
                    format!("providers.{name}.ca_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?);
        }
        Ok(endpoint)
    }

    /// The budget of one provider.
    pub fn budget(provider: &ProviderConfig) -> BudgetLimits {
        BudgetLimits {
            max_concurrent: provider.max_concurrent_refreshes,
            per_second: provider.max_refreshes_per_second,
            max_wait: Duration::from_millis(provider.budget_max_wait_ms),
        }
    }

    /// The refresh schedule.
    pub fn policy(&self) -> Policy {
        let r = &self.refresh;
        Policy {
            early_ratio: r.early_ratio,
            jitter_ratio: r.jitter_ratio,
            backoff_base: Duration::from_millis(r.backoff_base_ms),
            backoff_cap: Duration::from_secs(r.backoff_cap_secs),
            on_demand_backoff_cap: Duration::from_millis(r.on_demand_backoff_cap_ms),
            keepalive_lead: Duration::from_secs(r.keepalive_lead_secs),
            clock_skew: Duration::from_secs(r.clock_skew_secs),
        }
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.keys.is_some() {
            shown.keys = Some("[redacted]".into());
        }
        if shown.postgres.url.is_some() {
            shown.postgres.url = Some("[redacted]".into());
        }
        for provider in shown.providers.values_mut() {
            if provider.client_secret.is_some() {
                provider.client_secret = Some("[redacted]".into());
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// Names the config key of an endpoint problem.
pub fn endpoint_error(provider: &str, error: &crate::oidc::EndpointError) -> ConfigError {
    let key = match error.field() {
        Some("provider") | None => format!("providers.{provider}"),
        Some(field) => {
            let key = match field {
                "connect_timeout" => "connect_timeout_ms",
                "request_timeout" => "request_timeout_ms",
                "max_body_bytes" => "max_response_bytes",
                "extra_roots_pem" => "ca_file",
                "default_access_lifetime" => "default_access_lifetime_secs",
                "default_refresh_lifetime" => "default_refresh_lifetime_secs",
                other => other,
            };
            format!("providers.{provider}.{key}")
        }
    };
    let reason = match error {
        crate::oidc::EndpointError::Invalid { reason, .. } => reason.clone(),
        other => other.to_string(),
    };
    ConfigError::new(key, reason)
}

/// An environment value as a TOML scalar would read: bool, integer, float, else string.
fn scalar(raw: &str) -> figment::value::Value {
    if let Ok(b) = raw.parse::<bool>() {
        b.into()
    } else if let Ok(i) = raw.parse::<i64>() {
        i.into()
    } else if let Ok(f) = raw.parse::<f64>() {
        f.into()
    } else {
        raw.into()
    }
}

/// `…/protocol/openid-connect/{endpoint}` next to a Keycloak token URL.
fn keycloak_sibling(token_url: &str, endpoint: &str) -> Option<String> {
    token_url
        .strip_suffix("/protocol/openid-connect/token")
        .map(|realm| format!("{realm}/protocol/openid-connect/{endpoint}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_point_at_apiax_production() {
        let config =
            Config::load(None, env(&[("TOKENBROKER_AUTH__INSECURE_NO_AUTH", "true")])).unwrap();
        config.validate().unwrap();
        let apiax = &config.providers["apiax"];
        assert_eq!(apiax.token_url, APIAX_TOKEN_URL);
        assert_eq!(apiax.client_id, "integration-api");
        let endpoint = config.endpoint("apiax", apiax).unwrap();
        assert_eq!(
            endpoint.logout_url.as_deref(),
            Some("https://auth.apiax.io/auth/realms/apiax/protocol/openid-connect/logout")
        );
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
    }

    #[test]
    fn file_then_env_layering() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "listen = \"127.0.0.1:6000\"\n[providers.staging]\ntoken_url = \"https://staging.example/realms/x/protocol/openid-connect/token\"\nclient_id = \"c\""
        )
        .unwrap();
        let config = Config::load(
            Some(file.path()),
            env(&[
                ("TOKENBROKER_LISTEN", "127.0.0.1:7000"),
                ("TOKENBROKER_PROVIDERS__STAGING__REQUEST_TIMEOUT_MS", "7500"),
                ("TOKENBROKER_AUTH__SOURCE", "none"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.providers["staging"].request_timeout_ms, 7500);
        assert_eq!(config.providers["staging"].client_id, "c");
        assert!(config.providers.contains_key("apiax"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = Config::load(None, env(&[("TOKENBROKER_LISTEN", "not-an-address")])).unwrap_err();
        assert_eq!(err.key, "listen", "{err}");
        let err = Config::load(None, env(&[("TOKENBROKER_NO_SUCH_KEY", "1")])).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");

        let config = Config {
            default_provider: "nope".into(),
            ..Config::default()
        };
        assert_eq!(config.validate().unwrap_err().key, "default_provider");

        let mut config = Config::default();
        config.providers.get_mut("apiax").unwrap().client_id.clear();
        assert_eq!(
            config.validate().unwrap_err().key,
            "providers.apiax.client_id"
        );

        let mut config = Config::default();
        config.refresh.early_ratio = 1.5;
        assert_eq!(config.validate().unwrap_err().key, "refresh.early_ratio");
    }

    #[test]
    fn authentication_must_be_chosen_and_complete() {
        use crate::auth::IdentitySource;
        let mut config = Config::default();
        assert_eq!(
            config.validate().unwrap_err().key,
            "auth.source",
            "no silent default"
        );
        config.auth.insecure_no_auth = true;
        config.validate().unwrap();

        let mut config = Config::default();
        config.auth.source = Some(IdentitySource::Xfcc);
        assert_eq!(config.validate().unwrap_err().key, "auth.policy_file");
        config.auth.policy_file = Some("policy.toml".into());
        config.validate().unwrap();

        config.auth.source = Some(IdentitySource::Mtls);
        assert_eq!(config.validate().unwrap_err().key, "tls.client_ca_file");
        config.tls = Some(TlsConfig {
            cert_file: "tls.crt".into(),
            key_file: "tls.key".into(),
            client_ca_file: Some("ca.crt".into()),
        });
        config.validate().unwrap();

        let from_env = Config::load(None, env(&[("TOKENBROKER_AUTH__SOURCE", "linkerd")])).unwrap();
        assert_eq!(from_env.auth.source, Some(IdentitySource::Linkerd));
        let err = Config::load(None, env(&[("TOKENBROKER_AUTH__SOURCE", "kerberos")])).unwrap_err();
        assert_eq!(err.key, "auth.source", "{err}");
    }

    #[test]
    fn printing_redacts_secrets() {
        let mut config = Config::default();
        config.providers.get_mut("apiax").unwrap().client_secret = Some("s3cr3t-value".into());
        config.keys = Some("k1:c2VjcmV0LWtleS1tYXRlcmlhbC1zZWNyZXQta2V5LW1hdA==".into());
        let shown = config.redacted_toml();
        assert!(!shown.contains("s3cr3t-value"));
        assert!(!shown.contains("c2VjcmV0"));
        assert!(shown.contains("[redacted]"));

        config.postgres.url = Some("postgres://tb:hunter2@db/tb".into());
        assert!(!config.redacted_toml().contains("hunter2"));
    }

    #[test]
    fn flag_variables_are_not_config_keys() {
        let config = Config::load(
            None,
            env(&[
                ("TOKENBROKER_CONFIG", "/etc/tokenbroker/config.toml"),
                ("TOKENBROKER_ADDR", "http://127.0.0.1:50051"),
                ("TOKENBROKER_LISTEN", "127.0.0.1:6001"),
            ]),
        )
        .unwrap();
        assert_eq!(config.listen.port(), 6001);
    }

    #[test]
    fn postgres_needs_a_url_a_shared_key_and_a_long_enough_lease() {
        let base = || {
            Config::load(
                None,
                env(&[
                    ("TOKENBROKER_AUTH__INSECURE_NO_AUTH", "true"),
                    ("TOKENBROKER_STORE", "postgres"),
                ]),
            )
            .unwrap()
        };
        let config = base();
        assert_eq!(config.store, StoreKind::Postgres);
        assert_eq!(config.validate().unwrap_err().key, "postgres.url");

        let mut config = base();
        config.postgres.url = Some("mysql://db/tb".into());
        assert_eq!(config.validate().unwrap_err().key, "postgres.url");

        let mut config = base();
        config.postgres.url = Some("postgres://db/tb".into());
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.key, "key_file",
            "keys are never generated for HA: {err}"
        );

        config.keys = Some("k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into());
        config.validate().unwrap();

        // Default request timeout 15 s: a lease must cover two requests + 5 s.
        config.postgres.lease_secs = 34;
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "postgres.lease_secs");
        assert!(err.reason.contains("35 s"), "{err}");
        config.postgres.lease_secs = 35;
        config.validate().unwrap();

        let config = Config::load(
            None,
            env(&[
                ("TOKENBROKER_STORE", "postgres"),
                ("TOKENBROKER_POSTGRES__URL", "postgres://db/tb"),
                ("TOKENBROKER_POSTGRES__LEASE_SECS", "60"),
            ]),
        )
        .unwrap();
        assert_eq!(config.postgres.url.as_deref(), Some("postgres://db/tb"));
        assert_eq!(config.postgres.lease_secs, 60);
    }
}
