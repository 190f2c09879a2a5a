//! Configured identity providers: a token-endpoint client and a budget each.

use std::collections::HashMap;
use std::sync::Arc;

use super::budget::Budget;
use crate::oidc::TokenClient;

/// One identity provider as the refresh engine uses it.
#[derive(Debug)]
pub struct Provider {
    /// Name in config.
    pub name: Arc<str>,
    /// Token-endpoint client.
    pub client: TokenClient,
    /// Concurrency and rate budget.
    pub budget: Budget,
}

/// All providers, with the default one for registrations that name none.
#[derive(Debug, Clone)]
pub struct Providers {
    by_name: Arc<HashMap<String, Arc<Provider>>>,
    default: Arc<Provider>,
}

impl Providers {
    /// Providers keyed by name; `default` must be one of them.
    pub fn new(providers: Vec<Provider>, default: &str) -> Option<Self> {
        let by_name: HashMap<String, Arc<Provider>> = providers
            .into_iter()
            .map(|p| (p.name.to_string(), Arc::new(p)))
            .collect();
        let default = by_name.get(default)?.clone();
        Some(Self {
            by_name: Arc::new(by_name),
            default,
        })
    }

    /// The provider with this name; the default for an empty name.
    pub fn get(&self, name: &str) -> Option<&Arc<Provider>> {
        if name.is_empty() {
            Some(&self.default)
        } else {
            self.by_name.get(name)
        }
    }

    /// The default provider.
    pub fn default_provider(&self) -> &Arc<Provider> {
        &self.default
    }
}
