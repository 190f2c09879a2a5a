//! The command line: `serve`, `dev-idp`, and client commands that call a
//! running broker over gRPC so a person can use it with nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::pb;
use crate::pb::token_broker_client::TokenBrokerClient;

/// tokenbroker: holds OAuth 2.0 sessions and hands out access tokens over gRPC.
#[derive(Debug, Parser)]
#[command(name = "tokenbroker", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Run the development identity provider (a Keycloak-like token endpoint).
    DevIdp(DevIdpArgs),
    /// Re-seal every stored session under the first key of the key file
    /// (safe while `serve` runs; then send it SIGHUP).
    Rekey(RekeyArgs),
    /// Register a session from a refresh token.
    Register(RegisterArgs),
    /// Print an access token of a session.
    Get(GetArgs),
    /// Print every new access token of a session as it arrives.
    Watch(IdArgs),
    /// Print a session's metadata.
    Inspect(IdArgs),
    /// List sessions.
    List(ListArgs),
    /// Log a session out upstream and delete it.
    Delete(IdArgs),
}

/// `serve` flags; each overrides the config file and environment.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "TOKENBROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Token endpoint URL of the default provider (plain http:// only to loopback).
    #[arg(long)]
    pub token_url: Option<String>,
    /// Client id of the default provider.
    #[arg(long)]
    pub client_id: Option<String>,
    /// Session store: sqlite, memory, or a PostgreSQL URL
    /// (postgres://…, several replicas on one database) [default: sqlite].
    #[arg(long, value_parser = parse_store)]
    pub store: Option<StoreArg>,
    /// Data directory of the SQLite store [default: ./data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Key ring file [default: DATA_DIR/tokenbroker.keys].
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
    /// Development mode: an in-process dev IdP as the default provider, every
    /// caller allowed, and a walkthrough printed at start.
    #[arg(long)]
    pub dev: bool,
    /// Serve without any caller authentication (implied by --dev). Every
    /// process that reaches the port may then read every token.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Where the dev IdP listens in `--dev` mode.
    #[arg(long, default_value = "127.0.0.1:8180")]
    pub dev_idp_listen: SocketAddr,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// `rekey` flags.
#[derive(Debug, Args)]
pub struct RekeyArgs {
    /// Data directory of the SQLite store.
    #[arg(long, default_value = "data")]
    pub data_dir: PathBuf,
    /// Key ring file [default: DATA_DIR/tokenbroker.keys].
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// First generate a new key and put it at the top of the key file (the
    /// old keys stay, to open what is not re-sealed yet).
    #[arg(long)]
    pub rotate: bool,
}

/// Store choice on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreArg {
    /// One SQLite file in the data directory.
    Sqlite,
    /// In memory; lost on exit.
    Memory,
    /// PostgreSQL: the URL here, or `postgres.url` from the config.
    Postgres(Option<String>),
}

/// Parses `--store`.
fn parse_store(value: &str) -> Result<StoreArg, String> {
    match value {
        "sqlite" => Ok(StoreArg::Sqlite),
        "memory" => Ok(StoreArg::Memory),
        "postgres" | "postgresql" => Ok(StoreArg::Postgres(None)),
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(StoreArg::Postgres(Some(url.to_owned())))
        }
        _ => Err("expected sqlite, memory, postgres, or a postgres:// URL".into()),
    }
}

/// `dev-idp` flags.
#[derive(Debug, Args)]
pub struct DevIdpArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8180")]
    pub listen: SocketAddr,
    /// Realm name.
    #[arg(long, default_value = "apiax")]
    pub realm: String,
    /// The client id it accepts.
    #[arg(long, default_value = "integration-api")]
    pub client_id: String,
    /// Access token lifespan in seconds.
    #[arg(long, default_value_t = 1800)]
    pub access_token_lifespan: u64,
    /// SSO session idle timeout in seconds.
    #[arg(long, default_value_t = 14 * 24 * 3600)]
    pub sso_session_idle: u64,
    /// SSO session maximum in seconds.
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    pub sso_session_max: u64,
    /// Turn off refresh-token revocation (Keycloak's own default).
    #[arg(long)]
    pub no_revoke_refresh_token: bool,
    /// Refresh token max reuse (with revocation on).
    #[arg(long, default_value_t = 0)]
    pub max_reuse: u32,
}

/// Where the broker is.
#[derive(Debug, Args)]
pub struct Target {
    /// Broker address.
    #[arg(
        long,
        env = "TOKENBROKER_ADDR",
        default_value = "http://127.0.0.1:50051"
    )]
    pub addr: String,
}

/// `register` flags.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    target: Target,
    /// Session id (empty: the broker makes one).
    #[arg(long, default_value = "")]
    session_id: String,
    /// Read the refresh token from this file (`-`: standard input).
    #[arg(long, conflicts_with = "dev_login")]
    refresh_token_file: Option<PathBuf>,
    /// Log this user in at the dev IdP and register the login (dev only).
    #[arg(long)]
    dev_login: Option<String>,
    /// Dev IdP base URL for `--dev-login`.
    #[arg(long, default_value = "http://127.0.0.1:8180")]
    dev_idp: String,
    /// Provider name (empty: the default).
    #[arg(long, default_value = "")]
    provider: String,
    /// Label as KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Replace a session with the same id.
    #[arg(long)]
    replace: bool,
}

/// `get` flags.
#[derive(Debug, Args)]
pub struct GetArgs {
    #[command(flatten)]
    target: Target,
    /// Session id.
    session_id: String,
    /// Minimum remaining lifetime in seconds.
    #[arg(long)]
    min_ttl: Option<u64>,
    /// Ask for a token newer than the current one.
    #[arg(long)]
    force: bool,
}

/// A command that names one session.
#[derive(Debug, Args)]
pub struct IdArgs {
    #[command(flatten)]
    target: Target,
    /// Session id.
    session_id: String,
}

/// `list` flags.
#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Only sessions in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only sessions with this label, KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Sessions per page.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
}

/// Session state on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Usable.
    Active,
    /// Needs a new login.
    ReauthRequired,
}

fn parse_label(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {raw:?}"))
}

/// A failed client command, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker answered with an error.
    #[error("{}", describe_status(.0))]
    Status(#[from] tonic::Status),
    /// No connection.
    #[error("cannot reach the broker: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

fn describe_status(status: &tonic::Status) -> String {
    let reason = status
        .get_details_error_info()
        .map(|info| format!(" {}", info.reason))
        .unwrap_or_default();
    let retry = status
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .map(|d| format!(" (retry in {:.1}s)", d.as_secs_f64()))
        .unwrap_or_default();
    format!("{:?}{reason}: {}{retry}", status.code(), status.message())
}

async fn connect(target: &Target) -> Result<TokenBrokerClient<Channel>, ClientError> {
    Ok(TokenBrokerClient::connect(target.addr.clone()).await?)
}

/// Runs a client command.
pub async fn run_client(command: Command) -> Result<(), ClientError> {
    match command {
        Command::Register(args) => register(args).await,
        Command::Get(args) => {
            let mut client = connect(&args.target).await?;
            let token = client
                .get_access_token(pb::GetAccessTokenRequest {
                    session_id: args.session_id,
                    min_ttl: args.min_ttl.map(|s| duration(Duration::from_secs(s))),
                    force_refresh: args.force,
                })
                .await?
                .into_inner()
                .token
                .ok_or_else(|| ClientError::Other("empty answer".into()))?;
            eprintln!(
                "generation {}, expires in {}",
                token.generation,
                remaining(token.expires_at.as_ref())
            );
            // Printing the access token is what `get` is for; nothing prints a refresh token.
            println!("{}", token.access_token);
            Ok(())
        }
        Command::Watch(args) => {
            let mut client = connect(&args.target).await?;
            let mut stream = client
                .watch_token(pb::WatchTokenRequest {
                    session_id: args.session_id,
                })
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                use pb::watch_token_response::Event;
                match message.event {
                    Some(Event::Token(token)) => println!(
                        "token generation={} expires_in={} {}",
                        token.generation,
                        remaining(token.expires_at.as_ref()),
                        abbreviate(&token.access_token)
                    ),
                    Some(Event::ReauthWarning(w)) => println!(
                        "warning: the user must log in again within {}",
                        remaining(w.reauth_due_at.as_ref())
                    ),
                    Some(Event::Ended(end)) => {
                        println!(
                            "ended: {:?}: {}",
                            pb::session_ended::Reason::try_from(end.reason)
                                .unwrap_or(pb::session_ended::Reason::Unspecified),
                            end.description
                        );
                    }
                    None => {}
                }
            }
            Ok(())
        }
        Command::Inspect(args) => {
            let mut client = connect(&args.target).await?;
            let session = client
                .get_session(pb::GetSessionRequest {
                    session_id: args.session_id,
                })
                .await?
                .into_inner()
                .session
                .ok_or_else(|| ClientError::Other("empty answer".into()))?;
            print_session(&session);
            Ok(())
        }
        Command::List(args) => {
            let mut client = connect(&args.target).await?;
            let mut page_token = String::new();
            println!(
                "{:<40} {:<16} {:>5} {:>14}  LAST ERROR",
                "SESSION", "STATE", "GEN", "ACCESS LEFT"
            );
            loop {
                let page = client
                    .list_sessions(pb::ListSessionsRequest {
                        page_size: args.page_size,
                        page_token,
                        state: match args.state {
                            None => pb::SessionState::Unspecified,
                            Some(StateArg::Active) => pb::SessionState::Active,
                            Some(StateArg::ReauthRequired) => pb::SessionState::ReauthRequired,
                        } as i32,
                        label_selector: args.labels.iter().cloned().collect(),
                    })
                    .await?
                    .into_inner();
                for s in &page.sessions {
                    println!(
                        "{:<40} {:<16} {:>5} {:>14}  {}",
                        s.session_id,
                        state_name(s.state),
                        s.generation,
                        remaining(s.access_expires_at.as_ref()),
                        s.last_error.as_ref().map_or("", |e| e.description.as_str())
                    );
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                page_token = page.next_page_token;
            }
        }
        Command::Delete(args) => {
            let mut client = connect(&args.target).await?;
            let answer = client
                .delete_session(pb::DeleteSessionRequest {
                    session_id: args.session_id.clone(),
                })
                .await?
                .into_inner();
            println!(
                "deleted {} (upstream logout {})",
                args.session_id,
                if answer.logged_out_upstream {
                    "confirmed"
                } else {
                    "not confirmed"
                }
            );
            Ok(())
        }
        Command::Serve(_) | Command::DevIdp(_) | Command::Rekey(_) => {
            Err(ClientError::Other("not a client command".into()))
        }
    }
}

async fn register(args: RegisterArgs) -> Result<(), ClientError> {
    let mut request = pb::RegisterSessionRequest {
        session_id: args.session_id,
        provider: args.provider,
        labels: args.labels.into_iter().collect::<HashMap<_, _>>(),
        replace: args.replace,
        ..Default::default()
    };
    match (args.refresh_token_file, args.dev_login) {
        (Some(path), None) => {
            let raw = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&path)
            }
            .map_err(|e| ClientError::Other(format!("cannot read {}: {e}", path.display())))?;
            request.refresh_token = raw.trim().to_string();
        }
        (None, Some(user)) => {
            let login = crate::devidp::remote::login(&args.dev_idp, &user)
                .await
                .map_err(ClientError::Other)?;
            request.refresh_token = login.refresh_token;
            request.access_token = login.access_token;
            request.expires_in = Some(duration(Duration::from_secs(login.expires_in)));
            request.refresh_expires_in =
                Some(duration(Duration::from_secs(login.refresh_expires_in)));
            request.scope = login.scope;
        }
        _ => {
            return Err(ClientError::Other(
                "give --refresh-token-file PATH (or - for stdin) or --dev-login USER".into(),
            ));
        }
    }
    let mut client = connect(&args.target).await?;
    let answer = client.register_session(request).await?.into_inner();
    if let Some(session) = answer.session {
        println!(
            "{} {}",
            if answer.created {
                "registered"
            } else {
                "already registered"
            },
            session.session_id
        );
        print_session(&session);
    }
    Ok(())
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn remaining(at: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = at.and_then(|t| SystemTime::try_from(*t).ok()) else {
        return "-".into();
    };
    match at.duration_since(SystemTime::now()) {
        Ok(left) => format!("{}s", left.as_secs()),
        Err(_) => "expired".into(),
    }
}

fn abbreviate(token: &str) -> String {
    let head: String = token.chars().take(12).collect();
    format!("{head}… ({} bytes)", token.len())
}

fn state_name(state: i32) -> &'static str {
    match pb::SessionState::try_from(state) {
        Ok(pb::SessionState::Active) => "ACTIVE",
        Ok(pb::SessionState::ReauthRequired) => "REAUTH_REQUIRED",
        _ => "UNSPECIFIED",
    }
}

fn print_session(s: &pb::Session) {
    println!("  session_id:           {}", s.session_id);
    println!("  provider:             {}", s.provider);
    println!("  state:                {}", state_name(s.state));
    println!("  generation:           {}", s.generation);
    println!(
        "  access token left:    {}",
        remaining(s.access_expires_at.as_ref())
    );
    println!(
        "  refresh token left:   {}",
        remaining(s.refresh_expires_at.as_ref())
    );
    println!(
        "  next refresh in:      {}",
        remaining(s.next_refresh_at.as_ref())
    );
    println!("  consecutive failures: {}", s.consecutive_failures);
    if let Some(e) = &s.last_error {
        println!("  last error:           {}", e.description);
    }
    if let Some(due) = &s.reauth_due_at {
        println!("  re-login due in:      {}", remaining(Some(due)));
    }
    for (k, v) in &s.labels {
        println!("  label:                {k}={v}");
    }
}
