//! Who is calling: the names a verified client certificate carries, or the
//! plaintext caller (loopback / unix socket only).
//!
//! Names are typed, so that one kind can never pass for another: a URI SAN
//! (a SPIFFE id) is matched only by URI identities of the policy, DNS SANs
//! only by `dns:` identities, the subject CN only by `cn:` identities, and
//! only when the certificate has no subjectAltName extension at all. A
//! plaintext caller is its own kind that no certificate can match, whatever
//! its CN says. A certificate with more than one URI SAN is refused: a
//! SPIFFE X.509-SVID carries exactly one, and two would make "who is this"
//! ambiguous. So is one whose subjectAltName cannot be read (rustls does
//! not parse a client certificate's SAN, so a malformed one reaches us), or
//! that has no SAN and more than one CN.
//!
//! The identity, and how the audit shows it, is worked out once per
//! connection, at the TLS handshake, and travels to every call of that
//! connection in the request's extensions (tonic copies a connection's
//! `ConnectInfo` there), so no call parses a certificate or escapes a name.

use std::{fmt, sync::Arc};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

/// How plaintext callers are written in the policy and shown in the audit.
pub const ANONYMOUS: &str = "anonymous";

/// A caller's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Plaintext connection: no certificate.
    Anonymous,
    /// A verified certificate and the names it carries.
    Certificate(Arc<CertificateNames>),
    /// A verified certificate that names nobody a policy can match: no URI
    /// or DNS SAN, and no CN (or a SAN, so that the CN does not count).
    Unnamed,
    /// A verified certificate whose names cannot be used; says why.
    Refused(RefusedCertificate),
}

/// Why a verified certificate's names cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedCertificate {
    /// Its subjectAltName, or an entry of it, cannot be read.
    UnreadableSan,
    /// More than one URI SAN.
    TwoUris,
    /// No SAN, and more than one CN.
    TwoCns,
    /// No SAN, and a CN that cannot be read as text.
    UnreadableCn,
    /// More names than `MAX_NAMES`, or more text than `MAX_SHOWN`.
    TooManyNames,
}

/// The most URI and DNS SANs a client certificate may carry: a workload's
/// certificate names it a few times at most. Every call's audit line shows
/// every name and the policy matches each of them, so a certificate with
/// thousands of names would make every call of its connection cost that
/// much.
pub const MAX_NAMES: usize = 64;

/// The most bytes a client certificate's names may take as the audit
/// shows them (`Identity::shown`), for the same reason.
/// 64 Kubernetes service names (`pod-N.svc.namespace.svc.cluster.local`,
/// about 70 characters each) fit.
pub const MAX_SHOWN: usize = 8192;

impl RefusedCertificate {
    /// What the caller is told.
    pub fn why(self) -> &'static str {
        match self {
            Self::UnreadableSan => "the client certificate's subjectAltName cannot be read",
            Self::TwoUris => {
                "the client certificate has more than one URI SAN; a SPIFFE identity has exactly one"
            }
            Self::TwoCns => "the client certificate has more than one CN and no SAN",
            Self::UnreadableCn => "the client certificate's CN cannot be read as text",
            Self::TooManyNames => {
                "the client certificate carries more names than the broker takes (at most 64 \
                 URI and DNS SANs, 8192 bytes as the audit shows them)"
            }
        }
    }

    /// How the audit shows such a caller: why, in a few words, so that the
    /// trail tells one refused certificate from another.
    fn shown(self) -> &'static str {
        match self {
            Self::UnreadableSan => "(refused certificate: subjectAltName unreadable)",
            Self::TwoUris => "(refused certificate: more than one URI SAN)",
            Self::TwoCns => "(refused certificate: more than one CN, no SAN)",
            Self::UnreadableCn => "(refused certificate: CN not text)",
            Self::TooManyNames => "(refused certificate: too many or too long names)",
        }
    }
}

/// The names of a client certificate, by kind, and how the audit shows
/// them: every name the policy may match, each with its kind, so that the
/// line names whichever one a grant matched, and no name can pass for
/// another kind or for the broker's own words.
///
/// The fields are private, so that the text shown can never disagree with
/// the names the policy matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateNames {
    uri: Option<Box<str>>,
    dns: Vec<Box<str>>,
    cn: Option<Box<str>>,
    /// Written once per connection: every call's audit line shows it.
    shown: Box<str>,
}

impl CertificateNames {
    /// The names, with how the audit will show them. DNS names are kept
    /// in lower case: they are not case-sensitive, and `dns:` patterns are
    /// lowered too.
    pub fn new(uri: Option<Box<str>>, dns: Vec<Box<str>>, cn: Option<Box<str>>) -> Self {
        let dns: Vec<Box<str>> = dns
            .into_iter()
            .map(|name| name.to_ascii_lowercase().into_boxed_str())
            .collect();
        let mut shown = String::new();
        let mut add = |kind: &str, name: &str| {
            if !shown.is_empty() {
                shown.push_str(", ");
            }
            escape_into(&mut shown, kind, name);
        };
        if let Some(uri) = &uri {
            // `scheme://…` as it is (a SPIFFE id); any other URI with its
            // kind, or `dns:admin.internal` or `anonymous` written as a
            // URI SAN would read as another kind of name.
            // So is one that starts like a policy's kind prefix
            // (`dns://host/name`): written as it is, it would read as
            // that kind in a policy.
            let reads_as_a_kind = ["dns:", "cn:", "uri:"]
                .iter()
                .any(|kind| uri.starts_with(kind));
            add(
                if has_authority(uri) && !reads_as_a_kind {
                    ""
                } else {
                    "uri:"
                },
                uri,
            );
        }
        for name in &dns {
            add("dns:", name);
        }
        if let Some(cn) = &cn {
            add("cn:", cn);
        }
        if shown.is_empty() {
            shown.push_str(UNNAMED);
        }
        Self {
            uri,
            dns,
            cn,
            shown: shown.into(),
        }
    }

    /// The URI SAN (at most one is accepted).
    pub fn uri(&self) -> Option<&str> {
        self.uri.as_deref()
    }

    /// Every DNS SAN.
    pub fn dns(&self) -> impl Iterator<Item = &str> {
        self.dns.iter().map(AsRef::as_ref)
    }

    /// The subject CN, kept only when the certificate has no SAN.
    pub fn cn(&self) -> Option<&str> {
        self.cn.as_deref()
    }
}

impl Identity {
    /// A certificate identity with just a URI SAN.
    #[cfg(test)]
    pub fn uri(uri: &str) -> Self {
        Self::Certificate(Arc::new(CertificateNames::new(
            Some(uri.into()),
            Vec::new(),
            None,
        )))
    }

    /// Reads the identity of a DER certificate.
    ///
    /// Anything that could make two readers disagree about who this is
    /// refuses the certificate rather than guessing: a subjectAltName that
    /// cannot be parsed or holds an entry that cannot be read (falling back
    /// to the CN would let a certificate meant for another name pass as its
    /// CN), two URI SANs, two CNs (readers differ on which one counts).
    pub fn from_certificate(der: &[u8]) -> Self {
        let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
            return Self::Unnamed;
        };
        let Ok(san) = cert.subject_alternative_name() else {
            return Self::Refused(RefusedCertificate::UnreadableSan);
        };
        let sans: Vec<&GeneralName> = san
            .as_ref()
            .map(|ext| ext.value.general_names.iter().collect())
            .unwrap_or_default();
        if sans
            .iter()
            .any(|name| matches!(name, GeneralName::Invalid(..)))
        {
            return Self::Refused(RefusedCertificate::UnreadableSan);
        }
        let mut uris = sans.iter().filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
        let uri = uris.next();
        if uris.next().is_some() {
            return Self::Refused(RefusedCertificate::TwoUris);
        }
        let dns: Vec<Box<str>> = sans
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) if !dns.is_empty() => Some((*dns).into()),
                _ => None,
            })
            .collect();
        if dns.len() + usize::from(uri.is_some()) > MAX_NAMES {
            return Self::Refused(RefusedCertificate::TooManyNames);
        }
        // An empty subjectAltName still counts as one: the CN is a fallback
        // for certificates without the extension, not for a broken one.
        let cn = if san.is_none() {
            match common_name(&cert) {
                Ok(cn) => cn,
                Err(why) => return Self::Refused(why),
            }
        } else {
            None
        };
        let uri: Option<Box<str>> = uri.filter(|uri| !uri.is_empty()).map(Into::into);
        if uri.is_none() && dns.is_empty() && cn.is_none() {
            return Self::Unnamed;
        }
        let names = CertificateNames::new(uri, dns, cn);
        if names.shown.len() > MAX_SHOWN {
            return Self::Refused(RefusedCertificate::TooManyNames);
        }
        Self::Certificate(Arc::new(names))
    }
}

/// The subject's one CN, if it has one.
fn common_name(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Option<Box<str>>, RefusedCertificate> {
    let mut cns = cert.subject().iter_common_name();
    let Some(cn) = cns.next() else {
        return Ok(None);
    };
    if cns.next().is_some() {
        return Err(RefusedCertificate::TwoCns);
    }
    let cn = cn.as_str().map_err(|_| RefusedCertificate::UnreadableCn)?;
    Ok((!cn.is_empty()).then(|| cn.into()))
}

impl Identity {
    /// The identity as the audit log shows it: every name a grant may
    /// match, each with its kind (see `CertificateNames`). Control
    /// characters are escaped, so that a certificate cannot write lines of
    /// its own into a log.
    pub fn shown(&self) -> &str {
        match self {
            Self::Anonymous => ANONYMOUS,
            Self::Unnamed => UNNAMED,
            Self::Refused(why) => why.shown(),
            Self::Certificate(names) => &names.shown,
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.shown())
    }
}

const UNNAMED: &str = "(unnamed certificate)";

/// Whether `uri` starts with a scheme (a letter, then letters, digits,
/// `+`, `-`, `.`) and `://`.
fn has_authority(uri: &str) -> bool {
    uri.split_once("://").is_some_and(|(scheme, _)| {
        let mut chars = scheme.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// `prefix` and `text`, with every character Rust's `Debug` would escape
/// escaped the same way (`\n`, `\u{2028}`), except quotes: control
/// characters, the line and paragraph separators (line ends to Python's
/// `str.splitlines` and to JavaScript), invisible format characters
/// (bidirectional overrides, zero-width ones, the BOM), combining marks,
/// unassigned code points. What is left can neither break a log line nor
/// hide in it. Backslashes are escaped too, so that an escape is never
/// ambiguous, and commas (`\u{2c}`), which separate a certificate's names.
fn escape_into(shown: &mut String, prefix: &str, text: &str) {
    shown.reserve(prefix.len() + text.len());
    shown.push_str(prefix);
    for c in text.chars() {
        let escape = c.escape_debug();
        if c == ',' {
            shown.push_str("\\u{2c}");
        } else if escape.len() > 1 && !matches!(c, '"' | '\'') {
            shown.extend(escape);
        } else {
            shown.push(c);
        }
    }
}

/// The identity of a request: from its connection, or anonymous when the
/// connection is plaintext.
pub fn of_request<T>(request: &tonic::Request<T>) -> Identity {
    request
        .extensions()
        .get::<crate::transport::connection_info::ConnectionInfo>()
        .map_or(Identity::Anonymous, |info| info.identity.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(build: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        build(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn names(identity: Identity) -> CertificateNames {
        match identity {
            Identity::Certificate(names) => (*names).clone(),
            other => panic!("not a named certificate: {other:?}"),
        }
    }

    #[test]
    fn names_are_kept_by_kind() {
        let all = cert(|p| {
            p.subject_alt_names = vec![
                rcgen::SanType::DnsName("svc.internal".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://insurecove/auth-service".try_into().unwrap()),
            ];
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "cn-name");
        });
        let all = names(Identity::from_certificate(&all));
        assert_eq!(all.uri.as_deref(), Some("spiffe://insurecove/auth-service"));
        assert_eq!(all.dns, vec![Box::from("svc.internal")]);
        assert_eq!(all.cn, None, "a CN counts only without SANs");

        let cn = cert(|p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "cn-name")
        });
        let cn = Identity::from_certificate(&cn);
        assert_eq!(names(cn.clone()).cn.as_deref(), Some("cn-name"));
        assert_eq!(cn.to_string(), "cn:cn-name");
        assert_eq!(Identity::from_certificate(&cert(|_| {})), Identity::Unnamed);
        assert_eq!(
            Identity::from_certificate(b"not a certificate"),
            Identity::Unnamed
        );
    }

    #[test]
    fn two_uri_sans_are_refused() {
        let two = cert(|p| {
            p.subject_alt_names = vec![
                rcgen::SanType::URI("spiffe://insurecove/a".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://insurecove/ops".try_into().unwrap()),
            ];
        });
        let refused = Identity::from_certificate(&two);
        assert_eq!(refused, Identity::Refused(RefusedCertificate::TwoUris));
        // The audit tells one refused certificate from another.
        assert_eq!(
            refused.shown(),
            "(refused certificate: more than one URI SAN)"
        );
    }

    /// Every call's audit line shows every name, and the policy matches
    /// each: a certificate may carry 64 names and 8 KiB of them as shown,
    /// not thousands.
    #[test]
    fn certificates_with_too_many_or_too_long_names_are_refused() {
        let dns_names = |names: Vec<String>| {
            cert(move |p| {
                p.subject_alt_names = names
                    .into_iter()
                    .map(|name| rcgen::SanType::DnsName(name.try_into().unwrap()))
                    .collect();
            })
        };
        // As long as a StatefulSet pod's name in a Kubernetes cluster.
        let names_of = |count: usize| {
            (0..count)
                .map(|i| {
                    format!(
                        "orders-db-{i}.orders-db-headless.payments-production.svc.cluster.local"
                    )
                })
                .collect()
        };
        let most = Identity::from_certificate(&dns_names(names_of(MAX_NAMES)));
        assert!(matches!(most, Identity::Certificate(_)), "{most:?}");
        let too_many = Identity::from_certificate(&dns_names(names_of(MAX_NAMES + 1)));
        assert_eq!(
            too_many,
            Identity::Refused(RefusedCertificate::TooManyNames)
        );
        assert_eq!(
            too_many.shown(),
            "(refused certificate: too many or too long names)"
        );
        let why = RefusedCertificate::TooManyNames.why();
        assert!(
            why.contains(&format!("at most {MAX_NAMES} "))
                && why.contains(&format!("{MAX_SHOWN} bytes")),
            "the caller is told the limits in force: {why}"
        );
        // Few names, but each escaped six times over as the audit shows it.
        let commas = Identity::from_certificate(&dns_names(vec![",".repeat(1400)]));
        assert_eq!(commas, Identity::Refused(RefusedCertificate::TooManyNames));
        let long = Identity::from_certificate(&dns_names(vec!["a".repeat(600)]));
        assert!(matches!(long, Identity::Certificate(_)), "{long:?}");
    }

    /// DNS names are not case-sensitive: kept, matched and shown in lower
    /// case.
    #[test]
    fn dns_names_are_kept_in_lower_case() {
        let upper = cert(|p| {
            p.subject_alt_names = vec![rcgen::SanType::DnsName("API.Internal".try_into().unwrap())];
        });
        let upper = names(Identity::from_certificate(&upper));
        assert_eq!(upper.dns().collect::<Vec<_>>(), ["api.internal"]);
        assert_eq!(upper.shown.as_ref(), "dns:api.internal");
    }

    /// A certificate whose subjectAltName extension holds `san` (DER), and a
    /// CN that a lax reader could fall back to.
    fn cert_with_raw_san(san: &[u8]) -> Vec<u8> {
        cert(|p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "legacy-client");
            p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
                &[2, 5, 29, 17],
                san.to_vec(),
            )];
        })
    }

    #[test]
    fn a_broken_or_empty_san_does_not_fall_back_to_the_cn() {
        let uri = b"spiffe://insurecove/low-priv";
        // A URI SAN, then an entry that is not context-tagged: the whole
        // extension fails to parse.
        let mut unparsable = vec![0x30, (2 + uri.len() + 3) as u8, 0x86, uri.len() as u8];
        unparsable.extend_from_slice(uri);
        unparsable.extend_from_slice(&[0x0c, 0x01, b'x']);
        // A URI SAN that is not text, beside a good one.
        let mut not_text = vec![0x30, (3 + 2 + uri.len()) as u8, 0x86, 0x01, 0xff, 0x86];
        not_text.push(uri.len() as u8);
        not_text.extend_from_slice(uri);
        for (what, san) in [("unparsable", unparsable), ("not text", not_text)] {
            let identity = Identity::from_certificate(&cert_with_raw_san(&san));
            assert!(
                matches!(
                    identity,
                    Identity::Refused(RefusedCertificate::UnreadableSan)
                ),
                "{what}: {identity:?}"
            );
        }
        // An empty SAN: still a SAN, so the CN does not count.
        assert_eq!(
            Identity::from_certificate(&cert_with_raw_san(&[0x30, 0x00])),
            Identity::Unnamed
        );
        // The helper's own certificate: a good SAN is read as before.
        let mut good = vec![0x30, (2 + uri.len()) as u8, 0x86, uri.len() as u8];
        good.extend_from_slice(uri);
        assert_eq!(
            Identity::from_certificate(&cert_with_raw_san(&good)).to_string(),
            "spiffe://insurecove/low-priv"
        );
    }

    #[test]
    fn two_cns_without_a_san_are_refused() {
        let two = cert(|p| {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, "legacy-client");
            p.distinguished_name
                .push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), "someone");
        });
        assert!(matches!(
            Identity::from_certificate(&two),
            Identity::Refused(RefusedCertificate::TwoCns)
        ));
    }

    #[test]
    fn control_characters_are_escaped_when_shown() {
        let forged = cert(|p| {
            p.distinguished_name.push(
                rcgen::DnType::CommonName,
                "x\n2026 INFO audit: identity=spiffe://insurecove/ops",
            )
        });
        let shown = Identity::from_certificate(&forged).to_string();
        assert!(!shown.contains('\n'), "{shown}");
        assert!(shown.starts_with("cn:x\\n2026"), "{shown}");
    }

    #[test]
    fn names_are_escaped_once_with_their_kind() {
        for (text, shown) in [
            ("spiffe://insurecove/auth", "spiffe://insurecove/auth"),
            ("a\\b", "a\\\\b"),
            ("del\u{7f}", "del\\u{7f}"),
            ("tab\t", "tab\\t"),
            ("caf\u{e9}", "caf\u{e9}"),
            ("next\u{85}line", "next\\u{85}line"),
            ("line\u{2028}sep", "line\\u{2028}sep"),
            ("para\u{2029}sep", "para\\u{2029}sep"),
            ("admin\u{202e}nimda", "admin\\u{202e}nimda"),
            ("zero\u{200b}width", "zero\\u{200b}width"),
            ("\u{feff}bom", "\\u{feff}bom"),
            ("arabic\u{61c}mark", "arabic\\u{61c}mark"),
            ("soft\u{ad}hyphen", "soft\\u{ad}hyphen"),
            ("e\u{301}", "e\\u{301}"),
            ("quote\"space ok", "quote\"space ok"),
            ("a,b", "a\\u{2c}b"),
        ] {
            let uri = CertificateNames::new(Some(text.into()), Vec::new(), None);
            let kind = if text.contains("://") { "" } else { "uri:" };
            assert_eq!(uri.shown.as_ref(), format!("{kind}{shown}"), "{text:?}");
            let dns = CertificateNames::new(None, vec![text.into()], None);
            assert_eq!(dns.shown.as_ref(), format!("dns:{shown}"), "{text:?}");
            let cn = CertificateNames::new(None, Vec::new(), Some(text.into()));
            assert_eq!(cn.shown.as_ref(), format!("cn:{shown}"), "{text:?}");
        }
        let none = Identity::Certificate(Arc::new(CertificateNames::new(None, Vec::new(), None)));
        assert_eq!(none.to_string(), "(unnamed certificate)");
    }

    #[test]
    fn every_name_a_grant_may_match_is_shown_with_its_kind() {
        let shown = |uri: Option<&str>, dns: &[&str]| {
            let dns = dns.iter().map(|&name| name.into()).collect();
            CertificateNames::new(uri.map(Into::into), dns, None)
                .shown
                .into_string()
        };
        // A grant to dns:admin.internal reads as it: the line names it.
        assert_eq!(
            shown(Some("spiffe://insurecove/low"), &["admin.internal"]),
            "spiffe://insurecove/low, dns:admin.internal"
        );
        assert_eq!(
            shown(None, &["low.internal", "admin.internal"]),
            "dns:low.internal, dns:admin.internal"
        );
        // A URI SAN written like another kind, or like the broker's own
        // words, keeps its kind.
        for (uri, as_shown) in [
            ("dns:admin.internal", "uri:dns:admin.internal"),
            ("cn:legacy", "uri:cn:legacy"),
            ("anonymous", "uri:anonymous"),
            ("(unnamed certificate)", "uri:(unnamed certificate)"),
            ("dns:a, spiffe://x", "uri:dns:a\\u{2c} spiffe://x"),
            ("urn:uuid:1", "uri:urn:uuid:1"),
            ("https://svc.example/x", "https://svc.example/x"),
            // `dns://...` (RFC 4501) would read as `dns:` in a policy.
            ("dns://10.0.0.1/host", "uri:dns://10.0.0.1/host"),
            ("cn://x", "uri:cn://x"),
        ] {
            assert_eq!(
                shown(Some(uri), &["low.internal"]),
                format!("{as_shown}, dns:low.internal")
            );
        }
    }
}
