//! Supervision of one VM's QEMU after start or reattach: reads QMP events all
//! the time, reconnects when the stream breaks (an event qapi cannot decode
//! ends it), drains the serial console into `serial.log` (`vmm::logs`),
//! keeps a connection to the guest agent open while it runs (`qga_keep`),
//! and when QEMU exits tells apart
//!
//! - a stop we asked for (the VM's `stopping` mark): nothing to do here;
//! - a shutdown from inside the guest (`SHUTDOWN guest=true`), or from the
//!   host outside the engine (an operator's `quit`, SIGTERM): `stopped`, the
//!   user or operator meant it;
//! - a crash (QEMU exits with no SHUTDOWN event, or `GUEST_PANICKED`):
//!   `crashed`, restarted with exponential backoff, `failed` after
//!   `max_crashes` within the window.
//!
//! A guest reboot is a `RESET` event and the same QEMU goes on: not an exit.
//!
//! All it sees of the engine is [`Supervision`]: the registry to record
//! state, the launcher to restart QEMU, the policy and the cancel token.
//! Never stops or signals a QEMU; it restarts one only under the VM's op
//! lock and only from `crashed`, so a stop or start of the engine that came
//! first wins.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::logs::Console;
use super::process::{Attached, Launcher, describe_exit, wait_until};
use super::qga_keep;
use super::qmp::{QmpClient, QmpEvent};
use super::registry::{Registry, Vm};
use super::{RestartPolicy, VmState, VmmError};
use crate::logfile::RotatingFile;

/// How often liveness is checked and the console drained when nothing
/// happens. The ring holds 1 MiB, so a guest writing more than 512 KiB/s to
/// its console loses its oldest lines, never the host its disk.
const TICK: Duration = Duration::from_secs(2);
/// After the QMP stream ends, how long QEMU may take to finish exiting before
/// we decide it is alive and reconnect instead.
const EXIT_GRACE: Duration = Duration::from_secs(2);

enum Exit {
    /// Our own stop: the engine settles the state.
    Ours,
    Stopped(String),
    Crashed(String),
}

/// What a supervisor may use of the engine, and nothing more.
pub(super) struct Supervision {
    pub registry: Arc<Registry>,
    pub launcher: Arc<Launcher>,
    pub restart: RestartPolicy,
    /// Cancelled when the engine goes away: supervisors end, QEMUs run on.
    pub cancel: CancellationToken,
}

/// Supervise `vm` until its QEMU stops for good or the engine goes away.
/// Spawned by the engine inside the VM's span.
pub(super) async fn run(sup: Supervision, vm: Arc<Vm>, mut attached: Attached) {
    loop {
        let Some(exit) = watch(&sup, &vm, &mut attached).await else {
            return;
        };
        let crash = match exit {
            Exit::Ours => return,
            Exit::Stopped(reason) => {
                finish_process(&sup, &vm);
                if let Err(err) = sup.registry.set_state(&vm, VmState::Stopped, &reason) {
                    tracing::error!(%err, "cannot record stop");
                }
                return;
            }
            Exit::Crashed(reason) => reason,
        };
        finish_process(&sup, &vm);
        match restart_after_crash(&sup, &vm, crash).await {
            Some(next) => attached = next,
            None => return,
        }
    }
}

/// Forget the dead process and remove what it left behind: its runtime
/// files and its cgroup (a restart makes a fresh one; one still busy is
/// removed by the next stop or destroy).
fn finish_process(sup: &Supervision, vm: &Vm) {
    vm.clear_process();
    vm.dir().clean_runtime_files();
    if let Err(err) = sup.launcher.release_cgroup(vm.id()) {
        tracing::debug!(err = %super::error_chain(&err), "the cgroup is still busy");
    }
}

/// Record a crash, then restart with backoff until a QEMU runs again
/// (`Some`), or give up: too many crashes (`failed`), or a stop/start from
/// the engine took over (`None`).
async fn restart_after_crash(sup: &Supervision, vm: &Vm, mut reason: String) -> Option<Attached> {
    let registry = &sup.registry;
    let mut from_state_ok = registry.set_state(vm, VmState::Crashed, &reason).is_ok();
    if vm.spec().restore.is_some() {
        // A clone never resumed has no guest of its own yet: nothing to
        // restart (its disk is the template's moment, not a booted system).
        // The pool discards it.
        let why = format!("a restored clone died before its resume; not restarted: {reason}");
        tracing::warn!(%why);
        let _ = registry.set_state(vm, VmState::Failed, &why);
        return None;
    }
    loop {
        if !from_state_ok {
            tracing::error!("crash in an unexpected state; not restarting");
            return None;
        }
        let policy = sup.restart;
        let crashes = vm.record_crash(policy.window);
        if crashes >= policy.max_crashes {
            let why = format!("{crashes} crashes within {:?}; last: {reason}", policy.window);
            let _ = registry.set_state(vm, VmState::Failed, &why);
            return None;
        }
        let delay = policy.backoff(crashes);
        tracing::warn!(crashes, ?delay, %reason, "restarting crashed VM");
        tokio::select! {
            _ = sup.cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        let _op = vm.lock_op().await;
        let (state, spec) = vm.state_and_spec();
        if state != VmState::Crashed {
            return None;
        }
        if registry
            .set_state(vm, VmState::Starting, &format!("restart after crash {crashes}"))
            .is_err()
        {
            return None;
        }
        // Someone else (another service process) may have started it
        // meanwhile: then this attaches to that QEMU.
        match sup.launcher.spawn_or_attach(vm.id(), vm.dir(), &spec).await {
            Ok(attached) => {
                let pid = attached.pid;
                vm.set_process(pid, attached.qmp.clone());
                let _ = registry.set_state(
                    vm,
                    VmState::Running,
                    &format!("restarted after crash (pid {pid})"),
                );
                return Some(attached);
            }
            Err(err) => {
                reason = format!("restart failed: {err}");
                from_state_ok = registry.set_state(vm, VmState::Crashed, &reason).is_ok();
            }
        }
    }
}

/// Follow one QEMU until it exits (`Some`) or the engine goes away (`None`).
async fn watch(sup: &Supervision, vm: &Vm, attached: &mut Attached) -> Option<Exit> {
    let cancel = &sup.cancel;
    let pid = attached.pid;
    let mut shutdown: Option<(bool, String)> = None;
    let mut panicked = false;
    let mut connected = true;
    let mut console = Console::new(RotatingFile::new(vm.dir().serial_log(), sup.launcher.log_cap));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let keeping = qga_keep::keep(&vm.dir().qga_socket(), &vm.dir().qga_lock());
    loop {
        let mut stream_ended = false;
        tokio::select! {
            _ = cancel.cancelled() => return None,
            event = attached.events.recv(), if connected => match event {
                None | Some(QmpEvent::Closed { .. }) => {
                    if let Some(QmpEvent::Closed { error: Some(error) }) = &event {
                        tracing::warn!(%error, "QMP stream broke");
                    }
                    stream_ended = true;
                }
                Some(QmpEvent::Shutdown { guest, reason }) => {
                    tracing::info!(guest, %reason, "QEMU shutting down");
                    // The ring goes with QEMU: keep its last words.
                    drain(&mut console, attached).await;
                    if reason == "guest-panic" {
                        panicked = true;
                    }
                    shutdown = Some((guest, reason));
                }
                Some(QmpEvent::GuestPanicked) => {
                    tracing::warn!("guest panicked");
                    drain(&mut console, attached).await;
                    panicked = true;
                }
                Some(QmpEvent::Reset { guest, reason }) => {
                    tracing::info!(guest, %reason, "guest reset (reboot)");
                    vm.note_reset();
                }
                // A pause on the way out (powerdown, quit) is part of the
                // stop; one the engine made (a warmed-up clone) is Paused
                // already.
                Some(QmpEvent::Stop)
                    if !vm.is_stopping() && shutdown.is_none() && vm.state() != VmState::Paused =>
                {
                    tracing::warn!("QEMU paused the guest");
                    let _ = sup.registry.set_state(vm, VmState::Paused, "QEMU paused the guest (STOP)");
                }
                Some(QmpEvent::Resume) => {
                    if vm.state() == VmState::Paused {
                        let _ = sup.registry.set_state(vm, VmState::Running, "QEMU resumed the guest");
                    }
                }
                Some(other) => tracing::debug!(event = ?other, "QMP event"),
            },
            _ = tick.tick() => if connected {
                drain(&mut console, attached).await;
                if vm.state() == VmState::Running {
                    keeping.refill().await;
                }
            },
        }
        if stream_ended {
            connected = false;
            vm.set_qmp(None);
            wait_until(EXIT_GRACE, || !pid.is_ours(vm.id())).await;
        }
        if !pid.is_ours(vm.id()) {
            let status = match &mut attached.exit {
                Some(rx) => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|s| s.is_some())).await;
                    *rx.borrow()
                }
                None => None,
            };
            let exit = if vm.is_stopping() {
                Exit::Ours
            } else if panicked {
                Exit::Crashed("the guest kernel panicked".to_owned())
            } else if let Some((guest, reason)) = shutdown {
                if guest {
                    Exit::Stopped(format!("the guest powered off ({reason})"))
                } else {
                    Exit::Stopped(format!("QEMU was shut down from the host ({reason})"))
                }
            } else {
                Exit::Crashed(format!("QEMU exited unasked ({})", describe_exit(status)))
            };
            return Some(exit);
        }
        if !connected {
            match reconnect(vm).await {
                Ok((client, events)) => {
                    let client = Arc::new(client);
                    vm.set_qmp(Some(client.clone()));
                    attached.qmp = client;
                    attached.events = events;
                    connected = true;
                }
                Err(err) => tracing::warn!(%err, "QMP reconnect failed; retrying"),
            }
        }
    }
}

async fn drain(console: &mut Console, attached: &Attached) {
    if let Err(err) = console.drain(&attached.qmp).await {
        tracing::debug!(%err, "cannot drain the serial console");
    }
}

/// A fresh QMP connection, resynchronised with `query-status` (events were
/// missed while disconnected).
async fn reconnect(vm: &Vm) -> Result<(QmpClient, tokio::sync::mpsc::UnboundedReceiver<QmpEvent>), VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm.id().to_owned(),
        source,
    };
    let (client, events) = QmpClient::connect(&vm.dir().qmp_socket())
        .await
        .map_err(qmp_err)?;
    let status = client.query_status().await.map_err(qmp_err)?;
    tracing::info!(status = %status.status, "QMP reconnected");
    Ok((client, events))
}
