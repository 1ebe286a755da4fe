//! `webhoster vm backup | backups | restore`: the operator's way to the
//! backups of a VM. They go through the running service's API, as the
//! hosting's owner (a short-lived token signed with the service's JWT
//! secret, which only root reads), so a backup or restore asked here takes
//! the same per-hosting turn, checks and states as one asked by the user.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Paths;
use crate::store::{self, Store};

/// What the operator asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupAction {
    Backup,
    List,
    Restore(i64),
}

/// Where the service listens and how to sign for it: the same settings
/// (flags' environment variables) as `serve`.
struct Service {
    api: SocketAddr,
    token: String,
}

async fn service(paths: &Paths, vm_id: &str) -> anyhow::Result<Service> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| store::default_url(&paths.state_dir));
    let store = Store::connect(&url).await.context("opening the database")?;
    let h = store.hosting_by_vm(vm_id).await?;
    // The token must carry the account's current version to be accepted.
    let user = match &h {
        Some(h) => store.user_by_id(h.user_id).await?,
        None => None,
    };
    store.close().await;
    let (Some(h), Some(user)) = (h, user) else {
        bail!("no hosting has VM {vm_id}");
    };
    let secret = match std::env::var("WEBHOSTER_JWT_SECRET") {
        Ok(s) => s.into_bytes(),
        Err(_) => {
            std::fs::read(paths.state_dir.join("jwt.secret")).context("reading the service's jwt.secret")?
        }
    };
    let auth = crate::auth::Auth::new(&secret, Duration::from_secs(600), 1)?;
    let api = std::env::var("WEBHOSTER_API_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8000".into())
        .parse()
        .context("WEBHOSTER_API_ADDR")?;
    Ok(Service {
        api,
        token: auth.issue(h.user_id, user.token_version)?.access_token,
    })
}

/// One request to the local API (HTTP/1.1, `Connection: close`): status
/// and JSON body.
async fn call(svc: &Service, method: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let mut stream = tokio::net::TcpStream::connect(svc.api).await.with_context(|| {
        format!(
            "connecting to the webhoster API at {} (is serve running?)",
            svc.api
        )
    })?;
    let request = format!(
        "{method} /api/v1/host/my{path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        svc.api, svc.token
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP answer")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    // warp answers with a length, or chunked: take the JSON object inside.
    let json = body
        .find('{')
        .zip(body.rfind('}'))
        .map(|(a, b)| &body[a..=b])
        .unwrap_or("null");
    Ok((status, serde_json::from_str(json).unwrap_or(Value::Null)))
}

fn check((status, body): (u16, Value)) -> anyhow::Result<Value> {
    if status >= 300 {
        bail!(
            "the API answered {status}: {}",
            body["message"].as_str().unwrap_or("?")
        );
    }
    Ok(body["data"].clone())
}

fn line(b: &Value) -> String {
    format!(
        "{:<6} {:<11} {:<9} {:<7} {:>10}  {}",
        b["id"],
        b["kind"].as_str().unwrap_or("-"),
        b["status"].as_str().unwrap_or("-"),
        b["consistency"].as_str().unwrap_or("-"),
        b["size_bytes"]
            .as_u64()
            .map_or("-".into(), |s| format!("{} MiB", s >> 20)),
        b["completed_at"]
            .as_str()
            .or(b["created_at"].as_str())
            .unwrap_or("-"),
    )
}

pub async fn run(paths: &Paths, vm_id: &str, action: BackupAction) -> anyhow::Result<ExitCode> {
    crate::vmm::validate_vm_id(vm_id)?;
    let svc = service(paths, vm_id).await?;
    match action {
        BackupAction::List => {
            println!(
                "{:<6} {:<11} {:<9} {:<7} {:>10}  TIME",
                "ID", "KIND", "STATUS", "CONSIST.", "SIZE"
            );
            for b in check(call(&svc, "GET", "/backups").await?)?
                .as_array()
                .into_iter()
                .flatten()
            {
                println!("{}", line(b));
            }
        }
        BackupAction::Backup => {
            let id = check(call(&svc, "POST", "/backups").await?)?["id"].clone();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let all = check(call(&svc, "GET", "/backups").await?)?;
                let Some(b) = all.as_array().into_iter().flatten().find(|b| b["id"] == id) else {
                    bail!("backup {id} failed (the service's log says why)");
                };
                if b["status"] == "complete" {
                    println!("{}", line(b));
                    break;
                }
                if let Some(p) = b["progress"]["percent"].as_f64() {
                    eprint!("\rbackup {id}: {p:.1} %");
                }
            }
            eprintln!();
        }
        BackupAction::Restore(id) => {
            check(call(&svc, "POST", &format!("/backups/{id}/restore")).await?)?;
            println!("VM {vm_id} runs on backup {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
