//! Secrets out of reports: the plan text that a summary carries (`plan_source`) with
//! the values of secret keys replaced by `[redacted]`.
//!
//! A key is secret when its name (any table: default or step headers, form fields,
//! data options) is `authorization`, `proxy-authorization` or `cookie`, contains
//! `token`, `secret`, `password`, `passwd`, `api-key`, `api_key` or `apikey` (case
//! ignored), or is listed in the plan's top-level `redact = ["x-tenant", ...]`. Query
//! parameters of URLs with such names are redacted too. This module only rewrites text;
//! it must not decide where reports go. If a secret value cannot be found in the text as
//! written (an escaped string), the whole source is withheld rather than leaked.

use std::collections::BTreeSet;

/// What replaces a secret value.
pub const REDACTED: &str = "[redacted]";

/// Parts of key names that always mark a secret.
const SECRET_PARTS: [&str; 7] = [
    "token", "secret", "password", "passwd", "api-key", "api_key", "apikey",
];
/// Whole key names that always mark a secret.
const SECRET_NAMES: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

/// The plan text with every secret value replaced by [`REDACTED`].
pub fn redact_plan_source(source: &str) -> String {
    let Ok(doc) = source.parse::<toml::Table>() else {
        // Not a plan that ran: nothing in it can be told apart, so nothing is shown.
        return withheld();
    };
    let marked: BTreeSet<String> = doc
        .get("redact")
        .and_then(toml::Value::as_array)
        .map(|names| {
            names
                .iter()
                .filter_map(toml::Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect()
        })
        .unwrap_or_default();
    let is_secret = |key: &str| {
        let k = key.to_ascii_lowercase();
        SECRET_NAMES.contains(&k.as_str())
            || SECRET_PARTS.iter().any(|p| k.contains(p))
            || marked.contains(&k)
    };
    let mut secrets = BTreeSet::new();
    collect(&toml::Value::Table(doc), false, &is_secret, &mut secrets);
    // Only whole quoted strings and whole query values are replaced, so a short secret
    // does not eat the same letters elsewhere in the text.
    let mut out = source.to_string();
    for s in secrets.iter().filter(|s| !s.text.is_empty()) {
        let (from, to): (Vec<String>, Vec<String>) = match &s.query_name {
            None => (
                vec![format!("\"{}\"", s.text), format!("'{}'", s.text)],
                vec![format!("\"{REDACTED}\""), format!("'{REDACTED}'")],
            ),
            Some(name) => (
                vec![format!("{name}={}", s.text)],
                vec![format!("{name}={REDACTED}")],
            ),
        };
        for (f, t) in from.iter().zip(&to) {
            out = out.replace(f.as_str(), t);
        }
    }
    // Every secret must be gone from what the text now says; else show none of it.
    let mut left = BTreeSet::new();
    match out.parse::<toml::Table>() {
        Ok(after) => collect(&toml::Value::Table(after), false, &is_secret, &mut left),
        Err(_) => return withheld(),
    }
    if left
        .iter()
        .any(|s| !s.text.is_empty() && s.text != REDACTED)
    {
        return withheld();
    }
    out
}

fn withheld() -> String {
    "# plan source withheld: it holds secrets that could not be redacted in place\n".into()
}

/// A secret value as the plan reads, and the query parameter it is the value of.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Secret {
    text: String,
    query_name: Option<String>,
}

/// Gathers the secret strings under `value`: every string below a secret key, and the
/// values of secret query parameters in any string that looks like a URL.
fn collect(
    value: &toml::Value,
    under_secret: bool,
    is_secret: &impl Fn(&str) -> bool,
    out: &mut BTreeSet<Secret>,
) {
    match value {
        toml::Value::String(s) => {
            if under_secret {
                out.insert(Secret {
                    text: s.clone(),
                    query_name: None,
                });
            } else {
                query_secrets(s, is_secret, out);
            }
        }
        toml::Value::Array(items) => {
            for v in items {
                collect(v, under_secret, is_secret, out);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                // The marking list itself names keys, not secrets.
                if k == "redact" && !under_secret {
                    continue;
                }
                collect(v, under_secret || is_secret(k), is_secret, out);
            }
        }
        _ => {}
    }
}

/// `...?api_key=abc&x=1` → `abc`.
fn query_secrets(s: &str, is_secret: &impl Fn(&str) -> bool, out: &mut BTreeSet<Secret>) {
    let Some((_, query)) = s.split_once('?') else {
        return;
    };
    let query = query.split('#').next().unwrap_or("");
    for pair in query.split('&') {
        if let Some((name, value)) = pair.split_once('=') {
            if is_secret(name) && !value.is_empty() {
                out.insert(Secret {
                    text: value.to_string(),
                    query_name: Some(name.to_string()),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
name = "shop"
redact = ["x-tenant"]

[defaults]
base_url = "http://127.0.0.1:8080"
headers = { Authorization = "Bearer s3cr3t-abc", accept = "application/json", "X-Tenant" = "acme-42" }

[flows.buy]
steps = [
  { name = "login", request = { method = "POST", url = "/login?api_key=k-777&page=1", form = { user = "bob", password = "hunter2" } } },
]
"#;

    #[test]
    fn secret_values_are_redacted_and_the_rest_is_kept() {
        let out = redact_plan_source(PLAN);
        for secret in ["s3cr3t-abc", "acme-42", "k-777", "hunter2"] {
            assert!(!out.contains(secret), "{secret} left in:\n{out}");
        }
        for kept in [
            "application/json",
            "bob",
            "page=1",
            "http://127.0.0.1:8080",
            "x-tenant",
        ] {
            assert!(out.contains(kept), "{kept} lost:\n{out}");
        }
        assert!(out.contains(r#"Authorization = "[redacted]""#), "{out}");
        // Still a plan that parses, the same shape as before.
        out.parse::<toml::Table>().unwrap();
    }

    #[test]
    fn a_secret_that_is_not_written_as_it_reads_withholds_the_source() {
        // "\u0062" reads as "b": the text does not contain the value as written.
        let plan = "[defaults]\nheaders = { authorization = \"Bearer \\u0062c\" }\n";
        let out = redact_plan_source(plan);
        assert!(!out.contains("Bearer"), "{out}");
        assert!(out.contains("withheld"), "{out}");
    }

    #[test]
    fn a_plan_without_secrets_is_unchanged() {
        let plan = "name = \"x\"\n[defaults]\nheaders = { accept = \"*/*\" }\n";
        assert_eq!(redact_plan_source(plan), plan);
    }
}
