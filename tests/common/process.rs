//! Real `tokenbroker serve` processes: spawned with only the test's
//! `TOKENBROKER_*` settings, awaited until they log `tokenbroker serving`,
//! killed with SIGKILL, their JSON log kept in a file for assertions and
//! failure messages.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokio::time::{Instant, sleep, timeout};
use tonic::transport::Channel;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tokenbroker");

/// How long a process gets to log `tokenbroker serving`.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A `tokenbroker serve` command line, before it runs.
#[derive(Debug)]
pub struct ServeCommand {
    command: Command,
    log: PathBuf,
    listen: SocketAddr,
}

impl ServeCommand {
    /// `serve --insecure-no-auth --listen 127.0.0.1:0 --token-url URL
    /// --client-id integration-api --log-json` (another address with
    /// [`ServeCommand::listen`]), stderr (the JSON log) into
    /// `log`, with test-friendly backoff, timeouts and IdP budget. No
    /// `TOKENBROKER_*` variable of the test's own environment reaches it.
    pub fn new(token_url: &str, log: impl Into<PathBuf>) -> Self {
        let mut command = Command::new(BIN);
        command
            .args([
                "serve",
                "--insecure-no-auth",
                "--token-url",
                token_url,
                "--client-id",
                "integration-api",
                "--log-json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOKENBROKER_") {
                command.env_remove(key);
            }
        }
        command
            .env("RUST_LOG", "info")
            .env("TOKENBROKER_REFRESH__BACKOFF_BASE_MS", "100")
            .env("TOKENBROKER_REFRESH__ON_DEMAND_BACKOFF_CAP_MS", "200")
            .env("TOKENBROKER_PROVIDERS__APIAX__REQUEST_TIMEOUT_MS", "2000")
            .env("TOKENBROKER_PROVIDERS__APIAX__CONNECT_TIMEOUT_MS", "200")
            .env(
                "TOKENBROKER_PROVIDERS__APIAX__MAX_CONCURRENT_REFRESHES",
                "64",
            )
            .env(
                "TOKENBROKER_PROVIDERS__APIAX__MAX_REFRESHES_PER_SECOND",
                "10000",
            )
            .env("TOKENBROKER_SHUTDOWN_GRACE_SECS", "2");
        Self {
            command,
            log: log.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Listens on `addr` instead of a free port (e.g. the port of a killed
    /// process, so its clients find the new one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// One more command-line argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    /// Sets (or overrides) an environment variable of the process.
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// Starts the process (it is not serving yet: see [`Serve::serving_addr`]).
    pub fn spawn(mut self) -> Serve {
        self.command.arg("--listen").arg(self.listen.to_string());
        let stderr = std::fs::File::create(&self.log).expect("log file");
        let child = self.command.stderr(stderr).spawn().expect("serve starts");
        Serve {
            child,
            log: self.log,
            exited: false,
        }
    }
}

/// One `tokenbroker serve` process. Dropping it kills it (SIGKILL) and reaps
/// it, so no process outlives the test, also when it panics.
#[derive(Debug)]
pub struct Serve {
    child: Child,
    log: PathBuf,
    exited: bool,
}

impl Drop for Serve {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Serve {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its log goes.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its log lines so far, parsed (lines that are not JSON are skipped).
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for the `tokenbroker serving` line and returns its address;
    /// panics (with the log) if the process exits first or takes over 20 s.
    pub async fn serving_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            for json in self.log_json() {
                let fields = &json["fields"];
                if fields["message"] == "tokenbroker serving" {
                    return fields["addr"]
                        .as_str()
                        .expect("addr field")
                        .parse()
                        .expect("a socket address");
                }
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = true;
                panic!(
                    "serve exited with {status} before serving:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "serve did not come up within {START_LIMIT:?}:\n{}",
                self.log_text()
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, then reap (bounded). The log stays readable.
    pub async fn kill(&mut self) {
        if self.exited {
            return;
        }
        self.child.kill().expect("SIGKILL");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "a killed serve did not exit");
            sleep(Duration::from_millis(5)).await;
        }
        self.exited = true;
    }
}

/// A client of the broker at `addr` (bounded).
pub async fn connect(addr: SocketAddr) -> TokenBrokerClient<Channel> {
    timeout(
        Duration::from_secs(10),
        TokenBrokerClient::connect(format!("http://{addr}")),
    )
    .await
    .expect("connect in time")
    .expect("client connects")
}
