//! Prometheus metrics: the names the binary exports (one list, which the
//! dashboard in `deploy/` is checked against), their descriptions, and the
//! process-wide recorder rendered on the admin port's `/metrics`.
//!
//! Labels carry only bounded values — provider names, triggers, outcomes,
//! gRPC methods and codes, session states — never a session id or a secret.

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Refreshes by `provider`, `trigger` (`on_demand`, `forced`, `ahead`,
/// `keep_alive`) and `outcome` (`ok`, `rejected`, `transient`,
/// `unreadable`, `store_failed`, `elsewhere`).
pub const REFRESHES: &str = "tokenbroker_refreshes_total";
/// Upstream token-endpoint latency by `provider` and `outcome`.
pub const UPSTREAM_SECONDS: &str = "tokenbroker_upstream_request_duration_seconds";
/// gRPC requests by `method` and `code`.
pub const RPCS: &str = "tokenbroker_grpc_requests_total";
/// gRPC handling time by `method` (unary calls; a stream's time to open).
pub const RPC_SECONDS: &str = "tokenbroker_grpc_request_duration_seconds";
/// Sessions held, by `state` (`active`, `reauth_required`).
pub const SESSIONS: &str = "tokenbroker_sessions";
/// Open `WatchToken` streams.
pub const WATCH_STREAMS: &str = "tokenbroker_watch_streams";
/// Sessions waiting in the refresh timer queue.
pub const QUEUE_DEPTH: &str = "tokenbroker_refresh_queue_depth";
/// How late a planned refresh started, behind its schedule.
pub const REFRESH_LAG: &str = "tokenbroker_refresh_lag_seconds";
/// Remaining lifetime of the access tokens handed out.
pub const TOKEN_REMAINING: &str = "tokenbroker_served_token_remaining_seconds";
/// Time spent waiting for the IdP budget, by `provider` and `priority`
/// (`urgent`, `background`).
pub const BUDGET_WAIT: &str = "tokenbroker_budget_wait_seconds";
/// 1 while the store accepts writes, else 0.
pub const STORE_UP: &str = "tokenbroker_store_up";
/// 1 while the last refresh against `provider` got an answer from it, else 0.
pub const PROVIDER_UP: &str = "tokenbroker_provider_up";
/// Refresh-lease claims in HA mode, by `outcome` (`granted`, `held`,
/// `moved`, `gone`, `error`).
pub const LEASE_CLAIMS: &str = "tokenbroker_lease_claims_total";
/// Always 1, with the `version` label.
pub const BUILD_INFO: &str = "tokenbroker_build_info";

/// Every metric the binary exports (base names, without the histogram
/// suffixes `_bucket`, `_sum`, `_count`).
pub const ALL: &[&str] = &[
    REFRESHES,
    UPSTREAM_SECONDS,
    RPCS,
    RPC_SECONDS,
    SESSIONS,
    WATCH_STREAMS,
    QUEUE_DEPTH,
    REFRESH_LAG,
    TOKEN_REMAINING,
    BUDGET_WAIT,
    STORE_UP,
    PROVIDER_UP,
    LEASE_CLAIMS,
    BUILD_INFO,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same
/// handle). `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let lifetime = [
                0.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1200.0, 1800.0, 3600.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(TOKEN_REMAINING.into()), &lifetime)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                })
                .ok()?
                .install_recorder()
                .ok()?;
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Present from the start, so dashboards and alerts see zeros
            // rather than missing series (lease claims happen in HA only).
            metrics::counter!(LEASE_CLAIMS, "outcome" => "granted").increment(0);
            metrics::gauge!(WATCH_STREAMS).increment(0.0);
            Some(handle)
        })
        .clone()
}

fn describe() {
    describe_counter!(REFRESHES, "Refreshes by provider, trigger and outcome.");
    describe_histogram!(
        UPSTREAM_SECONDS,
        Unit::Seconds,
        "Token-endpoint request latency by provider and outcome."
    );
    describe_counter!(RPCS, "gRPC requests by method and status code.");
    describe_histogram!(RPC_SECONDS, Unit::Seconds, "gRPC handling time by method.");
    describe_gauge!(SESSIONS, "Sessions held, by state.");
    describe_gauge!(WATCH_STREAMS, "Open WatchToken streams.");
    describe_gauge!(QUEUE_DEPTH, "Sessions in the refresh timer queue.");
    describe_histogram!(
        REFRESH_LAG,
        Unit::Seconds,
        "Delay between a planned refresh time and its start."
    );
    describe_histogram!(
        TOKEN_REMAINING,
        Unit::Seconds,
        "Remaining lifetime of access tokens handed out."
    );
    describe_histogram!(
        BUDGET_WAIT,
        Unit::Seconds,
        "Time waiting for the IdP budget, by provider and priority."
    );
    describe_gauge!(STORE_UP, "1 while the session store accepts writes.");
    describe_gauge!(PROVIDER_UP, "1 while the provider answers refreshes.");
    describe_counter!(LEASE_CLAIMS, "Refresh-lease claims (HA) by outcome.");
    describe_gauge!(BUILD_INFO, "Build information.");
}
