//! cvmfs-prepub: publishes software builds into CernVM-FS repositories.
//!
//! Without a subcommand it runs the publisher daemon from `--config`; `repo ...` runs the
//! operator commands on a repository storage directly.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use cvmfs_prepub::config::{FileConfig, Overrides};
use cvmfs_prepub::{repo_cmd, server};

#[derive(Parser, Debug)]
#[command(
    name = "cvmfs-prepub",
    version,
    about = "Pre-publisher for CernVM-FS repositories"
)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Listen address, overrides server.listen (e.g. :8080, 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<String>,
    /// Spool directory, overrides server.spool_root.
    #[arg(long)]
    spool_root: Option<PathBuf>,
    /// Publish mode, overrides server.publish_mode (standalone).
    #[arg(long)]
    publish_mode: Option<String>,
    /// Daemon mode, overrides mode (publisher).
    #[arg(long)]
    mode: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Operate on a repository storage directly (init, ingest, check, ls).
    #[command(subcommand)]
    Repo(repo_cmd::RepoCmd),
}

fn daemon(cli: Cli) -> anyhow::Result<()> {
    let file = match &cli.config {
        Some(p) => FileConfig::load(p)?,
        None => anyhow::bail!("--config is required to run the daemon"),
    };
    let o = Overrides {
        listen: cli.listen,
        spool_root: cli.spool_root,
        publish_mode: cli.publish_mode,
        mode: cli.mode,
    };
    let cfg = file.validate(&o)?;
    let log = server::logging::logger(cfg.log_json);
    server::run(cfg, log)
}

fn main() {
    let mut cli = Cli::parse();
    let res = match cli.cmd.take() {
        Some(Cmd::Repo(c)) => repo_cmd::run(c),
        None => daemon(cli),
    };
    if let Err(e) = res {
        // One line, the whole cause chain.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("cvmfs-prepub: {}", msg.join(": "));
        std::process::exit(1);
    }
}
