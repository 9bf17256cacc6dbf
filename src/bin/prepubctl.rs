//! prepubctl: the command-line client of the cvmfs-prepub API (install guide §8, §9).
//!
//! The server URL comes from `--url` or `PREPUB_URL`, the token from `--token` or (better, as it
//! stays out of shell history and process listings) `PREPUB_API_TOKEN`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser, Subcommand};
use cvmfs_prepub::api_types::JobView;
use cvmfs_prepub::client::Client;

const EXIT_CODES: &str = "Exit status: 0 success (a waited-for job was published); 1 the job \
ended failed or aborted, or the service is degraded; 2 usage error; 3 the service refused the \
request (HTTP error, e.g. 401, 404, 503 while draining); 4 the service could not be reached; \
5 timed out waiting.";

#[derive(Parser)]
#[command(
    name = "prepubctl",
    version,
    about = "Client of the cvmfs-prepub publisher API",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Base URL of the publisher, e.g. https://prepub.example.org:8080.
    #[arg(
        long,
        env = "PREPUB_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// API token (prefer the PREPUB_API_TOKEN environment variable).
    #[arg(long, env = "PREPUB_API_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Accept a server certificate that does not verify (test setups only).
    #[arg(long, global = true)]
    insecure: bool,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Service status: drain state, active jobs (state, progress, age), actors and workers.
    Status,
    /// List jobs, newest first.
    #[command(alias = "list")]
    Jobs {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one job.
    Show { job: String },
    /// Submit a .tar or .tar.gz for publishing under REPO at PATH.
    Submit {
        /// The tar (or gzip-compressed tar) to publish.
        tar: PathBuf,
        #[arg(long)]
        repo: String,
        #[arg(long)]
        path: String,
        /// Named tag for the published revision.
        #[arg(long)]
        tag: Option<String>,
        #[arg(long)]
        description: Option<String>,
        /// Follow the job until it ends; the exit status tells whether it was published.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Follow a job's state changes live until it ends (exit 0 only if published).
    #[command(alias = "wait")]
    Watch {
        job: String,
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Abort a job.
    Abort {
        /// The job to abort.
        #[arg(long = "job", value_name = "JOB")]
        job_flag: Option<String>,
        #[arg(value_name = "JOB", conflicts_with = "job_flag")]
        job: Option<String>,
    },
    /// Refuse new jobs (503) while accepted ones finish.
    Drain {
        /// Return only once no job is active.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait (exit 5 when jobs are still active then).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Accept new jobs again after a drain.
    Resume,
    /// The service's health checks (exit 1 when degraded).
    Health,
    /// Garbage collection of unreferenced objects (admin).
    #[command(subcommand)]
    Gc(GcCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff).
    Man,
}

#[derive(Subcommand)]
enum GcCmd {
    /// What a collection would delete now (deletes nothing).
    Plan {
        #[arg(long)]
        repo: String,
    },
    /// Collect: delete the unreferenced objects older than the grace period (or tombstone
    /// them, with a soft-delete period).
    Run {
        #[arg(long)]
        repo: String,
    },
    /// Content lifecycle: paths not seen for gc.access_ttl leave the namespace (removal jobs).
    Lifecycle {
        #[arg(long)]
        repo: String,
    },
    /// Stop the repository's run in progress; it ends aborted and its tombstones are revoked.
    Abort {
        #[arg(long)]
        repo: String,
    },
    /// Settings, a run in progress, the recent and next runs, pending tombstones.
    Status {
        #[arg(long)]
        repo: String,
    },
    /// Objects tombstoned and awaiting deletion.
    Tombstones {
        #[arg(long)]
        repo: String,
    },
}

/// An error with the exit status it maps to.
struct Fail(i32, String);

impl From<anyhow::Error> for Fail {
    fn from(e: anyhow::Error) -> Fail {
        // The whole cause chain on one line, without repeating causes already quoted.
        let mut msg: Vec<String> = Vec::new();
        let mut unreachable = false;
        for c in e.chain() {
            if let Some(r) = c.downcast_ref::<reqwest::Error>() {
                unreachable |= r.is_connect() || r.is_timeout();
            }
            let t = c.to_string();
            if !msg.iter().any(|m| m.contains(&t)) {
                msg.push(t);
            }
        }
        let text = msg.join(": ");
        let code = if unreachable {
            4
        } else if text.starts_with("HTTP ") {
            3
        } else if text.starts_with("timed out") {
            5
        } else {
            1
        };
        Fail(code, text)
    }
}

fn age(ms: i64) -> String {
    let s = (cvmfs_prepub_now_ms() - ms).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

fn cvmfs_prepub_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn show(j: &JobView, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(j).unwrap_or_default());
        return;
    }
    let mut line = format!(
        "{}  {:<12} {}:{}  age {}",
        j.job_id,
        j.state,
        j.repo,
        j.path,
        age(j.created)
    );
    if let (Some(r), Some(t)) = (j.revision, &j.tag) {
        line.push_str(&format!("  revision {r} tag {t}"));
    }
    if let Some(w) = &j.waiting {
        line.push_str(&format!("  waiting: {w}"));
    }
    if let Some(e) = &j.error {
        line.push_str(&format!(
            "  error in {}: {} ({})",
            e.state, e.message, e.code
        ));
    }
    println!("{line}");
    for (ep, outcome) in &j.distribution {
        println!("    stratum1 {ep}: {outcome}");
    }
}

fn finish(j: &JobView) -> Result<(), Fail> {
    match j.state.as_str() {
        "published" => Ok(()),
        s => Err(Fail(1, format!("job {} ended {s}", j.job_id))),
    }
}

/// Live state lines on stderr while following a job.
fn follow(j: &JobView) {
    let p = &j.progress;
    eprintln!(
        "{}: {}  ({} entries, {} new objects, {} deduplicated)",
        j.job_id, j.state, p.entries, p.objects_new, p.objects_dedup
    );
}

fn run(cli: Cli) -> Result<(), Fail> {
    let json = cli.json;
    match &cli.cmd {
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "prepubctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Fail(1, e.to_string()))?;
            return Ok(());
        }
        _ => {}
    }
    let token = cli.token.filter(|t| !t.is_empty());
    let c = Client::new(&cli.url, token, cli.insecure)?;
    match cli.cmd {
        Cmd::Status => {
            let s = c.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                return Ok(());
            }
            println!(
                "cvmfs-prepub {}  up {}s  {}",
                s.version,
                s.uptime_seconds,
                if s.draining {
                    "DRAINING (new jobs refused)"
                } else {
                    "accepting jobs"
                }
            );
            let counts: Vec<String> = s.jobs.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!(
                "jobs: {}",
                if counts.is_empty() {
                    "none".into()
                } else {
                    counts.join(", ")
                }
            );
            if s.active.is_empty() {
                println!("no active jobs");
            } else {
                println!("active jobs:");
                println!(
                    "  {:<36}  {:<12} {:>6}  {:>8} {:>8}  path",
                    "job", "state", "age", "entries", "objects"
                );
                for a in &s.active {
                    println!(
                        "  {:<36}  {:<12} {:>5}s  {:>8} {:>8}  {}:{}{}",
                        a.job_id,
                        a.state,
                        a.age_seconds,
                        a.progress.entries,
                        a.progress.objects_new + a.progress.objects_dedup,
                        a.repo,
                        a.path,
                        a.waiting
                            .as_ref()
                            .map(|w| format!("  (waiting: {w})"))
                            .unwrap_or_default()
                    );
                }
            }
            println!("actors:");
            for a in &s.actors {
                println!(
                    "  {:<16} x{:<3} {:<14} {}",
                    a.name, a.instances, a.status, a.detail
                );
            }
        }
        Cmd::Jobs { state, repo, limit } => {
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
        Cmd::Show { job } => show(&c.job(&job)?, json),
        Cmd::Submit {
            tar,
            repo,
            path,
            tag,
            description,
            wait,
            timeout,
        } => {
            // A progress bar on a terminal; nothing in logs and pipes.
            let tty = std::io::stderr().is_terminal() && !json;
            let mut last = Instant::now() - Duration::from_secs(1);
            let s = c.submit_with_progress(
                &tar,
                &repo,
                &path,
                tag.as_deref(),
                description.as_deref(),
                move |sent, total| {
                    if tty && (last.elapsed() >= Duration::from_millis(100) || sent == total) {
                        last = Instant::now();
                        let pct = (sent * 100).checked_div(total).unwrap_or(100);
                        let bar = "#".repeat((pct / 4) as usize);
                        eprint!(
                            "\ruploading [{bar:<25}] {pct:>3}%  {:.1}/{:.1} MiB",
                            sent as f64 / 1048576.0,
                            total as f64 / 1048576.0
                        );
                        if sent == total {
                            eprintln!();
                        }
                    }
                },
            )?;
            if json && !wait {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                println!("{}", s.job_id);
            }
            if wait {
                let j = c.watch(&s.job_id, Duration::from_secs(timeout), follow)?;
                show(&j, json);
                finish(&j)?;
            }
        }
        Cmd::Watch { job, timeout } => {
            let j = c.watch(&job, Duration::from_secs(timeout), follow)?;
            show(&j, json);
            finish(&j)?;
        }
        Cmd::Abort { job_flag, job } => {
            let Some(job) = job_flag.or(job) else {
                return Err(Fail(2, "abort: give the job as --job JOB".into()));
            };
            show(&c.abort(&job)?, json);
        }
        Cmd::Drain { wait, timeout } => {
            let d = c.drain()?;
            if !json {
                eprintln!("draining: new jobs are refused; {} active", d.active);
            }
            let mut active = d.active;
            if wait {
                let start = Instant::now();
                while active > 0 {
                    if start.elapsed() > Duration::from_secs(timeout) {
                        return Err(Fail(
                            5,
                            format!("timed out after {timeout}s: {active} jobs still active"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(500));
                    let s = c.status()?;
                    if s.active.len() != active && !json {
                        eprintln!("{} active", s.active.len());
                    }
                    active = s.active.len();
                }
                if !json {
                    eprintln!("idle: safe to stop or upgrade");
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"draining": true, "active": active})
                );
            }
        }
        Cmd::Resume => {
            let d = c.resume()?;
            if json {
                println!("{}", serde_json::to_string(&d).unwrap_or_default());
            } else {
                eprintln!("accepting jobs; {} active", d.active);
            }
        }
        Cmd::Health => {
            let (ok, h) = c.health()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
            } else {
                println!(
                    "{} (version {}){}",
                    h.status,
                    h.version,
                    if h.draining { ", draining" } else { "" }
                );
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
                return Err(Fail(1, "service is degraded".into()));
            }
        }
        Cmd::Gc(g) => {
            let (repo, what) = match g {
                GcCmd::Plan { repo } => (repo, "plan"),
                GcCmd::Run { repo } => (repo, "run"),
                GcCmd::Tombstones { repo } => (repo, "tombstones"),
                GcCmd::Lifecycle { repo } => (repo, "lifecycle"),
                GcCmd::Status { repo } => (repo, "status"),
                GcCmd::Abort { repo } => (repo, "abort"),
            };
            let v = c.gc(&repo, what)?;
            if what == "abort" && !json {
                println!("run {} is being aborted", v["run"].as_str().unwrap_or("?"));
                return Ok(());
            }
            if what == "status" && !json {
                println!(
                    "{}: garbage collection {}{}, {}",
                    v["repo"].as_str().unwrap_or(""),
                    if v["enabled"] == true {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    if v["dry_run"] == true {
                        " (dry run)"
                    } else {
                        ""
                    },
                    if v["running"] == true {
                        "running now"
                    } else {
                        "idle"
                    }
                );
                println!(
                    "  schedule: {}  next run: {}",
                    v["schedule"].as_str().unwrap_or("none"),
                    v["next_run"]
                );
                let run_line = |r: &serde_json::Value| {
                    format!(
                        "{} {} ({}, {}): {} candidates, {} tombstoned, {} revoked, {} deleted, {} bytes{}",
                        r["id"].as_str().unwrap_or("?"),
                        r["state"].as_str().unwrap_or("?"),
                        r["trigger"].as_str().unwrap_or("?"),
                        r["updated"],
                        r["candidates"],
                        r["tombstoned"],
                        r["revoked"],
                        r["deleted"],
                        r["bytes_reclaimed"],
                        r["reason"]
                            .as_str()
                            .map(|s| format!(" — {s}"))
                            .unwrap_or_default()
                    )
                };
                if v["current_run"].is_object() {
                    println!("  current run: {}", run_line(&v["current_run"]));
                }
                for r in v["runs"].as_array().into_iter().flatten() {
                    println!("  run {}", run_line(r));
                }
                println!(
                    "  keep {} revisions, grace {} s, soft delete {} s, access TTL {}",
                    v["keep_revisions"],
                    v["grace_period_seconds"],
                    v["soft_delete_period_seconds"],
                    v["access_ttl_seconds"]
                );
                println!(
                    "  {} tombstones pending; tracking {} objects, {} paths",
                    v["tombstones_pending"], v["objects_tracked"], v["paths_tracked"]
                );
                return Ok(());
            }
            if what == "lifecycle" && !json {
                let dry = v["dry_run"] == true;
                for e in v["expired"].as_array().into_iter().flatten() {
                    println!("  {} (last seen {})", e["path"], e["last_seen"]);
                }
                println!(
                    "{} paths not seen for the access TTL; {}",
                    v["expired"].as_array().map_or(0, |a| a.len()),
                    if dry {
                        "dry run: nothing submitted".to_string()
                    } else {
                        format!(
                            "{} removal jobs submitted",
                            v["submitted"].as_array().map_or(0, |a| a.len())
                        )
                    }
                );
                return Ok(());
            }
            if what == "tombstones" && !json {
                println!("{} tombstones", v["count"]);
                for t in v["tombstones"].as_array().into_iter().flatten() {
                    println!(
                        "  {}  {} bytes  tombstoned {}  deletable after {}",
                        t["object"], t["size"], t["created"], t["delete_after"]
                    );
                }
                return Ok(());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(());
            }
            let p = if what == "run" { &v["plan"] } else { &v };
            println!(
                "revision {}: {} objects stored, {} referenced by {} kept revisions, {} unreferenced but younger than the grace period",
                p["revision"], p["stored"], p["referenced"],
                p["kept"].as_array().map_or(0, |k| k.len()), p["young"]
            );
            for k in p["kept"].as_array().into_iter().flatten() {
                println!(
                    "  keep {} (revision {}): {}",
                    k["root_catalog"], k["revision"], k["why"]
                );
            }
            println!(
                "{} objects ({} bytes) {}",
                p["candidate_count"],
                p["candidate_bytes"],
                if what == "run" {
                    "were unreferenced"
                } else {
                    "would be deleted"
                }
            );
            if what == "run" {
                println!(
                    "run {}: {}{}",
                    v["run"]["id"].as_str().unwrap_or("?"),
                    v["run"]["state"].as_str().unwrap_or("?"),
                    v["run"]["reason"]
                        .as_str()
                        .map(|s| format!(" — {s}"))
                        .unwrap_or_default()
                );
                println!(
                    "deleted {} objects, {} bytes; tombstoned {}, revoked {}, {} tombstones pending",
                    v["swept"]["deleted"],
                    v["swept"]["bytes"],
                    v["tombstones"]["new"],
                    v["tombstones"]["revoked"],
                    v["tombstones"]["pending"]
                );
            }
        }
        Cmd::Completions { .. } | Cmd::Man => {}
    }
    Ok(())
}

fn main() {
    if let Err(Fail(code, msg)) = run(Cli::parse()) {
        eprintln!("prepubctl: {msg}");
        std::process::exit(code);
    }
}
