//! `webhoster serve`: wires the real engine, network, proxy and store.

use std::process::ExitCode;

use crate::config::{Paths, ServeArgs};

pub async fn run(_paths: Paths, _args: ServeArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not written yet")
}
