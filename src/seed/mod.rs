//! seed: cloud-init NoCloud documents (user-data, meta-data, network-config)
//! rendered from `templates/cloud-init/`, written as an ISO labelled `cidata`.
//!
//! Every value is validated here again, even when the caller already did, and
//! rendered as a JSON string (which YAML reads as a plain string), so no input
//! can add a key, a line or a document to what cloud-init reads.
//! This module never starts a VM and never talks to the network.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use handlebars::{Handlebars, handlebars_helper};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::auth::SshPublicKey;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid {field} for the cloud-init seed: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("rendering the {0} template")]
    Render(&'static str, #[source] handlebars::RenderError),
    #[error("writing the seed ISO {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("genisoimage is missing: install the Debian package genisoimage")]
    ToolMissing,
    #[error("genisoimage failed for {}: {stderr}", path.display())]
    Tool { path: PathBuf, stderr: String },
}

/// What one VM's seed says.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// cloud-init's instance-id: a new id makes cloud-init run its first boot again.
    pub instance_id: String,
    pub hostname: String,
    /// The login user (`ubuntu` for webhoster's VMs).
    pub user: String,
    /// The login user's keys (each already checked by its type).
    pub ssh_keys: Vec<SshPublicKey>,
    /// Who the welcome page names: the account's username.
    pub owner: String,
    /// Static address matched by MAC; `None` leaves cloud-init's fallback (DHCP).
    pub network: Option<StaticNetwork>,
}

#[derive(Debug, Clone)]
pub struct StaticNetwork {
    pub mac: String,
    /// Guest address with the subnet's prefix length.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// The rendered documents, file name and content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedDocs {
    pub user_data: String,
    pub meta_data: String,
    pub network_config: Option<String>,
}

impl SeedDocs {
    pub fn files(&self) -> Vec<(&'static str, &[u8])> {
        let mut files = vec![
            ("user-data", self.user_data.as_bytes()),
            ("meta-data", self.meta_data.as_bytes()),
        ];
        if let Some(net) = &self.network_config {
            files.push(("network-config", net.as_bytes()));
        }
        files
    }
}

const USER_DATA: &str = include_str!("../../templates/cloud-init/user-data.yaml.hbs");
const META_DATA: &str = include_str!("../../templates/cloud-init/meta-data.yaml.hbs");
const NETWORK_CONFIG: &str = include_str!("../../templates/cloud-init/network-config.yaml.hbs");
const WELCOME: &str = include_str!("../../templates/cloud-init/welcome.html.hbs");

handlebars_helper!(json: |value: Json| serde_json::to_string(value).unwrap_or_default());

fn yaml_registry() -> Handlebars<'static> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    hb.register_helper("json", Box::new(json));
    hb
}

fn html_registry() -> Handlebars<'static> {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SeedError {
    SeedError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn check_name(field: &'static str, value: &str, max: usize) -> Result<(), SeedError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !value.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{value:?} must be 1-{max} of [a-z0-9_-], not starting with '-'"),
        ))
    }
}

fn check_hostname(value: &str) -> Result<(), SeedError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid("hostname", format!("{value:?} is not an RFC 1123 label")))
    }
}

fn check_mac(mac: &str) -> Result<(), SeedError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6
        && parts.iter().all(|p| {
            p.len() == 2
                && p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "mac",
            format!("{mac:?} is not a lowercase xx:xx:xx:xx:xx:xx address"),
        ))
    }
}

impl SeedSpec {
    pub fn validate(&self) -> Result<(), SeedError> {
        check_name("instance_id", &self.instance_id, 64)?;
        check_hostname(&self.hostname)?;
        check_name("user", &self.user, 32)?;
        check_name("owner", &self.owner, 32)?;
        if self.ssh_keys.is_empty() {
            return Err(invalid("ssh keys", "at least one key is needed to log in"));
        }
        if let Some(net) = &self.network {
            check_mac(&net.mac)?;
            if !net.address.contains(&net.gateway) || net.address.addr() == net.gateway {
                return Err(invalid(
                    "network",
                    format!("gateway {} is not a peer in {}", net.gateway, net.address),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct UserDataVars<'a> {
    instance_id: &'a str,
    hostname: &'a str,
    user: &'a str,
    ssh_keys: Vec<&'a str>,
    welcome_page: String,
}

/// Renders the three documents. Fails on any invalid value.
pub fn render(spec: &SeedSpec) -> Result<SeedDocs, SeedError> {
    spec.validate()?;
    let welcome_page = html_registry()
        .render_template(
            WELCOME,
            &serde_json::json!({"owner": spec.owner, "hostname": spec.hostname, "user": spec.user}),
        )
        .map_err(|e| SeedError::Render("welcome page", e))?;
    let hb = yaml_registry();
    let vars = UserDataVars {
        instance_id: &spec.instance_id,
        hostname: &spec.hostname,
        user: &spec.user,
        ssh_keys: spec.ssh_keys.iter().map(SshPublicKey::as_str).collect(),
        welcome_page,
    };
    let user_data = hb
        .render_template(USER_DATA, &vars)
        .map_err(|e| SeedError::Render("user-data", e))?;
    let meta_data = hb
        .render_template(
            META_DATA,
            &serde_json::json!({"instance_id": spec.instance_id, "hostname": spec.hostname}),
        )
        .map_err(|e| SeedError::Render("meta-data", e))?;
    let network_config = spec
        .network
        .as_ref()
        .map(|net| {
            hb.render_template(
                NETWORK_CONFIG,
                &serde_json::json!({
                    "mac": net.mac,
                    "address": net.address.to_string(),
                    "gateway": net.gateway.to_string(),
                }),
            )
            .map_err(|e| SeedError::Render("network-config", e))
        })
        .transpose()?;
    Ok(SeedDocs {
        user_data,
        meta_data,
        network_config,
    })
}

/// The size of every seed ISO webhoster writes (zeros after the ISO, sparse
/// on disk). A warm clone's seed drive is its template's device, whose size
/// the guest read when the template booted, so all seeds are one size.
pub const SEED_BYTES: u64 = 4 << 20;

/// Writes `files` as a NoCloud ISO (volume `cidata`, Joliet and Rock Ridge) at
/// `path`, padded to [`SEED_BYTES`]. A new file is renamed into place, so a
/// reader never sees half an ISO; an existing one is overwritten in place
/// (same inode), because a warm clone's QEMU holds it open and reads the new
/// seed through that descriptor. Any seed works, not only the ones
/// [`render`] makes.
pub async fn write_iso(files: &[(&str, &[u8])], path: &Path) -> Result<(), SeedError> {
    let io_err = |source| SeedError::Io {
        path: path.to_owned(),
        source,
    };
    let parent = path.parent().unwrap_or(Path::new("."));
    let staging = tempfile::Builder::new()
        .prefix(".seed-")
        .tempdir_in(parent)
        .map_err(io_err)?;
    for (name, content) in files {
        if name.contains('/') || name.starts_with('.') {
            return Err(invalid("seed file name", format!("{name:?}")));
        }
        tokio::fs::write(staging.path().join(name), content)
            .await
            .map_err(io_err)?;
    }
    let tmp_iso = staging.path().join("seed.iso");
    let output = tokio::process::Command::new("genisoimage")
        .arg("-quiet")
        .args(["-output"])
        .arg(&tmp_iso)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .args(files.iter().map(|(name, _)| staging.path().join(name)))
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SeedError::ToolMissing
            } else {
                io_err(e)
            }
        })?;
    if !output.status.success() {
        return Err(SeedError::Tool {
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let iso = tokio::fs::read(&tmp_iso).await.map_err(io_err)?;
    if iso.len() as u64 > SEED_BYTES {
        return Err(invalid(
            "seed",
            format!("{} bytes, more than the {SEED_BYTES} a seed may take", iso.len()),
        ));
    }
    let (path, staged) = (path.to_owned(), tmp_iso.clone());
    tokio::task::spawn_blocking(move || place_iso(&iso, &staged, &path))
        .await
        .map_err(|e| io_err(std::io::Error::other(e)))?
        .map_err(io_err)
}

/// Puts `iso` at `path`, padded to [`SEED_BYTES`]: in place when the file
/// exists (its readers keep their descriptor), else by renaming `staged`.
fn place_iso(iso: &[u8], staged: &Path, path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(mut file) => {
            file.write_all(iso)?;
            // Cut what an older, longer seed left after this one, then pad
            // with zeros again (a hole: nothing written).
            file.set_len(iso.len() as u64)?;
            file.set_len(SEED_BYTES)?;
            file.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = std::fs::OpenOptions::new().write(true).open(staged)?;
            file.set_len(SEED_BYTES)?;
            file.sync_all()?;
            std::fs::rename(staged, path)
        }
        Err(e) => Err(e),
    }
}

/// Renders `spec` and writes its ISO at `path`.
pub async fn write(spec: &SeedSpec, path: &Path) -> Result<SeedDocs, SeedError> {
    let docs = render(spec)?;
    write_iso(&docs.files(), path).await?;
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@example";

    fn key(line: &str) -> SshPublicKey {
        SshPublicKey::parse(line).unwrap()
    }

    fn spec() -> SeedSpec {
        SeedSpec {
            instance_id: "vm-1a2b3c".into(),
            hostname: "vm-1a2b3c".into(),
            user: "ubuntu".into(),
            ssh_keys: vec![key(KEY)],
            owner: "alice".into(),
            network: Some(StaticNetwork {
                mac: "52:54:00:12:34:56".into(),
                address: "10.83.0.5/24".parse().unwrap(),
                gateway: "10.83.0.1".parse().unwrap(),
            }),
        }
    }

    #[test]
    fn renders_user_keys_page_and_network() {
        let docs = render(&spec()).unwrap();
        assert!(docs.user_data.starts_with("#cloud-config\n"));
        assert!(docs.user_data.contains(&format!("- \"{KEY}\"")));
        assert!(docs.user_data.contains("Welcome, alice!"));
        assert!(docs.user_data.contains("PermitRootLogin no"));
        assert!(docs.user_data.contains("PasswordAuthentication no"));
        assert!(docs.meta_data.contains("instance-id: \"vm-1a2b3c\""));
        let net = docs.network_config.unwrap();
        assert!(net.contains("macaddress: \"52:54:00:12:34:56\""));
        assert!(net.contains("- \"10.83.0.5/24\""));
        assert!(net.contains("via: \"10.83.0.1\""));
    }

    #[test]
    fn rejects_anything_that_could_inject() {
        let cases: Vec<fn(&mut SeedSpec)> = vec![
            |s| s.ssh_keys = vec![],
            |s| s.hostname = "bad\nhost".into(),
            |s| s.hostname = "-lead".into(),
            |s| s.owner = "<script>".into(),
            |s| s.owner = "a\"b".into(),
            |s| s.user = "root user".into(),
            |s| s.instance_id = "id: x".into(),
            |s| s.network.as_mut().unwrap().mac = "52:54:00:12:34:5G".into(),
            |s| s.network.as_mut().unwrap().gateway = "192.168.0.1".parse().unwrap(),
        ];
        for (i, case) in cases.iter().enumerate() {
            let mut s = spec();
            case(&mut s);
            assert!(
                matches!(render(&s), Err(SeedError::Invalid { .. })),
                "case {i} was accepted"
            );
        }
    }

    #[test]
    fn user_data_is_yaml_with_exactly_our_keys() {
        // A key comment full of YAML syntax stays one string.
        let mut s = spec();
        s.ssh_keys = vec![key(&format!(
            "{} x: [1, 2] # {{}} &a *a",
            KEY.rsplit_once(' ').unwrap().0
        ))];
        let docs = render(&s).unwrap();
        let keys_line = docs
            .user_data
            .lines()
            .find(|l| l.contains("ssh-ed25519"))
            .unwrap();
        assert!(
            keys_line.trim_start().starts_with("- \"ssh-ed25519 "),
            "{keys_line}"
        );
        assert!(keys_line.ends_with("*a\""), "{keys_line}");
    }

    #[tokio::test]
    async fn writes_a_cidata_iso() {
        if std::process::Command::new("genisoimage")
            .arg("-version")
            .output()
            .is_err()
        {
            panic!("genisoimage is missing: the test command installs it (make test)");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        write(&spec(), &path).await.unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // ISO 9660 primary volume descriptor at sector 16: identifier, then the volume id.
        assert_eq!(&bytes[0x8001..0x8006], b"CD001");
        assert_eq!(std::str::from_utf8(&bytes[0x8028..0x8030]).unwrap(), "cidata  ");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging left behind"
        );
        assert_eq!(bytes.len() as u64, SEED_BYTES);
    }

    #[tokio::test]
    async fn an_existing_seed_is_rewritten_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.iso");
        let mut first = spec();
        first.hostname = "oldseedhost".into();
        write(&first, &path).await.unwrap();
        // A reader that opened the first seed (a clone's QEMU) reads the second.
        let held = std::fs::File::open(&path).unwrap();
        let inode = held.metadata().unwrap().ino();
        let mut second = spec();
        second.hostname = "second-host".into();
        write(&second, &path).await.unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(after.ino(), inode, "same file");
        assert_eq!(after.len(), SEED_BYTES);
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut &held, &mut seen).unwrap();
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.contains("second-host"),
            "the held descriptor reads the new seed"
        );
        assert!(!text.contains("oldseedhost"), "nothing of the old seed is left");
    }
}
