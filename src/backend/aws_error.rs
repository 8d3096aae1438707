//! AWS SDK failures, told to people: what went wrong, in one short line,
//! and what to do about it.
//!
//! The SDK's own error is a deep chain (dispatch failure → connector error
//! → credentials provider chain → ...), whose Debug form runs to a thousand
//! characters. Every failure of the AWS backend passes here once and comes
//! out as a `StoreError` whose message names the cause (no credentials, and
//! which sources were tried; credentials rejected; access denied, with the
//! action and the secret; endpoint or proxy unreachable; region unknown;
//! throttled; timed out) and the fix (AWS_PROFILE or the access keys, the
//! role's policy in `deploy/iam-policy.json`, HTTPS_PROXY/NO_PROXY, `--dev`
//! to try without AWS). That message is what `check` prints, what the log
//! says, what `CheckUpstream.detail` and callers' UNAVAILABLE /
//! PERMISSION_DENIED messages carry. The whole chain stays available at
//! DEBUG. AWS's messages name rules and resources, never secret values or
//! credentials; the broker quotes none of them to callers anyway.

use std::{
    collections::HashMap,
    error::Error as StdError,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use aws_config::meta::ProviderChainError;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_secretsmanager::{
    config::http::HttpResponse,
    error::{ProvideErrorMetadata, SdkError},
};
use hyper_util::client::proxy::matcher::Matcher;

use super::StoreError;

/// Where the broker's AWS calls go, for messages that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The region the calls are for.
    pub region: String,
    /// The endpoint URL (`AWS_ENDPOINT_URL`, or AWS's own for the region),
    /// as messages show it: without a user and password it may carry,
    /// since every caller of an unreadable secret gets these messages.
    pub endpoint: String,
    /// Whether the endpoint is an http(s) URL with a host.
    pub endpoint_is_url: bool,
    /// The variable that set the endpoint (`AWS_ENDPOINT_URL_SQS`,
    /// `AWS_ENDPOINT_URL`...), if one did.
    pub endpoint_var: Option<&'static str>,
    /// The proxy the calls go through, and the variable that set it.
    pub proxy: Option<(String, &'static str)>,
    /// What the environment says about credentials that were not found:
    /// half an access key, or a profile name.
    pub credentials_hint: Option<String>,
    /// The role-based source the environment sets up (IRSA's token file,
    /// the container credentials of EKS Pod Identity or ECS), named in
    /// messages when loading fails: telling a service that runs under a
    /// role to "use an IAM role" helps nobody.
    pub role_source: Option<String>,
}

/// An AWS service the broker calls: its endpoint variable and host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The secrets.
    SecretsManager,
    /// The event queue.
    Sqs,
    /// The events topic (topic mode).
    Sns,
}

impl Service {
    /// Every service the broker calls.
    pub const ALL: [Self; 3] = [Self::SecretsManager, Self::Sqs, Self::Sns];

    /// The variable that names its endpoint.
    pub fn endpoint_var(self) -> &'static str {
        match self {
            Self::SecretsManager => "AWS_ENDPOINT_URL_SECRETS_MANAGER",
            Self::Sqs => "AWS_ENDPOINT_URL_SQS",
            Self::Sns => "AWS_ENDPOINT_URL_SNS",
        }
    }

    fn host(self) -> &'static str {
        match self {
            Self::SecretsManager => "secretsmanager",
            Self::Sqs => "sqs",
            Self::Sns => "sns",
        }
    }
}

impl Upstream {
    /// Secrets Manager's, from the environment, as the SDK and its HTTP
    /// client read it.
    pub fn from_env(region: &str, env: &dyn Fn(&str) -> Option<String>) -> Self {
        Self::of(Service::SecretsManager, region, env)
    }

    /// `service`'s, from the environment.
    pub fn of(service: Service, region: &str, env: &dyn Fn(&str) -> Option<String>) -> Self {
        let custom = [service.endpoint_var(), "AWS_ENDPOINT_URL"]
            .into_iter()
            .find_map(|var| env(var).filter(|v| !v.trim().is_empty()).map(|v| (var, v)));
        let endpoint_var = custom.as_ref().map(|(var, _)| *var);
        let endpoint = custom
            .map(|(_, endpoint)| endpoint)
            .unwrap_or_else(|| format!("https://{}.{region}.amazonaws.com", service.host()));
        let proxy = proxy_for(&endpoint, env);
        let endpoint_is_url = url::Url::parse(&endpoint)
            .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
        Self {
            region: region.to_owned(),
            endpoint: shown_url(&endpoint),
            endpoint_is_url,
            endpoint_var,
            credentials_hint: credentials_hint(env),
            role_source: role_source(env),
            proxy,
        }
    }

    /// An answer without a part AWS always sends (`missing`): not a
    /// refusal of the secret, an endpoint that does not answer as AWS.
    pub fn incomplete_answer(&self, action: &str, secret: &str, missing: &str) -> StoreError {
        StoreError::Unavailable {
            detail: format!(
                "AWS at {}{} answered {action} for {secret} without {missing}, which AWS always \
                 sends (a proxy or a broken endpoint in between?); it is retried",
                self.endpoint,
                self.via()
            ),
        }
    }

    fn via(&self) -> String {
        match &self.proxy {
            Some((proxy, var)) => format!(" through the proxy {proxy} ({var})"),
            None => String::new(),
        }
    }
}

/// Why the credentials the environment names may not have been found.
fn credentials_hint(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set = |var: &str| env(var).filter(|v| !v.is_empty());
    match (
        set("AWS_ACCESS_KEY_ID"),
        set("AWS_SECRET_ACCESS_KEY"),
        set("AWS_PROFILE"),
    ) {
        (Some(_), None, _) => {
            Some("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both".into())
        }
        (None, Some(_), _) => {
            Some("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both".into())
        }
        (_, _, Some(profile)) => Some(format!(
            "AWS_PROFILE={profile:?} names no profile with credentials in ~/.aws/config or \
             ~/.aws/credentials (or AWS_CONFIG_FILE, AWS_SHARED_CREDENTIALS_FILE)"
        )),
        _ => None,
    }
}

/// The role-based credentials source the environment sets up, if any.
fn role_source(env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let set = |var: &str| env(var).filter(|v| !v.is_empty());
    if let Some(file) = set("AWS_WEB_IDENTITY_TOKEN_FILE") {
        return Some(format!(
            "web identity (IRSA: AWS_WEB_IDENTITY_TOKEN_FILE={file:?}, AWS_ROLE_ARN); check that \
             the token file is mounted and the role trusts the service account"
        ));
    }
    [
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ]
    .iter()
    .find_map(|var| set(var).map(|uri| (var, uri)))
    // The variable, not its URI: a full URI may carry a user or token.
    .map(|(var, _)| {
        format!(
            "container credentials (EKS Pod Identity or ECS: {var}); check that the agent \
             runs and an association gives this service account a role"
        )
    })
}

/// The SDK's own words for a credentials failure (a token file missing,
/// instance metadata refusing), one line and cut short: with a role, the
/// fix depends on them. Only used when a role's source is set up, and
/// never words that carry a process's output: a `credential_process`
/// failure quotes the process's stderr, which may hold a token.
fn credentials_cause(error: &CredentialsError) -> Option<String> {
    let mut said: Vec<String> = Vec::new();
    let mut current = error.source();
    while let Some(cause) = current {
        let text = cause.to_string();
        if !said.iter().any(|earlier| earlier.contains(&text)) {
            said.push(text);
        }
        current = cause.source();
    }
    let joined = said.join(": ");
    let lower = joined.to_ascii_lowercase();
    // A profile file's parse error may point into the credentials file;
    // an invalid container credentials URI is quoted whole (a user or a
    // token in it included).
    if ["stderr", "process", "profile", "://", "uri"]
        .iter()
        .any(|word| lower.contains(word))
    {
        return None;
    }
    let line: String = joined
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    (!line.trim().is_empty()).then_some(line)
}

/// The proxy a request to `endpoint` goes through, and the variable that
/// named it: decided by the matcher the SDK's HTTP client routes with (the
/// same variables, NO_PROXY rules and CGI exception), so that a message
/// never names a proxy the request did not take, nor leaves out one it did.
fn proxy_for(
    endpoint: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, &'static str)> {
    // As the matcher reads the environment: the first of the two names
    // that is set, even to nothing.
    let first = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|name| env(name).map(|value| (value, name)))
    };
    // A CGI program's HTTP_PROXY may come from a request's `Proxy:` header.
    if env("REQUEST_METHOD").is_some() {
        return None;
    }
    let all = first(["ALL_PROXY", "all_proxy"]);
    let http = first(["HTTP_PROXY", "http_proxy"]);
    let https = first(["HTTPS_PROXY", "https_proxy"]);
    let mut rules = Matcher::builder();
    if let Some((value, _)) = &all {
        rules = rules.all(value.clone());
    }
    if let Some((value, _)) = &http {
        rules = rules.http(value.clone());
    }
    if let Some((value, _)) = &https {
        rules = rules.https(value.clone());
    }
    if let Some((no_proxy, _)) = first(["NO_PROXY", "no_proxy"]) {
        rules = rules.no(no_proxy);
    }
    let uri: http::Uri = endpoint.parse().ok()?;
    rules.build().intercept(&uri)?;
    // The scheme's own variable when the matcher takes it as a proxy, else
    // ALL_PROXY.
    let own = if uri.scheme_str() == Some("https") {
        https
    } else {
        http
    };
    let taken = |value: &str| {
        Matcher::builder()
            .all(value.to_owned())
            .build()
            .intercept(&uri)
            .is_some()
    };
    [own, all]
        .into_iter()
        .flatten()
        .find(|(value, _)| taken(value))
        .map(|(value, name)| (shown_url(&value), name))
}

/// A proxy's or an endpoint's URL as messages and logs show it: without
/// the user and password it may carry (`http://user:pass@proxy:3128`).
fn shown_url(proxy: &str) -> String {
    let Some((_, host)) = proxy.rsplit_once('@') else {
        return proxy.to_owned();
    };
    match url::Url::parse(proxy) {
        Ok(mut url)
            if url.has_host() && (!url.username().is_empty() || url.password().is_some()) =>
        {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            format!("{url} (its user and password left out)")
        }
        // Not a URL whose user part holds it all (`user:pass@host:port`
        // parses as a scheme and a path, a password with a `/` cuts the
        // user part short): whatever precedes the last `@` may be
        // credentials.
        _ => format!("{host} (what preceded @ left out)"),
    }
}

/// The failed call's causes, each by its `Display`, for the DEBUG line.
///
/// Not the SDK's `DisplayErrorContext`: it ends with the error's `Debug`,
/// which holds the raw HTTP answer, body included, and for a GetSecretValue
/// whose answer the SDK could not read that body is the secret. Such an
/// answer is not followed into its causes either: a parser's message may
/// quote the bytes it stopped at.
fn causes<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: StdError + 'static,
{
    if let SdkError::ResponseError(response) = error {
        return format!(
            "response error: an HTTP {} answer the SDK could not read",
            response.raw().status().as_u16()
        );
    }
    // The SDK reports a success answer it could not parse as a service
    // error whose causes are the parser's words about the body.
    if let SdkError::ServiceError(service) = error
        && service.raw().status().is_success()
    {
        return format!(
            "service error: an HTTP {} answer the SDK could not read",
            service.raw().status().as_u16()
        );
    }
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

/// Turns a failed SDK call (`action` on `secret`) into the broker's error.
pub fn explain<E>(
    error: &SdkError<E, HttpResponse>,
    action: &'static str,
    secret: &str,
    upstream: &Upstream,
) -> StoreError
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    tracing::debug!(action, secret, error = %causes(error), "AWS call failed");
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            explain_code(
                Answer {
                    code: err.code().unwrap_or_default(),
                    message: err.message().unwrap_or_default(),
                    status: service.raw().status().as_u16(),
                },
                action,
                secret,
            )
        }
        // An answer that is not AWS's error format (a proxy's or load
        // balancer's page): it says nothing about the secret.
        SdkError::ResponseError(response) => StoreError::Unavailable {
            detail: format!(
                "AWS at {}{} answered HTTP {} in a form that is not AWS's (a proxy or load \
                 balancer in between?); it is retried",
                upstream.endpoint,
                upstream.via(),
                response.raw().status().as_u16()
            ),
        },
        SdkError::TimeoutError(_) => StoreError::Unavailable {
            detail: format!(
                "AWS did not answer in time at {}{}; check what answers there \
                 (AWS_ENDPOINT_URL, a proxy, a firewall that drops packets); it is retried",
                upstream.endpoint,
                upstream.via()
            ),
        },
        SdkError::DispatchFailure(failure) if failure.is_timeout() => StoreError::Unavailable {
            detail: format!(
                "connecting to AWS at {}{} timed out; check the network{}",
                upstream.endpoint,
                upstream.via(),
                proxy_hint(upstream)
            ),
        },
        _ => explain_chain(error, upstream),
    }
}

/// A failed SQS or SNS call (`action`), in one line: AWS's code and status
/// and the first words of its message (they name queues and topics, never
/// a secret's value), or why AWS could not be reached, with what to check.
pub fn explain_call<E>(
    error: &SdkError<E, HttpResponse>,
    service: Service,
    action: &'static str,
    upstream: &Upstream,
) -> String
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    const MAX_MESSAGE: usize = 160;
    tracing::debug!(action, error = %causes(error), "AWS call failed");
    let permission = format!("{}:{action}", service.host());
    match error {
        SdkError::ServiceError(answer) => {
            let err = answer.err();
            let code = err.code().unwrap_or("no error code");
            let message: String = err
                .message()
                .unwrap_or_default()
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_MESSAGE)
                .collect();
            let status = answer.raw().status().as_u16();
            let check = if code.contains("AccessDenied") || code.contains("AuthorizationError") {
                format!("; check that the broker's role allows {permission}")
            } else if code.contains("NonExistent") || code.contains("NotFound") {
                "; check --events-queue-url or --events-topic-arn, and the region".to_owned()
            } else {
                String::new()
            };
            format!("AWS answered {code} (HTTP {status}): {message}{check}")
        }
        _ => match explain(error, action, "", upstream) {
            StoreError::Unavailable { detail } => detail,
            other => other.to_string(),
        },
    }
}

/// Dispatch and response failures: credentials, connections, names.
fn explain_chain(error: &(dyn StdError + 'static), upstream: &Upstream) -> StoreError {
    if let Some(credentials) = find::<CredentialsError>(error) {
        // The SDK reports a profile's failure once; later loads say only
        // that its error was "already taken": the hint still applies.
        let again = chain_text(error).contains("already taken");
        let detail = match (&upstream.credentials_hint, credentials) {
            (Some(hint), CredentialsError::CredentialsNotLoaded(_)) => {
                format!("no AWS credentials found: {hint}")
            }
            (Some(hint), _) if again => format!("no AWS credentials found: {hint}"),
            _ => explain_credentials(credentials, upstream.role_source.as_deref()),
        };
        return StoreError::Unavailable { detail };
    }
    let chain = chain_text(error);
    let detail = if let (Some(var), false) = (upstream.endpoint_var, upstream.endpoint_is_url) {
        format!(
            "the AWS endpoint {:?} is not a URL (such as http://127.0.0.1:5000): check {var}",
            upstream.endpoint
        )
    } else if chain.contains("dns error") || chain.contains("failed to lookup address") {
        if let Some(var) = upstream.endpoint_var {
            format!(
                "the AWS endpoint {} does not resolve{}: check {var}",
                upstream.endpoint,
                upstream.via()
            )
        } else if looks_like_a_region(&upstream.region) {
            format!(
                "{} does not resolve{}: check DNS and the network (or HTTPS_PROXY), and that \
                 region {:?} exists",
                upstream.endpoint,
                upstream.via(),
                upstream.region
            )
        } else {
            format!(
                "region {:?} looks unknown: {} does not resolve{}; check AWS_DEFAULT_REGION or --region",
                upstream.region,
                upstream.endpoint,
                upstream.via()
            )
        }
    } else if upstream.endpoint_var.is_none() && !looks_like_a_region(&upstream.region) {
        // A name such as `us_east_1` makes a host name no connection can
        // be made to, before any DNS answer.
        format!(
            "region {:?} looks unknown: {} cannot be reached{}; check AWS_DEFAULT_REGION or --region",
            upstream.region,
            upstream.endpoint,
            upstream.via()
        )
    } else if let Some((proxy, var)) = &upstream.proxy {
        format!(
            "cannot reach AWS at {} through the proxy {proxy} ({var}): {}; check {var} and NO_PROXY",
            upstream.endpoint,
            io_reason(&chain)
        )
    } else {
        format!(
            "cannot reach AWS at {}: {}{}",
            upstream.endpoint,
            io_reason(&chain),
            match upstream.endpoint_var {
                Some(var) => format!("; check {var}"),
                None => "; check the network, or HTTPS_PROXY if AWS is reached through a proxy"
                    .to_owned(),
            }
        )
    };
    StoreError::Unavailable { detail }
}

/// AWS's form of a region name: `us-east-1`, `ap-southeast-2`,
/// `us-gov-west-1`. A name of that form that does not resolve is more
/// likely a network or DNS problem than a wrong region.
fn looks_like_a_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    // Two letters in most partitions; four in some (`eusc-de-east-1`).
    parts.len() >= 3
        && (2..=4).contains(&parts[0].len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
}

fn proxy_hint(upstream: &Upstream) -> &'static str {
    match upstream.proxy {
        Some(_) => " and the proxy (HTTPS_PROXY, NO_PROXY)",
        None => " (or HTTPS_PROXY if AWS is reached through a proxy)",
    }
}

/// The few words that say why a connection failed.
fn io_reason(chain: &str) -> &'static str {
    if chain.contains("proxy authorization required") {
        "the proxy asked for authentication (HTTP 407): give its user and password in the \
         proxy URL (http://user:password@host:port)"
    } else if chain.contains("tunnel error") && chain.contains("underlying connection") {
        // No connection to the proxy itself: the tunnel was never asked for.
        match connection_failure(chain) {
            "connection refused" => {
                "the proxy is not reachable (connection refused): is it \
                                     running at that address?"
            }
            "TLS failed" => "the TLS connection to the proxy failed",
            "timed out" => "the proxy did not answer in time",
            _ => "the proxy is not reachable",
        }
    } else if chain.contains("tunnel error") {
        "the proxy refused to open a tunnel to AWS (CONNECT not answered 200): check that it \
         lets this host reach AWS's endpoint"
    } else {
        connection_failure(chain)
    }
}

/// Why a connection failed, from the words of the error chain.
fn connection_failure(chain: &str) -> &'static str {
    if chain.contains("refused") {
        "connection refused"
    } else if chain.contains("reset") {
        "connection reset"
    } else if chain.contains("certificate") || chain.contains("tls") {
        "TLS failed"
    } else if chain.contains("timed out") || chain.contains("timeout") {
        "timed out"
    } else {
        "the connection failed"
    }
}

fn explain_credentials(error: &CredentialsError, role_source: Option<&str>) -> String {
    if let Some(source) = role_source {
        let cause = credentials_cause(error).unwrap_or_else(|| error.to_string());
        return format!("AWS credentials could not be loaded from {source}: {cause}");
    }
    // Short: with the log line's own fields, under 300 characters.
    let fix = "set AWS_PROFILE or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use an IAM \
               role (--dev needs none)";
    match find::<ProviderChainError<CredentialsError>>(error) {
        Some(chain) if !chain.attempts().is_empty() => {
            let tried: Vec<&str> = chain.attempts().iter().map(|a| a.name()).collect();
            format!(
                "no AWS credentials found (tried: {}): {fix}",
                tried.join(", ")
            )
        }
        _ => match error {
            CredentialsError::CredentialsNotLoaded(_) => {
                format!("no AWS credentials found: {fix}")
            }
            CredentialsError::ProviderTimedOut(_) => format!(
                "loading AWS credentials timed out (instance metadata or a credentials process \
                 did not answer): {fix}"
            ),
            // Instance metadata's own words (refused, no role attached)
            // say what to fix on the instance.
            _ => match credentials_cause(error).filter(|c| c.to_ascii_lowercase().contains("imds"))
            {
                Some(cause) => format!("AWS credentials could not be loaded ({cause}): {fix}"),
                None => format!("AWS credentials could not be loaded: {fix}"),
            },
        },
    }
}

/// An error answer: AWS's code and message, and the HTTP status it came
/// with.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answer<'a> {
    pub code: &'a str,
    pub message: &'a str,
    pub status: u16,
}

/// AWS's answer, by error code, then by HTTP status. Only answers that say
/// something about the secret (not found, deleted, access denied, a request
/// AWS refuses) end its cached value; an answer that says the broker's side
/// or AWS's side is at fault (credentials, throttling, any 5xx, a status
/// without an AWS code) is transient, and the last good value is served.
pub(super) fn explain_code(answer: Answer<'_>, action: &str, secret: &str) -> StoreError {
    let Answer {
        code,
        message,
        status,
    } = answer;
    let name = secret.to_owned();
    match code {
        "ResourceNotFoundException" => StoreError::NotFound { name },
        // The secret's own deletion ("because it was marked for deletion",
        // "currently marked deleted"), not its KMS key's ("the KMS key ...
        // is pending deletion"), which is a refusal of its own below.
        "InvalidRequestException" if says_secret_deleted(message) => StoreError::Deleted { name },
        // A listing is of no one secret, and has no KMS key to blame.
        "AccessDeniedException" if action == "ListSecrets" => StoreError::AccessDenied {
            name: "*".into(),
            detail: "AWS IAM does not allow the broker's role secretsmanager:ListSecrets \
                     (Resource \"*\"); check the role's policy (deploy/iam-policy.json)"
                .into(),
        },
        "AccessDeniedException" => {
            log_refusal((&name, action), answer);
            StoreError::AccessDenied {
                name,
                detail: format!(
                    "AWS IAM does not allow the broker's role secretsmanager:{action} on it; \
                     check the role's policy (deploy/iam-policy.json) and the key policy of its \
                     KMS key"
                ),
            }
        }
        // The broker's own credentials, not the caller's access to this
        // secret: every secret fails alike until they are fixed or renewed.
        "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken" => StoreError::Unavailable {
            detail: format!(
                "AWS rejected the broker's credentials ({code}); check AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, and renew expired session tokens"
            ),
        },
        // The codes the SDK's own retry classifier takes for throttling
        // (LimitExceededException aside: Secrets Manager means a quota
        // of things, e.g. versions, by it).
        "ThrottlingException"
        | "Throttling"
        | "ThrottledException"
        | "RequestThrottled"
        | "RequestThrottledException"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "BandwidthLimitExceeded"
        | "SlowDown"
        | "PriorRequestNotComplete" => StoreError::Throttled,
        "InternalServiceError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "RequestTimeout"
        | "RequestTimeoutException" => StoreError::Unavailable {
            detail: format!("AWS answered {code} (its own fault); it is retried"),
        },
        _ if status == 429 => StoreError::Throttled,
        "DecryptionFailure" => refused(
            (&name, action),
            answer,
            "AWS could not decrypt it with its KMS key (DecryptionFailure): check that the key \
             is enabled and that its key policy lets the broker's role use kms:Decrypt"
                .into(),
        ),
        "InvalidRequestException" if message.to_ascii_lowercase().contains("kms") => refused(
            (&name, action),
            answer,
            "AWS refused the read because of the secret's KMS key (InvalidRequestException; \
             AWS's words are in the broker's log): check that the key exists, is enabled, and \
             is not AWS's default key of another account"
                .into(),
        ),
        _ if status >= 500 || code.is_empty() => StoreError::Unavailable {
            detail: unrecognised(code, status),
        },
        _ => refused(
            (&name, action),
            answer,
            format!(
                "AWS answered {code} (HTTP {status}) to {action}; AWS's words are in the \
                 broker's log: a request the broker should not have made, or an endpoint that \
                 is not AWS's (AWS_ENDPOINT_URL)"
            ),
        ),
    }
}

/// Whether an InvalidRequestException's message says the secret itself is
/// deleted (AWS: "because it was marked for deletion"; "currently marked
/// deleted").
pub(super) fn says_secret_deleted(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("marked for deletion") || message.contains("marked deleted")
}

/// A refusal by AWS that says nothing the caller can change: `detail` for
/// the caller, AWS's message for the log.
fn refused(what: (&str, &str), answer: Answer<'_>, detail: String) -> StoreError {
    log_refusal(what, answer);
    StoreError::Rejected { detail }
}

/// AWS's refusal of a read, for the operator. AWS's message may name
/// accounts or keys: it goes to the log only. Every read of such a secret
/// is refused alike (a KMS key it cannot use, an IAM deny...): said once in
/// a while, per action: a refused DescribeSecret (which renewals go
/// past) must not quiet a refused GetSecretValue.
fn log_refusal((name, action): (&str, &str), answer: Answer<'_>) {
    let Answer {
        code,
        message,
        status,
    } = answer;
    // A refusal the budget holds back is not marked said: its line comes
    // once the budget allows, not ten minutes later.
    let line = REFUSALS.say_if_new(name, &format!("{action} {code}"), || REFUSAL_LINES.take());
    if let Some(held_back) = line {
        // Cut so that the line stays under 300 characters.
        let message = message.chars().take(60).collect::<String>();
        // Not `message`: that is the event's own field, and a JSON line
        // would carry the key twice.
        tracing::warn!(secret = %name, action, code, status, aws_message = message.as_str(), held_back, "AWS refused a request (said again in 10 min)");
    } else {
        let message = message.chars().take(60).collect::<String>();
        tracing::debug!(secret = %name, action, code, status, aws_message = message.as_str(), "AWS refused a request again");
    }
}

/// Refusals logged lately, so that a secret every read of which AWS
/// refuses is not a WARN line per read.
static REFUSALS: LazyLock<RepeatFilter> = LazyLock::new(|| RepeatFilter::new(REFUSAL_QUIET));

/// How long the same refusal of the same secret stays quiet after its line.
const REFUSAL_QUIET: Duration = Duration::from_secs(600);

/// At most this many refusal lines a minute, whatever the number of
/// secrets: a role losing its grant over 200 cached secrets would
/// otherwise be 400 WARN lines in a second. Past it, refusals go to DEBUG,
/// and the next line says how many were held back (`held_back`).
static REFUSAL_LINES: LazyLock<crate::telemetry::LineBudget> =
    LazyLock::new(|| crate::telemetry::LineBudget::new(Duration::from_secs(60), 10));

/// Which (secret, key) pairs (the key: the action and code) were said
/// within `quiet`; bounded: past `REMEMBERED` pairs it forgets those said
/// longer ago, and if none are, all of them (lines more, which
/// `REFUSAL_LINES` still bounds; never unbounded memory when AWS refuses
/// many secrets).
struct RepeatFilter {
    quiet: Duration,
    said: Mutex<HashMap<(String, String), Instant>>,
}

const REMEMBERED: usize = 1024;

impl RepeatFilter {
    fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            said: Mutex::new(HashMap::new()),
        }
    }

    /// Whether this pair was not said within `quiet` (it counts as said now).
    #[cfg(test)]
    fn first_in_a_while(&self, secret: &str, code: &str) -> bool {
        self.say_if_new(secret, code, || Some(())).is_some()
    }

    /// When this pair was not said within `quiet`, `line()`: what it
    /// gives, if anything, counts as said now.
    fn say_if_new<T>(
        &self,
        secret: &str,
        code: &str,
        line: impl FnOnce() -> Option<T>,
    ) -> Option<T> {
        let now = Instant::now();
        let mut said = self.said.lock().unwrap_or_else(|e| e.into_inner());
        let key = (secret.to_owned(), code.to_owned());
        if said
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < self.quiet)
        {
            return None;
        }
        let said_now = line()?;
        if said.len() >= REMEMBERED {
            said.retain(|_, at| now.duration_since(*at) < self.quiet);
        }
        if said.len() >= REMEMBERED {
            said.clear();
        }
        said.insert(key, now);
        Some(said_now)
    }
}

/// An answer the broker has no meaning for: a server error, or a status
/// with no AWS error code (a proxy or load balancer answering for AWS).
fn unrecognised(code: &str, status: u16) -> String {
    if code.is_empty() && status == 407 {
        return "a proxy between the broker and AWS asked for authentication (HTTP 407): give \
                its user and password in HTTP_PROXY/HTTPS_PROXY (http://user:password@host:port); \
                it is retried"
            .to_owned();
    }
    let who = if code.is_empty() {
        format!("HTTP {status} with no AWS error code (a proxy or load balancer in between?)")
    } else {
        format!("{code} (HTTP {status})")
    };
    format!("AWS answered {who}; it is retried")
}

/// The first error of type `T` in `error`'s source chain (itself included).
fn find<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// Every message of the chain, lower-cased, for the few words matched.
fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut text = String::new();
    let mut current = Some(error);
    while let Some(error) = current {
        text.push_str(&error.to_string().to_ascii_lowercase());
        text.push(' ');
        current = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use aws_sdk_secretsmanager::operation::get_secret_value::GetSecretValueError;

    use super::*;

    #[test]
    fn the_debug_line_of_an_unreadable_answer_holds_neither_its_body_nor_the_parsers_words() {
        let body = r#"{"Name":"insurecove/jwt","SecretString":"S3CR3T-VALUE","VersionId":7}"#;
        let raw = HttpResponse::new(
            200.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::from(body),
        );
        let error: SdkError<GetSecretValueError, HttpResponse> =
            SdkError::response_error("unexpected token 'S3CR3T-VALUE' at offset 42", raw);
        let line = causes(&error);
        assert!(!line.contains("S3CR3T"), "{line}");
        assert!(line.contains("HTTP 200"), "{line}");
        // The SDK's own context display would have carried it.
        let sdk = aws_sdk_secretsmanager::error::DisplayErrorContext(&error).to_string();
        assert!(sdk.contains("S3CR3T"), "the test's premise: {sdk}");
    }

    #[test]
    fn a_success_answer_the_sdk_reports_as_a_service_error_is_not_quoted_either() {
        let raw = HttpResponse::new(
            200.try_into().unwrap(),
            aws_smithy_types::body::SdkBody::empty(),
        );
        let parser = aws_smithy_types::error::ErrorMetadata::builder()
            .message("invalid JSON escape in \"S3CR3T-VALUE\"")
            .build();
        let error: SdkError<GetSecretValueError, HttpResponse> =
            SdkError::service_error(GetSecretValueError::generic(parser), raw);
        let line = causes(&error);
        assert!(!line.contains("S3CR3T"), "{line}");
        assert!(line.contains("HTTP 200"), "{line}");
    }

    #[test]
    fn the_debug_line_of_other_failures_gives_every_cause() {
        let error: SdkError<GetSecretValueError, HttpResponse> = SdkError::timeout_error(
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 3 s"),
        );
        assert_eq!(causes(&error), "request has timed out: no answer in 3 s");
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn the_endpoint_and_proxy_are_read_as_the_sdk_does() {
        let aws = Upstream::from_env("ap-east-1", &env(&[]));
        assert_eq!(
            aws.endpoint,
            "https://secretsmanager.ap-east-1.amazonaws.com"
        );
        assert_eq!(aws.proxy, None);
        let proxied =
            Upstream::from_env("ap-east-1", &env(&[("HTTPS_PROXY", "http://proxy:3128")]));
        assert_eq!(
            proxied.proxy,
            Some(("http://proxy:3128".into(), "HTTPS_PROXY"))
        );
        let local = Upstream::from_env(
            "ap-east-1",
            &env(&[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
                ("HTTP_PROXY", "http://proxy:3128"),
                ("NO_PROXY", "localhost,127.0.0.1"),
            ]),
        );
        assert_eq!(local.endpoint_var, Some("AWS_ENDPOINT_URL"));
        assert_eq!(local.proxy, None, "NO_PROXY exempts the host");
        // NO_PROXY read by the rules the SDK's client routes with: a
        // network, any case; `*` exempts host names, not an IP address.
        let at = |endpoint: &str, no_proxy: &str| {
            Upstream::from_env(
                "ap-east-1",
                &env(&[
                    ("AWS_ENDPOINT_URL", endpoint),
                    ("HTTP_PROXY", "http://proxy:3128"),
                    ("HTTPS_PROXY", "http://proxy:3128"),
                    ("NO_PROXY", no_proxy),
                ]),
            )
            .proxy
        };
        assert_eq!(at("http://127.0.0.1:5000", "127.0.0.0/8"), None);
        let aws = "https://secretsmanager.ap-east-1.amazonaws.com";
        assert_eq!(at(aws, "AMAZONAWS.COM"), None);
        assert_eq!(at(aws, "*"), None);
        assert_eq!(
            at("http://127.0.0.1:5000", "*"),
            Some(("http://proxy:3128".into(), "HTTP_PROXY"))
        );
        assert_eq!(
            at(aws, "example.com"),
            Some(("http://proxy:3128".into(), "HTTPS_PROXY"))
        );
        // A scheme's own variable the matcher cannot take leaves ALL_PROXY.
        let vars = [
            ("HTTPS_PROXY", "ftp://proxy:21"),
            ("ALL_PROXY", "http://all:3128"),
        ];
        assert_eq!(
            Upstream::from_env("ap-east-1", &env(&vars)).proxy,
            Some(("http://all:3128".into(), "ALL_PROXY"))
        );
        // A failure's message names the variable that set the endpoint.
        let vars = [
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("AWS_ENDPOINT_URL_SQS", "http://127.0.0.1:5999"),
        ];
        let sqs = Upstream::of(Service::Sqs, "ap-east-1", &env(&vars));
        assert_eq!(sqs.endpoint_var, Some("AWS_ENDPOINT_URL_SQS"));
        assert!(sqs.endpoint.contains(":5999"), "{}", sqs.endpoint);
    }

    #[test]
    fn an_endpoints_user_and_password_are_never_shown() {
        let vars = [("AWS_ENDPOINT_URL", "http://svc:s3cret-pw@127.0.0.1:5000")];
        let upstream = Upstream::from_env("us-east-1", &env(&vars));
        assert_eq!(
            upstream.endpoint,
            "http://127.0.0.1:5000/ (its user and password left out)"
        );
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let StoreError::Unavailable { detail } = explain_chain(&refused, &upstream) else {
            panic!("not Unavailable")
        };
        assert!(detail.starts_with("cannot reach AWS at"), "{detail}");
        assert!(!detail.contains("s3cret"), "{detail}");
        assert!(detail.contains("127.0.0.1:5000"), "{detail}");
    }

    fn answer<'a>(code: &'a str, message: &'a str, status: u16) -> Answer<'a> {
        Answer {
            code,
            message,
            status,
        }
    }

    #[test]
    fn every_throttling_or_timeout_code_of_the_sdk_is_transient() {
        for code in [
            "ThrottlingException",
            "Throttling",
            "ThrottledException",
            "RequestThrottled",
            "RequestThrottledException",
            "TooManyRequestsException",
            "RequestLimitExceeded",
            "BandwidthLimitExceeded",
            "SlowDown",
            "PriorRequestNotComplete",
        ] {
            let error = explain_code(answer(code, "", 400), "GetSecretValue", "x");
            assert_eq!(error, StoreError::Throttled, "{code}");
        }
        for (code, status) in [("RequestTimeout", 400), ("RequestTimeoutException", 408)] {
            let error = explain_code(answer(code, "", status), "GetSecretValue", "x");
            assert!(error.is_transient(), "{code}: {error:?}");
        }
    }

    /// A writer into memory, for a subscriber under test.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_refusal_line_in_json_has_one_message_the_brokers() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            explain_code(
                answer("DecryptionFailure", "words of a proxy", 400),
                "GetSecretValue",
                "insurecove/json-refusal-line",
            )
        });
        let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line = output
            .lines()
            .find(|line| line.contains("insurecove/json-refusal-line"))
            .unwrap_or_else(|| panic!("no refusal line in {output}"));
        // serde_json keeps the last of two equal keys: count them raw.
        assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        let event: serde_json::Value = serde_json::from_str(line).unwrap();
        let fields = &event["fields"];
        assert!(
            fields["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("AWS refused a request")),
            "{line}"
        );
        assert_eq!(fields["aws_message"], "words of a proxy", "{line}");
        assert_eq!(fields["action"], "GetSecretValue", "{line}");
    }

    #[test]
    fn a_proxys_user_and_password_are_never_shown() {
        for (proxy, shown) in [
            (
                "http://alice:s3cret@proxy.local:3128",
                "http://proxy.local:3128/ (its user and password left out)",
            ),
            ("http://proxy.local:3128", "http://proxy.local:3128"),
            (
                "alice:s3cret@proxy.local:3128",
                "proxy.local:3128 (what preceded @ left out)",
            ),
            (
                "http://bob:12s3cret/x@proxy.local:3128",
                "proxy.local:3128 (what preceded @ left out)",
            ),
        ] {
            assert_eq!(shown_url(proxy), shown);
            assert!(!shown_url(proxy).contains("s3cret"));
        }
    }

    #[test]
    fn a_refusal_is_said_once_in_a_while_per_secret_and_code() {
        let filter = RepeatFilter::new(Duration::from_secs(600));
        assert!(filter.first_in_a_while("insurecove/kms", "DecryptionFailure"));
        assert!(!filter.first_in_a_while("insurecove/kms", "DecryptionFailure"));
        assert!(filter.first_in_a_while("insurecove/kms", "ValidationException"));
        assert!(filter.first_in_a_while("insurecove/other", "DecryptionFailure"));
        // Full: those said long ago make room; the others stay quiet.
        let full = RepeatFilter::new(Duration::from_secs(2));
        for n in 0..REMEMBERED / 2 {
            assert!(full.first_in_a_while(&format!("old/{n}"), "x"));
        }
        std::thread::sleep(Duration::from_millis(2100));
        for n in 0..REMEMBERED / 2 {
            assert!(full.first_in_a_while(&format!("new/{n}"), "x"));
        }
        assert!(full.first_in_a_while("one-more", "x"));
        for n in 0..REMEMBERED / 2 {
            assert!(!full.first_in_a_while(&format!("new/{n}"), "x"), "{n}");
        }
        // A line held back (over budget) does not count as said.
        let filter = RepeatFilter::new(Duration::from_secs(600));
        assert_eq!(filter.say_if_new("held", "x", || None::<()>), None);
        assert_eq!(filter.say_if_new("held", "x", || Some(())), Some(()));
        assert_eq!(filter.say_if_new("held", "x", || Some(())), None);
        let soon = RepeatFilter::new(Duration::ZERO);
        assert!(soon.first_in_a_while("insurecove/kms", "DecryptionFailure"));
        assert!(soon.first_in_a_while("insurecove/kms", "DecryptionFailure"));
    }

    #[test]
    fn codes_become_errors_that_say_what_to_do() {
        let denied = explain_code(
            answer("AccessDeniedException", "", 400),
            "GetSecretValue",
            "insurecove/x",
        );
        let message = denied.to_string();
        assert!(
            message.contains("secretsmanager:GetSecretValue"),
            "{message}"
        );
        assert!(message.contains("insurecove/x"), "{message}");
        assert!(message.contains("deploy/iam-policy.json"), "{message}");
        // A listing names no secret and has no KMS key, whatever its
        // prefix; the upstream check's WARN line carries it whole.
        let list = explain_code(
            answer("AccessDeniedException", "", 400),
            "ListSecrets",
            "insurecove/",
        )
        .to_string();
        assert!(list.contains("secretsmanager:ListSecrets"), "{list}");
        assert!(
            !list.contains("insurecove/") && !list.contains("KMS"),
            "{list}"
        );
        assert!(list.len() < 200, "{} characters: {list}", list.len());
        let rejected = explain_code(
            answer("UnrecognizedClientException", "", 400),
            "GetSecretValue",
            "x",
        );
        assert!(rejected.to_string().contains("AWS_ACCESS_KEY_ID"));
        assert_eq!(
            explain_code(
                answer("ResourceNotFoundException", "", 400),
                "GetSecretValue",
                "x"
            ),
            StoreError::NotFound { name: "x".into() }
        );
        assert!(
            explain_code(
                answer(
                    "InvalidRequestException",
                    "You can't perform this operation on the secret because it was marked for deletion.",
                    400
                ),
                "GetSecretValue",
                "x"
            ) == StoreError::Deleted { name: "x".into() }
        );
        assert!(matches!(
            explain_code(
                answer("InvalidRequestException", "rotation is not configured", 400),
                "GetSecretValue",
                "x"
            ),
            StoreError::Rejected { .. }
        ));
        assert_eq!(
            explain_code(
                answer("ThrottlingException", "Rate exceeded", 400),
                "GetSecretValue",
                "x"
            ),
            StoreError::Throttled
        );
        assert!(
            explain_code(
                answer("InternalServiceError", "", 400),
                "GetSecretValue",
                "x"
            )
            .is_transient()
        );
        assert!(
            !explain_code(answer("DecryptionFailure", "", 400), "GetSecretValue", "x")
                .is_transient()
        );
    }

    /// A KMS key's trouble is told as such, with what to check; a key
    /// pending deletion is not the secret's deletion.
    #[test]
    fn kms_refusals_name_the_key_and_what_to_check() {
        let decrypt = explain_code(
            answer("DecryptionFailure", "cannot decrypt", 400),
            "GetSecretValue",
            "x",
        );
        assert!(matches!(decrypt, StoreError::Rejected { .. }));
        assert!(decrypt.to_string().contains("kms:Decrypt"), "{decrypt}");
        let pending = explain_code(
            answer(
                "InvalidRequestException",
                "Access to KMS is not allowed. The KMS key arn:aws:kms:us-east-1:1:key/k is pending deletion.",
                400,
            ),
            "GetSecretValue",
            "x",
        );
        assert!(
            matches!(pending, StoreError::Rejected { .. }),
            "{pending:?}"
        );
        assert!(pending.to_string().contains("KMS key"), "{pending}");
        assert_eq!(
            explain_code(
                answer(
                    "InvalidRequestException",
                    "You tried to perform the operation on a secret that's currently marked deleted.",
                    400
                ),
                "GetSecretValue",
                "x"
            ),
            StoreError::Deleted { name: "x".into() }
        );
    }

    /// A proxy's or load balancer's error page, AWS's own 5xx under any
    /// code, and the broker's own credentials being refused say nothing
    /// about the secret: the last good value keeps being served, and the
    /// message says what answered.
    #[test]
    fn answers_that_say_nothing_about_the_secret_are_transient() {
        for (code, status) in [
            ("", 502),
            ("", 503),
            ("", 403),
            ("ServiceUnavailableException", 503),
            ("SomethingNew", 500),
            ("ExpiredTokenException", 400),
            ("UnrecognizedClientException", 400),
            ("InvalidClientTokenId", 403),
        ] {
            let error = explain_code(answer(code, "", status), "GetSecretValue", "x");
            assert!(error.is_transient(), "{code} {status}: {error:?}");
            let message = error.to_string();
            let names_it = if code.is_empty() {
                message.contains(&format!("HTTP {status}"))
            } else {
                message.contains(code)
            };
            assert!(names_it, "{code} {status}: {message}");
            assert!(!message.ends_with("answered "), "{message}");
        }
        assert_eq!(
            explain_code(answer("", "", 429), "GetSecretValue", "x"),
            StoreError::Throttled
        );
        let credentials = explain_code(
            answer("ExpiredTokenException", "", 400),
            "GetSecretValue",
            "x",
        );
        assert!(
            credentials.to_string().contains("broker's credentials"),
            "{credentials}"
        );
        // A refusal with AWS's code under 500 still ends the value.
        assert!(matches!(
            explain_code(
                answer("ValidationException", "", 400),
                "GetSecretValue",
                "x"
            ),
            StoreError::Rejected { .. }
        ));
    }

    #[test]
    fn a_role_whose_credentials_fail_is_named_with_the_sdks_cause() {
        let missing = || {
            CredentialsError::provider_error(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory (os error 2)",
            ))
        };
        let irsa = Upstream::from_env(
            "us-east-1",
            &env(&[("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token")]),
        );
        let message = explain_chain(&missing(), &irsa).to_string();
        assert!(
            message.contains("IRSA")
                && message.contains("/var/run/token")
                && message.contains("No such file")
                && !message.contains("use an IAM role"),
            "{message}"
        );
        let pod_identity = Upstream::from_env(
            "us-east-1",
            &env(&[(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials",
            )]),
        );
        let message = explain_chain(&missing(), &pod_identity).to_string();
        assert!(
            message.contains("Pod Identity") && message.contains("No such file"),
            "{message}"
        );
        // No role set up: the usual fix; instance metadata's words too.
        let plain = Upstream::from_env("us-east-1", &env(&[]));
        let message = explain_chain(&missing(), &plain).to_string();
        assert!(message.contains("AWS_PROFILE"), "{message}");
        let imds = CredentialsError::provider_error(std::io::Error::other(
            "failed to load IMDS session token: request forbidden",
        ));
        let message = explain_chain(&imds, &plain).to_string();
        assert!(message.contains("request forbidden"), "{message}");
        // A credential process's output is never quoted (it may hold a
        // token), role or not.
        let process = CredentialsError::provider_error(std::io::Error::other(
            "Error retrieving credentials: process exited with code 1. Stderr: token hvs.SECRET expired",
        ));
        for upstream in [&plain, &irsa] {
            let message = explain_chain(&process, upstream).to_string();
            assert!(!message.contains("hvs.SECRET"), "{message}");
        }
        // Nor an invalid container credentials URI, which the SDK quotes.
        let uri = CredentialsError::provider_error(std::io::Error::other(
            "invalid full URI for ECS provider (dns failed): http://user:tok@creds.internal/v1",
        ));
        let message = explain_chain(&uri, &pod_identity).to_string();
        assert!(!message.contains("user:tok"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        // A profile's failure said again by the SDK as "already taken".
        let profile = Upstream::from_env("us-east-1", &env(&[("AWS_PROFILE", "nope")]));
        let taken = CredentialsError::provider_error(std::io::Error::other(
            "profile file credentials provider initialization error already taken",
        ));
        let message = explain_chain(&taken, &profile).to_string();
        assert!(message.contains("AWS_PROFILE=\"nope\""), "{message}");
    }

    #[test]
    fn proxies_refusing_and_odd_regions_are_named() {
        let proxied = Upstream::from_env(
            "us-east-1",
            &env(&[("HTTPS_PROXY", "http://127.0.0.1:3128")]),
        );
        let tunnel = |words: &str| {
            explain_chain(
                &std::io::Error::other(format!("client error (Connect): tunnel error: {words}")),
                &proxied,
            )
            .to_string()
        };
        let message = tunnel("proxy authorization required");
        assert!(
            message.contains("HTTP 407") && message.contains("user:password"),
            "{message}"
        );
        let message = tunnel("unsuccessful");
        assert!(message.contains("refused to open a tunnel"), "{message}");
        // Nothing listening at the proxy's address: not a refused tunnel.
        let message =
            tunnel("failed to create underlying connection: tcp connect error: Connection refused");
        assert!(
            message.contains("the proxy is not reachable (connection refused)"),
            "{message}"
        );
        // A proxied plain-HTTP request answered 407 by the proxy.
        let message = explain_code(answer("", "", 407), "GetSecretValue", "x").to_string();
        assert!(
            message.contains("asked for authentication") && message.contains("HTTP_PROXY"),
            "{message}"
        );
        // A region no host name can be made of: said before any DNS answer.
        let odd = Upstream::from_env("us_east_1", &env(&[]));
        let message =
            explain_chain(&std::io::Error::other("client error (Connect)"), &odd).to_string();
        assert!(
            message.contains("region \"us_east_1\" looks unknown"),
            "{message}"
        );
        // A 4xx code the broker has no meaning for: where to look.
        let message = explain_code(
            answer("InvalidParameterException", "bad param", 400),
            "GetSecretValue",
            "insurecove/odd-parameter",
        )
        .to_string();
        assert!(
            message.contains("broker's log") && !message.contains("bad param"),
            "{message}"
        );
    }

    #[test]
    fn messages_name_what_the_environment_set() {
        let half = Upstream::from_env("us-east-1", &env(&[("AWS_ACCESS_KEY_ID", "AKIAX")]));
        let hint = half.credentials_hint.unwrap();
        assert!(hint.contains("AWS_SECRET_ACCESS_KEY is not"), "{hint}");
        let profile = Upstream::from_env("us-east-1", &env(&[("AWS_PROFILE", "nosuch")]));
        assert!(profile.credentials_hint.unwrap().contains("\"nosuch\""));
        assert_eq!(
            Upstream::from_env("us-east-1", &env(&[])).credentials_hint,
            None
        );

        for endpoint in ["not-a-url", "localhost:4566"] {
            let not_a_url =
                Upstream::from_env("us-east-1", &env(&[("AWS_ENDPOINT_URL", endpoint)]));
            let message = explain_chain(&std::io::Error::other("x"), &not_a_url).to_string();
            assert!(message.contains("is not a URL"), "{endpoint}: {message}");
        }

        // A region of AWS's form that does not resolve: the network.
        let dns = std::io::Error::other("dns error: failed to lookup address information");
        let message = explain_chain(&dns, &Upstream::from_env("us-east-1", &env(&[]))).to_string();
        assert!(message.contains("check DNS and the network"), "{message}");
        for (region, form) in [
            ("us-east-1", true),
            ("us-gov-west-1", true),
            ("ap-southeast-2", true),
            ("mars-1", false),
            ("useast1", false),
        ] {
            assert_eq!(looks_like_a_region(region), form, "{region}");
        }
    }

    #[test]
    fn connection_failures_name_the_endpoint_or_the_proxy() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let direct = Upstream::from_env(
            "ap-east-1",
            &env(&[("AWS_ENDPOINT_URL", "http://127.0.0.1:9")]),
        );
        let message = explain_chain(&refused, &direct).to_string();
        assert!(
            message.contains("http://127.0.0.1:9") && message.contains("connection refused"),
            "{message}"
        );
        let proxied = Upstream::from_env(
            "ap-east-1",
            &env(&[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
                ("HTTP_PROXY", "http://127.0.0.1:8"),
            ]),
        );
        let message = explain_chain(&refused, &proxied).to_string();
        assert!(
            message.contains("proxy http://127.0.0.1:8 (HTTP_PROXY)"),
            "{message}"
        );
        let dns = std::io::Error::other("dns error: failed to lookup address information");
        let unknown = Upstream::from_env("mars-1", &env(&[]));
        let message = explain_chain(&dns, &unknown).to_string();
        assert!(
            message.contains("region \"mars-1\" looks unknown"),
            "{message}"
        );
    }
}
