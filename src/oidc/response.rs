//! Reading one token-endpoint answer: a grant, or a classified [`RefreshError`].
//!
//! Pure: no I/O and no clock. Every instant is anchored at `sent_at`, the moment the request was
//! sent (DESIGN §1), or taken from the answer itself.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use reqwest::header::{CONTENT_TYPE, DATE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;
use serde_json::error::Category;
use tracing::warn;

use super::endpoint::Endpoint;
use super::error::{Outcome, RefreshError, RejectedTarget, sanitize};
use crate::secret::{AccessToken, RefreshToken};

/// An `expires_in` at or above this (1e9 s ≈ 31.7 years; as a date, 2001-09-09) cannot be a
/// lifetime and is read as an absolute Unix time in seconds.
pub const EPOCH_SECONDS_THRESHOLD: u64 = 1_000_000_000;

/// An `expires_in` at or above this (1e12; as seconds, year 33658) is read as an absolute Unix
/// time in milliseconds: a "Java timestamp".
pub const EPOCH_MILLIS_THRESHOLD: u64 = 1_000_000_000_000;

/// Longest plausible access-token lifetime. An answer implying a later expiry is absurd, hence
/// unreadable; so are relative `expires_in` values between this and
/// [`EPOCH_SECONDS_THRESHOLD`].
pub const MAX_ACCESS_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A successful refresh.
///
/// `Debug` is derived: the token newtypes redact themselves.
#[derive(Clone, Debug)]
pub struct TokenGrant {
    /// The new access token (always a bearer token: other types are refused).
    pub access_token: AccessToken,
    /// When the access token stops being valid: the earlier of `sent_at + expires_in` and the
    /// JWT `exp`; either alone when the other is missing; else `sent_at` plus the provider's
    /// default. Always after `sent_at` and at most [`MAX_ACCESS_LIFETIME`] later.
    pub expires_at: SystemTime,
    /// The rotated refresh token. `None`: the answer kept the old one, which stays valid. `Some`:
    /// the old one must be discarded and never sent again.
    pub refresh_token: Option<RefreshToken>,
    /// When the refresh token (new or kept) lapses, from this answer's `refresh_expires_in`.
    pub refresh_expiry: RefreshExpiry,
    /// Granted scopes, space-separated; `""` if the answer had none.
    pub scope: String,
    /// When the request was sent: every expiry above is anchored here.
    pub sent_at: SystemTime,
}

impl TokenGrant {
    /// Whether the answer rotated the refresh token.
    pub fn rotated(&self) -> bool {
        self.refresh_token.is_some()
    }
}

/// When a refresh token lapses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshExpiry {
    /// At this instant (Keycloak: min(SSO idle from now, SSO max from login)).
    At(SystemTime),
    /// Never: `refresh_expires_in` was 0 (offline tokens).
    Never,
    /// The answer did not say and the provider has no default.
    Unknown,
}

/// The fields of a token-endpoint answer that the broker reads, success and error alike.
///
/// Each is a raw [`Value`] so that a wrong type is reported in our own words: serde's messages
/// quote the offending value, which could be a token. Unknown fields are skipped without being
/// stored.
#[derive(Deserialize)]
struct RawAnswer {
    #[serde(default)]
    access_token: Option<Value>,
    #[serde(default)]
    token_type: Option<Value>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    refresh_token: Option<Value>,
    #[serde(default)]
    refresh_expires_in: Option<Value>,
    #[serde(default)]
    scope: Option<Value>,
    #[serde(default)]
    id_token: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    error_description: Option<Value>,
}

impl RawAnswer {
    /// The tokens in this answer, to be scrubbed from any text it contributes to an error.
    fn secrets<'a>(&'a self, known: &[&'a str]) -> Vec<&'a str> {
        let mut secrets = known.to_vec();
        for field in [&self.access_token, &self.refresh_token, &self.id_token] {
            if let Some(Value::String(s)) = field {
                secrets.push(s);
            }
        }
        secrets
    }
}

/// Pure parser and classifier of one token-endpoint answer (used by
/// [`TokenClient::refresh`](super::TokenClient::refresh) and by tests).
///
/// - 2xx: a [`TokenGrant`], or [`RefreshError::Unreadable`] with [`Outcome::Unknown`] (the IdP
///   may have rotated the token) when the body is not a usable grant.
/// - 408, 425, 429, 5xx: [`RefreshError::Transient`], with `Retry-After` honoured.
/// - 3xx (redirects are never followed): [`RefreshError::Rejected`] for the config: the URL is
///   wrong.
/// - other 4xx: by the OAuth `error` code (`invalid_grant`, `invalid_scope` → session;
///   `temporarily_unavailable`, `server_error`, `slow_down` → transient; everything else,
///   including codes we do not know, → config: an unexplained refusal is for an operator to look
///   at, not a reason to end the user's session); [`RefreshError::Unreadable`] without one.
///
/// A body longer than `endpoint.max_body_bytes` is unreadable whatever it holds.
pub fn parse_token_response(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    sent_at: SystemTime,
    endpoint: &Endpoint,
) -> Result<TokenGrant, RefreshError> {
    classify_answer(status, headers, body, sent_at, endpoint, &[])
}

/// [`parse_token_response`], also scrubbing `known_secrets` (the presented refresh token) from
/// any text that ends up in an error.
pub(crate) fn classify_answer(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    sent_at: SystemTime,
    endpoint: &Endpoint,
    known_secrets: &[&str],
) -> Result<TokenGrant, RefreshError> {
    if (200..300).contains(&status) {
        parse_grant(status, headers, body, sent_at, endpoint, known_secrets)
    } else {
        Err(classify_failure(
            status,
            headers,
            body,
            sent_at,
            endpoint,
            known_secrets,
        ))
    }
}

/// Statuses that say "not now" whatever the body: retry with backoff.
pub(crate) fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500..=599)
}

/// Classifies a non-2xx answer (refresh, logout or revocation). See [`parse_token_response`].
pub(crate) fn classify_failure(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    sent_at: SystemTime,
    endpoint: &Endpoint,
    known_secrets: &[&str],
) -> RefreshError {
    let unreadable = |cause: String| RefreshError::Unreadable {
        cause,
        status,
        outcome: Outcome::NotProcessed,
    };
    if is_transient_status(status) {
        return RefreshError::Transient {
            cause: format!("HTTP {status}"),
            retry_after: retry_after(headers, sent_at),
            outcome: Outcome::NotProcessed,
        };
    }
    if (300..400).contains(&status) {
        return RefreshError::Rejected {
            target: RejectedTarget::Config,
            status,
            error: "unexpected_redirect".to_owned(),
            description: "the endpoint answered with a redirect; check the configured URL"
                .to_owned(),
        };
    }
    if !(400..500).contains(&status) {
        return unreadable("unexpected HTTP status".to_owned());
    }
    if body.len() > endpoint.max_body_bytes {
        return unreadable(format!("error body over {} bytes", endpoint.max_body_bytes));
    }
    let raw: RawAnswer = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => {
            return unreadable(format!(
                "no OAuth error in the answer: {}",
                json_error_cause(&e, headers, body)
            ));
        }
    };
    let secrets = raw.secrets(known_secrets);
    let code = match &raw.error {
        Some(Value::String(code)) if !code.trim().is_empty() => code.trim(),
        _ => return unreadable("no OAuth error code in the answer".to_owned()),
    };
    let error = sanitize(code, &secrets);
    let description = match &raw.error_description {
        Some(Value::String(d)) => sanitize(d, &secrets),
        _ => String::new(),
    };
    let rejected = |target| RefreshError::Rejected {
        target,
        status,
        error: error.clone(),
        description: description.clone(),
    };
    match code {
        "invalid_grant" | "invalid_scope" => rejected(RejectedTarget::Session),
        "invalid_client" | "unauthorized_client" | "invalid_request" | "unsupported_grant_type" => {
            rejected(RejectedTarget::Config)
        }
        "temporarily_unavailable" | "server_error" | "slow_down" => RefreshError::Transient {
            cause: format!("HTTP {status} {error}"),
            retry_after: retry_after(headers, sent_at),
            outcome: Outcome::NotProcessed,
        },
        _ => rejected(RejectedTarget::Config),
    }
}

/// Reads a 2xx answer into a grant. Any failure is unreadable with an unknown outcome: the IdP
/// accepted the request, so it may have rotated the presented token.
fn parse_grant(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    sent_at: SystemTime,
    endpoint: &Endpoint,
    known_secrets: &[&str],
) -> Result<TokenGrant, RefreshError> {
    let unreadable = |cause: String| RefreshError::Unreadable {
        cause,
        status,
        outcome: Outcome::Unknown,
    };
    if body.len() > endpoint.max_body_bytes {
        return Err(unreadable(format!(
            "body over {} bytes",
            endpoint.max_body_bytes
        )));
    }
    let raw: RawAnswer = serde_json::from_slice(body)
        .map_err(|e| unreadable(json_error_cause(&e, headers, body)))?;

    match &raw.token_type {
        None => {}
        Some(Value::String(t)) if t.trim().eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => {
            let shown = sanitize(t, &raw.secrets(known_secrets));
            return Err(unreadable(format!("unsupported token_type {shown:?}")));
        }
        Some(_) => return Err(unreadable("token_type is not a string".to_owned())),
    }

    let access_token = match raw.access_token {
        Some(Value::String(s)) if !s.is_empty() => AccessToken::new(s),
        Some(Value::String(_)) | None => {
            return Err(unreadable("no access_token in the answer".to_owned()));
        }
        Some(_) => return Err(unreadable("access_token is not a string".to_owned())),
    };
    let refresh_token = match raw.refresh_token {
        // Absent, null or empty: the IdP did not rotate; the presented token stays valid.
        None => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(RefreshToken::new(s)),
        Some(_) => return Err(unreadable("refresh_token is not a string".to_owned())),
    };
    // Reading the token is the only way to find its `exp`; nothing of it is kept or shown.
    let exp = jwt_exp(access_token.expose_secret());
    let expires_at =
        access_expiry(raw.expires_in.as_ref(), exp, sent_at, endpoint).map_err(unreadable)?;
    let refresh_expiry = refresh_expiry(raw.refresh_expires_in.as_ref(), sent_at, endpoint);
    let scope = match raw.scope {
        Some(Value::String(scope)) => scope,
        _ => String::new(),
    };
    Ok(TokenGrant {
        access_token,
        expires_at,
        refresh_token,
        refresh_expiry,
        scope,
        sent_at,
    })
}

/// Why a body is not the JSON object we need, in our own words (serde's quote values).
fn json_error_cause(err: &serde_json::Error, headers: &HeaderMap, body: &[u8]) -> String {
    let start = body.trim_ascii_start();
    if start.is_empty() {
        return "empty body".to_owned();
    }
    if start.first() == Some(&b'<') {
        let content_type = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| sanitize(v, &[]))
            .unwrap_or_default();
        return format!("not JSON: looks like an HTML page (content-type {content_type:?})");
    }
    match err.classify() {
        Category::Eof => format!(
            "truncated JSON (ends at line {}, column {})",
            err.line(),
            err.column()
        ),
        Category::Syntax => format!(
            "not JSON (syntax error at line {}, column {})",
            err.line(),
            err.column()
        ),
        Category::Data => "JSON but not a single object with distinct fields".to_owned(),
        Category::Io => "body could not be read".to_owned(),
    }
}

/// A non-negative whole number of seconds from a JSON number (fractions dropped) or a string of
/// digits (some IdPs send `"3600"`). `None` for anything else.
fn read_seconds(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                // Float-to-int `as` saturates; the range checks downstream catch huge values.
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The instant a numeric `expires_in`/`refresh_expires_in` designates: relative seconds from
/// `sent_at` below [`EPOCH_SECONDS_THRESHOLD`], absolute Unix seconds below
/// [`EPOCH_MILLIS_THRESHOLD`], absolute Unix milliseconds from there. `None` if unrepresentable.
fn stated_instant(n: u64, sent_at: SystemTime) -> Option<SystemTime> {
    if n >= EPOCH_MILLIS_THRESHOLD {
        UNIX_EPOCH.checked_add(Duration::from_millis(n))
    } else if n >= EPOCH_SECONDS_THRESHOLD {
        UNIX_EPOCH.checked_add(Duration::from_secs(n))
    } else {
        sent_at.checked_add(Duration::from_secs(n))
    }
}

/// The access token's expiry (see [`TokenGrant::expires_at`]); `Err` with a cause when the answer
/// states an unusable one.
fn access_expiry(
    expires_in: Option<&Value>,
    jwt_exp: Option<SystemTime>,
    sent_at: SystemTime,
    endpoint: &Endpoint,
) -> Result<SystemTime, String> {
    let stated = match expires_in {
        None => None,
        Some(value) => {
            let n = read_seconds(value)
                .ok_or_else(|| "expires_in is not a non-negative number".to_owned())?;
            let at = stated_instant(n, sent_at)
                .ok_or_else(|| "expires_in is out of range".to_owned())?;
            Some(at)
        }
    };
    let expires_at = match (stated, jwt_exp) {
        (Some(stated), Some(exp)) => stated.min(exp),
        (Some(stated), None) => stated,
        (None, Some(exp)) => exp,
        (None, None) => sent_at
            .checked_add(endpoint.default_access_lifetime)
            .ok_or_else(|| "default access lifetime is out of range".to_owned())?,
    };
    match expires_at.duration_since(sent_at) {
        Err(_) | Ok(Duration::ZERO) => {
            Err("access token already expired when the request was sent".to_owned())
        }
        Ok(lifetime) if lifetime > MAX_ACCESS_LIFETIME => Err(format!(
            "access token lifetime over {} days",
            MAX_ACCESS_LIFETIME.as_secs() / 86_400
        )),
        Ok(_) => Ok(expires_at),
    }
}

/// The refresh token's expiry: `0` means never; an unusable value falls back to the provider's
/// default with a warning rather than failing the grant, because failing a 200 would throw away
/// a refresh token the IdP has just rotated.
fn refresh_expiry(
    value: Option<&Value>,
    sent_at: SystemTime,
    endpoint: &Endpoint,
) -> RefreshExpiry {
    let default = || {
        endpoint
            .default_refresh_lifetime
            .and_then(|d| sent_at.checked_add(d))
            .map_or(RefreshExpiry::Unknown, RefreshExpiry::At)
    };
    let Some(value) = value else {
        return default();
    };
    match read_seconds(value) {
        Some(0) => RefreshExpiry::Never,
        Some(n) => match stated_instant(n, sent_at) {
            Some(at) if at > sent_at => RefreshExpiry::At(at),
            _ => {
                warn!(provider = %endpoint.provider, "refresh_expires_in is out of range; using the provider default");
                default()
            }
        },
        None => {
            warn!(provider = %endpoint.provider, "refresh_expires_in is not a non-negative number; using the provider default");
            default()
        }
    }
}

/// `Retry-After` as a wait, capped at [`MAX_RETRY_AFTER`]: delta-seconds, or an HTTP-date taken
/// relative to the answer's own `Date` header (same clock, so immune to skew) or, without one, to
/// `sent_at` (which overstates the wait by at most the request's latency). A date in the past or
/// an unparsable value gives `None`.
pub(crate) fn retry_after(headers: &HeaderMap, sent_at: SystemTime) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        // Only overflow can fail here: such a wait is over the cap anyway.
        raw.parse().map_or(MAX_RETRY_AFTER, Duration::from_secs)
    } else {
        let at = httpdate::parse_http_date(raw).ok()?;
        let reference = headers
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
            .unwrap_or(sent_at);
        at.duration_since(reference).ok()?
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// base64url, with or without padding (JWTs have none, but some producers add it).
const JWT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The `exp` claim of a JWT, without checking the signature (the broker is not the audience; it
/// only wants a cross-check of the lifetime). Tolerates `alg: none` (empty signature) and
/// padded or unpadded base64url. `None` when the token is not a three-part JWS whose header has
/// an `alg` and whose claims have a numeric `exp` (a JWE, with five parts, is not readable).
pub fn jwt_exp(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (header, claims, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&JWT_BASE64.decode(header).ok()?).ok()?;
    if !header.contains_key("alg") {
        return None;
    }
    let claims: serde_json::Map<String, Value> =
        serde_json::from_slice(&JWT_BASE64.decode(claims).ok()?).ok()?;
    let secs = match claims.get("exp")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
        })?,
        _ => return None,
    };
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::oidc::ErrorClass;
    use reqwest::header::HeaderValue;
    use serde_json::json;

    const NOW: u64 = 1_795_639_582;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn endpoint() -> Endpoint {
        Endpoint::new_default("apiax", "https://idp.example/token", "integration-api")
    }

    fn parse(status: u16, body: &Value) -> Result<TokenGrant, RefreshError> {
        parse_token_response(
            status,
            &HeaderMap::new(),
            body.to_string().as_bytes(),
            now(),
            &endpoint(),
        )
    }

    fn jwt(header: &str, claims: &str, pad: bool) -> String {
        let engine = if pad {
            base64::engine::general_purpose::URL_SAFE
        } else {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
        };
        format!("{}.{}.", engine.encode(header), engine.encode(claims))
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn jwt_exp_reads_signed_and_unsigned_tokens() {
        let unpadded = jwt(
            r#"{"alg":"none"}"#,
            r#"{"exp":1795641382,"sub":"u"}"#,
            false,
        );
        assert_eq!(jwt_exp(&unpadded), Some(at(1_795_641_382)));
        let padded = jwt(
            r#"{"alg":"RS256","typ":"JWT"}"#,
            r#"{"exp":17956413}"#,
            true,
        );
        assert!(padded.contains('='));
        assert_eq!(jwt_exp(&padded), Some(at(17_956_413)));
        let with_sig = format!(
            "{}sig-bytes",
            jwt(r#"{"alg":"HS256"}"#, r#"{"exp":5.7}"#, false)
        );
        assert_eq!(jwt_exp(&with_sig), Some(at(5)));
    }

    #[test]
    fn jwt_exp_is_none_for_other_tokens() {
        assert_eq!(jwt_exp("AT"), None);
        assert_eq!(jwt_exp("a.b.c"), None);
        assert_eq!(jwt_exp(""), None);
        assert_eq!(
            jwt_exp(&jwt(r#"{"alg":"none"}"#, r#"{"sub":"u"}"#, false)),
            None
        );
        assert_eq!(
            jwt_exp(&jwt(r#"{"typ":"JWT"}"#, r#"{"exp":1}"#, false)),
            None
        );
        assert_eq!(
            jwt_exp(&jwt(r#"{"alg":"none"}"#, r#"{"exp":"1"}"#, false)),
            None
        );
        assert_eq!(
            jwt_exp(&jwt(r#"{"alg":"none"}"#, r#"{"exp":-1}"#, false)),
            None
        );
        let jwe = format!("{}x.y.z", jwt(r#"{"alg":"none"}"#, r#"{"exp":1}"#, false));
        assert_eq!(jwt_exp(&jwe), None);
    }

    #[test]
    fn expires_in_is_relative_below_the_epoch_threshold() {
        let grant = parse(200, &json!({"access_token":"AT","expires_in":300})).unwrap();
        assert_eq!(grant.expires_at, at(NOW + 300));
        assert_eq!(grant.sent_at, now());
        // Some IdPs send it as a string.
        let grant = parse(200, &json!({"access_token":"AT","expires_in":"300"})).unwrap();
        assert_eq!(grant.expires_at, at(NOW + 300));
    }

    #[test]
    fn expires_in_as_an_epoch_is_read_as_one() {
        let grant = parse(200, &json!({"access_token":"AT","expires_in":NOW + 600})).unwrap();
        assert_eq!(grant.expires_at, at(NOW + 600));
        let millis = (NOW + 600) * 1000 + 250;
        let grant = parse(200, &json!({"access_token":"AT","expires_in":millis})).unwrap();
        assert_eq!(grant.expires_at, at(NOW + 600) + Duration::from_millis(250));
    }

    #[test]
    fn past_or_absurd_expiries_are_unreadable() {
        for expires_in in [
            json!(0),
            json!(-5),
            json!(EPOCH_SECONDS_THRESHOLD - 1),
            json!(MAX_ACCESS_LIFETIME.as_secs() + 1),
            json!(EPOCH_SECONDS_THRESHOLD),
            json!(NOW - 1),
            json!((NOW - 1) * 1000),
            json!((NOW + 400 * 86_400) * 1000),
            json!(u64::MAX),
            json!(1e300),
            json!("soon"),
            json!(true),
        ] {
            let err = parse(200, &json!({"access_token":"AT","expires_in":expires_in}))
                .expect_err(&expires_in.to_string());
            assert_eq!(err.class(), ErrorClass::Unreadable, "{expires_in}");
            assert!(err.outcome_unknown(), "{expires_in}");
        }
        assert!(
            parse(
                200,
                &json!({"access_token":"AT","expires_in":MAX_ACCESS_LIFETIME.as_secs()})
            )
            .is_ok()
        );
    }

    #[test]
    fn jwt_exp_cross_checks_expires_in() {
        let token = jwt(
            r#"{"alg":"none"}"#,
            &format!(r#"{{"exp":{}}}"#, NOW + 600),
            false,
        );
        let earlier_exp = parse(200, &json!({"access_token":token,"expires_in":1800})).unwrap();
        assert_eq!(earlier_exp.expires_at, at(NOW + 600));
        let earlier_field = parse(200, &json!({"access_token":token,"expires_in":60})).unwrap();
        assert_eq!(earlier_field.expires_at, at(NOW + 60));
        let fallback = parse(200, &json!({"access_token":token})).unwrap();
        assert_eq!(fallback.expires_at, at(NOW + 600));

        let expired = jwt(
            r#"{"alg":"none"}"#,
            &format!(r#"{{"exp":{}}}"#, NOW - 10),
            false,
        );
        let err = parse(200, &json!({"access_token":expired,"expires_in":1800})).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
    }

    #[test]
    fn default_lifetimes_apply_when_the_answer_is_silent() {
        let mut ep = endpoint();
        ep.default_access_lifetime = Duration::from_secs(120);
        ep.default_refresh_lifetime = Some(Duration::from_secs(3600));
        let body = br#"{"access_token":"AT"}"#;
        let grant = parse_token_response(200, &HeaderMap::new(), body, now(), &ep).unwrap();
        assert_eq!(grant.expires_at, at(NOW + 120));
        assert_eq!(grant.refresh_expiry, RefreshExpiry::At(at(NOW + 3600)));
        assert_eq!(grant.scope, "");
        assert!(!grant.rotated());

        let grant = parse(200, &json!({"access_token":"AT"})).unwrap();
        assert_eq!(grant.refresh_expiry, RefreshExpiry::Unknown);
    }

    #[test]
    fn an_odd_refresh_expiry_does_not_fail_the_grant() {
        for value in [json!(-1), json!("x"), json!(NOW - 5)] {
            let grant = parse(
                200,
                &json!({"access_token":"AT","refresh_token":"RT2","refresh_expires_in":value}),
            )
            .unwrap();
            assert_eq!(grant.refresh_expiry, RefreshExpiry::Unknown, "{value}");
            assert!(grant.rotated());
        }
        let grant = parse(200, &json!({"access_token":"AT","refresh_expires_in":0})).unwrap();
        assert_eq!(grant.refresh_expiry, RefreshExpiry::Never);
    }

    #[test]
    fn empty_or_null_refresh_token_keeps_the_old_one() {
        for value in [json!(null), json!("")] {
            let grant = parse(200, &json!({"access_token":"AT","refresh_token":value})).unwrap();
            assert!(!grant.rotated());
        }
        let err = parse(200, &json!({"access_token":"AT","refresh_token":42})).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
    }

    #[test]
    fn wrong_shapes_are_unreadable_with_an_unknown_outcome() {
        for body in [
            json!([]),
            json!("AT"),
            json!({"access_token":""}),
            json!({"access_token":7}),
            json!({"access_token":"AT","token_type":7}),
            json!({"access_token":"AT","token_type":"mac"}),
        ] {
            let err = parse(200, &body).unwrap_err();
            assert_eq!(err.class(), ErrorClass::Unreadable, "{body}");
            assert_eq!(err.outcome(), Outcome::Unknown, "{body}");
        }
        let dup = br#"{"access_token":"AT","access_token":"AT2"}"#;
        let err =
            parse_token_response(200, &HeaderMap::new(), dup, now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
    }

    #[test]
    fn error_codes_map_to_classes() {
        let cases = [
            (400, "invalid_grant", ErrorClass::RejectedSession),
            (400, "invalid_scope", ErrorClass::RejectedSession),
            (401, "invalid_client", ErrorClass::RejectedConfig),
            (400, "unauthorized_client", ErrorClass::RejectedConfig),
            (400, "invalid_request", ErrorClass::RejectedConfig),
            (400, "unsupported_grant_type", ErrorClass::RejectedConfig),
            (400, "access_denied", ErrorClass::RejectedConfig),
            (403, "something_new", ErrorClass::RejectedConfig),
            (400, "temporarily_unavailable", ErrorClass::Transient),
            (400, "server_error", ErrorClass::Transient),
            (500, "invalid_grant", ErrorClass::Transient),
            (429, "invalid_grant", ErrorClass::Transient),
            (408, "invalid_grant", ErrorClass::Transient),
        ];
        for (status, code, class) in cases {
            let err = parse(status, &json!({"error":code})).unwrap_err();
            assert_eq!(err.class(), class, "{status} {code}");
            assert_eq!(err.outcome(), Outcome::NotProcessed, "{status} {code}");
        }
    }

    #[test]
    fn other_statuses_are_classified() {
        let html = b"<html>Not Found</html>";
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let err = parse_token_response(404, &headers, html, now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
        assert_eq!(err.outcome(), Outcome::NotProcessed);
        assert!(err.to_string().contains("HTML"), "{err}");

        let err =
            parse_token_response(302, &HeaderMap::new(), b"", now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::RejectedConfig);

        let err =
            parse_token_response(101, &HeaderMap::new(), b"", now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
        let err =
            parse_token_response(600, &HeaderMap::new(), b"", now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);

        let err =
            parse_token_response(204, &HeaderMap::new(), b"", now(), &endpoint()).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Unreadable);
        assert!(err.outcome_unknown());
    }

    #[test]
    fn rejection_keeps_the_idp_words_but_not_tokens() {
        let body = json!({
            "error":"invalid_grant",
            "error_description":"Invalid refresh token: rt-value-0123456789\u{0}\n",
            "refresh_token":"rt-value-0123456789",
        });
        let err = parse(400, &body).unwrap_err();
        let RefreshError::Rejected {
            description,
            error,
            status,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert_eq!((*status, error.as_str()), (400, "invalid_grant"));
        assert_eq!(description, "Invalid refresh token: [redacted]");

        let long = "x".repeat(5000);
        let err = parse(
            400,
            &json!({"error":"invalid_grant","error_description":long}),
        )
        .unwrap_err();
        assert!(err.to_string().len() < 400, "{err}");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let with = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            retry_after(&headers, now())
        };
        assert_eq!(with(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(with(&[("retry-after", " 0 ")]), Some(Duration::ZERO));
        assert_eq!(with(&[("retry-after", "86400")]), Some(MAX_RETRY_AFTER));
        assert_eq!(
            with(&[("retry-after", "99999999999999999999999")]),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(with(&[("retry-after", "-3")]), None);
        assert_eq!(with(&[("retry-after", "soon")]), None);
        assert_eq!(with(&[]), None);
        // 2026-11-25T21:00:00Z is 818 s after NOW.
        let date = "Wed, 25 Nov 2026 21:00:00 GMT";
        assert_eq!(
            with(&[("retry-after", date)]),
            Some(Duration::from_secs(818))
        );
        // The server's own Date header is the reference when present.
        assert_eq!(
            with(&[
                ("retry-after", date),
                ("date", "Wed, 25 Nov 2026 20:59:30 GMT")
            ]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            with(&[("retry-after", "Wed, 25 Nov 2026 20:00:00 GMT")]),
            None
        );
    }

    #[test]
    fn truncated_and_html_bodies_are_described_without_content() {
        let body = br#"{"access_token":"secret-access-token-value","expires_in":18"#;
        let err =
            parse_token_response(200, &HeaderMap::new(), body, now(), &endpoint()).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(!err.to_string().contains("secret-access"), "{err}");

        let body = br#"{"access_token":"secret-access-token-value","expires_in":"x"}"#;
        let err =
            parse_token_response(200, &HeaderMap::new(), body, now(), &endpoint()).unwrap_err();
        assert!(!format!("{err:?}").contains("secret-access"), "{err:?}");
    }
}
