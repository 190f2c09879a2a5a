//! Typed secrets: refresh tokens, access tokens and client secrets.
//!
//! Each newtype wraps a [`secrecy::SecretString`]: `Debug` prints a redaction
//! marker, there is no `Display`, and the memory is zeroized on drop. The only
//! way to read the value is `expose_secret()`, so every place that does so can
//! be found with `grep expose_secret`.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name(SecretString);

        impl $name {
            /// Wraps a secret value; the `String` is moved, not copied.
            pub fn new(value: String) -> Self {
                Self(SecretString::from(value))
            }

            /// The secret value. Call only to put it on the wire or into storage.
            pub fn expose_secret(&self) -> &str {
                self.0.expose_secret()
            }

            /// Length in bytes, for validation without exposing the value.
            pub fn len(&self) -> usize {
                self.0.expose_secret().len()
            }

            /// Whether the secret is empty.
            pub fn is_empty(&self) -> bool {
                self.0.expose_secret().is_empty()
            }

            /// SHA-256 of the value: compares two secrets without keeping either.
            pub fn fingerprint(&self) -> [u8; 32] {
                Sha256::digest(self.0.expose_secret().as_bytes()).into()
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!($label, "([redacted])"))
            }
        }

        impl From<String> for $name {
            fn from(value: String) -> Self {
                Self::new(value)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::new(value.to_owned())
            }
        }
    };
}

secret_newtype!(
    /// An OAuth 2.0 refresh token. Never leaves the broker except to the token endpoint.
    RefreshToken,
    "RefreshToken"
);
secret_newtype!(
    /// An OAuth 2.0 access token. Returned only by `GetAccessToken` and `WatchToken`.
    AccessToken,
    "AccessToken"
);
secret_newtype!(
    /// A confidential client's secret for the token endpoint.
    ClientSecret,
    "ClientSecret"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_value() {
        let token = RefreshToken::from("very-secret-refresh-token");
        let printed = format!("{token:?}");
        assert!(!printed.contains("very-secret"), "{printed}");
        assert_eq!(printed, "RefreshToken([redacted])");
        assert_eq!(token.expose_secret(), "very-secret-refresh-token");
    }

    #[test]
    fn fingerprint_tells_values_apart() {
        let a = AccessToken::from("a");
        assert_eq!(a.fingerprint(), AccessToken::from("a").fingerprint());
        assert_ne!(a.fingerprint(), AccessToken::from("b").fingerprint());
    }
}
