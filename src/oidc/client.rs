//! The HTTP side: posting forms to the token, logout and revocation endpoints, reading answers
//! under a size cap, and telling transport failures apart by what the IdP may have seen.

use std::error::Error as _;
use std::sync::Arc;
use std::time::SystemTime;

use reqwest::header::{ACCEPT, HeaderMap, HeaderValue};
use reqwest::{Response, Url};
use tokio::time::Instant;
use tracing::debug;
use zeroize::Zeroizing;

use super::endpoint::{Endpoint, EndpointError};
use super::error::{Outcome, RefreshError, sanitize};
use super::response::{TokenGrant, classify_answer, classify_failure, is_transient_status};
use crate::secret::RefreshToken;

/// The `User-Agent` sent to the IdP.
pub const USER_AGENT: &str = concat!("tokenbroker/", env!("CARGO_PKG_VERSION"));

/// First allocation for a body of unknown length: a Keycloak answer fits.
const INITIAL_BODY_CAPACITY: usize = 8 * 1024;

/// A client for one provider's token endpoint. Cheap to clone (an `Arc` inside); clones share
/// the connection pool.
#[derive(Clone, Debug)]
pub struct TokenClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: Endpoint,
    http: reqwest::Client,
    token_url: Url,
    logout_url: Option<Url>,
    revoke_url: Option<Url>,
}

/// Which request is being made, for logs.
#[derive(Clone, Copy, Debug)]
enum Operation {
    Refresh,
    Logout,
    Revoke,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Refresh => "refresh",
            Self::Logout => "logout",
            Self::Revoke => "revoke",
        }
    }
}

/// An answer whose status line and headers arrived. The body may still have failed.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Result<Zeroizing<Vec<u8>>, BodyError>,
    sent_at: SystemTime,
}

enum BodyError {
    /// Longer than `max_body_bytes` (declared or as read); reading stopped at the cap.
    TooLarge,
    /// The connection failed or timed out while reading.
    Transport(reqwest::Error),
}

impl TokenClient {
    /// Validates the endpoint and builds the HTTP client: rustls with certificate verification,
    /// the endpoint's timeouts, no redirects, the [`USER_AGENT`].
    pub fn new(endpoint: Endpoint) -> Result<Self, EndpointError> {
        endpoint.validate()?;
        let token_url = endpoint.parse_url("token_url", &endpoint.token_url)?;
        let logout_url = endpoint
            .logout_url
            .as_deref()
            .map(|url| endpoint.parse_url("logout_url", url))
            .transpose()?;
        let revoke_url = endpoint
            .revoke_url
            .as_deref()
            .map(|url| endpoint.parse_url("revoke_url", url))
            .transpose()?;
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &endpoint.extra_roots_pem {
            let roots =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|e| EndpointError::Invalid {
                    provider: endpoint.provider.clone(),
                    field: "extra_roots_pem",
                    reason: format!("not a PEM certificate bundle: {}", error_chain(&e)),
                })?;
            if roots.is_empty() {
                return Err(EndpointError::Invalid {
                    provider: endpoint.provider.clone(),
                    field: "extra_roots_pem",
                    reason: "holds no certificate".into(),
                });
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let http = builder
            .user_agent(USER_AGENT)
            .connect_timeout(endpoint.connect_timeout)
            .timeout(endpoint.request_timeout)
            // A token endpoint never redirects; following one could post the refresh token
            // somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| EndpointError::Client {
                provider: endpoint.provider.clone(),
                cause: error_chain(&e),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                http,
                token_url,
                logout_url,
                revoke_url,
            }),
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Exchanges a refresh token for a new access token (and, usually, a new refresh token).
    ///
    /// On `Err`, [`RefreshError::outcome`] says whether the IdP may have rotated the presented
    /// token.
    pub async fn refresh(&self, refresh_token: &RefreshToken) -> Result<TokenGrant, RefreshError> {
        self.refresh_traced(refresh_token, None).await
    }

    /// [`TokenClient::refresh`], sending `trace` as the request's W3C
    /// `traceparent`.
    pub async fn refresh_traced(
        &self,
        refresh_token: &RefreshToken,
        trace: Option<&crate::telemetry::TraceContext>,
    ) -> Result<TokenGrant, RefreshError> {
        let endpoint = &self.inner.endpoint;
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("client_id", endpoint.client_id.as_str()),
            ("refresh_token", refresh_token.expose_secret()),
        ];
        if let Some(secret) = &endpoint.client_secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let secrets = [refresh_token.expose_secret()];
        let answer = self
            .post(
                Operation::Refresh,
                &self.inner.token_url,
                &form,
                &secrets,
                trace,
            )
            .await?;
        match &answer.body {
            Ok(body) => classify_answer(
                answer.status,
                &answer.headers,
                body,
                answer.sent_at,
                endpoint,
                &secrets,
            ),
            Err(e) => Err(self.body_failure(&answer, e, &secrets)),
        }
    }

    /// Ends the session upstream: posts to the logout endpoint (`client_id` + `refresh_token`),
    /// else to the revocation endpoint (`token` + `token_type_hint` + `client_id`); `Ok(())` on
    /// any 2xx, or at once when neither is configured.
    pub async fn logout(&self, refresh_token: &RefreshToken) -> Result<(), RefreshError> {
        let endpoint = &self.inner.endpoint;
        let (operation, url, mut form) = if let Some(url) = &self.inner.logout_url {
            let form = vec![
                ("client_id", endpoint.client_id.as_str()),
                ("refresh_token", refresh_token.expose_secret()),
            ];
            (Operation::Logout, url, form)
        } else if let Some(url) = &self.inner.revoke_url {
            let form = vec![
                ("token", refresh_token.expose_secret()),
                ("token_type_hint", "refresh_token"),
                ("client_id", endpoint.client_id.as_str()),
            ];
            (Operation::Revoke, url, form)
        } else {
            return Ok(());
        };
        if let Some(secret) = &endpoint.client_secret {
            form.push(("client_secret", secret.expose_secret()));
        }
        let secrets = [refresh_token.expose_secret()];
        let answer = self.post(operation, url, &form, &secrets, None).await?;
        if (200..300).contains(&answer.status) {
            // The IdP acted; whatever the body says (or fails to say) does not matter.
            return Ok(());
        }
        match &answer.body {
            Ok(body) => Err(classify_failure(
                answer.status,
                &answer.headers,
                body,
                answer.sent_at,
                endpoint,
                &secrets,
            )),
            Err(e) => Err(self.body_failure(&answer, e, &secrets)),
        }
    }

    /// Posts a form and reads the answer's body up to the cap. `Err` only when no status line
    /// arrived.
    async fn post(
        &self,
        operation: Operation,
        url: &Url,
        form: &[(&str, &str)],
        secrets: &[&str],
        trace: Option<&crate::telemetry::TraceContext>,
    ) -> Result<Answer, RefreshError> {
        let endpoint = &self.inner.endpoint;
        let started = Instant::now();
        let sent_at = SystemTime::now();
        let mut request = self
            .inner
            .http
            .post(url.clone())
            .header(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(trace) = trace {
            request = request.header("traceparent", trace.header());
        }
        let sent = request.form(form).send().await;
        let mut response = match sent {
            Ok(response) => response,
            Err(e) => {
                let error = transport_error(&e, secrets);
                debug!(
                    provider = %endpoint.provider,
                    operation = operation.as_str(),
                    latency_ms = started.elapsed().as_millis(),
                    error = %error,
                    "token endpoint request failed"
                );
                return Err(error);
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = read_capped(&mut response, endpoint.max_body_bytes).await;
        debug!(
            provider = %endpoint.provider,
            operation = operation.as_str(),
            status,
            latency_ms = started.elapsed().as_millis(),
            body_bytes = body.as_ref().map_or(0, |b| b.len()),
            body_complete = body.is_ok(),
            "token endpoint answered"
        );
        Ok(Answer {
            status,
            headers,
            body,
            sent_at,
        })
    }

    /// Classifies an answer whose body could not be read. The status still tells whether the
    /// IdP accepted the request: only after a 2xx may it have rotated the token.
    fn body_failure(&self, answer: &Answer, error: &BodyError, secrets: &[&str]) -> RefreshError {
        let status = answer.status;
        if is_transient_status(status) {
            // The status alone decides; the body was only informative.
            return classify_failure(
                status,
                &answer.headers,
                b"",
                answer.sent_at,
                &self.inner.endpoint,
                secrets,
            );
        }
        let outcome = if (200..300).contains(&status) {
            Outcome::Unknown
        } else {
            Outcome::NotProcessed
        };
        match error {
            BodyError::TooLarge => RefreshError::Unreadable {
                cause: format!("body over {} bytes", self.inner.endpoint.max_body_bytes),
                status,
                outcome,
            },
            BodyError::Transport(e) => RefreshError::Transient {
                cause: format!(
                    "answer lost while reading the HTTP {status} body: {}",
                    describe(e, secrets)
                ),
                retry_after: None,
                outcome,
            },
        }
    }
}

/// Reads the body chunk by chunk, never holding more than `cap` bytes: a declared or actual
/// larger body stops the read (and the connection is dropped, not reused). The buffer is
/// zeroized when dropped, and so is every smaller buffer it outgrew.
async fn read_capped(response: &mut Response, cap: usize) -> Result<Zeroizing<Vec<u8>>, BodyError> {
    let declared = response.content_length();
    if declared.is_some_and(|len| len > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let initial = declared
        .map_or(INITIAL_BODY_CAPACITY, |len| len as usize)
        .min(cap);
    let mut body = Zeroizing::new(Vec::with_capacity(initial));
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if chunk.len() > cap - body.len() {
            return Err(BodyError::TooLarge);
        }
        if body.capacity() - body.len() < chunk.len() {
            // Grow by hand so that the outgrown buffer is zeroized rather than freed as is.
            let wanted = (body.len() + chunk.len()).max(body.capacity() * 2).min(cap);
            let mut bigger = Zeroizing::new(Vec::with_capacity(wanted));
            bigger.extend_from_slice(&body);
            body = bigger;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Classifies a request that got no answer.
///
/// Only a failure to connect (DNS, TCP, TLS, connect timeout) proves the IdP never saw the
/// request. Anything later — a timeout, a reset while sending or while waiting for the status
/// line — may have happened after the IdP processed it, so the outcome is unknown.
fn transport_error(error: &reqwest::Error, secrets: &[&str]) -> RefreshError {
    let outcome = if error.is_connect() || error.is_builder() {
        Outcome::NotProcessed
    } else {
        Outcome::Unknown
    };
    RefreshError::Transient {
        cause: describe(error, secrets),
        retry_after: None,
        outcome,
    }
}

/// A short description of a transport error: its kind and its source chain (io, hyper, rustls
/// messages), without the URL, scrubbed of `secrets` for good measure.
fn describe(error: &reqwest::Error, secrets: &[&str]) -> String {
    let kind = if error.is_connect() {
        "connect failed"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_body() || error.is_decode() {
        "body failed"
    } else {
        "request failed"
    };
    let chain = error_sources(error);
    let text = if chain.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {chain}")
    };
    sanitize(&text, secrets)
}

/// The messages of an error's sources, outermost first, duplicates dropped.
fn error_sources(error: &reqwest::Error) -> String {
    let mut messages: Vec<String> = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !messages.contains(&message) {
            messages.push(message);
        }
        source = cause.source();
    }
    messages.join(": ")
}

/// An error and its sources, for client-construction failures.
fn error_chain(error: &reqwest::Error) -> String {
    let sources = error_sources(error);
    if sources.is_empty() {
        "TLS or client setup failed".to_owned()
    } else {
        sources
    }
}
