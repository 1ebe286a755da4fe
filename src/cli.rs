//! The command line: one subcommand per job. Each module owns the parsing and
//! running of its own subcommands (`image::cli`, `vmm::cli`, `net::cli`); this
//! file only gathers them. anyhow lives here and in those `cli` submodules.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Paths, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "webhoster",
    version,
    about = "One API call, one isolated VM serving your website"
)]
pub struct Cli {
    #[command(flatten)]
    pub paths: Paths,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the API, the nginx front and the VM supervisor.
    Serve(Box<ServeArgs>),
    /// Build or inspect the guest image.
    #[command(subcommand)]
    Image(crate::image::cli::ImageCmd),
    /// Inspect and control VMs as an operator.
    #[command(subcommand)]
    Vm(crate::vmm::cli::VmCmd),
    /// Set up or tear down the VM network.
    #[command(subcommand)]
    Net(crate::net::cli::NetCmd),
    /// Check that everything the service needs is present.
    Doctor(crate::doctor::DoctorArgs),
    /// Stop every VM and the nginx master, and remove the VM network.
    /// Disks, seeds and the database stay; `serve` brings it all back.
    Teardown(crate::config::NetArgs),
    /// Install this binary, a systemd unit for `serve` and a default
    /// environment file (kept when it exists).
    Install(crate::install::InstallArgs),
}

/// Log to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => crate::app::run(cli.paths, *args).await,
            Command::Image(cmd) => crate::image::cli::run(cli.paths, cmd).await,
            Command::Vm(crate::vmm::cli::VmCmd::Backup { vm_id }) => {
                crate::app::operator::run(&cli.paths, &vm_id, crate::app::operator::BackupAction::Backup)
                    .await
            }
            Command::Vm(crate::vmm::cli::VmCmd::Backups { vm_id }) => {
                crate::app::operator::run(&cli.paths, &vm_id, crate::app::operator::BackupAction::List).await
            }
            Command::Vm(crate::vmm::cli::VmCmd::Restore { vm_id, backup_id }) => {
                crate::app::operator::run(
                    &cli.paths,
                    &vm_id,
                    crate::app::operator::BackupAction::Restore(backup_id),
                )
                .await
            }
            Command::Vm(cmd) => {
                let hosting = match &cmd {
                    crate::vmm::cli::VmCmd::Info { vm_id } => {
                        crate::app::hosting_summary(&cli.paths, vm_id).await
                    }
                    _ => None,
                };
                let code = crate::vmm::cli::run(cli.paths, cmd).await?;
                if let Some(text) = hosting {
                    print!("{text}");
                }
                Ok(code)
            }
            Command::Net(cmd) => crate::net::cli::run(cli.paths, cmd).await,
            Command::Doctor(args) => crate::doctor::run(cli.paths, args).await,
            Command::Teardown(args) => {
                crate::app::teardown(&cli.paths, &args).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Install(args) => crate::install::run(args),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
