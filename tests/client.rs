//! The client library (`--features client`) against the real broker and dev
//! IdP on 127.0.0.1: a `TokenSource` keeps a caller supplied across
//! refreshes and a SIGKILLed, restarted `serve` process; re-authentication,
//! an IdP outage and a policy that refuses streams reach the caller as typed
//! errors or a fallback; clones share one task and connection, and dropping
//! the last one closes it; the bearer adapters put the token on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, SystemTime};

use common::process::{ServeCommand, connect};
use common::{TestBroker, assert_error};
use tokenbroker::auth::IdentitySource;
use tokenbroker::client::{
    BearerInterceptor, ClientError, Mode, RequestBuilderExt as _, SourceStatus, TokenSource,
    TokenSourceBuilder,
};
use tokenbroker::devidp::{DevIdp, Fault, FaultAction, RealmSettings};
use tokenbroker::pb;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::service::Interceptor as _;

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// A source with margins fit for tokens that live a few seconds.
fn builder(addr: SocketAddr, session_id: &str) -> TokenSourceBuilder {
    TokenSource::builder(session_id)
        .endpoint(format!("http://{addr}"))
        .expiry_margin(300 * MS)
        .min_ttl(SECOND)
        .wait_timeout(10 * SECOND)
        .backoff(50 * MS, 500 * MS)
        .call_timeout(5 * SECOND)
}

/// Waits (bounded) until the source's status satisfies `done`.
async fn wait_for(
    source: &TokenSource,
    within: Duration,
    what: &str,
    done: impl Fn(&SourceStatus) -> bool,
) -> SourceStatus {
    let mut updates = source.subscribe();
    let deadline = Instant::now() + within;
    loop {
        let status = source.status();
        if done(&status) {
            return status;
        }
        match timeout(
            deadline.saturating_duration_since(Instant::now()),
            updates.changed(),
        )
        .await
        {
            Ok(Ok(())) => {}
            Ok(Err(closed)) => panic!("{what}: the source closed ({closed}); {status:?}"),
            Err(_) => panic!("{what}: not within {within:?}; {status:?}"),
        }
    }
}

/// Reads `token()` every 20 ms until stopped, checking every token it gets:
/// usable (not expired) when handed out, generations never going back.
/// Returns the reads, the distinct generations seen, and every failure.
struct Reader {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<(usize, Vec<u64>, Vec<String>)>,
}

impl Reader {
    fn start(source: TokenSource) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut reads, mut generations, mut failures) = (0, Vec::<u64>::new(), Vec::new());
                while !stop.is_cancelled() {
                    match source.token().await {
                        Ok(token) => {
                            reads += 1;
                            if token.expires_at() <= SystemTime::now() {
                                failures.push(format!("an expired token: {token:?}"));
                            }
                            match generations.last() {
                                Some(&last) if token.generation() < last => failures.push(format!(
                                    "generation {} after {last}",
                                    token.generation()
                                )),
                                Some(&last) if token.generation() == last => {}
                                _ => generations.push(token.generation()),
                            }
                        }
                        Err(error) => failures.push(error.to_string()),
                    }
                    sleep(20 * MS).await;
                }
                (reads, generations, failures)
            }
        });
        Self { stop, task }
    }

    async fn finish(self) -> (usize, Vec<u64>, Vec<String>) {
        self.stop.cancel();
        timeout(30 * SECOND, self.task)
            .await
            .expect("reader ends")
            .unwrap()
    }
}

/// A free loopback port (for a process that must come back on the same one).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn serve(idp_token_url: &str, addr: SocketAddr, data_dir: &Path, log: PathBuf) -> ServeCommand {
    ServeCommand::new(idp_token_url, log)
        .listen(addr)
        .arg("--data-dir")
        .arg(data_dir)
}

#[tokio::test]
async fn a_source_keeps_a_caller_supplied_across_refreshes_and_a_broker_restart() {
    let idp_stop = CancellationToken::new();
    // Max reuse 1: should a kill ever land mid-refresh after all, the
    // restarted broker's one re-presentation keeps the session.
    let realm = RealmSettings {
        access_token_lifespan_secs: 3,
        refresh_token_max_reuse: 1,
        ..RealmSettings::default()
    };
    let idp = DevIdp::start(realm, "127.0.0.1:0".parse().unwrap(), idp_stop.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = free_addr();
    let token_url = idp.token_url();
    let mut broker = serve(&token_url, addr, &data, dir.path().join("serve-1.log")).spawn();
    assert_eq!(broker.serving_addr().await, addr);

    let login = idp.idp.login("alice");
    connect(addr)
        .await
        .register_session(pb::RegisterSessionRequest {
            session_id: "alice".into(),
            refresh_token: login.refresh_token.clone(),
            ..Default::default()
        })
        .await
        .expect("registered");

    let source = builder(addr, "alice").build().unwrap();
    let first = source.token().await.expect("a first token");
    let reader = Reader::start(source.clone());

    // Several refreshes arrive by themselves (a watched session refreshes at
    // ~75% of its 3 s life).
    let before_kill = wait_for(&source, 30 * SECOND, "three refreshes", |s| {
        s.generation >= Some(first.generation() + 3)
    })
    .await;
    assert_eq!(before_kill.mode, Mode::Watching);
    // Kill right after a new generation arrived (it is stored before it is
    // streamed), so no refresh is in flight; the next one is seconds away.
    let kill_after = before_kill.generation.unwrap();
    wait_for(&source, 10 * SECOND, "a fresh generation", |s| {
        s.generation > Some(kill_after)
    })
    .await;
    broker.kill().await;
    let held = source.status().generation.unwrap();
    let mut broker = serve(&token_url, addr, &data, dir.path().join("serve-2.log")).spawn();
    assert_eq!(broker.serving_addr().await, addr);

    // The source reconnects to the new process and goes on being supplied.
    let after = wait_for(
        &source,
        30 * SECOND,
        "two refreshes after the restart",
        |s| s.generation >= Some(held + 2) && s.connections >= 2,
    )
    .await;
    assert_eq!(after.mode, Mode::Watching);
    let (reads, generations, failures) = reader.finish().await;
    assert!(
        failures.is_empty(),
        "every read got a usable token: {failures:?}\n{}",
        broker.log_tail(20)
    );
    assert!(reads > 50, "{reads} reads");
    assert!(
        generations.len() >= 5,
        "the caller saw the refreshes: {generations:?}"
    );
    let family = idp.idp.family(&login.session_state).unwrap();
    assert_eq!(family.replays_rejected, 0, "{family:?}");

    drop(source);
    broker.kill().await;
    idp_stop.cancel();
    idp.shutdown().await;
}

#[tokio::test]
async fn a_session_ended_upstream_reaches_the_caller_as_a_sticky_typed_error() {
    let mut t = TestBroker::new().start().await;
    let (login, _) = t.register("bob", "bob").await;
    let source = builder(t.broker.addr, "bob").build().unwrap();
    source.token().await.expect("a first token");
    wait_for(&source, 10 * SECOND, "the stream", |s| {
        s.mode == Mode::Watching
    })
    .await;

    // An administrator signs bob out at the IdP; the next refresh is refused.
    assert!(t.idp().end_session(&login.session_state));
    assert_error(
        t.get("bob", None, true).await,
        Code::FailedPrecondition,
        "REAUTHENTICATION_REQUIRED",
    );
    let ended = wait_for(&source, 10 * SECOND, "the end event", |s| {
        s.mode == Mode::Ended
    })
    .await;
    let expected = ended.last_error.clone().unwrap();
    assert!(
        matches!(&expected, ClientError::Reauthentication { description } if description.contains("Session not active")),
        "{expected:?}"
    );
    // Sticky, at once, for every reader, though the last token has not expired.
    assert_eq!(source.token().await.unwrap_err(), expected);
    assert_eq!(source.clone().current().unwrap_err(), expected);
    assert_eq!(ended.generation, None, "the token is dropped");
    let status = BearerInterceptor::new(source.clone())
        .call(tonic::Request::new(()))
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        status.message().contains("re-authentication required"),
        "{status:?}"
    );
    let http = reqwest::Client::new();
    let refused = http.get("http://127.0.0.1:9/").bearer_from(&source).await;
    assert_eq!(refused.unwrap_err(), expected);
    t.stop().await;
}

#[tokio::test]
async fn a_deleted_session_and_an_unknown_one_are_final_not_found() {
    let mut t = TestBroker::new().start().await;
    t.register("carol", "carol").await;
    let carol = builder(t.broker.addr, "carol").build().unwrap();
    carol.token().await.expect("a first token");
    t.client
        .delete_session(pb::DeleteSessionRequest {
            session_id: "carol".into(),
        })
        .await
        .unwrap();
    let ended = wait_for(&carol, 10 * SECOND, "the end event", |s| {
        s.mode == Mode::Ended
    })
    .await;
    assert!(
        matches!(ended.last_error, Some(ClientError::SessionNotFound { .. })),
        "{ended:?}"
    );
    let nobody = builder(t.broker.addr, "nobody").build().unwrap();
    let error = nobody.token().await.unwrap_err();
    assert!(
        matches!(error, ClientError::SessionNotFound { .. }),
        "{error:?}"
    );
    assert_eq!(nobody.status().mode, Mode::Ended);
    t.stop().await;
}

#[tokio::test]
async fn an_idp_outage_longer_than_the_token_life_gives_a_typed_error_never_an_expired_token() {
    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 3)
        .start()
        .await;
    t.register("dave", "dave").await;
    let source = builder(t.broker.addr, "dave")
        .wait_timeout(500 * MS)
        .build()
        .unwrap();
    let first = source.token().await.expect("a first token");
    t.idp().push_fault(Fault::always(FaultAction::Status {
        status: 503,
        body: "<html>maintenance</html>".into(),
        retry_after: None,
    }));

    // Read until the source gives up on the held token; every token it
    // hands out meanwhile is unexpired.
    let deadline = Instant::now() + 30 * SECOND;
    let error = loop {
        assert!(Instant::now() < deadline, "no error within 30 s");
        match source.token().await {
            Ok(token) => {
                assert!(token.expires_at() > SystemTime::now(), "{token:?}");
                assert_eq!(token.generation(), first.generation(), "the IdP is down");
            }
            // The source's own GetAccessToken has not answered yet.
            Err(ClientError::Expired { cause: None, .. }) => {}
            Err(error) => break error,
        }
        sleep(50 * MS).await;
    };
    match &error {
        ClientError::Expired { generation, cause } => {
            assert_eq!(*generation, first.generation());
            // The source asked the broker why no new token came.
            assert!(
                matches!(cause.as_deref(), Some(ClientError::Unavailable { reason, .. }) if reason == "PROVIDER_UNAVAILABLE"),
                "{error:?}"
            );
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(source.current().is_err());

    // The IdP comes back: so does the supply, with a newer token.
    t.idp().clear_faults();
    let recovered = source
        .token_within(20 * SECOND)
        .await
        .expect("a token after the outage");
    assert!(recovered.generation() > first.generation());
    t.stop().await;
}

#[tokio::test]
async fn a_policy_that_refuses_streams_makes_the_source_poll_get_access_token() {
    const CALLER: &str = "api.payments.serviceaccount.identity.linkerd.cluster.local";
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "[[rules]]\ncallers = [\"{CALLER}\"]\nsessions = [\"payments/*\"]\nallow = [\"register\", \"get\"]\n"
        ),
    )
    .unwrap();
    let t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 2)
        .config(move |c| {
            c.auth.insecure_no_auth = false;
            c.auth.source = Some(IdentitySource::Linkerd);
            c.auth.policy_file = Some(policy);
        })
        .start()
        .await;
    let login = t.idp().login("erin");
    let mut register = tonic::Request::new(pb::RegisterSessionRequest {
        session_id: "payments/erin".into(),
        refresh_token: login.refresh_token.clone(),
        ..Default::default()
    });
    register
        .metadata_mut()
        .insert("l5d-client-id", CALLER.parse().unwrap());
    t.client.clone().register_session(register).await.unwrap();

    let source = builder(t.broker.addr, "payments/erin")
        .metadata("l5d-client-id", CALLER)
        .build()
        .unwrap();
    let first = source.token().await.expect("a token by polling");
    let reader = Reader::start(source.clone());
    let polled = wait_for(&source, 30 * SECOND, "three refreshes by polling", |s| {
        s.generation >= Some(first.generation() + 3)
    })
    .await;
    assert_eq!(polled.mode, Mode::Polling);
    let (_, generations, failures) = reader.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(generations.len() >= 3, "{generations:?}");

    // Without the identity the broker refuses the caller: a typed error, at once.
    let stranger = builder(t.broker.addr, "payments/erin").build().unwrap();
    let error = stranger.token().await.unwrap_err();
    assert!(
        matches!(&error, ClientError::PermissionDenied { reason, .. } if reason == "CALLER_UNAUTHENTICATED"),
        "{error:?}"
    );
    t.stop().await;
}

/// A TCP proxy on 127.0.0.1 that counts the connections open through it.
struct CountingProxy {
    addr: SocketAddr,
    open: watch::Receiver<usize>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl CountingProxy {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open_tx, open) = watch::channel(0usize);
        let open_tx = Arc::new(open_tx);
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            tasks.spawn(async move {
                let mut pipes = JoinSet::new();
                loop {
                    let (mut inbound, _) = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap(),
                        () = stop.cancelled() => break,
                    };
                    accepted.fetch_add(1, SeqCst);
                    open_tx.send_modify(|n| *n += 1);
                    let open_tx = open_tx.clone();
                    pipes.spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                        open_tx.send_modify(|n| *n -= 1);
                    });
                }
                pipes.shutdown().await;
            });
        }
        Self {
            addr,
            open,
            accepted,
            stop,
            tasks,
        }
    }

    async fn wait_open(&mut self, expected: usize, within: Duration) {
        let reached = timeout(within, self.open.wait_for(|n| *n == expected))
            .await
            .is_ok();
        assert!(
            reached,
            "{expected} connections open through the proxy; {} are",
            *self.open.borrow()
        );
    }

    async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

#[tokio::test]
async fn clones_share_one_task_and_connection_and_dropping_the_last_closes_it() {
    let mut t = TestBroker::new().start().await;
    t.register("frank", "frank").await;
    let mut proxy = CountingProxy::start(t.broker.addr).await;
    let source = builder(proxy.addr, "frank").build().unwrap();
    let clones: Vec<TokenSource> = (0..3).map(|_| source.clone()).collect();
    let first = source.token().await.unwrap();
    for clone in &clones {
        let token = clone.token().await.unwrap();
        assert_eq!(token.generation(), first.generation());
        assert_eq!(token.expose_secret(), first.expose_secret());
    }
    proxy.wait_open(1, 10 * SECOND).await;
    assert_eq!(
        proxy.accepted.load(SeqCst),
        1,
        "one connection for all clones"
    );
    assert_eq!(source.status().connections, 1);

    // Dropping some clones changes nothing; dropping the last closes the
    // connection (the task ended with it).
    drop(source);
    let last = clones.into_iter().last().unwrap();
    assert!(last.current().is_ok());
    proxy.wait_open(1, SECOND).await;
    drop(last);
    proxy.wait_open(0, 10 * SECOND).await;

    // close() does the same while handles remain, and they read Closed.
    let source = builder(proxy.addr, "frank").build().unwrap();
    source.token().await.unwrap();
    proxy.wait_open(1, 10 * SECOND).await;
    let other = source.clone();
    source.close().await;
    proxy.wait_open(0, 10 * SECOND).await;
    assert_eq!(other.token().await.unwrap_err(), ClientError::Closed);
    assert_eq!(other.status().mode, Mode::Closed);
    proxy.stop().await;
    t.stop().await;
}

#[tokio::test]
async fn a_dead_endpoint_in_the_list_is_passed_over_for_a_live_one() {
    let mut t = TestBroker::new().start().await;
    t.register("grace", "grace").await;
    let dead = free_addr();
    let source = TokenSource::builder("grace")
        .endpoints([
            format!("http://{dead}"),
            format!("http://{}", t.broker.addr),
        ])
        .backoff(50 * MS, 500 * MS)
        .build()
        .unwrap();
    let token = source
        .token()
        .await
        .expect("a token from the live endpoint");
    assert_eq!(token.generation(), 1);
    assert_eq!(
        source.status().connections,
        1,
        "only the live one connected"
    );
    t.stop().await;
}

#[tokio::test]
async fn the_bearer_adapters_put_the_current_token_on_outgoing_calls() {
    let mut t = TestBroker::new().start().await;
    t.register("heidi", "heidi").await;
    let source = builder(t.broker.addr, "heidi").build().unwrap();
    let token = source.token().await.unwrap();
    let expected = format!("Bearer {}", token.expose_secret());

    // tonic: the interceptor adds the header from the cached token.
    let request = BearerInterceptor::new(source.clone())
        .call(tonic::Request::new(()))
        .unwrap();
    let header = request.metadata().get("authorization").unwrap();
    assert_eq!(header.to_str().unwrap(), expected);
    assert!(
        !format!("{header:?}").contains(token.expose_secret()),
        "the metadata value is sensitive"
    );
    // ... and a tonic call with it goes through (the broker's health service
    // stands in for a downstream server).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", t.broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::with_interceptor(
        channel,
        BearerInterceptor::new(source.clone()),
    );
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a call with the bearer interceptor");

    // reqwest: a real HTTP server sees the header.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string()
        }),
    );
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let answer = reqwest::Client::new()
        .get(&url)
        .bearer_from(&source)
        .await
        .unwrap()
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(answer, expected);
    server.abort();
    t.stop().await;
}

/// Stands in for a proxy that ends every server stream at once (as a mesh
/// with a short stream timeout might) and forwards `GetAccessToken` to the
/// real broker. Counts the streams it ended.
#[derive(Clone)]
struct StreamBreaker {
    broker: pb::token_broker_client::TokenBrokerClient<tonic::transport::Channel>,
    watches: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl pb::token_broker_server::TokenBroker for StreamBreaker {
    async fn register_session(
        &self,
        _: tonic::Request<pb::RegisterSessionRequest>,
    ) -> Result<tonic::Response<pb::RegisterSessionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not forwarded"))
    }
    async fn get_access_token(
        &self,
        request: tonic::Request<pb::GetAccessTokenRequest>,
    ) -> Result<tonic::Response<pb::GetAccessTokenResponse>, tonic::Status> {
        self.broker
            .clone()
            .get_access_token(request.into_inner())
            .await
    }
    type WatchTokenStream = futures::stream::Empty<Result<pb::WatchTokenResponse, tonic::Status>>;
    async fn watch_token(
        &self,
        _: tonic::Request<pb::WatchTokenRequest>,
    ) -> Result<tonic::Response<Self::WatchTokenStream>, tonic::Status> {
        self.watches.fetch_add(1, SeqCst);
        Ok(tonic::Response::new(futures::stream::empty()))
    }
    async fn get_session(
        &self,
        _: tonic::Request<pb::GetSessionRequest>,
    ) -> Result<tonic::Response<pb::GetSessionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not forwarded"))
    }
    async fn list_sessions(
        &self,
        _: tonic::Request<pb::ListSessionsRequest>,
    ) -> Result<tonic::Response<pb::ListSessionsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not forwarded"))
    }
    async fn delete_session(
        &self,
        _: tonic::Request<pb::DeleteSessionRequest>,
    ) -> Result<tonic::Response<pb::DeleteSessionResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not forwarded"))
    }
}

#[tokio::test]
async fn streams_that_keep_ending_without_a_token_switch_the_source_to_polling() {
    let mut t = TestBroker::new().start().await;
    t.register("ivan", "ivan").await;
    let breaker = StreamBreaker {
        broker: t.client.clone(),
        watches: Arc::new(AtomicUsize::new(0)),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::token_broker_server::TokenBrokerServer::new(
                breaker.clone(),
            ))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.clone().cancelled_owned(),
            ),
    );

    let source = builder(addr, "ivan").build().unwrap();
    let token = source.token().await.expect("a token by polling");
    assert_eq!(token.generation(), 1);
    let status = source.status();
    assert_eq!(status.mode, Mode::Polling);
    assert_eq!(
        breaker.watches.load(SeqCst),
        3,
        "three streams ended without a token before the fallback"
    );
    assert_eq!(status.connections, 4, "each attempt on a new connection");
    source.close().await;
    stop.cancel();
    server.await.unwrap().unwrap();
    t.stop().await;
}

#[tokio::test]
async fn the_broker_s_re_login_warning_reaches_the_source_status() {
    // The SSO session maximum (60 s) caps the refresh token below what the
    // login promised (1 h): the broker warns its watchers.
    let mut t = TestBroker::new()
        .realm(|r| {
            r.sso_session_max_secs = 60;
            r.sso_session_idle_secs = 3600;
        })
        .start()
        .await;
    let login = t.idp().login("judy");
    t.client
        .register_session(pb::RegisterSessionRequest {
            session_id: "judy".into(),
            refresh_token: login.refresh_token,
            access_token: login.access_token,
            expires_in: Some(common::duration(600 * SECOND)),
            refresh_expires_in: Some(common::duration(3600 * SECOND)),
            ..Default::default()
        })
        .await
        .unwrap();
    let source = builder(t.broker.addr, "judy").build().unwrap();
    source.token().await.unwrap();
    assert_eq!(source.status().reauth_due_at, None);
    t.get("judy", None, true).await.unwrap();
    let warned = wait_for(&source, 10 * SECOND, "the re-login warning", |s| {
        s.reauth_due_at.is_some()
    })
    .await;
    let info = t.session("judy").await.unwrap();
    let due = warned.reauth_due_at.unwrap();
    assert_eq!(
        SystemTime::try_from(info.reauth_due_at.unwrap()).unwrap(),
        due
    );
    // A warning, not an end: tokens are still handed out.
    assert!(source.token().await.is_ok());
    t.stop().await;
}
