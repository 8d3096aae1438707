//! The policy against hand-written grants: identities, patterns, reloads, warnings.

use super::*;

const POLICY: &str = r#"
        [[grant]]
        identity = "spiffe://insurecove/auth-service"
        secrets = ["insurecove/production/jwt", "insurecove/shared/*"]

        [[grant]]
        identity = "spiffe://insurecove/*"
        secrets = ["insurecove/common/**"]

        [[grant]]
        identity = "spiffe://insurecove/ops"
        admin = true
    "#;

fn policy() -> Policy {
    Policy::parse(Path::new("policy.toml"), POLICY).unwrap()
}

fn uri(uri: &str) -> Identity {
    Identity::uri(uri)
}

fn certificate(dns: &[&str], cn: Option<&str>) -> Identity {
    Identity::Certificate(Arc::new(crate::identity::CertificateNames::new(
        None,
        dns.iter().map(|d| Box::from(*d)).collect(),
        cn.map(Box::from),
    )))
}

#[test]
fn grants_match_exact_names_and_globs_by_segment() {
    let p = policy();
    let auth = &uri("spiffe://insurecove/auth-service");
    assert!(p.may_read(auth, "insurecove/production/jwt"));
    assert!(p.may_read(auth, "insurecove/shared/smtp"));
    assert!(
        !p.may_read(auth, "insurecove/shared/deep/smtp"),
        "* stays in its segment"
    );
    assert!(
        p.may_read(auth, "insurecove/common/a/b/c"),
        "** crosses segments"
    );
    assert!(!p.may_read(auth, "insurecove/production/database"));
    assert!(!p.may_read(&uri("spiffe://insurecove/team/x"), "insurecove/common/a"));
    assert!(!p.may_read(
        &uri("spiffe://other/auth-service"),
        "insurecove/production/jwt"
    ));
}

#[test]
fn admin_needs_a_grant_that_says_so() {
    let p = policy();
    assert!(p.is_admin(&uri("spiffe://insurecove/ops")));
    assert!(!p.is_admin(&uri("spiffe://insurecove/auth-service")));
}

#[test]
fn a_uri_identity_matches_only_a_uri_san() {
    let p = policy();
    let ops = "spiffe://insurecove/ops";
    assert!(
        !p.is_admin(&certificate(&[ops], None)),
        "a DNS SAN is not a URI"
    );
    assert!(
        !p.is_admin(&certificate(&[], Some(ops))),
        "a CN is not a URI"
    );
}

#[test]
fn dns_and_cn_identities_match_only_their_kind() {
    let p = Policy::parse(
        Path::new("p.toml"),
        r#"
            [[grant]]
            identity = "dns:api.internal"
            secrets = ["insurecove/api"]
            [[grant]]
            identity = "cn:legacy-client"
            secrets = ["insurecove/legacy"]
            [[grant]]
            identity = "bare.internal"
            secrets = ["insurecove/bare"]
            "#,
    )
    .unwrap();
    let api = certificate(&["other.internal", "api.internal"], None);
    assert!(p.may_read(&api, "insurecove/api"), "any DNS SAN matches");
    assert!(!p.may_read(&certificate(&[], Some("api.internal")), "insurecove/api"));
    assert!(!p.may_read(&uri("dns:api.internal"), "insurecove/api"));
    assert!(p.may_read(
        &certificate(&[], Some("legacy-client")),
        "insurecove/legacy"
    ));
    assert!(!p.may_read(&certificate(&["legacy-client"], None), "insurecove/legacy"));
    assert!(p.may_read(&certificate(&["bare.internal"], None), "insurecove/bare"));
    assert_eq!(p.warnings().len(), 1, "the bare identity is warned about");
    assert!(
        p.may_read(&certificate(&["API.Internal"], None), "insurecove/api"),
        "DNS names are not case-sensitive"
    );
    // A glob matches in any case, and its classes keep their meaning.
    let globs = Policy::parse(
        Path::new("p.toml"),
        r#"
            [[grant]]
            identity = "dns:[!A-Z]*.Internal"
            secrets = ["insurecove/api"]
            "#,
    )
    .unwrap();
    assert!(globs.may_read(&certificate(&["9api.internal"], None), "insurecove/api"));
    assert!(!globs.may_read(&certificate(&["api.internal"], None), "insurecove/api"));
    assert!(
        p.warnings()[0].contains("dns:bare.internal"),
        "{:?}",
        p.warnings()
    );
}

/// The kind prefixes are read before `://`: a CN (or a DNS name) may read
/// like a URI, and a URI without `://` is written `uri:`, as the audit
/// shows it.
#[test]
fn a_kind_prefix_decides_the_kind_of_an_identity_that_reads_like_a_uri() {
    let p = Policy::parse(
        Path::new("p.toml"),
        r#"
            [[grant]]
            identity = "cn:spiffe://insurecove/legacy"
            secrets = ["insurecove/legacy"]
            [[grant]]
            identity = "uri:urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"
            secrets = ["insurecove/urn"]
            [[grant]]
            identity = "uri:spiffe://insurecove/api"
            secrets = ["insurecove/api"]
            "#,
    )
    .unwrap();
    let legacy = "spiffe://insurecove/legacy";
    assert!(p.may_read(&certificate(&[], Some(legacy)), "insurecove/legacy"));
    assert!(!p.may_read(&uri(legacy), "insurecove/legacy"));
    assert!(!p.may_read(&uri(&format!("cn:{legacy}")), "insurecove/legacy"));
    let urn = uri("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66");
    assert_eq!(
        urn.shown(),
        "uri:urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"
    );
    assert!(p.may_read(&urn, "insurecove/urn"));
    assert!(p.may_read(&uri("spiffe://insurecove/api"), "insurecove/api"));
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
    // The audit's spelling of a URI SAN such as `dns://host/x` is
    // `uri:dns://host/x`, which grants it; `dns://host/x` is a DNS name
    // that no certificate has, and `check` says so.
    let dns_uri = Policy::parse(
        Path::new("p.toml"),
        r#"
            [[grant]]
            identity = "uri:dns://10.0.0.1/host"
            secrets = ["insurecove/api"]
            [[grant]]
            identity = "dns://10.0.0.1/host"
            secrets = ["insurecove/api"]
            "#,
    )
    .unwrap();
    let holder = uri("dns://10.0.0.1/host");
    assert_eq!(holder.shown(), "uri:dns://10.0.0.1/host");
    assert!(dns_uri.may_read(&holder, "insurecove/api"));
    assert_eq!(dns_uri.warnings().len(), 1, "{:?}", dns_uri.warnings());
    assert!(
        dns_uri.warnings()[0].contains("uri:dns://10.0.0.1/host"),
        "{:?}",
        dns_uri.warnings()
    );
}

#[test]
fn only_plaintext_callers_are_anonymous() {
    let p = Policy::parse(
        Path::new("p.toml"),
        "[[grant]]\nidentity = \"anonymous\"\nsecrets = [\"insurecove/**\"]\n",
    )
    .unwrap();
    assert!(p.may_read(&Identity::Anonymous, "insurecove/x"));
    assert!(!p.may_read(&certificate(&[], Some("anonymous")), "insurecove/x"));
    assert!(!p.may_read(&certificate(&["anonymous"], None), "insurecove/x"));
}

#[test]
fn arns_are_decided_by_the_name_inside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let authorizer = Authorizer::new(Some(&path), true).unwrap();
    let auth = uri("spiffe://insurecove/auth-service");
    let arn = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/shared/x-AbCdEf";
    assert_eq!(authorizer.check_read(&auth, arn), Ok(()));
    let other = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:insurecove/production/database-AbCdEf";
    assert!(authorizer.check_read(&auth, other).is_err());
}

#[test]
fn bad_files_are_refused_with_the_reason() {
    let unknown = Policy::parse(
        Path::new("p.toml"),
        "[[grant]]\nidentity = \"a\"\nsecret = []\n",
    );
    let unknown = unknown.err().unwrap().to_string();
    assert!(
        unknown.contains("unknown field") && unknown.contains("(line 3, column 1)"),
        "where it is, never its text: {unknown}"
    );
    let unclosed = Policy::parse(
        Path::new("p.toml"),
        "[[grant]]\nidentity = \"s3cret-looking\"\nsecrets = [\"x\"\n",
    );
    let unclosed = unclosed.err().unwrap().to_string();
    assert!(unclosed.contains("(line 3,"), "{unclosed}");
    assert!(!unclosed.contains("s3cret-looking"), "{unclosed}");
    let glob = Policy::parse(
        Path::new("p.toml"),
        "[[grant]]\nidentity = \"a[\"\nsecrets = [\"x\"]\n",
    );
    let message = glob.err().unwrap().to_string();
    assert!(
        message.contains("grant #1") && message.contains("a["),
        "{message}"
    );
}

#[test]
fn without_a_file_plaintext_allows_and_mtls_denies() {
    let anonymous = Identity::Anonymous;
    let open = Authorizer::new(None, false).unwrap();
    assert_eq!(open.check_read(&anonymous, "insurecove/x"), Ok(()));
    assert_eq!(open.check_admin(&anonymous), Ok(()));
    let closed = Authorizer::new(None, true).unwrap();
    let someone = uri("spiffe://insurecove/a");
    assert!(closed.check_read(&someone, "insurecove/x").is_err());
    assert!(closed.check_admin(&someone).is_err());
    assert_eq!(
        open.check_read(&Identity::Unnamed, "insurecove/x"),
        Err(Denied::NoIdentity)
    );
    assert!(matches!(
        open.check_read(
            &Identity::Refused(crate::identity::RefusedCertificate::TwoUris),
            "insurecove/x"
        ),
        Err(Denied::BadIdentity(_))
    ));
}

#[test]
fn without_a_file_a_reload_changes_nothing() {
    for mutual_tls in [false, true] {
        let authorizer = Authorizer::new(None, mutual_tls).unwrap();
        let reloads = authorizer.reloads();
        assert_eq!(authorizer.rules.reload().ok(), Some(false), "nothing new");
        assert!(!reloads.has_changed().unwrap(), "nobody told");
    }
}

#[test]
fn reload_swaps_rules_and_keeps_them_when_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let authorizer = Authorizer::new(Some(&path), true).unwrap();
    let reloads = authorizer.reloads();
    let ops = uri("spiffe://insurecove/ops");
    assert!(authorizer.check_admin(&ops).is_ok());

    std::fs::write(
        &path,
        "[[grant]]\nidentity = \"spiffe://insurecove/ops\"\nsecrets = [\"insurecove/x\"]\n",
    )
    .unwrap();
    authorizer.reload().unwrap();
    assert!(authorizer.check_admin(&ops).is_err());
    assert!(reloads.has_changed().unwrap());
    // Read again as it is (a SIGHUP): nothing new, nothing told.
    assert_eq!(authorizer.rules.reload().ok(), Some(false));

    std::fs::write(&path, "[[grant]\n").unwrap();
    assert!(authorizer.reload().is_err());
    assert!(authorizer.check_admin(&ops).is_err(), "old rules kept");
}

#[test]
fn an_exact_identity_matches_itself_only_and_a_glob_its_segment() {
    let p = policy();
    let jwt = "insurecove/production/jwt";
    assert!(p.may_read(&uri("spiffe://insurecove/auth-service"), jwt));
    for other in [
        "spiffe://insurecove/auth-service/extra",
        "spiffe://insurecove/auth-servic",
        "spiffe://insurecove/AUTH-SERVICE",
        "spiffe://insurecove/auth-service ",
    ] {
        assert!(!p.may_read(&uri(other), jwt), "{other}");
    }
    // `*` stays within a segment.
    let common = "insurecove/common/key";
    assert!(p.may_read(&uri("spiffe://insurecove/billing"), common));
    assert!(!p.may_read(&uri("spiffe://insurecove/team/billing"), common));
    assert!(!p.may_read(&uri("spiffe://other/billing"), common));
}

#[test]
fn an_empty_or_cut_short_file_keeps_the_rules_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, POLICY).unwrap();
    let authorizer = Authorizer::new(Some(&path), true).unwrap();
    let ops = uri("spiffe://insurecove/ops");
    assert!(authorizer.check_admin(&ops).is_ok());

    let cut = "[[grant]]\nidentity = \"spiffe://a/x\"\nsecrets = [\"insurecove/x\"]\n\
               [[grant]]\nidentity = \"spiffe://insurecove/ops\"\n";
    for (written, reason) in [
        ("", "no [[grant]]"),
        ("  \n# nothing yet\n", "no [[grant]]"),
        (cut, "grant #2 grants nothing"),
    ] {
        std::fs::write(&path, written).unwrap();
        let refused = authorizer.reload().unwrap_err().to_string();
        assert!(
            refused.contains(reason) && refused.contains("rules in force are kept"),
            "{refused}"
        );
        assert!(authorizer.check_admin(&ops).is_ok(), "old rules kept");
    }

    // At start there is nothing to keep: applied, and warned about.
    let started = Authorizer::new(Some(&path), true).unwrap();
    assert!(started.check_admin(&ops).is_err());
    assert!(
        started
            .warnings("")
            .iter()
            .any(|warning| warning.contains("grant #2 grants nothing")
                && warning.contains("a running broker does not reload a file like this")),
        "{:?}",
        started.warnings("")
    );
}

#[test]
fn patterns_that_cannot_match_are_warned_about() {
    let p = Policy::parse(
        Path::new("policy.toml"),
        r#"
            [[grant]]
            identity = "spiffe://a/x"
            secrets = ["production/jwt", "insurecove/ok", "*/db", "arn:aws:secretsmanager:*", "insurecove*/x", "**", "*"]
            "#,
    )
    .unwrap();
    let warnings = p.patterns_outside("insurecove/");
    assert_eq!(warnings.len(), 4, "{warnings:?}");
    assert!(
        warnings[0].contains(r#""production/jwt" does not start with the prefix "insurecove/""#)
            && warnings[0].contains(r#""insurecove/production/jwt"?"#),
        "{warnings:?}"
    );
    assert!(warnings[1].contains("is an ARN"), "{warnings:?}");
    assert!(
        warnings[2].contains(r#""insurecove*/x""#) && !warnings[2].contains('?'),
        "no suggestion for a pattern that reaches for the prefix: {warnings:?}"
    );
    assert!(
        warnings[3].contains(r#""*" matches names of one segment"#)
            && warnings[3].contains(r#""insurecove/*" for one level"#),
        "a one-segment glob under a prefix matches nothing: {warnings:?}"
    );
    let unprefixed = p.patterns_outside("");
    assert_eq!(
        unprefixed.len(),
        1,
        "without a prefix, the ARN only: {unprefixed:?}"
    );
}

#[test]
fn a_denial_shows_a_certificate_of_many_names_cut_after_a_name() {
    let names: Vec<String> = (0..201)
        .map(|n| format!("host-{n:03}.example.internal"))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let many = certificate(&names, None);
    let closed = Authorizer::new(None, true).unwrap();
    for denied in [
        closed.check_read(&many, "insurecove/x").unwrap_err(),
        closed.check_admin(&many).unwrap_err(),
    ] {
        let message = denied.to_string();
        assert!(message.len() < 700, "{} bytes: {message}", message.len());
        assert!(
            message.contains("dns:host-000.example.internal, "),
            "{message}"
        );
        assert!(message.contains(", … ("), "{message}");
        assert!(!message.contains("host-200"), "{message}");
    }
    let few = certificate(&["a.internal", "b.internal"], None);
    let message = closed.check_admin(&few).unwrap_err().to_string();
    assert_eq!(
        message,
        "dns:a.internal, dns:b.internal may not call AdminService"
    );
}
