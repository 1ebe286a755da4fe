//! Request bodies: parsed strictly (unknown fields rejected), then validated
//! as a separate step. Response data shapes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use crate::store::{Hosting, User};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"email": "alice@example.com", "username": "alice", "password": "correct horse"}))]
pub struct RegisterRequest {
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    #[schema(pattern = "^[a-z0-9_-]{3,32}$")]
    pub username: String,
    #[schema(min_length = 8, max_length = 1024)]
    pub password: String,
}

/// OAuth2 password-grant style: the optional OAuth2 fields are accepted and ignored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"grant_type": "password", "username": "alice", "password": "correct horse"}))]
pub struct LoginRequest {
    /// Email or username.
    #[schema(min_length = 1, max_length = 254)]
    pub username: String,
    #[schema(min_length = 1, max_length = 4096)]
    pub password: String,
    /// Only `password` (RFC 6749 §4.3).
    #[serde(default)]
    #[schema(schema_with = grant_type_schema)]
    pub grant_type: Option<String>,
    // Accepted so OAuth2 clients work; webhoster has no scopes or clients.
    #[serde(default)]
    #[allow(dead_code)]
    pub scope: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub client_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    pub client_secret: Option<String>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"ssh_public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"}))]
pub struct CreateHostRequest {
    /// An OpenSSH public key (ed25519, ECDSA or RSA of 2048 bits or more).
    /// Absent or empty: webhoster generates a key pair and returns its
    /// private half once, in this response.
    #[serde(default)]
    pub ssh_public_key: Option<String>,
}

fn grant_type_schema() -> utoipa::openapi::Object {
    // Nullable like the other optional fields: serde takes `null` for `None`.
    super::openapi::nullable(super::openapi::string_enum(
        ["password"],
        "OAuth2 grant type; only `password`",
    ))
}

impl LoginRequest {
    /// The OAuth2 part of a log-in; the account fields are checked by
    /// `account::Accounts::authenticate`.
    pub fn check_grant(&self) -> Result<(), ApiError> {
        match &self.grant_type {
            Some(g) if g != "password" => Err(ApiError::validation_fields(vec![
                crate::account::FieldError::new("grant_type", "grant_type must be \"password\""),
            ])),
            _ => Ok(()),
        }
    }
}

impl CreateHostRequest {
    /// The key, parsed once here; an empty string asks for a generated one.
    pub fn validate(self) -> Result<Option<crate::auth::SshPublicKey>, ApiError> {
        match self.ssh_public_key {
            None => Ok(None),
            Some(k) if k.trim().is_empty() => Ok(None),
            Some(k) => crate::auth::SshPublicKey::parse(&k).map(Some).map_err(|e| {
                ApiError::new(
                    warp::http::StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_ssh_key",
                    e.to_string(),
                )
            }),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = User)]
pub struct UserData<'a> {
    pub id: i64,
    #[schema(format = Email)]
    pub email: &'a str,
    pub username: &'a str,
    /// RFC 3339.
    pub created_at: &'a str,
}

impl<'a> From<&'a User> for UserData<'a> {
    fn from(u: &'a User) -> Self {
        UserData {
            id: u.id,
            email: &u.email,
            username: &u.username,
            created_at: &u.created_at,
        }
    }
}

/// An access token, as RFC 6749 §5.1 names its fields.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Token)]
pub struct TokenData {
    /// A JWT; send it as `Authorization: Bearer <access_token>`.
    pub access_token: String,
    /// Always `bearer`.
    #[schema(schema_with = token_type_schema)]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
}

fn token_type_schema() -> utoipa::openapi::Object {
    super::openapi::string_enum(["bearer"], "Always `bearer` (RFC 6750)")
}

/// The log-in answer: the token's fields at the top level, as OAuth2
/// clients read them (RFC 6749 §5.1), and the envelope beside them, whose
/// `data` holds the same token for the clients written before.
#[derive(Debug, Serialize)]
pub struct TokenReply<'a> {
    #[serde(flatten)]
    pub token: &'a TokenData,
    pub success: bool,
    pub message: &'a str,
    pub data: &'a TokenData,
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Hosting)]
pub struct HostingData<'a> {
    pub id: i64,
    pub vm_id: &'a str,
    pub vm_ip: &'a str,
    pub ssh_port: u16,
    /// What the hosting is doing: creating, starting, running, stopping,
    /// stopped, restarting, paused, failed or deleting. `running` means the
    /// site answers through nginx and SSH accepts.
    #[schema(schema_with = hosting_state_schema)]
    pub status: &'static str,
    /// What the user asked for: running or stopped.
    #[schema(schema_with = desired_schema)]
    pub desired: &'static str,
    /// The create step under way, if any (progress of `?wait=false`).
    #[schema(schema_with = step_schema)]
    pub step: Option<&'static str>,
    /// Why the last attempt to reach `desired` went wrong, if it did.
    pub last_error: Option<&'a str>,
    /// When `status` last changed (RFC 3339).
    pub state_since: &'a str,
    /// While a create waits for its turn: its place in the queue (1 = next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    pub created_at: &'a str,
}

// The names the enums themselves print, so the document cannot drift from them.
fn hosting_state_schema() -> utoipa::openapi::Object {
    use crate::hosting::HostingState;
    super::openapi::string_enum(
        HostingState::ALL.map(HostingState::as_str),
        "What the hosting is doing",
    )
}

fn desired_schema() -> utoipa::openapi::Object {
    use crate::hosting::state::Desired;
    super::openapi::string_enum(
        [Desired::Running, Desired::Stopped].map(Desired::as_str),
        "What the user asked for",
    )
}

fn step_schema() -> utoipa::openapi::Object {
    use crate::hosting::state::Step;
    super::openapi::nullable(super::openapi::string_enum(
        Step::ALL.map(Step::name),
        "The create step under way, if any",
    ))
}

/// How the site at `web_url` is kept apart from the other sites in a
/// visitor's browser (README "Security model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WebIsolation {
    /// `http://<host>/<user_id>/`: every site shares the host's origin, so
    /// the front serves each page in a CSP sandbox with an opaque origin of
    /// its own (templates/nginx/isolation.conf.hbs): no cookies, no
    /// storage, no same-site fetches without CORS.
    Sandbox,
    /// `http://<username>.<domain>/`: an origin of its own, so cookies and
    /// storage work; siblings under the domain are still one site.
    Origin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn name(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// `host` or `host:port` when the port is not the scheme's own.
    fn authority(self, host: &str, port: u16) -> String {
        let default = match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        };
        if port == default {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        }
    }
}

/// Where the nginx front serves the sites, as the API shows it.
#[derive(Debug, Clone, Copy)]
pub struct Front<'a> {
    /// The host name users reach webhoster by.
    pub host: &'a str,
    pub http_port: u16,
    /// Set when the front serves HTTPS too.
    pub https_port: Option<u16>,
    /// Set when each site also has `<username>.<domain>`.
    pub site_domain: Option<&'a str>,
}

impl Front<'_> {
    /// The site's URL over `scheme`: its own host name when there is one
    /// (and its username is known), its path on the public host otherwise.
    fn site_url(
        &self,
        scheme: Scheme,
        port: u16,
        user_id: i64,
        username: Option<&str>,
    ) -> (String, WebIsolation) {
        match (self.site_domain, username) {
            (Some(domain), Some(user)) => (
                format!(
                    "{}://{}/",
                    scheme.name(),
                    scheme.authority(&format!("{user}.{domain}"), port)
                ),
                WebIsolation::Origin,
            ),
            _ => (
                format!(
                    "{}://{}/{user_id}/",
                    scheme.name(),
                    scheme.authority(self.host, port)
                ),
                WebIsolation::Sandbox,
            ),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Host)]
pub struct HostData<'a> {
    pub hosting: HostingData<'a>,
    /// The site over HTTP, always served (`http://<host>/<user_id>/` keeps
    /// working in every mode).
    pub web_url: String,
    /// How the site at `web_url` (and `https_url`) is kept apart from the
    /// other sites in a visitor's browser.
    pub web_isolation: WebIsolation,
    /// The same site over HTTPS, when the front serves HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub https_url: Option<String>,
    pub ssh_command: String,
    /// Only in the create response, only when webhoster generated the key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key: Option<&'a str>,
}

/// The last lines of the serial console, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsoleData<'a> {
    pub lines: Vec<&'a str>,
}

impl<'a> HostData<'a> {
    /// `username` is needed only with a site domain.
    pub fn new(
        h: &'a Hosting,
        username: Option<&str>,
        front: &Front<'_>,
        login_user: &str,
        private_key: Option<&'a str>,
    ) -> HostData<'a> {
        let (web_url, web_isolation) = front.site_url(Scheme::Http, front.http_port, h.user_id, username);
        let https_url = front
            .https_port
            .map(|port| front.site_url(Scheme::Https, port, h.user_id, username).0);
        HostData {
            hosting: HostingData {
                id: h.id,
                vm_id: &h.vm_id,
                vm_ip: &h.vm_ip,
                ssh_port: h.ssh_port,
                status: h.state.as_str(),
                desired: h.desired.as_str(),
                step: h.step.map(|s| s.name()),
                last_error: h.last_error.as_deref(),
                state_since: &h.state_since,
                queue_position: None,
                created_at: &h.created_at,
            },
            web_url,
            web_isolation,
            https_url,
            ssh_command: format!("ssh -p {} {login_user}@{}", h.ssh_port, front.host),
            private_key,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_url_says_how_the_site_is_isolated() {
        use crate::hosting::state::{Desired, HostingState};
        let h = Hosting {
            id: 1,
            user_id: 7,
            vm_id: "vm-7".into(),
            vm_ip: "10.83.0.2".into(),
            mac: "52:54:00:00:00:02".into(),
            ssh_port: 10001,
            state: HostingState::Running,
            desired: Desired::Running,
            step: None,
            last_error: None,
            state_since: "2026-01-01T00:00:00Z".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            updated_at: "2026-01-01T00:00:00Z".into(),
        };
        let json = |front: Front<'_>| {
            serde_json::to_value(HostData::new(&h, Some("alice"), &front, "ubuntu", None)).unwrap()
        };
        let path = Front {
            host: "example.test",
            http_port: 8080,
            https_port: None,
            site_domain: None,
        };
        let plain = json(path);
        assert_eq!(plain["web_url"], "http://example.test:8080/7/");
        assert_eq!(plain["web_isolation"], "sandbox");
        assert!(plain.get("https_url").is_none());
        assert_eq!(plain["ssh_command"], "ssh -p 10001 ubuntu@example.test");

        let tls = json(Front {
            https_port: Some(443),
            ..path
        });
        assert_eq!(tls["web_url"], "http://example.test:8080/7/");
        assert_eq!(tls["https_url"], "https://example.test/7/");

        let domain = json(Front {
            http_port: 80,
            https_port: Some(8443),
            site_domain: Some("sites.test"),
            ..path
        });
        assert_eq!(domain["web_url"], "http://alice.sites.test/");
        assert_eq!(domain["https_url"], "https://alice.sites.test:8443/");
        assert_eq!(domain["web_isolation"], "origin");
        assert_eq!(domain["ssh_command"], "ssh -p 10001 ubuntu@example.test");
    }
}
