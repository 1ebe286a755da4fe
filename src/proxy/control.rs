//! Asks the running workers which config generation they serve, through the
//! loopback-only control server (a unix socket under the state dir).

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One answer is small; a worker that takes longer than this is not healthy.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The generation a worker answers with, or why there was no answer.
pub(crate) async fn generation(socket: &Path) -> Result<u64, String> {
    let probe = async {
        let mut stream = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(b"GET /__webhoster/generation HTTP/1.0\r\nHost: webhoster\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut reply = Vec::with_capacity(512);
        stream
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("read: {e}"))?;
        parse(&reply)
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")))
}

fn parse(reply: &[u8]) -> Result<u64, String> {
    let text = String::from_utf8_lossy(reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "a reply without a header end".to_string())?;
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") && !status.starts_with("HTTP/1.0 200 ") {
        return Err(format!("status {status:?}"));
    }
    body.trim()
        .parse()
        .map_err(|_| format!("body {:?} is not a generation", body.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_generation() {
        assert_eq!(parse(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n42"), Ok(42));
        assert!(parse(b"HTTP/1.1 404 Not Found\r\n\r\n42").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\n\r\nxx").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
