//! What an SQS message of the event path says: a change to a secret, or
//! something to drop.
//!
//! A body is either an EventBridge event (the rule's target is the queue)
//! or an SNS envelope whose `Message` is one (EventBridge → SNS → SQS, raw
//! delivery off). Two kinds of event matter:
//! - `Secret Label Updated`: a staging label moved; `detail.name` (or the
//!   ARN in `resources`), `detail.labelUpdated`, `detail.versionId`;
//! - `AWS API Call via CloudTrail` from `secretsmanager.amazonaws.com`
//!   whose `eventName` changes a secret (`CHANGING_CALLS`); the secret is
//!   `requestParameters.secretId`: a name, an ARN or a partial ARN.
//!
//! Nothing here ever follows a URL found in a message (SNS's
//! `SubscribeURL`, `SigningCertURL`): the broker subscribes its own queue
//! through the API. Messages carry no values, and nothing of a message
//! but the names it gives is kept.

use std::time::SystemTime;

use serde_json::Value;

use crate::names;

/// CloudTrail calls after which a secret's versions, stages or state may
/// differ. Reads, tags and policies are not among them.
const CHANGING_CALLS: &[&str] = &[
    "PutSecretValue",
    "UpdateSecret",
    "UpdateSecretVersionStage",
    "RotateSecret",
    "DeleteSecret",
    "RestoreSecret",
    "CreateSecret",
];

const SECRETS_MANAGER: &str = "aws.secretsmanager";
const LABEL_UPDATED: &str = "Secret Label Updated";
const CLOUDTRAIL_CALL: &str = "AWS API Call via CloudTrail";

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Message {
    /// A secret changed: re-read it.
    Change(Change),
    /// Well formed, but nothing for the broker (what it is, for the log).
    Foreign(&'static str),
}

/// A change to one secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Change {
    /// The event's id, to drop a second delivery of the same event.
    pub(super) event_id: String,
    /// The secret's name; with a partial ARN whose end looks like AWS's
    /// suffix, both readings of it (the one that is not cached costs
    /// nothing).
    pub(super) names: Vec<String>,
    /// The secret's complete ARN, when the event gave one (a label event's
    /// `resources`): the version a label moved to, held under another ARN,
    /// is another secret's, created again under the name.
    pub(super) arn: Option<String>,
    /// The stage and version the event says a label moved to.
    pub(super) moved_to: Option<(String, String)>,
    /// When the change happened, for the lag figures.
    pub(super) time: Option<SystemTime>,
    /// `Secret Label Updated` or the CloudTrail call's name, for the log.
    pub(super) kind: String,
}

/// Why a message could not be read; carries nothing of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Malformed {
    #[error("the body is not JSON")]
    NotJson,
    #[error("the body is not an EventBridge event or an SNS envelope of one")]
    NotAnEvent,
    #[error("the event names no secret, or not a valid secret name or ARN")]
    NoSecret,
}

/// Reads one message body.
pub(super) fn parse(body: &str) -> Result<Message, Malformed> {
    let value: Value = serde_json::from_str(body).map_err(|_| Malformed::NotJson)?;
    let envelope_id = text(&value, "MessageId").map(str::to_owned);
    let event = match text(&value, "Type") {
        Some("Notification") => {
            let inner = text(&value, "Message").ok_or(Malformed::NotAnEvent)?;
            serde_json::from_str(inner).map_err(|_| Malformed::NotJson)?
        }
        Some(_) => return Ok(Message::Foreign("an SNS message other than a notification")),
        None => value,
    };
    read_event(&event, envelope_id.as_deref())
}

fn read_event(event: &Value, envelope_id: Option<&str>) -> Result<Message, Malformed> {
    let (Some(source), Some(kind), Some(detail)) = (
        text(event, "source"),
        text(event, "detail-type"),
        event.get("detail").filter(|d| d.is_object()),
    ) else {
        return Err(Malformed::NotAnEvent);
    };
    if source != SECRETS_MANAGER {
        return Ok(Message::Foreign("an event of another source"));
    }
    let event_id = text(event, "id").or(envelope_id).unwrap_or_default();
    let time = text(event, "time").and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    let (ids, arn, moved_to, kind) = match kind {
        LABEL_UPDATED => label_update(event, detail),
        CLOUDTRAIL_CALL => match cloudtrail_call(detail) {
            Some(call) => call,
            None => {
                return Ok(Message::Foreign(
                    "a Secrets Manager call that changes no secret",
                ));
            }
        },
        _ => return Ok(Message::Foreign("a Secrets Manager event of another kind")),
    };
    let names = secret_names(&ids);
    if names.is_empty() {
        return Err(Malformed::NoSecret);
    }
    Ok(Message::Change(Change {
        event_id: event_id.to_owned(),
        names,
        arn: arn.map(str::to_owned),
        moved_to,
        time,
        kind,
    }))
}

/// The ids an event names, the secret's complete ARN, where a label moved
/// and the event's kind.
type Read<'a> = (
    Vec<&'a str>,
    Option<&'a str>,
    Option<(String, String)>,
    String,
);

fn label_update<'a>(event: &'a Value, detail: &'a Value) -> Read<'a> {
    let resources: Vec<&str> = event
        .get("resources")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // Only a label event's resources are complete ARNs for sure: a
    // CloudTrail call's `secretId` may be a partial ARN of a name that
    // ends like AWS's suffix (`app/jwt-signer`), which would read as
    // another secret's ARN and never match the version held.
    let arn = resources
        .iter()
        .copied()
        .find(|id| names::is_one_secret(id));
    let mut ids: Vec<&str> = text(detail, "name").into_iter().collect();
    ids.extend(resources);
    let moved_to = text(detail, "labelUpdated")
        .zip(text(detail, "versionId"))
        .map(|(stage, version)| (stage.to_owned(), version.to_owned()));
    (ids, arn, moved_to, LABEL_UPDATED.to_owned())
}

/// `None` for a call that changes nothing or failed.
fn cloudtrail_call(detail: &Value) -> Option<Read<'_>> {
    let call = text(detail, "eventName")?;
    let changing = text(detail, "eventSource") == Some("secretsmanager.amazonaws.com")
        && CHANGING_CALLS.contains(&call)
        && detail.get("errorCode").is_none_or(Value::is_null);
    if !changing {
        return None;
    }
    let request = detail.get("requestParameters");
    let id = request
        .and_then(|r| text(r, "secretId"))
        .or_else(|| request.and_then(|r| text(r, "name")));
    // PutSecretValue answers with the version it made, and moved the
    // stages it was asked for to it: AWSCURRENT unless it named others (a
    // rotation's first step names AWSPENDING; read as AWSCURRENT, the
    // hint would never show, and the secret would be read five times).
    let moved_to = (call == "PutSecretValue")
        .then(|| {
            detail
                .get("responseElements")
                .and_then(|r| text(r, "versionId"))
        })
        .flatten()
        .map(|version| (put_stage(request).to_owned(), version.to_owned()));
    Some((id.into_iter().collect(), None, moved_to, call.to_owned()))
}

/// The stage a PutSecretValue call moved: AWSCURRENT, unless its
/// `versionStages` name others (then the first of them).
fn put_stage(request: Option<&Value>) -> &str {
    let stages: Vec<&str> = request
        .and_then(|r| r.get("versionStages"))
        .and_then(Value::as_array)
        .map(|stages| stages.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match stages.first() {
        Some(first) if !stages.contains(&"AWSCURRENT") => first,
        _ => "AWSCURRENT",
    }
}

/// The secret names the ids stand for, deduplicated; invalid ids are
/// dropped. A partial ARN (without AWS's suffix) of a name that ends like
/// one reads two ways, and both are kept.
fn secret_names(ids: &[&str]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut keep = |name: &str| {
        if names::is_valid_name(name) && !found.iter().any(|f| f == name) {
            found.push(name.to_owned());
        }
    };
    for id in ids {
        if id.starts_with("arn:") {
            if let Ok(arn) = names::SecretArn::parse(id) {
                keep(arn.name);
                if let Some(suffix) = arn.suffix {
                    keep(&format!("{}{suffix}", arn.name));
                }
            }
        } else {
            keep(id);
        }
    }
    found
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/db-AbC123";

    fn label_event() -> String {
        serde_json::json!({
            "version": "0",
            "id": "e-1",
            "source": "aws.secretsmanager",
            "detail-type": "Secret Label Updated",
            "time": "2026-11-30T12:00:00Z",
            "resources": [ARN],
            "detail": {"name": "insurecove/db", "labelUpdated": "AWSCURRENT", "versionId": "v2"}
        })
        .to_string()
    }

    fn cloudtrail(call: &str, secret_id: &str) -> String {
        serde_json::json!({
            "id": "e-2",
            "source": "aws.secretsmanager",
            "detail-type": "AWS API Call via CloudTrail",
            "detail": {
                "eventSource": "secretsmanager.amazonaws.com",
                "eventName": call,
                "requestParameters": {"secretId": secret_id}
            }
        })
        .to_string()
    }

    fn change(body: &str) -> Change {
        match parse(body) {
            Ok(Message::Change(change)) => change,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn a_label_update_names_the_secret_and_where_the_label_went() {
        let change = change(&label_event());
        assert_eq!(change.event_id, "e-1");
        assert_eq!(change.names, vec!["insurecove/db", "insurecove/db-AbC123"]);
        assert_eq!(
            change.arn.as_deref(),
            Some(ARN),
            "the secret's ARN, for the hint"
        );
        assert_eq!(change.moved_to, Some(("AWSCURRENT".into(), "v2".into())));
        assert!(change.time.is_some());
    }

    #[test]
    fn a_character_of_several_bytes_in_an_arn_is_dropped_not_a_panic() {
        let poisoned = label_event().replace(
            ARN,
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:€23456",
        );
        let change = change(&poisoned);
        assert_eq!(
            change.names,
            vec!["insurecove/db"],
            "the name in detail stays"
        );
        assert_eq!(change.arn, None);
        let alone = cloudtrail(
            "PutSecretValue",
            "arn:aws:secretsmanager:us-east-1:123456789012:secret:ab€456",
        );
        assert_eq!(parse(&alone), Err(Malformed::NoSecret));
    }

    #[test]
    fn an_sns_envelope_is_opened() {
        let envelope = serde_json::json!({
            "Type": "Notification",
            "MessageId": "m-1",
            "Message": label_event(),
            "SubscribeURL": "http://169.254.169.254/never-fetched",
        })
        .to_string();
        assert_eq!(change(&envelope).names[0], "insurecove/db");
    }

    #[test]
    fn cloudtrail_calls_by_name_arn_and_partial_arn() {
        let by_name = change(&cloudtrail("DeleteSecret", "insurecove/db"));
        assert_eq!(by_name.names, vec!["insurecove/db"]);
        assert_eq!(by_name.kind, "DeleteSecret");
        let by_arn = change(&cloudtrail("RestoreSecret", ARN));
        assert!(by_arn.names.contains(&"insurecove/db".to_owned()));
        let partial = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/api";
        assert_eq!(
            change(&cloudtrail("PutSecretValue", partial)).names,
            vec!["insurecove/api"]
        );
        // A partial ARN whose name ends like AWS's suffix is not taken for
        // the secret's complete ARN (the hint would never match).
        let like_suffixed = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:app/jwt-signer";
        assert_eq!(
            change(&cloudtrail("PutSecretValue", like_suffixed)).arn,
            None
        );
        assert_eq!(change(&cloudtrail("RestoreSecret", ARN)).arn, None);
    }

    /// A rotation's first step puts the new value under AWSPENDING: the
    /// hint names that stage, not AWSCURRENT.
    #[test]
    fn a_put_secret_value_hints_the_stages_it_moved() {
        let put = |stages: serde_json::Value| {
            let body = serde_json::json!({
                "id": "e-3",
                "source": "aws.secretsmanager",
                "detail-type": "AWS API Call via CloudTrail",
                "detail": {
                    "eventSource": "secretsmanager.amazonaws.com",
                    "eventName": "PutSecretValue",
                    "requestParameters": {"secretId": "insurecove/db", "versionStages": stages},
                    "responseElements": {"versionId": "v2"}
                }
            });
            change(&body.to_string()).moved_to
        };
        let hint = |stage: &str| Some((stage.to_owned(), "v2".to_owned()));
        assert_eq!(put(serde_json::json!(["AWSPENDING"])), hint("AWSPENDING"));
        assert_eq!(
            put(serde_json::json!(["x", "AWSCURRENT"])),
            hint("AWSCURRENT")
        );
        assert_eq!(put(serde_json::json!([])), hint("AWSCURRENT"));
        assert_eq!(put(serde_json::Value::Null), hint("AWSCURRENT"));
    }

    #[test]
    fn foreign_and_idle_messages_are_dropped() {
        let foreign = label_event().replace("aws.secretsmanager", "aws.s3");
        assert_eq!(
            parse(&foreign),
            Ok(Message::Foreign("an event of another source"))
        );
        assert!(matches!(
            parse(&cloudtrail("GetSecretValue", "insurecove/db")),
            Ok(Message::Foreign(_))
        ));
        let confirmation = r#"{"Type":"SubscriptionConfirmation","SubscribeURL":"http://x"}"#;
        assert!(matches!(parse(confirmation), Ok(Message::Foreign(_))));
    }

    #[test]
    fn malformed_messages_say_why_without_their_content() {
        assert_eq!(parse("hunter2 {"), Err(Malformed::NotJson));
        assert_eq!(parse("[1,2]"), Err(Malformed::NotAnEvent));
        assert_eq!(
            parse(&cloudtrail("PutSecretValue", "bad name with spaces")),
            Err(Malformed::NoSecret)
        );
        let smuggled = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:a:b";
        assert_eq!(
            parse(&cloudtrail("PutSecretValue", smuggled)),
            Err(Malformed::NoSecret)
        );
        let message = Malformed::NotJson.to_string();
        assert!(!message.contains("hunter2"));
    }
}
