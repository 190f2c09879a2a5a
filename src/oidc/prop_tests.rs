//! Properties of [`parse_token_response`] and [`jwt_exp`] over generated answers: no input makes
//! them panic, no error repeats a token from the body, and valid lifetimes land exactly on
//! `sent_at + n`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use proptest::prelude::*;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::{Map, Value, json};

use super::{
    EPOCH_SECONDS_THRESHOLD, Endpoint, MAX_ACCESS_LIFETIME, MAX_RETRY_AFTER, RefreshExpiry,
    jwt_exp, parse_token_response,
};

fn endpoint() -> Endpoint {
    let mut ep = Endpoint::new_default("prop", "https://idp.example/token", "client");
    ep.max_body_bytes = 64 * 1024;
    ep
}

fn sent_at() -> impl Strategy<Value = SystemTime> {
    (1_500_000_000u64..3_000_000_000, 0u32..1_000_000_000)
        .prop_map(|(secs, nanos)| UNIX_EPOCH + Duration::new(secs, nanos))
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![Just(200u16), Just(400), Just(401), Just(429), 100u16..1000]
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    prop::option::of(prop_oneof![
        "[0-9]{0,25}",
        ".{0,40}",
        Just("Wed, 25 Nov 2026 21:00:00 GMT".to_owned()),
    ])
    .prop_map(|retry_after| {
        let mut headers = HeaderMap::new();
        if let Some(value) = retry_after.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(RETRY_AFTER, value);
        }
        headers
    })
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

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

/// Objects shaped like token-endpoint answers, with values of any type.
fn arb_answer() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_owned),
        1 => ".{0,12}",
    ];
    prop::collection::btree_map(key, arb_json(), 0..10)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// A token-like string, long enough to be worth scrubbing.
fn token() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~-]{8,64}"
}

/// Text that contains `token`, possibly with a control character hidden inside it.
fn embedding(token: String) -> impl Strategy<Value = String> {
    let len = token.len();
    (
        ".{0,20}",
        ".{0,20}",
        0..=len,
        prop::option::of(prop::char::range('\0', '\u{1f}')),
    )
        .prop_map(move |(prefix, suffix, at, control)| {
            let control = control.map(String::from).unwrap_or_default();
            format!("{prefix}{}{control}{}{suffix}", &token[..at], &token[at..])
        })
}

/// A value for a field that may echo the refresh token.
fn echoing(token: String) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::String(token.clone()))),
        embedding(token).prop_map(|s| Some(Value::String(s))),
        arb_json().prop_map(Some),
    ]
}

/// An answer that carries `refresh_token` and echoes it in other fields.
fn answer_with_token() -> impl Strategy<Value = (String, Value)> {
    token().prop_flat_map(|token| {
        let codes = prop_oneof![
            Just(Some(json!("invalid_grant"))),
            Just(Some(json!("invalid_client"))),
            echoing(token.clone()),
        ];
        (
            Just(token.clone()),
            codes,
            echoing(token.clone()),
            echoing(token.clone()),
            echoing(token.clone()),
            prop::option::of(arb_json()),
        )
            .prop_map(
                |(token, error, description, token_type, access, expires_in)| {
                    let mut body = Map::new();
                    body.insert("refresh_token".into(), Value::String(token.clone()));
                    for (key, value) in [
                        ("error", error),
                        ("error_description", description),
                        ("token_type", token_type),
                        ("access_token", access),
                        ("expires_in", expires_in),
                    ] {
                        if let Some(value) = value {
                            body.insert(key.into(), value);
                        }
                    }
                    (token, Value::Object(body))
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(
        status in status(),
        headers in headers(),
        body in prop::collection::vec(any::<u8>(), 0..512),
        sent_at in sent_at(),
    ) {
        let _ = parse_token_response(status, &headers, &body, sent_at, &endpoint());
    }

    #[test]
    fn arbitrary_json_never_panics(
        status in status(),
        headers in headers(),
        body in arb_answer(),
        sent_at in sent_at(),
    ) {
        let body = body.to_string();
        let _ = parse_token_response(status, &headers, body.as_bytes(), sent_at, &endpoint());
    }

    #[test]
    fn arbitrary_tokens_never_panic_jwt_exp(
        token in prop_oneof![
            ".{0,200}",
            "[A-Za-z0-9_=-]{0,40}\\.[A-Za-z0-9_=-]{0,80}\\.[A-Za-z0-9_-]{0,10}",
        ],
    ) {
        let _ = jwt_exp(&token);
    }

    #[test]
    fn errors_never_repeat_the_refresh_token(
        status in status(),
        (token, body) in answer_with_token(),
        sent_at in sent_at(),
    ) {
        let body = body.to_string();
        match parse_token_response(status, &HeaderMap::new(), body.as_bytes(), sent_at, &endpoint()) {
            Err(err) => {
                let shown = format!("{err} {err:?}");
                prop_assert!(!shown.contains(&token), "{}", shown);
            }
            Ok(grant) => {
                let shown = format!("{grant:?}");
                prop_assert!(!shown.contains(&token), "{}", shown);
            }
        }
    }

    #[test]
    fn valid_lifetimes_round_trip(
        sent_at in sent_at(),
        lifetime in 1..=MAX_ACCESS_LIFETIME.as_secs(),
        refresh_lifetime in 1..EPOCH_SECONDS_THRESHOLD,
        as_strings in any::<bool>(),
    ) {
        let number = |n: u64| if as_strings { json!(n.to_string()) } else { json!(n) };
        let body = json!({
            "access_token": "opaque-access-token",
            "expires_in": number(lifetime),
            "refresh_expires_in": number(refresh_lifetime),
            "refresh_token": "next-refresh-token",
            "token_type": "Bearer",
        })
        .to_string();
        let grant = parse_token_response(200, &HeaderMap::new(), body.as_bytes(), sent_at, &endpoint())
            .unwrap();
        prop_assert_eq!(grant.sent_at, sent_at);
        prop_assert_eq!(grant.expires_at, sent_at + Duration::from_secs(lifetime));
        prop_assert_eq!(
            grant.refresh_expiry,
            RefreshExpiry::At(sent_at + Duration::from_secs(refresh_lifetime))
        );
    }

    #[test]
    fn the_jwt_exp_caps_the_stated_lifetime(
        sent_secs in 1_500_000_000u64..3_000_000_000,
        lifetime in 1u64..100_000,
        exp_offset in 1u64..100_000,
    ) {
        let sent_at = UNIX_EPOCH + Duration::from_secs(sent_secs);
        let exp = sent_secs + exp_offset;
        let token = format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{exp},"sub":"user"}}"#)),
        );
        prop_assert_eq!(jwt_exp(&token), Some(UNIX_EPOCH + Duration::from_secs(exp)));
        let body = json!({"access_token": token, "expires_in": lifetime}).to_string();
        let grant = parse_token_response(200, &HeaderMap::new(), body.as_bytes(), sent_at, &endpoint())
            .unwrap();
        prop_assert_eq!(grant.expires_at, sent_at + Duration::from_secs(lifetime.min(exp_offset)));
    }

    #[test]
    fn retry_after_seconds_are_kept_up_to_the_cap(delay in 0u64..100_000) {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from(delay));
        let err = parse_token_response(429, &headers, b"", UNIX_EPOCH, &endpoint()).unwrap_err();
        prop_assert_eq!(err.retry_after(), Some(Duration::from_secs(delay).min(MAX_RETRY_AFTER)));
    }
}
