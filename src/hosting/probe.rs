//! The real [`GuestProbe`]: plain TCP from the host. HTTP is a `GET /` that
//! must answer with a status line; SSH must send its `SSH-2.0-` banner.
//!
//! A door that took the connection gets the caller's patience to answer,
//! and one door's failure does not cut the other's connection short. Under
//! load a guest's sshd may take seconds to send its banner (each connection
//! re-executes it); a probe that hung up and dialled again would start one
//! more sshd each time, and a slow guest would fall further behind with
//! every try.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ports::{Doors, GuestProbe, PortError};

/// Connecting is bounded on its own: a guest whose network is not up yet
/// drops the SYN, and TCP's own retries back off to many seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The patience of a convergence look at a hosting's doors. A pass waits
/// for its slowest hosting (a tenant may keep a door silent: after three
/// such looks its knocks back off, see `looks`), and a busy host's guests
/// are slow to answer: each SSH connection re-executes the guest's sshd,
/// 0.65 s of a TCG guest's CPU, and with 30 idle VMs on 2 cores a guest gets
/// about a twentieth of one. At 3 s, such late banners demoted healthy
/// hostings to `starting`.
pub const GLANCE: Duration = Duration::from_secs(10);

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

/// A connection to `addr`, within [`CONNECT_TIMEOUT`].
async fn connect(addr: SocketAddr, door: &str) -> Result<TcpStream, PortError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(PortError::Probe(format!("{door} probe of {addr}: {e}"))),
        Err(_) => Err(PortError::Probe(format!(
            "{door} probe of {addr}: connect timed out"
        ))),
    }
}

/// `GET path` on `addr`; Ok when the answer, within `patience` of the
/// connection, is HTTP 2xx.
pub async fn http_ok(addr: SocketAddr, host: &str, path: &str, patience: Duration) -> Result<(), PortError> {
    let mut s = connect(addr, "HTTP").await?;
    let job = async {
        let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: webhoster-probe\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let head = tokio::time::timeout(patience, job)
        .await
        .map_err(|_| PortError::Probe(format!("HTTP probe of {addr}: no answer within {patience:?}")))??;
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

/// Ok when `addr` sends an SSH banner within `patience` of the connection.
pub async fn ssh_banner(addr: SocketAddr, patience: Duration) -> Result<(), PortError> {
    let mut s = connect(addr, "SSH").await?;
    let job = async {
        let mut buf = vec![0u8; 32];
        let n = s.read(&mut buf).await?;
        Ok::<_, std::io::Error>(buf[..n].to_vec())
    };
    let banner = tokio::time::timeout(patience, job)
        .await
        .map_err(|_| PortError::Probe(format!("SSH probe of {addr}: no banner within {patience:?}")))??;
    if banner.starts_with(b"SSH-2.0-") {
        Ok(())
    } else {
        Err(PortError::Probe(format!("SSH probe of {addr}: no SSH banner")))
    }
}

#[async_trait]
impl GuestProbe for TcpProbe {
    async fn guest_site(&self, guest_ip: Ipv4Addr, patience: Duration) -> Result<(), PortError> {
        http_ok(
            SocketAddr::new(guest_ip.into(), 80),
            &guest_ip.to_string(),
            "/",
            patience,
        )
        .await
    }

    async fn forwarded_ssh(&self, ssh_port: u16, patience: Duration) -> Result<(), PortError> {
        ssh_banner(
            reachable(SocketAddr::new(self.ssh_bind.into(), ssh_port)),
            patience,
        )
        .await
    }

    async fn published_ready(&self, user_id: i64, doors: Doors, patience: Duration) -> Result<(), PortError> {
        let http = reachable(self.http_addr);
        let (host, path) = (http.ip().to_string(), format!("/{user_id}/"));
        let site = http_ok(http, &host, &path, patience);
        match doors {
            Doors::Site => site.await,
            Doors::SiteAndSsh { ssh_port } => {
                let (http, ssh) = tokio::join!(site, self.forwarded_ssh(ssh_port, patience));
                http.and(ssh)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A listener that answers each connection with `reply` after `delay`;
    /// its address and how many connections it took.
    async fn slow_door(reply: &'static [u8], delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let taken = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&taken);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(reply).await;
                });
            }
        });
        (addr, taken)
    }

    #[tokio::test]
    async fn a_slow_door_is_waited_for_on_one_connection() {
        let (http, http_taken) = slow_door(b"HTTP/1.0 200 OK\r\n\r\n", Duration::ZERO).await;
        let (ssh, ssh_taken) = slow_door(b"SSH-2.0-OpenSSH_9.2\r\n", Duration::from_secs(2)).await;
        let probe = TcpProbe {
            http_addr: http,
            ssh_bind: Ipv4Addr::LOCALHOST,
        };
        // A short patience gives up on the banner; a longer one gets it, on
        // the same single connection, while HTTP answered at once.
        let glance = probe
            .published_ready(
                7,
                Doors::SiteAndSsh { ssh_port: ssh.port() },
                Duration::from_secs(1),
            )
            .await;
        assert!(format!("{glance:?}").contains("no banner"), "{glance:?}");
        probe
            .published_ready(
                7,
                Doors::SiteAndSsh { ssh_port: ssh.port() },
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(ssh_taken.load(Ordering::SeqCst), 2);
        assert_eq!(http_taken.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_door_does_not_cut_the_other_short() {
        let (http, _) = slow_door(b"HTTP/1.0 502 Bad Gateway\r\n\r\n", Duration::ZERO).await;
        let (ssh, _) = slow_door(b"SSH-2.0-OpenSSH_9.2\r\n", Duration::from_millis(500)).await;
        let probe = TcpProbe {
            http_addr: http,
            ssh_bind: Ipv4Addr::LOCALHOST,
        };
        let started = std::time::Instant::now();
        let err = probe
            .published_ready(
                7,
                Doors::SiteAndSsh { ssh_port: ssh.port() },
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(format!("{err:?}").contains("502"), "{err:?}");
        // The SSH connection ran to its banner: the next try finds no
        // half-served connection behind it.
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[tokio::test]
    async fn a_look_at_the_site_alone_leaves_ssh_untouched() {
        let (http, http_taken) = slow_door(b"HTTP/1.0 200 OK\r\n\r\n", Duration::ZERO).await;
        let (ssh, ssh_taken) = slow_door(b"SSH-2.0-OpenSSH_9.2\r\n", Duration::ZERO).await;
        let probe = TcpProbe {
            http_addr: http,
            ssh_bind: Ipv4Addr::LOCALHOST,
        };
        probe.published_ready(7, Doors::Site, GLANCE).await.unwrap();
        assert_eq!(http_taken.load(Ordering::SeqCst), 1);
        assert_eq!(
            ssh_taken.load(Ordering::SeqCst),
            0,
            "no sshd started for a site look"
        );
        probe
            .published_ready(7, Doors::SiteAndSsh { ssh_port: ssh.port() }, GLANCE)
            .await
            .unwrap();
        assert_eq!(ssh_taken.load(Ordering::SeqCst), 1);
    }
}
