//! Reading a caller identity out of a client certificate or a mesh header.
//!
//! Each function takes what the transport saw and returns a [`CallerId`], or
//! says why there is none. Error messages describe the problem and never echo
//! a whole header: at most the offending character.

use x509_parser::objects::oid_registry;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::CallerId;

/// Longest identity accepted, in bytes (the SPIFFE limit for an id).
pub const MAX_IDENTITY_LEN: usize = 2048;

/// Longest `x-forwarded-client-cert` header read, in bytes. Envoy can put
/// URL-encoded certificates in it, so it is roomier than an identity.
const MAX_XFCC_LEN: usize = 64 * 1024;

/// Longest Linkerd identity: a DNS name.
const MAX_DNS_NAME_LEN: usize = 253;
const MAX_DNS_LABEL_LEN: usize = 63;

/// Why a request carries no usable caller identity. Either way the call is
/// `UNAUTHENTICATED`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// The configured source gave no identity (no certificate, no header, an
    /// empty header, or an XFCC element without a URI).
    #[error("no caller identity")]
    Missing,
    /// The source gave something that is not a valid identity.
    #[error("malformed caller identity: {0}")]
    Malformed(String),
}

fn malformed(reason: impl Into<String>) -> IdentityError {
    IdentityError::Malformed(reason.into())
}

/// HTTP optional whitespace, trimmed around elements, fields and values.
const OWS: &[char] = &[' ', '\t'];

/// The `URI=` field of the **last** element of an Envoy
/// `x-forwarded-client-cert` header: the element the local sidecar appended.
/// Earlier elements may come from the client and are only tokenized, never
/// believed.
///
/// Elements are `,`-separated, fields `;`-separated `Key=Value` pairs (keys
/// case-insensitive); a value may be double-quoted, with `\"` (or any `\x`)
/// escapes, and may then contain `,`, `;` and `=`. If the last element has
/// several URIs, the single `spiffe://` one wins; two SPIFFE ids (or two
/// non-SPIFFE URIs) are ambiguous and refused. An empty header, or a last
/// element without a non-empty `URI=`, is [`IdentityError::Missing`]; an
/// unterminated quote, a field without `=`, or an empty last element is
/// [`IdentityError::Malformed`].
pub fn caller_from_xfcc(header: &str) -> Result<CallerId, IdentityError> {
    if header.len() > MAX_XFCC_LEN {
        return Err(malformed(format!(
            "x-forwarded-client-cert is longer than {MAX_XFCC_LEN} bytes"
        )));
    }
    if header.trim_matches(OWS).is_empty() {
        return Err(IdentityError::Missing);
    }
    let elements = split_outside_quotes(header, b',')?;
    let last = elements.last().map_or("", |e| e.trim_matches(OWS));
    if last.is_empty() {
        return Err(malformed(
            "the last x-forwarded-client-cert element is empty",
        ));
    }
    let mut uris = Vec::new();
    for field in split_outside_quotes(last, b';')? {
        let (key, value) = parse_field(field)?;
        if key.eq_ignore_ascii_case("uri") && !value.is_empty() {
            uris.push(value);
        }
    }
    let spiffe: Vec<&String> = uris.iter().filter(|uri| is_spiffe(uri)).collect();
    let uri = match (spiffe.as_slice(), uris.as_slice()) {
        ([one], _) => *one,
        ([], []) => return Err(IdentityError::Missing),
        ([], [one]) => one,
        ([], _) => return Err(malformed("several URI fields and none is a SPIFFE id")),
        (_, _) => return Err(malformed("several SPIFFE URIs in the last element")),
    };
    check_uri(uri, "the XFCC URI")?;
    Ok(CallerId::new(uri.as_str()))
}

/// Splits `s` at each `sep` that is not inside a double-quoted run. Inside
/// quotes a backslash escapes the next byte. `sep`, `"` and `\` are ASCII, so
/// every split falls on a character boundary.
fn split_outside_quotes(s: &str, sep: u8) -> Result<Vec<&str>, IdentityError> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &byte) in s.as_bytes().iter().enumerate() {
        if escaped {
            escaped = false;
            continue;
        }
        match byte {
            b'\\' if in_quotes => escaped = true,
            b'"' => in_quotes = !in_quotes,
            b if b == sep && !in_quotes => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quotes {
        return Err(malformed(
            "unterminated quoted value in x-forwarded-client-cert",
        ));
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// One `Key=Value` field, the value unquoted.
fn parse_field(raw: &str) -> Result<(&str, String), IdentityError> {
    let field = raw.trim_matches(OWS);
    if field.is_empty() {
        return Err(malformed("empty field in x-forwarded-client-cert"));
    }
    let Some((key, value)) = field.split_once('=') else {
        return Err(malformed("x-forwarded-client-cert field without '='"));
    };
    let key = key.trim_matches(OWS);
    if key.is_empty() {
        return Err(malformed("x-forwarded-client-cert field without a name"));
    }
    if let Some(bad) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(malformed(format!(
            "character {bad:?} in an x-forwarded-client-cert field name"
        )));
    }
    Ok((key, unquote(value.trim_matches(OWS))?))
}

fn unquote(value: &str) -> Result<String, IdentityError> {
    let Some(inner) = value.strip_prefix('"') else {
        if value.contains('"') {
            return Err(malformed(
                "quote inside an unquoted x-forwarded-client-cert value",
            ));
        }
        return Ok(value.to_owned());
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(escaped) => out.push(escaped),
                None => break,
            },
            '"' if chars.as_str().is_empty() => return Ok(out),
            '"' => {
                return Err(malformed(
                    "text after a closing quote in x-forwarded-client-cert",
                ));
            }
            c => out.push(c),
        }
    }
    Err(malformed(
        "unterminated quoted value in x-forwarded-client-cert",
    ))
}

fn is_spiffe(uri: &str) -> bool {
    uri.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://"))
}

/// A URI identity: bounded, printable ASCII, no spaces.
fn check_uri(uri: &str, what: &str) -> Result<(), IdentityError> {
    if uri.len() > MAX_IDENTITY_LEN {
        return Err(malformed(format!(
            "{what} is longer than {MAX_IDENTITY_LEN} bytes"
        )));
    }
    if let Some(bad) = uri.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(malformed(format!("{what} contains {bad:?}")));
    }
    Ok(())
}

/// The Linkerd identity in `l5d-client-id`, e.g.
/// `web.default.serviceaccount.identity.linkerd.cluster.local`.
///
/// Surrounding whitespace is trimmed; an empty value is
/// [`IdentityError::Missing`]. The rest must be a DNS name: dot-separated
/// labels of 1 to 63 characters out of `a-z 0-9 -`, not starting or ending
/// with `-`, at most 253 bytes in all. Anything else is
/// [`IdentityError::Malformed`].
pub fn caller_from_l5d(header: &str) -> Result<CallerId, IdentityError> {
    let id = header.trim_matches(|c: char| c.is_ascii_whitespace());
    if id.is_empty() {
        return Err(IdentityError::Missing);
    }
    if id.len() > MAX_DNS_NAME_LEN {
        return Err(malformed(format!(
            "l5d-client-id is longer than {MAX_DNS_NAME_LEN} bytes"
        )));
    }
    for label in id.split('.') {
        if label.is_empty() {
            return Err(malformed("l5d-client-id has an empty label"));
        }
        if label.len() > MAX_DNS_LABEL_LEN {
            return Err(malformed(format!(
                "l5d-client-id has a label longer than {MAX_DNS_LABEL_LEN} bytes"
            )));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(malformed(format!(
                "l5d-client-id contains {bad:?} (use a-z 0-9 - .)"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(malformed(
                "l5d-client-id has a label starting or ending with '-'",
            ));
        }
    }
    Ok(CallerId::new(id))
}

/// The identity in a client certificate (DER; the TLS layer has verified the
/// chain, this only reads the leaf).
///
/// The single `spiffe://` URI SAN if there is one (non-SPIFFE URI SANs are
/// ignored; two SPIFFE ids are refused, as the SPIFFE spec allows one); else
/// the subject DN as x509-parser prints it (attributes in certificate order,
/// `, `-separated: `O=Example, CN=client`). No SPIFFE id and an empty subject
/// is [`IdentityError::Missing`]; bytes that are not exactly one DER
/// certificate are [`IdentityError::Malformed`].
pub fn caller_from_certificate(der: &[u8]) -> Result<CallerId, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| malformed(format!("client certificate is not DER X.509: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes after the client certificate"));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| malformed(format!("client certificate subjectAltName: {e}")))?;
    let spiffe: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) if is_spiffe(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [uri] => {
            check_uri(uri, "the certificate SPIFFE id")?;
            Ok(CallerId::new(*uri))
        }
        [] => {
            let subject = cert
                .subject()
                .to_string_with_registry(oid_registry())
                .map_err(|e| malformed(format!("client certificate subject: {e}")))?;
            if subject.is_empty() {
                return Err(IdentityError::Missing);
            }
            if subject.len() > MAX_IDENTITY_LEN {
                return Err(malformed(format!(
                    "client certificate subject is longer than {MAX_IDENTITY_LEN} bytes"
                )));
            }
            if let Some(bad) = subject.chars().find(|c| c.is_control()) {
                return Err(malformed(format!(
                    "client certificate subject contains {bad:?}"
                )));
            }
            Ok(CallerId::new(subject))
        }
        _ => Err(malformed("client certificate has several SPIFFE URI SANs")),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    use super::*;

    const PAYMENTS: &str = "spiffe://cluster.local/ns/payments/sa/api";

    fn id(s: &str) -> CallerId {
        CallerId::new(s)
    }

    fn is_malformed(r: Result<CallerId, IdentityError>) -> bool {
        matches!(r, Err(IdentityError::Malformed(_)))
    }

    #[test]
    fn xfcc_single_element() {
        let h = format!(
            "By=spiffe://cluster.local/ns/tb/sa/tokenbroker;Hash=468ed33b;Subject=\"\";URI={PAYMENTS}"
        );
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
        // Key case and whitespace around fields do not matter.
        assert_eq!(
            caller_from_xfcc(&format!(" hash=1 ; uri = {PAYMENTS} ")),
            Ok(id(PAYMENTS))
        );
    }

    #[test]
    fn xfcc_only_the_last_element_counts() {
        // The client sent the first element; the sidecar appended the second.
        let h = format!(
            "By=spiffe://x;URI=spiffe://cluster.local/ns/ops/sa/admin,By=spiffe://cluster.local/ns/tb/sa/tb;Hash=abc;URI={PAYMENTS}"
        );
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
        // A forged earlier element with a URI, appended to by a sidecar whose
        // element has none: no identity, never the forged one.
        let h = "URI=spiffe://cluster.local/ns/ops/sa/admin,By=spiffe://tb;Hash=abc;Subject=\"\"";
        assert_eq!(caller_from_xfcc(h), Err(IdentityError::Missing));
        // Quoted commas in an earlier element do not split it.
        let h = format!(
            "Subject=\"CN=evil,URI=spiffe://cluster.local/ns/ops/sa/admin\";URI=spiffe://evil,Hash=1;URI={PAYMENTS}"
        );
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
    }

    #[test]
    fn xfcc_quoted_values() {
        let h = format!(
            r#"By=spiffe://tb;Subject="CN=api, O=Pay;ments \"Inc\", L=a=b";URI="{PAYMENTS}""#
        );
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
        let h = format!(r#"Subject="x\\";URI={PAYMENTS}"#);
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
        // An escaped quote does not end the quoted run.
        let h = r#"Subject="a\",URI=spiffe://evil";URI=spiffe://good"#;
        assert_eq!(caller_from_xfcc(h), Ok(id("spiffe://good")));
        // Unquoted values may contain '='.
        assert_eq!(
            caller_from_xfcc("URI=https://example.com/?a=b"),
            Ok(id("https://example.com/?a=b"))
        );
    }

    #[test]
    fn xfcc_several_uris_in_the_last_element() {
        let h = format!("URI=https://example.com/x;URI={PAYMENTS};DNS=api.example.com");
        assert_eq!(caller_from_xfcc(&h), Ok(id(PAYMENTS)));
        let h = format!("URI={PAYMENTS};URI=spiffe://cluster.local/ns/ops/sa/admin");
        assert!(is_malformed(caller_from_xfcc(&h)));
        assert!(is_malformed(caller_from_xfcc(
            "URI=https://a.example;URI=https://b.example"
        )));
    }

    #[test]
    fn xfcc_without_uri_is_missing() {
        for h in [
            "By=spiffe://tb;Hash=abc;Subject=\"CN=client\"",
            "By=spiffe://tb;Hash=abc;Subject=\"\";URI=",
            "By=spiffe://tb;URI=\"\"",
            "",
            "   ",
        ] {
            assert_eq!(caller_from_xfcc(h), Err(IdentityError::Missing), "{h:?}");
        }
    }

    #[test]
    fn xfcc_garbage_is_malformed() {
        for h in [
            "URI=\"spiffe://unterminated",
            "URI=\"spiffe://a\\",
            "garbage",
            "=spiffe://x",
            "U RI=spiffe://x",
            "URI=spiffe://a\"b\"",
            "URI=\"spiffe://a\"b",
            "URI=spiffe://x;;Hash=1",
            &format!("URI={PAYMENTS},"),
            "URI=spiffe://has space",
            "URI=spiffe://tab\there",
        ] {
            assert!(is_malformed(caller_from_xfcc(h)), "{h:?}");
        }
    }

    #[test]
    fn xfcc_errors_do_not_echo_long_headers() {
        let secretish = "A".repeat(5000);
        for h in [
            format!("URI=\"{secretish}"),
            format!("{secretish};URI={secretish} x"),
            "x".repeat(MAX_XFCC_LEN + 1),
        ] {
            let err = caller_from_xfcc(&h).unwrap_err().to_string();
            assert!(err.len() <= 100, "{err}");
            assert!(!err.contains("AAAA"), "{err}");
        }
    }

    #[test]
    fn l5d_valid() {
        let ident = "web.default.serviceaccount.identity.linkerd.cluster.local";
        assert_eq!(caller_from_l5d(ident), Ok(id(ident)));
        assert_eq!(caller_from_l5d(&format!("  {ident}\t")), Ok(id(ident)));
        assert_eq!(caller_from_l5d("a-1.b2"), Ok(id("a-1.b2")));
    }

    #[test]
    fn l5d_empty_is_missing() {
        assert_eq!(caller_from_l5d(""), Err(IdentityError::Missing));
        assert_eq!(caller_from_l5d("  "), Err(IdentityError::Missing));
    }

    #[test]
    fn l5d_bad_charset_is_malformed() {
        let long_label = format!("{}.default", "a".repeat(64));
        let long_name = vec!["abcdefghi"; 30].join(".");
        for h in [
            "web.default!",
            "Web.default",
            "web default",
            "web..default",
            ".web",
            "web.",
            "-web.default",
            "web-.default",
            "web_1.default",
            "spiffe://cluster.local/ns/a/sa/b",
            "wéb.default",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(is_malformed(caller_from_l5d(h)), "{h:?}");
        }
    }

    fn certificate(sans: &[&str], subject: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        params.subject_alt_names = sans
            .iter()
            .map(|san| match san.strip_prefix("dns:") {
                Some(dns) => SanType::DnsName(dns.try_into().unwrap()),
                None => SanType::URI((*san).try_into().unwrap()),
            })
            .collect();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificate_with_spiffe_uri_san() {
        let der = certificate(
            &["dns:api.example.com", "https://example.com/x", PAYMENTS],
            &[(DnType::CommonName, "api")],
        );
        assert_eq!(caller_from_certificate(&der), Ok(id(PAYMENTS)));
    }

    #[test]
    fn certificate_without_spiffe_uri_uses_the_subject() {
        let der = certificate(&[], &[(DnType::CommonName, "client")]);
        assert_eq!(caller_from_certificate(&der), Ok(id("CN=client")));
        let der = certificate(
            &["https://example.com/not-spiffe", "dns:client.example.com"],
            &[
                (DnType::OrganizationName, "Example"),
                (DnType::CommonName, "client"),
            ],
        );
        assert_eq!(
            caller_from_certificate(&der),
            Ok(id("O=Example, CN=client"))
        );
    }

    #[test]
    fn certificate_with_two_spiffe_ids_is_malformed() {
        let der = certificate(
            &[PAYMENTS, "spiffe://cluster.local/ns/ops/sa/admin"],
            &[(DnType::CommonName, "client")],
        );
        assert!(is_malformed(caller_from_certificate(&der)));
    }

    #[test]
    fn certificate_without_any_name_is_missing() {
        let der = certificate(&["dns:client.example.com"], &[]);
        assert_eq!(caller_from_certificate(&der), Err(IdentityError::Missing));
    }

    #[test]
    fn garbage_der_is_malformed() {
        assert!(is_malformed(caller_from_certificate(b"")));
        assert!(is_malformed(caller_from_certificate(b"not a certificate")));
        let mut der = certificate(&[PAYMENTS], &[]);
        der.push(0);
        assert!(is_malformed(caller_from_certificate(&der)));
        der.truncate(der.len() / 2);
        assert!(is_malformed(caller_from_certificate(&der)));
    }
}
