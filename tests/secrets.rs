//! No token ever reaches the logs: the whole flow runs with every target at
//! TRACE level captured, and the capture must not contain any JWT (the dev
//! IdP issues every access and refresh token as a JWT, which starts `eyJ`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{TestBroker, next_event};
use tokenbroker::devidp::{Fault, FaultAction};
use tokenbroker::pb;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_token_appears_in_trace_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let mut t = TestBroker::new()
        .realm(|r| r.access_token_lifespan_secs = 2)
        .start()
        .await;
    let (login, _) = t.register("alice", "alice").await;
    let mut seen = vec![login.access_token.clone(), login.refresh_token.clone()];
    seen.push(t.get("alice", None, false).await.unwrap().access_token);
    seen.push(t.get("alice", None, true).await.unwrap().access_token);
    let mut stream = t.watch("alice").await;
    next_event(&mut stream, Duration::from_secs(5)).await;
    // Errors and retries log too: a lost answer, a garbage body, a rejection.
    t.idp()
        .push_fault(Fault::once(FaultAction::TruncatedAfterProcessing));
    let _ = t.get("alice", None, true).await;
    let other = t.idp().login("bob");
    seen.push(other.refresh_token.clone());
    t.idp().end_session(&other.session_state);
    let _ = t
        .client
        .register_session(pb::RegisterSessionRequest {
            session_id: "bob".into(),
            refresh_token: other.refresh_token.clone(),
            ..Default::default()
        })
        .await;
    let _ = t
        .client
        .delete_session(pb::DeleteSessionRequest {
            session_id: "alice".into(),
        })
        .await;
    t.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("refresh"),
        "the capture saw the flow: {} bytes",
        logs.len()
    );
    for token in &seen {
        assert!(
            !logs.contains(token.as_str()),
            "a token leaked into the logs"
        );
    }
    assert!(
        !logs.contains("eyJ"),
        "a JWT leaked into the logs:\n{}",
        excerpt(&logs)
    );
}

/// Where the leaks are, with the tokens themselves cut out.
fn excerpt(logs: &str) -> String {
    logs.lines()
        .filter_map(|l| l.find("eyJ").map(|at| format!("{}[JWT…]", &l[..at])))
        .take(3)
        .collect::<Vec<_>>()
        .join("\n")
}
