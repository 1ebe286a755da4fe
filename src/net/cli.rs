//! `webhoster net up|down|show`: build, tear down or print the VM network.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;

use super::{NetOptions, Network, nft};
use crate::config::{NetArgs, Paths};

#[derive(Subcommand, Debug)]
pub enum NetCmd {
    /// Create (idempotently) the namespace, bridge, veth, route and rules.
    Up(NetArgs),
    /// Remove the namespace, veth, routes, rules and sysctls, by name.
    Down(NetArgs),
    /// Print the network: addresses, taps and SSH forwards (changes nothing).
    Show(NetArgs),
}

pub async fn run(_paths: Paths, cmd: NetCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        NetCmd::Up(args) => {
            let net = Network::up(NetOptions::from(&args))
                .await
                .context("bring the VM network up")?;
            println!(
                "netns {} subnet {} gateway {} host veth {} ({})",
                args.netns,
                net.subnet(),
                net.gateway(),
                args.netns,
                net.host_address()
            );
        }
        NetCmd::Down(args) => {
            Network::down(&NetOptions::from(&args))
                .await
                .context("tear the VM network down")?;
            println!("netns {} removed", args.netns);
        }
        NetCmd::Show(args) => {
            let opts = NetOptions::from(&args);
            if !super::netns::exists(&opts.netns) {
                println!("netns {} does not exist", opts.netns);
                return Ok(ExitCode::from(3));
            }
            let net = Network::attach(opts.clone())
                .await
                .context("attach to the VM network")?;
            println!("netns     {}", opts.netns);
            println!("subnet    {} (gateway {})", net.subnet(), net.gateway());
            println!("host veth {} ({})", opts.host_veth(), net.host_address());
            println!("table     ip {}", nft::host_table(&opts.netns));
            for tap in net.taps().await? {
                println!("tap       {tap}");
            }
            for f in net.forwards().await? {
                println!(
                    "forward   {}:{} -> {}:{} (vm {})",
                    opts.ssh_bind, f.port, f.guest, f.guest_port, f.vm_id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
