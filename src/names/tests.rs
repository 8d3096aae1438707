//! Name resolution and ARN parsing, at their edges.

use super::*;

fn resolver() -> NameResolver {
    NameResolver::new("insurecove", "production")
}

#[test]
fn short_names_get_the_prefix() {
    assert_eq!(
        resolver().resolve("mistral-api-key").unwrap(),
        "insurecove/mistral-api-key"
    );
}

#[test]
fn prefixed_names_and_arns_are_kept() {
    let r = resolver();
    assert_eq!(
        r.resolve("insurecove/production/jwt").unwrap(),
        "insurecove/production/jwt"
    );
    let arn = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/jwt-AbCdEf";
    assert_eq!(r.resolve(arn).unwrap(), arn);
}

#[test]
fn a_name_that_only_looks_like_the_prefix_is_prefixed() {
    assert_eq!(
        resolver().resolve("insurecove-other").unwrap(),
        "insurecove/insurecove-other"
    );
}

#[test]
fn typed_defaults_use_the_environment() {
    let r = NameResolver::new("acme/", "staging");
    assert_eq!(r.resolve_or_default("", "jwt").unwrap(), "acme/staging/jwt");
    assert_eq!(r.resolve_or_default("x", "jwt").unwrap(), "acme/x");
}

#[test]
fn bad_names_are_refused_with_a_reason() {
    let r = resolver();
    assert_eq!(r.resolve(""), Err(InvalidName::Empty));
    assert_eq!(
        r.resolve("has space"),
        Err(InvalidName::BadCharacter { found: ' ' })
    );
    assert_eq!(
        r.resolve("glob*"),
        Err(InvalidName::BadCharacter { found: '*' })
    );
    assert_eq!(
        r.resolve("a:b"),
        Err(InvalidName::BadCharacter { found: ':' })
    );
}

#[test]
fn length_counts_the_prefix() {
    let r = resolver();
    let fits = "a".repeat(MAX_NAME_LEN - "insurecove/".len());
    assert!(r.resolve(&fits).is_ok());
    let over = format!("{fits}a");
    assert_eq!(
        r.resolve(&over),
        Err(InvalidName::TooLong {
            len: MAX_NAME_LEN + 1
        })
    );
}

const ARN: &str = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/jwt-AbCdEf";

#[test]
fn arns_are_parsed_field_by_field() {
    let arn = SecretArn::parse(ARN).unwrap();
    assert_eq!(arn.name, "insurecove/jwt");
    assert_eq!(arn.suffix, Some("-AbCdEf"));
    assert_eq!(arn.region, "ap-east-1");
    let partial = "arn:aws-us-gov:secretsmanager:us-gov-west-1:123456789012:secret:x/y";
    let parsed = SecretArn::parse(partial).unwrap();
    assert_eq!((parsed.name, parsed.suffix), ("x/y", None));
}

#[test]
fn a_colon_in_the_name_part_is_refused() {
    let smuggled = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/shared/x:insurecove/production/database";
    assert_eq!(
        resolver().resolve(smuggled),
        Err(InvalidName::BadCharacter { found: ':' })
    );
}

#[test]
fn malformed_arns_are_refused() {
    let r = resolver();
    for bad in [
        "arn:aws:s3:ap-east-1:123456789012:secret:x",
        "arn:aws:secretsmanager:ap-east-1:12345:secret:x",
        "arn:aws:secretsmanager:ap-east-1:123456789012:parameter:x",
        "arn:aws:secretsmanager:east:123456789012:secret:x",
        "arn:AWS:secretsmanager:ap-east-1:123456789012:secret:x",
        "arn:aws:secretsmanager:ap-east-1:123456789012:secret:",
        "arn:aws:secretsmanager:ap-east-1:123456789012:secret",
        "arn:",
    ] {
        assert!(r.resolve(bad).is_err(), "{bad} was accepted");
    }
    // Padded to AWS's 2,048 characters through the partition or region.
    let words = "-abcdefghij".repeat(180);
    for bad in [
        format!("arn:aws{words}:secretsmanager:ap-east-1:123456789012:secret:insurecove/x"),
        format!("arn:aws:secretsmanager:ap{words}-1:123456789012:secret:insurecove/x"),
    ] {
        assert!(r.resolve(&bad).is_err(), "{bad} was accepted");
    }
}

#[test]
fn policy_names_come_from_inside_the_arn() {
    assert_eq!(secret_name(ARN), "insurecove/jwt");
    assert_eq!(secret_name("insurecove/jwt"), "insurecove/jwt");
}

#[test]
fn long_arns_are_accepted_up_to_aws_bound() {
    let name = format!("insurecove/{}", "a".repeat(469));
    assert_eq!(name.len(), 480);
    let arn = format!("arn:aws:secretsmanager:ap-east-1:123456789012:secret:{name}-AbCdEf");
    assert_eq!(resolver().resolve(&arn).unwrap(), arn);
    let over = format!("arn:{}", "a".repeat(MAX_ARN_LEN));
    assert!(matches!(
        resolver().resolve(&over),
        Err(InvalidName::ArnTooLong { .. })
    ));
}

#[test]
fn answers_must_be_the_secret_that_was_authorized() {
    let answered_arn = ARN;
    assert!(answer_matches(ARN, "insurecove/jwt", answered_arn));
    assert!(!answer_matches(
        ARN,
        "insurecove/production/database",
        answered_arn
    ));
    let partial = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/jwt";
    assert!(answer_matches(partial, "insurecove/jwt", answered_arn));
    let other_account =
        "arn:aws:secretsmanager:ap-east-1:999999999999:secret:insurecove/jwt-AbCdEf";
    assert!(!answer_matches(ARN, "insurecove/jwt", other_account));
    let other_suffix = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/jwt-ZZZZZZ";
    assert!(!answer_matches(ARN, "insurecove/jwt", other_suffix));
    assert!(answer_matches(
        "insurecove/jwt",
        "insurecove/jwt",
        answered_arn
    ));
    assert!(!answer_matches("insurecove/jwt", "insurecove/other", ""));
}

#[test]
fn shown_names_are_cut() {
    let long = "x".repeat(200);
    let shown = ShownName(&long).to_string();
    assert_eq!(shown.chars().count(), 81);
    assert_eq!(ShownName("short").to_string(), "short");
}

#[test]
fn the_byte_table_allows_exactly_aws_characters() {
    for byte in 0..=u8::MAX {
        let c = char::from(byte);
        let aws = c.is_ascii_alphanumeric() || "/_+=.@-".contains(c);
        assert_eq!(ALLOWED_BYTES[usize::from(byte)], aws, "byte {byte:#04x}");
        assert_eq!(is_allowed(c), aws, "byte {byte:#04x}");
    }
    assert!(!is_allowed('é'), "letters past ASCII are refused");
}

#[test]
fn resolving_in_a_room_borrows_the_name_or_writes_the_prefixed_one() {
    let r = resolver();
    let mut room = NameRoom::new();
    let full = r.resolve_in("insurecove/db", &mut room).unwrap();
    assert_eq!(full, "insurecove/db");
    assert!(room.is_empty(), "a full name is taken as is, not copied");

    // A room that held a longer name before is cleared first.
    let mut room = NameRoom::new();
    room.push_str("left-over-from-an-earlier-call");
    let full = r.resolve_in("db", &mut room).unwrap();
    assert_eq!(full, "insurecove/db");
    assert_eq!(
        r.resolve_in("bad name", &mut room),
        Err(InvalidName::BadCharacter { found: ' ' })
    );
}

#[test]
fn an_arn_with_its_suffix_is_one_secret_which_a_new_one_does_not_take_over() {
    let old = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/db-AbCdEf";
    let new = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/db-ZyXwVu";
    let other_account = "arn:aws:secretsmanager:ap-east-1:210987654321:secret:insurecove/db-ZyXwVu";
    let partial = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/db";
    assert!(is_one_secret(old));
    assert!(!is_one_secret(partial) && !is_one_secret("insurecove/db"));
    assert!(replaced_by(old, new));
    assert!(!replaced_by(old, old), "the same secret");
    assert!(!replaced_by(other_account, old), "another account's secret");
    assert!(!replaced_by(partial, new), "a partial ARN follows the name");
    assert!(!replaced_by("insurecove/db", new));
}

/// Anyone who can connect sends names, and anyone who can write to the
/// events queue sends ARNs: a character of several bytes anywhere near
/// where AWS's suffix would be is refused, never a panic.
#[test]
fn a_character_of_several_bytes_where_the_suffix_would_be_is_no_panic() {
    let r = resolver();
    for tail in [
        "€23456",
        "a€3456",
        "ab€456",
        "abc€56",
        "-€3456",
        "-ab€de",
        "-abcd€",
        "€",
        "é-AbC123",
    ] {
        let arn = format!("arn:aws:secretsmanager:us-east-1:123456789012:secret:{tail}");
        assert!(r.resolve(&arn).is_err(), "{arn} was accepted");
        assert!(!is_one_secret(&arn), "{arn}");
        let _ = secret_name(&arn);
        let _ = SecretArn::parse(&arn);
    }
}
