//! The self-contained HTML report (`--out html=FILE`, and `/runs/<id>/report.html` on
//! the dashboard): one file holding the JSON summary, the stylesheet and a small
//! script that draws the charts as inline SVG. It needs no network to open.
//!
//! The script and styles are shared with the live dashboard (`node/assets/`). This
//! module must not compute results: it only embeds the [`Summary`] safely.

use crate::reports::summary::Summary;

pub const COMMON_CSS: &str = include_str!("../../assets/common.css");
pub const CHARTS_JS: &str = include_str!("../../assets/charts.js");
const REPORT_JS: &str = include_str!("../../assets/report.js");

/// JSON that is safe inside a `<script>` element: `<`, `>` and `&` are written as
/// `\u003c` etc., so no value (a plan source, a node name) can close the element.
pub fn script_json<T: serde::Serialize>(v: &T) -> String {
    let text = serde_json::to_string(v).unwrap_or_else(|_| "null".into());
    let mut o = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => o.push_str("\\u003c"),
            '>' => o.push_str("\\u003e"),
            '&' => o.push_str("\\u0026"),
            '\u{2028}' => o.push_str("\\u2028"),
            '\u{2029}' => o.push_str("\\u2029"),
            c => o.push(c),
        }
    }
    o
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

pub fn render(s: &Summary) -> String {
    render_with_baseline(s, None)
}

/// The report with a baseline run (its summary as [`script_json`] text) embedded for the
/// script to draw beside this run.
pub fn render_with_baseline(s: &Summary, baseline: Option<&str>) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>stampede · {plan} · {id}</title><style>{css}</style></head>\n<body>\
         <div id=\"app\"><noscript>This report draws its charts with JavaScript; the raw summary is below.</noscript></div>\n\
         <script type=\"application/json\" id=\"summary\">{json}</script>\n{baseline}\
         <script>{charts}</script>\n<script>{report}</script>\n</body></html>\n",
        plan = escape(&s.plan),
        id = escape(&s.run_id),
        css = COMMON_CSS,
        json = script_json(s),
        baseline = baseline
            .map(|b| format!("<script type=\"application/json\" id=\"baseline\">{b}</script>\n"))
            .unwrap_or_default(),
        charts = CHARTS_JS,
        report = REPORT_JS,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_json_cannot_close_the_script() {
        let v = serde_json::json!({"plan_source": "</script><script>alert(1)</script>&"});
        let j = script_json(&v);
        assert!(
            !j.contains('<') && !j.contains('>') && !j.contains('&'),
            "{j}"
        );
        let back: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(back, v);
    }
}
