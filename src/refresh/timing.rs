//! Refresh timing as pure functions: lifetimes, a clock reading and a jitter
//! value in, a due time out. No I/O, no clock reads, no randomness inside, so
//! every rule has a table test.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, SystemTime};

use crate::oidc::RefreshExpiry;

/// The knobs of the refresh schedule (from config).
#[derive(Debug, Clone)]
pub struct Policy {
    /// Fraction of an access token's life after which sessions in use refresh (0.75).
    pub early_ratio: f64,
    /// Width of the jitter window around `early_ratio`, as a fraction of the life (0.1 → 0.70..0.80).
    pub jitter_ratio: f64,
    /// First backoff step after a failure.
    pub backoff_base: Duration,
    /// Longest backoff between background retries.
    pub backoff_cap: Duration,
    /// Longest an on-demand caller is held off after a failure without `Retry-After`.
    pub on_demand_backoff_cap: Duration,
    /// How long before the refresh token idles out an idle session is refreshed.
    pub keepalive_lead: Duration,
    /// Clock skew tolerated before a refresh token is treated as lapsed.
    pub clock_skew: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            early_ratio: 0.75,
            jitter_ratio: 0.1,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            on_demand_backoff_cap: Duration::from_secs(5),
            keepalive_lead: Duration::from_secs(600),
            clock_skew: Duration::from_secs(30),
        }
    }
}

/// A stable jitter value in `[0, 1)` for one token of one session, so that
/// sessions registered together spread out, and re-planning the same token
/// gives the same time.
pub fn jitter_for(session_id: &str, generation: u64) -> f64 {
    let mut hasher = DefaultHasher::new();
    session_id.hash(&mut hasher);
    generation.hash(&mut hasher);
    // The top 53 bits give a uniformly spread f64 in [0, 1).
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// When a session in use refreshes ahead of expiry: at `early_ratio` of the
/// token's life, moved by up to half the jitter window either way.
pub fn early_refresh_at(
    issued_at: SystemTime,
    expires_at: SystemTime,
    policy: &Policy,
    jitter: f64,
) -> SystemTime {
    let life = expires_at
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let ratio =
        (policy.early_ratio + (jitter.clamp(0.0, 1.0) - 0.5) * policy.jitter_ratio).clamp(0.0, 1.0);
    issued_at + life.mul_f64(ratio)
}

/// When an idle session refreshes to keep its refresh token from idling out:
/// `keepalive_lead` before it lapses (at most half its remaining life at the
/// last refresh), up to 20% earlier by jitter. `None` when it never lapses.
pub fn keepalive_at(
    refresh_expiry: RefreshExpiry,
    last_refresh: SystemTime,
    policy: &Policy,
    jitter: f64,
) -> Option<SystemTime> {
    let RefreshExpiry::At(lapses) = refresh_expiry else {
        return None;
    };
    let window = lapses
        .duration_since(last_refresh)
        .unwrap_or(Duration::ZERO);
    let lead = policy.keepalive_lead.min(window / 2);
    let lead = lead + lead.mul_f64(0.2 * jitter.clamp(0.0, 1.0));
    Some(lapses.checked_sub(lead).unwrap_or(last_refresh))
}

/// The planned next refresh of a healthy session: the early refresh if it is
/// in use, the keep-alive otherwise, whichever applies first.
pub fn next_refresh_at(
    token: Option<(SystemTime, SystemTime)>,
    refresh_expiry: RefreshExpiry,
    last_refresh: SystemTime,
    in_use: bool,
    policy: &Policy,
    jitter: f64,
) -> Option<SystemTime> {
    let early = match token {
        Some((issued, expires)) if in_use => {
            Some(early_refresh_at(issued, expires, policy, jitter))
        }
        _ => None,
    };
    let keepalive = keepalive_at(refresh_expiry, last_refresh, policy, jitter);
    match (early, keepalive) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Capped exponential backoff with full jitter: uniform in
/// `[base/2, min(cap, base·2^(failures-1))]`. The floor keeps a retry from
/// following a failure at once.
pub fn backoff(failures: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = base.saturating_mul(1u32 << exp).min(cap);
    let floor = (base / 2).min(ceiling);
    floor + (ceiling - floor).mul_f64(jitter.clamp(0.0, 1.0))
}

/// How long to wait before retrying after a transient failure: the backoff,
/// but never less than the provider's `Retry-After`.
pub fn retry_delay(
    failures: u32,
    retry_after: Option<Duration>,
    base: Duration,
    cap: Duration,
    jitter: f64,
) -> Duration {
    let delay = backoff(failures, base, cap, jitter);
    retry_after.map_or(delay, |ra| ra.max(delay.min(cap)))
}

/// Whether a refresh token counts as lapsed at `now` (past its expiry plus skew).
pub fn refresh_token_lapsed(expiry: RefreshExpiry, now: SystemTime, skew: Duration) -> bool {
    matches!(expiry, RefreshExpiry::At(t) if t.checked_add(skew).is_some_and(|lapsed| now > lapsed))
}

/// Whether the hard maximum of the SSO session caps this refresh: the provider
/// granted a shorter refresh lifetime than it did before (beyond a tolerance
/// for clock granularity). Keycloak grants min(idle, max − elapsed), which
/// only shrinks once the maximum is near.
pub fn hard_max_near(longest_seen: Option<Duration>, granted: Duration) -> bool {
    longest_seen.is_some_and(|longest| granted + Duration::from_secs(5) < longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    #[test]
    fn early_refresh_is_three_quarters_jittered_by_five_percent_each_way() {
        let p = Policy::default();
        let cases = [
            (0.5, 1350),  // no jitter: 75% of 1800 s
            (0.0, 1260),  // earliest: 70%
            (1.0, 1440),  // latest: 80%
            (0.25, 1305), // 72.5%
        ];
        for (jitter, expected) in cases {
            assert_eq!(
                early_refresh_at(t(0), t(1800), &p, jitter),
                t(expected),
                "jitter {jitter}"
            );
        }
    }

    #[test]
    fn early_refresh_of_an_already_expired_token_is_its_issue_time_or_later() {
        let p = Policy::default();
        assert_eq!(early_refresh_at(t(10), t(5), &p, 0.5), t(10));
    }

    #[test]
    fn keepalive_leads_the_refresh_lapse() {
        let p = Policy::default();
        let cases = [
            // (lapses at, last refresh, jitter, expected)
            (
                RefreshExpiry::At(t(1_209_600)),
                t(0),
                0.0,
                Some(t(1_209_000)),
            ),
            (
                RefreshExpiry::At(t(1_209_600)),
                t(0),
                1.0,
                Some(t(1_208_880)),
            ),
            // short window: half of it
            (RefreshExpiry::At(t(100)), t(0), 0.0, Some(t(50))),
            (RefreshExpiry::Never, t(0), 0.0, None),
            (RefreshExpiry::Unknown, t(0), 0.0, None),
        ];
        for (expiry, last, jitter, expected) in cases {
            assert_eq!(
                keepalive_at(expiry, last, &p, jitter),
                expected,
                "{expiry:?}"
            );
        }
    }

    #[test]
    fn idle_sessions_plan_only_the_keepalive() {
        let p = Policy::default();
        let expiry = RefreshExpiry::At(t(3600));
        let token = Some((t(0), t(1800)));
        assert_eq!(
            next_refresh_at(token, expiry, t(0), true, &p, 0.5),
            Some(t(1350))
        );
        assert_eq!(
            next_refresh_at(token, expiry, t(0), false, &p, 0.0),
            Some(t(3000))
        );
        assert_eq!(
            next_refresh_at(token, RefreshExpiry::Never, t(0), false, &p, 0.0),
            None
        );
        // keep-alive before the early refresh when the refresh token lapses first
        let short = RefreshExpiry::At(t(1000));
        assert_eq!(
            next_refresh_at(token, short, t(0), true, &p, 0.0),
            Some(t(500))
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_has_a_floor() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        let cases = [
            (1, 0.0, 500),
            (1, 1.0, 1000),
            (2, 1.0, 2000),
            (4, 1.0, 8000),
            (4, 0.5, 4250),
            (10, 1.0, 60_000),
            (u32::MAX, 1.0, 60_000),
            (u32::MAX, 0.0, 500),
        ];
        for (failures, jitter, ms) in cases {
            assert_eq!(
                backoff(failures, base, cap, jitter),
                Duration::from_millis(ms),
                "failures {failures} jitter {jitter}"
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_for_the_delay() {
        let base = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        let seven = Some(Duration::from_secs(7));
        assert_eq!(
            retry_delay(1, seven, base, cap, 1.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(5, seven, base, cap, 1.0),
            Duration::from_secs(16)
        );
        assert_eq!(retry_delay(1, None, base, cap, 1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_is_stable_and_spread() {
        assert_eq!(jitter_for("a", 1), jitter_for("a", 1));
        let values: Vec<f64> = (0..1000).map(|i| jitter_for(&format!("s{i}"), 1)).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let below_half = values.iter().filter(|v| **v < 0.5).count();
        assert!((400..600).contains(&below_half), "{below_half}");
    }

    #[test]
    fn lapse_and_hard_maximum() {
        let skew = Duration::from_secs(30);
        assert!(!refresh_token_lapsed(
            RefreshExpiry::At(t(100)),
            t(120),
            skew
        ));
        assert!(refresh_token_lapsed(
            RefreshExpiry::At(t(100)),
            t(131),
            skew
        ));
        assert!(!refresh_token_lapsed(
            RefreshExpiry::Never,
            t(1_000_000),
            skew
        ));
        let day = Duration::from_secs(86_400);
        assert!(!hard_max_near(None, day));
        assert!(!hard_max_near(Some(day), day));
        assert!(!hard_max_near(Some(day), day - Duration::from_secs(3)));
        assert!(hard_max_near(Some(day), day / 2));
    }
}
