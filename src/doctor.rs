//! `webhoster doctor`: checks that everything the service needs is present.

use std::process::ExitCode;

use clap::Args;

use crate::config::Paths;

#[derive(Args, Debug)]
pub struct DoctorArgs {}

pub async fn run(_paths: Paths, _args: DoctorArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not written yet")
}
