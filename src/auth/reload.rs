//! The policy in force, swapped whole on reload.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, warn};

use super::policy::digest;
use super::{Policy, PolicyError};

/// Shortest poll period [`PolicyHandle::watch_file`] uses.
const MIN_POLL_PERIOD: Duration = Duration::from_millis(10);

/// A file modified more recently than this is re-read on every poll even if
/// its mtime and length look unchanged: a second write within the
/// filesystem's mtime granularity would otherwise go unseen.
const SETTLE: Duration = Duration::from_secs(2);

/// The current [`Policy`], shared by every request and swapped whole by a
/// reload. Clones share the same policy.
#[derive(Clone, Debug)]
pub struct PolicyHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    current: RwLock<Arc<Policy>>,
    path: Option<PathBuf>,
}

/// Modification time and length: a cheap "did the file change" check.
type Stamp = (SystemTime, u64);

/// What the file watcher remembers between polls.
#[derive(Default)]
struct WatchState {
    /// Stamp of the last read, once the file has settled.
    stamp: Option<Stamp>,
    /// Digest of the last invalid content, so it is reported once.
    rejected: Option<[u8; 32]>,
    /// The file could not be read at the last poll (reported once).
    unreadable: bool,
}

impl PolicyHandle {
    /// Holds `policy`; `path` is the file it came from, if any (what
    /// [`reload`](Self::reload) and [`watch_file`](Self::watch_file) re-read).
    pub fn new(policy: Policy, path: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(policy)),
                path,
            }),
        }
    }

    /// Loads the policy file at `path` and holds it.
    pub fn load(path: PathBuf) -> Result<Self, PolicyError> {
        let policy = Policy::load(&path)?;
        Ok(Self::new(policy, Some(path)))
    }

    /// The policy file, if the policy came from one.
    pub fn path(&self) -> Option<&Path> {
        self.inner.path.as_deref()
    }

    /// The policy in force. Take it once per call and decide against that
    /// snapshot; the lock is held only to clone the `Arc`.
    pub fn current(&self) -> Arc<Policy> {
        // Poisoning cannot leave a half-written `Arc`: take the value as is.
        let guard = self
            .inner
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&guard)
    }

    /// Re-reads the policy file (blocking: one small read) and installs it.
    /// If the file cannot be read or is invalid, the current policy stays, the
    /// reason is logged at `warn`, and returned. Without a file:
    /// [`PolicyError::NoFile`].
    pub fn reload(&self) -> Result<(), PolicyError> {
        let result = self
            .path()
            .ok_or(PolicyError::NoFile)
            .and_then(|path| {
                std::fs::read(path).map_err(|source| PolicyError::Read {
                    path: path.to_owned(),
                    source,
                })
            })
            .and_then(|bytes| self.install(&bytes));
        if let Err(error) = &result {
            warn!(
                path = self.path().map(|p| field::display(p.display())),
                %error,
                "policy reload failed; keeping the current policy"
            );
        }
        result
    }

    /// Parses `bytes` and, if valid, makes it the policy in force.
    fn install(&self, bytes: &[u8]) -> Result<(), PolicyError> {
        let policy = Arc::new(Policy::parse_bytes(bytes)?);
        let (rules, owner_only) = (policy.rule_count(), policy.owner_only());
        *self
            .inner
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = policy;
        info!(
            path = self.path().map(|p| field::display(p.display())),
            rules, owner_only, "policy loaded"
        );
        Ok(())
    }

    /// Polls the policy file every `every` (at least 10 ms) until `shutdown`
    /// is cancelled, and installs it when its content changes.
    ///
    /// Each poll stats the file; when its mtime or length differs from the
    /// last poll (or it was modified in the last 2 s), it reads the file and
    /// compares the content's SHA-256 with that of the policy in force, so a
    /// touch or an atomic replace with the same bytes changes nothing. An
    /// invalid or unreadable file keeps the current policy and is logged once
    /// (until its content changes again). Returns at once if the policy did
    /// not come from a file. File access runs on the blocking pool; the
    /// period runs on `tokio::time`, so tests can pause it.
    pub async fn watch_file(self, every: Duration, shutdown: CancellationToken) {
        let Some(path) = self.inner.path.clone() else {
            debug!("no policy file to watch");
            return;
        };
        let mut ticker = tokio::time::interval(every.max(MIN_POLL_PERIOD));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut state = WatchState::default();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                () = self.poll(&path, &mut state) => {}
            }
        }
        debug!(path = %path.display(), "policy watcher stopped");
    }

    async fn poll(&self, path: &Path, state: &mut WatchState) {
        let owned = path.to_owned();
        let last = state.stamp;
        let checked = tokio::task::spawn_blocking(move || read_if_changed(&owned, last)).await;
        let (stamp, bytes) = match checked {
            Ok(Ok(None)) => return,
            Ok(Ok(Some(read))) => read,
            Ok(Err(error)) => {
                state.stamp = None;
                if !state.unreadable {
                    warn!(
                        path = %path.display(), %error,
                        "cannot read policy file; keeping the current policy"
                    );
                    state.unreadable = true;
                }
                return;
            }
            Err(error) => {
                warn!(%error, "policy file check failed");
                return;
            }
        };
        if state.unreadable {
            info!(path = %path.display(), "policy file readable again");
            state.unreadable = false;
        }
        state.stamp = stamp;
        let seen = digest(&bytes);
        if self.current().digest() == Some(seen) {
            state.rejected = None;
            return;
        }
        if state.rejected == Some(seen) {
            return;
        }
        match self.install(&bytes) {
            Ok(()) => state.rejected = None,
            Err(error) => {
                warn!(
                    path = %path.display(), %error,
                    "policy file changed but is invalid; keeping the current policy"
                );
                state.rejected = Some(seen);
            }
        }
    }
}

/// The file's content if its stamp differs from `last`, with the stamp to
/// remember (`None` while the file has not settled).
fn read_if_changed(
    path: &Path,
    last: Option<Stamp>,
) -> io::Result<Option<(Option<Stamp>, Vec<u8>)>> {
    let meta = std::fs::metadata(path)?;
    let stamp = meta.modified().ok().map(|modified| (modified, meta.len()));
    if stamp.is_some() && stamp == last {
        return Ok(None);
    }
    let bytes = std::fs::read(path)?;
    let settled = stamp.filter(|(modified, _)| {
        SystemTime::now()
            .duration_since(*modified)
            .is_ok_and(|age| age >= SETTLE)
    });
    Ok(Some((settled, bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{CallerId, Decision, Operation};

    const GET_ONLY: &str = r#"
[[rules]]
callers = ["a"]
sessions = ["s"]
allow = ["get"]
"#;

    const GET_AND_DELETE: &str = r#"
[[rules]]
callers = ["a"]
sessions = ["s"]
allow = ["get", "delete"]
"#;

    fn delete_decision(policy: &Policy) -> Decision {
        policy.decide(&CallerId::new("a"), Operation::Delete, "s", None)
    }

    fn temp_policy(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn reload_picks_up_a_valid_change() {
        let (_dir, path) = temp_policy(GET_ONLY);
        let handle = PolicyHandle::load(path.clone()).unwrap();
        let before = handle.current();
        assert_eq!(delete_decision(&before), Decision::PermissionDenied);

        std::fs::write(&path, GET_AND_DELETE).unwrap();
        handle.reload().unwrap();
        assert_eq!(delete_decision(&handle.current()), Decision::Allow);
        // Clones share the policy; a snapshot taken before keeps its answer.
        assert_eq!(delete_decision(&handle.clone().current()), Decision::Allow);
        assert_eq!(delete_decision(&before), Decision::PermissionDenied);
    }

    #[test]
    fn an_invalid_file_keeps_the_old_policy() {
        let (_dir, path) = temp_policy(GET_ONLY);
        let handle = PolicyHandle::load(path.clone()).unwrap();
        let before = handle.current();

        std::fs::write(&path, "[[rules]]\ncallers = [\"a\"]\nallow = [\"get\"]\n").unwrap();
        let err = handle.reload().unwrap_err();
        assert!(err.to_string().contains("rules[0].sessions"), "{err}");
        assert!(Arc::ptr_eq(&before, &handle.current()));

        std::fs::write(&path, "not toml [[").unwrap();
        assert!(matches!(handle.reload(), Err(PolicyError::Syntax(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(handle.reload(), Err(PolicyError::Read { .. })));
        assert!(Arc::ptr_eq(&before, &handle.current()));
    }

    #[test]
    fn reload_without_a_file_is_an_error() {
        let handle = PolicyHandle::new(Policy::allow_all(), None);
        assert!(matches!(handle.reload(), Err(PolicyError::NoFile)));
        assert_eq!(delete_decision(&handle.current()), Decision::Allow);
        assert_eq!(handle.path(), None);
    }

    /// Polls `handle` once per `every` of (paused) time, up to 10 times.
    async fn eventually(handle: &PolicyHandle, every: Duration, expected: Decision) -> bool {
        for _ in 0..10 {
            tokio::time::sleep(every).await;
            if delete_decision(&handle.current()) == expected {
                return true;
            }
        }
        false
    }

    #[tokio::test(start_paused = true)]
    async fn watch_file_reloads_on_change_and_stops_on_shutdown() {
        let (_dir, path) = temp_policy(GET_ONLY);
        let handle = PolicyHandle::load(path.clone()).unwrap();
        let first = handle.current();
        let every = Duration::from_secs(5);
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(handle.clone().watch_file(every, shutdown.clone()));

        // Same bytes rewritten (new mtime): nothing is reinstalled.
        std::fs::write(&path, GET_ONLY).unwrap();
        tokio::time::sleep(every * 3).await;
        assert!(Arc::ptr_eq(&first, &handle.current()));

        std::fs::write(&path, GET_AND_DELETE).unwrap();
        assert!(eventually(&handle, every, Decision::Allow).await);
        let second = handle.current();

        // Invalid, then missing: the policy in force stays.
        std::fs::write(&path, "not toml [[").unwrap();
        tokio::time::sleep(every * 3).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(every * 3).await;
        assert!(Arc::ptr_eq(&second, &handle.current()));

        // Back, with new content: picked up.
        std::fs::write(&path, GET_ONLY).unwrap();
        assert!(eventually(&handle, every, Decision::PermissionDenied).await);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("watcher stops on shutdown")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn watch_file_without_a_file_returns_at_once() {
        let handle = PolicyHandle::new(Policy::allow_all(), None);
        let watch = handle.watch_file(Duration::from_secs(1), CancellationToken::new());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), watch)
                .await
                .is_ok()
        );
    }
}
