//! The tonic adapter: authenticates and authorizes through the [`Gate`],
//! validates and converts requests, calls the [`Broker`], maps errors through
//! [`status::to_status`]. No business logic lives here.

pub mod convert;
pub mod gate;
pub mod observe;
pub mod status;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::auth::Operation;
use crate::broker::{Broker, RegisterCheck, WatchEvent};
use crate::error::BrokerError;
use crate::pb;
use crate::pb::token_broker_server::{TokenBroker, TokenBrokerServer};
use crate::session::SessionId;
use crate::telemetry::TraceContext;
use gate::{Caller, Gate};

/// The `tokenbroker.v1.TokenBroker` service.
#[derive(Debug, Clone)]
pub struct TokenBrokerService {
    broker: Arc<Broker>,
    gate: Arc<Gate>,
    max_message_bytes: usize,
    /// Remaining life of the tokens served (handle kept: the hot path
    /// records into it without a registry lookup).
    served_remaining: ::metrics::Histogram,
}

impl TokenBrokerService {
    /// A service over this broker, guarded by `gate`.
    pub fn new(broker: Arc<Broker>, gate: Arc<Gate>, max_message_bytes: usize) -> Self {
        Self {
            broker,
            gate,
            max_message_bytes,
            served_remaining: ::metrics::histogram!(crate::metrics::TOKEN_REMAINING),
        }
    }

    /// The tonic server for it. Requests up to 16 times `max_message_bytes`
    /// are decoded so that an oversized one gets a clear INVALID_ARGUMENT
    /// from the handlers; beyond that tonic refuses it
    /// (OUT_OF_RANGE) without reading it.
    pub fn into_server(self) -> TokenBrokerServer<Self> {
        let limit = self.max_message_bytes;
        TokenBrokerServer::new(self)
            .max_decoding_message_size(limit.saturating_mul(16))
            .max_encoding_message_size(limit)
    }

    /// Refuses a request larger than `max_message_bytes`.
    fn bounded<M: prost::Message>(&self, message: &M) -> Result<(), Status> {
        let size = message.encoded_len();
        if size > self.max_message_bytes {
            return Err(BrokerError::invalid(
                "request",
                format!(
                    "{size} bytes; at most {} are accepted",
                    self.max_message_bytes
                ),
            )
            .into());
        }
        Ok(())
    }

    /// Authorizes `op` on `session_id`. A missing session answers NOT_FOUND
    /// for every operation but register, whatever the policy says, so no
    /// answer tells a caller more than it may know (see `auth` docs).
    fn authorize(&self, caller: &Caller, op: Operation, session_id: &str) -> Result<(), Status> {
        if caller.is_none() {
            // No authentication: nothing to decide (and no lookup on the hot path).
            return Ok(());
        }
        let owner = self.broker.owner_of(session_id);
        if owner.is_none() && op != Operation::Register {
            return Err(BrokerError::SessionNotFound.into());
        }
        let owner = owner.flatten();
        Ok(self.gate.check(caller, op, session_id, owner.as_deref())?)
    }
}

/// Counts an open watch stream in the gauge while it lives.
#[derive(Debug)]
struct OpenStream;

impl OpenStream {
    fn new() -> Self {
        ::metrics::gauge!(crate::metrics::WATCH_STREAMS).increment(1.0);
        Self
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        ::metrics::gauge!(crate::metrics::WATCH_STREAMS).decrement(1.0);
    }
}

/// The W3C trace context of an incoming call, if it carries a valid one.
fn trace_of<T>(request: &Request<T>) -> Option<TraceContext> {
    request
        .metadata()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
}

/// The span of one RPC: method, session id and the caller's trace id.
fn rpc_span(method: &'static str, session_id: &str, trace: Option<&TraceContext>) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        method,
        session_id = %session_id,
        trace_id = tracing::field::Empty
    );
    if let Some(trace) = trace {
        span.record("trace_id", tracing::field::display(trace.trace_id()));
        crate::telemetry::set_remote_parent(&span, trace);
    }
    span
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchTokenResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TokenBroker for TokenBrokerService {
    async fn register_session(
        &self,
        request: Request<pb::RegisterSessionRequest>,
    ) -> Result<Response<pb::RegisterSessionResponse>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let trace = trace_of(&request);
        let mut registration =
            convert::registration(request.into_inner(), self.broker.settings().max_token_bytes)?;
        let id = registration
            .session_id
            .as_ref()
            .map_or_else(String::new, |id| id.to_string());
        registration.owner = caller.as_ref().map(|c| c.as_str().into());
        registration.trace = trace;
        // Authorized by the broker under its reservation of the id actually
        // registered, so no concurrent registration can slip in between.
        let gate = self.gate.clone();
        let check: RegisterCheck =
            Box::new(move |id, existing| gate.check_register(&caller, id.as_str(), existing));
        let span = rpc_span("RegisterSession", &id, trace.as_ref());
        let (info, created) = self
            .broker
            .register(registration, check)
            .instrument(span)
            .await?;
        Ok(Response::new(pb::RegisterSessionResponse {
            session: Some(convert::session(info)),
            created,
        }))
    }

    async fn get_access_token(
        &self,
        request: Request<pb::GetAccessTokenRequest>,
    ) -> Result<Response<pb::GetAccessTokenResponse>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let trace = trace_of(&request);
        let request = request.into_inner();
        // The hot path: validated and looked up as `&str`, no allocation.
        SessionId::check(&request.session_id)?;
        let min_ttl = convert::min_ttl(request.min_ttl)?;
        // A cached token for a caller without a trace context is answered
        // without a span (nothing is logged on that path; the RPC metrics
        // count it): the span cost as much as the lookup.
        let cached = (trace.is_none() && !request.force_refresh)
            .then(|| self.broker.cached_token(&request.session_id, min_ttl))
            .flatten();
        let token = match cached {
            Some(token) => {
                self.authorize(&caller, Operation::Get, &request.session_id)?;
                token
            }
            None => {
                let span = rpc_span("GetAccessToken", &request.session_id, trace.as_ref());
                async {
                    self.broker.ensure_loaded(&request.session_id).await?;
                    self.authorize(&caller, Operation::Get, &request.session_id)?;
                    Ok::<_, Status>(
                        self.broker
                            .get_token(&request.session_id, min_ttl, request.force_refresh, trace)
                            .await?,
                    )
                }
                .instrument(span)
                .await?
            }
        };
        let remaining = token
            .expires_at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        self.served_remaining.record(remaining.as_secs_f64());
        Ok(Response::new(pb::GetAccessTokenResponse {
            token: Some(convert::access_token(&token)),
        }))
    }

    type WatchTokenStream = WatchStream;

    async fn watch_token(
        &self,
        request: Request<pb::WatchTokenRequest>,
    ) -> Result<Response<Self::WatchTokenStream>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let slot = self.gate.open_stream(&caller, &request)?;
        let id = convert::session_id(&request.get_ref().session_id)?;
        self.broker.ensure_loaded(id.as_str()).await?;
        self.authorize(&caller, Operation::Watch, id.as_str())?;
        let watch = {
            let _span = rpc_span("WatchToken", id.as_str(), None).entered();
            tracing::debug!("watch stream opened");
            self.broker.watch(&id)?
        };
        let slot = (slot, OpenStream::new());
        // The slot travels with the stream: released when the stream ends.
        // Every token is authorized again, so a policy reload that revokes
        // the caller's access ends its open streams too.
        let service = self.clone();
        let stream = futures::stream::unfold(Some((watch, slot)), move |state| {
            let service = service.clone();
            let (caller, id) = (caller.clone(), id.clone());
            async move {
                let (mut watch, slot) = state?;
                let event = watch.next().await?;
                if let WatchEvent::ShuttingDown = event {
                    return Some((Err(Status::from(BrokerError::ShuttingDown)), None));
                }
                if let WatchEvent::Token(_) = event
                    && let Err(status) = service.authorize(&caller, Operation::Watch, id.as_str())
                {
                    return Some((Err(status), None));
                }
                convert::watch_event(event).map(|message| (Ok(message), Some((watch, slot))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let id = convert::session_id(&request.into_inner().session_id)?;
        self.broker.ensure_loaded(id.as_str()).await?;
        self.authorize(&caller, Operation::Inspect, id.as_str())?;
        let info = self.broker.inspect(&id)?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(convert::session(info)),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let query = convert::list_query(request.into_inner())?;
        let (page, more) = self.broker.list(&query, |id, owner| {
            self.gate.may_list(&caller, id.as_str(), owner)
        });
        // A page must fit `max_message_bytes` (the server refuses to send a
        // larger message): it ends early, at least one session in, and the
        // token continues after its last session.
        let room = self
            .max_message_bytes
            .saturating_sub(crate::session::MAX_SESSION_ID_LEN + 8);
        let mut sessions = Vec::with_capacity(page.len());
        let mut size = 0;
        let mut cut = false;
        for info in page {
            let session = convert::session(info);
            let len = prost::Message::encoded_len(&session);
            let field = 1 + prost::length_delimiter_len(len) + len;
            if !sessions.is_empty() && size + field > room {
                cut = true;
                break;
            }
            size += field;
            sessions.push(session);
        }
        let next_page_token = match (more || cut, sessions.last()) {
            (true, Some(last)) => last.session_id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListSessionsResponse {
            sessions,
            next_page_token,
        }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let caller = self.gate.caller(&request)?;
        self.bounded(request.get_ref())?;
        let id = convert::session_id(&request.into_inner().session_id)?;
        self.broker.ensure_loaded(id.as_str()).await?;
        self.authorize(&caller, Operation::Delete, id.as_str())?;
        let span = rpc_span("DeleteSession", id.as_str(), None);
        let logged_out_upstream = self.broker.delete(&id).instrument(span).await?;
        Ok(Response::new(pb::DeleteSessionResponse {
            logged_out_upstream,
        }))
    }
}
