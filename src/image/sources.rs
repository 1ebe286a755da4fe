//! The package mirror, read from the host's own apt configuration: no mirror
//! host name is ever written in the recipe or the code.

use std::path::Path;

use super::error::ImageError;

/// One apt source as a `deb URI SUITE COMPONENTS` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
}

impl Source {
    pub fn line(&self) -> String {
        format!("deb {} {} {}", self.uri, self.suite, self.components.join(" "))
    }
}

/// The host's Debian release (`VERSION_CODENAME` in /etc/os-release).
pub fn host_suite() -> Result<String, ImageError> {
    let text = std::fs::read_to_string("/etc/os-release").map_err(|_| ImageError::UnknownRelease)?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .ok_or(ImageError::UnknownRelease)
}

/// Binary sources of the host for `suite` and its `-updates`/`-security`
/// companions, in the order apt lists them.
pub fn host_sources(etc_apt: &Path, suite: &str) -> Result<Vec<Source>, ImageError> {
    let mut all = Vec::new();
    let list = etc_apt.join("sources.list");
    if let Ok(text) = std::fs::read_to_string(&list) {
        all.extend(parse_one_line(&text));
    }
    let dir = etc_apt.join("sources.list.d");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    entries.sort();
    for path in entries {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => all.extend(parse_one_line(&text)),
            Some("sources") => all.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    let wanted = |s: &str| s == suite || s.strip_prefix(suite).is_some_and(|r| r.starts_with('-'));
    let mut out: Vec<Source> = Vec::new();
    for src in all.into_iter().filter(|s| wanted(&s.suite)) {
        if !out.contains(&src) {
            out.push(src);
        }
    }
    if out.iter().any(|s| s.suite == suite) {
        Ok(out)
    } else {
        Err(ImageError::NoSources {
            suite: suite.to_owned(),
        })
    }
}

fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or_else(|| line.strip_prefix("deb\t")) else {
            continue;
        };
        let mut rest = rest.trim_start();
        // `[signed-by=... arch=...]` options: the guest uses its own keyring.
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        let components: Vec<String> = words.map(str::to_owned).collect();
        if !components.is_empty() {
            out.push(Source {
                uri: uri.to_owned(),
                suite: suite.to_owned(),
                components,
            });
        }
    }
    out
}

fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(last) = fields.last_mut() {
                    last.1.push(' ');
                    last.1.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        if get("enabled").is_some_and(|v| v.eq_ignore_ascii_case("no")) {
            continue;
        }
        if !get("types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        let (Some(uris), Some(suites), Some(comps)) = (get("uris"), get("suites"), get("components")) else {
            continue;
        };
        let components: Vec<String> = comps.split_whitespace().map(str::to_owned).collect();
        for uri in uris.split_whitespace() {
            for suite in suites.split_whitespace() {
                out.push(Source {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                    components: components.clone(),
                });
            }
        }
    }
    out
}

/// apt options of the host that the build's apt must share: a proxy, and the
/// date checks a snapshot mirror needs turned off. From `apt-config dump`.
pub fn host_apt_options() -> Vec<String> {
    let Ok(out) = std::process::Command::new("apt-config").arg("dump").output() else {
        return Vec::new();
    };
    let keep = [
        "Acquire::http::Proxy ",
        "Acquire::https::Proxy ",
        "Acquire::Check-Valid-Until ",
        "Acquire::Check-Date ",
    ];
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| keep.iter().any(|k| l.starts_with(k)))
        .map(|l| l.trim_end_matches(';').to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_deb822_and_one_line_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb deb-src\n# comment\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/k.gpg\n\nTypes: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main contrib\n\nTypes: deb\nEnabled: no\nURIs: http://off.invalid/\nSuites: bookworm\nComponents: main\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("sources.list"),
            "deb [signed-by=/x.gpg] http://other.invalid/debian bookworm main # c\ndeb-src http://src.invalid bookworm main\ndeb http://old.invalid/debian bullseye main\n",
        )
        .unwrap();
        let got = host_sources(dir.path(), "bookworm").unwrap();
        let lines: Vec<String> = got.iter().map(Source::line).collect();
        assert_eq!(
            lines,
            [
                "deb http://other.invalid/debian bookworm main",
                "deb http://mirror.invalid/debian bookworm main",
                "deb http://mirror.invalid/debian bookworm-updates main",
                "deb http://mirror.invalid/debian-security bookworm-security main contrib",
            ]
        );
        assert!(matches!(
            host_sources(dir.path(), "trixie"),
            Err(ImageError::NoSources { .. })
        ));
    }
}
