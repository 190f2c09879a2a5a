//! `Authorization: Bearer …` on outgoing calls: a tonic [`Interceptor`]
//! that reads the cached token (an interceptor cannot wait), and a reqwest
//! helper that waits, bounded, for a usable one.

use std::future::Future;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::{ClientError, TokenSource};

/// Puts the source's current token on every call of a tonic client:
/// `Client::with_interceptor(channel, BearerInterceptor::new(source))`.
///
/// It never waits and never makes an RPC: with no usable token the call
/// fails at once, `UNAVAILABLE` while one may still come (the broker or the
/// identity provider is down; retry) and `UNAUTHENTICATED` when none will
/// (re-authentication required, session gone), the message saying why. Await
/// [`TokenSource::token`] once at start-up so the first calls find a token.
#[derive(Debug, Clone)]
pub struct BearerInterceptor {
    source: TokenSource,
}

impl BearerInterceptor {
    /// An interceptor reading `source`.
    pub fn new(source: TokenSource) -> Self {
        Self { source }
    }
}

impl Interceptor for BearerInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.source.current().map_err(|error| error.to_status())?;
        let mut value =
            AsciiMetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
                .map_err(|_| Status::internal("the access token is not a valid header value"))?;
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

/// `Authorization: Bearer …` from a [`TokenSource`] on a reqwest request.
pub trait RequestBuilderExt: Sized {
    /// Waits (at most the source's `wait_timeout`) for a usable token and
    /// sets it as a sensitive `Authorization` header; or says why there is none.
    fn bearer_from(
        self,
        source: &TokenSource,
    ) -> impl Future<Output = Result<Self, ClientError>> + Send;
}

impl RequestBuilderExt for reqwest::RequestBuilder {
    async fn bearer_from(self, source: &TokenSource) -> Result<Self, ClientError> {
        let token = source.token().await?;
        Ok(self.header(reqwest::header::AUTHORIZATION, token.authorization()?))
    }
}
