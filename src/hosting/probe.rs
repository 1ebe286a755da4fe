//! The real [`GuestProbe`]: plain TCP from the host. HTTP is a `GET /` that
//! must answer with a status line; SSH must send its `SSH-2.0-` banner.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ports::{GuestProbe, PortError};

/// Each single probe is bounded; the orchestrator repeats them until its deadline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub struct TcpProbe {
    /// Where webhoster's nginx listens (an unspecified address means loopback).
    pub http_addr: SocketAddr,
    /// Where SSH forwards listen (unspecified means loopback).
    pub ssh_bind: Ipv4Addr,
}

/// Where a listener on `addr` is reached from this host (an unspecified
/// address means loopback).
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}

/// `GET path` on `addr`; Ok when the answer is HTTP 2xx (or any status when
/// `any_status`).
pub async fn http_ok(addr: SocketAddr, host: &str, path: &str) -> Result<(), PortError> {
    let job = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: webhoster-probe\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let head = tokio::time::timeout(PROBE_TIMEOUT, job)
        .await
        .map_err(|_| PortError::Probe(format!("HTTP probe of {addr} timed out")))??;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if head.starts_with("HTTP/") && status.starts_with('2') {
        Ok(())
    } else {
        Err(PortError::Probe(format!(
            "HTTP probe of {addr}{path} answered {:?}",
            head.lines().next().unwrap_or("")
        )))
    }
}

pub async fn ssh_banner(addr: SocketAddr) -> Result<(), PortError> {
    let job = async {
        let mut s = TcpStream::connect(addr).await?;
        let mut buf = vec![0u8; 32];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(buf[..n].to_vec())
    };
    let banner = tokio::time::timeout(PROBE_TIMEOUT, job)
        .await
        .map_err(|_| PortError::Probe(format!("SSH probe of {addr} timed out")))??;
    if banner.starts_with(b"SSH-2.0-") {
        Ok(())
    } else {
        Err(PortError::Probe(format!("SSH probe of {addr}: no SSH banner")))
    }
}

#[async_trait]
impl GuestProbe for TcpProbe {
    async fn guest_ready(&self, guest_ip: Ipv4Addr) -> Result<(), PortError> {
        let host = guest_ip.to_string();
        tokio::try_join!(
            http_ok(SocketAddr::new(guest_ip.into(), 80), &host, "/"),
            ssh_banner(SocketAddr::new(guest_ip.into(), 22)),
        )
        .map(drop)
    }

    async fn published_ready(&self, user_id: i64, ssh_port: u16) -> Result<(), PortError> {
        let http = reachable(self.http_addr);
        let (host, path) = (http.ip().to_string(), format!("/{user_id}/"));
        tokio::try_join!(
            http_ok(http, &host, &path),
            ssh_banner(reachable(SocketAddr::new(self.ssh_bind.into(), ssh_port))),
        )
        .map(drop)
    }
}
