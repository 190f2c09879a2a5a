//! Runs [`parse_token_response`] over every case of `tests/fixtures/token-endpoint-responses.json`
//! (DESIGN §1) and checks its class and expectations. A case, class or expectation this test does
//! not know fails it, so the fixture cannot grow untested.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::Value;

use super::{Endpoint, ErrorClass, RefreshExpiry, TokenGrant, parse_token_response};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/token-endpoint-responses.json"
);

/// The fixture's "now": 2026-11-25T20:46:22Z, the instant at which its absolute values (the
/// epoch-millisecond `expires_in`, the JWT `exp`) both mean "in 1800 s".
const NOW: u64 = 1_795_639_582;

/// The provider default that "refresh_expires_at: provider default" refers to.
const DEFAULT_REFRESH: Duration = Duration::from_secs(7 * 86_400);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    #[allow(dead_code)]
    about: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    status: u16,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
    body_generator: Option<String>,
    class: String,
    #[serde(default)]
    expect: BTreeMap<String, Value>,
}

/// What a case expects: a grant, or an error of this class.
fn expected_class(class: &str) -> Option<Option<ErrorClass>> {
    Some(match class {
        "ok" => None,
        "rejected_session" => Some(ErrorClass::RejectedSession),
        "rejected_config" => Some(ErrorClass::RejectedConfig),
        "transient" => Some(ErrorClass::Transient),
        "unreadable" => Some(ErrorClass::Unreadable),
        _ => return None,
    })
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `"now+1800"` → NOW + 1800; `"1795641382 (absolute) …"` → that instant.
fn instant(spec: &str) -> Option<SystemTime> {
    if let Some(offset) = spec.strip_prefix("now+") {
        return offset.trim().parse().ok().map(|n: u64| at(NOW + n));
    }
    let digits: String = spec.chars().take_while(char::is_ascii_digit).collect();
    let rest = &spec[digits.len()..];
    if digits.is_empty() || !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    digits.parse().ok().map(at)
}

fn body_of(case: &Case) -> Result<Vec<u8>, String> {
    match (&case.body, case.body_generator.as_deref()) {
        (Some(body), None) => Ok(body.clone().into_bytes()),
        (None, Some("a JSON object padded to 10 MiB")) => {
            let mut body =
                br#"{"access_token":"AT","expires_in":1800,"token_type":"bearer","padding":""#
                    .to_vec();
            body.resize(10 * 1024 * 1024 - 2, b'x');
            body.extend_from_slice(br#""}"#);
            assert!(serde_json::from_slice::<Value>(&body).is_ok());
            Ok(body)
        }
        (None, Some(other)) => Err(format!("unknown body_generator {other:?}")),
        _ => Err("needs exactly one of body and body_generator".to_owned()),
    }
}

fn headers_of(case: &Case) -> HeaderMap {
    case.headers
        .iter()
        .map(|(name, value)| {
            (
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            )
        })
        .collect()
}

/// Checks one `expect` entry against the result; `Err` says what is wrong.
fn check_expectation(
    key: &str,
    value: &Value,
    result: &Result<TokenGrant, super::RefreshError>,
) -> Result<(), String> {
    let grant = || {
        result
            .as_ref()
            .map_err(|e| format!("{key}: no grant ({e})"))
    };
    match (key, value) {
        ("expires_at", Value::String(spec)) => {
            let want = instant(spec).ok_or_else(|| format!("unknown expires_at {spec:?}"))?;
            let got = grant()?.expires_at;
            (got == want)
                .then_some(())
                .ok_or_else(|| format!("expires_at {got:?}, want {want:?}"))
        }
        ("refresh_expires_at", Value::String(spec)) => {
            let want = match spec.as_str() {
                "none" => RefreshExpiry::Never,
                "provider default" => RefreshExpiry::At(at(NOW) + DEFAULT_REFRESH),
                other => RefreshExpiry::At(
                    instant(other)
                        .ok_or_else(|| format!("unknown refresh_expires_at {other:?}"))?,
                ),
            };
            let got = grant()?.refresh_expiry;
            (got == want)
                .then_some(())
                .ok_or_else(|| format!("refresh_expiry {got:?}, want {want:?}"))
        }
        ("rotated", Value::Bool(want)) => {
            let got = grant()?.rotated();
            (got == *want)
                .then_some(())
                .ok_or_else(|| format!("rotated {got}, want {want}"))
        }
        // Every grant is a bearer grant: other types are refused.
        ("token_type", Value::String(want)) => {
            grant()?;
            want.eq_ignore_ascii_case("bearer")
                .then_some(())
                .ok_or_else(|| format!("grants are bearer, fixture wants {want:?}"))
        }
        ("retry_after_s", Value::Number(want)) => {
            let got = result.as_ref().err().and_then(|e| e.retry_after());
            let want = want.as_u64().map(Duration::from_secs);
            (got.is_some() && got == want)
                .then_some(())
                .ok_or_else(|| format!("retry_after {got:?}, want {want:?}"))
        }
        _ => Err(format!("unknown expectation {key}: {value}")),
    }
}

#[test]
fn every_fixture_case_is_classified_as_specified() {
    let text = std::fs::read_to_string(FIXTURE).unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 27, "the fixture lost cases");

    let mut endpoint = Endpoint::new_default(
        "apiax",
        "https://auth.apiax.io/auth/realms/apiax/protocol/openid-connect/token",
        "integration-api",
    );
    endpoint.default_refresh_lifetime = Some(DEFAULT_REFRESH);
    endpoint.validate().unwrap();

    let mut failures = Vec::new();
    let mut checked_expectations = 0;
    for case in &fixture.cases {
        let mut fail = |why: String| failures.push(format!("{:?}: {why}", case.name));
        let Some(want) = expected_class(&case.class) else {
            fail(format!("unknown class {:?}", case.class));
            continue;
        };
        let body = match body_of(case) {
            Ok(body) => body,
            Err(why) => {
                fail(why);
                continue;
            }
        };
        let result =
            parse_token_response(case.status, &headers_of(case), &body, at(NOW), &endpoint);
        let got = result.as_ref().err().map(|e| e.class());
        if got != want {
            fail(format!("class {got:?}, want {want:?} ({result:?})"));
            continue;
        }
        if let Err(e) = &result {
            // A fixture token must never reach an error message.
            for token in ["\"AT\"", "RT2", "eyJ"] {
                if e.to_string().contains(token) {
                    fail(format!("error echoes {token}: {e}"));
                }
            }
        }
        for (key, value) in &case.expect {
            checked_expectations += 1;
            if let Err(why) = check_expectation(key, value, &result) {
                fail(why);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked_expectations >= 10, "expectations went unchecked");
}

#[test]
fn the_oversized_case_is_refused_by_size_not_by_shape() {
    // Without the cap, the padded object would be a valid grant.
    let endpoint = {
        let mut ep = Endpoint::new_default("apiax", "https://idp.example/token", "c");
        ep.max_body_bytes = super::MAX_BODY_BYTES_LIMIT;
        ep
    };
    let case = Case {
        name: "oversized".into(),
        status: 200,
        headers: BTreeMap::new(),
        body: None,
        body_generator: Some("a JSON object padded to 10 MiB".into()),
        class: "unreadable".into(),
        expect: BTreeMap::new(),
    };
    let body = body_of(&case).unwrap();
    let grant = parse_token_response(200, &HeaderMap::new(), &body, at(NOW), &endpoint);
    assert!(grant.is_ok(), "{grant:?}");
    let err = parse_token_response(
        200,
        &HeaderMap::new(),
        &body,
        at(NOW),
        &Endpoint::new_default("apiax", "https://idp.example/token", "c"),
    )
    .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unreadable);
    assert!(err.outcome_unknown());
}

#[test]
fn instant_specs_parse() {
    assert_eq!(instant("now+1800"), Some(at(NOW + 1800)));
    assert_eq!(instant("1795641382 (from exp)"), Some(at(1_795_641_382)));
    assert_eq!(instant("provider default"), None);
    assert_eq!(instant("17x"), None);
}
