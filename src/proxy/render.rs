//! Renders one complete generation of the config (main file, one site file
//! and one route file per site) from the handlebars templates in
//! `templates/nginx/`. Pure: it writes nothing and runs nothing.
//!
//! Every value is validated again here, whatever validated it before, and
//! the templates only ever receive integers, addresses and strings from
//! small character sets, so nothing can end a directive or open a block.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use handlebars::Handlebars;
use serde::Serialize;

use super::site::{self, Site};
use super::tls::Https;
use super::{ApiUpstream, ProxyError, SiteLimits};

/// What one generation is made of.
pub(crate) struct RenderInput<'a> {
    pub root: &'a Path,
    pub gen_dir: &'a Path,
    pub generation: u64,
    pub listen: SocketAddr,
    pub https: Option<&'a Https>,
    /// The certificate and key files' digest (set with `https`).
    pub tls_digest: Option<&'a str>,
    pub api: Option<&'a ApiUpstream>,
    pub site_domain: Option<&'a str>,
    pub docs_url: &'a str,
    pub limits: &'a SiteLimits,
    pub workers: Option<u32>,
    /// Open files each worker may have (at most the hard limit).
    pub max_files: u64,
    pub sites: &'a [Site],
}

/// Files relative to the generation directory, and their content.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rendered {
    pub files: Vec<(PathBuf, String)>,
}

static CONF: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    for (name, text) in [
        ("nginx.conf", include_str!("../../templates/nginx/nginx.conf.hbs")),
        ("site.conf", include_str!("../../templates/nginx/site.conf.hbs")),
        ("route.conf", include_str!("../../templates/nginx/route.conf.hbs")),
        ("proxy", include_str!("../../templates/nginx/proxy.conf.hbs")),
        ("api", include_str!("../../templates/nginx/api.conf.hbs")),
        ("web", include_str!("../../templates/nginx/web.conf.hbs")),
        ("headers", include_str!("../../templates/nginx/headers.conf.hbs")),
        (
            "isolation",
            include_str!("../../templates/nginx/isolation.conf.hbs"),
        ),
        (
            "unavailable",
            include_str!("../../templates/nginx/unavailable.conf.hbs"),
        ),
    ] {
        hb.register_template_string(name, text)
            .expect("the embedded nginx templates parse");
    }
    hb
});

static HTML: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    for (name, text) in [
        ("landing", include_str!("../../templates/nginx/landing.html.hbs")),
        (
            "unavailable",
            include_str!("../../templates/nginx/unavailable.html.hbs"),
        ),
        (
            "not-found",
            include_str!("../../templates/nginx/not-found.html.hbs"),
        ),
    ] {
        hb.register_template_string(name, text)
            .expect("the embedded page templates parse");
    }
    hb
});

#[derive(Serialize)]
struct Common<'a> {
    root: String,
    gen_dir: String,
    generation: u64,
    listen: String,
    https: Option<HttpsData>,
    api: Option<ApiData>,
    domain: Option<&'a str>,
    workers: String,
    max_files: u64,
    worker_connections: u64,
    rate: u32,
    burst: u32,
    body_max_mib: u32,
    landing_page: String,
    unavailable_page: String,
    not_found_page: String,
}

#[derive(Serialize)]
struct HttpsData {
    listen: String,
    cert: String,
    key: String,
    digest: String,
}

#[derive(Serialize)]
struct ApiData {
    addr: String,
    read_timeout: u64,
}

#[derive(Serialize)]
struct SiteData<'a> {
    #[serde(flatten)]
    common: &'a Common<'a>,
    site: &'a Site,
    meta: String,
    prefix: String,
}

pub(crate) fn render(input: &RenderInput<'_>) -> Result<Rendered, ProxyError> {
    if let Some(domain) = input.site_domain {
        site::validate_domain(domain)?;
    }
    site::validate_docs_url(input.docs_url)?;
    input.limits.validate()?;
    if let Some(https) = input.https {
        https.validate()?;
        if !input
            .tls_digest
            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ProxyError::Invalid {
                field: "tls_digest",
                reason: "HTTPS needs the hex digest of its files".into(),
            });
        }
        if https.listen == input.listen {
            return Err(ProxyError::Invalid {
                field: "https_listen",
                reason: format!("{} is the HTTP address too", https.listen),
            });
        }
    }
    if let Some(api) = input.api {
        api.validate()?;
    }
    if input.workers == Some(0) {
        return Err(ProxyError::Invalid {
            field: "workers",
            reason: "0 worker processes".into(),
        });
    }
    let mut seen_ids = std::collections::BTreeSet::new();
    let mut seen_names = std::collections::BTreeSet::new();
    for s in input.sites {
        s.validate()?;
        if !seen_ids.insert(s.user_id) {
            return Err(ProxyError::Invalid {
                field: "user_id",
                reason: format!("{} has two sites", s.user_id),
            });
        }
        if !seen_names.insert(s.username.as_str()) {
            return Err(ProxyError::Invalid {
                field: "username",
                reason: format!("{:?} has two sites", s.username),
            });
        }
    }

    let page = |name: &'static str| -> Result<String, ProxyError> {
        let html = HTML
            .render(name, &serde_json::json!({ "docs_url": input.docs_url }))
            .map_err(|e| ProxyError::Render(name, e))?;
        nginx_string_body(name, &html)
    };
    let common = Common {
        root: input.root.display().to_string(),
        gen_dir: input.gen_dir.display().to_string(),
        generation: input.generation,
        listen: input.listen.to_string(),
        https: input.https.map(|h| HttpsData {
            listen: h.listen.to_string(),
            cert: h.cert.display().to_string(),
            key: h.key.display().to_string(),
            digest: input.tls_digest.unwrap_or_default().to_owned(),
        }),
        api: input.api.map(|a| ApiData {
            addr: a.addr.to_string(),
            read_timeout: a.read_timeout.as_secs().max(1),
        }),
        domain: input.site_domain,
        workers: input.workers.map_or("auto".to_string(), |w| w.to_string()),
        max_files: input.max_files,
        worker_connections: (input.max_files / 2).clamp(256, 16384),
        rate: input.limits.rate_per_sec,
        burst: input.limits.burst,
        body_max_mib: input.limits.body_max_mib,
        landing_page: page("landing")?,
        unavailable_page: page("unavailable")?,
        not_found_page: page("not-found")?,
    };

    let mut files = vec![(
        PathBuf::from("nginx.conf"),
        CONF.render("nginx.conf", &common)
            .map_err(|e| ProxyError::Render("nginx.conf", e))?,
    )];
    for s in input.sites {
        let data = SiteData {
            common: &common,
            site: s,
            meta: site::encode_meta(s),
            prefix: format!("/{}", s.user_id),
        };
        let id = s.user_id;
        files.push((
            PathBuf::from(format!("sites/{id}.conf")),
            CONF.render("site.conf", &data)
                .map_err(|e| ProxyError::Render("site.conf", e))?,
        ));
        files.push((
            PathBuf::from(format!("routes/{id}.conf")),
            CONF.render("route.conf", &data)
                .map_err(|e| ProxyError::Render("route.conf", e))?,
        ));
    }
    Ok(Rendered { files })
}

/// The body of a `return 200 '...'`: `$` would start a variable and has no
/// escape there, so it is refused; quotes and backslashes are escaped.
fn nginx_string_body(name: &'static str, text: &str) -> Result<String, ProxyError> {
    if text.contains('$') {
        return Err(ProxyError::Invalid {
            field: "page",
            reason: format!("the {name} page contains '$', which nginx would expand"),
        });
    }
    Ok(text.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(sites: &'a [Site], limits: &'a SiteLimits, domain: Option<&'a str>) -> RenderInput<'a> {
        RenderInput {
            root: Path::new("/state/nginx"),
            gen_dir: Path::new("/state/nginx/gen-0000000007"),
            generation: 7,
            listen: "0.0.0.0:80".parse().unwrap(),
            https: None,
            tls_digest: None,
            api: None,
            site_domain: domain,
            docs_url: "http://127.0.0.1:8000/docs?a=1&b=2",
            limits,
            workers: None,
            max_files: 20000,
            sites,
        }
    }

    fn site(user_id: i64, username: &str) -> Site {
        Site {
            user_id,
            username: username.into(),
            upstream: "10.83.0.2:80".parse().unwrap(),
        }
    }

    fn file<'a>(r: &'a Rendered, name: &str) -> &'a str {
        &r.files.iter().find(|(p, _)| p == Path::new(name)).unwrap().1
    }

    #[test]
    fn main_config_has_generation_pages_and_includes() {
        let limits = SiteLimits::default();
        let r = render(&input(&[], &limits, None)).unwrap();
        assert_eq!(r.files.len(), 1);
        let main = file(&r, "nginx.conf");
        assert!(main.contains("pid /state/nginx/run/nginx.pid;"));
        assert!(main.contains("listen unix:/state/nginx/run/control.sock;"));
        assert!(main.contains("return 200 '7';"));
        assert!(main.contains("include /state/nginx/gen-0000000007/sites/*.conf;"));
        assert!(main.contains("include /state/nginx/gen-0000000007/routes/*.conf;"));
        assert!(main.contains("listen 0.0.0.0:80 default_server;"));
        // The docs link is HTML-escaped inside the nginx string.
        assert!(
            main.contains("href=\"http://127.0.0.1:8000/docs?a&#x3D;1&amp;b&#x3D;2\""),
            "{main}"
        );
        assert!(main.contains("starting or stopped"));
        assert!(main.contains("limit_req_zone"));
        assert!(!main.contains("{{"));
    }

    #[test]
    fn site_and_route_files_match_exactly() {
        let limits = SiteLimits::default();
        let sites = [site(1, "alice"), site(10, "bob")];
        let r = render(&input(&sites, &limits, None)).unwrap();
        assert_eq!(r.files.len(), 5);
        let route = file(&r, "routes/1.conf");
        assert!(route.contains("location = /1 {"));
        assert!(route.contains("location ^~ /1/ {"));
        assert!(route.contains("return 301 /1/$is_args$args;"));
        assert!(route.contains("proxy_pass http://webhoster_site_1/;"));
        assert!(route.contains("X-Forwarded-Prefix \"/1\""));
        assert!(route.contains("syslog:server=unix:/state/nginx/run/log.sock,tag=site_1,"));
        // Path mode: an opaque origin per document, and nothing of the
        // guest's that reaches past its own responses.
        assert!(route.contains(
            "add_header Content-Security-Policy \"sandbox allow-scripts allow-forms allow-popups \
             allow-popups-to-escape-sandbox allow-modals allow-downloads; frame-ancestors 'none'\" always;"
        ));
        let directives: String = route
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(!directives.contains("allow-same-origin"));
        assert!(route.contains("add_header X-Frame-Options \"DENY\" always;"));
        assert!(route.contains("add_header X-Content-Type-Options \"nosniff\" always;"));
        for hidden in [
            "Set-Cookie",
            "Service-Worker-Allowed",
            "X-Accel-Redirect",
            "Clear-Site-Data",
        ] {
            assert!(
                route.contains(&format!("proxy_hide_header {hidden};")),
                "{hidden}"
            );
        }
        assert!(route.contains("proxy_ignore_headers X-Accel-Redirect X-Accel-Expires"));
        assert!(route.contains("proxy_set_header Cookie \"\";"));
        assert!(!route.contains("proxy_cookie_path"));
        let site_file = file(&r, "sites/10.conf");
        assert_eq!(site::decode_meta(site_file).unwrap(), sites[1]);
        assert!(site_file.contains("server 10.83.0.2:80;"));
        assert!(!site_file.contains("server_name"));
    }

    #[test]
    fn site_domain_adds_a_virtual_host() {
        let limits = SiteLimits::default();
        let sites = [site(1, "alice")];
        let r = render(&input(&sites, &limits, Some("example.test"))).unwrap();
        let site_file = file(&r, "sites/1.conf");
        assert!(site_file.contains("server_name alice.example.test;"));
        assert!(site_file.contains("X-Forwarded-Prefix \"\""));
        // Its own origin: no sandbox, cookies kept but pinned to its name.
        assert!(!site_file.contains("Content-Security-Policy"));
        assert!(!site_file.contains("proxy_hide_header Set-Cookie"));
        assert!(site_file.contains("proxy_cookie_domain ~.+ alice.example.test;"));
        assert!(site_file.contains("proxy_ignore_headers X-Accel-Redirect"));
        assert!(site_file.contains("add_header X-Frame-Options \"SAMEORIGIN\" always;"));
    }

    #[test]
    fn https_and_the_api_join_the_front() {
        let limits = SiteLimits::default();
        let sites = [site(1, "alice")];
        let https = Https {
            listen: "0.0.0.0:443".parse().unwrap(),
            cert: "/etc/webhoster/cert.pem".into(),
            key: "/etc/webhoster/key.pem".into(),
        };
        let api = ApiUpstream {
            addr: "127.0.0.1:8000".parse().unwrap(),
            read_timeout: std::time::Duration::from_secs(660),
        };
        let mut i = input(&sites, &limits, Some("example.test"));
        i.https = Some(&https);
        i.api = Some(&api);
        assert!(render(&i).is_err(), "HTTPS without the files' digest");
        i.tls_digest = Some("00ff");
        let r = render(&i).unwrap();
        let main = file(&r, "nginx.conf");
        assert!(main.contains("listen 0.0.0.0:80 default_server;"));
        assert!(main.contains("listen 0.0.0.0:443 ssl default_server;"));
        assert!(main.contains("ssl_certificate /etc/webhoster/cert.pem;"));
        assert!(main.contains("ssl_certificate_key /etc/webhoster/key.pem;"));
        assert!(main.contains("ssl_protocols TLSv1.2 TLSv1.3;"));
        assert!(main.contains("sha256 00ff"));
        assert!(main.contains("ssl_session_cache shared:webhoster_tls:10m;"));
        assert!(main.contains("location ^~ /api/ {"));
        assert!(main.contains("location = /docs {"));
        assert!(main.contains("location ^~ /docs/ {"));
        assert!(main.contains("proxy_pass http://127.0.0.1:8000;"));
        assert!(main.contains("proxy_read_timeout 660s;"));
        // With the service, `/` and the web pages are its, not the landing page.
        assert!(main.contains("location ~ ^/(signup|login|logout|dashboard|settings|lang|assets)(/|$) {"));
        assert!(main.contains("proxy_set_header Host $http_host;"));
        assert!(main.contains("add_header X-Frame-Options \"DENY\" always;"));
        assert!(
            !main.contains("Each site hosted here"),
            "no landing page with the service"
        );
        let directives: String = main
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect();
        assert!(!directives.contains("Strict-Transport-Security"));
        let site_file = file(&r, "sites/1.conf");
        assert!(site_file.contains("listen 0.0.0.0:443 ssl;"));
        assert!(site_file.contains("proxy_redirect http://$host/ /;"));
        // Without them, nothing of either.
        let plain = render(&input(&sites, &limits, Some("example.test"))).unwrap();
        assert!(!file(&plain, "nginx.conf").contains("ssl"));
        assert!(!file(&plain, "nginx.conf").contains("/api/"));
        assert!(!file(&plain, "nginx.conf").contains("dashboard"));
        assert!(file(&plain, "nginx.conf").contains("Each site hosted here"));
        assert!(!file(&plain, "sites/1.conf").contains("ssl"));

        let same_port = Https {
            listen: "0.0.0.0:80".parse().unwrap(),
            ..https.clone()
        };
        i.https = Some(&same_port);
        assert!(render(&i).is_err());
        let bad_api = ApiUpstream {
            addr: "0.0.0.0:8000".parse().unwrap(),
            ..api
        };
        i.https = None;
        i.api = Some(&bad_api);
        assert!(render(&i).is_err());
    }

    #[test]
    fn rate_limit_can_be_off() {
        let limits = SiteLimits {
            rate_per_sec: 0,
            ..SiteLimits::default()
        };
        let sites = [site(1, "alice")];
        let r = render(&input(&sites, &limits, None)).unwrap();
        assert!(!file(&r, "nginx.conf").contains("limit_req"));
        assert!(!file(&r, "routes/1.conf").contains("limit_req"));
    }

    #[test]
    fn everything_is_validated_again() {
        let limits = SiteLimits::default();
        assert!(render(&input(&[site(0, "alice")], &limits, None)).is_err());
        assert!(render(&input(&[site(1, "a;b")], &limits, None)).is_err());
        assert!(render(&input(&[site(1, "alice"), site(1, "bob")], &limits, None)).is_err());
        assert!(render(&input(&[site(1, "alice"), site(2, "alice")], &limits, None)).is_err());
        assert!(render(&input(&[], &limits, Some("bad domain"))).is_err());
        let mut i = input(&[], &limits, None);
        i.docs_url = "http://x/$host";
        assert!(render(&i).is_err());
    }

    #[test]
    fn page_bodies_are_quoted_for_nginx() {
        assert_eq!(nginx_string_body("t", r"it's \o/").unwrap(), r"it\'s \\o/");
        assert!(nginx_string_body("t", "$host").is_err());
    }
}
