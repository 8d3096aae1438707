//! Secret names: how a caller's name becomes the id asked upstream, and
//! which secret name that id stands for when the policy decides.
//!
//! Callers use short names relative to a prefix (`mistral-api-key` means
//! `insurecove/mistral-api-key`). A name that already carries the prefix, or
//! an ARN, is taken as is. A full name is checked against AWS's own rule
//! (1–512 characters of `A-Za-z0-9/_+=.@-`) so that a bad name is refused
//! here, with a clear reason, instead of costing an upstream call.
//!
//! An ARN is parsed field by field (`arn:PARTITION:secretsmanager:REGION:
//! ACCOUNT:secret:NAME`, NAME optionally followed by the `-` and six
//! characters AWS appends), and anything else that starts with `arn:` is
//! refused. The policy then decides on the NAME inside the ARN, never on the
//! raw text: a colon inside the name part (`secret:allowed/x:other/y`) could
//! otherwise make the policy look at one secret while AWS reads another.
//! `answer_matches` is the second wall: the secret the upstream answered
//! with must be the one the policy allowed.

use std::fmt;

/// AWS's longest secret name in characters.
pub const MAX_NAME_LEN: usize = 512;

/// The longest ARN accepted: AWS's own bound on `SecretId`.
pub const MAX_ARN_LEN: usize = 2048;

const ARN_PREFIX: &str = "arn:";

/// The random suffix AWS appends to a secret's name in its ARN: `-` and six
/// letters or digits.
const ARN_SUFFIX_LEN: usize = 7;

/// Why a name was refused. Carries no part of the name itself beyond what
/// the caller sent, and never a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    #[error("the secret name is empty")]
    Empty,
    #[error(
        "the secret name is {len} characters long (with the prefix added to a short name); at \
         most {MAX_NAME_LEN} are allowed"
    )]
    TooLong { len: usize },
    #[error("the ARN is {len} characters long; at most {MAX_ARN_LEN} are allowed")]
    ArnTooLong { len: usize },
    #[error(
        "the secret name contains {found:?}; only letters, digits and the characters /_+=.@- are allowed"
    )]
    BadCharacter { found: char },
    #[error(
        "not a Secrets Manager secret ARN ({problem}); expected arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME"
    )]
    BadArn { problem: &'static str },
}

/// The parts of a secret's ARN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretArn<'a> {
    pub partition: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    /// The secret's name, without the suffix AWS appends.
    pub name: &'a str,
    /// The `-XXXXXX` suffix, when the ARN is complete.
    pub suffix: Option<&'a str>,
}

impl<'a> SecretArn<'a> {
    /// Parses `arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:NAME`.
    pub fn parse(arn: &'a str) -> Result<Self, InvalidName> {
        let bad = |problem| InvalidName::BadArn { problem };
        let rest = arn.strip_prefix(ARN_PREFIX).ok_or(bad("no arn: prefix"))?;
        let mut fields = rest.splitn(6, ':');
        let mut next = |what| fields.next().ok_or(bad(what));
        let partition = next("no partition")?;
        let service = next("no service")?;
        let region = next("no region")?;
        let account = next("no account")?;
        let kind = next("no resource type")?;
        let resource = next("no secret name")?;
        if !is_partition(partition) {
            return Err(bad(
                "the partition is not aws, aws-cn, aws-us-gov or the like",
            ));
        }
        if service != "secretsmanager" {
            return Err(bad("the service is not secretsmanager"));
        }
        if !is_region(region) {
            return Err(bad("the region is not of the form ap-east-1"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account is not 12 digits"));
        }
        if kind != "secret" {
            return Err(bad("the resource type is not secret"));
        }
        let (name, suffix) = split_suffix(resource);
        validate_name(name)?;
        Ok(Self {
            partition,
            region,
            account,
            name,
            suffix,
        })
    }

    /// Whether `other` names the same partition, region and account.
    fn same_home(&self, other: &SecretArn<'_>) -> bool {
        self.partition == other.partition
            && self.region == other.region
            && self.account == other.account
    }
}

/// The most characters of an ARN's partition and of its region: the
/// longest AWS has are under 16 (`aws-iso-b`, `ap-southeast-5`). Without a
/// bound an ARN could pad either to the 2,048 characters AWS allows an id,
/// a name no secret can have that every error and audit line would echo.
const MAX_PARTITION_OR_REGION: usize = 32;

/// `aws`, `aws-cn`, `aws-us-gov`, `aws-iso-b`...: lower-case words joined by
/// dashes, starting with `aws`.
fn is_partition(partition: &str) -> bool {
    partition.len() <= MAX_PARTITION_OR_REGION
        && partition.starts_with("aws")
        && partition
            .split('-')
            .all(|word| !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase()))
}

/// `ap-east-1`, `us-gov-west-1`: lower-case words and a final number.
fn is_region(region: &str) -> bool {
    if region.len() > MAX_PARTITION_OR_REGION {
        return false;
    }
    let mut words = region.split('-').peekable();
    let mut count = 0;
    while let Some(word) = words.next() {
        count += 1;
        let valid = if words.peek().is_none() {
            !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit())
        } else {
            !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase())
        };
        if !valid {
            return false;
        }
    }
    count >= 3
}

/// Splits `name-AbC123` into the name and AWS's suffix. A name that merely
/// ends in a dash and six characters cannot be told from a suffixed one: the
/// upstream's answer decides (`answer_matches`).
fn split_suffix(resource: &str) -> (&str, Option<&str>) {
    // A suffix is ASCII: a cut inside a character (`…:secret:€23456`) is
    // no suffix, and must not be split there (a panic).
    let Some(cut) = resource
        .len()
        .checked_sub(ARN_SUFFIX_LEN)
        .filter(|&cut| resource.is_char_boundary(cut))
    else {
        return (resource, None);
    };
    let (name, suffix) = resource.split_at(cut);
    let is_suffix = !name.is_empty()
        && suffix.starts_with('-')
        && suffix[1..].bytes().all(|b| b.is_ascii_alphanumeric());
    if is_suffix {
        (name, Some(suffix))
    } else {
        (resource, None)
    }
}

/// The secret name an id stands for: the name inside an ARN, or the id.
/// Only ids that `NameResolver::resolve` accepted are passed here.
pub fn secret_name(id: &str) -> &str {
    if id.starts_with(ARN_PREFIX)
        && let Ok(arn) = SecretArn::parse(id)
    {
        return arn.name;
    }
    id
}

/// Whether `name` is a secret name AWS would accept (1–512 characters of
/// `A-Za-z0-9/_+=.@-`).
pub fn is_valid_name(name: &str) -> bool {
    validate_name(name).is_ok()
}

/// Whether `id` names one secret for good: a complete ARN (with AWS's
/// suffix), which a secret created later under the same name does not
/// take over (a name or a partial ARN does).
pub fn is_one_secret(id: &str) -> bool {
    id.starts_with(ARN_PREFIX) && SecretArn::parse(id).is_ok_and(|arn| arn.suffix.is_some())
}

/// Whether `id` is the complete ARN of an earlier secret of the name that
/// the secret at `listed_arn` (same account and region) now has.
pub fn replaced_by(id: &str, listed_arn: &str) -> bool {
    let (Ok(held), Ok(listed)) = (SecretArn::parse(id), SecretArn::parse(listed_arn)) else {
        return false;
    };
    held.suffix.is_some()
        && listed.suffix.is_some()
        && held.name == listed.name
        && held.same_home(&listed)
        && held.suffix != listed.suffix
}

/// Whether the upstream answered with the secret `id` asked for: same name
/// (the one the policy allowed) and, for an ARN, the same partition,
/// region, account and, when the ARN carried it, suffix.
pub fn answer_matches(id: &str, answered_name: &str, answered_arn: &str) -> bool {
    if !id.starts_with(ARN_PREFIX) {
        return answered_name == id;
    }
    let Ok(asked) = SecretArn::parse(id) else {
        return false;
    };
    if answered_name != asked.name {
        return false;
    }
    if answered_arn.is_empty() {
        // A backend without ARNs (the file backend) answered by name.
        return true;
    }
    match SecretArn::parse(answered_arn) {
        Ok(answered) => {
            answered.name == asked.name
                && asked.same_home(&answered)
                && asked
                    .suffix
                    .is_none_or(|suffix| answered.suffix == Some(suffix))
        }
        Err(_) => false,
    }
}

/// Room for one prefixed name, on the stack of whoever resolves it:
/// `NameResolver::resolve_in` writes into it and hands back a `&str`, so
/// that the 512-byte buffer is never moved (every call resolves a name;
/// returning the buffer by value cost several copies of it per call).
pub type NameRoom = arrayvec::ArrayString<MAX_NAME_LEN>;

/// Turns callers' names into full secret names. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameResolver {
    /// The prefix with its trailing slash, e.g. `insurecove/`.
    prefix_with_slash: String,
    environment: String,
}

impl NameResolver {
    /// The prefix of full names with its slash (`insurecove/`), or `""`.
    pub fn prefix(&self) -> &str {
        &self.prefix_with_slash
    }

    /// `prefix` is `SECRET_PREFIX` (e.g. `insurecove`); `environment` is
    /// `SECRET_ENVIRONMENT` (e.g. `production`), used by the typed configs'
    /// default names.
    pub fn new(prefix: &str, environment: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            prefix_with_slash: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            environment: environment.to_owned(),
        }
    }

    /// The environment of the typed configs' default names (`production`).
    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// The id to ask upstream for `name` (a full name or an ARN), validated.
    pub fn resolve(&self, name: &str) -> Result<String, InvalidName> {
        let mut room = NameRoom::new();
        self.resolve_in(name, &mut room).map(str::to_owned)
    }

    /// `resolve` without allocating (every call resolves a name): the name
    /// itself when it is already full, or the prefixed name written into
    /// `room`.
    pub fn resolve_in<'a>(
        &self,
        name: &'a str,
        room: &'a mut NameRoom,
    ) -> Result<&'a str, InvalidName> {
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if name.starts_with(ARN_PREFIX) {
            let len = name.chars().count();
            if len > MAX_ARN_LEN {
                return Err(InvalidName::ArnTooLong { len });
            }
            SecretArn::parse(name)?;
            return Ok(name);
        }
        if name.starts_with(&self.prefix_with_slash) {
            validate_name(name)?;
            return Ok(name);
        }
        room.clear();
        // Too long (or not one byte per character) fails the same check as
        // the full name would.
        let fits =
            room.try_push_str(&self.prefix_with_slash).is_ok() && room.try_push_str(name).is_ok();
        if !fits {
            let len = self.prefix_with_slash.chars().count() + name.chars().count();
            validate_name(&format!("{}{name}", self.prefix_with_slash))?;
            return Err(InvalidName::TooLong { len });
        }
        validate_name(room)?;
        Ok(room.as_str())
    }

    /// The full name of a typed config: the caller's name when given, else
    /// `<environment>/<kind>` (e.g. `production/jwt`).
    pub fn resolve_or_default(&self, name: &str, kind: &str) -> Result<String, InvalidName> {
        if name.is_empty() {
            self.resolve(&format!("{}/{kind}", self.environment))
        } else {
            self.resolve(name)
        }
    }
}

fn validate_name(name: &str) -> Result<(), InvalidName> {
    if name.is_empty() {
        return Err(InvalidName::Empty);
    }
    // Every call checks a name: the common case in one pass over bytes
    // (allowed characters are ASCII, one byte each).
    if name.len() <= MAX_NAME_LEN && name.bytes().all(|b| ALLOWED_BYTES[usize::from(b)]) {
        return Ok(());
    }
    let len = name.chars().count();
    if len > MAX_NAME_LEN {
        return Err(InvalidName::TooLong { len });
    }
    match name.chars().find(|&c| !is_allowed(c)) {
        Some(found) => Err(InvalidName::BadCharacter { found }),
        None => Ok(()),
    }
}

/// AWS's character set for names.
fn is_allowed(c: char) -> bool {
    u8::try_from(c).is_ok_and(is_allowed_byte)
}

const fn is_allowed_byte(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'_' | b'+' | b'=' | b'.' | b'@' | b'-')
}

/// `is_allowed_byte` for every byte, looked up on the hot path: one load
/// per byte instead of a chain of comparisons.
const ALLOWED_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = is_allowed_byte(b as u8);
        b += 1;
    }
    table
};

/// A name shown in logs and errors: full names are not secret, but a caller
/// could paste anything into a name field, so overlong input is cut.
pub struct ShownName<'a>(pub &'a str);

impl fmt::Display for ShownName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 80;
        match self.0.char_indices().nth(SHOWN) {
            Some((cut, _)) => write!(f, "{}…", &self.0[..cut]),
            None => f.write_str(self.0),
        }
    }
}

impl ShownName<'_> {
    /// The name cut as `Display` cuts it, quoted and with control
    /// characters escaped: for text nobody vetted (a name a caller sent, or
    /// one the upstream answered), which must stay one line.
    pub fn quoted(&self) -> String {
        format!("{:?}", self.to_string())
    }
}

#[cfg(test)]
mod tests;
