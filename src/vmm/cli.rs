//! `webhoster vm ...`: operator commands. They read the per-VM directories
//! directly (vm.json, the pidfile, /proc) and talk to QEMU on the operator
//! monitor socket, so they work while `webhoster serve` runs (whose
//! supervisor holds the other monitor) and while it does not.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;

use super::dir::{self, VmDir};
use super::{VmSpec, qmp};
use crate::config::Paths;

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// One line per VM: vm_id, owner, state, pid, IP, SSH port, uptime.
    List,
    /// Everything about one VM: spec, files, process, QEMU status, argv.
    Info { vm_id: String },
    /// Send one QMP command (JSON) to a VM and print QEMU's reply, e.g.
    /// `webhoster vm qmp vm-1 '{"execute":"query-status"}'`.
    Qmp { vm_id: String, command: String },
    /// Take a live backup of a VM's disk (through the running service) and
    /// wait for it.
    Backup { vm_id: String },
    /// List a VM's backups (through the running service).
    Backups { vm_id: String },
    /// Stop the VM cleanly, put its disk back to a backup, start it
    /// (through the running service).
    Restore { vm_id: String, backup_id: i64 },
}

pub async fn run(paths: Paths, cmd: VmCmd) -> anyhow::Result<ExitCode> {
    let vms_dir = paths.vms_dir();
    match cmd {
        VmCmd::List => {
            print!("{}", list(&vms_dir)?);
            Ok(ExitCode::SUCCESS)
        }
        VmCmd::Info { vm_id } => {
            print!("{}", info(&vms_dir, &vm_id).await?);
            Ok(ExitCode::SUCCESS)
        }
        VmCmd::Qmp { vm_id, command } => {
            let command: serde_json::Value = serde_json::from_str(&command)
                .context("the QMP command is not JSON (e.g. '{\"execute\":\"query-status\"}')")?;
            let (dir, _) = load(&vms_dir, &vm_id)?;
            if dir.live_pid(&vm_id).is_none() {
                bail!("VM {vm_id} is not running");
            }
            let reply = qmp::raw_command(&dir.operator_socket(), &command, Duration::from_secs(10))
                .await
                .with_context(|| format!("QMP to VM {vm_id}"))?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            Ok(if reply.get("error").is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        // The engine alone cannot take the hosting's turn: `crate::cli`
        // sends these to the running service (`app::operator`).
        VmCmd::Backup { .. } | VmCmd::Backups { .. } | VmCmd::Restore { .. } => {
            bail!("backups go through the running service")
        }
    }
}

fn load(vms_dir: &Path, vm_id: &str) -> anyhow::Result<(VmDir, VmSpec)> {
    super::validate_vm_id(vm_id)?;
    let dir = VmDir::new(vms_dir, vm_id);
    if !dir.spec_file().exists() {
        bail!("unknown VM {vm_id:?}: no {}", dir.spec_file().display());
    }
    let spec = dir
        .read_spec()
        .with_context(|| format!("cannot read {}", dir.spec_file().display()))?;
    Ok((dir, spec))
}

/// What the files say about a VM's process: running (pid), crashed (a
/// pidfile without its QEMU) or stopped.
fn observed_state(dir: &VmDir, vm_id: &str) -> (&'static str, Option<i32>) {
    match dir.live_pid(vm_id) {
        Some(pid) => ("running", Some(pid)),
        None if dir.pidfile().exists() => ("crashed", None),
        None => ("stopped", None),
    }
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The `vm list` table.
pub fn list(vms_dir: &Path) -> anyhow::Result<String> {
    let mut rows = vec![[
        "VM_ID".to_owned(),
        "OWNER".into(),
        "STATE".into(),
        "PID".into(),
        "IP".into(),
        "SSH_PORT".into(),
        "UPTIME".into(),
    ]];
    let mut ids: Vec<String> = match std::fs::read_dir(vms_dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.path().join("vm.json").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", vms_dir.display())),
    };
    ids.sort();
    for vm_id in ids {
        let dir = VmDir::new(vms_dir, &vm_id);
        let Ok(spec) = dir.read_spec() else {
            continue;
        };
        let (state, pid) = observed_state(&dir, &vm_id);
        let label = |k: &str| spec.labels.get(k).cloned().unwrap_or_else(|| "-".into());
        rows.push([
            vm_id.clone(),
            label("owner"),
            state.into(),
            pid.map_or("-".into(), |p| p.to_string()),
            label("ip"),
            label("ssh_port"),
            pid.and_then(dir::uptime_secs).map_or("-".into(), human_duration),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// The `vm info` text.
pub async fn info(vms_dir: &Path, vm_id: &str) -> anyhow::Result<String> {
    use std::fmt::Write;
    let (dir, spec) = load(vms_dir, vm_id)?;
    let (state, pid) = observed_state(&dir, vm_id);
    let mut out = String::new();
    writeln!(out, "vm_id:      {vm_id}")?;
    writeln!(out, "state:      {state}")?;
    if let Some(pid) = pid {
        writeln!(out, "pid:        {pid}")?;
        if let Some(up) = dir::uptime_secs(pid) {
            writeln!(out, "uptime:     {}", human_duration(up))?;
        }
        if let Some(rss) = dir::rss_kib(pid) {
            writeln!(out, "rss:        {} MiB", rss / 1024)?;
        }
        if let Some(uid) = dir::uid_of(pid) {
            writeln!(out, "runs as:    uid {uid}")?;
        }
        match qmp::raw_command(
            &dir.operator_socket(),
            &serde_json::json!({"execute": "query-status"}),
            Duration::from_secs(3),
        )
        .await
        {
            Ok(reply) => writeln!(out, "qemu:       {}", reply["return"]["status"])?,
            Err(err) => writeln!(out, "qemu:       no answer on QMP ({err})")?,
        }
    }
    writeln!(
        out,
        "plan:       {} ({} vCPU, {} MiB, {} GiB disk)",
        spec.plan.name, spec.plan.vcpus, spec.plan.memory_mib, spec.plan.disk_gib
    )?;
    for (k, v) in &spec.labels {
        writeln!(out, "label:      {k}={v}")?;
    }
    writeln!(out, "dir:        {}", dir.root().display())?;
    writeln!(out, "qmp:        {} (operator)", dir.operator_socket().display())?;
    writeln!(out, "serial log: {}", dir.serial_log().display())?;
    writeln!(out, "spec:\n{}", serde_json::to_string_pretty(&spec)?)?;
    if let Some(pid) = pid
        && let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline"))
    {
        writeln!(out, "argv:")?;
        for arg in cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()) {
            writeln!(out, "  {}", String::from_utf8_lossy(arg))?;
        }
    }
    Ok(out)
}
