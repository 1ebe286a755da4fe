//! `webhoster vmm ...` subcommands.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Paths;

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// (being written)
    List,
}

pub async fn run(_paths: Paths, _cmd: VmCmd) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not written yet")
}
