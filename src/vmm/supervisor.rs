//! Supervision of one VM's QEMU after start or reattach: reads QMP events all
//! the time, reconnects when the stream breaks (an event qapi cannot decode
//! ends it), rotates the logs, and when QEMU exits tells apart
//!
//! - a stop we asked for (the engine's `stopping` flag): nothing to do here;
//! - a shutdown from inside the guest (`SHUTDOWN guest=true`), or from the
//!   host outside the engine (an operator's `quit`, SIGTERM): `stopped`, the
//!   user or operator meant it;
//! - a crash (QEMU exits with no SHUTDOWN event, or `GUEST_PANICKED`):
//!   `crashed`, restarted with exponential backoff, `failed` after
//!   `max_crashes` within the window.
//!
//! A guest reboot is a `RESET` event and the same QEMU goes on: not an exit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::MissedTickBehavior;

use super::dir;
use super::engine::{Attached, Inner, Vm, describe_exit, wait_until};
use super::qmp::{QmpClient, QmpEvent};
use super::{VmState, VmmError};

/// How often liveness is checked and logs rotated when nothing happens.
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

pub(super) async fn run(inner: Arc<Inner>, vm: Arc<Vm>, mut attached: Attached) {
    loop {
        let Some(exit) = watch(&inner, &vm, &mut attached).await else {
            return;
        };
        let crash = match exit {
            Exit::Ours => return,
            Exit::Stopped(reason) => {
                finish_process(&vm);
                if let Err(err) = inner.set_state(&vm, VmState::Stopped, &reason) {
                    tracing::error!(vm_id = %vm.vm_id, %err, "cannot record stop");
                }
                return;
            }
            Exit::Crashed(reason) => reason,
        };
        finish_process(&vm);
        match restart_after_crash(&inner, &vm, crash).await {
            Some(next) => attached = next,
            None => return,
        }
    }
}

/// Forget the dead process and remove what it left behind.
fn finish_process(vm: &Vm) {
    let mut rt = vm.rt.lock().unwrap();
    rt.pid = None;
    rt.qmp = None;
    drop(rt);
    vm.dir.clean_runtime_files();
}

/// Record a crash, then restart with backoff until a QEMU runs again
/// (`Some`), or give up: too many crashes (`failed`), or a stop/start from
/// the engine took over (`None`).
async fn restart_after_crash(inner: &Arc<Inner>, vm: &Arc<Vm>, mut reason: String) -> Option<Attached> {
    let mut from_state_ok = inner.set_state(vm, VmState::Crashed, &reason).is_ok();
    loop {
        if !from_state_ok {
            tracing::error!(vm_id = %vm.vm_id, "crash in an unexpected state; not restarting");
            return None;
        }
        let policy = inner.restart;
        let crashes = {
            let mut rt = vm.rt.lock().unwrap();
            let now = Instant::now();
            rt.crashes.push_back(now);
            while rt
                .crashes
                .front()
                .is_some_and(|t| now.duration_since(*t) > policy.window)
            {
                rt.crashes.pop_front();
            }
            rt.crashes.len() as u32
        };
        if crashes >= policy.max_crashes {
            let why = format!("{crashes} crashes within {:?}; last: {reason}", policy.window);
            let _ = inner.set_state(vm, VmState::Failed, &why);
            return None;
        }
        let delay = policy.backoff(crashes);
        tracing::warn!(vm_id = %vm.vm_id, crashes, ?delay, %reason, "restarting crashed VM");
        tokio::select! {
            _ = inner.cancel.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        let _op = vm.op.lock().await;
        let (state, spec) = {
            let rt = vm.rt.lock().unwrap();
            (rt.state, rt.spec.clone())
        };
        if state != VmState::Crashed {
            return None;
        }
        if inner
            .set_state(vm, VmState::Starting, &format!("restart after crash {crashes}"))
            .is_err()
        {
            return None;
        }
        let flock = match inner.lock_dir(vm).await {
            Ok(flock) => flock,
            Err(err) => {
                reason = format!("restart failed: {err}");
                from_state_ok = inner.set_state(vm, VmState::Crashed, &reason).is_ok();
                continue;
            }
        };
        let attempt = match vm.dir.live_pid(&vm.vm_id) {
            // Someone else (another service process) started it meanwhile.
            Some(pid) => inner.attach(vm, pid).await,
            None => inner.spawn_qemu(vm, &spec).await,
        };
        drop(flock);
        match attempt {
            Ok(attached) => {
                let pid = attached.pid;
                {
                    let mut rt = vm.rt.lock().unwrap();
                    rt.pid = Some(pid);
                    rt.qmp = Some(attached.qmp.clone());
                }
                let _ = inner.set_state(
                    vm,
                    VmState::Running,
                    &format!("restarted after crash (pid {pid})"),
                );
                return Some(attached);
            }
            Err(err) => {
                reason = format!("restart failed: {err}");
                from_state_ok = inner.set_state(vm, VmState::Crashed, &reason).is_ok();
            }
        }
    }
}

/// Follow one QEMU until it exits (`Some`) or the engine goes away (`None`).
async fn watch(inner: &Inner, vm: &Vm, attached: &mut Attached) -> Option<Exit> {
    let pid = attached.pid;
    let mut shutdown: Option<(bool, String)> = None;
    let mut panicked = false;
    let mut connected = true;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let mut stream_ended = false;
        tokio::select! {
            _ = inner.cancel.cancelled() => return None,
            event = attached.events.recv(), if connected => match event {
                None | Some(QmpEvent::Closed { .. }) => {
                    if let Some(QmpEvent::Closed { error: Some(error) }) = &event {
                        tracing::warn!(vm_id = %vm.vm_id, %error, "QMP stream broke");
                    }
                    stream_ended = true;
                }
                Some(QmpEvent::Shutdown { guest, reason }) => {
                    tracing::info!(vm_id = %vm.vm_id, guest, %reason, "QEMU shutting down");
                    if reason == "guest-panic" {
                        panicked = true;
                    }
                    shutdown = Some((guest, reason));
                }
                Some(QmpEvent::GuestPanicked) => {
                    tracing::warn!(vm_id = %vm.vm_id, "guest panicked");
                    panicked = true;
                }
                Some(QmpEvent::Reset { guest, reason }) => {
                    tracing::info!(vm_id = %vm.vm_id, guest, %reason, "guest reset (reboot)");
                }
                Some(other) => tracing::debug!(vm_id = %vm.vm_id, event = ?other, "QMP event"),
            },
            _ = tick.tick() => vm.dir.rotate_logs(),
        }
        if stream_ended {
            connected = false;
            vm.rt.lock().unwrap().qmp = None;
            wait_until(EXIT_GRACE, || !dir::is_our_qemu(pid, &vm.vm_id)).await;
        }
        if !dir::is_our_qemu(pid, &vm.vm_id) {
            let status = match &mut attached.exit {
                Some(rx) => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), rx.wait_for(|s| s.is_some())).await;
                    *rx.borrow()
                }
                None => None,
            };
            let stopping = vm.rt.lock().unwrap().stopping;
            let exit = if stopping {
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
                    vm.rt.lock().unwrap().qmp = Some(client.clone());
                    attached.qmp = client;
                    attached.events = events;
                    connected = true;
                }
                Err(err) => tracing::warn!(vm_id = %vm.vm_id, %err, "QMP reconnect failed; retrying"),
            }
        }
    }
}

/// A fresh QMP connection, resynchronised with `query-status` (events were
/// missed while disconnected).
async fn reconnect(vm: &Vm) -> Result<(QmpClient, tokio::sync::mpsc::UnboundedReceiver<QmpEvent>), VmmError> {
    let qmp_err = |source| VmmError::Qmp {
        vm_id: vm.vm_id.clone(),
        source,
    };
    let (client, events) = QmpClient::connect(&vm.dir.qmp_socket()).await.map_err(qmp_err)?;
    let status = client.query_status().await.map_err(qmp_err)?;
    tracing::info!(vm_id = %vm.vm_id, status = %status.status, "QMP reconnected");
    Ok((client, events))
}
