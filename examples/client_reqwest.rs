//! A calling service's HTTP requests with the session's access token:
//! `RequestBuilderExt::bearer_from` on reqwest.
//!
//! ```sh
//! cargo run --release -- serve --dev &                          # broker + dev IdP
//! target/release/tokenbroker register --dev-login alice --session-id alice
//! cargo run --example client_reqwest --features client -- http://127.0.0.1:50051 alice
//! ```
//!
//! Arguments: the broker, the session, and the URL to call. Without a URL
//! the example starts a stand-in downstream API on 127.0.0.1 that answers
//! with what it received (the token's size, never the token).

use std::time::Duration;

use axum::http::HeaderMap;
use tokenbroker::client::{RequestBuilderExt as _, TokenSource};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let broker = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let session = args.next().unwrap_or_else(|| "alice".into());
    let (url, stand_in) = match args.next() {
        Some(url) => (url, None),
        None => {
            let (url, server) = stand_in_api().await?;
            (url, Some(server))
        }
    };

    let source = TokenSource::builder(session)
        .endpoint(broker)
        .wait_timeout(Duration::from_secs(10))
        .build()?;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        // Waits (bounded) for a token with more than the margin left, or
        // fails with a typed `ClientError` saying why there is none.
        let request = http.get(&url).bearer_from(&source).await?;
        let answer = request.send().await?;
        println!("{}: {}", answer.status(), answer.text().await?);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    source.close().await;
    if let Some(server) = stand_in {
        server.abort();
    }
    Ok(())
}

/// A downstream API on 127.0.0.1 that reports the bearer token it received.
async fn stand_in_api() -> std::io::Result<(String, tokio::task::JoinHandle<()>)> {
    async fn whoami(headers: HeaderMap) -> String {
        match headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            Some(token) => format!("received a bearer token of {} bytes", token.len()),
            None => "received no bearer token".into(),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/whoami", listener.local_addr()?);
    let app = axum::Router::new().route("/whoami", axum::routing::get(whoami));
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, server))
}
