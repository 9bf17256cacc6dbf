//! cvmfs-prepub: publishes software builds into CernVM-FS repositories.
//!
//! This binary hosts the operator commands (`repo ...`); the publisher daemon and receiver
//! modes build on the same core library.

mod http_store;
mod repo_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cvmfs-prepub",
    version,
    about = "Pre-publisher for CernVM-FS repositories"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Operate on a repository storage directly (init, ingest, check, ls).
    #[command(subcommand)]
    Repo(repo_cmd::RepoCmd),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Repo(c) => repo_cmd::run(c),
    };
    if let Err(e) = res {
        // One line, the whole cause chain.
        let msg: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("cvmfs-prepub: {}", msg.join(": "));
        std::process::exit(1);
    }
}
