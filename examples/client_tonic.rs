//! A calling service's gRPC client with the session's access token on every
//! call: a `TokenSource` and a `BearerInterceptor` on a tonic client.
//!
//! ```sh
//! cargo run --release -- serve --dev &                          # broker + dev IdP
//! target/release/tokenbroker register --dev-login alice --session-id alice
//! cargo run --example client_tonic --features client -- \
//!     http://127.0.0.1:50051 alice http://127.0.0.1:50051
//! ```
//!
//! Arguments: the broker, the session, and the downstream gRPC service to
//! call. Any server of `grpc.health.v1` will do as the downstream here (the
//! broker itself stands in); a real one would check the bearer token.

use std::time::Duration;

use tokenbroker::client::{BearerInterceptor, ClientError, TokenSource};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let session = args.next().unwrap_or_else(|| "alice".into());
    let downstream = args.next().unwrap_or_else(|| broker.clone());

    // One source per session, shared by every client of the process
    // (clones are cheap and share its one background task).
    let source = TokenSource::builder(session).endpoint(broker).build()?;
    // Wait for the first token once, so the first calls find one.
    match source.token().await {
        Ok(token) => println!(
            "token of generation {}, {} s left",
            token.generation(),
            token.remaining().as_secs()
        ),
        Err(ClientError::Reauthentication { description }) => {
            eprintln!("the user must log in again: {description}");
            std::process::exit(1);
        }
        Err(error) => return Err(error.into()),
    }

    let channel = Endpoint::from_shared(downstream)?.connect_lazy();
    let mut health =
        HealthClient::with_interceptor(channel, BearerInterceptor::new(source.clone()));
    for _ in 0..3 {
        // The interceptor reads the cached token: no RPC to the broker here.
        match health.check(HealthCheckRequest::default()).await {
            Ok(answer) => println!(
                "downstream answered {:?} (token generation {:?})",
                answer.into_inner().status(),
                source.status().generation
            ),
            Err(status) => println!("call failed: {:?}: {}", status.code(), status.message()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    source.close().await;
    Ok(())
}
