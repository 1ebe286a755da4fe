//! `webhoster net ...` subcommands.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Paths;

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// (being written)
    Down,
}

pub async fn run(_paths: Paths, _cmd: NetCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not written yet")
}
