//! The OpenAPI 3.1 document (utoipa's model, built from [`ROUTES`]) and the
//! `/docs` page. Swagger UI's assets would have to be downloaded at build time
//! (`utoipa-swagger-ui` fetches them) and there is no network here, so `/docs`
//! is a small self-contained page that loads `/api/v1/openapi.json` and lists
//! the operations.

use std::collections::BTreeMap;

use utoipa::openapi::path::{HttpMethod, OperationBuilder, PathItemBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApiBuilder, PathsBuilder, ResponseBuilder};
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::{ROUTES, Request};

fn describe(status: u16) -> &'static str {
    match status {
        200 => "OK (envelope with data)",
        201 => "Created",
        202 => "Accepted: work goes on in the background",
        400 => "Malformed body, unknown field",
        401 => "Missing, expired, revoked or invalid token, or wrong credentials",
        403 => "Wrong password; nothing was changed",
        404 => "Not found",
        409 => "Conflict (taken, exists, busy)",
        413 => "Body above 1 MiB",
        422 => "Validation failed (error.fields names each bad field)",
        429 => "Too many attempts; see Retry-After",
        503 => "No capacity, or a needed part is down",
        504 => "The guest did not come up in time",
        507 => "The host's disk has no room for it",
        _ => "See the envelope's message",
    }
}

fn method(m: &warp::http::Method) -> HttpMethod {
    match *m {
        warp::http::Method::POST => HttpMethod::Post,
        warp::http::Method::DELETE => HttpMethod::Delete,
        warp::http::Method::PUT => HttpMethod::Put,
        _ => HttpMethod::Get,
    }
}

pub fn build(version: &str) -> utoipa::openapi::OpenApi {
    let mut by_path: BTreeMap<&str, PathItemBuilder> = BTreeMap::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new()
            .summary(Some(r.summary))
            .operation_id(Some(format!(
                "{}{}",
                r.method.as_str().to_ascii_lowercase(),
                r.path.replace(['/', '.'], "_")
            )));
        for s in r.statuses {
            op = op.response(
                s.to_string(),
                ResponseBuilder::new().description(describe(*s)).build(),
            );
        }
        if r.path.contains("{id}") {
            op = op.parameter(
                utoipa::openapi::path::ParameterBuilder::new()
                    .name("id")
                    .parameter_in(utoipa::openapi::path::ParameterIn::Path)
                    .required(utoipa::openapi::Required::True)
                    .schema(Some(
                        utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::Type::Integer),
                    )),
            );
        }
        if r.auth {
            op = op.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        let item = by_path.remove(r.path).unwrap_or_default();
        by_path.insert(r.path, item.operation(method(&r.method), op.build()));
    }
    let mut paths = PathsBuilder::new();
    for (p, item) in by_path {
        paths = paths.path(p, item.build());
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("webhoster")
                .version(version)
                .description(Some(
                    "One API call, one isolated VM serving your website. Every response is \
                     {\"success\", \"message\", \"data\"}; errors add {\"error\": {\"code\"}}.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .security_scheme(
                    "bearer",
                    SecurityScheme::Http(
                        HttpBuilder::new()
                            .scheme(HttpAuthScheme::Bearer)
                            .bearer_format("JWT")
                            .build(),
                    ),
                )
                .build(),
        ))
        .build()
}

pub fn document(req: &Request<'_>) -> Response {
    let doc = build(req.state.config.version);
    let body = doc.to_json().unwrap_or_else(|_| "{}".into());
    let mut resp = Response::new(body.into());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

const DOCS: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>webhoster API</title>
<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
code{background:#f3f3f3;padding:0 .3em}.m{display:inline-block;width:4.5em;font-weight:bold}
li{margin:.4em 0}</style></head>
<body><h1>webhoster API</h1>
<p>OpenAPI document: <a href="/api/v1/openapi.json"><code>/api/v1/openapi.json</code></a>
(load it into any OpenAPI viewer). Authenticated operations take
<code>Authorization: Bearer &lt;token&gt;</code> from <code>POST /api/v1/auth/login</code>.</p>
<ul id="ops"><li>loading…</li></ul>
<script>
fetch('/api/v1/openapi.json').then(r => r.json()).then(doc => {
  const ul = document.getElementById('ops'); ul.innerHTML = '';
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [m, op] of Object.entries(item)) {
      const li = document.createElement('li');
      const codes = Object.keys(op.responses || {}).join(' ');
      li.innerHTML = '<span class="m"></span><code></code> <span></span> <small></small>';
      li.children[0].textContent = m.toUpperCase();
      li.children[1].textContent = path;
      li.children[2].textContent = (op.security ? '🔒 ' : '') + (op.summary || '');
      li.children[3].textContent = '(' + codes + ')';
      ul.appendChild(li);
    }
  }
});
</script></body></html>
"#;

pub fn docs_page() -> Response {
    let mut resp = Response::new(DOCS.into());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}
