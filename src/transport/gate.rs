//! The gate every HTTP/2 stream passes before any handler runs, whatever
//! service it is for (the broker's, health, reflection):
//!
//! - only gRPC is served: a request whose `content-type` is not
//!   `application/grpc` or `application/grpc+proto` (JSON, text, gRPC-Web)
//!   gets HTTP 415 and reaches no handler;
//! - every stream takes one of its connection's call slots from its headers
//!   on, and keeps it until its response body is done (a WatchSecret stream,
//!   for as long as it is open); with none left it is answered
//!   RESOURCE_EXHAUSTED (`TOO_MANY_CALLS`) at once. Counting from the headers
//!   matters: a stream that never sends its message still costs memory;
//! - it takes one of the broker's call slots too (`call_slots`: a bound over
//!   every connection, where a call still waiting for its request may lose
//!   its slot to a newer one); a long-lived stream (WatchSecret, health's
//!   Watch, server reflection) needs a place in its share of those slots as
//!   well once its request has come (`transport::budget` takes it), so that
//!   such streams never hold the slots reads need;
//! - the request memory (`transport::budget`): a request message still
//!   arriving holds its bytes from one budget shared by every call;
//! - the call timeout: a call whose answer is not ready within
//!   `--call-timeout` is answered DEADLINE_EXCEEDED (`CALL_TIMEOUT`). tonic's
//!   own timeout answers CANCELLED with no reason, so the broker keeps its
//!   own. It bounds the wait for a stream's request message too. The
//!   earlier of it and the caller's own deadline (`grpc-timeout`) goes to
//!   the handlers as a `CallDeadline`, so that they stop waiting for the
//!   upstream in time to answer with what they have. Server reflection,
//!   a bidirectional stream whose answer starts at once, is ended with
//!   DEADLINE_EXCEEDED when the call timeout passes, and with UNAVAILABLE
//!   when the broker stops (it would hold the shutdown); the streams meant to
//!   stay open (WatchSecret, health's Watch) read one request message,
//!   within the timeout, before they answer;
//! - errors in the broker's words: tonic's own refusals (an unknown method,
//!   a compressed request, a message that does not decode) get the
//!   `ErrorInfo` every error of the broker's carries, and a reflection
//!   stream that stopped at a request it could not take (too large, not
//!   decodable: its handler ends such a stream OK) ends with that error.

use std::{
    borrow::Cow,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode, header::CONTENT_TYPE};
use http_body::Frame;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, body::Body};
use tonic_types::StatusExt;
use tower::{Layer, Service};

use super::{
    budget::{Budgeted, RequestBudget},
    call_slots::{CallSlot, CallSlots, Share},
    untaken_answers::{self, PendingAnswer, UntakenAnswers},
};
use crate::{
    api::{
        CallMetrics, refused_before_the_handler, refused_unknown_method, rpc::Rpc, status::ApiError,
    },
    cache::Deadline,
    identity::Identity,
    transport::connection_info::ConnectionInfo,
};

/// Puts the gate in front of a service.
#[derive(Clone)]
pub struct GateLayer {
    shared: Arc<GateShared>,
}

/// What every gate of the server shares. One `Arc` of it: the service
/// stack is cloned for every call, and each handle cloned there costs an
/// atomic (a `CancellationToken`'s clone even takes a mutex).
struct GateShared {
    call_timeout: Duration,
    budget: RequestBudget,
    calls: CallSlots,
    metrics: CallMetrics,
    /// The broker stops: reflection streams end then.
    stop: CancellationToken,
}

impl GateLayer {
    pub fn new(
        call_timeout: Duration,
        budget: RequestBudget,
        calls: CallSlots,
        metrics: CallMetrics,
        stop: CancellationToken,
    ) -> Self {
        let shared = GateShared {
            call_timeout,
            budget,
            calls,
            metrics,
            stop,
        };
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gate<S>;

    fn layer(&self, inner: S) -> Gate<S> {
        Gate {
            inner,
            shared: Arc::clone(&self.shared),
        }
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    shared: Arc<GateShared>,
}

type GateFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S, B> Service<Request<B>> for Gate<S>
where
    S: Service<Request<Budgeted<B>>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = GateFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> GateFuture {
        if !is_grpc(request.headers().get(CONTENT_TYPE)) {
            tracing::debug!(
                path = &*shown_path(request.uri().path()),
                "not gRPC: refused with 415"
            );
            return Box::pin(std::future::ready(Ok(unsupported_media_type())));
        }
        let connection = request.extensions().get::<ConnectionInfo>();
        // Kept for the audit of a call that fails before its handler runs.
        let caller = connection.map_or(Identity::Anonymous, |connection| {
            connection.identity.clone()
        });
        // The RPC, not the path: cloning the path's bytes can allocate.
        let rpc = Rpc::of_path(request.uri().path());
        let share = long_lived_share(rpc, request.uri().path());
        let slots = match self.take_slots(connection, share) {
            Ok(slots) => slots,
            Err(full) => return self.refuse(request.uri().path(), rpc, &caller, full),
        };
        let limit = self.shared.call_timeout;
        // A path that names no RPC of the broker's, outside health's and
        // reflection's services (`/grpc.`): copied, only then, for the
        // error that names it and, under the broker's services, the audit.
        let unknown_path = (rpc.is_none() && !request.uri().path().starts_with("/grpc."))
            .then(|| shown_path(request.uri().path()).into_owned());
        let unopened = AuditIfUnopened {
            rpc,
            caller,
            slot: Arc::clone(&slots.call),
            metrics: self.shared.metrics.clone(),
            armed: true,
        };
        // Reflection is a bidirectional stream: its answer starts at once,
        // so the timeout below would not bound it, and a caller could hold
        // it (and its half-sent messages) for as long as the connection.
        // Both sides end at the call timeout: the answer (`GatedBody`) and
        // the request, whose reader (a task of reflection's own) would
        // otherwise keep waiting for it. They end when the broker stops
        // too, or an open one would hold the shutdown for its grace.
        let reflection = is_reflection(request.uri().path());
        let stream_ends = reflection.then(|| CallEnd::after(limit).or_at(self.shared.stop.clone()));
        // An answer must be taken within a call timeout or so; reflection's
        // stream may rightly last a whole one first; watches last.
        let watch = matches!(share, Some(Share::Watches | Share::HealthWatches));
        let untaken = connection
            .filter(|_| !watch)
            .map(|connection| Arc::clone(&connection.untaken_answers));
        let request_ends = stream_ends.as_ref().map(CallEnd::same);
        let mut request = request.map(|body| {
            self.shared
                .budget
                .wrap(body, request_ends, Some(Arc::clone(&slots.call)))
        });
        let deadline = CallDeadline::of(request.headers().get(GRPC_TIMEOUT), limit);
        request.extensions_mut().insert(deadline);
        let call = self.inner.call(request);
        let in_flight = InFlight {
            unopened,
            unknown_path,
            slots,
            stream_ends,
            untaken,
            reflection,
        };
        Box::pin(in_flight.answer(call, limit))
    }
}

impl<S> Gate<S> {
    /// Takes the slots a call holds until its answer is done: one of its
    /// connection's, one of its connection's health watches for health's
    /// Watch, and one of the broker's within the call's `share`; or the
    /// error that says which was full.
    fn take_slots(
        &self,
        connection: Option<&ConnectionInfo>,
        share: Option<Share>,
    ) -> Result<HeldSlots, ApiError> {
        let connection_slot = match connection {
            Some(connection) => Some(
                Arc::clone(&connection.call_slots)
                    .try_acquire_owned()
                    .map_err(|_| ApiError::TooManyCalls)?,
            ),
            None => None,
        };
        let health_watch = match connection {
            Some(connection) if share == Some(Share::HealthWatches) => Some(
                Arc::clone(&connection.health_watches)
                    .try_acquire_owned()
                    .map_err(|_| ApiError::TooManyHealthWatches {
                        limit: crate::transport::connection_info::HEALTH_WATCHES,
                    })?,
            ),
            _ => None,
        };
        let calls = &self.shared.calls;
        let call = calls.take(share).ok_or_else(|| ApiError::BrokerFull {
            limit: calls.limit(),
        })?;
        Ok(HeldSlots {
            _connection: connection_slot,
            _health_watch: health_watch,
            call,
        })
    }
}

/// The slots a call holds until its answer is done (`Gate::take_slots`);
/// held, not read: each is given back when dropped.
struct HeldSlots {
    _connection: Option<OwnedSemaphorePermit>,
    _health_watch: Option<OwnedSemaphorePermit>,
    call: Arc<CallSlot>,
}

/// A call let through the gate, until its handler answers.
struct InFlight {
    unopened: AuditIfUnopened,
    /// The path of a call to no RPC of the broker's (see `Gate::call`).
    unknown_path: Option<String>,
    slots: HeldSlots,
    /// Reflection's end (see `Gate::call`).
    stream_ends: Option<CallEnd>,
    /// Where its answer counts until taken, from when it is given.
    untaken: Option<Arc<UntakenAnswers>>,
    reflection: bool,
}

impl InFlight {
    /// Awaits the handler's answer within the call timeout (`limit`),
    /// audits a call that failed before its handler ran, and gives the
    /// answer a body that holds the call's slots until it is done.
    async fn answer<F>(self, call: F, limit: Duration) -> Result<Response<Body>, Infallible>
    where
        F: Future<Output = Result<Response<Body>, Infallible>>,
    {
        let Self {
            mut unopened,
            unknown_path,
            slots,
            stream_ends,
            untaken,
            reflection,
        } = self;
        let response = match tokio::time::timeout(limit, call).await {
            Ok(Ok(response)) => response,
            Err(_elapsed) => {
                let timeout = ApiError::CallTimeout(limit);
                unopened.audit(tonic::Code::DeadlineExceeded, Some(timeout.reason()));
                answer(timeout)
            }
        };
        // From here the call is answered: nothing to say on drop.
        unopened.armed = false;
        let response = match failed_before_the_handler(&response) {
            // tonic answers a request body that failed with INTERNAL; the
            // caller that reset its stream gave up on the call.
            Some(_) if unopened.slot.caller_went_away() => {
                unopened.audit_refusal(tonic::Code::Cancelled, None, unknown_path.as_deref());
                in_the_brokers_words(response, unknown_path).0
            }
            // SHUTTING_DOWN is also a handler's answer (a watch or stream
            // the drain ended), which its handler audited: the gate's own
            // is for a call whose request never came.
            Some((_, Some(reason)))
                if reason == ApiError::ShuttingDown.reason()
                    && !unopened.slot.never_got_its_request() =>
            {
                response
            }
            Some((outcome, reason)) => {
                let shown = unknown_path.clone();
                let (response, rewritten) = in_the_brokers_words(response, unknown_path);
                unopened.audit_refusal(outcome, reason.or(rewritten), shown.as_deref());
                response
            }
            None => response,
        };
        // A trailers-only answer is already whole: a second grpc-status
        // must not follow it.
        let stream_ends = stream_ends.filter(|_| !response.headers().contains_key(GRPC_STATUS));
        Ok(response.map(|body| {
            Body::new(GatedBody {
                body,
                _slots: slots,
                ends: stream_ends,
                untaken: untaken.map(|answers| {
                    if reflection {
                        answers.reflection()
                    } else {
                        answers.answered()
                    }
                }),
            })
        }))
    }
}

/// Audits a call of the broker's whose request never came, which no
/// handler saw: at the call timeout, or when the call is dropped unanswered
/// (the caller reset the stream, the connection went, the broker stopped).
struct AuditIfUnopened {
    rpc: Option<Rpc>,
    caller: Identity,
    slot: Arc<CallSlot>,
    metrics: CallMetrics,
    armed: bool,
}

impl AuditIfUnopened {
    /// Audits a call of the broker's that tonic or the transport refused
    /// before its handler ran (`outcome`); a call to an unknown method of
    /// the broker's services is logged with its path.
    fn audit_refusal(
        &self,
        outcome: tonic::Code,
        reason: Option<&'static str>,
        unknown_path: Option<&str>,
    ) {
        match self.rpc {
            Some(rpc) => {
                refused_before_the_handler(rpc, &self.caller, outcome, reason, &self.metrics)
            }
            None if outcome == tonic::Code::Unimplemented => {
                if let Some(path) = unknown_path.filter(|path| is_the_brokers(path)) {
                    let reason = ApiError::UnknownMethod { path: None }.reason();
                    refused_unknown_method(path, &self.caller, outcome, reason);
                }
            }
            None => {}
        }
    }

    fn audit(&mut self, outcome: tonic::Code, reason: Option<&'static str>) {
        if let Some(rpc) = self
            .rpc
            .filter(|_| self.armed && self.slot.never_got_its_request())
        {
            refused_before_the_handler(rpc, &self.caller, outcome, reason, &self.metrics);
            // Once: the drop must not say it again.
            self.armed = false;
        }
    }
}

impl Drop for AuditIfUnopened {
    fn drop(&mut self) {
        self.audit(tonic::Code::Cancelled, None);
    }
}

impl<S> Gate<S> {
    /// Answers a call refused at the gate, and audits it when it is one of
    /// the broker's (health and reflection calls are not audited).
    fn refuse(
        &self,
        path: &str,
        rpc: Option<Rpc>,
        caller: &Identity,
        error: ApiError,
    ) -> GateFuture {
        let reason = error.reason();
        let status = Status::from(error);
        match rpc {
            Some(rpc) => refused_before_the_handler(
                rpc,
                caller,
                status.code(),
                Some(reason),
                &self.shared.metrics,
            ),
            // A method the broker's services do not have is audited as
            // when it is let through, with the refusal it got here.
            None if is_the_brokers(path) => {
                refused_unknown_method(&shown_path(path), caller, status.code(), reason);
            }
            None => tracing::debug!(
                identity = caller.shown(),
                path = &*shown_path(path),
                reason = status.message(),
                "refused at the gate"
            ),
        }
        Box::pin(std::future::ready(Ok(status.into_http())))
    }
}

/// Health's long-lived stream (see `ConnectionInfo::health_watches`).
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// Whether `path` is under the broker's own services (audited), not
/// health's or reflection's (`/grpc.`) or no service's.
fn is_the_brokers(path: &str) -> bool {
    path.starts_with("/secretsbroker.")
}

/// `grpc-status` and `grpc-timeout`, as `HeaderName`s: a `&str` key is
/// parsed on every look-up, and these are looked up on every call.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_ACCEPT_ENCODING: http::HeaderName =
    http::HeaderName::from_static("grpc-accept-encoding");
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The code of an answer that no handler of the broker's wrote: an error
/// without the `ErrorInfo` every handler's error carries (tonic's own, for
/// a request it could not read), or one the transport gives with an
/// `ErrorInfo` before any handler runs (the request memory, a request over
/// the size limit), with that `ErrorInfo`'s reason. A call answered in full
/// has its `grpc-status` in the trailers, not here: one look-up.
fn failed_before_the_handler(
    response: &Response<Body>,
) -> Option<(tonic::Code, Option<&'static str>)> {
    let headers = response.headers();
    let code = headers
        .get(GRPC_STATUS)?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    let code = tonic::Code::from(code);
    if code == tonic::Code::Ok {
        return None;
    }
    if !headers.contains_key("grpc-status-details-bin") {
        return Some((code, None));
    }
    let status = Status::from_header_map(headers)?;
    let details = status.get_error_details();
    let reason = ApiError::given_before_the_handler(&details.error_info()?.reason)?;
    Some((code, Some(reason)))
}

/// `status` as an answer's trailers. Our own statuses' text is ASCII, and
/// tonic percent-encodes its own: adding them cannot fail.
fn trailers_of(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    let _ = status.add_header(&mut trailers);
    trailers
}

/// tonic's own refusals of a request it cannot route or read (an unknown
/// method, a compressed request, a message that does not decode) carry no
/// `ErrorInfo`, which every error of the broker's does: they are said
/// again as the broker's, with the same code; with the reason they were
/// given, when they were.
fn in_the_brokers_words(
    response: Response<Body>,
    unknown_path: Option<String>,
) -> (Response<Body>, Option<&'static str>) {
    if response.headers().contains_key("grpc-status-details-bin") {
        return (response, None);
    }
    let Some(status) = Status::from_header_map(response.headers()) else {
        return (response, None);
    };
    let error = match status.code() {
        tonic::Code::Unimplemented => match encoding_refused(status.message()) {
            Some(encoding) => ApiError::UnsupportedEncoding { encoding },
            None => ApiError::UnknownMethod { path: unknown_path },
        },
        tonic::Code::Internal => ApiError::MalformedRequest {
            detail: status.message().to_owned(),
        },
        _ => return (response, None),
    };
    let reason = error.reason();
    let mut answered = answer(error);
    // A refused encoding's answer says which ones are taken.
    if let Some(accepted) = response.headers().get(GRPC_ACCEPT_ENCODING) {
        answered
            .headers_mut()
            .insert(GRPC_ACCEPT_ENCODING, accepted.clone());
    }
    (answered, Some(reason))
}

/// The encoding tonic's refusal of a compressed request names ("Content
/// is compressed with `gzip` which isn't supported"), cut: the caller
/// chose it.
fn encoding_refused(message: &str) -> Option<String> {
    const MAX_SHOWN: usize = 40;
    let (_, rest) = message.split_once("compressed with `")?;
    let (encoding, _) = rest.rsplit_once('`')?;
    Some(encoding.chars().take(MAX_SHOWN).collect())
}

/// The share of the call slots a long-lived stream takes a place in once
/// its request has come: the watches, open for as long as their caller
/// wants, and reflection's stream, open until the call timeout (without a
/// share, callers with no grant could hold every slot with them).
fn long_lived_share(rpc: Option<Rpc>, path: &str) -> Option<Share> {
    if rpc == Some(Rpc::WatchSecret) {
        Some(Share::Watches)
    } else if path == HEALTH_WATCH {
        Some(Share::HealthWatches)
    } else if is_reflection(path) {
        Some(Share::Reflection)
    } else {
        None
    }
}

/// Server reflection's services (v1 and v1alpha).
fn is_reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.")
}

/// A request's path as the log shows it, before any handler has checked
/// it: at most `MAX_SHOWN_PATH` bytes. The caller chooses the path, and
/// HPACK lets it resend a long one in a few bytes, so an unbounded path
/// would let each small frame write kilobytes to the log.
fn shown_path(path: &str) -> Cow<'_, str> {
    const MAX_SHOWN_PATH: usize = 96;
    if path.len() <= MAX_SHOWN_PATH {
        return Cow::Borrowed(path);
    }
    let cut = path.floor_char_boundary(MAX_SHOWN_PATH);
    Cow::Owned(format!("{}... ({} bytes)", &path[..cut], path.len()))
}

/// When a call must have its answer: the earlier of the call timeout and
/// the caller's own deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline(pub Deadline);

impl CallDeadline {
    fn of(grpc_timeout: Option<&http::HeaderValue>, call_timeout: Duration) -> Self {
        let callers = grpc_timeout
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .filter(|callers| *callers < call_timeout);
        Self(Deadline {
            at: tokio::time::Instant::now() + callers.unwrap_or(call_timeout),
            callers: callers.is_some(),
        })
    }

    /// The deadline a request carries (none outside the gate, e.g. tests).
    pub fn of_request<T>(request: &tonic::Request<T>) -> Option<Deadline> {
        request
            .extensions()
            .get::<Self>()
            .map(|deadline| deadline.0)
    }
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// `application/grpc` or `application/grpc+proto`, parameters allowed.
fn is_grpc(content_type: Option<&http::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let media_type = value.split(';').next().unwrap_or_default().trim();
    media_type.eq_ignore_ascii_case("application/grpc")
        || media_type.eq_ignore_ascii_case("application/grpc+proto")
}

fn unsupported_media_type() -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response
}

/// A gRPC answer (trailers-only) for a call refused at the gate.
fn answer(error: ApiError) -> Response<Body> {
    Status::from(error).into_http()
}

/// A response body that keeps its call's slot until it is done or dropped,
/// and, for a stream that must not outlive the call timeout, ends it there
/// with DEADLINE_EXCEEDED.
struct GatedBody {
    body: Body,
    _slots: HeldSlots,
    ends: Option<CallEnd>,
    /// Counted among its connection's answers not taken until its end,
    /// and each chunk of its bytes until h2 lets go of it.
    untaken: Option<PendingAnswer>,
}

/// The end of a call that must not outlive the call timeout (nor, if
/// given, the broker's stop): its answer (`GatedBody`) and its request
/// (`budget::Budgeted`) each hold one.
pub(super) struct CallEnd {
    at: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
    stop: Option<Stop>,
    /// What became of the request: shared by the two sides.
    request: Arc<Mutex<RequestFate>>,
}

/// How a stream's request ended, for its answer to tell: reflection's
/// handler stops at a request it cannot take, and ends its answer OK. The
/// first word stands.
#[derive(Default)]
enum RequestFate {
    #[default]
    Open,
    Ended,
    Failed(Status),
}

struct Stop {
    token: CancellationToken,
    stopped: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stop {
    fn new(token: CancellationToken) -> Self {
        let stopped = Box::pin(token.clone().cancelled_owned());
        Self { token, stopped }
    }
}

impl CallEnd {
    pub(super) fn after(limit: Duration) -> Self {
        Self {
            at: Box::pin(tokio::time::sleep(limit)),
            limit,
            stop: None,
            request: Arc::default(),
        }
    }

    /// The same end, or `stop`, whichever comes first.
    pub(super) fn or_at(self, stop: CancellationToken) -> Self {
        Self {
            stop: Some(Stop::new(stop)),
            ..self
        }
    }

    /// Another timer for the same end.
    fn same(&self) -> Self {
        Self {
            at: Box::pin(tokio::time::sleep_until(self.at.deadline())),
            limit: self.limit,
            stop: self.stop.as_ref().map(|stop| Stop::new(stop.token.clone())),
            request: Arc::clone(&self.request),
        }
    }

    /// The request body has come to its end.
    pub(super) fn request_ended(&self) {
        self.settle(RequestFate::Ended);
    }

    /// The request body failed with `status`.
    pub(super) fn request_failed(&self, status: &Status) {
        self.settle(RequestFate::Failed(status.clone()));
    }

    fn settle(&self, fate: RequestFate) {
        let mut request = self.request.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*request, RequestFate::Open) {
            *request = fate;
        }
    }

    /// The trailers of an answer that ended OK while its request had not:
    /// the handler stopped at a request it could not take.
    fn trailers_of_a_request_not_taken(
        &self,
        trailers: &http::HeaderMap,
    ) -> Option<http::HeaderMap> {
        if trailers.get(GRPC_STATUS).is_none_or(|code| code != "0") {
            return None;
        }
        let status = match &*self.request.lock().unwrap_or_else(|e| e.into_inner()) {
            RequestFate::Failed(status) => status.clone(),
            RequestFate::Ended => return None,
            RequestFate::Open => Status::from(ApiError::MalformedRequest {
                detail: "not a message of this method, or compressed without a grpc-encoding"
                    .into(),
            }),
        };
        Some(trailers_of(&status))
    }

    /// The error of the end, once it has passed; until then the task of
    /// `cx` is woken when it does.
    pub(super) fn passed(&mut self, cx: &mut Context<'_>) -> Option<ApiError> {
        if let Some(stop) = &mut self.stop
            && stop.stopped.as_mut().poll(cx).is_ready()
        {
            return Some(ApiError::StreamShutDown);
        }
        self.at
            .as_mut()
            .poll(cx)
            .is_ready()
            .then_some(ApiError::CallTimeout(self.limit))
    }
}

impl http_body::Body for GatedBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Some(ended) = self.ends.as_mut().and_then(|end| end.passed(cx)) {
            self.ends = None;
            // Dropping the answer drops the call; the request ends on its
            // own end (see `budget::Budgeted`).
            self.body = Body::empty();
            let trailers = trailers_of(&Status::from(ended));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let mut frame = Pin::new(&mut self.body).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(data))), Some(answer)) = (&mut frame, &self.untaken)
            && let Some(bytes) = data.data_mut()
        {
            // hyper hands a chunk to h2 with a window of one byte: the rest
            // waits there, and must be taken too.
            *bytes = untaken_answers::counted(std::mem::take(bytes), answer.chunk());
        }
        if let Poll::Ready(None) = &frame {
            self.ends = None;
            self.untaken = None;
        } else if let Poll::Ready(Some(Ok(last))) = &frame
            && let Some(trailers) = last.trailers_ref()
        {
            self.untaken = None;
            // Ended on its own: no second trailers.
            if let Some(replaced) = self
                .ends
                .take()
                .and_then(|end| end.trailers_of_a_request_not_taken(trailers))
            {
                return Poll::Ready(Some(Ok(Frame::trailers(replaced))));
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_is_the_callers_only_when_it_comes_before_the_call_timeout() {
        let call_timeout = Duration::from_secs(30);
        let now = tokio::time::Instant::now();
        let of = |header: Option<&'static str>| {
            let value = header.map(http::HeaderValue::from_static);
            CallDeadline::of(value.as_ref(), call_timeout).0
        };
        let callers = of(Some("5S"));
        assert_eq!(
            (callers.at, callers.callers),
            (now + Duration::from_secs(5), true)
        );
        for ours in [of(None), of(Some("30S")), of(Some("1M")), of(Some("5x"))] {
            assert_eq!((ours.at, ours.callers), (now + call_timeout, false));
        }
    }

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_says() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn only_grpc_content_types_pass() {
        let pass = |value: &str| is_grpc(Some(&http::HeaderValue::from_str(value).unwrap()));
        assert!(pass("application/grpc"));
        assert!(pass("application/grpc+proto"));
        assert!(pass("application/grpc; charset=utf-8"));
        assert!(!pass("application/json"));
        assert!(!pass("text/plain"));
        assert!(!pass("application/grpc-web"));
        assert!(!pass("application/grpc-web+proto"));
        assert!(!pass("application/grpc+json"));
        assert!(!is_grpc(None));
    }

    #[test]
    fn a_long_path_is_cut_in_the_log() {
        assert_eq!(
            shown_path("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        let long = format!("/{}", "\u{e9}".repeat(3000));
        let shown = shown_path(&long);
        assert!(shown.len() < 130, "{shown}");
        assert!(shown.ends_with("... (6001 bytes)"), "{shown}");
        assert!(long.starts_with(shown.split("...").next().unwrap()));
    }
}
