//! A read-only [`Cas`] over HTTP, so `repo check --url` can inspect a repository the way a
//! Stratum 1 or client sees it (`<url>/.cvmfspublished`, `<url>/data/XX/...`).

use std::io::Read;
use std::time::Duration;

use prepub_core::cas::{Cas, CasError, PendingObject, PutOutcome};
use prepub_core::hash::ObjectId;

pub struct HttpStore {
    base: String,
    client: reqwest::blocking::Client,
}

impl HttpStore {
    pub fn new(url: &str) -> Result<HttpStore, reqwest::Error> {
        HttpStore::with_timeout(url, Duration::from_secs(300))
    }

    /// A store whose every request gives up after `timeout`.
    pub fn with_timeout(url: &str, timeout: Duration) -> Result<HttpStore, reqwest::Error> {
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .build()?;
        Ok(HttpStore {
            base: url.trim_end_matches('/').to_string(),
            client,
        })
    }

    fn fetch(&self, rel: &str) -> Result<Option<reqwest::blocking::Response>, CasError> {
        let url = format!("{}/{}", self.base, rel);
        let io = |e: String| CasError::Io {
            op: "GET",
            path: url.clone(),
            source: std::io::Error::other(e),
        };
        let resp = self
            .client
            .get(&url)
            .send()
            .map_err(|e| io(e.to_string()))?;
        match resp.status().as_u16() {
            200 => Ok(Some(resp)),
            404 => Ok(None),
            s => Err(io(format!("HTTP status {s}"))),
        }
    }
}

fn read_only(op: &'static str) -> CasError {
    CasError::Io {
        op,
        path: "http store".into(),
        source: std::io::Error::other("an HTTP repository is read-only"),
    }
}

impl Cas for HttpStore {
    fn exists(&self, id: &ObjectId) -> Result<bool, CasError> {
        Ok(self.fetch(&id.path())?.is_some())
    }
    fn put_bytes(&self, _: &ObjectId, _: &[u8]) -> Result<PutOutcome, CasError> {
        Err(read_only("put"))
    }
    fn begin(&self) -> Result<Box<dyn PendingObject>, CasError> {
        Err(read_only("put"))
    }
    fn get(&self, id: &ObjectId) -> Result<Box<dyn Read + Send>, CasError> {
        match self.fetch(&id.path())? {
            Some(r) => Ok(Box::new(r)),
            None => Err(CasError::NotFound(id.to_string())),
        }
    }
    fn size(&self, id: &ObjectId) -> Result<u64, CasError> {
        let mut r = self.get(id)?;
        let mut n = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let k = r.read(&mut buf).map_err(|e| CasError::Io {
                op: "GET",
                path: id.path(),
                source: e,
            })?;
            if k == 0 {
                return Ok(n);
            }
            n += k as u64;
        }
    }
    fn list(&self) -> Result<Vec<ObjectId>, CasError> {
        Err(read_only("list"))
    }
    fn put_root_file(&self, _: &str, _: &[u8]) -> Result<(), CasError> {
        Err(read_only("put"))
    }
    fn get_root_file(&self, name: &str) -> Result<Option<Vec<u8>>, CasError> {
        match self.fetch(name)? {
            None => Ok(None),
            Some(r) => r
                .bytes()
                .map(|b| Some(b.to_vec()))
                .map_err(|e| CasError::Io {
                    op: "GET",
                    path: name.into(),
                    source: std::io::Error::other(e.to_string()),
                }),
        }
    }
    fn describe(&self) -> String {
        format!("HTTP repository {}", self.base)
    }
}
