//! Interoperability: a gRPC client that is not ours drives the real broker.
//! Python `grpcio`, installed from PyPI into a venv by
//! `tests/interop/setup-venv` (pinned in `tests/interop/requirements.txt`),
//! generates its stubs from `proto/` when it runs and goes through register,
//! get, watch (a forced refresh arrives on the stream, a deletion ends it)
//! and failing calls whose `google.rpc` details carry the `ErrorInfo` reason
//! (`tests/interop/client.py`).
//!
//! The Python comes from `TB_TEST_PYTHON` (set by `scripts/test`), else the
//! test makes the venv itself under the target directory. Without Python 3,
//! its venv module or pip, the test fails saying which is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestBroker, assert_error};
use tokio::time::{Instant, sleep};
use tonic::Code;

/// Bound of the Python run (stub generation and every call).
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("TB_TEST_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-venv");
    let setup = Command::new("bash")
        .arg("tests/interop/setup-venv")
        .arg(&venv)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs tests/interop/setup-venv");
    assert!(
        setup.status.success(),
        "tests/interop/setup-venv could not make the Python venv (see its message above)"
    );
    PathBuf::from(String::from_utf8(setup.stdout).unwrap().trim())
}

#[tokio::test]
async fn python_grpcio_registers_gets_watches_and_reads_error_details() {
    let python = python();
    let mut t = TestBroker::new().start().await;
    let dir = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(&python)
        .arg(manifest.join("tests/interop/client.py"))
        .arg("--broker")
        .arg(t.broker.addr.to_string())
        .arg("--idp")
        .arg(t.idp.base_url())
        .arg("--proto")
        .arg(manifest.join("proto"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python client did not finish within {RUN_LIMIT:?}");
        }
        sleep(Duration::from_millis(20)).await;
    };
    let out = std::fs::read_to_string(&stdout).unwrap();
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert!(
        status.success(),
        "the Python client failed ({status}):\n{out}\n{err}"
    );
    for check in [
        "ok stubs generated",
        "ok RegisterSession",
        "ok GetAccessToken",
        "ok WatchToken: the current token, then the refreshed one",
        "ok GetSession",
        "ok WatchToken: the end event after DeleteSession",
        "ok NOT_FOUND with ErrorInfo SESSION_NOT_FOUND",
        "ok INVALID_ARGUMENT with ErrorInfo and BadRequest",
        "interop: all checks passed",
    ] {
        assert!(out.contains(check), "missing {check:?} in:\n{out}\n{err}");
    }

    // Our side saw the same: one validation refresh and one forced refresh,
    // a confirmed logout, and the session is gone.
    let stats = t.idp().stats();
    assert_eq!(stats.refreshes_succeeded, 2, "{stats:?}");
    assert_eq!(stats.logouts, 1, "{stats:?}");
    assert_error(
        t.session("interop/python").await,
        Code::NotFound,
        "SESSION_NOT_FOUND",
    );
    t.stop().await;
}
