//! The binary as a person uses it: `serve --dev` as a real process, the
//! client commands against it, and a graceful stop on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tokenbroker");

struct Serve {
    child: Child,
    grpc: String,
    idp: String,
}

impl Serve {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        Self::start_env(extra, &[])
    }

    fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .envs(env.iter().copied())
            .args([
                "serve",
                "--dev",
                "--listen",
                "127.0.0.1:0",
                "--dev-idp-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve starts");
        let stdout = child.stdout.take().unwrap();
        let (mut grpc, mut idp) = (None, None);
        // The walkthrough names both addresses; read until it has (bounded by its length).
        for line in BufReader::new(stdout).lines().take(40) {
            let line = line.unwrap();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("gRPC"), Some(addr)) => grpc = Some(format!("http://{addr}")),
                (Some("dev"), Some("IdP")) => {
                    let url = words.next().unwrap();
                    idp = Some(url.split("/realms/").next().unwrap().to_string());
                }
                _ => {}
            }
            if line.starts_with("Stop with") {
                break;
            }
        }
        Self {
            child,
            grpc: grpc.expect("the walkthrough names the gRPC address"),
            idp: idp.expect("the walkthrough names the dev IdP"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--addr", &self.grpc]);
        if args[0] == "register" {
            all.extend(["--dev-idp", &self.idp]);
        }
        Command::new(BIN).args(&all).output().expect("client runs")
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn stop(self) -> std::process::ExitStatus {
        self.signal("-TERM");
        self.wait_exit()
    }

    // Polling the child with a blocking sleep is fine here (plain tests, or spawn_blocking).
    #[allow(clippy::disallowed_methods)]
    fn wait_exit(mut self) -> std::process::ExitStatus {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("serve did not stop within 10 s of SIGTERM");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_readme_walkthrough_works_against_a_real_process() {
    let serve = Serve::start();

    let out = serve.run(&[
        "register",
        "--dev-login",
        "alice",
        "--session-id",
        "alice",
        "--label",
        "team=docs",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("registered alice") && shown.contains("ACTIVE"),
        "{shown}"
    );
    assert!(
        !shown.contains("eyJ"),
        "no token is printed at registration: {shown}"
    );

    let first = serve.run(&["get", "alice"]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let token = text(&first.stdout);
    assert_eq!(
        token.trim().split('.').count(),
        3,
        "a JWT on stdout: {token}"
    );

    let forced = serve.run(&["get", "alice", "--force"]);
    assert!(forced.status.success());
    assert_ne!(
        text(&forced.stdout),
        token,
        "a forced get returns a new token"
    );
    assert!(
        text(&forced.stderr).contains("generation 2"),
        "{}",
        text(&forced.stderr)
    );

    let inspect = serve.run(&["inspect", "alice"]);
    let shown = text(&inspect.stdout);
    assert!(
        shown.contains("generation:           2") && shown.contains("team=docs"),
        "{shown}"
    );
    assert!(
        !shown.contains("eyJ"),
        "inspect never shows a token: {shown}"
    );

    let list = serve.run(&["list", "--label", "team=docs"]);
    assert!(
        text(&list.stdout).contains("alice"),
        "{}",
        text(&list.stdout)
    );

    let deleted = serve.run(&["delete", "alice"]);
    assert!(
        text(&deleted.stdout).contains("upstream logout confirmed"),
        "{}",
        text(&deleted.stdout)
    );

    let gone = serve.run(&["get", "alice"]);
    assert!(!gone.status.success());
    assert!(
        text(&gone.stderr).contains("SESSION_NOT_FOUND"),
        "{}",
        text(&gone.stderr)
    );

    let bad = serve.run(&["get", "not valid"]);
    assert!(
        text(&bad.stderr).contains("INVALID_ARGUMENT"),
        "{}",
        text(&bad.stderr)
    );

    assert!(serve.stop().success(), "SIGTERM drains and exits 0");
}

#[test]
fn bad_config_fails_before_binding_and_names_the_key() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--token-url",
            "http://idp.example/realms/x/protocol/openid-connect/token",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("providers.apiax.token_url"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("TOKENBROKER_REFRESH__BACKOFF_BASE_MS", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("refresh.backoff_base_ms"),
        "{}",
        text(&out.stderr)
    );

    // No caller identity source: refuse, unless explicitly insecure.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/nonexistent/never-created",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("auth.source"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("--insecure-no-auth"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(BIN)
        .args(["serve", "--listen", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap refuses a bad flag");
}

#[test]
fn rekey_rotates_the_key_beside_a_running_broker() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let serve = Serve::start_with(&["--data-dir", data]);
    for user in ["ann", "ben"] {
        let out = serve.run(&["register", "--dev-login", user, "--session-id", user]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = Command::new(BIN)
        .args(["rekey", "--data-dir", data, "--rotate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2 sessions re-sealed"),
        "{}",
        text(&out.stdout)
    );
    let keys = std::fs::read_to_string(dir.path().join("tokenbroker.keys")).unwrap();
    assert_eq!(
        keys.lines()
            .filter(|l| l.contains(':') && !l.starts_with('#'))
            .count(),
        2
    );

    // The running broker picks the new key up on SIGHUP and keeps working.
    serve.signal("-HUP");
    let forced = serve.run(&["get", "ann", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert!(serve.stop().success());

    // Nothing is left under the old key.
    let out = Command::new(BIN)
        .args(["rekey", "--data-dir", data])
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).starts_with("0 sessions re-sealed"),
        "{}",
        text(&out.stdout)
    );
}

/// SIGTERM drains a real process: health turns NOT_SERVING first while calls
/// are still served (drain delay), then watch streams end with UNAVAILABLE
/// and the process exits 0.
#[tokio::test]
async fn sigterm_drains_health_first_then_streams_then_exits_zero() {
    use tokenbroker::pb;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let serve = Serve::start_env(&[], &[("TOKENBROKER_DRAIN_DELAY_SECS", "2")]);
    let out = serve.run(&["register", "--dev-login", "dana", "--session-id", "dana"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let channel = tonic::transport::Endpoint::from_shared(serve.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut broker = pb::token_broker_client::TokenBrokerClient::new(channel.clone());
    let mut tokens = broker
        .watch_token(pb::WatchTokenRequest {
            session_id: "dana".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), tokens.message())
        .await
        .unwrap()
        .unwrap();
    assert!(first.is_some(), "the current token comes first");
    let mut health = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| m.unwrap().status;
    let serving = tokio::time::timeout(Duration::from_secs(5), health.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status(serving), ServingStatus::Serving as i32);

    serve.signal("-TERM");
    let draining = tokio::time::timeout(Duration::from_secs(5), health.message())
        .await
        .expect("health changes at once")
        .unwrap();
    assert_eq!(status(draining), ServingStatus::NotServing as i32);
    // Still serving during the drain delay.
    broker
        .get_access_token(pb::GetAccessTokenRequest {
            session_id: "dana".into(),
            min_ttl: None,
            force_refresh: false,
        })
        .await
        .expect("calls are still served while health says NOT_SERVING");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokens.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends after the drain delay")
    .expect_err("with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    // A health Watch stream lasts until its client leaves (or the grace
    // period ends); kubelet's probes are single checks.
    drop((health, tokens, broker));
    let exit = tokio::task::spawn_blocking(move || serve.wait_exit())
        .await
        .unwrap();
    assert!(exit.success(), "exit status {exit}");
}
