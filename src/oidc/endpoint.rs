//! One provider's token endpoint: where to post, with which client credentials, within which
//! limits. Validated once, before any request is made.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::Url;

use super::response::MAX_ACCESS_LIFETIME;
use crate::secret::ClientSecret;

/// Default for [`Endpoint::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`Endpoint::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Default for [`Endpoint::max_body_bytes`]: a Keycloak answer is a few KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;
/// Default for [`Endpoint::default_access_lifetime`]: Keycloak's default access-token lifespan.
pub const DEFAULT_ACCESS_LIFETIME: Duration = Duration::from_secs(1800);
/// Largest accepted [`Endpoint::max_body_bytes`]: the cap exists to bound memory per request.
pub const MAX_BODY_BYTES_LIMIT: usize = 16 * 1024 * 1024;

/// A provider's token endpoint and the limits that apply to talking to it.
///
/// `Debug` is derived: the client secret's own `Debug` redacts it, and [`Endpoint::validate`]
/// refuses URLs that carry credentials, so nothing secret can be printed.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Provider name from the config, for logs and errors.
    pub provider: String,
    /// The token endpoint (`…/protocol/openid-connect/token`).
    pub token_url: String,
    /// Keycloak's logout endpoint (`client_id` + `refresh_token` form, answers 204).
    pub logout_url: Option<String>,
    /// RFC 7009 revocation endpoint (`token` + `client_id` form, answers 200), used for logout
    /// when there is no `logout_url`.
    pub revoke_url: Option<String>,
    /// The broker's OAuth client id at this provider.
    pub client_id: String,
    /// Sent as the `client_secret` form field (`client_secret_post`) when set.
    pub client_secret: Option<ClientSecret>,
    /// Bound on DNS + TCP + TLS. Must be shorter than `request_timeout`, so that a slow connect
    /// is reported as a connect failure (nothing sent) rather than as a request timeout (outcome
    /// unknown).
    pub connect_timeout: Duration,
    /// Bound on the whole exchange, connect and response body included.
    pub request_timeout: Duration,
    /// Largest response body read; a larger one is [`Unreadable`](super::RefreshError::Unreadable).
    pub max_body_bytes: usize,
    /// Access-token lifetime when the answer has neither `expires_in` nor a JWT `exp`.
    pub default_access_lifetime: Duration,
    /// Refresh-token lifetime when the answer has no usable `refresh_expires_in`; `None` means
    /// unknown.
    pub default_refresh_lifetime: Option<Duration>,
    /// Allow plain `http://` to non-loopback hosts. Loopback hosts (`127.0.0.0/8`, `[::1]`,
    /// `localhost`) may always use `http://`.
    pub allow_insecure_http: bool,
    /// Extra trusted root certificates (a PEM bundle) for this provider's TLS, on top of the
    /// system roots: for an IdP behind a private CA.
    pub extra_roots_pem: Option<Vec<u8>>,
}

/// An [`Endpoint`] that cannot be used. Names the provider and the offending field, never a
/// secret or a URL (a URL could carry credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// A field has an unusable value.
    #[error("provider {provider:?}: invalid `{field}`: {reason}")]
    Invalid {
        /// The provider's name.
        provider: String,
        /// The field at fault, spelled as in [`Endpoint`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The HTTP client could not be built (TLS setup).
    #[error("provider {provider:?}: cannot build the HTTP client: {cause}")]
    Client {
        /// The provider's name.
        provider: String,
        /// Why.
        cause: String,
    },
}

impl EndpointError {
    /// The field at fault, if a field is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::Client { .. } => None,
        }
    }
}

impl Endpoint {
    /// An endpoint with the defaults: connect 5 s, request 15 s, body 256 KiB, access lifetime
    /// 1800 s, refresh lifetime unknown, no logout or revocation URL, no client secret, https
    /// only (except to loopback hosts).
    pub fn new_default(
        provider: impl Into<String>,
        token_url: impl Into<String>,
        client_id: impl Into<String>,
    ) -> Self {
        Self {
            provider: provider.into(),
            token_url: token_url.into(),
            logout_url: None,
            revoke_url: None,
            client_id: client_id.into(),
            client_secret: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            default_access_lifetime: DEFAULT_ACCESS_LIFETIME,
            default_refresh_lifetime: None,
            allow_insecure_http: false,
            extra_roots_pem: None,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), EndpointError> {
        if self.provider.trim().is_empty() {
            return Err(self.invalid("provider", "must not be empty"));
        }
        self.parse_url("token_url", &self.token_url)?;
        if let Some(url) = &self.logout_url {
            self.parse_url("logout_url", url)?;
        }
        if let Some(url) = &self.revoke_url {
            self.parse_url("revoke_url", url)?;
        }
        if self.client_id.is_empty() {
            return Err(self.invalid("client_id", "must not be empty"));
        }
        if self.client_id.chars().any(char::is_control) {
            return Err(self.invalid("client_id", "must not contain control characters"));
        }
        if self
            .client_secret
            .as_ref()
            .is_some_and(ClientSecret::is_empty)
        {
            return Err(self.invalid("client_secret", "must not be empty when set"));
        }
        if self.connect_timeout.is_zero() {
            return Err(self.invalid("connect_timeout", "must be positive"));
        }
        if self.request_timeout.is_zero() {
            return Err(self.invalid("request_timeout", "must be positive"));
        }
        if self.connect_timeout >= self.request_timeout {
            return Err(self.invalid(
                "connect_timeout",
                "must be shorter than request_timeout (a slow connect must not look like a lost answer)",
            ));
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_BODY_BYTES_LIMIT {
            return Err(self.invalid(
                "max_body_bytes",
                format!("must be between 1 and {MAX_BODY_BYTES_LIMIT}"),
            ));
        }
        if self.default_access_lifetime < Duration::from_secs(1)
            || self.default_access_lifetime > MAX_ACCESS_LIFETIME
        {
            return Err(self.invalid(
                "default_access_lifetime",
                format!(
                    "must be between 1 s and {} s",
                    MAX_ACCESS_LIFETIME.as_secs()
                ),
            ));
        }
        if self
            .default_refresh_lifetime
            .is_some_and(|d| d < Duration::from_secs(1))
        {
            return Err(self.invalid(
                "default_refresh_lifetime",
                "must be at least 1 s when set (leave it unset when unknown)",
            ));
        }
        Ok(())
    }

    /// Parses one of the endpoint's URLs and checks that it may be used: absolute, `https` (or
    /// `http` to a loopback host, or anywhere when `allow_insecure_http`), with a host, without
    /// credentials or fragment.
    pub(crate) fn parse_url(&self, field: &'static str, raw: &str) -> Result<Url, EndpointError> {
        let url = Url::parse(raw)
            .map_err(|e| self.invalid(field, format!("not an absolute URL ({e})")))?;
        let Some(host) = url.host_str() else {
            return Err(self.invalid(field, "has no host"));
        };
        match url.scheme() {
            "https" => {}
            "http" if self.allow_insecure_http || is_loopback_host(host) => {}
            "http" => {
                return Err(self.invalid(
                    field,
                    "plain http is allowed only to a loopback host, or with allow_insecure_http",
                ));
            }
            _ => return Err(self.invalid(field, "scheme must be https (or http)")),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(self.invalid(field, "must not carry credentials (use client_secret)"));
        }
        if url.fragment().is_some() {
            return Err(self.invalid(field, "must not have a fragment"));
        }
        Ok(url)
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> EndpointError {
        EndpointError::Invalid {
            provider: self.provider.clone(),
            field,
            reason: reason.into(),
        }
    }
}

/// Whether a URL host (as [`Url::host_str`] spells it: IPv6 in brackets, names lowercased) is a
/// loopback address or `localhost`.
fn is_loopback_host(host: &str) -> bool {
    if host == "localhost" || host == "localhost." {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        Endpoint::new_default("apiax", url, "integration-api")
    }

    fn field_of(result: Result<(), EndpointError>) -> Option<&'static str> {
        result.err().and_then(|e| e.field())
    }

    #[test]
    fn https_is_accepted() {
        let ep = endpoint("https://auth.apiax.io/auth/realms/apiax/protocol/openid-connect/token");
        assert_eq!(ep.validate(), Ok(()));
    }

    #[test]
    fn plain_http_to_a_remote_host_is_refused_unless_allowed() {
        let mut ep = endpoint("http://auth.apiax.io/token");
        let err = ep.validate().unwrap_err();
        assert_eq!(err.field(), Some("token_url"));
        assert!(err.to_string().contains("apiax"), "{err}");
        assert!(err.to_string().contains("allow_insecure_http"), "{err}");

        ep.allow_insecure_http = true;
        assert_eq!(ep.validate(), Ok(()));
    }

    #[test]
    fn plain_http_to_loopback_is_accepted() {
        for url in [
            "http://127.0.0.1:8080/token",
            "http://127.1.2.3/token",
            "http://[::1]:8080/token",
            "http://localhost:8080/token",
            "http://LOCALHOST/token",
            "http://[::ffff:127.0.0.1]/token",
        ] {
            assert_eq!(endpoint(url).validate(), Ok(()), "{url}");
        }
    }

    #[test]
    fn names_that_only_look_local_are_not_loopback() {
        for url in [
            "http://localhost.example.com/token",
            "http://10.0.0.1/token",
            "http://[::2]/token",
            "http://0.0.0.0/token",
        ] {
            assert_eq!(
                field_of(endpoint(url).validate()),
                Some("token_url"),
                "{url}"
            );
        }
    }

    #[test]
    fn bad_urls_are_named() {
        assert_eq!(
            field_of(endpoint("not a url").validate()),
            Some("token_url")
        );
        assert_eq!(
            field_of(endpoint("/relative/token").validate()),
            Some("token_url")
        );
        assert_eq!(
            field_of(endpoint("ftp://host/token").validate()),
            Some("token_url")
        );
        assert_eq!(
            field_of(endpoint("https://user:pw@host/token").validate()),
            Some("token_url")
        );
        assert_eq!(
            field_of(endpoint("https://host/token#x").validate()),
            Some("token_url")
        );

        let mut ep = endpoint("https://host/token");
        ep.logout_url = Some("https//host/logout".into());
        assert_eq!(field_of(ep.validate()), Some("logout_url"));
        ep.logout_url = None;
        ep.revoke_url = Some("http://idp.example/revoke".into());
        assert_eq!(field_of(ep.validate()), Some("revoke_url"));
    }

    #[test]
    fn a_url_with_credentials_is_not_echoed() {
        let err = endpoint("https://user:hunter2@host/token")
            .validate()
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn other_fields_are_checked() {
        let base = endpoint("https://host/token");

        let mut ep = base.clone();
        ep.client_id = String::new();
        assert_eq!(field_of(ep.validate()), Some("client_id"));

        let mut ep = base.clone();
        ep.provider = " ".into();
        assert_eq!(field_of(ep.validate()), Some("provider"));

        let mut ep = base.clone();
        ep.client_secret = Some(ClientSecret::from(""));
        assert_eq!(field_of(ep.validate()), Some("client_secret"));

        let mut ep = base.clone();
        ep.request_timeout = Duration::ZERO;
        assert_eq!(field_of(ep.validate()), Some("request_timeout"));

        let mut ep = base.clone();
        ep.connect_timeout = ep.request_timeout;
        assert_eq!(field_of(ep.validate()), Some("connect_timeout"));

        let mut ep = base.clone();
        ep.max_body_bytes = 0;
        assert_eq!(field_of(ep.validate()), Some("max_body_bytes"));

        let mut ep = base.clone();
        ep.default_access_lifetime = Duration::ZERO;
        assert_eq!(field_of(ep.validate()), Some("default_access_lifetime"));

        let mut ep = base;
        ep.default_refresh_lifetime = Some(Duration::ZERO);
        assert_eq!(field_of(ep.validate()), Some("default_refresh_lifetime"));
    }

    #[test]
    fn debug_redacts_the_client_secret() {
        let mut ep = endpoint("https://host/token");
        ep.client_secret = Some(ClientSecret::from("s3cr3t-value"));
        let printed = format!("{ep:?}");
        assert!(!printed.contains("s3cr3t-value"), "{printed}");
    }
}
