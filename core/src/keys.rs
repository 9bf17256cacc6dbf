//! Repository keys and signatures.
//!
//! Owns the standard key files of a repository in a keys directory (`<repo>.key` and `<repo>.crt`
//! sign manifests, `<repo>.masterkey` and `<repo>.pub` sign whitelists — the names
//! `cvmfs_server` uses), generation of a fresh set (RSA-2048, self-signed certificate as
//! `cvmfs_server mkfs` makes), and the two signature schemes (cvmfs-formats.md §1.5–§1.7):
//! manifests are RSA PKCS#1 v1.5 with a SHA-1 DigestInfo over the hash text; whitelists are raw
//! PKCS#1 v1.5 type-1 padding of the hash text, without DigestInfo.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use sha1::{Digest, Sha1};
use sha2::Sha256;
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::{DecodePem, Encode, EncodePem};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;
use x509_cert::Certificate;

/// Errors with keys and signatures.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

fn file_err(path: &Path, msg: impl ToString) -> KeyError {
    KeyError::File {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// The key material of one repository.
#[derive(Clone)]
pub struct RepoKeys {
    pub name: String,
    /// Signs manifests; its public half is in the certificate.
    pub key: RsaPrivateKey,
    pub certificate_pem: String,
    /// Signs whitelists. Absent on hosts that only publish (the master key may live offline).
    pub master: Option<RsaPrivateKey>,
    pub master_pub: RsaPublicKey,
}

impl std::fmt::Debug for RepoKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("RepoKeys")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Paths of the four key files.
pub fn key_paths(dir: &Path, name: &str) -> [PathBuf; 4] {
    [
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.masterkey")),
        dir.join(format!("{name}.pub")),
    ]
}

fn read_private(path: &Path) -> Result<RsaPrivateKey, KeyError> {
    let pem = fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    RsaPrivateKey::from_pkcs1_pem(&pem)
        .or_else(|_| RsaPrivateKey::from_pkcs8_pem(&pem))
        .map_err(|e| file_err(path, format!("not an RSA private key in PEM: {e}")))
}

fn read_public(path: &Path) -> Result<RsaPublicKey, KeyError> {
    let pem = fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    RsaPublicKey::from_public_key_pem(&pem)
        .or_else(|_| RsaPublicKey::from_pkcs1_pem(&pem))
        .map_err(|e| file_err(path, format!("not an RSA public key in PEM: {e}")))
}

/// Writes `data` to `path` with the given mode, through a temp file and rename.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| file_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

/// Public key of a PEM certificate.
pub fn certificate_public_key(pem: &str) -> Result<RsaPublicKey, KeyError> {
    let cert =
        Certificate::from_pem(pem.as_bytes()).map_err(|e| KeyError::Certificate(e.to_string()))?;
    let spki = cert
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    RsaPublicKey::from_public_key_der(&spki).map_err(|e| KeyError::Certificate(e.to_string()))
}

/// The whitelist fingerprint of a PEM certificate: SHA-1 of its DER encoding as uppercase hex
/// pairs joined by `:` (upstream `FingerprintCertificate`).
pub fn certificate_fingerprint(pem: &str) -> Result<String, KeyError> {
    let cert =
        Certificate::from_pem(pem.as_bytes()).map_err(|e| KeyError::Certificate(e.to_string()))?;
    let der = cert
        .to_der()
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let d = Sha1::digest(&der);
    Ok(d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Verifies a manifest signature (PKCS#1 v1.5, SHA-1 DigestInfo) over `hash_text`.
pub fn verify_manifest_signature(
    cert_pem: &str,
    hash_text: &[u8],
    sig: &[u8],
) -> Result<bool, KeyError> {
    let key = certificate_public_key(cert_pem)?;
    let Ok(sig) = Signature::try_from(sig) else {
        return Ok(false);
    };
    Ok(VerifyingKey::<Sha1>::new(key)
        .verify(hash_text, &sig)
        .is_ok())
}

/// Verifies a whitelist signature (raw PKCS#1 v1.5 of the hash text) with a master public key.
pub fn verify_whitelist_signature(master: &RsaPublicKey, hash_text: &[u8], sig: &[u8]) -> bool {
    master
        .verify(Pkcs1v15Sign::new_unprefixed(), hash_text, sig)
        .is_ok()
}

impl RepoKeys {
    /// Generates a fresh key set and a self-signed certificate valid for `validity_days`.
    pub fn generate(name: &str, validity_days: u64) -> Result<RepoKeys, KeyError> {
        let mut rng = rand::thread_rng();
        let key =
            RsaPrivateKey::new(&mut rng, 2048).map_err(|e| KeyError::Generate(e.to_string()))?;
        let master =
            RsaPrivateKey::new(&mut rng, 2048).map_err(|e| KeyError::Generate(e.to_string()))?;
        let certificate_pem = self_signed_certificate(name, &key, validity_days)?;
        Ok(RepoKeys {
            name: name.to_string(),
            master_pub: master.to_public_key(),
            key,
            certificate_pem,
            master: Some(master),
        })
    }

    /// Whether the manifest key and certificate of `name` exist in `dir`.
    pub fn present(dir: &Path, name: &str) -> bool {
        let p = key_paths(dir, name);
        p[0].is_file() && p[1].is_file()
    }

    /// Loads `<name>.key`, `<name>.crt`, `<name>.pub` and, if present, `<name>.masterkey`.
    pub fn load(dir: &Path, name: &str) -> Result<RepoKeys, KeyError> {
        let [key_p, crt_p, master_p, pub_p] = key_paths(dir, name);
        let key = read_private(&key_p)?;
        let certificate_pem = fs::read_to_string(&crt_p).map_err(|e| file_err(&crt_p, e))?;
        let cert_key = certificate_public_key(&certificate_pem).map_err(|e| file_err(&crt_p, e))?;
        if cert_key != key.to_public_key() {
            return Err(file_err(
                &crt_p,
                format!("certificate does not belong to {}", key_p.display()),
            ));
        }
        let master = if master_p.is_file() {
            Some(read_private(&master_p)?)
        } else {
            None
        };
        let master_pub = if pub_p.is_file() {
            read_public(&pub_p)?
        } else if let Some(m) = &master {
            m.to_public_key()
        } else {
            return Err(file_err(&pub_p, "missing (needed to verify the whitelist)"));
        };
        Ok(RepoKeys {
            name: name.to_string(),
            key,
            certificate_pem,
            master,
            master_pub,
        })
    }

    /// Writes the key files into `dir` (private keys mode 0600, the rest 0644).
    pub fn save(&self, dir: &Path) -> Result<(), KeyError> {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let [key_p, crt_p, master_p, pub_p] = key_paths(dir, &self.name);
        let pem = |k: &RsaPrivateKey, p: &Path| -> Result<Vec<u8>, KeyError> {
            Ok(k.to_pkcs1_pem(LineEnding::LF)
                .map_err(|e| file_err(p, e))?
                .as_bytes()
                .to_vec())
        };
        write_file(&key_p, &pem(&self.key, &key_p)?, 0o600)?;
        write_file(&crt_p, self.certificate_pem.as_bytes(), 0o644)?;
        if let Some(m) = &self.master {
            write_file(&master_p, &pem(m, &master_p)?, 0o600)?;
        }
        let pubpem = self
            .master_pub
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| file_err(&pub_p, e))?;
        write_file(&pub_p, pubpem.as_bytes(), 0o644)?;
        Ok(())
    }

    /// Signs a manifest hash line.
    pub fn sign_manifest(&self, hash_text: &[u8]) -> Vec<u8> {
        SigningKey::<Sha1>::new(self.key.clone())
            .sign(hash_text)
            .to_vec()
    }

    /// Signs a whitelist hash line with the master key.
    pub fn sign_whitelist(&self, hash_text: &[u8]) -> Result<Vec<u8>, KeyError> {
        let m = self.master.as_ref().ok_or_else(|| {
            KeyError::Sign(format!(
                "no master key for {} (<repo>.masterkey)",
                self.name
            ))
        })?;
        m.sign(Pkcs1v15Sign::new_unprefixed(), hash_text)
            .map_err(|e| KeyError::Sign(e.to_string()))
    }

    pub fn fingerprint(&self) -> Result<String, KeyError> {
        certificate_fingerprint(&self.certificate_pem)
    }
}

/// A self-signed certificate like `cvmfs_server`'s: CN `<fqrn, max 30 chars> CernVM-FS Release
/// Managers`.
fn self_signed_certificate(name: &str, key: &RsaPrivateKey, days: u64) -> Result<String, KeyError> {
    let cn: String = name.chars().take(30).collect();
    let cn = cn.replace([',', '+', '=', '"', '\\', '<', '>', ';'], "_");
    let subject = Name::from_str(&format!("CN={cn} CernVM-FS Release Managers"))
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let validity = Validity::from_now(Duration::from_secs(days * 86_400))
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let spki_der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let spki = SubjectPublicKeyInfoOwned::try_from(spki_der.as_bytes())
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let serial = SerialNumber::from(rand::random::<u32>() | 1);
    let signer = SigningKey::<Sha256>::new(key.clone());
    let builder = CertificateBuilder::new(Profile::Root, serial, validity, subject, spki, &signer)
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    let cert = builder
        .build::<Signature>()
        .map_err(|e| KeyError::Certificate(e.to_string()))?;
    cert.to_pem(LineEnding::LF)
        .map_err(|e| KeyError::Certificate(e.to_string()))
}

/// The common name (CN) of a DER certificate's subject.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    subject_cn(&cert)
}

/// The common name (CN) of the first certificate in a PEM file.
pub fn pem_common_name(pem: &[u8]) -> Option<String> {
    let chain = x509_cert::Certificate::load_pem_chain(pem).ok()?;
    subject_cn(chain.first()?)
}

fn subject_cn(cert: &x509_cert::Certificate) -> Option<String> {
    for rdn in cert.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == x509_cert::der::oid::db::rfc4519::CN {
                return std::str::from_utf8(atv.value.value())
                    .ok()
                    .map(str::to_string);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_save_load_sign_verify() {
        let dir = tempfile::tempdir().unwrap();
        let k = RepoKeys::generate("test.example.org", 365).unwrap();
        k.save(dir.path()).unwrap();
        let mode = |n: &str| {
            use std::os::unix::fs::PermissionsExt;
            fs::metadata(dir.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("test.example.org.key"), 0o600);
        assert_eq!(mode("test.example.org.masterkey"), 0o600);
        assert_eq!(mode("test.example.org.crt"), 0o644);
        let l = RepoKeys::load(dir.path(), "test.example.org").unwrap();
        assert!(l.certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let sig = l.sign_manifest(b"0123456789abcdef0123456789abcdef01234567");
        assert_eq!(sig.len(), 256);
        assert!(verify_manifest_signature(
            &l.certificate_pem,
            b"0123456789abcdef0123456789abcdef01234567",
            &sig
        )
        .unwrap());
        assert!(!verify_manifest_signature(
            &l.certificate_pem,
            b"1123456789abcdef0123456789abcdef01234567",
            &sig
        )
        .unwrap());
        let wsig = l.sign_whitelist(b"abc").unwrap();
        assert!(verify_whitelist_signature(&l.master_pub, b"abc", &wsig));
        assert!(!verify_whitelist_signature(&l.master_pub, b"abd", &wsig));
        let fp = l.fingerprint().unwrap();
        assert_eq!(fp.len(), 59);
        assert!(fp
            .chars()
            .all(|c| c == ':' || c.is_ascii_hexdigit() && !c.is_ascii_lowercase()));
        assert!(format!("{l:?}").find("PRIVATE").is_none());
    }
}
