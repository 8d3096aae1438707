//! The audit trail: one structured event per call, on the `audit` tracing
//! target: who (identity), what (RPC, resolved secret names), the outcome
//! (gRPC code) and whether the cache answered. Never a value.
//!
//! Handlers fill an `Audit` as they learn the facts, and the edge emits it
//! with the outcome (`telemetry::audit` writes the line). A call that never reaches the edge is emitted when its
//! record is dropped, so that no path skips it: as DEADLINE_EXCEEDED when
//! the call timeout had passed (the gate cut it), else as CANCELLED (the
//! client gave up).

use std::time::Duration;

// tokio's clock: the cache's hit path reads the call's start as its now.
use tokio::time::Instant;
use tonic::Code;

use crate::{
    api::{CallMetrics, rpc::Rpc, status::ApiError},
    cache::Deadline,
    identity::Identity,
    names::ShownName,
    telemetry::audit::AuditRecord,
};

/// The facts of one call, emitted by `finish` (with the call's metrics).
pub struct Audit {
    rpc: Rpc,
    identity: Identity,
    secrets: Notes,
    cache_hit: Option<bool>,
    /// A refusal's `ErrorInfo` reason (`refused`).
    reason: Option<&'static str>,
    started: Instant,
    metrics: CallMetrics,
    call_timeout: Duration,
    /// When the caller must have its answer (see `transport::gate`).
    deadline: Option<Deadline>,
    emitted: bool,
}

impl Audit {
    pub fn new(rpc: Rpc, identity: Identity, metrics: CallMetrics, call_timeout: Duration) -> Self {
        Self {
            rpc,
            identity,
            secrets: Notes::default(),
            cache_hit: None,
            reason: None,
            started: Instant::now(),
            metrics,
            call_timeout,
            deadline: None,
            emitted: false,
        }
    }

    /// The call's deadline, which upstream waits must end before.
    pub fn with_deadline(mut self, deadline: Option<Deadline>) -> Self {
        self.deadline = deadline;
        self
    }

    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// When the call was admitted.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Notes a secret the call touched (resolved name).
    pub fn secret(&mut self, name: &str) {
        self.push_name(name);
    }

    /// Notes a name the call was refused for before it could be resolved
    /// (a bad name): as the caller sent it, cut (`ShownName`) and quoted,
    /// so that the trail says what was asked.
    pub fn refused_name(&mut self, raw: &str) {
        self.push_name(&refused_shown(raw));
    }

    /// Notes one item of a batch with its own outcome and, for a read that
    /// succeeded, whether the cache answered (`name=OK/hit`), or for one
    /// that did not, its reason (`name=PERMISSION_DENIED/POLICY_DENIED`:
    /// the broker's policy, not AWS's IAM). AWS allows `=`
    /// in a name: such a name is quoted (`"a=b"=OK`), so that a reader
    /// splitting on the last `=` of an unquoted item, or reading a quoted
    /// one, never takes part of the name for the outcome.
    ///
    /// Items that were not served are shown cut in the middle and quoted
    /// (`"arn:aws:secretsmanager:us-…/orders-db-credentials-AbCdEf"`: the
    /// start and the end, which names the secret) once the line's names
    /// pass `WHOLE_NAMES`: a batch of a hundred of the longest names that
    /// do not exist would otherwise write a line of 60 KB, past what
    /// container runtimes keep as one line. What was served is always
    /// shown whole; a name already quoted (one that did not resolve, shown
    /// cut) is shown as it is.
    pub fn batch_item(&mut self, name: &str, outcome: ItemOutcome) {
        let served = matches!(outcome, ItemOutcome::Served { .. });
        let whole = served || self.secrets.as_str().len() + name.len() <= WHOLE_NAMES;
        if name.starts_with('"') {
            self.push_name(name);
        } else if !whole {
            self.push_name(&cut_in_the_middle(name));
        } else if name.contains(['=', ' ']) {
            self.push_name(&format!("{name:?}"));
        } else {
            self.push_name(name);
        }
        self.secrets.push("=");
        match outcome {
            ItemOutcome::Served { hit } => {
                self.secrets.push(code_name(Code::Ok));
                self.secrets.push(if hit { "/hit" } else { "/miss" });
            }
            ItemOutcome::Refused { code, reason } => {
                self.secrets.push(code_name(code));
                self.secrets.push("/");
                self.secrets.push(reason);
            }
        }
    }

    fn push_name(&mut self, name: &str) {
        if !self.secrets.as_str().is_empty() {
            self.secrets.push(" ");
        }
        self.secrets.push(name);
    }

    pub fn cache_hit(&mut self, hit: bool) {
        self.cache_hit = Some(hit);
    }

    pub fn finish(mut self, outcome: Code) {
        self.emit(outcome);
    }

    /// `finish` for a call the broker refused, with its `ErrorInfo` reason.
    pub fn refused(mut self, outcome: Code, reason: &'static str) {
        self.reason = Some(reason);
        self.emit(outcome);
    }

    fn emit(&mut self, outcome: Code) {
        self.emitted = true;
        let code = code_name(outcome);
        self.metrics
            .record_call(self.rpc, outcome, code, self.started.elapsed());
        if outcome == Code::Ok && self.cache_hit.is_some() {
            self.metrics.record_secret_read(self.secrets.as_str());
        }
        crate::telemetry::audit::record(&AuditRecord {
            identity: self.identity.shown(),
            rpc: self.rpc.name(),
            secrets: self.secrets.as_str(),
            outcome: code,
            reason: self.reason,
            cache_hit: self.cache_hit,
        });
    }
}

/// How one item of a batch ended (`Audit::batch_item`).
#[derive(Debug, Clone, Copy)]
pub enum ItemOutcome {
    /// Read, from the cache or not.
    Served { hit: bool },
    /// Not read: its code and `ErrorInfo` reason, as the item's
    /// `SecretError` gives them.
    Refused { code: Code, reason: &'static str },
}

impl ItemOutcome {
    pub fn refused(error: &ApiError) -> Self {
        Self::Refused {
            code: error.code(),
            reason: error.reason(),
        }
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        if !self.emitted {
            // The gate's timer for the call timeout started a moment
            // before this record did: the call's deadline, set with that
            // timer, tells a call it cut from one its caller gave up.
            let now = Instant::now();
            let past = |callers: bool| {
                self.deadline
                    .is_some_and(|deadline| deadline.callers == callers && now >= deadline.at)
            };
            let outcome = if past(false) || self.started.elapsed() >= self.call_timeout {
                // The gate answered it CALL_TIMEOUT, and says so here.
                self.reason = Some(ApiError::CallTimeout(self.call_timeout).reason());
                Code::DeadlineExceeded
            } else if past(true) {
                // The caller's own deadline: it gave up, nobody answered.
                Code::DeadlineExceeded
            } else {
                Code::Cancelled
            };
            self.emit(outcome);
        }
    }
}

/// The bytes of names past which a batch's items that were not served are
/// shown cut (`Audit::batch_item`): a hundred names of 80 characters fit.
const WHOLE_NAMES: usize = 8192;

/// `name` quoted, its middle cut when it is longer than 80 characters: its
/// first 24 and last 55 are kept, so that an ARN keeps the secret's name.
fn cut_in_the_middle(name: &str) -> String {
    const HEAD: usize = 24;
    const TAIL: usize = 55;
    let chars = name.chars().count();
    if chars <= HEAD + TAIL + 1 {
        return format!("{name:?}");
    }
    let head: String = name.chars().take(HEAD).collect();
    let tail: String = name.chars().skip(chars - TAIL).collect();
    format!("{:?}", format!("{head}…{tail}"))
}

/// A name that did not resolve, as the audit shows it.
pub fn refused_shown(raw: &str) -> String {
    ShownName(raw).quoted()
}

/// The audit event (and the call's metrics) of a call of SecretsService
/// or AdminService that failed before its handler ran, which no `Audit`
/// saw: refused at the gate (too many calls, its slot taken), or its
/// request could not be read (too large, not valid protobuf or UTF-8, the
/// request memory spent, never sent). `reason`: its `ErrorInfo` reason,
/// when the answer has one.
pub fn refused_before_the_handler(
    rpc: Rpc,
    identity: &Identity,
    outcome: Code,
    reason: Option<&'static str>,
    metrics: &CallMetrics,
) {
    let code = code_name(outcome);
    metrics.record_call(rpc, outcome, code, Duration::ZERO);
    crate::telemetry::audit::record(&AuditRecord {
        identity: identity.shown(),
        rpc: rpc.name(),
        secrets: "",
        outcome: code,
        reason,
        cache_hit: None,
    });
}

/// The audit event of a call of a method the broker's services do not
/// have, named by its path as the log shows it: UNIMPLEMENTED, or the
/// gate's refusal (`outcome`, `reason`) when the connection or the broker
/// was full first. No metric: the caller chooses the path, and labels must
/// stay bounded.
pub fn refused_unknown_method(
    shown_path: &str,
    identity: &Identity,
    outcome: Code,
    reason: &'static str,
) {
    crate::telemetry::audit::record(&AuditRecord {
        identity: identity.shown(),
        rpc: shown_path,
        secrets: "",
        outcome: code_name(outcome),
        reason: Some(reason),
        cache_hit: None,
    });
}

/// The secret names a call touched, as the audit line shows them: held
/// inline up to `INLINE_NOTES` bytes (a call of one secret never
/// allocates), in a `String` past that (batches, long ARNs).
#[derive(Default)]
struct Notes {
    inline: arrayvec::ArrayString<INLINE_NOTES>,
    spilled: String,
}

const INLINE_NOTES: usize = 160;

impl Notes {
    fn push(&mut self, text: &str) {
        if self.spilled.is_empty() && self.inline.try_push_str(text).is_ok() {
            return;
        }
        if self.spilled.is_empty() {
            self.spilled.push_str(&self.inline);
        }
        self.spilled.push_str(text);
    }

    fn as_str(&self) -> &str {
        if self.spilled.is_empty() {
            &self.inline
        } else {
            &self.spilled
        }
    }
}

/// gRPC's names for its codes, as every client library prints them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record of an anonymous caller's BatchGetSecrets.
    fn batch_audit() -> Audit {
        let registry = crate::metrics::Metrics::new();
        Audit::new(
            Rpc::BatchGetSecrets,
            Identity::Anonymous,
            CallMetrics::register(&registry, false),
            Duration::from_secs(30),
        )
    }

    fn refused(code: Code, reason: &'static str) -> ItemOutcome {
        ItemOutcome::Refused { code, reason }
    }

    fn denied() -> ItemOutcome {
        refused(Code::PermissionDenied, "POLICY_DENIED")
    }

    fn invalid() -> ItemOutcome {
        refused(Code::InvalidArgument, "INVALID_SECRET_NAME")
    }

    fn not_found() -> ItemOutcome {
        refused(Code::NotFound, "SECRET_NOT_FOUND")
    }

    #[test]
    fn batch_items_with_an_equals_sign_in_their_name_are_quoted() {
        let mut audit = batch_audit();
        audit.batch_item("insurecove/a=OK/hit", denied());
        audit.batch_item("insurecove/b", ItemOutcome::Served { hit: true });
        audit.batch_item(&refused_shown("bad name"), invalid());
        assert_eq!(
            audit.secrets.as_str(),
            r#""insurecove/a=OK/hit"=PERMISSION_DENIED/POLICY_DENIED insurecove/b=OK/hit "bad name"=INVALID_ARGUMENT/INVALID_SECRET_NAME"#
        );
        audit.finish(Code::Ok);
    }

    #[test]
    fn a_batch_of_long_names_not_served_writes_a_bounded_line() {
        let mut audit = batch_audit();
        let long = |i: usize| format!("insurecove/{}-{i:03}", "x".repeat(497));
        for i in 0..98 {
            audit.batch_item(&long(i), not_found());
        }
        audit.batch_item(&refused_shown("bad name"), invalid());
        audit.batch_item(&long(99), ItemOutcome::Served { hit: true });
        let line = audit.secrets.as_str();
        assert!(line.len() < WHOLE_NAMES + 100 * 100, "{} bytes", line.len());
        // The first names are whole; later ones are cut in the middle and
        // quoted, keeping the end that tells them apart; a refused name is
        // quoted once; what was served is whole wherever it stands.
        let missing = "NOT_FOUND/SECRET_NOT_FOUND";
        assert!(line.starts_with(&format!("{}={missing} {}={missing}", long(0), long(1))));
        let cut = format!("insurecove/xxxxxxxxxxxxx…{}-097", "x".repeat(51));
        assert!(line.contains(&format!(" \"{cut}\"={missing} ")), "{line}");
        assert!(
            line.contains(r#" "bad name"=INVALID_ARGUMENT/INVALID_SECRET_NAME "#),
            "{line}"
        );
        assert!(line.ends_with(&format!(" {}=OK/hit", long(99))), "{line}");
        audit.finish(Code::Ok);
    }

    #[test]
    fn a_call_dropped_before_its_answer_is_recorded_as_cancelled() {
        let registry = crate::metrics::Metrics::new();
        let metrics = CallMetrics::register(&registry, false);
        let audit = || {
            Audit::new(
                Rpc::GetSecret,
                Identity::Anonymous,
                metrics.clone(),
                Duration::from_secs(30),
            )
        };
        audit().finish(Code::Ok);
        drop(audit());
        let timed_out = Audit::new(
            Rpc::GetSecret,
            Identity::Anonymous,
            metrics.clone(),
            Duration::ZERO,
        );
        drop(timed_out);
        let text = registry.encode();
        let line = |code: &str| {
            format!("secretsbroker_calls_total{{rpc=\"GetSecret\",code=\"{code}\"}} 1")
        };
        assert!(text.contains(&line("OK")), "{text}");
        assert!(text.contains(&line("CANCELLED")), "{text}");
        assert!(text.contains(&line("DEADLINE_EXCEEDED")), "{text}");
    }
}
