//! Fault injection: a queue of misbehaviours applied to token requests, one per request.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One entry of the fault queue: what to do, and to how many token requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// The misbehaviour.
    pub action: FaultAction,
    /// How many token requests it applies to; `None` (or absent in JSON): every request
    /// until the queue is cleared, which also blocks the faults queued after it.
    #[serde(default)]
    pub times: Option<u32>,
}

impl Fault {
    /// A fault for the next token request only.
    pub fn once(action: FaultAction) -> Self {
        Self::times(action, 1)
    }

    /// A fault for the next `n` token requests.
    pub fn times(action: FaultAction, n: u32) -> Self {
        Self {
            action,
            times: Some(n),
        }
    }

    /// A fault for every token request until the faults are cleared.
    pub fn always(action: FaultAction) -> Self {
        Self {
            action,
            times: None,
        }
    }
}

/// What an injected fault does to a token request.
///
/// JSON: `{"type": "status", "status": 503, "body": "…", "retry_after": "5"}`,
/// `{"type": "delay", "ms": 2000}`, `{"type": "drop_before_processing"}`,
/// `{"type": "drop_after_processing"}`, `{"type": "truncated_after_processing"}`,
/// `{"type": "html", "status": 502}`, `{"type": "oversized", "bytes": 1048576}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer `status` with `body` (and `Retry-After` when given) without processing.
    /// The content type follows the body: JSON if it starts with `{`/`[`, HTML if with `<`,
    /// else plain text.
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body.
        #[serde(default)]
        body: String,
        /// Value of the `Retry-After` header (seconds or an HTTP date).
        #[serde(default)]
        retry_after: Option<String>,
    },
    /// Wait `ms` milliseconds, then process normally. The request is processed even if the
    /// client gave up meanwhile, so a client that times out loses the rotated token.
    Delay {
        /// Milliseconds to wait before processing.
        ms: u64,
    },
    /// Close the connection without processing and without an answer.
    DropBeforeProcessing,
    /// Process the request (a refresh rotates the token and is counted), then close the
    /// connection without an answer: the client sees a transport error.
    DropAfterProcessing,
    /// Process the request, then answer with the first half of the JSON body.
    TruncatedAfterProcessing,
    /// Answer `status` with an HTML error page (as a reverse proxy would), without processing.
    Html {
        /// HTTP status code.
        status: u16,
    },
    /// Answer 200 with a streamed (chunked, no `Content-Length`) JSON body of `bytes`
    /// bytes, without processing.
    Oversized {
        /// Body size in bytes.
        bytes: usize,
    },
}

impl FaultAction {
    /// A short name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Status { .. } => "status",
            Self::Delay { .. } => "delay",
            Self::DropBeforeProcessing => "drop_before_processing",
            Self::DropAfterProcessing => "drop_after_processing",
            Self::TruncatedAfterProcessing => "truncated_after_processing",
            Self::Html { .. } => "html",
            Self::Oversized { .. } => "oversized",
        }
    }
}

/// The queue: the front fault applies to the next token request.
#[derive(Debug, Default)]
pub(crate) struct FaultQueue {
    queue: VecDeque<Fault>,
}

impl FaultQueue {
    pub(crate) fn push(&mut self, fault: Fault) {
        self.queue.push_back(fault);
    }

    pub(crate) fn set(&mut self, faults: Vec<Fault>) {
        self.queue = faults.into();
    }

    pub(crate) fn clear(&mut self) {
        self.queue.clear();
    }

    pub(crate) fn list(&self) -> Vec<Fault> {
        self.queue.iter().cloned().collect()
    }

    /// The action for the next token request, if any; consumes one of the front fault's uses.
    pub(crate) fn take(&mut self) -> Option<FaultAction> {
        loop {
            let front = self.queue.front_mut()?;
            match &mut front.times {
                None => return Some(front.action.clone()),
                Some(0) => {
                    self.queue.pop_front();
                }
                Some(n) => {
                    *n -= 1;
                    let action = front.action.clone();
                    if *n == 0 {
                        self.queue.pop_front();
                    }
                    return Some(action);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn queue_applies_in_order_and_counts_down() {
        let mut q = FaultQueue::default();
        q.push(Fault::times(FaultAction::Delay { ms: 1 }, 2));
        q.push(Fault::times(FaultAction::DropBeforeProcessing, 0));
        q.push(Fault::once(FaultAction::Html { status: 502 }));
        assert_eq!(q.take(), Some(FaultAction::Delay { ms: 1 }));
        assert_eq!(q.take(), Some(FaultAction::Delay { ms: 1 }));
        assert_eq!(q.take(), Some(FaultAction::Html { status: 502 }));
        assert_eq!(q.take(), None);
    }

    #[test]
    fn unbounded_fault_stays_until_cleared() {
        let mut q = FaultQueue::default();
        q.set(vec![
            Fault::always(FaultAction::DropAfterProcessing),
            Fault::once(FaultAction::Html { status: 500 }),
        ]);
        for _ in 0..5 {
            assert_eq!(q.take(), Some(FaultAction::DropAfterProcessing));
        }
        assert_eq!(q.list().len(), 2);
        q.clear();
        assert_eq!(q.take(), None);
    }

    #[test]
    fn json_shape() {
        let faults: Vec<Fault> = serde_json::from_str(
            r#"[{"action":{"type":"status","status":429,"retry_after":"7"},"times":1},
                {"action":{"type":"oversized","bytes":10}}]"#,
        )
        .unwrap();
        assert_eq!(
            faults,
            vec![
                Fault::once(FaultAction::Status {
                    status: 429,
                    body: String::new(),
                    retry_after: Some("7".to_owned())
                }),
                Fault::always(FaultAction::Oversized { bytes: 10 }),
            ]
        );
    }
}
