//! `webhoster image ...`: build, show, path.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use crate::config::Paths;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Build the guest image unless it is cached; print its manifest (JSON,
    /// absolute paths) on stdout. Progress goes to stderr.
    Build,
    /// Print the cached image's manifest; fail if it is not built.
    Show,
    /// Print the directory of the current recipe's image in the cache.
    Path,
}

pub async fn run(paths: Paths, cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    let cache = paths.image_cache.clone();
    let image = match cmd {
        ImageCmd::Build => tokio::task::spawn_blocking(move || super::ensure(&cache))
            .await
            .context("the image build thread")??,
        ImageCmd::Show => super::cached(&cache)?.with_context(|| {
            format!(
                "no image for the current recipe in {}: run `webhoster image build`",
                paths.image_cache.display()
            )
        })?,
        ImageCmd::Path => {
            let dir = std::path::absolute(&cache)?.join(super::key()?);
            println!("{}", dir.display());
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{}", serde_json::to_string_pretty(&image.manifest)?);
    Ok(ExitCode::SUCCESS)
}
