//! The realm: users, SSO sessions (token families), token minting and the refresh grant's
//! rules. Synchronous and clock-explicit (`now` in Unix seconds), so the HTTP layer can hold
//! it under a plain mutex and the rules can be tested without a server.

use std::collections::{HashMap, HashSet};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::LoginTokens;
use super::settings::RealmSettings;
use super::stats::{FamilyState, FamilyStats, IdpStats};

// Keycloak's `error_description`s (TokenManager, TokenEndpoint, client authenticators).
pub(crate) const INVALID_CLIENT: &str = "Invalid client or Invalid client credentials";
pub(crate) const MISSING_CLIENT_ID: &str = "Missing client_id parameter";
pub(crate) const MISSING_GRANT_TYPE: &str = "Missing form parameter: grant_type";
pub(crate) const UNSUPPORTED_GRANT_TYPE: &str = "Unsupported grant_type";
pub(crate) const MISSING_REFRESH_TOKEN: &str = "Missing parameter: refresh_token";
pub(crate) const INVALID_REFRESH_TOKEN: &str = "Invalid refresh token";
pub(crate) const TOKEN_NOT_ACTIVE: &str = "Token is not active";
pub(crate) const UNMATCHING_CLIENTS: &str = "Unmatching clients";
pub(crate) const SESSION_NOT_ACTIVE: &str = "Session not active";
pub(crate) const USER_DISABLED: &str = "User disabled";
pub(crate) const STALE_TOKEN: &str = "Stale token";
pub(crate) const REUSE_EXCEEDED: &str = "Maximum allowed refresh token reuse exceeded";
pub(crate) const NO_REFRESH_TOKEN: &str = "No refresh token";
pub(crate) const TOKEN_NOT_PROVIDED: &str = "Token not provided";
pub(crate) const REALM_DOES_NOT_EXIST: &str = "Realm does not exist";

/// An OAuth error answer: HTTP status and Keycloak's JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct OAuthError {
    pub(crate) status: u16,
    pub(crate) error: &'static str,
    pub(crate) description: Option<&'static str>,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: &'static str) -> Self {
        Self {
            status,
            error,
            description: Some(description),
        }
    }

    fn invalid_grant(description: &'static str) -> Self {
        Self::new(400, "invalid_grant", description)
    }

    fn invalid_request(description: &'static str) -> Self {
        Self::new(400, "invalid_request", description)
    }

    /// The counter key: the description, else the error code.
    pub(crate) fn reason(&self) -> &'static str {
        self.description.unwrap_or(self.error)
    }

    pub(crate) fn body(&self) -> serde_json::Value {
        match self.description {
            Some(description) => {
                serde_json::json!({"error": self.error, "error_description": description})
            }
            None => serde_json::json!({"error": self.error}),
        }
    }
}

/// Client credentials from the form or from HTTP Basic.
#[derive(Clone, Default)]
pub(crate) struct ClientCredentials {
    pub(crate) id: Option<String>,
    pub(crate) secret: Option<String>,
}

/// A successful token response, in Keycloak's field order.
#[derive(Clone, Serialize)]
pub(crate) struct TokenResponse {
    pub(crate) access_token: String,
    pub(crate) expires_in: u64,
    pub(crate) refresh_expires_in: u64,
    pub(crate) refresh_token: String,
    pub(crate) token_type: &'static str,
    #[serde(rename = "not-before-policy")]
    pub(crate) not_before_policy: u64,
    pub(crate) session_state: String,
    pub(crate) scope: String,
}

impl From<TokenResponse> for LoginTokens {
    fn from(t: TokenResponse) -> Self {
        Self {
            access_token: t.access_token,
            refresh_token: t.refresh_token,
            expires_in: t.expires_in,
            refresh_expires_in: t.refresh_expires_in,
            session_state: t.session_state,
            scope: t.scope,
            token_type: t.token_type.to_owned(),
        }
    }
}

#[derive(Serialize)]
struct AccessClaims<'a> {
    exp: u64,
    iat: u64,
    jti: String,
    iss: &'a str,
    sub: &'a str,
    typ: &'static str,
    azp: &'a str,
    sid: &'a str,
    session_state: &'a str,
    scope: &'a str,
    preferred_username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pad: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct RefreshClaims {
    pub(crate) exp: u64,
    pub(crate) iat: u64,
    pub(crate) jti: String,
    pub(crate) iss: String,
    pub(crate) aud: String,
    pub(crate) sub: String,
    pub(crate) typ: String,
    pub(crate) azp: String,
    pub(crate) sid: String,
    pub(crate) scope: String,
    /// Position in the family: 0 for the login's token, +1 per refresh.
    pub(crate) seq: u64,
}

/// HS256 with a random key made when the realm is: tokens die with the process.
struct Signer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl Signer {
    fn random() -> Self {
        let key: [u8; 32] = rand::random();
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is the realm's business (its clock has an offset, its errors have names).
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        Self {
            encoding: EncodingKey::from_secret(&key),
            decoding: DecodingKey::from_secret(&key),
            validation,
        }
    }

    #[allow(
        clippy::expect_used,
        reason = "HS256 signing of a struct of strings and integers cannot fail: \
                  serde_json cannot fail on it and HMAC takes any key length"
    )]
    fn sign<T: Serialize>(&self, claims: &T) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("devidp-hs256".to_owned());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("HS256 signing is infallible")
    }

    /// The claims of a refresh token this realm signed, or `None` for anything else.
    fn verify_refresh(&self, raw: &str) -> Option<RefreshClaims> {
        jsonwebtoken::decode::<RefreshClaims>(raw, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
            .filter(|claims| claims.typ == "Refresh")
    }
}

struct User {
    id: String,
    disabled: bool,
}

struct Family {
    stats: FamilyStats,
    user_id: String,
    /// The refresh token last presented successfully (Keycloak's "current refresh token").
    current: Option<u64>,
    /// How many times `current` was presented successfully.
    current_uses: u32,
}

impl Family {
    /// Ends an active session whose idle or max time is over. Returns whether it is active.
    fn check_alive(&mut self, now: u64, settings: &RealmSettings) -> bool {
        if self.stats.state != FamilyState::Active {
            return false;
        }
        if now
            >= self
                .stats
                .started_at
                .saturating_add(settings.sso_session_max_secs)
        {
            self.stats.state = FamilyState::MaxExpired;
            return false;
        }
        if now
            >= self
                .stats
                .last_refresh_at
                .saturating_add(settings.sso_session_idle_secs)
        {
            self.stats.state = FamilyState::IdleExpired;
            return false;
        }
        true
    }
}

/// The realm's whole state.
pub(crate) struct Realm {
    pub(crate) settings: RealmSettings,
    signer: Signer,
    /// `scheme://host:port` the IdP is reached at, for the `iss` claim.
    base_url: String,
    users: HashMap<String, User>,
    families: HashMap<String, Family>,
    stats: IdpStats,
}

impl std::fmt::Debug for Realm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Realm")
            .field("settings", &self.settings)
            .field("base_url", &self.base_url)
            .field("users", &self.users.len())
            .field("families", &self.families.len())
            .finish_non_exhaustive()
    }
}

/// A token request as the realm sees it.
pub(crate) struct RefreshRequest<'a> {
    pub(crate) realm: &'a str,
    pub(crate) grant_type: Option<&'a str>,
    pub(crate) client: &'a ClientCredentials,
    pub(crate) refresh_token: Option<&'a str>,
}

impl Realm {
    pub(crate) fn new(settings: RealmSettings) -> Self {
        Self {
            settings,
            signer: Signer::random(),
            base_url: "http://localhost".to_owned(),
            users: HashMap::new(),
            families: HashMap::new(),
            stats: IdpStats::default(),
        }
    }

    pub(crate) fn set_base_url(&mut self, base_url: String) {
        self.base_url = base_url;
    }

    fn issuer(&self) -> String {
        format!("{}/realms/{}", self.base_url, self.settings.realm)
    }

    /// The session a refresh token belongs to, if this realm signed it. No state changes.
    pub(crate) fn session_of(&self, raw: &str) -> Option<String> {
        self.signer.verify_refresh(raw).map(|claims| claims.sid)
    }

    /// A login (what the 1FA/2FA flow ends with): a new SSO session and its first tokens.
    /// Disabled users can log in here; their refreshes fail with "User disabled".
    pub(crate) fn login(&mut self, now: u64, username: &str) -> TokenResponse {
        let user_id = self
            .users
            .entry(username.to_owned())
            .or_insert_with(|| User {
                id: uuid::Uuid::new_v4().to_string(),
                disabled: false,
            })
            .id
            .clone();
        let session_state = uuid::Uuid::new_v4().to_string();
        let mut family = Family {
            stats: FamilyStats {
                session_state: session_state.clone(),
                username: username.to_owned(),
                state: FamilyState::Active,
                generation: 0,
                presentations: 0,
                refreshes_succeeded: 0,
                refreshes_rejected: 0,
                rejected_by_reason: Default::default(),
                stale_presentations: 0,
                replays_rejected: 0,
                reuses_allowed: 0,
                in_flight: 0,
                max_in_flight: 0,
                started_at: now,
                last_refresh_at: now,
            },
            user_id,
            current: None,
            current_uses: 0,
        };
        let issuer = self.issuer();
        let tokens = issue(&self.signer, &issuer, &self.settings, &mut family, now);
        self.families.insert(session_state, family);
        self.stats.logins += 1;
        tokens
    }

    pub(crate) fn count_token_request(&mut self) {
        self.stats.token_requests += 1;
    }

    pub(crate) fn count_fault(&mut self, kind: &'static str) {
        self.stats.faults_injected += 1;
        *self
            .stats
            .faults_by_kind
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// A token request (of `session`, when its refresh token names one) arrived.
    pub(crate) fn enter_flight(&mut self, session: Option<&str>) {
        self.stats.in_flight += 1;
        if let Some(family) = session.and_then(|s| self.families.get_mut(s)) {
            family.stats.in_flight += 1;
            family.stats.max_in_flight = family.stats.max_in_flight.max(family.stats.in_flight);
            self.stats.max_in_flight_per_family = self
                .stats
                .max_in_flight_per_family
                .max(family.stats.in_flight);
        }
    }

    /// A token request was answered (or abandoned).
    pub(crate) fn leave_flight(&mut self, session: Option<&str>) {
        self.stats.in_flight = self.stats.in_flight.saturating_sub(1);
        if let Some(family) = session.and_then(|s| self.families.get_mut(s)) {
            family.stats.in_flight = family.stats.in_flight.saturating_sub(1);
        }
    }

    fn check_realm(&self, realm: &str) -> Result<(), OAuthError> {
        if realm == self.settings.realm {
            Ok(())
        } else {
            Err(OAuthError {
                status: 404,
                error: REALM_DOES_NOT_EXIST,
                description: None,
            })
        }
    }

    fn authenticate_client(&self, client: &ClientCredentials) -> Result<(), OAuthError> {
        let Some(id) = client.id.as_deref().filter(|id| !id.is_empty()) else {
            return Err(OAuthError::new(400, "invalid_client", MISSING_CLIENT_ID));
        };
        if id != self.settings.client_id {
            return Err(OAuthError::new(401, "invalid_client", INVALID_CLIENT));
        }
        if let Some(expected) = &self.settings.client_secret
            && client.secret.as_deref() != Some(expected.as_str())
        {
            return Err(OAuthError::new(401, "unauthorized_client", INVALID_CLIENT));
        }
        Ok(())
    }

    /// The refresh grant, with Keycloak's checks in Keycloak's order.
    pub(crate) fn refresh(
        &mut self,
        now: u64,
        request: &RefreshRequest<'_>,
    ) -> Result<TokenResponse, OAuthError> {
        let mut session = None;
        let result = self.try_refresh(now, request, &mut session);
        match &result {
            Ok(tokens) => {
                tracing::debug!(
                    session_state = %tokens.session_state,
                    expires_in = tokens.expires_in,
                    refresh_expires_in = tokens.refresh_expires_in,
                    "dev idp: refresh granted"
                );
            }
            Err(err) => {
                tracing::debug!(
                    session_state = session.as_deref().unwrap_or("-"),
                    error = err.error,
                    reason = err.reason(),
                    "dev idp: refresh rejected"
                );
                self.stats.refreshes_rejected += 1;
                *self
                    .stats
                    .rejected_by_reason
                    .entry(err.reason().to_owned())
                    .or_default() += 1;
                if let Some(family) = session.and_then(|s| self.families.get_mut(&s)) {
                    family.stats.refreshes_rejected += 1;
                    *family
                        .stats
                        .rejected_by_reason
                        .entry(err.reason().to_owned())
                        .or_default() += 1;
                }
            }
        }
        result
    }

    fn try_refresh(
        &mut self,
        now: u64,
        request: &RefreshRequest<'_>,
        session: &mut Option<String>,
    ) -> Result<TokenResponse, OAuthError> {
        self.check_realm(request.realm)?;
        match request.grant_type.filter(|g| !g.is_empty()) {
            None => return Err(OAuthError::invalid_request(MISSING_GRANT_TYPE)),
            Some("refresh_token") => {}
            Some(_) => {
                return Err(OAuthError::new(
                    400,
                    "unsupported_grant_type",
                    UNSUPPORTED_GRANT_TYPE,
                ));
            }
        }
        self.authenticate_client(request.client)?;
        let raw = request
            .refresh_token
            .filter(|t| !t.is_empty())
            .ok_or(OAuthError::invalid_request(MISSING_REFRESH_TOKEN))?;
        let claims = self
            .signer
            .verify_refresh(raw)
            .ok_or(OAuthError::invalid_grant(INVALID_REFRESH_TOKEN))?;
        *session = Some(claims.sid.clone());

        let issuer = self.issuer();
        let settings = &self.settings;
        let mut family = self.families.get_mut(&claims.sid);
        if let Some(family) = family.as_deref_mut() {
            family.stats.presentations += 1;
            if claims.seq < family.stats.generation {
                family.stats.stale_presentations += 1;
                self.stats.stale_presentations += 1;
            }
        }
        // Keycloak: TokenVerifier IS_ACTIVE (expired when now > exp), then the client match.
        if now > claims.exp {
            return Err(OAuthError::invalid_grant(TOKEN_NOT_ACTIVE));
        }
        if claims.azp != settings.client_id {
            return Err(OAuthError::invalid_grant(UNMATCHING_CLIENTS));
        }
        let Some(family) = family else {
            return Err(OAuthError::invalid_grant(SESSION_NOT_ACTIVE));
        };
        if !family.check_alive(now, settings) {
            return Err(OAuthError::invalid_grant(SESSION_NOT_ACTIVE));
        }
        if self
            .users
            .get(&family.stats.username)
            .is_none_or(|user| user.disabled)
        {
            return Err(OAuthError::invalid_grant(USER_DISABLED));
        }

        // Keycloak's validateTokenReuse, by sequence number instead of iat seconds.
        if Some(claims.seq) == family.current {
            if settings.revoke_refresh_token
                && family.current_uses > settings.refresh_token_max_reuse
            {
                family.stats.state = FamilyState::ReuseExceeded;
                self.stats.sessions_killed += 1;
                return Err(OAuthError::invalid_grant(REUSE_EXCEEDED));
            }
            family.current_uses += 1;
            if settings.revoke_refresh_token {
                family.stats.reuses_allowed += 1;
                self.stats.reuses_allowed += 1;
            }
        } else {
            if settings.revoke_refresh_token && claims.seq != family.stats.generation {
                family.stats.state = FamilyState::ReplayDetected;
                family.stats.replays_rejected += 1;
                self.stats.replays_rejected += 1;
                self.stats.sessions_killed += 1;
                return Err(OAuthError::invalid_grant(STALE_TOKEN));
            }
            family.current = Some(claims.seq);
            family.current_uses = 1;
        }

        family.stats.generation += 1;
        family.stats.last_refresh_at = now;
        family.stats.refreshes_succeeded += 1;
        self.stats.refreshes_succeeded += 1;
        Ok(issue(&self.signer, &issuer, settings, family, now))
    }

    /// The logout endpoint with a refresh token: ends its session. Tokens of sessions
    /// already gone are fine (204), as with Keycloak; expiry is not checked.
    pub(crate) fn logout(
        &mut self,
        now: u64,
        realm: &str,
        client: &ClientCredentials,
        refresh_token: Option<&str>,
    ) -> Result<(), OAuthError> {
        self.check_realm(realm)?;
        self.authenticate_client(client)?;
        let raw = refresh_token
            .filter(|t| !t.is_empty())
            .ok_or(OAuthError::invalid_request(NO_REFRESH_TOKEN))?;
        let claims = self
            .signer
            .verify_refresh(raw)
            .ok_or(OAuthError::invalid_grant(INVALID_REFRESH_TOKEN))?;
        self.stats.logouts += 1;
        let settings = &self.settings;
        if let Some(family) = self.families.get_mut(&claims.sid)
            && family.check_alive(now, settings)
        {
            family.stats.state = FamilyState::LoggedOut;
        }
        tracing::debug!(session_state = %claims.sid, "dev idp: logout");
        Ok(())
    }

    /// RFC 7009 revocation: 200 whatever the token; a live refresh token ends its session.
    pub(crate) fn revoke(
        &mut self,
        now: u64,
        realm: &str,
        client: &ClientCredentials,
        token: Option<&str>,
    ) -> Result<(), OAuthError> {
        self.check_realm(realm)?;
        self.authenticate_client(client)?;
        let raw = token
            .filter(|t| !t.is_empty())
            .ok_or(OAuthError::invalid_request(TOKEN_NOT_PROVIDED))?;
        self.stats.revocations += 1;
        let settings = &self.settings;
        if let Some(claims) = self.signer.verify_refresh(raw)
            && now <= claims.exp
            && let Some(family) = self.families.get_mut(&claims.sid)
            && family.check_alive(now, settings)
        {
            family.stats.state = FamilyState::Revoked;
            tracing::debug!(session_state = %claims.sid, "dev idp: session revoked");
        }
        Ok(())
    }

    /// Ends a session as the admin console's "Sign out" would. Returns whether it was active.
    pub(crate) fn end_session(&mut self, now: u64, session_state: &str) -> bool {
        let settings = &self.settings;
        if let Some(family) = self.families.get_mut(session_state)
            && family.check_alive(now, settings)
        {
            family.stats.state = FamilyState::EndedByAdmin;
            return true;
        }
        false
    }

    pub(crate) fn set_user_disabled(&mut self, username: &str, disabled: bool) {
        self.users
            .entry(username.to_owned())
            .or_insert_with(|| User {
                id: uuid::Uuid::new_v4().to_string(),
                disabled,
            })
            .disabled = disabled;
    }

    pub(crate) fn stats(&mut self, now: u64) -> IdpStats {
        let settings = &self.settings;
        let active = self
            .families
            .values_mut()
            .map(|family| family.check_alive(now, settings))
            .filter(|&alive| alive)
            .count();
        IdpStats {
            active_sessions: active as u64,
            ..self.stats.clone()
        }
    }

    pub(crate) fn family(&mut self, now: u64, session_state: &str) -> Option<FamilyStats> {
        let settings = &self.settings;
        self.families.get_mut(session_state).map(|family| {
            family.check_alive(now, settings);
            family.stats.clone()
        })
    }

    pub(crate) fn families(&mut self, now: u64) -> Vec<FamilyStats> {
        let settings = &self.settings;
        let mut all: Vec<FamilyStats> = self
            .families
            .values_mut()
            .map(|family| {
                family.check_alive(now, settings);
                family.stats.clone()
            })
            .collect();
        all.sort_by(|a, b| (a.started_at, &a.session_state).cmp(&(b.started_at, &b.session_state)));
        all
    }
}

/// Mints the access and refresh tokens of `family`'s current generation.
fn issue(
    signer: &Signer,
    issuer: &str,
    settings: &RealmSettings,
    family: &mut Family,
    now: u64,
) -> TokenResponse {
    let max_left = family
        .stats
        .started_at
        .saturating_add(settings.sso_session_max_secs)
        .saturating_sub(now);
    let refresh_expires_in = settings.sso_session_idle_secs.min(max_left);
    let expires_in = settings.access_token_lifespan_secs.min(max_left);
    let session_state = family.stats.session_state.as_str();
    let access = AccessClaims {
        exp: now + expires_in,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        iss: issuer,
        sub: &family.user_id,
        typ: "Bearer",
        azp: &settings.client_id,
        sid: session_state,
        session_state,
        scope: &settings.scope,
        preferred_username: &family.stats.username,
        pad: (settings.access_token_padding > 0).then(|| "x".repeat(settings.access_token_padding)),
    };
    let refresh = RefreshClaims {
        exp: now + refresh_expires_in,
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        iss: issuer.to_owned(),
        aud: issuer.to_owned(),
        sub: family.user_id.clone(),
        typ: "Refresh".to_owned(),
        azp: settings.client_id.clone(),
        sid: session_state.to_owned(),
        scope: settings.scope.clone(),
        seq: family.stats.generation,
    };
    TokenResponse {
        access_token: signer.sign(&access),
        expires_in,
        refresh_expires_in,
        refresh_token: signer.sign(&refresh),
        token_type: "Bearer",
        not_before_policy: 0,
        session_state: session_state.to_owned(),
        scope: settings.scope.clone(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn public_client() -> ClientCredentials {
        ClientCredentials {
            id: Some("integration-api".to_owned()),
            secret: None,
        }
    }

    fn refresh(realm: &mut Realm, now: u64, token: &str) -> Result<TokenResponse, OAuthError> {
        let client = public_client();
        realm.refresh(
            now,
            &RefreshRequest {
                realm: "apiax",
                grant_type: Some("refresh_token"),
                client: &client,
                refresh_token: Some(token),
            },
        )
    }

    fn reason(result: Result<TokenResponse, OAuthError>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(err) => err.reason(),
        }
    }

    #[test]
    fn reuse_budget_counts_presentations_of_the_token_last_used() {
        let mut realm = Realm::new(RealmSettings {
            refresh_token_max_reuse: 2,
            ..RealmSettings::default()
        });
        let login = realm.login(T0, "alice");
        let r1 = refresh(&mut realm, T0, &login.refresh_token).unwrap();
        // The login token is now the current one: two more uses are allowed.
        assert_eq!(reason(refresh(&mut realm, T0, &login.refresh_token)), "ok");
        assert_eq!(reason(refresh(&mut realm, T0, &login.refresh_token)), "ok");
        // r1 is neither the newest nor the current: a replay.
        assert_eq!(
            reason(refresh(&mut realm, T0, &r1.refresh_token)),
            STALE_TOKEN
        );
        let fam = realm.family(T0, &login.session_state).unwrap();
        assert_eq!(fam.state, FamilyState::ReplayDetected);
        assert_eq!(fam.reuses_allowed, 2);
        assert_eq!(fam.stale_presentations, 3);
        assert_eq!(fam.generation, 3);
    }

    #[test]
    fn reuse_over_budget_kills_the_session() {
        let mut realm = Realm::new(RealmSettings::default());
        let login = realm.login(T0, "alice");
        let r1 = refresh(&mut realm, T0, &login.refresh_token).unwrap();
        assert_eq!(
            reason(refresh(&mut realm, T0, &login.refresh_token)),
            REUSE_EXCEEDED
        );
        assert_eq!(
            reason(refresh(&mut realm, T0, &r1.refresh_token)),
            SESSION_NOT_ACTIVE
        );
        let stats = realm.stats(T0);
        assert_eq!(stats.sessions_killed, 1);
        assert_eq!(stats.active_sessions, 0);
    }

    #[test]
    fn check_order_follows_keycloak() {
        let mut realm = Realm::new(RealmSettings {
            sso_session_idle_secs: 100,
            ..RealmSettings::default()
        });
        let login = realm.login(T0, "alice");
        // Expired token of a live-looking session: expiry wins.
        assert_eq!(
            reason(refresh(&mut realm, T0 + 101, &login.refresh_token)),
            TOKEN_NOT_ACTIVE
        );
        // Same second as the idle end: the token is still active, the session is not.
        assert_eq!(
            reason(refresh(&mut realm, T0 + 100, &login.refresh_token)),
            SESSION_NOT_ACTIVE
        );
        assert_eq!(
            realm.family(T0, &login.session_state).unwrap().state,
            FamilyState::IdleExpired
        );
    }

    #[test]
    fn disabled_user_is_refused_but_keeps_the_session() {
        let mut realm = Realm::new(RealmSettings::default());
        let login = realm.login(T0, "bob");
        realm.set_user_disabled("bob", true);
        assert_eq!(
            reason(refresh(&mut realm, T0, &login.refresh_token)),
            USER_DISABLED
        );
        realm.set_user_disabled("bob", false);
        assert_eq!(reason(refresh(&mut realm, T0, &login.refresh_token)), "ok");
    }

    #[test]
    fn access_token_lifespan_is_capped_by_session_max() {
        let mut realm = Realm::new(RealmSettings {
            sso_session_max_secs: 1000,
            ..RealmSettings::default()
        });
        let login = realm.login(T0, "alice");
        assert_eq!(login.expires_in, 1000);
        assert_eq!(login.refresh_expires_in, 1000);
        let r1 = refresh(&mut realm, T0 + 400, &login.refresh_token).unwrap();
        assert_eq!(r1.expires_in, 600);
        assert_eq!(r1.refresh_expires_in, 600);
    }
}
