//! `webhoster image ...` subcommands.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Paths;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// (being written)
    Build,
}

pub async fn run(_paths: Paths, _cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not written yet")
}
