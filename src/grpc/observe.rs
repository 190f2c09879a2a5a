//! A tower layer that counts gRPC requests by method and status code and
//! times them, for every service on the port (broker, health, reflection).
//!
//! The code is read from the response headers: tonic sends an error as a
//! trailers-only response (`grpc-status` in the headers); a response without
//! it started successfully (unary: OK; a stream: opened — how it ends is not
//! counted here).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::metrics;

/// The layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

/// The service the layer wraps around another.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = tokio::time::Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", code_label),
                Err(_) => "UNKNOWN",
            };
            ::metrics::counter!(metrics::RPCS, "method" => method, "code" => code).increment(1);
            ::metrics::histogram!(metrics::RPC_SECONDS, "method" => method)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}

/// A bounded label for a request path: the method of a known service, else
/// `other` (a caller cannot grow the label set with made-up paths).
pub fn method_label(path: &str) -> &'static str {
    const KNOWN: &[(&str, &str)] = &[
        (
            "/tokenbroker.v1.TokenBroker/RegisterSession",
            "RegisterSession",
        ),
        (
            "/tokenbroker.v1.TokenBroker/GetAccessToken",
            "GetAccessToken",
        ),
        ("/tokenbroker.v1.TokenBroker/WatchToken", "WatchToken"),
        ("/tokenbroker.v1.TokenBroker/GetSession", "GetSession"),
        ("/tokenbroker.v1.TokenBroker/ListSessions", "ListSessions"),
        ("/tokenbroker.v1.TokenBroker/DeleteSession", "DeleteSession"),
        ("/grpc.health.v1.Health/Check", "health.Check"),
        ("/grpc.health.v1.Health/Watch", "health.Watch"),
    ];
    if path.starts_with("/grpc.reflection.") {
        return "reflection";
    }
    KNOWN
        .iter()
        .find(|(known, _)| *known == path)
        .map_or("other", |(_, label)| label)
}

/// The canonical name of a gRPC status code.
pub fn code_label(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/tokenbroker.v1.TokenBroker/GetAccessToken"),
            "GetAccessToken"
        );
        assert_eq!(method_label("/tokenbroker.v1.TokenBroker/Nope"), "other");
        assert_eq!(method_label("/attacker/session-123"), "other");
        assert_eq!(
            method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            "reflection"
        );
        assert_eq!(code_label(14), "UNAVAILABLE");
        assert_eq!(code_label(99), "UNKNOWN");
    }
}
