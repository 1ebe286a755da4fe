//! QMP: the typed client the supervisor uses (on `qapi`), and a raw one-shot
//! client for operator passthrough on the second monitor socket.
//!
//! One owner per socket: a QEMU monitor serves one client at a time, so the
//! supervisor keeps `qmp.sock` and operators get `qmp-operator.sock`.
//! The event stream is read all the time by a task (qapi completes command
//! replies from that same stream). qapi's schema is QEMU 9.1's; an event it
//! cannot decode (QEMU 7.2's `RTC_CHANGE` lacks `qom-path`) ends the stream.
//! That surfaces as [`QmpEvent::Closed`] and the supervisor reconnects and
//! resynchronises with `query-status`.
//!
//! Timeouts (why these values): connecting and negotiating waits
//! [`CONNECT_TIMEOUT`], because a monitor busy with another client only
//! answers once that client leaves; every command waits [`COMMAND_TIMEOUT`]:
//! QEMU answers from its main loop within milliseconds even under TCG, so
//! five seconds means the process is wedged. The commands only *request*
//! things: how long a guest takes to power off is the caller's timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use qapi::futures::{QapiService, QmpStreamTokio};
use qapi::qmp;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, WriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {what} got no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("QMP {what} failed on the connection")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU refused {what}: {desc}")]
    Refused { what: String, desc: String },
    #[error("QMP protocol error: {0}")]
    Protocol(String),
}

/// The events the supervisor acts on; everything else is `Other` (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// QEMU is about to exit (or pause, with `-action shutdown=pause`).
    /// `guest` is true when the guest asked (poweroff, panic).
    Shutdown {
        guest: bool,
        reason: String,
    },
    /// A reboot; QEMU keeps running.
    Reset {
        guest: bool,
        reason: String,
    },
    GuestPanicked,
    Stop,
    Resume,
    Other(String),
    /// The stream ended: QEMU exited, or an event could not be decoded.
    Closed {
        error: Option<String>,
    },
}

type Service = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// A negotiated QMP connection. Dropping it closes the connection.
pub struct QmpClient {
    service: Service,
    reader: tokio::task::AbortHandle,
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Status as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpStatus {
    pub running: bool,
    /// QEMU's RunState name: `running`, `paused`, `shutdown`, ...
    pub status: String,
}

impl QmpClient {
    /// Connect, read the greeting, negotiate capabilities and start reading
    /// events into the returned channel.
    pub async fn connect(socket: &Path) -> Result<(QmpClient, mpsc::UnboundedReceiver<QmpEvent>), QmpError> {
        let negotiate = async {
            let stream = QmpStreamTokio::open_uds(socket).await?;
            stream.negotiate().await
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, negotiate)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("greeting on {}", socket.display()),
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| QmpError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let (service, events) = stream.into_parts();
        // The reader task owns the stream; dropping the service stops it.
        let _ = events.release();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut events = Box::pin(events);
            let error = loop {
                match events.next().await {
                    // Keep reading even when nobody listens for events any
                    // more: command replies arrive on this same stream.
                    Some(Ok(event)) => {
                        let _ = tx.send(map_event(event));
                    }
                    Some(Err(err)) => break Some(err.to_string()),
                    None => break None,
                }
            };
            let _ = tx.send(QmpEvent::Closed { error });
        });
        Ok((
            QmpClient {
                service,
                reader: reader.abort_handle(),
            },
            rx,
        ))
    }

    /// Run `command` and wait at most [`COMMAND_TIMEOUT`] for its reply.
    ///
    /// qapi keeps a reply slot per command (always id 0 without OOB) until
    /// the reply arrives; a command dropped in flight (its caller timed out,
    /// or the supervisor draining the console was aborted by a stop) leaves
    /// the slot behind, and qapi panics on the next command. So each command
    /// runs to its reply in a task of its own, whoever stops waiting.
    async fn execute<C>(&self, what: &str, command: C) -> Result<C::Ok, QmpError>
    where
        C: qmp::QmpCommand + Send + 'static,
        C::Ok: Send,
    {
        let reply = tokio::spawn(self.service.execute(command));
        match tokio::time::timeout(COMMAND_TIMEOUT, reply).await {
            Err(_) => Err(QmpError::Timeout {
                what: what.to_owned(),
                after: COMMAND_TIMEOUT,
            }),
            Ok(Err(join)) => Err(QmpError::Protocol(format!("QMP {what} ended abnormally: {join}"))),
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(qapi::ExecuteError::Qapi(err)))) => Err(QmpError::Refused {
                what: what.to_owned(),
                desc: err.desc,
            }),
            Ok(Ok(Err(qapi::ExecuteError::Io(source)))) => Err(QmpError::Io {
                what: what.to_owned(),
                source,
            }),
        }
    }

    pub async fn query_status(&self) -> Result<QmpStatus, QmpError> {
        let info = self.execute("query-status", qmp::query_status {}).await?;
        Ok(QmpStatus {
            running: info.running,
            status: qapi::Enum::name(&info.status).to_owned(),
        })
    }

    /// ACPI power button: the guest decides whether and how fast to power off.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", qmp::system_powerdown {})
            .await
            .map(drop)
    }

    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", qmp::system_reset {}).await.map(drop)
    }

    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", qmp::stop {}).await.map(drop)
    }

    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", qmp::cont {}).await.map(drop)
    }

    /// Up to `max` bytes from the `ringbuf` chardev `device`, oldest first;
    /// what is read leaves the ring. Asked in base64: `utf8` would mangle a
    /// console's bytes that are not text.
    pub async fn ringbuf_read(&self, device: &str, max: u32) -> Result<Vec<u8>, QmpError> {
        use base64::Engine as _;
        let command = qmp::ringbuf_read {
            device: device.to_owned(),
            size: max.into(),
            format: Some(qmp::DataFormat::base64),
        };
        let text = self.execute("ringbuf-read", command).await?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|err| QmpError::Protocol(format!("ringbuf-read answered no base64: {err}")))
    }

    /// Bytes read and written per drive since QEMU started
    /// (`query-blockstats`); see [`super::meter`].
    pub(super) async fn query_blockstats(&self) -> Result<Vec<super::meter::BlockStats>, QmpError> {
        self.execute("query-blockstats", QueryBlockstats {}).await
    }

    /// QEMU exits right after (or even before) answering, so a connection
    /// that ends here counts as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", qmp::quit {}).await {
            Ok(_) | Err(QmpError::Io { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

/// `query-blockstats` with a reply type of our own (only the byte counts):
/// qapi's generated one requires fields that differ between QEMU versions.
/// A reply that does not decode fails this command alone; the connection
/// and its event stream go on.
#[derive(serde::Serialize)]
struct QueryBlockstats {}

impl qapi::Command for QueryBlockstats {
    type Ok = Vec<super::meter::BlockStats>;
    const NAME: &'static str = "query-blockstats";
    const ALLOW_OOB: bool = false;
}

impl qmp::QmpCommand for QueryBlockstats {}

fn map_event(event: qmp::Event) -> QmpEvent {
    match event {
        qmp::Event::SHUTDOWN { data, .. } => QmpEvent::Shutdown {
            guest: data.guest,
            reason: qapi::Enum::name(&data.reason).to_owned(),
        },
        qmp::Event::RESET { data, .. } => QmpEvent::Reset {
            guest: data.guest,
            reason: qapi::Enum::name(&data.reason).to_owned(),
        },
        qmp::Event::GUEST_PANICKED { .. } => QmpEvent::GuestPanicked,
        qmp::Event::STOP { .. } => QmpEvent::Stop,
        qmp::Event::RESUME { .. } => QmpEvent::Resume,
        other => QmpEvent::Other(
            serde_json::to_value(&other)
                .ok()
                .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| "unknown".to_owned()),
        ),
    }
}

/// A raw monitor session on a socket nobody else holds (the operator
/// socket): JSON in, QEMU's reply object out, events skipped. It can pass a
/// file descriptor with a command (`add-fd`), which is how QEMU, no longer
/// root and unable to open our files by path, gets a new backup target.
pub struct Monitor {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
}

impl Monitor {
    /// Connect, read the greeting and negotiate, within [`CONNECT_TIMEOUT`].
    pub async fn connect(socket: &Path) -> Result<Monitor, QmpError> {
        let run = async {
            let stream = UnixStream::connect(socket)
                .await
                .map_err(|source| QmpError::Connect {
                    path: socket.to_owned(),
                    source,
                })?;
            let (read, write) = stream.into_split();
            let mut monitor = Monitor {
                lines: BufReader::new(read).lines(),
                write,
            };
            let greeting = monitor.next_reply().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Protocol("no QMP greeting".into()));
            }
            let caps = monitor
                .send(&serde_json::json!({"execute": "qmp_capabilities"}), None)
                .await?;
            if caps.get("error").is_some() {
                return Err(QmpError::Protocol(format!("negotiation refused: {caps}")));
            }
            Ok(monitor)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, run)
            .await
            .map_err(|_| QmpError::Timeout {
                what: format!("greeting on {}", socket.display()),
                after: CONNECT_TIMEOUT,
            })?
    }

    async fn next_reply(&mut self) -> Result<serde_json::Value, QmpError> {
        loop {
            let line = self
                .lines
                .next_line()
                .await
                .map_err(|source| QmpError::Io {
                    what: "reading".into(),
                    source,
                })?
                .ok_or_else(|| QmpError::Protocol("QEMU closed the monitor".into()))?;
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| QmpError::Protocol(format!("not JSON from QEMU: {e}")))?;
            if value.get("return").is_some() || value.get("error").is_some() || value.get("QMP").is_some() {
                return Ok(value);
            }
        }
    }

    /// Sends `command` (with `fd` as SCM_RIGHTS when given) and returns
    /// QEMU's reply object, `{"return": ...}` or `{"error": ...}`. No
    /// timeout here: the caller bounds the whole exchange.
    pub async fn send(
        &mut self,
        command: &serde_json::Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<serde_json::Value, QmpError> {
        let what = command_name(command)?;
        let mut line = serde_json::to_vec(command).expect("a JSON value serializes");
        line.push(b'\n');
        let io = |source| QmpError::Io {
            what: what.clone(),
            source,
        };
        match fd {
            None => self.write.write_all(&line).await.map_err(io)?,
            Some(fd) => {
                use std::os::fd::AsRawFd;
                let sock: &UnixStream = self.write.as_ref();
                let fds = [fd.as_raw_fd()];
                let mut sent = 0;
                // The fd goes with the first byte; the rest is plain data.
                while sent < line.len() {
                    sock.writable().await.map_err(io)?;
                    let chunk = [std::io::IoSlice::new(&line[sent..])];
                    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
                    let cmsgs: &[nix::sys::socket::ControlMessage] = if sent == 0 { &cmsg } else { &[] };
                    match sock.try_io(tokio::io::Interest::WRITABLE, || {
                        nix::sys::socket::sendmsg::<()>(
                            sock.as_raw_fd(),
                            &chunk,
                            cmsgs,
                            nix::sys::socket::MsgFlags::empty(),
                            None,
                        )
                        .map_err(std::io::Error::from)
                    }) {
                        Ok(n) => sent += n,
                        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(err) => return Err(io(err)),
                    }
                }
            }
        }
        self.next_reply().await
    }

    /// [`Monitor::send`] within [`COMMAND_TIMEOUT`], `return`'s value or
    /// [`QmpError::Refused`].
    pub async fn execute(
        &mut self,
        command: serde_json::Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<serde_json::Value, QmpError> {
        let what = command["execute"].as_str().unwrap_or("?").to_owned();
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, self.send(&command, fd))
            .await
            .map_err(|_| QmpError::Timeout {
                what: what.clone(),
                after: COMMAND_TIMEOUT,
            })??;
        match reply.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(QmpError::Refused {
                what,
                desc: reply["error"]["desc"]
                    .as_str()
                    .unwrap_or("no description")
                    .to_owned(),
            }),
        }
    }
}

/// One command as raw JSON on a monitor socket (the operator passthrough):
/// connect, negotiate, send `command`, return QEMU's reply object
/// (`{"return": ...}` or `{"error": ...}`), skipping events.
pub async fn raw_command(
    socket: &Path,
    command: &serde_json::Value,
    timeout: Duration,
) -> Result<serde_json::Value, QmpError> {
    let what = command_name(command)?;
    let run = async {
        let mut monitor = Monitor::connect(socket).await?;
        monitor.send(command, None).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| QmpError::Timeout { what, after: timeout })?
}

/// The `execute` member of a raw QMP command, for errors and logs.
fn command_name(command: &serde_json::Value) -> Result<String, QmpError> {
    command
        .get("execute")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| QmpError::Protocol("the command needs an \"execute\" member".into()))
}
