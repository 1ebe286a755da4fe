//! The page templates (`templates/web/*.hbs`, embedded) and the data every
//! page gets: language, strings, the CSRF token, the account's name, the
//! notice line. Handlebars' HTML escaping is on for every value; the only
//! triple-stash is the usage charts' SVG, which webhoster renders itself
//! from numbers (never from a user's text).

use std::sync::LazyLock;

use handlebars::Handlebars;
use serde_json::{Map, Value, json};

use super::assets;
use super::i18n::Lang;

/// Every template, by name: pages and the partials they use.
pub(super) const TEMPLATES: &[(&str, &str)] = &[
    ("layout", include_str!("../../templates/web/layout.hbs")),
    ("field", include_str!("../../templates/web/field.hbs")),
    ("home", include_str!("../../templates/web/home.hbs")),
    ("signup", include_str!("../../templates/web/signup.hbs")),
    ("login", include_str!("../../templates/web/login.hbs")),
    ("dashboard", include_str!("../../templates/web/dashboard.hbs")),
    (
        "confirm_delete",
        include_str!("../../templates/web/confirm_delete.hbs"),
    ),
    ("settings", include_str!("../../templates/web/settings.hbs")),
    ("error", include_str!("../../templates/web/error.hbs")),
];

static PAGES: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut hb = Handlebars::new();
    // Default escaping (HTML) stays on: every value is escaped.
    hb.set_dev_mode(false);
    for (name, text) in TEMPLATES {
        hb.register_template_string(name, *text)
            .unwrap_or_else(|e| panic!("templates/web/{name}.hbs does not parse: {e}"));
    }
    hb
});

/// What the layout shows around every page.
pub(crate) struct Frame<'a> {
    pub lang: Lang,
    pub title: &'a str,
    /// The signed-in account's username, if any (switches the navigation).
    pub user: Option<&'a str>,
    /// The token the page's forms carry.
    pub csrf: &'a str,
    /// The path the language switch comes back to.
    pub back: &'a str,
    pub notice: Option<String>,
    pub alert: Option<String>,
}

/// Renders page `name` with `data` (an object) inside the layout.
pub(super) fn page(name: &str, frame: &Frame<'_>, data: Value) -> Result<String, handlebars::RenderError> {
    let mut ctx = match data {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let langs: Vec<Value> = Lang::ALL
        .iter()
        .map(|l| json!({ "code": l.code(), "name": l.t("lang_name"), "current": *l == frame.lang }))
        .collect();
    let base = json!({
        "lang": frame.lang.code(),
        "t": frame.lang.catalogue(),
        "title": frame.title,
        "user": frame.user,
        "csrf": frame.csrf,
        "back": frame.back,
        "langs": langs,
        "notice": frame.notice,
        "alert": frame.alert,
        "asset_version": assets::VERSION.as_str(),
    });
    if let Value::Object(base) = base {
        for (k, v) in base {
            ctx.entry(k).or_insert(v);
        }
    }
    PAGES.render(name, &Value::Object(ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(lang: Lang) -> Frame<'static> {
        Frame {
            lang,
            title: "T",
            user: None,
            csrf: "tok",
            back: "/",
            notice: None,
            alert: None,
        }
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let evil = "<script>alert(1)</script>\"'&";
        let html = page(
            "signup",
            &frame(Lang::En),
            json!({ "values": { "email": evil, "username": evil }, "errors": { "email": evil } }),
        )
        .unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        let html = page(
            "settings",
            &Frame {
                user: Some(evil),
                ..frame(Lang::Ko)
            },
            json!({ "keys": [{ "id": 1, "fingerprint": "SHA256:x", "algorithm": "ssh-ed25519", "comment": evil, "created_at": "now" }] }),
        )
        .unwrap();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(html.contains("<html lang=\"ko\">"));
    }

    #[test]
    fn every_page_renders_in_both_languages() {
        for lang in Lang::ALL {
            for name in [
                "home",
                "signup",
                "login",
                "dashboard",
                "confirm_delete",
                "settings",
                "error",
            ] {
                let html = page(name, &frame(lang), json!({})).unwrap();
                assert!(
                    html.contains(&format!("<html lang=\"{}\">", lang.code())),
                    "{name}"
                );
                assert!(!html.contains("{{"), "{name}");
            }
        }
    }

    #[test]
    fn every_form_that_posts_carries_the_csrf_token() {
        let re = regex::Regex::new(r#"(?s)<form method="post"[^>]*>(.*?)</form>"#).unwrap();
        for (name, text) in TEMPLATES {
            for form in re.captures_iter(text) {
                assert!(
                    form[1].contains(r#"name="csrf" value="{{"#),
                    "a form in {name} lacks the csrf field: {}",
                    &form[0]
                );
            }
        }
    }
}
