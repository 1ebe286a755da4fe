//! The OpenAPI 3.1 document and the `/docs` explorer.
//!
//! The document is built from [`ROUTES`]: each route names its body, its
//! parameters and the type of its answer's `data`, and the schemas come from
//! those types' `ToSchema` derives, so the contract is the code. Every JSON
//! answer is the envelope `{"success", "message", "data"}`; errors carry
//! `error.code`, one of [`ERROR_CODES`]: each failure status lists its own.
//!
//! `/docs` is Swagger UI, its files vendored into the binary at build time
//! (`utoipa-swagger-ui`, feature `vendored`): nothing is downloaded at build
//! or run time. Its Authorize button logs in through the OAuth2 password flow
//! on `POST /api/v1/auth/login`.
//! This module only describes and serves files; it never handles a route.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use utoipa::ToSchema;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{
    Flow, HttpAuthScheme, HttpBuilder, OAuth2, Password, Scopes, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, Object, OpenApiBuilder, PathsBuilder, Ref, RefOr,
    Required, ResponseBuilder,
};
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::error::{ApiError, ERROR_CODES, codes_of};
use super::{ROUTES, Request, RouteDef};

/// Where the token comes from: the OAuth2 password flow's `tokenUrl`.
pub const TOKEN_URL: &str = "/api/v1/auth/login";
const DOCUMENT_URL: &str = "/api/v1/openapi.json";

/// Named schemas gathered while the document is built.
pub type Components = Vec<(String, RefOr<Schema>)>;
/// A schema of a route's table entry; registers what it refers to.
pub type SchemaFn = fn(&mut Components) -> RefOr<Schema>;

/// `T`, registered under its name, referred to.
pub fn named<T: ToSchema>(c: &mut Components) -> RefOr<Schema> {
    T::schemas(c);
    let name = T::name();
    c.push((name.to_string(), T::schema()));
    RefOr::Ref(Ref::from_schema_name(name))
}

/// An array of `T`.
pub fn list<T: ToSchema>(c: &mut Components) -> RefOr<Schema> {
    ArrayBuilder::new().items(named::<T>(c)).build().into()
}

/// `data: null` (a delete, for example).
pub fn nothing(_: &mut Components) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Null).build().into()
}

/// Any JSON object (the OpenAPI document itself).
pub fn any_object(_: &mut Components) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::Object).build().into()
}

/// A text body (HTML, CSS, JavaScript, metrics).
pub fn text(_: &mut Components) -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(Type::String).build().into()
}

/// A string that is one of `values`.
pub fn string_enum<'a>(values: impl IntoIterator<Item = &'a str>, description: &str) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values.into_iter().map(str::to_owned)))
        .description(Some(description))
        .build()
}

/// `schema` or `null`.
pub fn nullable(schema: Object) -> Object {
    let mut schema = schema;
    schema.schema_type = utoipa::openapi::schema::SchemaType::from_iter([Type::String, Type::Null]);
    if let Some(values) = schema.enum_values.as_mut() {
        values.push(serde_json::Value::Null);
    }
    schema
}

/// A route's request body.
#[derive(Clone, Copy)]
pub enum Body {
    /// A JSON body that must be there.
    Json(SchemaFn),
    /// A JSON body that may be left out (or empty).
    OptionalJson(SchemaFn),
    /// The same fields as a form or as JSON (OAuth2 clients post forms).
    FormOrJson(SchemaFn),
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
}

/// A path or query parameter.
pub struct Param {
    pub name: &'static str,
    pub place: In,
    pub description: &'static str,
    pub schema: fn() -> Object,
}

/// `{id}` of a backup.
pub const BACKUP_ID: Param = Param {
    name: "id",
    place: In::Path,
    description: "The backup's id, from GET /api/v1/host/my/backups",
    schema: || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .build()
    },
};

/// `?wait=` of a create.
pub const WAIT: Param = Param {
    name: "wait",
    place: In::Query,
    description: "true (default): answer 201 when the site is up; false: answer 202 at once \
                  and show progress in GET /api/v1/host/my",
    schema: || {
        ObjectBuilder::new()
            .schema_type(Type::Boolean)
            .default(Some(serde_json::Value::Bool(true)))
            .build()
    },
};

/// `?lines=` of the console.
pub const LINES: Param = Param {
    name: "lines",
    place: In::Query,
    description: "How many of the last lines (default 100)",
    schema: || {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1))
            .maximum(Some(1000))
            .default(Some(100.into()))
            .build()
    },
};

/// `{id}` of an SSH key.
pub const SSH_KEY_ID: Param = Param {
    name: "id",
    place: In::Path,
    description: "The key's id, from GET /api/v1/account/ssh-keys",
    schema: BACKUP_ID.schema,
};

/// `{file}` of a `/docs` asset.
pub const DOCS_FILE: Param = Param {
    name: "file",
    place: In::Path,
    description: "A file of Swagger UI",
    schema: || ObjectBuilder::new().schema_type(Type::String).build(),
};

/// An OpenAPI link: a value of a success answer that fills a parameter of
/// another operation (clients and schemathesis' stateful phase follow it).
pub struct Link {
    pub name: &'static str,
    pub method: warp::http::Method,
    pub path: &'static str,
    pub parameter: &'static str,
    /// A runtime expression, e.g. `$response.body#/data/id`.
    pub value: &'static str,
}

/// The backup a POST made, restored or deleted by its id.
pub const BACKUP_LINKS: &[Link] = &[
    Link {
        name: "restore",
        method: warp::http::Method::POST,
        path: "/api/v1/host/my/backups/{id}/restore",
        parameter: "id",
        value: "$response.body#/data/id",
    },
    Link {
        name: "delete",
        method: warp::http::Method::DELETE,
        path: "/api/v1/host/my/backups/{id}",
        parameter: "id",
        value: "$response.body#/data/id",
    },
];

/// A new SSH key, removed by its id.
pub const SSH_KEY_LINKS: &[Link] = &[Link {
    name: "remove",
    method: warp::http::Method::DELETE,
    path: "/api/v1/account/ssh-keys/{id}",
    parameter: "id",
    value: "$response.body#/data/id",
}];

/// The operation id of a route: its method and path.
pub fn operation_id(method: &warp::http::Method, path: &str) -> String {
    format!(
        "{}{}",
        method.as_str().to_ascii_lowercase(),
        path.replace(['/', '.', '{', '}'], "_")
    )
}

/// What a route answers on success.
#[derive(Clone, Copy)]
pub enum Answer {
    /// The envelope, its `data` of this schema; errors get the error envelope.
    Data(SchemaFn),
    /// Like `Data`, but every documented status carries `data` (a failed
    /// health check still reports the checks); failures add `error.code`.
    DataOnEveryStatus(SchemaFn),
    /// The token per RFC 6749 §5.1 at the top level, the envelope beside it.
    Token,
    /// Not JSON in the envelope: a body of one of these media types.
    Raw(&'static [&'static str], SchemaFn),
}

fn method(m: &warp::http::Method) -> HttpMethod {
    match *m {
        warp::http::Method::POST => HttpMethod::Post,
        warp::http::Method::DELETE => HttpMethod::Delete,
        warp::http::Method::PUT => HttpMethod::Put,
        warp::http::Method::PATCH => HttpMethod::Patch,
        _ => HttpMethod::Get,
    }
}

fn describe(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted: the work goes on in the background",
        400 => "Malformed body or unknown field",
        401 => "Missing, expired, revoked or invalid token, or wrong credentials",
        403 => "Wrong password; nothing was changed",
        404 => "Not found",
        405 => "Method not allowed",
        409 => "Conflict (taken, exists, busy)",
        413 => "Body above 1 MiB",
        415 => "Unsupported media type",
        422 => "Validation failed (error.fields names each bad field)",
        429 => "Too many attempts; see Retry-After",
        500 => "Internal error",
        503 => "No capacity, or a needed part is down",
        504 => "The guest did not come up in time",
        507 => "The host's disk has no room for it",
        _ => "See the envelope's message",
    }
}

/// The envelope around `data`.
fn envelope(data: RefOr<Schema>, with_error: bool) -> Object {
    let mut b = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("success", ObjectBuilder::new().schema_type(Type::Boolean))
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .property("data", data)
        .required("success")
        .required("message")
        .required("data");
    if with_error {
        b = b.property("error", RefOr::Ref(Ref::from_schema_name("ErrorBody")));
    }
    b.build()
}

/// `{"code": one of codes, "fields"?: [each bad field]}`.
fn error_body<'a>(codes: impl IntoIterator<Item = &'a str>, c: &mut Components) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "code",
            string_enum(codes, "Stable, machine-readable; the message is for people"),
        )
        .property(
            "fields",
            ArrayBuilder::new()
                .items(named::<crate::account::FieldError>(c))
                .description(Some(
                    "With validation_failed: each bad field and what is wrong with it",
                )),
        )
        .required("code")
        .build()
}

/// The answer of a failure whose `error` is `error_body`.
fn error_envelope(error_body: RefOr<Schema>) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "success",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([false])),
        )
        .property("message", ObjectBuilder::new().schema_type(Type::String))
        .property("data", ObjectBuilder::new().schema_type(Type::Null))
        .property("error", error_body)
        .required("success")
        .required("message")
        .required("data")
        .required("error")
        .build()
}

/// The error envelope of `status`, registered as `Error<status>`, its
/// codes those that come with `status`.
fn error_of(status: u16, c: &mut Components) -> RefOr<Schema> {
    let name = format!("Error{status}");
    if !c.iter().any(|(n, _)| *n == name) {
        let body = error_body(codes_of(status), c);
        c.push((name.clone(), error_envelope(body.into()).into()));
    }
    RefOr::Ref(Ref::from_schema_name(name))
}

/// Log-in's answer: the token's fields (RFC 6749 §5.1) beside the envelope.
fn token_answer(c: &mut Components) -> Schema {
    let token = named::<super::dto::TokenData>(c);
    utoipa::openapi::schema::AllOfBuilder::new()
        .item(token.clone())
        .item(envelope(token, false))
        .build()
        .into()
}

fn json_content(schema: impl Into<RefOr<Schema>>) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(schema)).build()
}

/// The group Swagger UI lists the route under.
fn tag(path: &str) -> &'static str {
    if path.starts_with("/api/v1/auth") {
        "auth"
    } else if path.starts_with("/api/v1/host/my/backups") {
        "backups"
    } else if path.starts_with("/api/v1/host") {
        "hosting"
    } else {
        "service"
    }
}

/// The operation of one route.
fn operation(r: &RouteDef, c: &mut Components) -> utoipa::openapi::path::Operation {
    let mut op = OperationBuilder::new()
        .summary(Some(r.summary))
        .tag(tag(r.path))
        .operation_id(Some(operation_id(&r.method, r.path)));
    for p in r.params {
        op = op.parameter(
            ParameterBuilder::new()
                .name(p.name)
                .parameter_in(match p.place {
                    In::Path => ParameterIn::Path,
                    In::Query => ParameterIn::Query,
                })
                .required(if p.place == In::Path {
                    Required::True
                } else {
                    Required::False
                })
                .description(Some(p.description))
                .schema(Some((p.schema)())),
        );
    }
    if let Some(body) = r.body {
        let (schema, required, form) = match body {
            Body::Json(f) => (f(c), true, false),
            Body::OptionalJson(f) => (f(c), false, false),
            Body::FormOrJson(f) => (f(c), true, true),
        };
        let mut b =
            RequestBodyBuilder::new().required(Some(if required { Required::True } else { Required::False }));
        if form {
            // First: Swagger UI's "Try it out" and OAuth2 clients post forms.
            b = b.content("application/x-www-form-urlencoded", json_content(schema.clone()));
        }
        b = b.content("application/json", json_content(schema));
        op = op.request_body(Some(b.build()));
    }
    for &status in r.statuses {
        let mut resp = ResponseBuilder::new().description(describe(status));
        let failure = status >= 400;
        resp = match r.answer {
            Answer::Data(f) if !failure => {
                resp.content("application/json", json_content(envelope(f(c), false)))
            }
            Answer::DataOnEveryStatus(f) => {
                resp.content("application/json", json_content(envelope(f(c), failure)))
            }
            Answer::Token if !failure => resp.content("application/json", json_content(token_answer(c))),
            Answer::Raw(types, f) if !failure => {
                let schema = f(c);
                types
                    .iter()
                    .fold(resp, |resp, t| resp.content(*t, json_content(schema.clone())))
            }
            _ => resp.content("application/json", json_content(error_of(status, c))),
        };
        if !failure {
            for l in r.links {
                resp = resp.link(
                    l.name,
                    utoipa::openapi::link::LinkBuilder::new()
                        .operation_id(operation_id(&l.method, l.path))
                        .parameter(l.parameter, l.value)
                        .build(),
                );
            }
        }
        if status == 429 {
            resp = resp.header(
                "Retry-After",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::Integer))
                    .description(Some("Seconds to wait before trying again"))
                    .build(),
            );
        }
        if status == 401 {
            resp = resp.header(
                "WWW-Authenticate",
                utoipa::openapi::HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("Bearer"))
                    .build(),
            );
        }
        op = op.response(status.to_string(), resp.build());
    }
    if r.auth {
        // Either scheme: both make Swagger UI send `Authorization: Bearer`.
        op = op
            .security(SecurityRequirement::new("oauth2", Vec::<String>::new()))
            .security(SecurityRequirement::new("bearer", Vec::<String>::new()));
    }
    op.build()
}

pub fn build(version: &str) -> utoipa::openapi::OpenApi {
    let mut components = Components::new();
    let mut by_path: BTreeMap<&str, PathItemBuilder> = BTreeMap::new();
    for r in ROUTES {
        let op = operation(r, &mut components);
        let item = by_path.remove(r.path).unwrap_or_default();
        by_path.insert(r.path, item.operation(method(&r.method), op));
    }
    let mut paths = PathsBuilder::new();
    for (p, item) in by_path {
        paths = paths.path(p, item.build());
    }
    let all_codes = error_body(ERROR_CODES.iter().map(|(c, _)| *c), &mut components);
    let mut schemas: BTreeMap<String, RefOr<Schema>> = components.into_iter().collect();
    // Every code, for the failures any route may meet (404, 405, 413).
    schemas.insert("ErrorBody".into(), all_codes.into());
    schemas.insert(
        "Error".into(),
        error_envelope(RefOr::Ref(Ref::from_schema_name("ErrorBody"))).into(),
    );
    let tags = [
        ("auth", "Accounts and tokens"),
        ("hosting", "The account's hosting (one VM)"),
        ("backups", "Backups of the hosting's disk"),
        ("service", "Health, version, metrics and this documentation"),
    ]
    .map(|(name, d)| TagBuilder::new().name(name).description(Some(d)).build());
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("webhoster")
                .version(version)
                .description(Some(
                    "One API call, one isolated VM serving your website. Every JSON answer is \
                     {\"success\", \"message\", \"data\"}; failures add {\"error\": {\"code\"}} \
                     (schema `Error`). Authorize with POST /api/v1/auth/login (OAuth2 password \
                     flow) and send `Authorization: Bearer <access_token>`.",
                ))
                .build(),
        )
        .paths(paths.build())
        .tags(Some(tags))
        .components(Some(
            ComponentsBuilder::new()
                .schemas_from_iter(schemas)
                .security_scheme(
                    "oauth2",
                    SecurityScheme::OAuth2(OAuth2::with_description(
                        [Flow::Password(Password::new(TOKEN_URL, Scopes::new()))],
                        "Username (or email) and password; client id and secret are not used",
                    )),
                )
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

/// The document as JSON.
pub fn to_json(version: &str) -> String {
    let mut doc = match serde_json::to_value(build(version)) {
        Ok(doc) => doc,
        Err(e) => {
            tracing::error!(error = %e, "the OpenAPI document does not serialize");
            return "{}".into();
        }
    };
    // utoipa 5.5 writes a Link's `operationId` as `operation_id`; OpenAPI
    // (and every client that follows links) reads only the camel case.
    if let Some(paths) = doc["paths"].as_object_mut() {
        for op in paths
            .values_mut()
            .filter_map(|i| i.as_object_mut())
            .flat_map(|i| i.values_mut())
        {
            let Some(responses) = op["responses"].as_object_mut() else {
                continue;
            };
            for link in responses
                .values_mut()
                .filter_map(|r| r.get_mut("links").and_then(|l| l.as_object_mut()))
                .flat_map(|l| l.values_mut())
                .filter_map(|l| l.as_object_mut())
            {
                if let Some(id) = link.remove("operation_id") {
                    link.insert("operationId".into(), id);
                }
            }
        }
    }
    doc.to_string()
}

/// The document as JSON, built once per version (it never changes at run time).
fn document_json(version: &str) -> Arc<String> {
    static DOC: OnceLock<(String, Arc<String>)> = OnceLock::new();
    let (v, json) = DOC.get_or_init(|| (version.to_owned(), Arc::new(to_json(version))));
    if v == version {
        json.clone()
    } else {
        Arc::new(to_json(version))
    }
}

pub fn document(req: &Request<'_>) -> Response {
    let body = document_json(req.state.config.version);
    let mut resp = Response::new(body.as_str().to_owned().into());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `/docs`: Swagger UI's page with the files under `/docs/`, and a link to
/// the document for a browser without JavaScript.
const DOCS_PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>webhoster API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="stylesheet" href="/docs/index.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
<noscript><p>The API explorer needs JavaScript. The OpenAPI document is at
<a href="/api/v1/openapi.json">/api/v1/openapi.json</a>.</p></noscript>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js" charset="utf-8"></script>
<script src="/docs/swagger-ui-standalone-preset.js" charset="utf-8"></script>
<script src="/docs/swagger-initializer.js" charset="utf-8"></script>
</body>
</html>
"#;

pub fn docs_page() -> Response {
    let mut resp = Response::new(DOCS_PAGE.into());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// What Swagger UI is told: where the document is, and to keep the token
/// across reloads of the page.
fn swagger_config() -> Arc<utoipa_swagger_ui::Config<'static>> {
    static CONFIG: OnceLock<Arc<utoipa_swagger_ui::Config<'static>>> = OnceLock::new();
    CONFIG
        .get_or_init(|| Arc::new(utoipa_swagger_ui::Config::new([DOCUMENT_URL]).persist_authorization(true)))
        .clone()
}

/// The media types `/docs/{file}` answers with.
pub const DOCS_TYPES: &[&str] = &[
    "text/html",
    "text/css",
    "text/javascript",
    "application/javascript",
    "application/json",
    "image/png",
];

/// `/docs/{file}`: one of Swagger UI's vendored files.
pub fn docs_file(path: &str) -> Result<Response, ApiError> {
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no file {path}"));
    let name = path.strip_prefix("/docs/").ok_or_else(not_found)?;
    // The source maps would only weigh on the answer; the page never asks.
    if name.ends_with(".map") {
        return Err(not_found());
    }
    let file = utoipa_swagger_ui::serve(name, swagger_config())
        .map_err(|e| ApiError::internal(&*e))?
        .ok_or_else(not_found)?;
    let mut resp = Response::new(file.bytes.into_owned().into());
    let content_type = HeaderValue::from_str(&file.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(header::CONTENT_TYPE, content_type);
    // Built into the binary: the same version never changes.
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(resp: Response) -> Vec<u8> {
        use http_body_util::BodyExt;
        let collected = futures::executor::block_on(resp.into_body().collect()).unwrap();
        collected.to_bytes().to_vec()
    }

    fn doc() -> serde_json::Value {
        serde_json::from_str(&to_json("test")).unwrap()
    }

    /// JSON pointer escaping of one path segment.
    fn esc(s: &str) -> String {
        s.replace('~', "~0").replace('/', "~1")
    }

    /// Checks `instance` against the schema at `pointer` of `doc`.
    fn validate(doc: &serde_json::Value, pointer: &str, instance: &serde_json::Value) -> Result<(), String> {
        let mut schemas = boon::Schemas::new();
        let mut compiler = boon::Compiler::new();
        compiler
            .add_resource("urn:doc", doc.clone())
            .map_err(|e| e.to_string())?;
        let id = compiler
            .compile(&format!("urn:doc#{pointer}"), &mut schemas)
            .map_err(|e| format!("{e:#}"))?;
        schemas.validate(instance, id).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn every_route_has_its_schemas() {
        let doc = doc();
        for r in ROUTES {
            let m = r.method.as_str().to_ascii_lowercase();
            let op = &doc["paths"][r.path][&m];
            assert!(op.is_object(), "{m} {} missing", r.path);
            for s in r.statuses {
                let content = &op["responses"][s.to_string()]["content"];
                let schemas: Vec<_> = content
                    .as_object()
                    .unwrap_or_else(|| panic!("{m} {} {s}: no content", r.path))
                    .values()
                    .map(|c| &c["schema"])
                    .collect();
                assert!(
                    !schemas.is_empty() && schemas.iter().all(|s| s.is_object()),
                    "{m} {} {s}: no schema",
                    r.path
                );
            }
            if r.auth {
                assert!(op["security"].is_array(), "{m} {}: no security", r.path);
            }
            for name in r
                .path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            {
                let params = op["parameters"].as_array().expect("path parameters");
                assert!(
                    params.iter().any(|p| p["name"] == name && p["in"] == "path"),
                    "{m} {}: parameter {name} undocumented",
                    r.path
                );
            }
            if ["post", "put", "patch"].contains(&m.as_str()) && r.body.is_some() {
                assert!(op["requestBody"]["content"]["application/json"]["schema"].is_object());
            }
        }
        // Every reference resolves.
        let text = doc.to_string();
        for cap in regex::Regex::new(r##""#/components/schemas/([^"]+)""##)
            .unwrap()
            .captures_iter(&text)
        {
            assert!(
                doc["components"]["schemas"][&cap[1]].is_object(),
                "dangling reference to {}",
                &cap[1]
            );
        }
        let links = &doc["paths"]["/api/v1/host/my/backups"]["post"]["responses"]["202"]["links"];
        assert_eq!(
            links["restore"]["operationId"], "post_api_v1_host_my_backups__id__restore",
            "{links}"
        );
        // Every link names an operation of the document.
        for r in ROUTES {
            for l in r.links {
                assert!(
                    ROUTES.iter().any(|t| t.method == l.method
                        && t.path == l.path
                        && t.params.iter().any(|p| p.name == l.parameter)),
                    "link {} of {} names no operation with {}",
                    l.name,
                    r.path,
                    l.parameter
                );
            }
        }
        let codes = &doc["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"];
        assert_eq!(codes.as_array().unwrap().len(), ERROR_CODES.len());
        // Each failure status documents its own codes, and has some.
        for r in ROUTES {
            for s in r.statuses.iter().filter(|s| **s >= 400) {
                let name = format!("Error{s}");
                let codes =
                    &doc["components"]["schemas"][&name]["properties"]["error"]["properties"]["code"]["enum"];
                let codes = codes.as_array().unwrap_or_else(|| panic!("{name}: no codes"));
                assert!(!codes.is_empty(), "{} {}: {s} has no code", r.method, r.path);
                assert_eq!(codes.len(), codes_of(*s).count());
            }
        }
        let flows = &doc["components"]["securitySchemes"]["oauth2"]["flows"]["password"];
        assert_eq!(flows["tokenUrl"], TOKEN_URL);
    }

    fn body_pointer(path: &str, method: &str, media: &str) -> String {
        format!(
            "/paths/{}/{method}/requestBody/content/{}/schema",
            esc(path),
            esc(media)
        )
    }

    fn response_pointer(path: &str, method: &str, status: u16) -> String {
        format!(
            "/paths/{}/{method}/responses/{status}/content/application~1json/schema",
            esc(path)
        )
    }

    /// The examples of the request types validate against the document, and
    /// the bodies the handlers refuse do not.
    #[test]
    fn examples_and_bodies_validate() {
        use serde_json::json;
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for (name, route, method, media) in [
            (
                "RegisterRequest",
                "/api/v1/auth/register",
                "post",
                "application/json",
            ),
            ("LoginRequest", "/api/v1/auth/login", "post", "application/json"),
            (
                "LoginRequest",
                "/api/v1/auth/login",
                "post",
                "application/x-www-form-urlencoded",
            ),
            ("CreateHostRequest", "/api/v1/host", "post", "application/json"),
        ] {
            let example = &schemas[name]["example"];
            assert!(example.is_object(), "{name} has no example");
            validate(&doc, &body_pointer(route, method, media), example)
                .unwrap_or_else(|e| panic!("{name}'s example: {e}"));
        }
        let register = body_pointer("/api/v1/auth/register", "post", "application/json");
        for bad in [
            json!({"email": "a@b.co", "username": "alice", "password": "short"}),
            json!({"email": "a@b.co", "username": "Alice!", "password": "password123"}),
            json!({"email": "a@b.co", "username": "alice", "password": "password123", "admin": true}),
            json!({"username": "alice", "password": "password123"}),
        ] {
            assert!(validate(&doc, &register, &bad).is_err(), "{bad} validated");
        }
        let login = body_pointer("/api/v1/auth/login", "post", "application/json");
        validate(
            &doc,
            &login,
            &json!({"username": "a", "password": "b", "scope": ""}),
        )
        .unwrap();
        assert!(
            validate(
                &doc,
                &login,
                &json!({"username": "a", "password": "b", "grant_type": "code"})
            )
            .is_err()
        );
    }

    /// Answers the handlers build validate against their route's schemas.
    #[test]
    fn answers_validate() {
        use super::super::dto::{TokenData, TokenReply, UserData};
        use serde_json::json;
        let doc = doc();
        let token = TokenData {
            access_token: "a.b.c".into(),
            token_type: "bearer",
            expires_in: 600,
        };
        let reply = serde_json::to_value(TokenReply {
            token: &token,
            success: true,
            message: "logged in",
            data: &token,
        })
        .unwrap();
        assert_eq!(reply["access_token"], "a.b.c");
        assert_eq!(reply["data"]["token_type"], "bearer");
        validate(&doc, &response_pointer("/api/v1/auth/login", "post", 200), &reply).unwrap();
        assert!(
            validate(
                &doc,
                &response_pointer("/api/v1/auth/login", "post", 200),
                &json!({"success": true, "message": "x", "data": reply["data"]})
            )
            .is_err(),
            "a log-in answer without the top-level token validated"
        );

        let user = crate::store::User {
            id: 1,
            email: "alice@example.com".into(),
            username: "alice".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            token_version: 0,
        };
        let me = json!({"success": true, "message": "your account", "data": UserData::from(&user)});
        validate(&doc, &response_pointer("/api/v1/auth/me", "get", 200), &me).unwrap();

        let invalid = ApiError::validation_fields(vec![crate::account::FieldError::new(
            "password",
            "password must be at least 8 characters",
        )])
        .into_response();
        let invalid: serde_json::Value = serde_json::from_slice(&body_of(invalid)).unwrap();
        assert_eq!(invalid["error"]["fields"][0]["field"], "password", "{invalid}");
        validate(
            &doc,
            &response_pointer("/api/v1/auth/register", "post", 422),
            &invalid,
        )
        .unwrap();
        let err = ApiError::new(StatusCode::CONFLICT, "hosting_busy", "busy").into_response();
        let body: serde_json::Value = serde_json::from_slice(&body_of(err)).unwrap();
        validate(&doc, &response_pointer("/api/v1/host/my", "delete", 409), &body).unwrap();
        let mut unknown = body.clone();
        unknown["error"]["code"] = json!("no_such_code");
        assert!(
            validate(
                &doc,
                &response_pointer("/api/v1/host/my", "delete", 409),
                &unknown
            )
            .is_err()
        );
    }

    #[test]
    fn swagger_ui_files_are_vendored() {
        for f in [
            "swagger-ui.css",
            "index.css",
            "swagger-ui-bundle.js",
            "swagger-ui-standalone-preset.js",
            "favicon-32x32.png",
        ] {
            let resp = docs_file(&format!("/docs/{f}")).unwrap_or_else(|e| panic!("{f}: {}", e.message));
            let ct = resp.headers()[header::CONTENT_TYPE].to_str().unwrap().to_owned();
            assert!(
                DOCS_TYPES.iter().any(|t| ct.starts_with(t)),
                "{f}: {ct} is not among DOCS_TYPES"
            );
            assert!(DOCS_PAGE.contains(&format!("/docs/{f}")), "{f} not on the page");
        }
        let init = docs_file("/docs/swagger-initializer.js").unwrap();
        let js = String::from_utf8(body_of(init)).unwrap();
        assert!(js.contains(DOCUMENT_URL), "{js}");
        assert!(docs_file("/docs/nope.js").is_err());
        assert!(docs_file("/docs/swagger-ui.css.map").is_err());
    }
}
