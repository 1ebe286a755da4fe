//! The orchestrator with the real parts this module owns: the seed writer
//! (genisoimage writes a real `cidata` ISO) and the TCP readiness probe (real
//! sockets to a local HTTP server standing in for nginx and an SSH banner
//! standing in for the forward). Engine, network and proxy are fakes here; the
//! coordinator's end-to-end tests run them for real.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use common::control::{Db, TestDb};
use common::fakes::FakeWorld;
use webhoster::hosting::ports::{Doors, GuestProbe, PortError};
use webhoster::hosting::probe::TcpProbe;
use webhoster::hosting::seeder::IsoSeeder;
use webhoster::hosting::{HostingConfig, HostingError, HostingService, Readiness};
use webhoster::store::Store;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

/// The test key, parsed as the API would.
fn key() -> Option<webhoster::auth::SshPublicKey> {
    Some(webhoster::auth::SshPublicKey::parse(KEY).unwrap())
}

/// A local "nginx": answers every request with `status`, counting requests.
async fn http_server(status: Arc<AtomicU16>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let status = status.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok").as_bytes())
                    .await;
            });
        }
    });
    addr
}

/// A local "sshd": sends a banner.
async fn ssh_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n").await;
        }
    });
    port
}

/// Guest checks from the fakes (the guest IP is not reachable from a test),
/// published checks for real.
struct SplitProbe {
    guest: Arc<FakeWorld>,
    published: TcpProbe,
}

#[async_trait]
impl GuestProbe for SplitProbe {
    async fn guest_site(&self, ip: Ipv4Addr, patience: Duration) -> Result<(), PortError> {
        self.guest.guest_site(ip, patience).await
    }
    async fn forwarded_ssh(&self, ssh_port: u16, patience: Duration) -> Result<(), PortError> {
        self.published.forwarded_ssh(ssh_port, patience).await
    }
    async fn published_ready(&self, user_id: i64, doors: Doors, patience: Duration) -> Result<(), PortError> {
        self.published.published_ready(user_id, doors, patience).await
    }
}

async fn real_seed_and_probe(db: Db) {
    let db = TestDb::new(db).await;
    let store = Store::connect(&db.url).await.unwrap();
    let world = FakeWorld::new(db.dir(), "10.95.0.0/24".parse().unwrap());
    let status = Arc::new(AtomicU16::new(502));
    let http = http_server(status.clone()).await;
    let ssh_port = ssh_server().await;
    let mut ports = world.ports();
    ports.seeder = Arc::new(IsoSeeder);
    ports.probe = Arc::new(SplitProbe {
        guest: world.clone(),
        published: TcpProbe {
            http_addr: http,
            ssh_bind: Ipv4Addr::LOCALHOST,
        },
    });
    let cfg = HostingConfig {
        // The only port: the one the banner server listens on.
        ssh_ports: ssh_port..=ssh_port,
        ready: Readiness {
            timeout: Duration::from_millis(600),
            interval: Duration::from_millis(50),
        },
        ..HostingConfig::default()
    };
    let svc = HostingService::new(store.clone(), ports, cfg);
    let user = store.create_user("lee@example.com", "lee", "x").await.unwrap();

    // nginx answers 502: the publish step times out, and the real seed ISO
    // that step 1 wrote is gone after the rollback.
    let err = svc.create(&user, key(), true).await.unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(matches!(err, HostingError::StepFailed { step: "publish", .. }));
    let seeds: Vec<_> = walk(db.dir())
        .into_iter()
        .filter(|p| p.ends_with("seed.iso"))
        .collect();
    assert!(seeds.is_empty(), "seed ISO left behind: {seeds:?}");
    assert!(world.held().is_empty());
    assert!(store.hosting_by_user(user.id).await.unwrap().is_none());

    // nginx answers 200: the create finishes, with a real cidata ISO on disk.
    status.store(200, Ordering::Relaxed);
    let created = svc.create(&user, key(), true).await.unwrap();
    assert_eq!(created.hosting.ssh_port, ssh_port);
    let iso = db.dir().join("vms").join(&created.hosting.vm_id).join("seed.iso");
    let bytes = std::fs::read(&iso).unwrap();
    assert_eq!(&bytes[0x8001..0x8006], b"CD001");
    assert_eq!(&bytes[0x8028..0x802e], b"cidata");
    svc.delete(user.id).await.unwrap();
    assert!(!iso.exists());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

both_backends!(real_seed_and_probe);
