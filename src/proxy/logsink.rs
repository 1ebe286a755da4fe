//! Where nginx's logs land. nginx cannot cap or rotate a log file itself,
//! so it writes none: every error and access line goes as a syslog datagram
//! to `run/log.sock`, and this sink appends it to a capped file chosen by
//! its tag (`nginx` the error log, `front` the front's access log,
//! `site_<id>` a site's). The sink runs inside webhoster; while none runs,
//! nginx's send fails at once (its syslog socket is non-blocking) and the
//! line is dropped, so nothing grows on disk and no request waits.
//!
//! Never renders a config (the tags are written by `templates/nginx`).

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixDatagram;

use super::ProxyError;
use super::layout::Layout;
use crate::logfile::{LogCap, RotatingFile};

/// Open files are closed this often, so a removed site's log is not held.
const CLOSE_EVERY: Duration = Duration::from_secs(60);
/// nginx's syslog lines are at most a few KiB; longer ones are cut.
const MAX_DATAGRAM: usize = 16 * 1024;

/// Which file a line goes to, from its syslog tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LogTag {
    Error,
    Front,
    Site(i64),
}

impl LogTag {
    pub(crate) fn parse(tag: &str) -> Option<LogTag> {
        match tag {
            "nginx" => Some(LogTag::Error),
            "front" => Some(LogTag::Front),
            _ => tag
                .strip_prefix("site_")
                .and_then(|id| id.parse().ok())
                .filter(|id| *id > 0)
                .map(LogTag::Site),
        }
    }

    fn path(self, layout: &Layout) -> std::path::PathBuf {
        match self {
            LogTag::Error => layout.error_log(),
            LogTag::Front => layout.access_log(),
            LogTag::Site(id) => layout.site_access_log(id),
        }
    }
}

/// `<PRI>Mmm dd hh:mm:ss TAG: MESSAGE`, as nginx sends with `nohostname`:
/// the tag and the message.
fn parse(datagram: &[u8]) -> Option<(LogTag, &[u8])> {
    let rest = datagram.strip_prefix(b"<")?;
    let rest = &rest[rest.iter().position(|b| *b == b'>')? + 1..];
    // The timestamp is fixed-width: "Dec  1 18:20:00 ".
    let rest = rest.get(16..)?;
    let colon = rest.windows(2).position(|w| w == b": ")?;
    let tag = LogTag::parse(std::str::from_utf8(&rest[..colon]).ok()?)?;
    Some((tag, &rest[colon + 2..]))
}

/// The running sink; dropping it stops it (nginx then drops its lines).
pub(crate) struct LogSink {
    task: tokio::task::AbortHandle,
}

impl Drop for LogSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LogSink {
    /// Listen on `run/log.sock`. `None` when another live sink (a second
    /// webhoster on this state dir) holds the socket: that one writes.
    pub(crate) fn start(layout: &Layout, cap: LogCap) -> Result<Option<LogSink>, ProxyError> {
        let path = layout.log_socket();
        let Some(socket) = bind(&path).map_err(ProxyError::io("listening on", &path))? else {
            tracing::info!(path = %path.display(), "another webhoster collects nginx's logs");
            return Ok(None);
        };
        // nginx's workers run unprivileged and must be able to send.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))
            .map_err(ProxyError::io("opening up", &path))?;
        let layout = layout.clone();
        let task = tokio::spawn(async move { collect(socket, layout, cap).await });
        Ok(Some(LogSink {
            task: task.abort_handle(),
        }))
    }
}

/// Bind `path`, taking over a socket file nobody listens on any more.
fn bind(path: &Path) -> io::Result<Option<UnixDatagram>> {
    match UnixDatagram::bind(path) {
        Ok(socket) => Ok(Some(socket)),
        Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
            let probe = std::os::unix::net::UnixDatagram::unbound()?;
            if probe.connect(path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(path)?;
            UnixDatagram::bind(path).map(Some)
        }
        Err(err) => Err(err),
    }
}

async fn collect(socket: UnixDatagram, layout: Layout, cap: LogCap) {
    let mut files: HashMap<LogTag, RotatingFile> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut close = tokio::time::interval(CLOSE_EVERY);
    loop {
        tokio::select! {
            received = socket.recv(&mut buf) => {
                let n = match received {
                    Ok(n) => n,
                    Err(err) => {
                        tracing::warn!(%err, "nginx's log socket failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let Some((tag, message)) = parse(&buf[..n]) else {
                    tracing::debug!("a datagram on nginx's log socket that is not nginx's");
                    continue;
                };
                // Anyone local may send here (the socket is 0666 for nginx's
                // workers): a site's file is made only for a published site,
                // so lines cannot make files without end.
                if let LogTag::Site(id) = tag
                    && !files.contains_key(&tag)
                    && !layout.current_site_file(id).exists()
                {
                    continue;
                }
                let file = files
                    .entry(tag)
                    .or_insert_with(|| RotatingFile::new(tag.path(&layout), cap));
                let mut line = Vec::with_capacity(message.len() + 1);
                line.extend_from_slice(message);
                line.push(b'\n');
                if let Err(err) = file.append(&line) {
                    tracing::warn!(path = %file.path().display(), %err, "cannot write an nginx log");
                }
            }
            _ = close.tick() => files.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_messages_are_read_from_nginx_datagrams() {
        let (tag, msg) =
            parse(b"<190>Dec  1 18:20:00 site_42: 127.0.0.1 - - \"GET /42/ HTTP/1.1\" 200").unwrap();
        assert_eq!(tag, LogTag::Site(42));
        assert_eq!(msg, b"127.0.0.1 - - \"GET /42/ HTTP/1.1\" 200");
        assert_eq!(
            parse(b"<187>Dec 11 01:02:03 nginx: x: y").unwrap(),
            (LogTag::Error, &b"x: y"[..])
        );
        assert_eq!(parse(b"<190>Dec 11 01:02:03 front: a").unwrap().0, LogTag::Front);
        for bad in [
            &b"no header"[..],
            b"<190>short",
            b"<190>Dec 11 01:02:03 other: a",
            b"<190>Dec 11 01:02:03 site_0: a",
            b"<190>Dec 11 01:02:03 site_x: a",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
