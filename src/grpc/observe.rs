//! A tower layer that counts gRPC requests by method and status code and
//! times them, for every service on the port (broker, health, reflection).
//!
//! The code is read from the response headers: tonic sends an error as a
//! trailers-only response (`grpc-status` in the headers); a response without
//! it started successfully (unary: OK; a stream: opened — how it ends is not
//! counted here).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use crate::metrics;

/// The layer. Its metric handles are looked up once per method and code
/// and kept, so a request costs two atomic updates rather than two
/// registry lookups; make it after the recorder is installed.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    handles: Arc<Handles>,
}

impl RpcMetricsLayer {
    /// A layer recording into the process's metrics recorder.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            handles: self.handles.clone(),
        }
    }
}

/// The service the layer wraps around another.
#[derive(Debug, Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    handles: Arc<Handles>,
}

/// Status codes 0..=16; anything else is counted as UNKNOWN.
const CODES: usize = 17;

/// Counter and histogram handles by method (and code), made on first use.
#[derive(Debug)]
struct Handles {
    calls: Box<[OnceLock<::metrics::Counter>]>,
    seconds: Box<[OnceLock<::metrics::Histogram>]>,
}

impl Default for Handles {
    fn default() -> Self {
        Self {
            calls: (0..METHODS.len() * CODES)
                .map(|_| OnceLock::new())
                .collect(),
            seconds: (0..METHODS.len()).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl Handles {
    fn record(&self, method: usize, code: i32, elapsed: f64) {
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < CODES)
            .unwrap_or(2);
        let label = METHODS[method].1;
        self.calls[method * CODES + code]
            .get_or_init(|| {
                ::metrics::counter!(metrics::RPCS, "method" => label, "code" => code_label(code as i32))
            })
            .increment(1);
        self.seconds[method]
            .get_or_init(|| ::metrics::histogram!(metrics::RPC_SECONDS, "method" => label))
            .record(elapsed);
    }
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
        let method = method_index(request.uri().path());
        let started = tokio::time::Instant::now();
        let response = self.inner.call(request);
        let handles = self.handles.clone();
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .unwrap_or(0),
                Err(_) => 2,
            };
            handles.record(method, code, started.elapsed().as_secs_f64());
            response
        })
    }
}

/// The methods with a label of their own; the last two are catch-alls.
const METHODS: &[(&str, &str)] = &[
    (
        "/tokenbroker.v1.TokenBroker/GetAccessToken",
        "GetAccessToken",
    ),
    (
        "/tokenbroker.v1.TokenBroker/RegisterSession",
        "RegisterSession",
    ),
    ("/tokenbroker.v1.TokenBroker/WatchToken", "WatchToken"),
    ("/tokenbroker.v1.TokenBroker/GetSession", "GetSession"),
    ("/tokenbroker.v1.TokenBroker/ListSessions", "ListSessions"),
    ("/tokenbroker.v1.TokenBroker/DeleteSession", "DeleteSession"),
    ("/grpc.health.v1.Health/Check", "health.Check"),
    ("/grpc.health.v1.Health/Watch", "health.Watch"),
    ("/grpc.reflection.", "reflection"),
    ("", "other"),
];

fn method_index(path: &str) -> usize {
    if path.starts_with("/grpc.reflection.") {
        return METHODS.len() - 2;
    }
    METHODS[..METHODS.len() - 2]
        .iter()
        .position(|(known, _)| *known == path)
        .unwrap_or(METHODS.len() - 1)
}

/// A bounded label for a request path: the method of a known service, else
/// `other` (a caller cannot grow the label set with made-up paths).
pub fn method_label(path: &str) -> &'static str {
    METHODS[method_index(path)].1
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
