//! The `cvmfs-prepub repo ...` operator commands: init, ingest, check, ls.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use prepub_core::cas::{Cas, LocalCas};
use prepub_core::chunker::ChunkParams;
use prepub_core::intake::{read_tar_parallel, IntakeLimits};
use prepub_core::keys::RepoKeys;
use prepub_core::object::{Compression, EncodeParams};
use prepub_core::pipeline::Pipeline;
use prepub_core::repo::{self, ApplyMode, TagRequest};
use prepub_core::timefmt;
use std::sync::Arc;

use crate::http_store::HttpStore;

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Create a new, empty, signed repository in a storage directory.
    Init(InitArgs),
    /// Publish a tar (.tar or .tar.gz) into a repository as a new signed revision.
    Ingest(IngestArgs),
    /// Verify signatures, whitelist, catalogs and every object of a repository.
    Check(CheckArgs),
    /// List a directory of the current revision.
    Ls(LsArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Repository storage directory (will hold .cvmfspublished and data/).
    #[arg(long, required_unless_present = "s3")]
    repo_dir: Option<PathBuf>,
    #[command(flatten)]
    s3: S3Args,
    /// Fully qualified repository name, e.g. software.cern.ch.
    #[arg(long)]
    name: String,
    /// Keys directory; keys are taken from it if present, else generated into it.
    /// Default: <repo-dir>.keys next to (never inside) the storage.
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

/// An S3 repository storage instead of a directory.
#[derive(Args, Debug, Default)]
pub struct S3Args {
    /// `BUCKET/PREFIX` of a repository in S3 (credentials from the standard AWS chain).
    #[arg(long)]
    s3: Option<String>,
    /// S3 endpoint (empty for AWS; e.g. http://127.0.0.1:9000 for MinIO or moto).
    #[arg(long, default_value = "")]
    s3_endpoint: String,
    #[arg(long, default_value = "us-east-1")]
    s3_region: String,
}

impl S3Args {
    fn open(&self) -> anyhow::Result<Option<prepub_actors::s3_cas::S3Cas>> {
        let Some(spec) = &self.s3 else {
            return Ok(None);
        };
        let (bucket, prefix) = spec.split_once('/').unwrap_or((spec.as_str(), ""));
        let store = prepub_actors::s3_cas::S3Cas::new(prepub_actors::s3_cas::S3Settings {
            bucket: bucket.to_string(),
            region: self.s3_region.clone(),
            endpoint: self.s3_endpoint.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            multipart_threshold: 64 << 20,
            request_timeout: prepub_actors::s3_cas::DEFAULT_REQUEST_TIMEOUT,
        })?;
        store.probe()?;
        Ok(Some(store))
    }
}

#[derive(Args, Debug)]
pub struct IngestArgs {
    /// The tar to publish (.tar or .tar.gz, detected by content); `-` for standard input.
    tar: String,
    #[arg(long)]
    repo_dir: PathBuf,
    /// Target path inside the repository, e.g. /sw/1.0 (`/` for the root).
    #[arg(long)]
    path: String,
    /// Named tag for the new revision.
    #[arg(long)]
    tag: Option<String>,
    #[arg(long, default_value = "")]
    tag_description: String,
    #[arg(long)]
    keys_dir: Option<PathBuf>,
    /// Keep existing entries under the path that the tar does not contain (default: replace).
    #[arg(long)]
    merge: bool,
    /// zlib, zlib:1..9 or none.
    #[arg(long, default_value = "zlib")]
    compression: String,
    /// Turn content-defined chunking off.
    #[arg(long)]
    no_chunking: bool,
    /// Chunk sizes in bytes: min,avg,max.
    #[arg(long, default_value = "4194304,8388608,16777216")]
    chunk_sizes: String,
    /// Drop device nodes and FIFOs instead of failing.
    #[arg(long)]
    skip_special: bool,
    /// Remove this path (relative to --path) before applying the tar; repeatable; implies --merge.
    /// Removing a `.cvmfscatalog` marker merges that nested catalog into its parent.
    #[arg(long = "remove")]
    remove: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[arg(long, conflicts_with = "url", required_unless_present_any = ["url", "s3"])]
    repo_dir: Option<PathBuf>,
    #[command(flatten)]
    s3: S3Args,
    /// Check a repository over HTTP instead.
    #[arg(long)]
    url: Option<String>,
    /// Master public key (<repo>.pub) to verify the whitelist signature.
    #[arg(long)]
    master_pub: Option<PathBuf>,
    /// Keys directory to take the master public key from (default: <repo-dir>.keys if present).
    #[arg(long)]
    keys_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[arg(long)]
    repo_dir: PathBuf,
    /// Directory to list (default /).
    #[arg(default_value = "/")]
    path: String,
}

pub fn run(cmd: RepoCmd) -> anyhow::Result<()> {
    match cmd {
        RepoCmd::Init(a) => init(a),
        RepoCmd::Ingest(a) => ingest(a),
        RepoCmd::Check(a) => check(a),
        RepoCmd::Ls(a) => ls(a),
    }
}

fn keys_dir(repo_dir: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| repo::default_keys_dir(repo_dir))
}

fn repo_name(cas: &dyn Cas) -> anyhow::Result<String> {
    let (m, _) =
        repo::current_manifest(cas)?.context("no repository in this storage (run repo init)")?;
    Ok(m.name)
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    if a.name.is_empty() || a.name.contains('/') || a.name.contains(char::is_whitespace) {
        bail!("repository name '{}' is invalid", a.name);
    }
    let s3 = a.s3.open()?;
    let kdir = match (&a.repo_dir, a.keys_dir) {
        (_, Some(k)) => k,
        (Some(d), None) => keys_dir(d, None),
        (None, None) => bail!("--keys-dir is required for an S3 repository"),
    };
    if let Some(d) = &a.repo_dir {
        let repo_abs = std::path::absolute(d)?;
        let kdir_abs = std::path::absolute(&kdir)?;
        if kdir_abs.starts_with(&repo_abs) {
            bail!(
                "keys directory {} lies inside the served storage {}",
                kdir.display(),
                d.display()
            );
        }
    }
    let keys = if RepoKeys::present(&kdir, &a.name) {
        RepoKeys::load(&kdir, &a.name)?
    } else {
        let k = RepoKeys::generate(&a.name, 365)?;
        k.save(&kdir)?;
        eprintln!("generated keys for {} in {}", a.name, kdir.display());
        k
    };
    let p = match (&s3, &a.repo_dir) {
        (Some(store), _) => repo::init(store, &keys, current_uid(), current_gid(), timefmt::now())?,
        (None, Some(d)) => {
            let cas = LocalCas::create(d)?;
            let _lock = repo::lock_storage(d)?;
            repo::init(&cas, &keys, current_uid(), current_gid(), timefmt::now())?
        }
        (None, None) => bail!("give --repo-dir or --s3"),
    };
    println!(
        "created {} revision {} root catalog {}",
        a.name, p.manifest.revision, p.commit.root
    );
    Ok(())
}

fn current_uid() -> u64 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) as u64)
        .unwrap_or(0)
}

fn current_gid() -> u64 {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m) as u64)
        .unwrap_or(0)
}

fn parse_chunks(s: &str, off: bool) -> anyhow::Result<ChunkParams> {
    let v: Vec<u64> = s
        .split(',')
        .map(|x| x.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--chunk-sizes '{s}' is not min,avg,max in bytes"))?;
    if v.len() != 3 {
        bail!("--chunk-sizes '{s}' needs exactly three numbers");
    }
    let p = ChunkParams {
        enabled: !off,
        min: v[0],
        avg: v[1],
        max: v[2],
    };
    p.validate().map_err(anyhow::Error::msg)?;
    Ok(p)
}

fn ingest(a: IngestArgs) -> anyhow::Result<()> {
    let cas = LocalCas::open(&a.repo_dir)?;
    let name = repo_name(&cas)?;
    let keys = RepoKeys::load(&keys_dir(&a.repo_dir, a.keys_dir), &name)?;
    let target = repo::normalize_repo_path(&a.path)?;
    let params = EncodeParams {
        chunking: parse_chunks(&a.chunk_sizes, a.no_chunking)?,
        compression: Compression::parse(&a.compression).map_err(anyhow::Error::msg)?,
    };
    let limits = IntakeLimits {
        skip_special: a.skip_special,
        ..IntakeLimits::default()
    };
    let _lock = repo::lock_storage(&a.repo_dir)?;
    let now = timefmt::now();
    // The heavy part (unpack, compress, hash, store) happens before the catalogs are touched.
    // Encoding runs on every core, with 16 durable puts in flight.
    let shared: Arc<dyn Cas> = Arc::new(LocalCas::open(&a.repo_dir)?.with_deferred_dir_sync());
    let pipeline = Pipeline::new(0, 16, 256 << 20);
    let top = target.is_empty();
    let mut cs = if a.tar == "-" {
        let stdin = std::io::stdin().lock();
        read_tar_parallel(stdin, top, &params, &limits, shared, &pipeline, now)?
    } else {
        let f = File::open(&a.tar).with_context(|| format!("opening {}", a.tar))?;
        read_tar_parallel(f, top, &params, &limits, shared, &pipeline, now)?
    };
    for r in &a.remove {
        let rel = repo::normalize_repo_path(r)?;
        cs.removals.push(rel.trim_start_matches('/').to_string());
    }
    if let Some(t) = &a.tag {
        // The automatic form names a publisher job's revision (see the API's bad-tag).
        if prepub_core::gc::is_auto_tag(t) {
            anyhow::bail!("tag name '{t}' is reserved: prepub-<job id> marks the revisions cvmfs-prepub jobs make");
        }
    }
    let tag = a.tag.map(|name| TagRequest {
        name,
        description: a.tag_description.clone(),
        owner: None,
    });
    let mode = if a.merge || !a.remove.is_empty() {
        ApplyMode::Merge
    } else {
        ApplyMode::Replace
    };
    let tags: Vec<TagRequest> = tag.into_iter().collect();
    let p = repo::publish(&cas, &keys, &tags, now, |tree| {
        repo::apply_changeset(tree, &cas, &cs, &target, mode, &params, now)
    })?;
    println!(
        "published {} revision {} root catalog {}: {} entries, {} files, {} bytes in, {} new objects ({} bytes), {} deduplicated",
        name,
        p.manifest.revision,
        p.commit.root,
        cs.stats.entries,
        cs.stats.files,
        cs.stats.bytes_in,
        cs.stats.new_objects,
        cs.stats.new_bytes,
        cs.stats.dedup_hits
    );
    Ok(())
}

fn check(a: CheckArgs) -> anyhow::Result<()> {
    let cas: Box<dyn Cas> = match (a.s3.open()?, &a.repo_dir, &a.url) {
        (Some(store), _, _) => Box::new(store),
        (None, Some(d), _) => Box::new(LocalCas::open(d)?),
        (None, None, Some(u)) => Box::new(HttpStore::new(u)?),
        _ => bail!("give --repo-dir, --s3 or --url"),
    };
    let master = match (&a.master_pub, &a.keys_dir, &a.repo_dir) {
        (Some(p), _, _) => Some(read_pub(p)?),
        (None, kd, rd) => {
            let dir = kd
                .clone()
                .or_else(|| rd.as_ref().map(|d| repo::default_keys_dir(d)));
            match (dir, repo::current_manifest(cas.as_ref()).ok().flatten()) {
                (Some(dir), Some((m, _))) => {
                    let p = dir.join(format!("{}.pub", m.name));
                    if p.is_file() {
                        Some(read_pub(&p)?)
                    } else {
                        None
                    }
                }
                _ => None,
            }
        }
    };
    let r = prepub_core::check::check(cas.as_ref(), master.as_ref(), timefmt::now());
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    for f in &r.findings {
        println!("FINDING: {f}");
    }
    println!(
        "{}: {} catalogs, {} entries, {} objects checked, {} findings",
        cas.describe(),
        r.catalogs,
        r.entries,
        r.objects,
        r.findings.len()
    );
    if !r.ok() {
        bail!("repository check failed with {} findings", r.findings.len());
    }
    Ok(())
}

fn read_pub(p: &Path) -> anyhow::Result<rsa::RsaPublicKey> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let pem = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    rsa::RsaPublicKey::from_public_key_pem(&pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(&pem))
        .with_context(|| format!("{} is not an RSA public key", p.display()))
}

fn ls(a: LsArgs) -> anyhow::Result<()> {
    let cas = LocalCas::open(&a.repo_dir)?;
    let path = repo::normalize_repo_path(&a.path)?;
    let lines = repo::with_current_tree(&cas, |t| {
        let Some(e) = t.lookup(&path)? else {
            return Err(repo::RepoError::Invalid(format!(
                "{}: no such path",
                a.path
            )));
        };
        if !e.is_dir() {
            return Ok(vec![repo::describe_entry(&e)]);
        }
        Ok(t.list(&path)?.iter().map(repo::describe_entry).collect())
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
