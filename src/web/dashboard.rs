//! The dashboard: the hosting's state and details, live progress while it
//! is created, power actions, delete with confirmation, the console's last
//! lines, the usage charts, and the one download of a generated key.

use serde_json::{Value, json};
use warp::http::StatusCode;

use super::session::Session;
use super::{Ctx, Lang, Page};
use crate::api::{Front, HostData};
use crate::hosting::{HostingError, HostingState, Step};
use crate::store::Hosting;
use crate::usage::ChartLabels;

type Answer = Result<Page, Page>;

/// Lines of the serial console shown.
const CONSOLE_LINES: usize = 20;

/// States the page follows live (the script polls `/dashboard/status`).
fn is_live(state: HostingState) -> bool {
    matches!(
        state,
        HostingState::Creating
            | HostingState::Starting
            | HostingState::Stopping
            | HostingState::Restarting
            | HostingState::Deleting
    )
}

/// Steps finished, and the label of the one under way.
fn progress(lang: Lang, h: &Hosting, queue_position: Option<usize>) -> (usize, String) {
    let total = Step::PER_CREATE.to_string();
    match h.step {
        Some(step) => {
            let n = step.place();
            let name = lang.t(&format!("step_{}", step.name()));
            (
                n - 1,
                lang.format(
                    "step_label",
                    &[("n", &n.to_string()), ("total", &total), ("name", name)],
                ),
            )
        }
        None if queue_position.is_some() || h.state == HostingState::Creating => {
            (0, lang.t("step_queued").to_owned())
        }
        None => (Step::PER_CREATE, String::new()),
    }
}

/// "3 h 12 min" since `since` (RFC 3339), in the page's language.
fn uptime(lang: Lang, since: &str) -> String {
    let Ok(at) = time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339) else {
        return String::new();
    };
    let secs = (time::OffsetDateTime::now_utc() - at).whole_seconds().max(0);
    let (d, h, m) = (secs / 86400, secs % 86400 / 3600, secs % 3600 / 60);
    let (d, h, m) = (d.to_string(), h.to_string(), m.to_string());
    if secs >= 86400 {
        lang.format("uptime_dh", &[("d", &d), ("h", &h)])
    } else if secs >= 3600 {
        lang.format("uptime_hm", &[("h", &h), ("m", &m)])
    } else {
        lang.format("uptime_m", &[("m", &m)])
    }
}

/// The hosting as the page and the status JSON show it.
fn view(ctx: &Ctx<'_>, session: &Session, h: &Hosting) -> Value {
    let api = &ctx.st.api;
    let cfg = &api.config;
    let lang = ctx.lang;
    let host = crate::api::public_host(cfg, &ctx.headers);
    let front = Front {
        host: &host,
        http_port: cfg.http_port,
        https_port: cfg.https_port,
        site_domain: cfg.site_domain.as_deref(),
    };
    let data = HostData::new(h, Some(&session.user.username), &front, &cfg.login_user, None);
    let queue_position = api.hosting.queue_position(h.id);
    let (done, step_label) = progress(lang, h, queue_position);
    let plan = cfg.plan.as_ref().map(|p| {
        lang.format(
            "plan_value",
            &[
                ("name", &p.name),
                ("vcpus", &p.vcpus.to_string()),
                ("memory", &p.memory_mib.to_string()),
                ("disk", &p.disk_gib.to_string()),
            ],
        )
    });
    let running = h.state == HostingState::Running;
    json!({
        "state": h.state.as_str(),
        "state_label": lang.t(&format!("state_{}", h.state.as_str())),
        "live": is_live(h.state),
        "creating": h.state == HostingState::Creating,
        "step": h.step.map(|s| s.name()),
        "step_label": step_label,
        "step_done": done,
        "steps_total": Step::PER_CREATE,
        "percent": done * 100 / Step::PER_CREATE,
        "queue_position": queue_position,
        "queue_label": queue_position.map(|n| lang.format("queue_label", &[("n", &n.to_string())])),
        "last_error": h.last_error,
        "web_url": data.web_url,
        "https_url": data.https_url,
        "ssh_command": data.ssh_command,
        "sftp_command": format!("sftp -P {} {}@{}", h.ssh_port, cfg.login_user, host),
        "sftp_help": lang.format("sftp_help", &[("user", &cfg.login_user)]),
        "plan": plan.unwrap_or_else(|| "-".into()),
        "vm_ip": h.vm_ip,
        "ssh_port": h.ssh_port,
        "uptime": if running { uptime(lang, &h.state_since) } else { lang.t("uptime_none").to_owned() },
        "can_start": matches!(h.state, HostingState::Stopped | HostingState::Failed | HostingState::Paused),
        "can_stop": matches!(h.state, HostingState::Running | HostingState::Starting | HostingState::Restarting | HostingState::Paused | HostingState::Failed),
    })
}

/// The usage charts of the last hour, as inline SVG (webhoster's own,
/// drawn from numbers, so the template shows them unescaped); `None` until
/// the sampler has read the VM.
fn usage_charts(ctx: &Ctx<'_>, vm_id: &str) -> Option<Value> {
    let history = ctx.st.api.usage.history(vm_id);
    if history.is_empty() {
        return None;
    }
    let labels = ChartLabels {
        cpu: ctx.t("chart_cpu").into(),
        network: ctx.t("chart_net").into(),
        inbound: ctx.t("chart_in").into(),
        outbound: ctx.t("chart_out").into(),
        now: ctx.t("chart_now").into(),
        no_data: ctx.t("usage_none").into(),
    };
    let c = crate::usage::hour_charts(&history, &labels);
    Some(json!({ "cpu_svg": c.cpu_svg, "net_svg": c.net_svg }))
}

/// The hosting of the account, or `None` when it has none.
async fn hosting_of(ctx: &Ctx<'_>, user_id: i64) -> Result<Option<Hosting>, Page> {
    match ctx.st.api.hosting.get(user_id).await {
        Ok(h) => Ok(Some(h)),
        Err(HostingError::NotFound) => Ok(None),
        Err(e) => Err(ctx.server_error(&e)),
    }
}

async fn render(ctx: &Ctx<'_>, session: &Session, status: StatusCode, extra: Value) -> Answer {
    let hosting = hosting_of(ctx, session.user.id).await?;
    let mut data = json!({ "key_ready": ctx.st.keys.has(&session.id) });
    if let Some(h) = &hosting {
        data["hosting"] = view(ctx, session, h);
        data["live"] = json!(is_live(h.state));
        // Without JavaScript the page reloads itself while the state moves.
        data["refresh"] = json!(is_live(h.state));
        data["charts"] = usage_charts(ctx, &h.vm_id).unwrap_or(Value::Null);
        // The console is a bonus: a VM without a log yet shows an empty box.
        let console = ctx
            .st
            .api
            .hosting
            .console(session.user.id, CONSOLE_LINES)
            .await
            .unwrap_or_default();
        data["console"] = json!(if console.trim().is_empty() {
            ctx.t("console_empty").to_owned()
        } else {
            console
        });
    }
    if let (Value::Object(d), Value::Object(e)) = (&mut data, extra) {
        d.extend(e);
    }
    let mut frame = ctx.frame(ctx.t("dashboard_title"), Some(session), &session.csrf);
    if hosting.is_none()
        && frame.alert.is_none()
        && let Some(why) = ctx.st.api.hosting.last_failure(session.user.id)
    {
        // The row of a failed create is gone; say why it failed.
        frame.alert = Some(format!("{}: {why}", ctx.t("err_create_failed")));
    }
    Ok(ctx.render(status, "dashboard", &frame, data))
}

pub async fn show(ctx: &Ctx<'_>) -> Answer {
    let session = ctx.require_session().await?;
    render(ctx, &session, StatusCode::OK, json!({})).await
}

/// The hosting's state for the page's script (JSON; 401 without a session,
/// 404 without a hosting).
pub async fn status(ctx: &Ctx<'_>) -> Answer {
    let Some(session) = ctx.session().await? else {
        return Ok(Page::json(
            StatusCode::UNAUTHORIZED,
            &json!({ "error": "no session" }),
        ));
    };
    match hosting_of(ctx, session.user.id).await? {
        Some(h) => Ok(Page::json(StatusCode::OK, &view(ctx, &session, &h))),
        None => Ok(Page::json(
            StatusCode::NOT_FOUND,
            &json!({ "error": "no hosting" }),
        )),
    }
}

/// The `?e=` code of a hosting error (its page text is in the catalogue).
fn error_code(ctx: &Ctx<'_>, e: &HostingError) -> &'static str {
    match e {
        HostingError::Exists => "exists",
        HostingError::NotFound => "no_hosting",
        HostingError::Busy(_) | HostingError::Transition(_) => "busy",
        HostingError::Capacity(_) | HostingError::SubnetFull | HostingError::PortsFull => "capacity",
        other => {
            tracing::warn!(error = %crate::hosting::chain(other), path = ctx.path, "hosting action failed");
            "action"
        }
    }
}

pub async fn create(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    let text = form.get("ssh_public_key");
    let key = if text.trim().is_empty() {
        None
    } else {
        match crate::auth::SshPublicKey::parse(text) {
            Ok(k) => Some(k),
            Err(_) => {
                return render(
                    ctx,
                    &session,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "values": { "ssh_public_key": text }, "errors": { "ssh_public_key": ctx.t("err_key_invalid") } }),
                )
                .await;
            }
        }
    };
    // `?wait=false`: the create runs on; the page shows its progress.
    match ctx.st.api.hosting.create(&session.user, key, false).await {
        Ok(created) => {
            if let Some(private_key) = created.private_key {
                ctx.st.keys.put(&session.id, private_key);
            }
            Ok(Page::redirect("/dashboard?n=created"))
        }
        Err(e) => Ok(Page::redirect(&format!("/dashboard?e={}", error_code(ctx, &e)))),
    }
}

/// Start, stop, restart or delete (`action`); delete needs `confirm=yes`,
/// else it goes to the confirmation page first.
pub async fn action(ctx: &Ctx<'_>) -> Answer {
    let (session, form) = ctx.require_post().await?;
    let hosting = &ctx.st.api.hosting;
    let user_id = session.user.id;
    let result = match form.get("action") {
        "start" => hosting.start(user_id).await.map(|_| "started"),
        "stop" => hosting.stop(user_id).await.map(|_| "stopped"),
        "restart" => hosting.restart(user_id).await.map(|_| "restarted"),
        "delete" if form.get("confirm") == "yes" => hosting.delete(user_id).await.map(|_| "deleted"),
        "delete" => return Ok(Page::redirect("/dashboard/delete")),
        _ => return Ok(Page::redirect("/dashboard?e=action")),
    };
    Ok(match result {
        Ok(done) => Page::redirect(&format!("/dashboard?n={done}")),
        Err(e) => Page::redirect(&format!("/dashboard?e={}", error_code(ctx, &e))),
    })
}

pub async fn confirm_delete(ctx: &Ctx<'_>) -> Answer {
    let session = ctx.require_session().await?;
    if hosting_of(ctx, session.user.id).await?.is_none() {
        return Ok(Page::redirect("/dashboard"));
    }
    let frame = ctx.frame(ctx.t("confirm_delete_title"), Some(&session), &session.csrf);
    Ok(ctx.render(StatusCode::OK, "confirm_delete", &frame, json!({})))
}

/// The generated private key, once: the slot is emptied as it is sent.
pub async fn download_key(ctx: &Ctx<'_>) -> Answer {
    let (session, _) = ctx.require_post().await?;
    match ctx.st.keys.take(&session.id) {
        Some(key) => Ok(Page {
            content_type: "application/octet-stream",
            attachment: Some(format!("webhoster-{}-id_ed25519", session.user.username).into()),
            ..Page::html(StatusCode::OK, key)
        }),
        None => Ok(Page::redirect("/dashboard?n=key_gone")),
    }
}
