//! TLS on both sides of the broker: callers identified by their client
//! certificate (auth.source = mtls), and the config errors of the TLS and
//! CA files.
//!
//! Certificates are generated per test with rcgen into a temporary
//! directory. The shared harness dials the broker over plain HTTP, so the
//! TLS brokers here are started directly with `app::start`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::assert_error;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokenbroker::app::{self, AppError, RunningBroker};
use tokenbroker::auth::IdentitySource;
use tokenbroker::config::{Config, StoreKind, TlsConfig};
use tokenbroker::devidp::{DevIdp, RealmSettings, RunningDevIdp};
use tokenbroker::pb;
use tokenbroker::pb::token_broker_client::TokenBrokerClient;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Bound on every network wait of these tests.
const WAIT: Duration = Duration::from_secs(10);

const PAYMENTS_ID: &str = "spiffe://cluster.local/ns/payments/sa/api";
const OTHER_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
/// The subject DN of the client without a URI SAN, as the broker prints it.
const BATCH_DN: &str = "CN=batch-job";

/// A certificate and its key, PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A private CA that issues server and client certificates.
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self) -> Pem {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "localhost");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate with subject `CN=cn` and, if given, a URI SAN.
    fn client(&self, cn: &str, uri: Option<&str>) -> Pem {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        if let Some(uri) = uri {
            params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Pem {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A broker behind mTLS with its own dev IdP.
struct MtlsBroker {
    _dir: tempfile::TempDir,
    ca_pem: String,
    idp: RunningDevIdp,
    idp_shutdown: CancellationToken,
    broker: RunningBroker,
}

const POLICY: &str = r#"
owner_only = true

[[rules]]
callers = ["spiffe://cluster.local/ns/payments/sa/api"]
sessions = ["payments/*"]
allow = ["*"]

[[rules]]
callers = ["spiffe://cluster.local/ns/shop/sa/web"]
sessions = ["shop/*"]
allow = ["*"]

[[rules]]
callers = ["CN=batch-job"]
sessions = ["batch/*"]
allow = ["*"]
"#;

impl MtlsBroker {
    async fn start(ca: &TestCa) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let server = ca.server();
        let ca_pem = ca.pem();
        let cert_file = write(dir.path(), "server.crt", &server.cert);
        let key_file = write(dir.path(), "server.key", &server.key);
        let ca_file = write(dir.path(), "ca.crt", &ca_pem);
        let policy_file = write(dir.path(), "policy.toml", POLICY);

        let idp_shutdown = CancellationToken::new();
        let idp = DevIdp::start(
            RealmSettings::default(),
            "127.0.0.1:0".parse().unwrap(),
            idp_shutdown.clone(),
        )
        .await
        .expect("dev IdP starts");
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            shutdown_grace_secs: 5,
            store: StoreKind::Memory,
            ..Config::default()
        };
        let provider = config.providers.get_mut("apiax").unwrap();
        provider.token_url = idp.token_url();
        provider.logout_url = Some(idp.logout_url());
        provider.revoke_url = Some(idp.revoke_url());
        provider.request_timeout_ms = 2_000;
        provider.connect_timeout_ms = 500;
        config.tls = Some(TlsConfig {
            cert_file,
            key_file,
            client_ca_file: Some(ca_file),
        });
        config.auth.source = Some(IdentitySource::Mtls);
        config.auth.insecure_no_auth = false;
        config.auth.policy_file = Some(policy_file);
        let broker = tokio::time::timeout(WAIT, app::start(&config))
            .await
            .expect("broker starts in time")
            .expect("broker starts");
        Self {
            _dir: dir,
            ca_pem,
            idp,
            idp_shutdown,
            broker,
        }
    }

    fn idp(&self) -> &DevIdp {
        &self.idp.idp
    }

    /// An endpoint to the broker that trusts the test CA and presents `identity`.
    fn endpoint(&self, host: &str, identity: Option<&Pem>) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(pem) = identity {
            tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
        }
        Endpoint::from_shared(format!("https://{host}:{}", self.broker.addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(WAIT)
            .timeout(WAIT)
    }

    /// A connected client presenting `identity`.
    async fn client(&self, identity: &Pem) -> TokenBrokerClient<Channel> {
        let channel =
            tokio::time::timeout(WAIT, self.endpoint("127.0.0.1", Some(identity)).connect())
                .await
                .expect("connects in time")
                .expect("TLS connection with a client certificate");
        TokenBrokerClient::new(channel)
    }

    /// Whether a client presenting `identity` (or none) gets any answer from
    /// the gRPC service: connects, then makes one call. `Err` describes how
    /// the connection or the call failed at the transport.
    async fn try_call(&self, identity: Option<&Pem>) -> Result<(), String> {
        let attempt = async {
            let channel = self
                .endpoint("127.0.0.1", identity)
                .connect()
                .await
                .map_err(|e| format!("connect: {e:?}"))?;
            let answer = TokenBrokerClient::new(channel)
                .get_session(pb::GetSessionRequest {
                    session_id: "payments/alice".into(),
                })
                .await;
            match answer {
                Ok(_) => Ok(()),
                // An answer of the service (it carries the broker's ErrorInfo)
                // means the call got through TLS.
                Err(status)
                    if tonic_types::StatusExt::get_details_error_info(&status).is_some() =>
                {
                    Ok(())
                }
                Err(status) => Err(format!("call: {status:?}")),
            }
        };
        tokio::time::timeout(WAIT, attempt)
            .await
            .expect("the attempt ends in time")
    }

    async fn stop(self) {
        tokio::time::timeout(WAIT, self.broker.shutdown())
            .await
            .expect("broker stops in time")
            .expect("clean shutdown");
        self.idp_shutdown.cancel();
        tokio::time::timeout(WAIT, self.idp.shutdown())
            .await
            .expect("dev IdP stops in time");
    }
}

async fn register(
    client: &mut TokenBrokerClient<Channel>,
    session_id: &str,
    refresh_token: &str,
) -> Result<pb::RegisterSessionResponse, tonic::Status> {
    client
        .register_session(pb::RegisterSessionRequest {
            session_id: session_id.into(),
            refresh_token: refresh_token.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn get(
    client: &mut TokenBrokerClient<Channel>,
    session_id: &str,
) -> Result<pb::AccessToken, tonic::Status> {
    client
        .get_access_token(pb::GetAccessTokenRequest {
            session_id: session_id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().token.unwrap())
}

async fn list(client: &mut TokenBrokerClient<Channel>) -> Vec<String> {
    client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .expect("listing succeeds")
        .into_inner()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect()
}

/// Adds headers that would claim the payments identity under the other sources.
fn spoofed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert(
        "x-forwarded-client-cert",
        format!("By=spiffe://cluster.local/ns/tokenbroker/sa/broker;URI={PAYMENTS_ID}")
            .parse()
            .unwrap(),
    );
    metadata.insert(
        "l5d-client-id",
        "api.payments.serviceaccount.identity.linkerd.cluster.local"
            .parse()
            .unwrap(),
    );
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_is_the_caller_identity() {
    let ca = TestCa::new("tokenbroker test CA");
    let t = MtlsBroker::start(&ca).await;
    let payments = ca.client("payments-api", Some(PAYMENTS_ID));
    let other = ca.client("shop-web", Some(OTHER_ID));
    let batch = ca.client("batch-job", None);

    // The payments service registers and reads its session.
    let mut payments_client = t.client(&payments).await;
    let login = t.idp().login("alice");
    let answer = register(&mut payments_client, "payments/alice", &login.refresh_token)
        .await
        .expect("payments may register payments/alice");
    assert!(answer.created);
    let token = get(&mut payments_client, "payments/alice")
        .await
        .expect("payments may get its token");
    assert!(!token.access_token.is_empty());
    assert_eq!(list(&mut payments_client).await, vec!["payments/alice"]);

    // Another workload of the same CA: no rule gives it anything on
    // payments/*, so the existing session is NOT_FOUND (no oracle) and
    // registering is PERMISSION_DENIED.
    let mut other_client = t.client(&other).await;
    assert_error(
        get(&mut other_client, "payments/alice").await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    let bob = t.idp().login("bob");
    assert_error(
        register(&mut other_client, "payments/bob", &bob.refresh_token).await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    // Nor may it take over the existing id.
    assert_error(
        register(&mut other_client, "payments/alice", &bob.refresh_token).await,
        Code::PermissionDenied,
        "CALLER_NOT_ALLOWED",
    );
    assert!(list(&mut other_client).await.is_empty());
    // Its own namespace works.
    register(&mut other_client, "shop/bob", &bob.refresh_token)
        .await
        .expect("shop may register shop/bob");
    get(&mut other_client, "shop/bob")
        .await
        .expect("shop may get its token");
    // And payments cannot read it.
    assert_error(
        get(&mut payments_client, "shop/bob").await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );

    // A certificate without a URI SAN is identified by its subject DN.
    let mut batch_client = t.client(&batch).await;
    let carol = t.idp().login("carol");
    register(&mut batch_client, "batch/carol", &carol.refresh_token)
        .await
        .unwrap_or_else(|s| panic!("{BATCH_DN} may register batch/carol: {s:?}"));
    get(&mut batch_client, "batch/carol")
        .await
        .expect("batch may get its token");
    assert_eq!(list(&mut batch_client).await, vec!["batch/carol"]);
    assert_error(
        get(&mut batch_client, "payments/alice").await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );

    // The payments session was not disturbed by the denied calls.
    get(&mut payments_client, "payments/alice")
        .await
        .expect("payments still gets its token");

    // Connecting by host name works as well as by address.
    let channel = tokio::time::timeout(WAIT, t.endpoint("localhost", Some(&payments)).connect())
        .await
        .expect("connects in time")
        .expect("connects to localhost");
    get(&mut TokenBrokerClient::new(channel), "payments/alice")
        .await
        .expect("payments gets its token over localhost");

    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_ignored_with_mtls() {
    let ca = TestCa::new("tokenbroker test CA");
    let t = MtlsBroker::start(&ca).await;
    let payments = ca.client("payments-api", Some(PAYMENTS_ID));
    let other = ca.client("shop-web", Some(OTHER_ID));
    let batch = ca.client("batch-job", None);

    let mut payments_client = t.client(&payments).await;
    let alice = t.idp().login("alice");
    register(&mut payments_client, "payments/alice", &alice.refresh_token)
        .await
        .expect("payments may register payments/alice");

    for identity in [&other, &batch] {
        let mut client = t.client(identity).await;
        let answer = client
            .get_access_token(spoofed(pb::GetAccessTokenRequest {
                session_id: "payments/alice".into(),
                ..Default::default()
            }))
            .await
            .map(tonic::Response::into_inner);
        assert_error(answer, Code::NotFound, "SESSION_NOT_FOUND");

        let bob = t.idp().login("bob");
        let answer = client
            .register_session(spoofed(pb::RegisterSessionRequest {
                session_id: "payments/bob".into(),
                refresh_token: bob.refresh_token.clone(),
                ..Default::default()
            }))
            .await
            .map(tonic::Response::into_inner);
        assert_error(answer, Code::PermissionDenied, "CALLER_NOT_ALLOWED");

        let listed = client
            .list_sessions(spoofed(pb::ListSessionsRequest::default()))
            .await
            .expect("listing succeeds")
            .into_inner()
            .sessions;
        assert!(listed.is_empty(), "{listed:?}");
    }

    // The payments client with the headers is still itself.
    let token = payments_client
        .get_access_token(spoofed(pb::GetAccessTokenRequest {
            session_id: "payments/alice".into(),
            ..Default::default()
        }))
        .await
        .expect("payments gets its token whatever the headers say");
    assert!(token.into_inner().token.is_some());

    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_needs_a_certificate_of_the_client_ca() {
    let ca = TestCa::new("tokenbroker test CA");
    let t = MtlsBroker::start(&ca).await;

    // Control: a certificate of the configured CA gets through.
    let payments = ca.client("payments-api", Some(PAYMENTS_ID));
    t.try_call(Some(&payments))
        .await
        .expect("a certificate of the client CA is accepted");

    // Same SPIFFE id, issued by a CA the broker does not trust.
    let rogue_ca = TestCa::new("rogue CA");
    let rogue = rogue_ca.client("payments-api", Some(PAYMENTS_ID));
    let error = t
        .try_call(Some(&rogue))
        .await
        .expect_err("a certificate of another CA must not get through");
    eprintln!("foreign CA: {error}");

    // No certificate at all.
    let error = t
        .try_call(None)
        .await
        .expect_err("a client without a certificate must not get through");
    eprintln!("no certificate: {error}");

    // The broker still serves the good client afterwards.
    let mut client = t.client(&payments).await;
    let login = t.idp().login("alice");
    register(&mut client, "payments/alice", &login.refresh_token)
        .await
        .expect("registration after rejected handshakes");

    t.stop().await;
}

/// A config that starts (memory store, no auth) apart from what the test changes.
fn base_config() -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        store: StoreKind::Memory,
        shutdown_grace_secs: 1,
        ..Config::default()
    };
    config.auth.insecure_no_auth = true;
    config
}

async fn start_error(config: &Config) -> AppError {
    match tokio::time::timeout(WAIT, app::start(config))
        .await
        .expect("start ends in time")
    {
        Ok(broker) => {
            broker.shutdown().await.expect("clean shutdown");
            panic!("the broker started");
        }
        Err(error) => error,
    }
}

#[track_caller]
fn assert_config_key(error: &AppError, key: &str) {
    match error {
        AppError::Config(config) => assert_eq!(config.key, key, "{error}"),
        other => panic!("expected a config error on `{key}`, got {other:?}"),
    }
    assert!(error.to_string().contains(key), "{error}");
}

#[tokio::test]
async fn control_base_config_starts() {
    let broker = tokio::time::timeout(WAIT, app::start(&base_config()))
        .await
        .expect("start ends in time")
        .expect("the base config starts");
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn provider_ca_file_missing_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config();
    config.providers.get_mut("apiax").unwrap().ca_file = Some(dir.path().join("missing.pem"));
    let error = start_error(&config).await;
    assert_config_key(&error, "providers.apiax.ca_file");
    assert!(error.to_string().contains("missing.pem"), "{error}");
}

#[tokio::test]
async fn provider_ca_file_not_pem_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config();
    let not_pem = write(dir.path(), "ca.txt", "this is not a certificate\n");
    config.providers.get_mut("apiax").unwrap().ca_file = Some(not_pem);
    let error = start_error(&config).await;
    assert_config_key(&error, "providers.apiax.ca_file");

    // A PEM file with a key but no certificate holds no root either.
    let key_only = write(
        dir.path(),
        "key.pem",
        &KeyPair::generate().unwrap().serialize_pem(),
    );
    config.providers.get_mut("apiax").unwrap().ca_file = Some(key_only);
    let error = start_error(&config).await;
    assert_config_key(&error, "providers.apiax.ca_file");

    // Control: a real CA certificate is accepted.
    let ca = write(dir.path(), "ca.pem", &TestCa::new("provider CA").pem());
    config.providers.get_mut("apiax").unwrap().ca_file = Some(ca);
    let broker = tokio::time::timeout(WAIT, app::start(&config))
        .await
        .expect("start ends in time")
        .expect("a PEM CA bundle is accepted");
    broker.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn tls_cert_file_missing_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestCa::new("tokenbroker test CA").server();
    let mut config = base_config();
    config.tls = Some(TlsConfig {
        cert_file: dir.path().join("missing.crt"),
        key_file: write(dir.path(), "server.key", &server.key),
        client_ca_file: None,
    });
    let error = start_error(&config).await;
    assert_config_key(&error, "tls.cert_file");
    assert!(error.to_string().contains("missing.crt"), "{error}");
}

/// Serves the dev IdP over HTTPS (HTTP/1.1) with `server`'s certificate.
async fn https_idp(server: &Pem, shutdown: CancellationToken) -> (DevIdp, std::net::SocketAddr) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(server.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let idp = DevIdp::new(RealmSettings::default());
    let router = idp.router();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = shutdown.cancelled() => return,
            };
            let (acceptor, router) = (acceptor.clone(), router.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate fails here.
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    (idp, addr)
}

#[tokio::test]
async fn an_idp_behind_a_private_ca_is_trusted_only_with_its_ca_file() {
    use pb::RegisterSessionRequest;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("private idp ca");
    let ca_file = write(dir.path(), "idp-ca.pem", &ca.pem());
    let shutdown = CancellationToken::new();
    let (idp, addr) = https_idp(&ca.server(), shutdown.clone()).await;
    let token_url = format!(
        "https://localhost:{}/realms/apiax/protocol/openid-connect/token",
        addr.port()
    );

    let mut trusting = base_config();
    let provider = trusting.providers.get_mut("apiax").unwrap();
    provider.token_url = token_url.clone();
    provider.connect_timeout_ms = 1_000;
    provider.request_timeout_ms = 3_000;
    let untrusting = trusting.clone();
    trusting.providers.get_mut("apiax").unwrap().ca_file = Some(ca_file);

    for (config, trusted) in [(trusting, true), (untrusting, false)] {
        let broker = tokio::time::timeout(WAIT, app::start(&config))
            .await
            .unwrap()
            .unwrap();
        let mut client = TokenBrokerClient::connect(format!("http://{}", broker.addr))
            .await
            .unwrap();
        let answer = tokio::time::timeout(
            WAIT,
            client.register_session(RegisterSessionRequest {
                session_id: "tls".into(),
                refresh_token: idp.login("tls").refresh_token,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
        if trusted {
            answer.expect("the private CA is trusted with ca_file");
        } else {
            let status = answer.expect_err("an unknown CA is never trusted");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(common::reason(&status), "PROVIDER_UNAVAILABLE");
        }
        broker.shutdown().await.unwrap();
    }
    assert_eq!(
        idp.stats().refreshes_succeeded,
        1,
        "only the trusting broker reached the IdP"
    );
    shutdown.cancel();
}
