//! The pages' languages: one catalogue of strings per language
//! (`templates/web/i18n/<lang>.toml`, embedded), and the choice of language
//! for a request: the `lang` cookie (set by the switch on every page), else
//! the best of `Accept-Language`, else English.

use std::collections::BTreeMap;
use std::sync::LazyLock;

/// A language the pages are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    Ko,
}

/// The cookie that remembers the visitor's choice.
pub const COOKIE: &str = "lang";

pub type Catalogue = BTreeMap<String, String>;

fn load(name: &str, text: &str) -> Catalogue {
    toml::from_str(text).unwrap_or_else(|e| panic!("templates/web/i18n/{name}.toml does not parse: {e}"))
}

static EN: LazyLock<Catalogue> =
    LazyLock::new(|| load("en", include_str!("../../templates/web/i18n/en.toml")));
static KO: LazyLock<Catalogue> =
    LazyLock::new(|| load("ko", include_str!("../../templates/web/i18n/ko.toml")));

impl Lang {
    pub const ALL: [Lang; 2] = [Lang::En, Lang::Ko];

    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::Ko => "ko",
        }
    }

    pub fn parse(code: &str) -> Option<Lang> {
        Lang::ALL
            .into_iter()
            .find(|l| l.code().eq_ignore_ascii_case(code))
    }

    pub fn catalogue(self) -> &'static Catalogue {
        match self {
            Lang::En => &EN,
            Lang::Ko => &KO,
        }
    }

    /// The string `key`; a missing key shows itself (a unit test keeps the
    /// catalogues complete, so this is only ever seen in development).
    pub fn t(self, key: &str) -> &'static str {
        match self.catalogue().get(key) {
            Some(s) => s.as_str(),
            None => {
                tracing::warn!(key, lang = self.code(), "missing web string");
                "?"
            }
        }
    }

    /// `t(key)` with each `{name}` replaced by its value.
    pub fn format(self, key: &str, args: &[(&str, &str)]) -> String {
        let mut out = self.t(key).to_owned();
        for (name, value) in args {
            out = out.replace(&format!("{{{name}}}"), value);
        }
        out
    }

    /// The language for a request: the cookie's if valid, else the best
    /// `Accept-Language` entry we have, else English.
    pub fn pick(cookie: Option<&str>, accept_language: Option<&str>) -> Lang {
        if let Some(lang) = cookie.and_then(Lang::parse) {
            return lang;
        }
        accept_language.and_then(from_accept_language).unwrap_or(Lang::En)
    }
}

/// The highest-weighted language of the header that we have (`ko-KR` is
/// Korean; `q=0` means "not this one").
fn from_accept_language(header: &str) -> Option<Lang> {
    let mut best: Option<(f32, usize, Lang)> = None;
    for (pos, part) in header.split(',').enumerate() {
        let mut pieces = part.split(';');
        let tag = pieces.next().unwrap_or("").trim();
        let q = pieces
            .filter_map(|p| p.trim().strip_prefix("q="))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        let primary = tag.split('-').next().unwrap_or("");
        let Some(lang) = Lang::parse(primary) else {
            continue;
        };
        if q <= 0.0 {
            continue;
        }
        // Highest q wins; on a tie, the first listed.
        let better = match best {
            None => true,
            Some((bq, bpos, _)) => q > bq || (q == bq && pos < bpos),
        };
        if better {
            best = Some((q, pos, lang));
        }
    }
    best.map(|(_, _, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_catalogues_have_the_same_keys_and_no_empty_string() {
        let en: Vec<&String> = EN.keys().collect();
        let ko: Vec<&String> = KO.keys().collect();
        assert_eq!(en, ko, "en.toml and ko.toml must have the same keys");
        for lang in Lang::ALL {
            for (k, v) in lang.catalogue() {
                assert!(!v.trim().is_empty(), "{}: {k} is empty", lang.code());
            }
        }
        // Placeholders match too, so a translation cannot drop a value.
        let holes = |s: &str| {
            let mut v: Vec<String> = regex::Regex::new(r"\{[a-z]+\}")
                .unwrap()
                .find_iter(s)
                .map(|m| m.as_str().to_owned())
                .collect();
            v.sort();
            v
        };
        for (k, v) in EN.iter() {
            assert_eq!(holes(v), holes(&KO[k]), "placeholders of {k}");
        }
    }

    #[test]
    fn every_string_a_template_names_exists() {
        let re = regex::Regex::new(r"\bt\.([a-z_]+)").unwrap();
        for (name, text) in super::super::render::TEMPLATES {
            for cap in re.captures_iter(text) {
                assert!(
                    EN.contains_key(&cap[1]),
                    "{name} uses t.{} which en.toml lacks",
                    &cap[1]
                );
            }
        }
    }

    #[test]
    fn the_language_comes_from_the_cookie_then_the_header() {
        assert_eq!(Lang::pick(None, None), Lang::En);
        assert_eq!(Lang::pick(None, Some("ko-KR,ko;q=0.9,en-US;q=0.8")), Lang::Ko);
        assert_eq!(Lang::pick(None, Some("en-US,en;q=0.9,ko;q=0.8")), Lang::En);
        assert_eq!(Lang::pick(None, Some("fr-FR, ko;q=0.5, en;q=0.4")), Lang::Ko);
        assert_eq!(Lang::pick(None, Some("ko;q=0, en;q=0.1")), Lang::En);
        assert_eq!(Lang::pick(None, Some("de, fr")), Lang::En);
        assert_eq!(Lang::pick(Some("ko"), Some("en")), Lang::Ko);
        assert_eq!(Lang::pick(Some("xx"), Some("ko")), Lang::Ko);
    }

    #[test]
    fn format_fills_placeholders() {
        assert_eq!(
            Lang::En.format("step_label", &[("n", "3"), ("total", "8"), ("name", "x")]),
            "Step 3 of 8: x"
        );
        assert_eq!(
            Lang::Ko.format("step_label", &[("n", "3"), ("total", "8"), ("name", "x")]),
            "8단계 중 3단계: x"
        );
    }
}
