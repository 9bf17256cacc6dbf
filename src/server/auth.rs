//! Bearer-token authentication: the admin token (`PREPUB_API_TOKEN`) and scoped tokens from the
//! configuration, all compared as SHA-256 digests in constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ScopedToken;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Scoped {
        name: String,
        prefixes: Vec<(String, String)>,
    },
}

impl Principal {
    /// Whether the caller may publish to `repo` at catalog path `path`.
    pub fn may_publish(&self, repo: &str, path: &str) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Scoped { prefixes, .. } => prefixes
                .iter()
                .any(|(r, p)| r == repo && prepub_core::catalog::is_under(path, p)),
        }
    }

    /// The owner recorded on jobs this caller submits.
    pub fn owner(&self) -> Option<String> {
        match self {
            Principal::Admin => None,
            Principal::Scoped { name, .. } => Some(name.clone()),
        }
    }

    /// Whether the caller may see and abort a job owned by `owner`.
    pub fn may_see(&self, owner: &Option<String>) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Scoped { name, .. } => owner.as_deref() == Some(name.as_str()),
        }
    }
}

/// The token store.
#[derive(Clone)]
pub struct Tokens {
    admin: Option<[u8; 32]>,
    scoped: Vec<ScopedToken>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &self.admin.is_some())
            .field("scoped", &self.scoped.len())
            .finish()
    }
}

impl Tokens {
    pub fn new(admin: Option<&str>, scoped: Vec<ScopedToken>) -> Tokens {
        Tokens {
            admin: admin.map(|t| Sha256::digest(t.as_bytes()).into()),
            scoped,
        }
    }

    /// Resolves an `Authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Option<Principal> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        if token.is_empty() {
            return None;
        }
        let d: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        // Compare against every token so timing does not reveal which one matched.
        if let Some(a) = &self.admin {
            if bool::from(a.ct_eq(&d)) {
                found = Some(Principal::Admin);
            }
        }
        for t in &self.scoped {
            if bool::from(t.digest.ct_eq(&d)) && found.is_none() {
                found = Some(Principal::Scoped {
                    name: t.name.clone(),
                    prefixes: t.prefixes.clone(),
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_and_scoped_tokens() {
        let scoped = ScopedToken {
            name: "lcg".into(),
            digest: Sha256::digest(b"scoped-secret").into(),
            prefixes: vec![("sw.org".into(), "/lcg".into())],
        };
        let t = Tokens::new(Some("admin-secret"), vec![scoped]);
        assert_eq!(
            t.authenticate(Some("Bearer admin-secret")),
            Some(Principal::Admin)
        );
        assert_eq!(t.authenticate(Some("Bearer wrong")), None);
        assert_eq!(t.authenticate(Some("admin-secret")), None);
        assert_eq!(t.authenticate(None), None);
        let p = t.authenticate(Some("Bearer scoped-secret")).unwrap();
        assert!(p.may_publish("sw.org", "/lcg"));
        assert!(p.may_publish("sw.org", "/lcg/x/y"));
        assert!(!p.may_publish("sw.org", "/lcgx"));
        assert!(!p.may_publish("sw.org", "/other"));
        assert!(!p.may_publish("other.org", "/lcg"));
        assert!(p.may_see(&Some("lcg".into())));
        assert!(!p.may_see(&None));
        assert!(format!("{t:?}").find("secret").is_none());
    }
}
