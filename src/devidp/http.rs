//! The HTTP face: Keycloak's endpoints, the admin API, faults, and connections that a
//! fault can kill before a byte of the answer leaves.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Extension, Form, Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::realm::{ClientCredentials, OAuthError, RefreshRequest, TokenResponse};
use super::{DevIdp, Fault, FaultAction, LoginTokens, RealmSettings};

pub(crate) fn router(idp: DevIdp) -> Router {
    let routes = routes();
    Router::new()
        .merge(routes.clone())
        .nest("/auth", routes)
        .route(
            "/realms/{realm}/.well-known/openid-configuration",
            get(|idp, realm, headers| discovery(idp, realm, headers, "")),
        )
        .route(
            "/auth/realms/{realm}/.well-known/openid-configuration",
            get(|idp, realm, headers| discovery(idp, realm, headers, "/auth")),
        )
        .with_state(idp)
}

fn routes() -> Router<DevIdp> {
    Router::new()
        .route("/realms/{realm}/protocol/openid-connect/token", post(token))
        .route(
            "/realms/{realm}/protocol/openid-connect/logout",
            post(logout),
        )
        .route(
            "/realms/{realm}/protocol/openid-connect/revoke",
            post(revoke),
        )
        .route("/admin/login", post(admin_login))
        .route("/admin/stats", get(admin_stats))
        .route(
            "/admin/faults",
            get(admin_faults)
                .put(admin_set_faults)
                .post(admin_push_fault)
                .delete(admin_clear_faults),
        )
        .route(
            "/admin/settings",
            get(admin_settings).put(admin_update_settings),
        )
        .route("/admin/sessions", get(admin_sessions))
        .route("/admin/sessions/{session_state}", get(admin_session))
        .route(
            "/admin/sessions/{session_state}/end",
            post(admin_end_session),
        )
        .route("/admin/users/{username}/disable", post(admin_disable_user))
        .route("/admin/users/{username}/enable", post(admin_enable_user))
        .route(
            "/admin/time-offset",
            get(admin_time_offset).put(admin_set_time_offset),
        )
}

// ---------------------------------------------------------------------------------------
// Connections a fault can kill.

/// A TCP listener whose connections carry a kill switch (see [`ConnKill`]).
pub(crate) struct KillableListener {
    inner: TcpListener,
}

impl KillableListener {
    pub(crate) fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    // Best effort: only latency depends on it.
                    let _ = stream.set_nodelay(true);
                    let stream = KillableStream {
                        inner: stream,
                        kill: CancellationToken::new(),
                    };
                    return (stream, addr);
                }
                Err(err) if is_connection_error(&err) => {}
                Err(err) => {
                    // Out of file descriptors and the like: back off, as axum does.
                    tracing::warn!(error = %err, "dev idp: accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A TCP stream that fails every read and write once killed, so hyper drops the connection
/// without writing what it had buffered.
pub(crate) struct KillableStream {
    inner: TcpStream,
    kill: CancellationToken,
}

impl KillableStream {
    fn check(&self) -> io::Result<()> {
        if self.kill.is_cancelled() {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection dropped by a dev idp fault",
            ))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for KillableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// The kill switch of the connection a request came on (a `ConnectInfo`).
#[derive(Clone, Debug)]
pub(crate) struct ConnKill(CancellationToken);

impl Connected<IncomingStream<'_, KillableListener>> for ConnKill {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        Self(stream.io().kill.clone())
    }
}

// ---------------------------------------------------------------------------------------
// Keycloak's endpoints.

/// The form fields of the token, logout and revocation endpoints; others are ignored.
#[derive(Default, Deserialize)]
struct OidcForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
    token: Option<String>,
}

/// Client credentials: HTTP Basic (`client_secret_basic`) wins over the form.
fn client_credentials(headers: &HeaderMap, form: &OidcForm) -> ClientCredentials {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    if let Some(pair) = basic {
        let (id, secret) = pair.split_once(':').unwrap_or((pair.as_str(), ""));
        return ClientCredentials {
            id: Some(id.to_owned()),
            secret: Some(secret.to_owned()),
        };
    }
    ClientCredentials {
        id: form.client_id.clone(),
        secret: form.client_secret.clone(),
    }
}

fn form_error() -> Response {
    oauth_error(&OAuthError {
        status: 400,
        error: "invalid_request",
        description: None,
    })
}

fn with_no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_body(status_code: StatusCode, body: String) -> Response {
    with_no_store(
        (
            status_code,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
    )
}

fn oauth_error(err: &OAuthError) -> Response {
    json_body(status(err.status), err.body().to_string())
}

/// Status and JSON text of a token endpoint answer.
fn answer_text(answer: &Result<TokenResponse, OAuthError>) -> (StatusCode, String) {
    match answer {
        Ok(tokens) => (
            StatusCode::OK,
            serde_json::to_string(tokens).unwrap_or_default(),
        ),
        Err(err) => (status(err.status), err.body().to_string()),
    }
}

/// What the token endpoint answers once the fault (if any) has been applied.
enum Reply {
    Answer(Result<TokenResponse, OAuthError>),
    Truncated(Result<TokenResponse, OAuthError>),
    Raw {
        status: u16,
        body: String,
        retry_after: Option<String>,
    },
    Html(u16),
    Oversized(usize),
    Drop,
}

/// Keeps a token request counted as in flight until dropped.
struct InFlight {
    idp: DevIdp,
    session: Option<String>,
}

impl InFlight {
    fn enter(idp: &DevIdp, session: Option<String>) -> Self {
        idp.with_realm(|realm| realm.enter_flight(session.as_deref()));
        Self {
            idp: idp.clone(),
            session,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let session = self.session.as_deref();
        self.idp.with_realm(|realm| realm.leave_flight(session));
    }
}

async fn token(
    State(idp): State<DevIdp>,
    Path(realm_name): Path<String>,
    conn: Option<Extension<ConnectInfo<ConnKill>>>,
    headers: HeaderMap,
    form: Result<Form<OidcForm>, FormRejection>,
) -> Response {
    idp.with_realm(|realm| realm.count_token_request());
    if let Some(trace) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        idp.record_traceparent(trace);
    }
    let Ok(Form(form)) = form else {
        return form_error();
    };
    let client = client_credentials(&headers, &form);
    let session = form
        .refresh_token
        .as_deref()
        .and_then(|raw| idp.with_realm(|realm| realm.session_of(raw)));
    let flight = InFlight::enter(&idp, session);
    let fault = idp.take_fault();

    // Processing runs in its own task: a client that disconnects (or times out) cancels
    // only the answer, never a refresh the IdP has started, as with a real server.
    let worker = idp.clone();
    let work = async move {
        let _flight = flight;
        let process = || {
            let now = worker.now();
            worker.with_realm(|realm| {
                realm.refresh(
                    now,
                    &RefreshRequest {
                        realm: &realm_name,
                        grant_type: form.grant_type.as_deref(),
                        client: &client,
                        refresh_token: form.refresh_token.as_deref(),
                    },
                )
            })
        };
        match fault {
            None => Reply::Answer(process()),
            Some(FaultAction::Delay { ms }) => {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(ms)) => Reply::Answer(process()),
                    () = worker.inner.shutdown.cancelled() => Reply::Drop,
                }
            }
            Some(FaultAction::Status {
                status,
                body,
                retry_after,
            }) => Reply::Raw {
                status,
                body,
                retry_after,
            },
            Some(FaultAction::DropBeforeProcessing) => Reply::Drop,
            Some(FaultAction::DropAfterProcessing) => {
                let _answer_never_sent = process();
                Reply::Drop
            }
            Some(FaultAction::TruncatedAfterProcessing) => Reply::Truncated(process()),
            Some(FaultAction::Html { status }) => Reply::Html(status),
            Some(FaultAction::Oversized { bytes }) => Reply::Oversized(bytes),
        }
    };
    let reply = match idp.inner.tasks.spawn(work).await {
        Ok(reply) => reply,
        Err(err) => {
            tracing::warn!(error = %err, "dev idp: token request task failed");
            return oauth_error(&OAuthError {
                status: 500,
                error: "server_error",
                description: None,
            });
        }
    };
    render(reply, conn.map(|Extension(ConnectInfo(kill))| kill))
}

fn render(reply: Reply, kill: Option<ConnKill>) -> Response {
    match reply {
        Reply::Answer(answer) => {
            let (status_code, body) = answer_text(&answer);
            json_body(status_code, body)
        }
        Reply::Truncated(answer) => {
            let (status_code, body) = answer_text(&answer);
            let half = body.get(..body.len() / 2).unwrap_or_default().to_owned();
            json_body(status_code, half)
        }
        Reply::Raw {
            status: code,
            body,
            retry_after,
        } => {
            let content_type = match body.trim_start().chars().next() {
                Some('{' | '[') => "application/json",
                Some('<') => "text/html; charset=utf-8",
                _ => "text/plain; charset=utf-8",
            };
            let mut response =
                (status(code), [(header::CONTENT_TYPE, content_type)], body).into_response();
            if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
            response
        }
        Reply::Html(code) => {
            let status_code = status(code);
            let title = format!(
                "{} {}",
                status_code.as_u16(),
                status_code.canonical_reason().unwrap_or("Error")
            );
            let page = format!(
                "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n\
                 <center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n\
                 </body>\r\n</html>\r\n"
            );
            (
                status_code,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                page,
            )
                .into_response()
        }
        Reply::Oversized(bytes) => {
            let response = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(oversized_body(bytes)),
            )
                .into_response();
            with_no_store(response)
        }
        Reply::Drop => match kill {
            Some(ConnKill(kill)) => {
                // Every further read or write of the connection fails: hyper drops it before
                // this response's first byte is written.
                kill.cancel();
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
            None => {
                // Served without `DevIdp::start`: headers go out, the body fails.
                let failing = futures::stream::once(async {
                    Err::<Bytes, io::Error>(io::Error::other(
                        "connection dropped by a dev idp fault",
                    ))
                });
                (StatusCode::OK, Body::from_stream(failing)).into_response()
            }
        },
    }
}

/// A JSON object of exactly `bytes` bytes (when `bytes` ≥ 10), streamed in 64 KiB chunks.
fn oversized_body(bytes: usize) -> impl futures::Stream<Item = Result<Bytes, io::Error>> {
    const CHUNK: usize = 64 * 1024;
    let (prefix, suffix): (&'static [u8], &'static [u8]) = if bytes >= 10 {
        (b"{\"pad\":\"", b"\"}")
    } else {
        (b"", b"")
    };
    let mut filler = bytes - prefix.len() - suffix.len();
    let block = Bytes::from(vec![b'x'; CHUNK]);
    let middle = std::iter::from_fn(move || {
        if filler == 0 {
            return None;
        }
        let n = filler.min(CHUNK);
        filler -= n;
        Some(block.slice(..n))
    });
    let chunks = std::iter::once(Bytes::from_static(prefix))
        .chain(middle)
        .chain(std::iter::once(Bytes::from_static(suffix)))
        .filter(|chunk| !chunk.is_empty())
        .map(Ok);
    futures::stream::iter(chunks)
}

async fn logout(
    State(idp): State<DevIdp>,
    Path(realm_name): Path<String>,
    headers: HeaderMap,
    form: Result<Form<OidcForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return form_error();
    };
    let client = client_credentials(&headers, &form);
    let now = idp.now();
    let result = idp
        .with_realm(|realm| realm.logout(now, &realm_name, &client, form.refresh_token.as_deref()));
    match result {
        Ok(()) => with_no_store(StatusCode::NO_CONTENT.into_response()),
        Err(err) => oauth_error(&err),
    }
}

async fn revoke(
    State(idp): State<DevIdp>,
    Path(realm_name): Path<String>,
    headers: HeaderMap,
    form: Result<Form<OidcForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return form_error();
    };
    let client = client_credentials(&headers, &form);
    let now = idp.now();
    let result =
        idp.with_realm(|realm| realm.revoke(now, &realm_name, &client, form.token.as_deref()));
    match result {
        Ok(()) => with_no_store(StatusCode::OK.into_response()),
        Err(err) => oauth_error(&err),
    }
}

async fn discovery(
    State(idp): State<DevIdp>,
    Path(realm_name): Path<String>,
    headers: HeaderMap,
    prefix: &'static str,
) -> Response {
    if realm_name != idp.settings().realm {
        return oauth_error(&OAuthError {
            status: 404,
            error: "Realm does not exist",
            description: None,
        });
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let issuer = format!("http://{host}{prefix}/realms/{realm_name}");
    let endpoint = |name: &str| format!("{issuer}/protocol/openid-connect/{name}");
    Json(serde_json::json!({
        "issuer": issuer,
        "token_endpoint": endpoint("token"),
        "end_session_endpoint": endpoint("logout"),
        "revocation_endpoint": endpoint("revoke"),
        "grant_types_supported": ["refresh_token"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "id_token_signing_alg_values_supported": ["HS256"],
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------
// Admin API.

fn bad_request(description: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": "invalid_request", "error_description": description})),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "not_found", "error_description": what})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct LoginBody {
    username: String,
}

async fn admin_login(
    State(idp): State<DevIdp>,
    body: Result<Json<LoginBody>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(body)) if !body.username.is_empty() => {
            let tokens: LoginTokens = idp.login(&body.username);
            with_no_store(Json(tokens).into_response())
        }
        Ok(_) => bad_request("username must not be empty".to_owned()),
        Err(err) => bad_request(err.body_text()),
    }
}

async fn admin_stats(State(idp): State<DevIdp>) -> Response {
    Json(idp.stats()).into_response()
}

async fn admin_faults(State(idp): State<DevIdp>) -> Response {
    Json(idp.faults()).into_response()
}

async fn admin_set_faults(
    State(idp): State<DevIdp>,
    body: Result<Json<Vec<Fault>>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(faults)) => {
            idp.set_faults(faults);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) => bad_request(err.body_text()),
    }
}

async fn admin_push_fault(
    State(idp): State<DevIdp>,
    body: Result<Json<Fault>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(fault)) => {
            idp.push_fault(fault);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) => bad_request(err.body_text()),
    }
}

async fn admin_clear_faults(State(idp): State<DevIdp>) -> Response {
    idp.clear_faults();
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_settings(State(idp): State<DevIdp>) -> Response {
    Json(idp.settings().redacted_json()).into_response()
}

async fn admin_update_settings(
    State(idp): State<DevIdp>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let patch = match body {
        Ok(Json(patch)) => patch,
        Err(err) => return bad_request(err.body_text()),
    };
    let result = idp.with_realm(|realm| {
        let updated: RealmSettings = realm.settings.patched(patch)?;
        realm.settings = updated.clone();
        Ok::<_, serde_json::Error>(updated)
    });
    match result {
        Ok(settings) => {
            tracing::debug!(?settings, "dev idp: settings changed");
            Json(settings.redacted_json()).into_response()
        }
        Err(err) => bad_request(err.to_string()),
    }
}

async fn admin_sessions(State(idp): State<DevIdp>) -> Response {
    Json(idp.families()).into_response()
}

async fn admin_session(State(idp): State<DevIdp>, Path(session_state): Path<String>) -> Response {
    match idp.family(&session_state) {
        Some(family) => Json(family).into_response(),
        None => not_found("no such session"),
    }
}

async fn admin_end_session(
    State(idp): State<DevIdp>,
    Path(session_state): Path<String>,
) -> Response {
    if idp.end_session(&session_state) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        not_found("no such active session")
    }
}

async fn admin_disable_user(State(idp): State<DevIdp>, Path(username): Path<String>) -> Response {
    idp.disable_user(&username);
    StatusCode::NO_CONTENT.into_response()
}

async fn admin_enable_user(State(idp): State<DevIdp>, Path(username): Path<String>) -> Response {
    idp.enable_user(&username);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize, serde::Serialize)]
struct TimeOffset {
    offset_secs: i64,
}

async fn admin_time_offset(State(idp): State<DevIdp>) -> Response {
    Json(TimeOffset {
        offset_secs: idp.time_offset(),
    })
    .into_response()
}

async fn admin_set_time_offset(
    State(idp): State<DevIdp>,
    body: Result<Json<TimeOffset>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(TimeOffset { offset_secs })) => {
            idp.set_time_offset(offset_secs);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) => bad_request(err.body_text()),
    }
}
