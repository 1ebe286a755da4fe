//! The NoCloud seed as the agent understands it: meta-data, user-data
//! (`#cloud-config`) and network-config, parsed into a [`Plan`]. Anything
//! outside the subset the agent applies itself becomes a [`Handover`]: the
//! real cloud-init then applies the whole seed, so any seed keeps working.

use serde_yaml::{Mapping, Value};

use crate::network::{self, Network};

/// Why a seed goes to cloud-init instead (shown in the journal).
#[derive(Debug, Clone, PartialEq)]
pub struct Handover(pub String);

impl std::fmt::Display for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn handover<T>(why: impl Into<String>) -> Result<T, Handover> {
    Err(Handover(why.into()))
}

/// The seed's files, as read from the `cidata` filesystem.
#[derive(Debug, Default, Clone)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: Option<Vec<u8>>,
    pub network_config: Option<String>,
    pub vendor_data: Option<Vec<u8>>,
}

/// One `users` entry.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct User {
    pub name: String,
    pub gecos: Option<String>,
    pub shell: Option<String>,
    pub homedir: Option<String>,
    pub groups: Vec<String>,
    /// sudoers rules, each a line after the user name.
    pub sudo: Vec<String>,
    pub ssh_authorized_keys: Vec<String>,
    pub lock_passwd: bool,
}

/// One `write_files` entry, content already decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteFile {
    pub path: String,
    pub content: Vec<u8>,
    pub owner: String,
    pub permissions: u32,
    pub append: bool,
    pub defer: bool,
}

/// A command of `runcmd`/`bootcmd`: a shell line or an argv.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Shell(String),
    Argv(Vec<String>),
}

impl Command {
    /// One line of a POSIX shell script (argv items are quoted).
    pub fn script_line(&self) -> String {
        match self {
            Command::Shell(s) => s.clone(),
            Command::Argv(argv) => argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "),
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Everything the agent will apply for one instance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub instance_id: String,
    /// Short host name and FQDN, when the seed names one.
    pub hostname: Option<(String, String)>,
    pub manage_etc_hosts: bool,
    pub ssh_pwauth: Option<bool>,
    pub users: Vec<User>,
    pub write_files: Vec<WriteFile>,
    pub bootcmd: Vec<Command>,
    pub runcmd: Vec<Command>,
    pub network: Network,
}

/// user-data keys applied by the agent (or harmless to it).
const USER_DATA_KEYS: &[&str] = &[
    "hostname",
    "fqdn",
    "preserve_hostname",
    "prefer_fqdn_over_hostname",
    "manage_etc_hosts",
    "ssh_pwauth",
    "users",
    "write_files",
    "runcmd",
    "bootcmd",
    // True is cloud-init's default and only matters for root's keys, which
    // the agent never writes; `false` hands over (below).
    "disable_root",
    // The agent always makes fresh ed25519 host keys per instance.
    "ssh_deletekeys",
    "ssh_genkeytypes",
];

const USER_KEYS: &[&str] = &[
    "name",
    "gecos",
    "shell",
    "homedir",
    "groups",
    "sudo",
    "ssh_authorized_keys",
    "lock_passwd",
];

const META_DATA_KEYS: &[&str] = &["instance-id", "local-hostname", "hostname", "dsmode"];

fn yaml(text: &str, what: &str) -> Result<Value, Handover> {
    serde_yaml::from_str::<Value>(text)
        .or_else(|e| handover(format!("{what} is not YAML the agent reads: {e}")))
}

fn string(v: &Value, what: &str) -> Result<String, Handover> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => handover(format!("{what} is not a string")),
    }
}

fn boolean(v: &Value, what: &str) -> Result<bool, Handover> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => handover(format!("{what} is not a boolean")),
        },
        _ => handover(format!("{what} is not a boolean")),
    }
}

/// A list, or (as cloud-init also takes) one comma-separated string.
fn string_list(v: &Value, what: &str) -> Result<Vec<String>, Handover> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(items) => items.iter().map(|i| string(i, what)).collect(),
        Value::String(s) => Ok(s
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()),
        _ => handover(format!("{what} is not a list")),
    }
}

fn mapping<'a>(v: &'a Value, what: &str) -> Result<&'a Mapping, Handover> {
    v.as_mapping()
        .ok_or_else(|| Handover(format!("{what} is not a mapping")))
}

/// Only `keys` may appear in `map`.
fn only_keys(map: &Mapping, keys: &[&str], what: &str) -> Result<(), Handover> {
    for k in map.keys() {
        let k = string(k, what)?;
        if !keys.contains(&k.as_str()) {
            return handover(format!("{what} has `{k}`"));
        }
    }
    Ok(())
}

/// Parses a seed; `Err` means "cloud-init applies this one".
pub fn plan(files: &SeedFiles) -> Result<Plan, Handover> {
    let meta = yaml(&files.meta_data, "meta-data")?;
    let meta = match &meta {
        Value::Null => Mapping::new(),
        v => mapping(v, "meta-data")?.clone(),
    };
    only_keys(&meta, META_DATA_KEYS, "meta-data")?;
    let instance_id = match meta.get("instance-id") {
        Some(v) => string(v, "instance-id")?,
        None => return handover("meta-data has no instance-id"),
    };
    if let Some(v) = meta.get("dsmode")
        && string(v, "dsmode")? != "local"
        && string(v, "dsmode")? != "net"
    {
        return handover("meta-data has a dsmode the agent does not know");
    }
    if files
        .vendor_data
        .as_ref()
        .is_some_and(|v| !v.iter().all(u8::is_ascii_whitespace))
    {
        return handover("the seed has vendor-data");
    }
    let mut plan = Plan {
        instance_id,
        // The image's own cloud.cfg says manage_etc_hosts: true.
        manage_etc_hosts: true,
        ..Plan::default()
    };
    let local_hostname = match meta.get("local-hostname").or_else(|| meta.get("hostname")) {
        Some(v) => Some(string(v, "local-hostname")?),
        None => None,
    };

    let user_data = match &files.user_data {
        None => Mapping::new(),
        Some(bytes) => {
            let text = std::str::from_utf8(bytes).or_else(|_| handover("user-data is not UTF-8 text"))?;
            let first = text.lines().next().unwrap_or("").trim_end();
            if text.trim().is_empty() {
                Mapping::new()
            } else if first != "#cloud-config" {
                return handover("user-data is not #cloud-config");
            } else {
                match yaml(text, "user-data")? {
                    Value::Null => Mapping::new(),
                    Value::Mapping(m) => m,
                    _ => return handover("user-data is not a mapping"),
                }
            }
        }
    };
    only_keys(&user_data, USER_DATA_KEYS, "user-data")?;
    let get = |k: &str| user_data.get(k);

    if let Some(v) = get("disable_root")
        && !boolean(v, "disable_root")?
    {
        return handover("disable_root: false");
    }
    if let Some(v) = get("ssh_genkeytypes")
        && !string_list(v, "ssh_genkeytypes")?.iter().any(|t| t == "ed25519")
    {
        return handover("ssh_genkeytypes without ed25519");
    }
    if let Some(v) = get("prefer_fqdn_over_hostname")
        && boolean(v, "prefer_fqdn_over_hostname")?
    {
        return handover("prefer_fqdn_over_hostname: true");
    }
    let preserve = match get("preserve_hostname") {
        Some(v) => boolean(v, "preserve_hostname")?,
        None => false,
    };
    if !preserve {
        let hostname = match get("hostname") {
            Some(v) => Some(string(v, "hostname")?),
            None => None,
        };
        let fqdn = match get("fqdn") {
            Some(v) => Some(string(v, "fqdn")?),
            None => None,
        };
        // cloud-init's order: fqdn, then hostname, then the meta-data's.
        let full = fqdn.clone().or(hostname.clone()).or(local_hostname);
        if let Some(full) = full {
            let short = match &hostname {
                Some(h) if fqdn.is_some() => h.split('.').next().unwrap_or(h).to_owned(),
                _ => full.split('.').next().unwrap_or(&full).to_owned(),
            };
            check_hostname(&short)?;
            check_hostname(&full)?;
            plan.hostname = Some((short, full));
        }
    }
    if let Some(v) = get("manage_etc_hosts") {
        plan.manage_etc_hosts = match v {
            Value::String(s) if s == "localhost" => return handover("manage_etc_hosts: localhost"),
            v => boolean(v, "manage_etc_hosts")?,
        };
    }
    if let Some(v) = get("ssh_pwauth") {
        plan.ssh_pwauth = match v {
            Value::String(s) if s == "unchanged" => None,
            v => Some(boolean(v, "ssh_pwauth")?),
        };
    }
    if let Some(v) = get("users") {
        plan.users = users(v)?;
    } else {
        return handover("no `users`: cloud-init makes the image's default user");
    }
    if let Some(v) = get("write_files") {
        plan.write_files = write_files(v)?;
    }
    if let Some(v) = get("bootcmd") {
        plan.bootcmd = commands(v, "bootcmd")?;
    }
    if let Some(v) = get("runcmd") {
        plan.runcmd = commands(v, "runcmd")?;
    }
    plan.network = match &files.network_config {
        None => Network::Fallback,
        Some(text) if text.trim().is_empty() => Network::Fallback,
        Some(text) => network::parse(&yaml(text, "network-config")?)?,
    };
    Ok(plan)
}

fn check_hostname(name: &str) -> Result<(), Handover> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        handover(format!("hostname {name:?} is not one the agent sets"))
    }
}

/// A user or group name as `useradd` would accept it.
fn check_name(name: &str, what: &str) -> Result<(), Handover> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        handover(format!("{what} {name:?} is not a name the agent makes"))
    }
}

fn users(v: &Value) -> Result<Vec<User>, Handover> {
    let items = match v {
        Value::Sequence(items) => items.clone(),
        Value::String(_) => string_list(v, "users")?.into_iter().map(Value::String).collect(),
        _ => return handover("users is not a list"),
    };
    let mut out = Vec::new();
    for item in &items {
        let user = match item {
            Value::String(s) if s == "default" => return handover("users has `default`"),
            Value::String(s) => User {
                name: s.clone(),
                lock_passwd: true,
                ..User::default()
            },
            Value::Mapping(m) => {
                only_keys(m, USER_KEYS, "a users entry")?;
                let opt = |k: &str| -> Result<Option<String>, Handover> {
                    m.get(k).map(|v| string(v, k)).transpose()
                };
                let name = opt("name")?.ok_or_else(|| Handover("a users entry has no name".into()))?;
                let sudo = match m.get("sudo") {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => Vec::new(),
                    Some(v @ Value::String(_)) => vec![string(v, "sudo")?],
                    Some(v @ Value::Sequence(_)) => string_list(v, "sudo")?,
                    Some(_) => return handover("sudo is neither a rule nor a list of rules"),
                };
                for rule in &sudo {
                    if rule.contains('\n') {
                        return handover("a sudo rule spans lines");
                    }
                }
                User {
                    gecos: opt("gecos")?,
                    shell: opt("shell")?,
                    homedir: opt("homedir")?,
                    groups: m
                        .get("groups")
                        .map(|v| string_list(v, "groups"))
                        .transpose()?
                        .unwrap_or_default(),
                    sudo,
                    ssh_authorized_keys: m
                        .get("ssh_authorized_keys")
                        .map(string_list_keys)
                        .transpose()?
                        .unwrap_or_default(),
                    lock_passwd: m
                        .get("lock_passwd")
                        .map(|v| boolean(v, "lock_passwd"))
                        .transpose()?
                        .unwrap_or(true),
                    name,
                }
            }
            _ => return handover("a users entry is neither a name nor a mapping"),
        };
        check_name(&user.name, "user")?;
        for g in &user.groups {
            check_name(g, "group")?;
        }
        for field in [&user.gecos, &user.shell, &user.homedir].into_iter().flatten() {
            if field.contains([':', '\n']) {
                return handover(format!("a field of user {} has ':' or a newline", user.name));
            }
        }
        out.push(user);
    }
    Ok(out)
}

/// Keys are one per line; a key is never split on commas.
fn string_list_keys(v: &Value) -> Result<Vec<String>, Handover> {
    match v {
        Value::Sequence(items) => items.iter().map(|i| string(i, "ssh_authorized_keys")).collect(),
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Null => Ok(Vec::new()),
        _ => handover("ssh_authorized_keys is not a list"),
    }
}

fn commands(v: &Value, what: &str) -> Result<Vec<Command>, Handover> {
    let Value::Sequence(items) = v else {
        return handover(format!("{what} is not a list"));
    };
    items
        .iter()
        .map(|i| match i {
            Value::Sequence(_) => Ok(Command::Argv(string_list(i, what)?)),
            other => Ok(Command::Shell(string(other, what)?)),
        })
        .collect()
}

/// Parses `0644`, `'0o644'`, `644` or an integer (YAML reads 0644 as 420).
fn permissions(v: &Value) -> Result<u32, Handover> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .filter(|n| *n <= 0o7777)
            .map(|n| n as u32)
            .ok_or_else(|| Handover("permissions out of range".into())),
        Value::String(s) => {
            let digits = s.trim().trim_start_matches("0o");
            u32::from_str_radix(digits, 8)
                .ok()
                .filter(|n| *n <= 0o7777)
                .ok_or_else(|| Handover(format!("permissions {s:?} are not octal")))
        }
        _ => handover("permissions are not a number"),
    }
}

fn decode(content: &[u8], encoding: &str) -> Result<Vec<u8>, Handover> {
    use base64::Engine;
    use std::io::Read;
    let b64 = |data: &[u8]| {
        let clean: Vec<u8> = data
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(clean)
            .or_else(|e| handover(format!("write_files content is not base64: {e}")))
    };
    let gunzip = |data: &[u8]| {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .map(|_| out)
            .or_else(|e| handover(format!("write_files content is not gzip: {e}")))
    };
    match encoding.to_ascii_lowercase().as_str() {
        "" | "text/plain" => Ok(content.to_vec()),
        "b64" | "base64" => b64(content),
        "gz" | "gzip" => gunzip(content),
        "gz+base64" | "gzip+base64" | "gz+b64" | "gzip+b64" => gunzip(&b64(content)?),
        other => handover(format!("write_files encoding {other:?}")),
    }
}

fn write_files(v: &Value) -> Result<Vec<WriteFile>, Handover> {
    let Value::Sequence(items) = v else {
        return handover("write_files is not a list");
    };
    let mut out = Vec::new();
    for item in items {
        let m = mapping(item, "a write_files entry")?;
        only_keys(
            m,
            &[
                "path",
                "content",
                "encoding",
                "owner",
                "permissions",
                "append",
                "defer",
            ],
            "a write_files entry",
        )?;
        let path = match m.get("path") {
            Some(v) => string(v, "path")?,
            None => return handover("a write_files entry has no path"),
        };
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return handover(format!("write_files path {path:?} is not absolute and plain"));
        }
        let encoding = m
            .get("encoding")
            .map(|v| string(v, "encoding"))
            .transpose()?
            .unwrap_or_default();
        let content = match m.get("content") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => string(v, "content")?.into_bytes(),
        };
        let owner = m
            .get("owner")
            .map(|v| string(v, "owner"))
            .transpose()?
            .unwrap_or_else(|| "root:root".into());
        out.push(WriteFile {
            path,
            content: decode(&content, &encoding)?,
            owner,
            permissions: m
                .get("permissions")
                .map(permissions)
                .transpose()?
                .unwrap_or(0o644),
            append: m
                .get("append")
                .map(|v| boolean(v, "append"))
                .transpose()?
                .unwrap_or(false),
            defer: m
                .get("defer")
                .map(|v| boolean(v, "defer"))
                .transpose()?
                .unwrap_or(false),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(user_data: &str) -> SeedFiles {
        SeedFiles {
            meta_data: "instance-id: iid-1\nlocal-hostname: meta-host\n".into(),
            user_data: Some(user_data.as_bytes().to_vec()),
            ..SeedFiles::default()
        }
    }

    #[test]
    fn webhosters_own_seed_is_applied_by_the_agent() {
        let text = include_str!("testdata/webhoster-user-data.yaml");
        let p = plan(&seed(text)).unwrap();
        assert_eq!(p.instance_id, "iid-1");
        assert_eq!(p.hostname, Some(("vm-a".into(), "vm-a".into())));
        assert_eq!(p.ssh_pwauth, Some(false));
        assert_eq!(p.users.len(), 1);
        let u = &p.users[0];
        assert_eq!(u.name, "ubuntu");
        assert_eq!(u.groups, ["sudo", "www-data"]);
        assert_eq!(u.sudo, ["ALL=(ALL) NOPASSWD:ALL"]);
        assert_eq!(u.ssh_authorized_keys.len(), 1);
        assert!(u.lock_passwd);
        assert_eq!(p.write_files.len(), 2);
        assert_eq!(p.write_files[1].owner, "root:www-data");
        assert_eq!(p.write_files[1].permissions, 0o664);
    }

    #[test]
    fn other_modules_hand_over() {
        for (ud, why) in [
            ("#cloud-config\nusers: [bob]\npackages: []\n", "packages"),
            ("#cloud-config\nusers: [bob]\nmounts: []\n", "mounts"),
            ("#cloud-config\nusers: [default]\n", "default"),
            ("#cloud-config\nwrite_files: []\n", "users"),
            ("#!/bin/sh\necho hi\n", "#cloud-config"),
            ("#cloud-config\nusers: [{name: bob, passwd: x}]\n", "passwd"),
            (
                "#cloud-config\nusers: [bob]\nchpasswd: {expire: false}\n",
                "chpasswd",
            ),
            (
                "#cloud-config\nusers: [bob]\nwrite_files: [{path: /a, encoding: zstd, content: x}]\n",
                "zstd",
            ),
        ] {
            let err = plan(&seed(ud)).unwrap_err();
            assert!(err.0.contains(why), "{ud}: {err}");
        }
        let mut s = seed("#cloud-config\nusers: [bob]\n");
        s.meta_data.push_str("public-keys: [x]\n");
        assert!(plan(&s).is_err());
        s = seed("#cloud-config\nusers: [bob]\n");
        s.vendor_data = Some(b"#cloud-config\npackages: [x]\n".to_vec());
        assert!(plan(&s).is_err());
    }

    #[test]
    fn encodings_and_modes_decode() {
        use base64::Engine;
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(b"zipped\n").unwrap();
        let gz = base64::engine::general_purpose::STANDARD.encode(gz.finish().unwrap());
        let ud = format!(
            "#cloud-config\nusers: [bob]\nwrite_files:\n- {{path: /a, content: aGVsbG8=, encoding: b64, permissions: '0600'}}\n- {{path: /b, content: {gz}, encoding: gzip+base64, permissions: 0755, append: true, defer: true, owner: 'bob:bob'}}\n- {{path: /c}}\n"
        );
        let p = plan(&seed(&ud)).unwrap();
        assert_eq!(p.write_files[0].content, b"hello");
        assert_eq!(p.write_files[0].permissions, 0o600);
        assert_eq!(p.write_files[1].content, b"zipped\n");
        assert_eq!(p.write_files[1].permissions, 0o755);
        assert!(p.write_files[1].append && p.write_files[1].defer);
        assert_eq!(p.write_files[2].content, b"");
        assert_eq!(p.write_files[2].owner, "root:root");
    }

    #[test]
    fn hostname_order_and_commands() {
        let p = plan(&seed("#cloud-config\nusers: [bob]\n")).unwrap();
        assert_eq!(p.hostname, Some(("meta-host".into(), "meta-host".into())));
        let p = plan(&seed(
            "#cloud-config\nusers: [bob]\nhostname: web\nfqdn: web.example.org\n",
        ))
        .unwrap();
        assert_eq!(p.hostname, Some(("web".into(), "web.example.org".into())));
        let p = plan(&seed("#cloud-config\nusers: [bob]\npreserve_hostname: true\n")).unwrap();
        assert_eq!(p.hostname, None);
        assert!(plan(&seed("#cloud-config\nusers: [bob]\nhostname: 'a b'\n")).is_err());
        let p = plan(&seed(
            "#cloud-config\nusers: [bob]\nruncmd: [\"echo hi > /x\", [touch, \"it's\"]]\n",
        ))
        .unwrap();
        assert_eq!(p.runcmd[0].script_line(), "echo hi > /x");
        assert_eq!(p.runcmd[1].script_line(), r"'touch' 'it'\''s'");
    }

    #[test]
    fn bad_names_hand_over() {
        assert!(plan(&seed("#cloud-config\nusers: [{name: 'a:b'}]\n")).is_err());
        assert!(plan(&seed("#cloud-config\nusers: [{name: bob, groups: ['x y']}]\n")).is_err());
        assert!(plan(&seed("#cloud-config\nusers: [{name: bob, sudo: \"a\\nb\"}]\n")).is_err());
        assert!(plan(&seed("#cloud-config\nusers: [bob]\nwrite_files: [{path: rel}]\n")).is_err());
    }
}
