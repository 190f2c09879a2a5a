//! The realm's settings: Keycloak's names and defaults, except `revoke_refresh_token`.

use serde::{Deserialize, Serialize};

/// Settings of the dev IdP's single realm and its single client.
///
/// Durations are whole seconds, as Keycloak stores them. Deserializing fills missing fields
/// with the defaults, so a partial JSON object is a valid patch (`PUT /admin/settings`);
/// unknown fields are rejected.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealmSettings {
    /// Realm name, the `{realm}` of `/realms/{realm}/…`. Default `apiax`.
    pub realm: String,
    /// The one client allowed at the token endpoint. Default `integration-api`.
    pub client_id: String,
    /// `None` (default): a public client, `client_id` alone authenticates. `Some`: a
    /// confidential client; the secret must come as `client_secret` or HTTP Basic.
    pub client_secret: Option<String>,
    /// Access Token Lifespan. Default 1800 (30 min). Capped by what is left of SSO Session Max.
    pub access_token_lifespan_secs: u64,
    /// SSO Session Idle: a session not refreshed for this long ends. Default 1,209,600 (14 days).
    pub sso_session_idle_secs: u64,
    /// SSO Session Max: a session ends this long after login, refreshed or not.
    /// Default 2,592,000 (30 days).
    pub sso_session_max_secs: u64,
    /// Revoke Refresh Token. Default **true** (Keycloak's default is false): a refresh token
    /// that is neither the newest of its session nor the one last used (within its reuse
    /// budget) is a replay, and a replay ends the session.
    pub revoke_refresh_token: bool,
    /// Refresh Token Max Reuse: how many more times the refresh token last used may be
    /// presented again (each time issuing new tokens). Default 0. Only with
    /// `revoke_refresh_token`.
    pub refresh_token_max_reuse: u32,
    /// Bytes of padding put in each access token as an extra `pad` claim (the encoded
    /// token grows by about 4/3 of it; unpadded tokens are about 600 bytes, so about 450
    /// gives ~1,200-byte tokens). Default 0.
    pub access_token_padding: usize,
    /// The `scope` of issued tokens. Default `profile email`.
    pub scope: String,
}

impl Default for RealmSettings {
    fn default() -> Self {
        Self {
            realm: "apiax".to_owned(),
            client_id: "integration-api".to_owned(),
            client_secret: None,
            access_token_lifespan_secs: 30 * 60,
            sso_session_idle_secs: 14 * 24 * 3600,
            sso_session_max_secs: 30 * 24 * 3600,
            revoke_refresh_token: true,
            refresh_token_max_reuse: 0,
            access_token_padding: 0,
            scope: "profile email".to_owned(),
        }
    }
}

impl std::fmt::Debug for RealmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealmSettings")
            .field("realm", &self.realm)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "access_token_lifespan_secs",
                &self.access_token_lifespan_secs,
            )
            .field("sso_session_idle_secs", &self.sso_session_idle_secs)
            .field("sso_session_max_secs", &self.sso_session_max_secs)
            .field("revoke_refresh_token", &self.revoke_refresh_token)
            .field("refresh_token_max_reuse", &self.refresh_token_max_reuse)
            .field("access_token_padding", &self.access_token_padding)
            .field("scope", &self.scope)
            .finish()
    }
}

impl RealmSettings {
    /// Applies a partial JSON object (the body of `PUT /admin/settings`) on top of `self`.
    /// `"client_secret": null` makes the client public.
    pub fn patched(&self, patch: serde_json::Value) -> Result<Self, serde_json::Error> {
        let mut merged = serde_json::to_value(self)?;
        match (&mut merged, patch) {
            (serde_json::Value::Object(base), serde_json::Value::Object(changes)) => {
                base.extend(changes);
            }
            (_, other) => {
                // Not an object: let serde report the type error.
                merged = other;
            }
        }
        serde_json::from_value(merged)
    }

    /// The settings as shown by the admin API: the client secret masked.
    pub(crate) fn redacted_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(secret) = value.get_mut("client_secret").filter(|s| !s.is_null()) {
            *secret = serde_json::Value::String("**********".to_owned());
        }
        value
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_keycloak_but_strict() {
        let s = RealmSettings::default();
        assert_eq!(s.access_token_lifespan_secs, 1800);
        assert_eq!(s.sso_session_idle_secs, 1_209_600);
        assert_eq!(s.sso_session_max_secs, 2_592_000);
        assert!(s.revoke_refresh_token);
        assert_eq!(s.refresh_token_max_reuse, 0);
        assert_eq!(s.client_secret, None);
    }

    #[test]
    fn partial_patch_keeps_the_rest_and_rejects_unknown_keys() {
        let s = RealmSettings::default();
        let p = s
            .patched(serde_json::json!({"refresh_token_max_reuse": 2, "client_secret": "s3"}))
            .unwrap();
        assert_eq!(p.refresh_token_max_reuse, 2);
        assert_eq!(p.client_secret.as_deref(), Some("s3"));
        assert_eq!(p.realm, "apiax");
        let back = p
            .patched(serde_json::json!({"client_secret": null}))
            .unwrap();
        assert_eq!(back.client_secret, None);
        assert!(s.patched(serde_json::json!({"no_such": 1})).is_err());
        assert!(s.patched(serde_json::json!([1])).is_err());
    }

    #[test]
    fn debug_and_admin_view_hide_the_secret() {
        let s = RealmSettings {
            client_secret: Some("hunter2".to_owned()),
            ..RealmSettings::default()
        };
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.redacted_json().to_string().contains("hunter2"));
    }
}
