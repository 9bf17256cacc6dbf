//! A blocking client of the publisher API, used by `prepubctl`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::api_types::{DrainState, ErrorBody, Health, JobList, JobView, Status, Submitted};

pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::blocking::Client,
}

impl Client {
    pub fn new(base: &str, token: Option<String>, insecure: bool) -> anyhow::Result<Client> {
        let http = reqwest::blocking::Client::builder()
            .timeout(None)
            .connect_timeout(Duration::from_secs(10))
            .danger_accept_invalid_certs(insecure)
            .build()?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let r = self.http.request(m, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(r: reqwest::blocking::Response) -> anyhow::Result<T> {
        let status = r.status();
        let body = r.bytes()?;
        if !status.is_success() {
            if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body) {
                bail!(
                    "HTTP {}: {} ({})",
                    status.as_u16(),
                    e.error.message,
                    e.error.code
                );
            }
            bail!(
                "HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body)
            );
        }
        serde_json::from_slice(&body).context("decoding the server's answer")
    }

    /// Streams a tar file as the raw body of a new job.
    pub fn submit(
        &self,
        tar: &Path,
        repo: &str,
        path: &str,
        tag: Option<&str>,
        description: Option<&str>,
    ) -> anyhow::Result<Submitted> {
        self.submit_with_progress(tar, repo, path, tag, description, |_, _| {})
    }

    /// As [`Client::submit`], calling `progress(sent, total)` as the upload goes.
    pub fn submit_with_progress(
        &self,
        tar: &Path,
        repo: &str,
        path: &str,
        tag: Option<&str>,
        description: Option<&str>,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> anyhow::Result<Submitted> {
        struct Counting<R, F> {
            inner: R,
            sent: u64,
            total: u64,
            progress: F,
        }
        impl<R: std::io::Read, F: FnMut(u64, u64)> std::io::Read for Counting<R, F> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.inner.read(buf)?;
                self.sent += n as u64;
                (self.progress)(self.sent, self.total);
                Ok(n)
            }
        }
        let f = std::fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
        let len = f.metadata()?.len();
        let body = Counting {
            inner: f,
            sent: 0,
            total: len,
            progress,
        };
        let mut r = self
            .req(reqwest::Method::POST, "/api/v1/jobs")
            .header("X-Cvmfs-Repo", repo)
            .header("X-Cvmfs-Path", path)
            .header("Content-Type", "application/x-tar")
            .body(reqwest::blocking::Body::sized(body, len));
        if let Some(t) = tag {
            r = r.header("X-Cvmfs-Tag-Name", t);
        }
        if let Some(d) = description {
            r = r.header("X-Cvmfs-Tag-Description", d);
        }
        Self::decode(r.send()?)
    }

    pub fn job(&self, id: &str) -> anyhow::Result<JobView> {
        Self::decode(
            self.req(reqwest::Method::GET, &format!("/api/v1/jobs/{id}"))
                .send()?,
        )
    }

    pub fn list(
        &self,
        state: Option<&str>,
        repo: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<JobList> {
        // State and repository names are restricted to URL-safe characters by the server.
        let mut q = format!("/api/v1/jobs?limit={limit}");
        if let Some(s) = state {
            q.push_str(&format!("&state={s}"));
        }
        if let Some(r) = repo {
            q.push_str(&format!("&repo={r}"));
        }
        Self::decode(self.req(reqwest::Method::GET, &q).send()?)
    }

    pub fn abort(&self, id: &str) -> anyhow::Result<JobView> {
        Self::decode(
            self.req(reqwest::Method::POST, &format!("/api/v1/jobs/{id}/abort"))
                .send()?,
        )
    }

    /// A garbage-collection operation of `repo`: `plan`, `status`, `tombstones` (GET) or `run`,
    /// `abort`, `lifecycle` (POST).
    pub fn gc(&self, repo: &str, action: &str) -> anyhow::Result<serde_json::Value> {
        let m = match action {
            "plan" | "status" | "tombstones" => reqwest::Method::GET,
            _ => reqwest::Method::POST,
        };
        Self::decode(self.req(m, &format!("/api/v1/gc/{repo}/{action}")).send()?)
    }

    pub fn status(&self) -> anyhow::Result<Status> {
        Self::decode(self.req(reqwest::Method::GET, "/api/v1/status").send()?)
    }

    pub fn drain(&self) -> anyhow::Result<DrainState> {
        Self::decode(self.req(reqwest::Method::POST, "/api/v1/drain").send()?)
    }

    pub fn resume(&self) -> anyhow::Result<DrainState> {
        Self::decode(self.req(reqwest::Method::POST, "/api/v1/resume").send()?)
    }

    /// Follows the job's event stream (`GET /api/v1/jobs/{id}/events`), calling `on_event`
    /// for every change, until the job ends; returns its final view. Falls back to polling
    /// if the stream breaks.
    pub fn watch(
        &self,
        id: &str,
        timeout: Duration,
        mut on_event: impl FnMut(&JobView),
    ) -> anyhow::Result<JobView> {
        use std::io::BufRead;
        let start = Instant::now();
        let r = self
            .req(reqwest::Method::GET, &format!("/api/v1/jobs/{id}/events"))
            .header("Accept", "text/event-stream")
            .send()?;
        if !r.status().is_success() {
            return Self::decode(r);
        }
        let mut last: Option<JobView> = None;
        for line in std::io::BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(data) = line.strip_prefix("data: ") {
                let j: JobView = serde_json::from_str(data).context("decoding an event")?;
                on_event(&j);
                let done = matches!(j.state.as_str(), "published" | "failed" | "aborted");
                last = Some(j);
                if done {
                    break;
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {}s waiting for job {id}",
                    timeout.as_secs()
                );
            }
        }
        match last {
            Some(j) if matches!(j.state.as_str(), "published" | "failed" | "aborted") => Ok(j),
            _ => self.wait(id, timeout.saturating_sub(start.elapsed()), on_event),
        }
    }

    pub fn health(&self) -> anyhow::Result<(bool, Health)> {
        let r = self.req(reqwest::Method::GET, "/api/v1/health").send()?;
        let ok = r.status().is_success();
        let h: Health = serde_json::from_slice(&r.bytes()?).context("decoding health")?;
        Ok((ok, h))
    }

    /// Polls until the job ends; returns its final view.
    pub fn wait(
        &self,
        id: &str,
        timeout: Duration,
        mut on_change: impl FnMut(&JobView),
    ) -> anyhow::Result<JobView> {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            let j = self.job(id)?;
            if j.state != last {
                last = j.state.clone();
                on_change(&j);
            }
            if matches!(j.state.as_str(), "published" | "failed" | "aborted") {
                return Ok(j);
            }
            if start.elapsed() > timeout {
                bail!("job {id} still {} after {}s", j.state, timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
