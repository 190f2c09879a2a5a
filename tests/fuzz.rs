//! Fuzzing where input crosses a trust boundary, as bounded property tests
//! on stable Rust (proptest; `FUZZ_CASES` raises the case count of every
//! property for a longer session, default 256):
//!
//! - the token-endpoint parser (`oidc::parse_token_response`, `jwt_exp`)
//!   over arbitrary bytes, mutated valid answers, huge and odd numbers,
//!   deep nesting and wrong types: it never panics, every answer falls in
//!   the class its HTTP status allows, and no token of the body ever shows in
//!   an error;
//! - the request validators (`grpc::convert`, `SessionId`, labels) and the
//!   caller identity parsers (`auth`, the gate) over arbitrary strings,
//!   sizes and durations: they never panic, accept exactly what the contract
//!   accepts, and refuse with `INVALID_ARGUMENT` and a `BadRequest` naming a
//!   field that is actually wrong (or `UNAUTHENTICATED` for identities);
//! - raw gRPC frames of arbitrary bytes sent to a real server: each gets a
//!   gRPC status, and the server keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use tokenbroker::auth::{IdentitySource, Policy, PolicyHandle, caller_from_l5d, caller_from_xfcc};
use tokenbroker::error::BrokerError;
use tokenbroker::grpc::convert;
use tokenbroker::grpc::gate::Gate;
use tokenbroker::grpc::status::to_status;
use tokenbroker::oidc::{
    Endpoint, MAX_ACCESS_LIFETIME, Outcome, RefreshError, RejectedTarget, jwt_exp,
    parse_token_response,
};
use tokenbroker::pb;
use tokenbroker::session::SessionId;
use tonic::Code;
use tonic_types::StatusExt as _;

/// Cases per property: `FUZZ_CASES` (not a `TOKENBROKER_*` variable: those
/// are config keys), default 256.
fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    Config {
        cases: cases(),
        // A failure prints its minimal input; no regression files in the tree.
        failure_persistence: None,
        ..Config::default()
    }
}

// ------------------------------------------------------------ token responses

fn endpoint() -> Endpoint {
    let mut ep = Endpoint::new_default("fuzz", "https://idp.example/token", "client");
    ep.max_body_bytes = 16 * 1024;
    ep
}

fn sent_at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// The class an answer must fall in, from its status alone (the parser's
/// contract): 2xx a grant or unreadable with an unknown outcome; 408, 425,
/// 429, 5xx transient; 3xx rejected config; other 4xx rejected, transient
/// (OAuth's `temporarily_unavailable` …) or unreadable; anything else
/// unreadable. Nothing but a 2xx may say the IdP might have acted.
fn check_class(
    status: u16,
    result: &Result<tokenbroker::oidc::TokenGrant, RefreshError>,
) -> Result<(), String> {
    let ok = match (status, result) {
        (200..=299, Ok(grant)) => {
            let lifetime = grant
                .expires_at
                .duration_since(sent_at())
                .unwrap_or_default();
            lifetime > Duration::ZERO && lifetime <= MAX_ACCESS_LIFETIME
        }
        (200..=299, Err(RefreshError::Unreadable { outcome, .. })) => *outcome == Outcome::Unknown,
        (408 | 425 | 429 | 500..=599, Err(RefreshError::Transient { outcome, .. })) => {
            *outcome == Outcome::NotProcessed
        }
        (300..=399, Err(RefreshError::Rejected { target, .. })) => {
            *target == RejectedTarget::Config
        }
        (400..=499, Err(e)) => e.outcome() == Outcome::NotProcessed,
        (_, Err(RefreshError::Unreadable { outcome, .. })) => *outcome == Outcome::NotProcessed,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("HTTP {status} answered {result:?}"))
    }
}

/// A random token-like string: long and unlikely to appear by accident.
fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{24,48}".prop_map(|s| format!("SECRET{s}"))
}

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,12}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Numbers an IdP could send for a lifetime, the odd ones first.
fn lifetime_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1e308".to_owned()),
        Just("-1".to_owned()),
        Just("1.5e19".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("340282366920938463463374607431768211456".to_owned()),
        Just("\"99999999999999999999\"".to_owned()),
        Just("\"NaN\"".to_owned()),
        Just("\"inf\"".to_owned()),
        Just("1e-300".to_owned()),
        Just("0".to_owned()),
        Just("0.5".to_owned()),
        Just("-0".to_owned()),
        Just("1799999999999".to_owned()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() {
            f.to_string()
        } else {
            "1".into()
        }),
        (0u64..100_000).prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| format!("\"{n}\"")),
    ]
}

/// A Keycloak success answer carrying `access` and `refresh`, with
/// `expires_in` and `refresh_expires_in` as raw JSON number text.
fn keycloak_answer(
    access: &str,
    refresh: &str,
    expires_in: &str,
    refresh_expires_in: &str,
) -> String {
    format!(
        r#"{{"access_token":"{access}","expires_in":{expires_in},"refresh_expires_in":{refresh_expires_in},"refresh_token":"{refresh}","token_type":"Bearer","not-before-policy":0,"session_state":"5f1c","scope":"profile email"}}"#
    )
}

/// Byte-level mutations of a body: flips, cuts, insertions, duplications.
fn mutate(body: &[u8], edits: &[(u8, usize, u8)]) -> Vec<u8> {
    let mut out = body.to_vec();
    for &(kind, at, byte) in edits {
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = at % out.len();
        match kind % 5 {
            0 => out[at] ^= byte | 1,
            1 => out.truncate(at),
            2 => out.insert(at, byte),
            3 => {
                let end = (at + usize::from(byte % 16)).min(out.len());
                out.drain(at..end);
            }
            _ => {
                let end = (at + usize::from(byte % 32)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}

/// Every string in `text` of at least 8 characters taken from `secret`.
fn shows_part_of(text: &str, secret: &str) -> bool {
    secret
        .as_bytes()
        .windows(12)
        .any(|w| text.contains(std::str::from_utf8(w).unwrap_or("\u{0}")))
}

#[test]
fn parser_never_panics_on_bytes_and_classifies_by_status() {
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                prop_oneof![
                    Just(200u16),
                    Just(400),
                    Just(401),
                    Just(429),
                    Just(503),
                    0u16..1000
                ],
                prop::collection::vec(any::<u8>(), 0..2048),
                prop::option::of("[ -~]{0,30}"),
            ),
            |(status, body, retry_after)| {
                let mut headers = HeaderMap::new();
                if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
                    headers.insert("retry-after", value);
                }
                let result = parse_token_response(status, &headers, &body, sent_at(), &endpoint());
                check_class(status, &result).map_err(TestCaseError::fail)?;
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn mutated_answers_are_classified_and_never_show_a_token() {
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                prop_oneof![3 => Just(200u16), 1 => Just(400), 1 => 100u16..600],
                secret(),
                secret(),
                lifetime_value(),
                lifetime_value(),
                prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..6),
            ),
            |(status, access, refresh, expires_in, refresh_expires_in, edits)| {
                let body = keycloak_answer(&access, &refresh, &expires_in, &refresh_expires_in);
                let body = mutate(body.as_bytes(), &edits);
                let result =
                    parse_token_response(status, &HeaderMap::new(), &body, sent_at(), &endpoint());
                check_class(status, &result).map_err(TestCaseError::fail)?;
                if let Err(error) = &result {
                    let shown = format!("{error} {error:?}");
                    for token in [&access, &refresh] {
                        prop_assert!(!shows_part_of(&shown, token), "{shown}");
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn every_field_of_any_type_is_classified_and_scrubbed() {
    const FIELDS: &[&str] = &[
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "refresh_expires_in",
        "scope",
        "id_token",
        "error",
        "error_description",
    ];
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                prop_oneof![Just(200u16), Just(400), Just(401), 100u16..600],
                secret(),
                prop::collection::btree_map(prop::sample::select(FIELDS), any_json(), 0..9),
                any::<bool>(),
            ),
            |(status, token, fields, echo)| {
                let mut body: serde_json::Map<String, Value> =
                    fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                // The token sits in a token field, and maybe in every text the
                // IdP controls as well.
                body.insert("refresh_token".into(), json!(token));
                if echo {
                    for field in ["error", "error_description", "token_type"] {
                        body.insert(field.into(), json!(format!("bad {token} here")));
                    }
                }
                let body = Value::Object(body).to_string();
                let result = parse_token_response(
                    status,
                    &HeaderMap::new(),
                    body.as_bytes(),
                    sent_at(),
                    &endpoint(),
                );
                check_class(status, &result).map_err(TestCaseError::fail)?;
                let shown = match &result {
                    Err(error) => format!("{error} {error:?}"),
                    Ok(grant) => format!("{grant:?}"),
                };
                prop_assert!(!shown.contains(&token), "{}", shown);
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn deep_nesting_and_huge_bodies_are_refused_without_a_crash() {
    let endpoint = endpoint();
    for depth in [10, 127, 128, 129, 1_000, 100_000] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let inside =
            format!(r#"{{"access_token":{arrays},"expires_in":{arrays},"refresh_token":"x"}}"#);
        for body in [&arrays, &objects, &inside] {
            for status in [200, 400] {
                let result = parse_token_response(
                    status,
                    &HeaderMap::new(),
                    body.as_bytes(),
                    sent_at(),
                    &endpoint,
                );
                check_class(status, &result).unwrap();
                assert!(result.is_err(), "depth {depth}: {result:?}");
            }
        }
    }
    let huge = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(1 << 20));
    let result = parse_token_response(
        200,
        &HeaderMap::new(),
        huge.as_bytes(),
        sent_at(),
        &endpoint,
    );
    assert!(matches!(
        result,
        Err(RefreshError::Unreadable {
            outcome: Outcome::Unknown,
            ..
        })
    ));
}

#[test]
fn jwt_exp_never_panics_on_mutated_tokens() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                any_json(),
                lifetime_value(),
                prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..4),
            ),
            |(claims, exp, edits)| {
                let mut claims = match claims {
                    Value::Object(map) => map,
                    other => [("x".to_owned(), other)].into_iter().collect(),
                };
                if let Ok(exp) = serde_json::from_str::<Value>(&exp) {
                    claims.insert("exp".into(), exp);
                }
                let token = format!(
                    "{}.{}.sig",
                    b64.encode(r#"{"alg":"HS256"}"#),
                    b64.encode(Value::Object(claims).to_string())
                );
                let _ = jwt_exp(&token);
                let mutated =
                    String::from_utf8_lossy(&mutate(token.as_bytes(), &edits)).into_owned();
                let _ = jwt_exp(&mutated);
                Ok(())
            },
        )
        .unwrap();
}

// ------------------------------------------------------------ request validators

/// The documented session id rule.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".:_@/-".contains(c))
}

fn id_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:@/-]{0,140}",
        "[A-Za-z0-9._:@/ -]{1,20}",
        ".{0,40}",
        "\\PC{0,10}",
        (120usize..=130).prop_map(|n| "a".repeat(n)),
    ]
}

/// A refused request: INVALID_ARGUMENT with ErrorInfo and a BadRequest
/// naming one of `fields`.
fn refused_naming(error: &BrokerError, fields: &[&str]) -> Result<(), TestCaseError> {
    let BrokerError::InvalidArgument { field, .. } = error else {
        return Err(TestCaseError::fail(format!(
            "not INVALID_ARGUMENT: {error:?}"
        )));
    };
    prop_assert!(fields.contains(field), "named {field}, wrong: {fields:?}");
    let status = to_status(error);
    prop_assert_eq!(status.code(), Code::InvalidArgument);
    let info = status.get_details_error_info().expect("ErrorInfo");
    prop_assert_eq!(info.reason.as_str(), "INVALID_ARGUMENT");
    prop_assert_eq!(info.domain.as_str(), "tokenbroker.v1");
    let bad = status.get_details_bad_request().expect("BadRequest");
    prop_assert!(bad.field_violations.iter().any(|v| v.field == *field));
    Ok(())
}

#[test]
fn session_ids_are_accepted_exactly_by_the_rule() {
    let mut runner = TestRunner::new(config());
    runner
        .run(&id_strategy(), |id| {
            match SessionId::check(&id) {
                Ok(()) => prop_assert!(valid_id(&id), "accepted {id:?}"),
                Err(error) => {
                    prop_assert!(!valid_id(&id), "refused {id:?}");
                    refused_naming(&error, &["session_id"])?;
                }
            }
            prop_assert_eq!(SessionId::parse(&id).is_ok(), valid_id(&id));
            prop_assert_eq!(convert::session_id(&id).is_ok(), valid_id(&id));
            Ok(())
        })
        .unwrap();
}

/// Durations as a caller may send them: negative, huge, nanos out of range.
fn pb_duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    prop::option::of(
        prop_oneof![
            (0i64..100_000, 0i32..1_000_000_000),
            (any::<i64>(), any::<i32>()),
            (Just(i64::MIN), any::<i32>()),
            (Just(i64::MAX), any::<i32>()),
            (-3i64..3, -2_000_000_000i32..2_000_000_000),
        ]
        .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

/// The duration's sign and size, computed exactly (i128 nanoseconds).
fn nanos(d: &prost_types::Duration) -> i128 {
    i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos)
}

fn token_ok(token: &str, max: usize) -> bool {
    token.len() <= max && token.bytes().all(|b| b.is_ascii_graphic())
}

fn token_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[!-~]{1,64}",
        "[ -~]{1,64}",
        ".{1,20}",
        (1000usize..1100).prop_map(|n| "t".repeat(n)),
    ]
}

fn labels_strategy() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop_oneof![
        prop::collection::btree_map("[A-Za-z0-9._/-]{1,10}", "[a-z]{0,10}", 0..4),
        prop::collection::btree_map(".{0,70}", ".{0,300}", 0..4),
        prop::collection::btree_map("[a-z]{1,6}", Just(String::new()), 30..36),
    ]
}

#[test]
fn registrations_are_refused_exactly_when_a_field_is_wrong() {
    const MAX_TOKEN: usize = 1024;
    const YEAR: i128 = 366 * 24 * 3600 * 1_000_000_000;
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                prop_oneof![Just(String::new()), id_strategy()],
                token_strategy(),
                token_strategy(),
                pb_duration(),
                pb_duration(),
                prop_oneof![
                    Just(String::new()),
                    ".{0,20}",
                    (4090usize..4100).prop_map(|n| "s".repeat(n))
                ],
                prop_oneof![
                    Just(String::new()),
                    "[a-z]{1,10}",
                    (60usize..70).prop_map(|n| "p".repeat(n))
                ],
                labels_strategy(),
            ),
            |(id, refresh, access, expires_in, refresh_expires_in, scope, provider, labels)| {
                // What the contract says is wrong with this request.
                let mut wrong = Vec::new();
                if !id.is_empty() && !valid_id(&id) {
                    wrong.push("session_id");
                }
                if refresh.is_empty() || !token_ok(&refresh, MAX_TOKEN) {
                    wrong.push("refresh_token");
                }
                if !token_ok(&access, MAX_TOKEN) {
                    wrong.push("access_token");
                }
                if access.is_empty() && (expires_in.is_some() || !scope.is_empty()) {
                    wrong.push("access_token");
                }
                if let Some(d) = &expires_in
                    && (nanos(d) < 0 || nanos(d) > YEAR)
                {
                    wrong.push("expires_in");
                }
                if let Some(d) = &refresh_expires_in
                    && (nanos(d) < 0 || nanos(d) > 10 * YEAR)
                {
                    wrong.push("refresh_expires_in");
                }
                if scope.len() > 4096 {
                    wrong.push("scope");
                }
                if provider.len() > 64 {
                    wrong.push("provider");
                }
                let labels_ok = labels.len() <= 32
                    && labels.iter().all(|(k, v)| {
                        !k.is_empty()
                            && k.len() <= 63
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
                            && v.len() <= 256
                    });
                if !labels_ok {
                    wrong.push("labels");
                }
                let request = pb::RegisterSessionRequest {
                    session_id: id,
                    refresh_token: refresh.clone(),
                    provider,
                    access_token: access.clone(),
                    expires_in,
                    refresh_expires_in,
                    scope,
                    labels: labels.into_iter().collect(),
                    replace: false,
                };
                match convert::registration(request, MAX_TOKEN) {
                    Ok(_) => prop_assert!(wrong.is_empty(), "accepted, but wrong: {wrong:?}"),
                    Err(error) => {
                        prop_assert!(!wrong.is_empty(), "refused a valid request: {error:?}");
                        refused_naming(&error, &wrong)?;
                        let shown = format!("{error} {error:?} {:?}", to_status(&error));
                        for token in [&refresh, &access] {
                            prop_assert!(
                                token.len() < 8 || !shown.contains(token.as_str()),
                                "a token in {}",
                                shown
                            );
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn min_ttl_and_listings_are_refused_exactly_when_wrong() {
    let mut runner = TestRunner::new(config());
    runner
        .run(&pb_duration(), |ttl| {
            let wrong = ttl
                .as_ref()
                .is_some_and(|d| nanos(d) < 0 || nanos(d) > 24 * 3600 * 1_000_000_000);
            match convert::min_ttl(ttl) {
                Ok(_) => prop_assert!(!wrong),
                Err(error) => {
                    prop_assert!(wrong, "refused {error:?}");
                    refused_naming(&error, &["min_ttl"])?;
                }
            }
            Ok(())
        })
        .unwrap();
    runner
        .run(
            &(
                prop_oneof![0u32..1100, any::<u32>()],
                prop_oneof![Just(String::new()), id_strategy()],
                prop_oneof![0i32..3, any::<i32>()],
                labels_strategy(),
            ),
            |(page_size, page_token, state, label_selector)| {
                let mut wrong = Vec::new();
                if page_size > 1000 {
                    wrong.push("page_size");
                }
                if !page_token.is_empty() && !valid_id(&page_token) {
                    wrong.push("page_token");
                }
                if !(0..=2).contains(&state) {
                    wrong.push("state");
                }
                let labels_ok = label_selector.len() <= 32
                    && label_selector.iter().all(|(k, v)| {
                        !k.is_empty()
                            && k.len() <= 63
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
                            && v.len() <= 256
                    });
                if !labels_ok {
                    wrong.push("label_selector");
                }
                let request = pb::ListSessionsRequest {
                    page_size,
                    page_token,
                    state,
                    label_selector: label_selector.into_iter().collect(),
                };
                match convert::list_query(request) {
                    Ok(query) => {
                        prop_assert!(wrong.is_empty(), "accepted, wrong: {wrong:?}");
                        prop_assert!((1..=1000).contains(&query.page_size));
                    }
                    Err(error) => {
                        prop_assert!(!wrong.is_empty(), "refused {error:?}");
                        refused_naming(&error, &wrong)?;
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// The documented Linkerd identity rule: a DNS name of `a-z 0-9 -` labels.
fn valid_l5d(raw: &str) -> bool {
    let id = raw.trim_matches(|c: char| c.is_ascii_whitespace());
    !id.is_empty()
        && id.len() <= 253
        && id.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[test]
fn caller_identities_parse_by_the_rule_and_never_hold_control_characters() {
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &prop_oneof![
                "[a-z0-9.-]{0,80}",
                "[ a-z0-9.-]{0,20}",
                ".{0,60}",
                (250usize..260).prop_map(|n| "a".repeat(n)),
            ],
            |raw| {
                let parsed = caller_from_l5d(&raw);
                prop_assert_eq!(parsed.is_ok(), valid_l5d(&raw), "{:?}", parsed);
                if let Ok(id) = parsed {
                    prop_assert!(!id.as_str().chars().any(char::is_control));
                }
                Ok(())
            },
        )
        .unwrap();
    runner
        .run(
            &prop_oneof![
                ".{0,120}",
                "[A-Za-z=;,\" \\\\:/.]{0,80}",
                (
                    "[A-Za-z=;, ]{0,30}",
                    "(spiffe://[a-z./]{1,20}|https?://[a-z./]{0,20}|.{0,20})",
                    ".{0,10}"
                )
                    .prop_map(|(pre, uri, post)| format!("{pre}URI={uri}{post}")),
                (".{0,10}", ".{0,30}").prop_map(|(pre, uri)| format!("{pre},By=x;URI=\"{uri}\"")),
            ],
            |raw| {
                if let Ok(id) = caller_from_xfcc(&raw) {
                    prop_assert!(!id.as_str().is_empty());
                    prop_assert!(
                        !id.as_str().chars().any(char::is_control),
                        "{:?}",
                        id.as_str()
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}

#[test]
fn the_gate_answers_any_identity_header_with_a_caller_or_unauthenticated() {
    let gates: Vec<(IdentitySource, &str, Gate)> = [
        (IdentitySource::Linkerd, "l5d-client-id"),
        (IdentitySource::Xfcc, "x-forwarded-client-cert"),
    ]
    .into_iter()
    .map(|(source, header)| {
        (
            source,
            header,
            Gate::new(source, PolicyHandle::new(Policy::allow_all(), None), 10),
        )
    })
    .collect();
    let mut runner = TestRunner::new(config());
    runner
        .run(
            &(
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 0..3),
                prop::collection::vec("[ -~]{0,60}", 0..3),
            ),
            |(raw_values, text_values)| {
                for (source, header, gate) in &gates {
                    let mut request = tonic::Request::new(());
                    for value in &raw_values {
                        if let Ok(value) =
                            tonic::metadata::MetadataValue::try_from(value.as_slice())
                        {
                            request.metadata_mut().append(*header, value);
                        }
                    }
                    for value in &text_values {
                        if let Ok(value) = value.parse() {
                            request.metadata_mut().append(*header, value);
                        }
                    }
                    match gate.caller(&request) {
                        Ok(Some(caller)) => {
                            prop_assert!(!caller.as_str().chars().any(char::is_control));
                        }
                        Ok(None) => prop_assert!(false, "{source:?}: no caller without an error"),
                        Err(status) => {
                            prop_assert_eq!(status.code(), Code::Unauthenticated);
                            let info = status.get_details_error_info().expect("ErrorInfo");
                            prop_assert_eq!(info.reason.as_str(), "CALLER_UNAUTHENTICATED");
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

// ------------------------------------------------------------ raw gRPC frames

/// One unary call whose body is `body`; the gRPC status the server
/// answered (from the headers of a trailers-only answer or the trailers).
async fn raw_call(
    channel: tonic::transport::Channel,
    method: &str,
    body: Vec<u8>,
) -> Result<i32, String> {
    use axum::body::HttpBody as _;
    use tonic::codegen::Service as _;

    let request = http::Request::builder()
        .method("POST")
        .uri(format!("/tokenbroker.v1.TokenBroker/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(axum::body::Body::from(body)))
        .unwrap();
    let mut service = channel;
    std::future::poll_fn(|cx| service.poll_ready(cx))
        .await
        .map_err(|e| format!("not ready: {e}"))?;
    let response = service
        .call(request)
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let (parts, mut body) = response.into_parts();
    if let Some(status) = parts.headers.get("grpc-status") {
        return status
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("bad grpc-status".into());
    }
    loop {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
            None => return Err(format!("HTTP {} ended without a grpc-status", parts.status)),
            Some(Err(e)) => return Err(format!("body: {e}")),
            Some(Ok(frame)) => {
                if let Ok(trailers) = frame.into_trailers()
                    && let Some(status) = trailers.get("grpc-status")
                {
                    return status
                        .to_str()
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("bad grpc-status".into());
                }
            }
        }
    }
}

/// Message bytes framed as gRPC does: flag, big-endian length, payload.
fn frame(flag: u8, declared: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend_from_slice(&declared.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_of_arbitrary_bytes_get_a_status_and_the_server_keeps_serving() {
    let mut t = common::TestBroker::new().start().await;
    t.register_with_token("fuzz/alice", "alice", Duration::from_secs(600))
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", t.broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    const METHODS: &[&str] = &[
        "RegisterSession",
        "GetAccessToken",
        "WatchToken",
        "GetSession",
        "ListSessions",
        "DeleteSession",
        "NoSuchMethod",
    ];
    let bodies = (
        prop::sample::select(METHODS),
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..512).prop_map(|p| frame(0, p.len() as u32, &p)),
            (prop::collection::vec(any::<u8>(), 0..64), 1u32..100_000)
                .prop_map(|(p, extra)| frame(0, p.len() as u32 + extra, &p)),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|p| frame(1, p.len() as u32, &p)),
            (any::<u32>(), prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(declared, p)| frame(0, declared, &p)),
            (
                ".{0,140}",
                prop::collection::vec((any::<usize>(), any::<u8>()), 0..4)
            )
                .prop_map(|(id, flips)| {
                    let mut p = prost::Message::encode_to_vec(&pb::GetAccessTokenRequest {
                        session_id: id,
                        min_ttl: Some(prost_types::Duration {
                            seconds: -1,
                            nanos: 5,
                        }),
                        force_refresh: false,
                    });
                    for (at, bit) in flips {
                        if !p.is_empty() {
                            let at = at % p.len();
                            p[at] ^= 1 << (bit % 8);
                        }
                    }
                    frame(0, p.len() as u32, &p)
                }),
        ],
    );
    // proptest drives the inputs; the calls need the runtime, so they are
    // collected first and sent after.
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let mut inputs = Vec::new();
    for _ in 0..cases() {
        let tree = proptest::strategy::Strategy::new_tree(&bodies, &mut runner).unwrap();
        inputs.push(proptest::strategy::ValueTree::current(&tree));
    }
    for (method, body) in inputs {
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            raw_call(channel.clone(), method, body.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} with {body:?}: no answer within 10 s"));
        let code = answer.unwrap_or_else(|e| panic!("{method} with {body:?}: {e}"));
        assert!((0..=16).contains(&code), "{method}: grpc-status {code}");
    }
    // Still serving, on the same connection and on a new one.
    let token = t
        .get("fuzz/alice", None, false)
        .await
        .expect("still serving");
    assert!(!token.access_token.is_empty());
    let mut fresh = pb::token_broker_client::TokenBrokerClient::new(channel);
    fresh
        .get_session(pb::GetSessionRequest {
            session_id: "fuzz/alice".into(),
        })
        .await
        .expect("still serving on the fuzzed connection");
}

/// Regression: the most negative durations (`seconds: i64::MIN`) used to
/// overflow in prost's conversion (a panic in debug builds: the call was
/// reset instead of answered); they are invalid arguments like any
/// negative duration.
#[tokio::test]
async fn the_most_negative_durations_are_invalid_arguments() {
    let mut t = common::TestBroker::new().start().await;
    t.register_with_token("fuzz/bob", "bob", Duration::from_secs(600))
        .await;
    for nanos in [0, -1, -999_999_999, -1_000_000_000, i32::MIN] {
        let most_negative = prost_types::Duration {
            seconds: i64::MIN,
            nanos,
        };
        let answer = t
            .client
            .get_access_token(pb::GetAccessTokenRequest {
                session_id: "fuzz/bob".into(),
                min_ttl: Some(most_negative),
                force_refresh: false,
            })
            .await;
        let status = answer.expect_err("a negative min_ttl is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{nanos}: {status:?}");
        let bad = status.get_details_bad_request().expect("a BadRequest");
        assert_eq!(bad.field_violations[0].field, "min_ttl");
        let login = t.idp().login("carol");
        let answer = t
            .client
            .register_session(pb::RegisterSessionRequest {
                session_id: "fuzz/carol".into(),
                refresh_token: login.refresh_token.clone(),
                access_token: login.access_token.clone(),
                expires_in: Some(most_negative),
                ..Default::default()
            })
            .await;
        let status = answer.expect_err("a negative expires_in is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{nanos}: {status:?}");
    }
    // The broker still serves.
    t.get("fuzz/bob", None, false).await.expect("still serving");
}
