//! One timer queue for every session's next refresh: a single task owning a
//! `DelayQueue` (a hierarchical timer wheel), fed by commands. A million
//! sessions cost a million wheel entries, not a million sleeping tasks.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::session::SessionId;

/// The longest a session sleeps in the timer queue before it is looked at again.
pub const MAX_SLEEP: Duration = Duration::from_secs(24 * 3600);

enum Command {
    At(SessionId, Instant),
    Cancel(SessionId),
}

/// Sends plans to the scheduler task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    depth: Arc<AtomicUsize>,
}

impl SchedulerHandle {
    /// Plans the next wake-up of `id` at `when`, replacing any earlier plan.
    /// Far plans are cut to a day (`MAX_SLEEP`): the session is looked at then and
    /// planned again (the timer wheel cannot hold deadlines years away).
    pub fn schedule(&self, id: SessionId, when: Instant) {
        let when = when.min(Instant::now() + MAX_SLEEP);
        // A closed channel means shutdown: nothing left to plan.
        let _ = self.tx.send(Command::At(id, when));
    }

    /// Sessions planned in the queue now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Forgets any plan for `id`.
    pub fn cancel(&self, id: SessionId) {
        let _ = self.tx.send(Command::Cancel(id));
    }
}

/// The receiving half, turned into a task by [`SchedulerTask::run`].
#[derive(Debug)]
pub struct SchedulerTask {
    rx: mpsc::UnboundedReceiver<Command>,
    depth: Arc<AtomicUsize>,
}

/// A scheduler's handle and its not-yet-running task.
pub fn channel() -> (SchedulerHandle, SchedulerTask) {
    let (tx, rx) = mpsc::unbounded_channel();
    let depth = Arc::new(AtomicUsize::new(0));
    (
        SchedulerHandle {
            tx,
            depth: depth.clone(),
        },
        SchedulerTask { rx, depth },
    )
}

impl SchedulerTask {
    /// Runs until `shutdown`, calling `due` (which must not block) for each
    /// session whose time has come.
    pub async fn run(mut self, shutdown: CancellationToken, due: impl Fn(SessionId)) {
        let mut queue: DelayQueue<SessionId> = DelayQueue::new();
        let mut keys: HashMap<SessionId, delay_queue::Key, foldhash::fast::RandomState> =
            HashMap::default();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                command = self.rx.recv() => match command {
                    Some(Command::At(id, when)) => match keys.get(&id) {
                        Some(key) => queue.reset_at(key, when),
                        None => {
                            let key = queue.insert_at(id.clone(), when);
                            keys.insert(id, key);
                        }
                    },
                    Some(Command::Cancel(id)) => {
                        if let Some(key) = keys.remove(&id) {
                            queue.remove(&key);
                        }
                    }
                    None => break,
                },
                Some(expired) = queue.next(), if !queue.is_empty() => {
                    let late = Instant::now().saturating_duration_since(expired.deadline());
                    metrics::histogram!(crate::metrics::REFRESH_LAG).record(late.as_secs_f64());
                    let id = expired.into_inner();
                    keys.remove(&id);
                    due(id);
                }
            }
            self.depth.store(keys.len(), Ordering::Relaxed);
        }
        tracing::debug!(planned = keys.len(), "refresh scheduler stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_in_time_order_and_honours_reschedule_and_cancel() {
        let (handle, task) = channel();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(task.run(shutdown.clone(), move |id| {
            let _ = tx.send((id, Instant::now()));
        }));
        let start = Instant::now();
        let id = |s: &str| SessionId::parse(s).unwrap();
        handle.schedule(id("b"), start + Duration::from_secs(20));
        handle.schedule(id("a"), start + Duration::from_secs(10));
        handle.schedule(id("c"), start + Duration::from_secs(5));
        handle.cancel(id("c"));
        handle.schedule(id("b"), start + Duration::from_secs(30)); // moved later
        let (first, at) = rx.recv().await.unwrap();
        assert_eq!((first.as_str(), at - start), ("a", Duration::from_secs(10)));
        let (second, at) = rx.recv().await.unwrap();
        assert_eq!(
            (second.as_str(), at - start),
            ("b", Duration::from_secs(30))
        );
        shutdown.cancel();
        run.await.unwrap();
        assert!(rx.try_recv().is_err(), "the cancelled session never fired");
    }
}
