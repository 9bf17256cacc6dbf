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

/// The token store. The admin token can be replaced while running ([`Tokens::set_admin`]).
#[derive(Clone)]
pub struct Tokens {
    admin: std::sync::Arc<std::sync::RwLock<Option<[u8; 32]>>>,
    scoped: Vec<ScopedToken>,
}

/// Reads the admin token from a file: a bare token, or `PREPUB_API_TOKEN=<token>` among other
/// `KEY=VALUE` lines (comments and blank lines ignored; optional quotes stripped).
pub fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    // An environment file names it; a file of one line is the bare token, unless that line is
    // an assignment of another variable (`CVMFS_GATEWAY_SECRET=…`: never to become the admin
    // token). Base64 tokens may end in '=', so '=' alone does not make an assignment.
    let token = match lines.iter().find_map(|l| {
        l.strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(l)
            .strip_prefix("PREPUB_API_TOKEN=")
    }) {
        Some(v) => Some(v.trim().trim_matches('"').trim_matches('\'').to_string()),
        None if lines.len() == 1 && !is_assignment(lines[0]) => Some(lines[0].to_string()),
        None => None,
    };
    match token {
        Some(t) if !t.is_empty() => Ok(t),
        _ => Err(format!("{}: no PREPUB_API_TOKEN in it", path.display())),
    }
}

/// Whether `line` assigns a shell variable (`NAME=value`, `export NAME=value`) rather than being
/// a bare token (base64, whose only '=' are its trailing padding).
fn is_assignment(line: &str) -> bool {
    let line = line.strip_prefix("export ").unwrap_or(line);
    let Some((name, value)) = line.split_once('=') else {
        return false;
    };
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !value.trim_matches('=').is_empty()
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field(
                "admin",
                &self.admin.read().map(|a| a.is_some()).unwrap_or(false),
            )
            .field("scoped", &self.scoped.len())
            .finish()
    }
}

impl Tokens {
    pub fn new(admin: Option<&str>, scoped: Vec<ScopedToken>) -> Tokens {
        Tokens {
            admin: std::sync::Arc::new(std::sync::RwLock::new(
                admin.map(|t| Sha256::digest(t.as_bytes()).into()),
            )),
            scoped,
        }
    }

    /// Replaces the admin token (all clones see the new one).
    pub fn set_admin(&self, admin: &str) {
        let d: [u8; 32] = Sha256::digest(admin.as_bytes()).into();
        *self.admin.write().unwrap_or_else(|e| e.into_inner()) = Some(d);
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
        let admin = *self.admin.read().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = &admin {
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
    fn token_files_bare_or_environment() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        std::fs::write(&p, "abc+/def==\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "abc+/def==");
        std::fs::write(
            &p,
            "# secrets\nCVMFS_GATEWAY_SECRET=x\nPREPUB_API_TOKEN=\"tok=\"\n",
        )
        .unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "tok=");
        std::fs::write(&p, "A=1\nB=2\n").unwrap();
        assert!(read_token_file(&p)
            .unwrap_err()
            .contains("no PREPUB_API_TOKEN"));
        // One line assigning another variable is not the admin token.
        for other in ["CVMFS_GATEWAY_SECRET=s3cret\n", "export OTHER=x\n"] {
            std::fs::write(&p, other).unwrap();
            assert!(read_token_file(&p)
                .unwrap_err()
                .contains("no PREPUB_API_TOKEN"));
        }
        std::fs::write(&p, "export PREPUB_API_TOKEN=tok\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "tok");
        // Base64 with padding is a bare token.
        for bare in ["QUJDRA==\n", "tok=\n"] {
            std::fs::write(&p, bare).unwrap();
            assert_eq!(read_token_file(&p).unwrap(), bare.trim());
        }
        let t = Tokens::new(Some("old"), vec![]);
        let clone = t.clone();
        t.set_admin("new");
        assert_eq!(
            clone.authenticate(Some("Bearer new")),
            Some(Principal::Admin)
        );
        assert_eq!(clone.authenticate(Some("Bearer old")), None);
    }

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
