//! qga: a typed client for the QEMU guest agent (`qemu-ga` in the guest),
//! spoken over the VM's virtio-serial port `org.qemu.guest_agent.0`, whose
//! host end is the unix socket `<vm_dir>/qga.sock` (see `cmdline::GuestAgentPort`).
//! The protocol is QMP-like JSON, one object per line, without a greeting.
//!
//! **The guest is hostile.** Every tenant is root in its VM and can replace
//! the agent with anything. So every read is bounded ([`MAX_REPLY_BYTES`] per
//! reply; skipped stale bytes are discarded as they arrive, never kept), every
//! call has a deadline, guest text shown in errors is truncated and escaped,
//! and nothing the guest sends is ever used as anything but data.
//!
//! **One client at a time.** QEMU's socket chardev serves one connection and
//! leaves the next one unanswered in the listen queue, where it would look
//! like a dead agent. [`QgaClient::connect`] first takes an flock on
//! `<vm_dir>/qga.lock` (serializing threads and processes alike) and holds it
//! until the client is dropped: keep a client only for the calls at hand.
//!
//! **Resync.** The channel may hold stale data: the late reply to a call
//! whose client gave up, or replies to requests queued before the agent
//! started. So every connection starts, as the QGA protocol asks, with a
//! `0xFF` byte (which resets the agent's JSON parser) and a
//! `guest-sync-delimited` carrying a random id; the agent puts `0xFF` before
//! that reply. Everything up to the reply with our id is skipped. After a
//! timeout or a malformed reply the client is out of step, and its next call
//! resyncs first.
//!
//! Timeouts, and why these values: taking the lock waits up to
//! [`LOCK_TIMEOUT`], longer than any one client's calls (an [`EXEC_TIMEOUT`]
//! or a [`FREEZE_TIMEOUT`]); connecting waits [`CONNECT_TIMEOUT`] (QEMU
//! accepts from its main loop at once); the resync waits [`SYNC_TIMEOUT`],
//! past which no agent is listening (early boot, or a guest without one);
//! a plain command waits [`COMMAND_TIMEOUT`] (the agent answers from its main
//! loop; seconds only under TCG on a loaded host).
//!
//! Never: starts or stops QEMU, or trusts the guest's output. The lock
//! outlives a client only with its connection, kept for the next client of
//! this process (`qga_keep`): a client in another process waits while
//! `serve` keeps it, up to [`LOCK_TIMEOUT`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Waiting for another client of the same agent to finish.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(90);
/// Between two tries of the (non-blocking) flock.
const LOCK_POLL: Duration = Duration::from_millis(20);
/// Connecting to QEMU's end of the channel.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `guest-sync-delimited`: without an answer by then, no agent listens.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// One ordinary command (ping, exec start and status, fsfreeze status and
/// thaw, set-time, which also runs `hwclock -w` in the guest).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// `guest-fsfreeze-freeze` first syncs every filesystem: dirty pages go out
/// to the virtual disk, which takes a while under TCG.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// [`QgaClient::exec`]: from the start of the process to its exit. A process
/// still running then keeps running in the guest (QEMU 7.2's agent cannot
/// kill it).
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// `guest-exec-status` is polled first after this, then at doubling
/// intervals up to [`EXEC_POLL_MAX`].
const EXEC_POLL_FIRST: Duration = Duration::from_millis(50);
const EXEC_POLL_MAX: Duration = Duration::from_millis(500);
/// The polling cap of [`QgaClient::exec_with_input`]: a step someone waits
/// on (a clone's personalisation inside a create) sees its exit within
/// this, for a few more cheap status calls.
const EXEC_POLL_MAX_WAITED: Duration = Duration::from_millis(100);
/// The longest reply line accepted (so an exec's stdout plus stderr is at
/// most about 3/4 of this after base64). A longer one ends the call.
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// The most stdin bytes `exec_with_input` sends: a clone's entropy is 64.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;
/// Guest-supplied text in an error message is cut to this many characters.
const MAX_GUEST_TEXT: usize = 200;
/// Marks the reply to `guest-sync-delimited`; never part of UTF-8 JSON.
const SENTINEL: u8 = 0xFF;

#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    #[error("cannot take the guest agent lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another client held the guest agent lock {path} for {after:?}")]
    Busy { path: PathBuf, after: Duration },
    #[error("cannot connect to the guest agent socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no guest agent answered guest-sync-delimited within {after:?}")]
    NoAgent { after: Duration },
    #[error("guest agent: {what} got no answer within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("guest agent: {what} failed on the connection")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent: the connection closed during {what}")]
    Closed { what: String },
    #[error("guest agent: the reply to {what} is longer than {max} bytes")]
    TooLarge { what: String, max: usize },
    #[error("guest agent refused {what}: {class}: {desc}")]
    Refused {
        what: String,
        class: String,
        desc: String,
    },
    #[error("guest agent: malformed reply to {what}: {detail}")]
    Protocol { what: String, detail: String },
    #[error("guest command {path} did not exit within {after:?} (it may still run in the guest)")]
    ExecTimeout { path: String, after: Duration },
    #[error("guest agent: {0:?} cannot be sent as nanoseconds since 1970")]
    InvalidTime(SystemTime),
}

impl QgaError {
    /// Nobody listens on the channel: the guest has not started its agent
    /// (early boot), has none, or QEMU was started without the agent port.
    pub fn is_no_agent(&self) -> bool {
        match self {
            QgaError::NoAgent { .. } => true,
            QgaError::Connect { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ),
            _ => false,
        }
    }
}

/// What a guest process left when it exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// None when a signal ended it.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsFreezeStatus {
    Thawed,
    Frozen,
}

/// A connected, synchronized guest agent client. Holds the agent lock until
/// dropped; a connection that did not break then goes back to
/// [`keep`](super::qga_keep) when the VM's supervisor keeps one.
pub struct QgaClient {
    socket: PathBuf,
    lock_path: PathBuf,
    /// Taken only by `drop`.
    link: Option<Link>,
    /// False while a request is unanswered or after a bad reply: the next
    /// call resyncs first.
    synced: bool,
    /// The connection failed (closed, or an I/O error): not kept after.
    broken: bool,
}

/// One connection to an agent, with its lock.
pub(super) struct Link {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    _lock: Flock<File>,
}

impl Link {
    /// The agent lock `lock` (waited for up to [`LOCK_TIMEOUT`]) and a
    /// connection to `socket`.
    async fn open(socket: &Path, lock: &Path) -> Result<Link, QgaError> {
        let lock = take_lock(lock).await?;
        Self::connect(socket, lock).await
    }

    /// A connection to `socket` for the holder of its agent lock.
    pub(super) async fn connect(socket: &Path, lock: Flock<File>) -> Result<Link, QgaError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| QgaError::Timeout {
                what: format!("connecting to {}", socket.display()),
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| QgaError::Connect {
                path: socket.to_owned(),
                source,
            })?;
        let (read, writer) = stream.into_split();
        Ok(Link {
            reader: BufReader::new(read),
            writer,
            _lock: lock,
        })
    }
}

impl Drop for QgaClient {
    fn drop(&mut self) {
        if let Some(link) = self.link.take()
            && !self.broken
        {
            super::qga_keep::give_back(&self.lock_path, link);
        }
    }
}

impl std::fmt::Debug for QgaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QgaClient")
            .field("socket", &self.socket)
            .field("synced", &self.synced)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ExecStarted {
    pid: i64,
}

#[derive(Deserialize)]
struct ExecStatus {
    exited: bool,
    exitcode: Option<i32>,
    signal: Option<i32>,
    #[serde(rename = "out-data")]
    out_data: Option<String>,
    #[serde(rename = "err-data")]
    err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    out_truncated: bool,
    #[serde(rename = "err-truncated", default)]
    err_truncated: bool,
}

impl QgaClient {
    /// Take the agent lock `lock`, connect to `socket` and resynchronize:
    /// on the connection the VM's supervisor keeps when there is one.
    pub async fn connect(socket: &Path, lock: &Path) -> Result<QgaClient, QgaError> {
        if let Some(kept) = super::qga_keep::take(lock) {
            let mut client = Self::new(socket, lock, kept);
            match client.sync().await {
                Ok(()) => return Ok(client),
                // It broke since it was kept (its QEMU went): a new one. Not
                // after a silence: that is the agent's, whatever connection.
                Err(err) if client.broken => {
                    tracing::debug!(%err, socket = %socket.display(), "a kept guest agent connection broke");
                }
                Err(err) => return Err(err),
            }
        }
        let mut client = Self::new(socket, lock, Link::open(socket, lock).await?);
        client.sync().await?;
        Ok(client)
    }

    /// [`connect`](Self::connect) without the resynchronisation, which the
    /// first command (or [`sync`](Self::sync)) does: for a paused guest
    /// about to resume, on the connection it had before its pause (one
    /// made after the resume waits out the agent's 0.1 s sleep, see
    /// `qga_keep`).
    pub async fn open(socket: &Path, lock: &Path) -> Result<QgaClient, QgaError> {
        let link = match super::qga_keep::take(lock) {
            Some(kept) => kept,
            None => Link::open(socket, lock).await?,
        };
        Ok(Self::new(socket, lock, link))
    }

    fn new(socket: &Path, lock: &Path, link: Link) -> QgaClient {
        QgaClient {
            socket: socket.to_owned(),
            lock_path: lock.to_owned(),
            link: Some(link),
            synced: false,
            broken: false,
        }
    }

    fn link(&mut self) -> &mut Link {
        self.link.as_mut().expect("the link goes only with the client")
    }

    /// Marks the client broken when `result` says its connection is.
    fn note<T>(&mut self, result: Result<T, QgaError>) -> Result<T, QgaError> {
        if matches!(result, Err(QgaError::Io { .. } | QgaError::Closed { .. })) {
            self.broken = true;
        }
        result
    }

    /// `guest-ping`: the agent answers.
    pub async fn ping(&mut self) -> Result<(), QgaError> {
        self.call::<Value>("guest-ping", None, COMMAND_TIMEOUT)
            .await
            .map(drop)
    }

    /// Run `path` with `args` in the guest (no shell), wait up to
    /// [`EXEC_TIMEOUT`] for it to exit, and return its exit status and
    /// output.
    pub async fn exec(&mut self, path: &str, args: &[&str]) -> Result<ExecOutput, QgaError> {
        self.exec_with_timeout(path, args, EXEC_TIMEOUT).await
    }

    /// [`exec`](Self::exec) with another limit than [`EXEC_TIMEOUT`].
    pub async fn exec_with_timeout(
        &mut self,
        path: &str,
        args: &[&str],
        limit: Duration,
    ) -> Result<ExecOutput, QgaError> {
        self.exec_polled(path, args, None, limit, EXEC_POLL_MAX).await
    }

    /// [`exec_with_timeout`](Self::exec_with_timeout) with `input` on the
    /// process's stdin (`input-data`, at most [`MAX_INPUT_BYTES`]: the
    /// request is one line the agent reads whole).
    /// Its exit is polled for at least every [`EXEC_POLL_MAX_WAITED`].
    pub async fn exec_with_input(
        &mut self,
        path: &str,
        args: &[&str],
        input: Option<&[u8]>,
        limit: Duration,
    ) -> Result<ExecOutput, QgaError> {
        self.exec_polled(path, args, input, limit, EXEC_POLL_MAX_WAITED)
            .await
    }

    async fn exec_polled(
        &mut self,
        path: &str,
        args: &[&str],
        input: Option<&[u8]>,
        limit: Duration,
        poll_max: Duration,
    ) -> Result<ExecOutput, QgaError> {
        use base64::Engine as _;
        let deadline = Instant::now() + limit;
        let mut request = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(input) = input {
            if input.len() > MAX_INPUT_BYTES {
                return Err(QgaError::TooLarge {
                    what: "guest-exec input-data".into(),
                    max: MAX_INPUT_BYTES,
                });
            }
            request["input-data"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
        }
        let started: ExecStarted = self
            .call("guest-exec", Some(request), COMMAND_TIMEOUT.min(limit))
            .await?;
        let mut pause = EXEC_POLL_FIRST;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(QgaError::ExecTimeout {
                    path: untrusted(path),
                    after: limit,
                });
            }
            let status: ExecStatus = self
                .call(
                    "guest-exec-status",
                    Some(json!({"pid": started.pid})),
                    COMMAND_TIMEOUT.min(remaining),
                )
                .await?;
            if status.exited {
                if status.out_truncated || status.err_truncated {
                    return Err(QgaError::TooLarge {
                        what: "guest-exec-status".into(),
                        max: MAX_REPLY_BYTES,
                    });
                }
                return Ok(ExecOutput {
                    exit_code: status.exitcode,
                    signal: status.signal,
                    stdout: decode("out-data", status.out_data)?,
                    stderr: decode("err-data", status.err_data)?,
                });
            }
            tokio::time::sleep(pause.min(remaining)).await;
            pause = (pause * 2).min(poll_max);
        }
    }

    /// `guest-fsfreeze-freeze`: sync and freeze every guest filesystem.
    /// Returns how many were frozen. Thaw soon: a frozen guest blocks on
    /// every write.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u32, QgaError> {
        self.call("guest-fsfreeze-freeze", None, FREEZE_TIMEOUT).await
    }

    /// `guest-fsfreeze-thaw`: returns how many filesystems were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u32, QgaError> {
        self.call("guest-fsfreeze-thaw", None, COMMAND_TIMEOUT).await
    }

    pub async fn fsfreeze_status(&mut self) -> Result<FsFreezeStatus, QgaError> {
        self.call("guest-fsfreeze-status", None, COMMAND_TIMEOUT).await
    }

    /// `guest-set-time`: set the guest's clock to `time` (and its RTC, with
    /// `hwclock -w`, which the image ships).
    pub async fn set_time(&mut self, time: SystemTime) -> Result<(), QgaError> {
        let nanos = time
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_nanos()).ok())
            .ok_or(QgaError::InvalidTime(time))?;
        self.call::<Value>("guest-set-time", Some(json!({"time": nanos})), COMMAND_TIMEOUT)
            .await
            .map(drop)
    }

    /// Power the guest off: `systemctl poweroff --no-block`, started and not
    /// waited for. Not `guest-shutdown`: the agent runs `shutdown +0` for it,
    /// which systemd hands to logind, and a guest is ready seconds before
    /// logind runs; as root, systemctl asks PID 1 itself when logind is not
    /// there.
    pub async fn power_off(&mut self) -> Result<(), QgaError> {
        let request = json!({"path": "/bin/systemctl", "arg": ["poweroff", "--no-block"]});
        self.call::<ExecStarted>("guest-exec", Some(request), COMMAND_TIMEOUT)
            .await
            .map(drop)
    }

    /// Whether the guest can open `path` for reading: `guest-file-open`,
    /// then `guest-file-close`. qemu-ga opens it itself, so no process
    /// starts in the guest. Any refusal (no such file, or a guest whose
    /// agent blocks file commands) is `false`.
    pub async fn file_opens(&mut self, path: &str) -> Result<bool, QgaError> {
        let open = self
            .call::<i64>(
                "guest-file-open",
                Some(json!({"path": path, "mode": "r"})),
                COMMAND_TIMEOUT,
            )
            .await;
        match open {
            Ok(handle) => {
                self.call::<Value>(
                    "guest-file-close",
                    Some(json!({"handle": handle})),
                    COMMAND_TIMEOUT,
                )
                .await?;
                Ok(true)
            }
            Err(QgaError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `guest-get-time`: the guest's clock, in nanoseconds since 1970.
    /// Answered by qemu-ga itself (no process started), so it is read within
    /// the round trip of this call.
    pub async fn get_time_ns(&mut self) -> Result<i64, QgaError> {
        self.call("guest-get-time", None, COMMAND_TIMEOUT).await
    }

    /// One request, one reply line, within `limit`.
    async fn call<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        limit: Duration,
    ) -> Result<T, QgaError> {
        if !self.synced {
            self.sync().await?;
        }
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&request).expect("a JSON value serializes");
        line.push(b'\n');
        // Out of step until the whole reply is in.
        self.synced = false;
        let link = self.link();
        let (reader, writer) = (&mut link.reader, &mut link.writer);
        let reply = tokio::time::timeout(limit, async {
            writer.write_all(&line).await.map_err(io_err(command))?;
            read_line(reader, command).await
        })
        .await
        .map_err(|_| QgaError::Timeout {
            what: command.to_owned(),
            after: limit,
        })?;
        let reply = self.note(reply)?;
        let parsed = parse_reply(command, &reply);
        // A reply that was not even a QGA reply may be someone else's.
        self.synced = !matches!(parsed, Err(QgaError::Protocol { .. }));
        parsed
    }

    /// Send `0xFF` and `guest-sync-delimited` with a fresh random id, then
    /// skip everything up to the `0xFF`-marked reply carrying that id.
    pub async fn sync(&mut self) -> Result<(), QgaError> {
        const WHAT: &str = "guest-sync-delimited";
        let id = u64::from(rand::random::<u32>());
        let mut request = vec![SENTINEL];
        request.extend(
            serde_json::to_vec(&json!({"execute": WHAT, "arguments": {"id": id}}))
                .expect("a JSON value serializes"),
        );
        request.push(b'\n');
        let socket = self.socket.clone();
        let link = self.link();
        let (reader, writer) = (&mut link.reader, &mut link.writer);
        let synced = tokio::time::timeout(SYNC_TIMEOUT, async {
            writer.write_all(&request).await.map_err(io_err(WHAT))?;
            loop {
                skip_past_sentinel(reader, WHAT).await?;
                let line = read_line(reader, WHAT).await?;
                // A sentinel inside the line starts a newer reply.
                let start = line.iter().rposition(|b| *b == SENTINEL).map_or(0, |i| i + 1);
                let reply: Option<Value> = serde_json::from_slice(&line[start..]).ok();
                if reply
                    .as_ref()
                    .and_then(|r| r.get("return"))
                    .and_then(Value::as_u64)
                    == Some(id)
                {
                    return Ok(());
                }
                tracing::debug!(socket = %socket.display(), "skipped a stale guest agent reply");
            }
        })
        .await
        .map_err(|_| QgaError::NoAgent { after: SYNC_TIMEOUT })?;
        self.note(synced)?;
        self.synced = true;
        Ok(())
    }
}

/// The agent lock if nobody holds it now (None), or why it cannot be had.
pub(super) fn try_lock(path: &Path) -> Result<Option<Flock<File>>, QgaError> {
    let lock_err = |source| QgaError::Lock {
        path: path.to_owned(),
        source,
    };
    let file = super::dir::open_private(
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true),
        path,
    )
    .map_err(lock_err)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK | Errno::EINTR)) => Ok(None),
        Err((_, errno)) => Err(lock_err(errno.into())),
    }
}

/// The agent lock, tried without blocking until [`LOCK_TIMEOUT`] (a blocking
/// flock could not be given up on).
async fn take_lock(path: &Path) -> Result<Flock<File>, QgaError> {
    let deadline = Instant::now() + LOCK_TIMEOUT;
    loop {
        if let Some(lock) = try_lock(path)? {
            return Ok(lock);
        }
        if Instant::now() >= deadline {
            return Err(QgaError::Busy {
                path: path.to_owned(),
                after: LOCK_TIMEOUT,
            });
        }
        tokio::time::sleep(LOCK_POLL).await;
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> QgaError {
    let what = what.to_owned();
    move |source| QgaError::Io { what, source }
}

/// Discard bytes up to and including the next [`SENTINEL`].
async fn skip_past_sentinel(reader: &mut BufReader<OwnedReadHalf>, what: &str) -> Result<(), QgaError> {
    loop {
        let buf = reader.fill_buf().await.map_err(io_err(what))?;
        if buf.is_empty() {
            return Err(QgaError::Closed { what: what.into() });
        }
        match buf.iter().position(|b| *b == SENTINEL) {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// One line, newline included, of at most [`MAX_REPLY_BYTES`].
async fn read_line(reader: &mut BufReader<OwnedReadHalf>, what: &str) -> Result<Vec<u8>, QgaError> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await.map_err(io_err(what))?;
        if buf.is_empty() {
            return Err(QgaError::Closed { what: what.into() });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REPLY_BYTES {
            return Err(QgaError::TooLarge {
                what: what.into(),
                max: MAX_REPLY_BYTES,
            });
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            return Ok(line);
        }
    }
}

fn parse_reply<T: DeserializeOwned>(what: &str, line: &[u8]) -> Result<T, QgaError> {
    let protocol = |detail: String| QgaError::Protocol {
        what: what.to_owned(),
        detail: untrusted(&detail),
    };
    let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(line) else {
        return Err(protocol("not a JSON object".into()));
    };
    if let Some(value) = reply.remove("return") {
        return serde_json::from_value(value).map_err(|err| protocol(err.to_string()));
    }
    if let Some(error) = reply.remove("error") {
        let text = |key: &str| untrusted(error.get(key).and_then(Value::as_str).unwrap_or("?"));
        return Err(QgaError::Refused {
            what: what.to_owned(),
            class: text("class"),
            desc: text("desc"),
        });
    }
    Err(protocol("neither \"return\" nor \"error\"".into()))
}

fn decode(field: &str, data: Option<String>) -> Result<Vec<u8>, QgaError> {
    let Some(data) = data else {
        return Ok(Vec::new());
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map_err(|err| QgaError::Protocol {
            what: "guest-exec-status".into(),
            detail: format!("{field} is not base64: {err}"),
        })
}

/// Guest text made safe to log: cut to [`MAX_GUEST_TEXT`] characters, control
/// characters escaped.
fn untrusted(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_GUEST_TEXT)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_GUEST_TEXT).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    use super::*;

    type Replies = Arc<dyn Fn(&Value) -> Vec<u8> + Send + Sync>;

    /// A fake agent on a unix socket, for the client's protocol handling
    /// only (the real agent is tested in `tests/guest_lifecycle.rs`). Each
    /// connection first gets `preamble` (stale data), sync requests are
    /// answered as qemu-ga does, every other request gets `reply(request)`.
    /// Requests are recorded.
    struct FakeAgent {
        dir: tempfile::TempDir,
        requests: Arc<Mutex<Vec<Value>>>,
        syncs: Arc<Mutex<usize>>,
    }

    impl FakeAgent {
        fn start(
            preamble: &'static [u8],
            reply: impl Fn(&Value) -> Vec<u8> + Send + Sync + 'static,
        ) -> FakeAgent {
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join("qga.sock")).unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let reply: Replies = Arc::new(reply);
            let syncs = Arc::new(Mutex::new(0));
            let (recorded, synced) = (requests.clone(), syncs.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (reply, recorded, synced) = (reply.clone(), recorded.clone(), synced.clone());
                    tokio::spawn(async move {
                        let (mut read, mut write) = stream.into_split();
                        write.write_all(preamble).await.unwrap();
                        let mut pending = Vec::new();
                        let mut buf = [0u8; 4096];
                        loop {
                            let n = match read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            pending.extend_from_slice(&buf[..n]);
                            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                                let line: Vec<u8> =
                                    pending.drain(..=end).filter(|b| *b != SENTINEL).collect();
                                let request: Value = serde_json::from_slice(&line).unwrap();
                                let out = if request["execute"] == "guest-sync-delimited" {
                                    *synced.lock().unwrap() += 1;
                                    let mut out = vec![SENTINEL];
                                    out.extend(
                                        format!("{{\"return\": {}}}\n", request["arguments"]["id"]).bytes(),
                                    );
                                    out
                                } else {
                                    recorded.lock().unwrap().push(request.clone());
                                    reply(&request)
                                };
                                if write.write_all(&out).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
            });
            FakeAgent { dir, requests, syncs }
        }

        fn syncs(&self) -> usize {
            *self.syncs.lock().unwrap()
        }

        async fn connect(&self) -> Result<QgaClient, QgaError> {
            QgaClient::connect(
                &self.dir.path().join("qga.sock"),
                &self.dir.path().join("qga.lock"),
            )
            .await
        }

        fn commands(&self) -> Vec<String> {
            let requests = self.requests.lock().unwrap();
            requests
                .iter()
                .map(|r| r["execute"].as_str().unwrap().to_owned())
                .collect()
        }
    }

    fn line(value: Value) -> Vec<u8> {
        let mut out = serde_json::to_vec(&value).unwrap();
        out.push(b'\n');
        out
    }

    #[tokio::test]
    async fn resync_skips_stale_replies_and_stale_sync_answers() {
        // A late exec reply, a half line, and the answer to someone else's sync.
        let stale = b"{\"return\": {\"pid\": 7}}\n{\"retu\xff{\"return\": 12}\n";
        let agent = FakeAgent::start(stale, |_| line(json!({"return": {}})));
        let mut client = agent.connect().await.unwrap();
        client.ping().await.unwrap();
        assert_eq!(agent.commands(), ["guest-ping"]);
    }

    #[tokio::test]
    async fn exec_polls_until_exit_and_decodes_the_output() {
        let polls = Arc::new(Mutex::new(0));
        let agent = FakeAgent::start(b"", move |request| match request["execute"].as_str().unwrap() {
            "guest-exec" => line(json!({"return": {"pid": 42}})),
            "guest-exec-status" => {
                let mut n = polls.lock().unwrap();
                *n += 1;
                if *n < 3 {
                    line(json!({"return": {"exited": false}}))
                } else {
                    line(json!({"return": {
                        "exited": true, "exitcode": 3,
                        "out-data": "cnVubmluZwo=", "err-data": "b29wcw=="
                    }}))
                }
            }
            other => panic!("unexpected {other}"),
        });
        let mut client = agent.connect().await.unwrap();
        let out = client
            .exec("/bin/systemctl", &["is-system-running"])
            .await
            .unwrap();
        assert_eq!(
            out,
            ExecOutput {
                exit_code: Some(3),
                signal: None,
                stdout: b"running\n".to_vec(),
                stderr: b"oops".to_vec(),
            }
        );
        assert!(!out.success());
        let requests = agent.requests.lock().unwrap().clone();
        assert_eq!(
            requests[0]["arguments"],
            json!({"path": "/bin/systemctl", "arg": ["is-system-running"], "capture-output": true})
        );
        assert_eq!(requests.len(), 4, "{requests:?}");
        assert!(requests[1..].iter().all(|r| r["arguments"]["pid"] == 42));
    }

    #[tokio::test]
    async fn exec_with_input_sends_stdin_in_base64_and_refuses_too_much() {
        let agent = FakeAgent::start(b"", |request| match request["execute"].as_str().unwrap() {
            "guest-exec" => line(json!({"return": {"pid": 7}})),
            _ => line(json!({"return": {"exited": true, "exitcode": 0}})),
        });
        let mut client = agent.connect().await.unwrap();
        let out = client
            .exec_with_input("/bin/agent", &["--clone"], Some(&[0, 1, 2, 255]), EXEC_TIMEOUT)
            .await
            .unwrap();
        assert!(out.success());
        let requests = agent.requests.lock().unwrap().clone();
        assert_eq!(requests[0]["arguments"]["input-data"], "AAEC/w==");
        let big = vec![0u8; MAX_INPUT_BYTES + 1];
        let err = client
            .exec_with_input("/bin/agent", &[], Some(&big), EXEC_TIMEOUT)
            .await
            .unwrap_err();
        assert!(matches!(err, QgaError::TooLarge { .. }), "{err}");
    }

    #[tokio::test]
    async fn get_time_reads_nanoseconds() {
        let agent = FakeAgent::start(b"", |_| line(json!({"return": 1_700_000_000_123_456_789i64})));
        let mut client = agent.connect().await.unwrap();
        assert_eq!(client.get_time_ns().await.unwrap(), 1_700_000_000_123_456_789);
    }

    #[tokio::test]
    async fn a_file_opens_and_is_closed_or_is_refused() {
        let agent = FakeAgent::start(b"", |request| match request["execute"].as_str().unwrap() {
            "guest-file-open" if request["arguments"]["path"] == "/run/there" => {
                line(json!({"return": 1000}))
            }
            "guest-file-open" => line(json!({"error": {"class": "GenericError",
                "desc": "failed to open file '/run/not-there' (mode: 'r'): No such file or directory"}})),
            "guest-file-close" if request["arguments"]["handle"] == 1000 => line(json!({"return": {}})),
            other => panic!("{other}"),
        });
        let mut client = agent.connect().await.unwrap();
        assert!(client.file_opens("/run/there").await.unwrap());
        assert!(!client.file_opens("/run/not-there").await.unwrap());
        assert_eq!(
            agent.commands(),
            ["guest-file-open", "guest-file-close", "guest-file-open"]
        );
    }

    #[tokio::test]
    async fn a_refusal_carries_class_and_a_cut_escaped_description() {
        let agent = FakeAgent::start(b"", |_| {
            let desc = format!("no\nway{}", "x".repeat(10_000));
            line(json!({"error": {"class": "GenericError", "desc": desc}}))
        });
        let mut client = agent.connect().await.unwrap();
        match client.fsfreeze_freeze().await.unwrap_err() {
            QgaError::Refused { what, class, desc } => {
                assert_eq!(what, "guest-fsfreeze-freeze");
                assert_eq!(class, "GenericError");
                assert!(desc.starts_with("no\\nway"), "{desc}");
                assert!(desc.len() < 2 * MAX_GUEST_TEXT, "{}", desc.len());
            }
            other => panic!("{other:?}"),
        }
        // Still in step: the next call needs no resync.
        let err = client.fsfreeze_freeze().await.unwrap_err();
        assert!(matches!(err, QgaError::Refused { .. }), "{err:?}");
        assert_eq!(agent.syncs(), 1);
    }

    #[tokio::test]
    async fn an_oversized_reply_ends_the_call_and_the_next_call_resyncs() {
        let calls = Arc::new(Mutex::new(0));
        let agent = FakeAgent::start(b"", move |_| {
            let mut n = calls.lock().unwrap();
            *n += 1;
            if *n == 1 {
                line(json!({"return": "x".repeat(2 * MAX_REPLY_BYTES)}))
            } else {
                line(json!({"return": "frozen"}))
            }
        });
        let mut client = agent.connect().await.unwrap();
        let err = client.fsfreeze_status().await.unwrap_err();
        assert!(matches!(err, QgaError::TooLarge { .. }), "{err:?}");
        assert_eq!(client.fsfreeze_status().await.unwrap(), FsFreezeStatus::Frozen);
        assert_eq!(agent.syncs(), 2, "the call after the oversized reply resynced");
    }

    #[tokio::test]
    async fn a_malformed_reply_is_a_protocol_error() {
        let agent = FakeAgent::start(b"", |_| b"{\"return\": \"sort of\"}\n".to_vec());
        let mut client = agent.connect().await.unwrap();
        let err = client.fsfreeze_status().await.unwrap_err();
        assert!(matches!(err, QgaError::Protocol { .. }), "{err:?}");
        let _ = client.fsfreeze_status().await;
        assert_eq!(agent.syncs(), 2, "a malformed reply puts the client out of step");
    }

    #[tokio::test]
    async fn set_time_sends_nanoseconds() {
        let agent = FakeAgent::start(b"", |_| line(json!({"return": {}})));
        let mut client = agent.connect().await.unwrap();
        let when = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        client.set_time(when).await.unwrap();
        let requests = agent.requests.lock().unwrap().clone();
        assert_eq!(requests[0]["arguments"]["time"], 1_700_000_000_000_000_005i64);
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert!(matches!(
            client.set_time(before).await.unwrap_err(),
            QgaError::InvalidTime(_)
        ));
    }

    #[tokio::test]
    async fn one_client_at_a_time() {
        let agent = Arc::new(FakeAgent::start(b"", |_| line(json!({"return": {}}))));
        let first = agent.connect().await.unwrap();
        let second = tokio::spawn({
            let agent = agent.clone();
            async move { agent.connect().await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !second.is_finished(),
            "the second client got in while the first held the lock"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn no_socket_and_a_silent_socket_mean_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let err = QgaClient::connect(&dir.path().join("qga.sock"), &dir.path().join("qga.lock"))
            .await
            .unwrap_err();
        assert!(err.is_no_agent(), "{err:?}");

        // QEMU's end accepts, but nothing reads in the guest.
        let listener = UnixListener::bind(dir.path().join("silent.sock")).unwrap();
        let _held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                conns.push(stream);
            }
        });
        let started = Instant::now();
        let err = QgaClient::connect(&dir.path().join("silent.sock"), &dir.path().join("qga.lock"))
            .await
            .unwrap_err();
        assert!(err.is_no_agent(), "{err:?}");
        assert!(started.elapsed() >= SYNC_TIMEOUT);
    }

    #[test]
    fn guest_text_is_cut_and_escaped() {
        assert_eq!(untrusted("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        let long = untrusted(&"y".repeat(1000));
        assert_eq!(long.len(), MAX_GUEST_TEXT + 3);
    }
}
