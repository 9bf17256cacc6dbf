//! prepubctl: the command-line client of the cvmfs-prepub API.
//!
//! The server URL comes from `--url` or `PREPUB_URL`, the token from `PREPUB_API_TOKEN` (never a
//! flag, so it stays out of shell history and process listings).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};
use cvmfs_prepub::api_types::JobView;
use cvmfs_prepub::client::Client;

#[derive(Parser)]
#[command(
    name = "prepubctl",
    version,
    about = "Client of the cvmfs-prepub publisher API"
)]
struct Cli {
    /// Base URL of the publisher, e.g. https://prepub.example.org:8080.
    #[arg(long, env = "PREPUB_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Accept a server certificate that does not verify (test setups only).
    #[arg(long)]
    insecure: bool,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a .tar or .tar.gz for publishing under REPO:PATH.
    Submit {
        tar: PathBuf,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Wait until the job ends; the exit status tells whether it was published.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Show one job.
    Status { job: String },
    /// List jobs, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Abort a job.
    Abort { job: String },
    /// Wait until a job ends (exit 0 only if published).
    Wait {
        job: String,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Show the service's health checks (exit 1 when degraded).
    Health,
}

fn show(j: &JobView, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(j).unwrap_or_default());
        return;
    }
    let mut line = format!("{}  {:<12} {}:{}", j.job_id, j.state, j.repo, j.path);
    if let (Some(r), Some(t)) = (j.revision, &j.tag) {
        line.push_str(&format!("  revision {r} tag {t}"));
    }
    if let Some(e) = &j.error {
        line.push_str(&format!(
            "  error in {}: {} ({})",
            e.state, e.message, e.code
        ));
    }
    println!("{line}");
}

fn finish(j: &JobView) -> anyhow::Result<()> {
    match j.state.as_str() {
        "published" => Ok(()),
        s => bail!("job {} ended {s}", j.job_id),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let token = std::env::var("PREPUB_API_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let c = Client::new(&cli.url, token, cli.insecure)?;
    let json = cli.json;
    match cli.cmd {
        Cmd::Submit {
            tar,
            repo,
            path,
            tag,
            description,
            wait,
            timeout,
        } => {
            let s = c.submit(&tar, &repo, &path, tag.as_deref(), description.as_deref())?;
            println!("{}", s.job_id);
            if wait {
                let j = c.wait(&s.job_id, Duration::from_secs(timeout), |j| {
                    eprintln!("{}: {}", j.job_id, j.state)
                })?;
                show(&j, json);
                finish(&j)?;
            }
        }
        Cmd::Status { job } => show(&c.job(&job)?, json),
        Cmd::List { state, repo, limit } => {
            let l = c.list(state.as_deref(), repo.as_deref(), limit)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&l.jobs).unwrap_or_default()
                );
            } else {
                for j in &l.jobs {
                    show(j, false);
                }
                eprintln!("{} of {} jobs", l.jobs.len(), l.total);
            }
        }
        Cmd::Abort { job } => show(&c.abort(&job)?, json),
        Cmd::Wait { job, timeout } => {
            let j = c.wait(&job, Duration::from_secs(timeout), |j| {
                eprintln!("{}: {}", j.job_id, j.state)
            })?;
            show(&j, json);
            finish(&j)?;
        }
        Cmd::Health => {
            let (ok, h) = c.health()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
            } else {
                println!("{} (version {})", h.status, h.version);
                for (name, chk) in &h.checks {
                    println!(
                        "  {:<4} {name}: {}",
                        if chk.ok { "ok" } else { "FAIL" },
                        chk.detail
                    );
                }
                for (state, n) in &h.jobs {
                    println!("  jobs {state}: {n}");
                }
            }
            if !ok {
                bail!("service is degraded");
            }
        }
    }
    Ok(())
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        // The whole cause chain on one line, without repeating causes already quoted.
        let mut msg: Vec<String> = Vec::new();
        for c in e.chain() {
            let t = c.to_string();
            if !msg.iter().any(|m| m.contains(&t)) {
                msg.push(t);
            }
        }
        eprintln!("prepubctl: {}", msg.join(": "));
        std::process::exit(1);
    }
}
