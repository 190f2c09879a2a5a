//! Who is calling, and may they: the identity source configured for this
//! port, the policy, and the per-caller stream budget. Every handler asks
//! the gate before it touches the broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::{Request, Status};

use crate::auth::{
    CallerId, Decision, IdentitySource, Operation, PolicyHandle, caller_from_certificate,
    caller_from_l5d, caller_from_xfcc,
};
use crate::broker::ExistingOwner;
use crate::error::BrokerError;

/// The Envoy/Istio header with the caller's certificate details.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";
/// The Linkerd header with the caller's identity.
pub const L5D_HEADER: &str = "l5d-client-id";

/// Authentication and authorization of gRPC calls.
#[derive(Debug)]
pub struct Gate {
    source: IdentitySource,
    policy: PolicyHandle,
    max_streams_per_caller: usize,
    streams: Arc<Mutex<HashMap<StreamKey, usize>>>,
}

/// What a stream counts against: a caller, or (without authentication) a
/// connection's remote address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StreamKey {
    Caller(CallerId),
    Peer(Option<std::net::SocketAddr>),
}

/// A held watch-stream slot; released on drop.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<StreamKey, usize>>>,
    key: StreamKey,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = streams.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                streams.remove(&self.key);
            }
        }
    }
}

/// The owner of sessions registered without authentication, under
/// `owner_only`: no caller identity can equal it (identities never hold NUL).
const NOBODY: &str = "\u{0}nobody";

/// The identity of one call (`None` without authentication).
pub type Caller = Option<CallerId>;

impl Gate {
    /// A gate for `source` with `policy`.
    pub fn new(
        source: IdentitySource,
        policy: PolicyHandle,
        max_streams_per_caller: usize,
    ) -> Self {
        Self {
            source,
            policy,
            max_streams_per_caller: max_streams_per_caller.max(1),
            streams: Arc::default(),
        }
    }

    /// The caller of `request`, from the configured source only: headers of
    /// a source that is not configured are ignored (anyone can forge them).
    pub fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        // Several header lines of one name read as one comma-joined value.
        let header = |name: &str| {
            let values: Vec<&str> = request
                .metadata()
                .get_all(name)
                .iter()
                .map(|v| v.to_str().unwrap_or_default())
                .collect();
            (!values.is_empty()).then(|| values.join(","))
        };
        let found = match self.source {
            IdentitySource::None => return Ok(None),
            IdentitySource::Mtls => match request.peer_certs() {
                Some(chain) if !chain.is_empty() => caller_from_certificate(chain[0].as_ref()),
                _ => Err(crate::auth::IdentityError::Missing),
            },
            IdentitySource::Xfcc => match header(XFCC_HEADER) {
                Some(value) => caller_from_xfcc(&value),
                None => Err(crate::auth::IdentityError::Missing),
            },
            IdentitySource::Linkerd => match header(L5D_HEADER) {
                Some(value) => caller_from_l5d(&value),
                None => Err(crate::auth::IdentityError::Missing),
            },
        };
        found.map(Some).map_err(|error| {
            Status::from(BrokerError::CallerUnauthenticated {
                description: error.to_string(),
            })
        })
    }

    /// Whether `caller` may do `op` on `session_id` (owned by `owner`).
    /// Without authentication everything is allowed.
    pub fn check(
        &self,
        caller: &Caller,
        op: Operation,
        session_id: &str,
        owner: Option<&str>,
    ) -> Result<(), BrokerError> {
        let Some(caller) = caller else {
            return Ok(());
        };
        let owner = owner.map(CallerId::new);
        match self
            .policy
            .current()
            .decide(caller, op, session_id, owner.as_ref())
        {
            Decision::Allow => Ok(()),
            Decision::NotFound => Err(BrokerError::SessionNotFound),
            Decision::PermissionDenied => Err(BrokerError::CallerNotAllowed {
                operation: op_name(op),
            }),
        }
    }

    /// Whether `caller` may register (or replace) `session_id`, resolved
    /// under the broker's reservation of the id. An existing session without
    /// a recorded owner counts, under `owner_only`, as owned by nobody: only
    /// `any_owner` rules may replace it.
    pub fn check_register(
        &self,
        caller: &Caller,
        session_id: &str,
        existing: ExistingOwner<'_>,
    ) -> Result<(), BrokerError> {
        let Some(caller) = caller else {
            return Ok(());
        };
        let policy = self.policy.current();
        let owner = match existing {
            ExistingOwner::New => None,
            ExistingOwner::Owned(owner) => Some(CallerId::new(owner)),
            ExistingOwner::Unowned if policy.owner_only() => Some(CallerId::new(NOBODY)),
            ExistingOwner::Unowned => None,
        };
        match policy.decide(caller, Operation::Register, session_id, owner.as_ref()) {
            Decision::Allow => Ok(()),
            Decision::NotFound if existing != ExistingOwner::New => {
                Err(BrokerError::SessionNotFound)
            }
            _ => Err(BrokerError::CallerNotAllowed {
                operation: op_name(Operation::Register),
            }),
        }
    }

    /// Whether `caller` may see `session_id` in listings.
    pub fn may_list(&self, caller: &Caller, session_id: &str, owner: Option<&str>) -> bool {
        self.check(caller, Operation::Inspect, session_id, owner)
            .is_ok()
    }

    /// Takes a watch-stream slot of the caller (or, without authentication,
    /// of the connection); `RateLimited` beyond the budget.
    pub fn open_stream<T>(
        &self,
        caller: &Caller,
        request: &Request<T>,
    ) -> Result<StreamSlot, BrokerError> {
        let key = match caller {
            Some(caller) => StreamKey::Caller(caller.clone()),
            None => StreamKey::Peer(request.remote_addr()),
        };
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let count = streams.entry(key.clone()).or_insert(0);
        if *count >= self.max_streams_per_caller {
            return Err(BrokerError::RateLimited {
                description: format!(
                    "at most {} concurrent watch streams per caller",
                    self.max_streams_per_caller
                ),
                retry_after: std::time::Duration::from_secs(1),
            });
        }
        *count += 1;
        drop(streams);
        Ok(StreamSlot {
            streams: self.streams.clone(),
            key,
        })
    }
}

fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Register => "register",
        Operation::Get => "get",
        Operation::Watch => "watch",
        Operation::Inspect => "inspect",
        Operation::Delete => "delete",
    }
}
