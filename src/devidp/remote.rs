//! A client of a running dev IdP's admin API, for the CLI's `--dev-login`.

use super::LoginTokens;

/// Logs `username` in at the dev IdP at `base_url` (`POST /admin/login`).
/// The tokens go straight to the caller; nothing is printed or logged.
pub async fn login(base_url: &str, username: &str) -> Result<LoginTokens, String> {
    let url = format!("{}/admin/login", base_url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body(serde_json::json!({ "username": username }).to_string())
        .send()
        .await
        .map_err(|e| format!("dev IdP at {base_url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("dev IdP login answered {}", response.status()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("dev IdP at {base_url}: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| format!("dev IdP login answer: {e}"))
}
