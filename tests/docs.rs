//! The README's `## Configuration reference` against the code, so that the
//! docs cannot drift: every config key (from `Config`'s serialized form) is
//! documented with its environment variable, type and default, no row names a
//! key the code lacks, the documented variables really set their keys, the
//! keys marked secret are the ones `--print-config` redacts, and the `serve`
//! flags and the other subcommands are the ones clap defines.
//!
//! When a key is added to `Config`, also give it a non-default value in
//! [`sample`] below: that is how its environment variable gets checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::CommandFactory as _;
use serde_json::Value;
use tokenbroker::auth::IdentitySource;
use tokenbroker::config::{
    AuthConfig, Config, LogFormat, PostgresConfig, ProviderConfig, RefreshConfig, StoreKind,
    TlsConfig,
};

const SECTION: &str = "## Configuration reference";
/// The provider map's key in documented paths.
const NAME: &str = "NAME";
/// The provider the environment round trip goes through.
const PROVIDER: &str = "apiax";
const CONFIG_HEADER: [&str; 6] = [
    "Key",
    "Type",
    "Default",
    "Environment variable",
    "`serve` flag",
    "Meaning",
];
const FLAG_HEADER: [&str; 3] = ["Flag", "Sets", "Default"];

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

// ---------------------------------------------------------------- the README

/// The lines of `## Configuration reference`, up to the next `## ` heading.
fn section(readme: &str) -> Vec<&str> {
    let mut lines = readme.lines().skip_while(|l| l.trim_end() != SECTION);
    assert!(
        lines.next().is_some(),
        "README.md has no `{SECTION}` section"
    );
    lines.take_while(|l| !l.starts_with("## ")).collect()
}

/// A markdown table: its header cells and its rows of cells.
type Table = (Vec<String>, Vec<Vec<String>>);

/// Markdown tables: a header row, a separator row, then rows.
fn tables(lines: &[&str]) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].trim_start().starts_with('|') {
            i += 1;
            continue;
        }
        let header = cells(lines[i]);
        i += 2; // the header and the `| --- |` separator
        let mut rows = Vec::new();
        while i < lines.len() && lines[i].trim_start().starts_with('|') {
            let row = cells(lines[i]);
            assert_eq!(
                row.len(),
                header.len(),
                "README table row has {} cells, its header {}: {}",
                row.len(),
                header.len(),
                lines[i]
            );
            rows.push(row);
            i += 1;
        }
        tables.push((header, rows));
    }
    tables
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    let line = line.strip_prefix('|').unwrap_or(line);
    let line = line.strip_suffix('|').unwrap_or(line);
    line.split('|').map(|c| c.trim().to_string()).collect()
}

/// The contents of the `code spans` of a cell.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

/// A cell that is exactly one code span.
fn single_code(cell: &str) -> Option<&str> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then_some(inner)
}

/// One row of the config tables.
#[derive(Debug)]
struct KeyRow {
    key: String,
    ty: String,
    default: String,
    env: String,
    flags: Vec<String>,
    meaning: String,
}

fn key_rows(readme: &str) -> Vec<KeyRow> {
    let mut rows = Vec::new();
    for (header, body) in tables(&section(readme)) {
        if header.first().map(String::as_str) != Some("Key") {
            continue;
        }
        assert_eq!(header, CONFIG_HEADER, "header of a config reference table");
        for cells in body {
            let key = single_code(&cells[0])
                .unwrap_or_else(|| panic!("key cell is not one `code span`: {:?}", cells[0]));
            let env = single_code(&cells[3])
                .unwrap_or_else(|| panic!("env cell of `{key}` is not one `code span`"));
            rows.push(KeyRow {
                key: key.to_string(),
                ty: cells[1].clone(),
                default: cells[2].clone(),
                env: env.to_string(),
                flags: code_spans(&cells[4])
                    .into_iter()
                    .filter(|s| s.starts_with("--"))
                    .map(str::to_string)
                    .collect(),
                meaning: cells[5].clone(),
            });
        }
    }
    assert!(!rows.is_empty(), "no config reference table found");
    rows
}

/// One row of the `serve` flags table.
#[derive(Debug)]
struct FlagRow {
    flag: String,
    takes_value: bool,
    sets: String,
    default: String,
}

fn flag_rows(readme: &str) -> Vec<FlagRow> {
    let mut rows = Vec::new();
    for (header, body) in tables(&section(readme)) {
        if header.first().map(String::as_str) != Some("Flag") {
            continue;
        }
        assert_eq!(header, FLAG_HEADER, "header of the `serve` flags table");
        for cells in body {
            let spec = single_code(&cells[0])
                .unwrap_or_else(|| panic!("flag cell is not one `code span`: {:?}", cells[0]));
            let mut words = spec.split_whitespace();
            rows.push(FlagRow {
                flag: words.next().unwrap_or_default().to_string(),
                takes_value: words.next().is_some(),
                sets: cells[1].clone(),
                default: cells[2].clone(),
            });
        }
    }
    assert!(!rows.is_empty(), "no `serve` flags table found");
    rows
}

/// `TOKENBROKER_` and the dotted path in capitals, `__` for each dot.
fn env_var_of(key: &str) -> String {
    format!(
        "TOKENBROKER_{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

// ------------------------------------------------------------------ the code

/// A configuration with every optional part filled in and every value
/// different from the default, so that setting it through the environment is
/// visible. A new key needs a value here (a test says so).
// The `..Default` updates are needless today; they keep this file compiling
// when a key is added, so that the tests can name the key instead.
// (`TlsConfig` has no `Default`: a new field of it is a compile error here.)
#[allow(clippy::needless_update)]
fn sample() -> Config {
    let provider = ProviderConfig {
        token_url: "https://idp.example/realms/x/protocol/openid-connect/token".into(),
        client_id: "sample-client".into(),
        client_secret: Some("sample-secret".into()),
        logout_url: Some("https://idp.example/logout".into()),
        revoke_url: Some("https://idp.example/revoke".into()),
        connect_timeout_ms: 2_000,
        request_timeout_ms: 9_000,
        allow_insecure_http: true,
        ca_file: Some(PathBuf::from("/etc/sample/idp-ca.pem")),
        max_concurrent_refreshes: 4,
        max_refreshes_per_second: 5,
        budget_max_wait_ms: 6_000,
        default_access_lifetime_secs: 900,
        default_refresh_lifetime_secs: 3_600,
        max_response_bytes: 65_536,
        ..ProviderConfig::default()
    };
    Config {
        listen: "127.0.0.2:6001".parse().unwrap(),
        admin_listen: Some("127.0.0.2:9090".parse().unwrap()),
        health_listen: Some("127.0.0.2:6002".parse().unwrap()),
        default_provider: "sample".into(),
        providers: BTreeMap::from([(PROVIDER.to_string(), provider)]),
        refresh: RefreshConfig {
            early_ratio: 0.6,
            jitter_ratio: 0.2,
            backoff_base_ms: 500,
            backoff_cap_secs: 120,
            on_demand_backoff_cap_ms: 2_500,
            keepalive_lead_secs: 300,
            clock_skew_secs: 10,
            default_min_ttl_secs: 90,
            ..RefreshConfig::default()
        },
        store: StoreKind::Postgres,
        data_dir: PathBuf::from("/srv/sample"),
        key_file: Some(PathBuf::from("/srv/sample/keys")),
        keys: Some("k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
        max_message_bytes: 131_072,
        max_token_bytes: 8_192,
        log_format: LogFormat::Json,
        otlp_endpoint: Some("http://collector.sample:4317".into()),
        shutdown_grace_secs: 21,
        drain_delay_secs: 3,
        tls: Some(TlsConfig {
            cert_file: PathBuf::from("/etc/sample/tls.crt"),
            key_file: PathBuf::from("/etc/sample/tls.key"),
            client_ca_file: Some(PathBuf::from("/etc/sample/ca.crt")),
        }),
        auth: AuthConfig {
            source: Some(IdentitySource::Mtls),
            policy_file: Some(PathBuf::from("/etc/sample/policy.toml")),
            insecure_no_auth: true,
            max_streams_per_caller: 7,
            max_streams_per_connection: 9,
            policy_poll_secs: 11,
            ..AuthConfig::default()
        },
        postgres: PostgresConfig {
            url: Some("postgres://sample@db/sample".into()),
            max_connections: 4,
            lease_secs: 60,
            connect_timeout_ms: 900,
            ..PostgresConfig::default()
        },
        ..Config::default()
    }
}

/// Leaves of a serialized config by dotted path; the provider map's keys
/// become `NAME`. An empty object is a leaf too, so a new map with no
/// default entries is still a key to document.
fn leaves(value: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, value) in map {
                    let key = if prefix == "providers" { NAME } else { key };
                    let path = if prefix.is_empty() {
                        key.to_string()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, value, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// The code's default of a documented path: `providers.NAME.*` from
/// `ProviderConfig::default()`; null for a field of an unset `Option` table.
fn default_of(path: &str) -> Value {
    let mut value = serde_json::to_value(Config::default()).unwrap();
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        if value.is_null() {
            return Value::Null;
        }
        value = if part == "providers" && parts.peek() == Some(&NAME) {
            parts.next();
            serde_json::to_value(ProviderConfig::default()).unwrap()
        } else {
            value
                .get(part)
                .unwrap_or_else(|| panic!("`{path}` is not in the default config"))
                .clone()
        };
    }
    value
}

/// Every key path of the code with its value in [`sample`]: the sample's
/// leaves (an `Option<Struct>` filled there counts by its fields), and any
/// leaf of the default config the sample does not cover (its value null).
fn code_keys() -> BTreeMap<String, Value> {
    let mut keys = leaves(&serde_json::to_value(sample()).unwrap());
    let defaults = leaves(&serde_json::to_value(Config::default()).unwrap());
    for path in defaults.keys() {
        let prefix = format!("{path}.");
        if !keys.keys().any(|p| p == path || p.starts_with(&prefix)) {
            keys.insert(path.clone(), Value::Null);
        }
    }
    keys
}

/// Keys whose environment variable [`sample`] cannot check: left unset or
/// at their default.
fn unsampled() -> Vec<String> {
    let mut problems = Vec::new();
    for (path, value) in code_keys() {
        if value.is_null() {
            problems.push(format!(
                "tests/docs.rs sample() leaves `{path}` unset: give it a value"
            ));
        } else if value == default_of(&path) {
            problems.push(format!(
                "tests/docs.rs sample() leaves `{path}` at its default: give it another value"
            ));
        }
    }
    problems
}

/// A sample value as an environment variable would carry it.
fn env_value(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn report(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "README `{SECTION}` has drifted from the code:\n  {}",
        problems.join("\n  ")
    );
}

// ----------------------------------------------------------------- the tests

#[test]
fn sample_sets_every_key() {
    assert!(unsampled().is_empty(), "{}", unsampled().join("\n"));
}

#[test]
fn every_config_key_is_documented_once_with_its_env_var() {
    let code = code_keys();
    let rows = key_rows(&readme());
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in &rows {
        if !documented.insert(row.key.as_str()) {
            problems.push(format!("`{}` has more than one row", row.key));
        }
        if !code.contains_key(&row.key) {
            problems.push(format!(
                "`{}` is documented but no such key exists",
                row.key
            ));
        }
        if row.env != env_var_of(&row.key) {
            problems.push(format!(
                "`{}`: environment variable is `{}`, should be `{}`",
                row.key,
                row.env,
                env_var_of(&row.key)
            ));
        }
    }
    for key in code.keys() {
        if !documented.contains(key.as_str()) {
            problems.push(format!("`{key}` has no row"));
        }
    }
    report(problems);
}

#[test]
fn documented_types_and_defaults_are_the_codes() {
    let code = code_keys();
    let mut problems = Vec::new();
    // The prose says: one provider by default, `apiax`, and a provider table
    // you add starts from the same values as it.
    assert_eq!(
        serde_json::to_value(&Config::default().providers).unwrap(),
        Value::Object(serde_json::Map::from_iter([(
            PROVIDER.to_string(),
            serde_json::to_value(ProviderConfig::default()).unwrap()
        )])),
        "the default providers are no longer just `apiax` with ProviderConfig::default()"
    );
    for row in key_rows(&readme()) {
        let Some(sample) = code.get(&row.key) else {
            continue; // reported by the other test
        };
        let default = default_of(&row.key);
        let documented = if row.default == "unset" {
            Some(Value::Null)
        } else {
            single_code(&row.default).and_then(|s| serde_json::from_str::<Value>(s).ok())
        };
        match documented {
            None => problems.push(format!(
                "`{}`: default {:?} is neither `unset` nor one `code span` with a value",
                row.key, row.default
            )),
            Some(documented) if documented != default => problems.push(format!(
                "`{}`: documented default {}, the code's is {}",
                row.key,
                row.default,
                if default.is_null() {
                    "unset".to_string()
                } else {
                    format!("`{default}`")
                }
            )),
            Some(_) => {}
        }
        let type_ok = sample.is_null() // reported by `sample_sets_every_key`
            || match row.ty.as_str() {
            "integer" => sample.is_u64() || sample.is_i64(),
            "float" => sample.is_f64(),
            "boolean" => sample.is_boolean(),
            "string" | "address" | "path" | "URL" => sample.is_string(),
            ty if ty.starts_with("enum:") => {
                sample.as_str().is_some_and(|s| code_spans(ty).contains(&s))
            }
            _ => false,
        };
        if !type_ok {
            problems.push(format!(
                "`{}`: type {:?} does not fit the code's value {sample}",
                row.key, row.ty
            ));
        }
    }
    report(problems);
}

#[test]
fn documented_env_vars_set_their_keys() {
    let code = code_keys();
    let rows = key_rows(&readme());
    let provider_env = format!("__{}__", PROVIDER.to_ascii_uppercase());
    let env_of = |row: &KeyRow| row.env.replace(&format!("__{NAME}__"), &provider_env);
    let env: Vec<(String, String)> = rows
        .iter()
        .filter_map(|row| {
            let value = code.get(&row.key).filter(|v| !v.is_null())?;
            Some((env_of(row), env_value(value)))
        })
        .collect();
    let mut problems = Vec::new();
    match Config::load(None, env) {
        Err(e) => problems.push(format!("the documented variables do not load: {e}")),
        Ok(loaded) => {
            let loaded = leaves(&serde_json::to_value(loaded).unwrap());
            for row in &rows {
                let Some(want) = code.get(&row.key).filter(|v| !v.is_null()) else {
                    continue;
                };
                if loaded.get(&row.key) != Some(want) {
                    problems.push(format!(
                        "`{}={}` left `{}` at {:?}",
                        env_of(row),
                        env_value(want),
                        row.key,
                        loaded.get(&row.key)
                    ));
                }
            }
        }
    }
    // Every value an enum row lists is accepted.
    for row in rows.iter().filter(|r| r.ty.starts_with("enum:")) {
        for variant in code_spans(&row.ty) {
            let var = env_of(row);
            match Config::load(None, [(var.clone(), variant.to_string())]) {
                Ok(loaded) => {
                    let loaded = leaves(&serde_json::to_value(loaded).unwrap());
                    if loaded.get(&row.key).and_then(Value::as_str) != Some(variant) {
                        problems.push(format!("`{var}={variant}` did not set `{}`", row.key));
                    }
                }
                Err(e) => problems.push(format!("`{var}={variant}` is rejected: {e}")),
            }
        }
    }
    report(problems);
}

#[test]
fn keys_marked_secret_are_the_ones_print_config_redacts() {
    let printed: toml::Value = toml::from_str(&sample().redacted_toml()).unwrap();
    let redacted: BTreeSet<String> = leaves(&serde_json::to_value(printed).unwrap())
        .into_iter()
        .filter(|(_, v)| v.as_str() == Some("[redacted]"))
        .map(|(k, _)| k)
        .collect();
    assert!(
        !redacted.is_empty(),
        "nothing redacted: is the sample wrong?"
    );
    let mut problems = Vec::new();
    for row in key_rows(&readme()) {
        let marked = row.meaning.contains("never printed");
        let is_secret = redacted.contains(&row.key);
        if is_secret && !(marked && row.meaning.contains("prefer the env var")) {
            problems.push(format!(
                "`{}` is redacted by --print-config: say \"never printed; prefer the env var\"",
                row.key
            ));
        }
        if marked && !is_secret {
            problems.push(format!(
                "`{}` is marked never printed, but --print-config shows it",
                row.key
            ));
        }
    }
    report(problems);
}

#[test]
fn every_serve_flag_is_documented_and_exists() {
    let cli = tokenbroker::cli::Cli::command();
    let serve = cli.find_subcommand("serve").expect("a `serve` subcommand");
    let args: BTreeMap<String, &clap::Arg> = serve
        .get_arguments()
        .filter_map(|a| Some((format!("--{}", a.get_long()?), a)))
        .filter(|(long, _)| long != "--help" && long != "--version")
        .collect();
    let readme = readme();
    let flags = flag_rows(&readme);
    let keys = key_rows(&readme);
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in &flags {
        if !documented.insert(row.flag.as_str()) {
            problems.push(format!("`{}` has more than one row", row.flag));
        }
        let Some(arg) = args.get(&row.flag) else {
            problems.push(format!(
                "`{}` is documented but `serve` has no such flag",
                row.flag
            ));
            continue;
        };
        if arg.get_action().takes_values() != row.takes_value {
            problems.push(format!(
                "`{}`: {}, the table says otherwise",
                row.flag,
                if row.takes_value {
                    "takes no value"
                } else {
                    "takes a value"
                }
            ));
        }
        if arg.get_action().takes_values() {
            for default in arg.get_default_values() {
                let default = default.to_string_lossy();
                if !code_spans(&row.default).contains(&default.as_ref()) {
                    problems.push(format!(
                        "`{}`: clap's default is `{default}`, the table says {:?}",
                        row.flag, row.default
                    ));
                }
            }
        }
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            if !code_spans(&row.sets).contains(&env.as_ref()) {
                problems.push(format!("`{}`: its variable `{env}` is not named", row.flag));
            }
        }
        // A key named in "Sets" lists this flag in its own row.
        for key in &keys {
            if code_spans(&row.sets).contains(&key.key.as_str()) && !key.flags.contains(&row.flag) {
                problems.push(format!(
                    "`{}` sets `{}`, whose row does not name it",
                    row.flag, key.key
                ));
            }
        }
    }
    for flag in args.keys() {
        if !documented.contains(flag.as_str()) {
            problems.push(format!("`serve {flag}` has no row in the flags table"));
        }
    }
    // A flag named in a key's row exists and its row says it sets that key.
    for key in &keys {
        for flag in &key.flags {
            match flags.iter().find(|f| &f.flag == flag) {
                None => problems.push(format!(
                    "`{}` names `{flag}`, which the flags table lacks",
                    key.key
                )),
                Some(f) if !code_spans(&f.sets).contains(&key.key.as_str()) => {
                    problems.push(format!(
                        "`{}` names `{flag}`, whose row does not say it sets it",
                        key.key
                    ))
                }
                Some(_) => {}
            }
        }
    }
    report(problems);
}

#[test]
fn every_other_subcommand_is_listed() {
    let cli = tokenbroker::cli::Cli::command();
    let code: BTreeSet<String> = cli
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|name| name != "serve" && name != "help")
        .collect();
    let readme = readme();
    let listed: BTreeSet<String> = section(&readme)
        .iter()
        .filter(|l| l.starts_with("- "))
        .flat_map(|l| code_spans(l))
        .filter_map(|s| {
            s.strip_prefix("tokenbroker ")?
                .strip_suffix(" --help")
                .map(str::to_string)
        })
        .collect();
    assert_eq!(
        listed, code,
        "README `{SECTION}`: subcommands listed (`tokenbroker CMD --help`) vs defined"
    );
}

#[test]
fn readme_starts_with_the_setup_commands() {
    let readme = readme();
    let head: String = readme.lines().take(10).collect::<Vec<_>>().join("\n");
    for command in ["cargo run --release -- serve --dev", "./scripts/test"] {
        assert!(
            head.contains(command),
            "the first lines of README.md lost `{command}`"
        );
    }
}
