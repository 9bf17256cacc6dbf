//! A blocking client of the stock `cvmfs_gateway` API (cvmfs-formats.md §4): lease, payload,
//! commit, cancel, renew. Every call is signed as the stock publisher signs it; replies are read
//! as the stock gateway writes them — HTTP 200 with `"status":"error"` is an error, `invalid_hmac`
//! is a credentials problem (not worth retrying), and anything not JSON is a transport problem.

use std::time::Duration;

use prepub_core::gateway::{authorization, PackHeader};
use serde_json::{json, Value};

/// How a gateway call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GwError {
    /// Network trouble, HTTP 5xx, or an unreadable reply: worth retrying.
    Transport(String),
    /// The key or secret is wrong (`invalid_hmac`, authorization errors): do not retry.
    Credentials(String),
    /// The gateway answered `"status":"error"` with this reason.
    Refused(String),
}

/// A failed request, without its URL: lease tokens are part of the URLs of commits, payloads,
/// renewals and cancellations, and this text reaches job errors and the log.
fn transport(e: reqwest::Error) -> GwError {
    GwError::Transport(e.without_url().to_string())
}

impl std::fmt::Display for GwError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GwError::Transport(m) => write!(f, "gateway unreachable or failing: {m}"),
            GwError::Credentials(m) => write!(f, "gateway refused the credentials: {m}"),
            GwError::Refused(m) => write!(f, "gateway refused: {m}"),
        }
    }
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    Granted(String),
    /// `path_busy`, with the gateway's `time_remaining` text.
    Busy(String),
}

pub struct GatewayClient {
    base: String,
    key_id: String,
    secret: Vec<u8>,
    http: reqwest::blocking::Client,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never appears in logs.
        f.debug_struct("GatewayClient")
            .field("base", &self.base)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn classify(status: u16, body: &[u8]) -> Result<Value, GwError> {
    if status >= 500 {
        return Err(GwError::Transport(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        )));
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| {
        GwError::Transport(format!(
            "HTTP {status}, not JSON: {}",
            String::from_utf8_lossy(body)
                .chars()
                .take(200)
                .collect::<String>()
        ))
    })?;
    if v["status"] == "error" {
        let reason = v["reason"].as_str().unwrap_or("unspecified").to_string();
        if reason.contains("invalid_hmac")
            || reason.starts_with("authorization error")
            || reason.contains("invalid_key")
        {
            return Err(GwError::Credentials(reason));
        }
        return Err(GwError::Refused(reason));
    }
    Ok(v)
}

impl GatewayClient {
    pub fn new(
        base: &str,
        key_id: &str,
        secret: &str,
        timeout: Duration,
    ) -> Result<GatewayClient, GwError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(transport)?;
        Ok(GatewayClient {
            base: base.trim_end_matches('/').to_string(),
            key_id: key_id.to_string(),
            secret: secret.as_bytes().to_vec(),
            http,
        })
    }

    fn send(&self, r: reqwest::blocking::RequestBuilder) -> Result<Value, GwError> {
        let resp = r.send().map_err(transport)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(transport)?;
        classify(status, &body)
    }

    /// `POST /api/v1/leases` for `lease_path` (`repo/sub/path`, `repo/` for the root).
    pub fn acquire(&self, lease_path: &str) -> Result<LeaseReply, GwError> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let body = serde_json::to_vec(&json!({
            "path": lease_path,
            "api_version": "2",
            "hostname": host.trim(),
        }))
        .unwrap_or_default();
        let auth = authorization(&self.key_id, &self.secret, &body);
        let v = self.send(
            self.http
                .post(format!("{}/api/v1/leases", self.base))
                .header("Authorization", auth)
                .header("Content-Type", "application/json")
                .body(body),
        )?;
        match v["status"].as_str() {
            Some("ok") => v["session_token"]
                .as_str()
                .map(|t| LeaseReply::Granted(t.to_string()))
                .ok_or_else(|| GwError::Transport("lease granted without a session_token".into())),
            Some("path_busy") | Some("repo_busy") => Ok(LeaseReply::Busy(
                v["time_remaining"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v["time_remaining"].to_string()),
            )),
            other => Err(GwError::Transport(format!(
                "unexpected lease status {other:?}"
            ))),
        }
    }

    /// `POST /api/v1/payloads` (the legacy route every stock publisher uses): the JSON message
    /// (`header_size` as a string), then the pack header, then the objects.
    pub fn payload(
        &self,
        token: &str,
        header: &PackHeader,
        objects: &[Vec<u8>],
    ) -> Result<(), GwError> {
        let msg = serde_json::to_vec(&json!({
            "session_token": token,
            "payload_digest": header.digest,
            "header_size": header.header.len().to_string(),
            "api_version": "2",
        }))
        .unwrap_or_default();
        let auth = authorization(&self.key_id, &self.secret, &msg);
        let mut body = Vec::with_capacity(
            msg.len() + header.header.len() + objects.iter().map(Vec::len).sum::<usize>(),
        );
        body.extend_from_slice(&msg);
        body.extend_from_slice(&header.header);
        for o in objects {
            body.extend_from_slice(o);
        }
        self.send(
            self.http
                .post(format!("{}/api/v1/payloads", self.base))
                .header("Authorization", auth)
                .header("Message-Size", msg.len().to_string())
                .header("Content-Type", "application/octet-stream")
                .body(body),
        )?;
        Ok(())
    }

    /// `POST /api/v1/leases/<token>`: commit. Returns the final revision.
    pub fn commit(
        &self,
        token: &str,
        old_root: &str,
        new_root: &str,
        tag_name: &str,
        tag_description: &str,
    ) -> Result<u64, GwError> {
        let body = serde_json::to_vec(&json!({
            "old_root_hash": old_root,
            "new_root_hash": new_root,
            "tag_name": tag_name,
            "tag_description": tag_description,
        }))
        .unwrap_or_default();
        let auth = authorization(&self.key_id, &self.secret, token.as_bytes());
        let v = self.send(
            self.http
                .post(format!("{}/api/v1/leases/{token}", self.base))
                .header("Authorization", auth)
                .header("Content-Type", "application/json")
                .body(body),
        )?;
        Ok(v["final_revision"].as_u64().unwrap_or(0))
    }

    /// `DELETE /api/v1/leases/<token>`.
    pub fn cancel(&self, token: &str) -> Result<(), GwError> {
        let auth = authorization(&self.key_id, &self.secret, token.as_bytes());
        self.send(
            self.http
                .delete(format!("{}/api/v1/leases/{token}", self.base))
                .header("Authorization", auth),
        )
        .map(|_| ())
    }

    /// Tries to extend the lease. `Ok(false)`: the gateway has no renew endpoint (stock: 405).
    pub fn renew(&self, token: &str) -> Result<bool, GwError> {
        let auth = authorization(&self.key_id, &self.secret, token.as_bytes());
        let resp = self
            .http
            .put(format!("{}/api/v1/leases/{token}", self.base))
            .header("Authorization", auth)
            .send()
            .map_err(transport)?;
        let status = resp.status().as_u16();
        if status == 405 || status == 404 {
            return Ok(false);
        }
        let body = resp.bytes().map_err(transport)?;
        classify(status, &body).map(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified_like_the_stock_gateway_writes_them() {
        assert_eq!(
            classify(200, br#"{"status":"ok"}"#).unwrap()["status"],
            "ok"
        );
        assert_eq!(
            classify(200, br#"{"status":"error","reason":"invalid_hmac"}"#),
            Err(GwError::Credentials("invalid_hmac".into()))
        );
        assert_eq!(
            classify(200, br#"{"status":"error","reason":"merge_error"}"#),
            Err(GwError::Refused("merge_error".into()))
        );
        assert!(matches!(classify(500, b"boom"), Err(GwError::Transport(_))));
        assert!(matches!(
            classify(400, b"could not decode"),
            Err(GwError::Transport(_))
        ));
        let c = GatewayClient::new("http://x", "k", "very-secret", Duration::from_secs(1)).unwrap();
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
