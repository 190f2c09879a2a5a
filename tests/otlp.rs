//! OTLP export (a build with `--features otlp`): a real `tokenbroker serve`
//! process sends its spans to a fake OTLP/gRPC collector; the RPC span
//! continues the caller's W3C trace.

#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_stream::wrappers::TcpListenerStream;

const BIN: &str = env!("CARGO_BIN_EXE_tokenbroker");

/// (span name, trace id hex) of every exported span.
#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let trace: String = span.trace_id.iter().map(|b| format!("{b:02x}")).collect();
                    spans.push((span.name, trace));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test]
async fn spans_reach_the_collector_in_the_callers_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serve.log");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--dev-idp-listen",
            "127.0.0.1:0",
            "--log-json",
        ])
        .env(
            "TOKENBROKER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // The JSON log names the gRPC address.
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).ok()?;
                (json["fields"]["message"] == "tokenbroker serving")
                    .then(|| json["fields"]["addr"].as_str().unwrap().to_string())
            }) {
                return addr;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("serve comes up");

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tokenbroker::pb::token_broker_client::TokenBrokerClient::new(channel);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut request = tonic::Request::new(tokenbroker::pb::GetAccessTokenRequest {
        session_id: "nobody".into(),
        min_ttl: None,
        force_refresh: false,
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    let missing = client.get_access_token(request).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // SIGTERM: the exporter flushes on the way out.
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let spans = collector.spans.lock().unwrap().clone();
    assert!(
        spans.iter().any(|(name, id)| name == "rpc" && id == trace),
        "the RPC span continues the caller's trace: {spans:?}"
    );
    server.abort();
}
