//! The HTML report opened from disk in headless Chromium with the network disabled:
//! its charts are drawn (SVG lines with one point per second of the timeline) and its
//! tables carry the numbers of the JSON summary of the same run; nothing in the plan
//! source can inject markup.

mod browser_support;

use std::process::Command;

use browser_support::{attr_of_id, chart_points, chromium, dump_dom};
use serde_json::Value;
use stampede_tools::TargetConfig;

const BIN: &str = env!("CARGO_BIN_EXE_stampede");

#[test]
fn report_opens_offline_with_charts_and_the_summarys_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let target = stampede_tools::spawn(TargetConfig::default()).expect("target");
    let plan = tmp.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"# </script><b id="injected">not markup</b> & friends
name = "report-check"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = 40
duration = "4s"
max_vus = 20
flow = "shop"
[[flows.shop.steps]]
name = "product"
request = {{ url = "/products/{{{{ random_int(1, 1100) }}}}" }}
check = {{ status = 200 }}
[[flows.shop.steps]]
name = "search"
request = {{ url = "/products", query = {{ q = "shoe" }} }}
[thresholds]
"http_req_duration" = ["p(99) < 5s"]
"http_req_failed" = ["rate < 0.1%"]
"#,
            url = target.url()
        ),
    )
    .unwrap();
    let json = tmp.path().join("summary.json");
    let html = tmp.path().join("report.html");
    let out = Command::new(BIN)
        .arg("run")
        .arg(&plan)
        .arg("--quiet")
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .arg("--out")
        .arg(format!("html={}", html.display()))
        .output()
        .expect("run stampede");
    // About 1 in 11 product ids is a 404: the failed-rate threshold fails (exit 99).
    assert!(
        json.exists() && html.exists(),
        "status {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let raw = std::fs::read_to_string(&html).unwrap();
    // Self-contained: no external script, style, font or image.
    for bad in ["src=\"http", "href=\"http", "@import", "url(", "<link"] {
        assert!(!raw.contains(bad), "the report references {bad}");
    }
    assert!(
        !raw.contains("</script><b"),
        "the plan source closed a script"
    );

    let Some(browser) = chromium("report_opens_offline_with_charts_and_the_summarys_numbers")
    else {
        return;
    };
    let url = format!("file://{}", html.display());
    // The report renders at load: no virtual time needed (see dump_dom).
    let dom = dump_dom(&browser, &url, 0, true);

    // Totals and per-step tables carry the summary's numbers.
    let requests = s["totals"]["requests"].as_u64().unwrap();
    assert!(requests >= 100, "{}", s["totals"]);
    assert_eq!(
        attr_of_id(&dom, "kpi-requests", "data-value").as_deref(),
        Some(requests.to_string().as_str())
    );
    assert_eq!(
        attr_of_id(&dom, "kpi-p99", "data-value").as_deref(),
        Some(s["totals"]["latency_us"]["p99"].to_string().as_str())
    );
    for (name, st) in s["requests"].as_object().unwrap() {
        let row = regex::Regex::new(&format!(
            r#"(?s)<tr data-name="{}">.*?</tr>"#,
            regex::escape(name)
        ))
        .unwrap();
        let row = row
            .find(&dom[dom.find("class=\"steps\"").expect("steps table")..])
            .unwrap_or_else(|| panic!("no row for step {name}"))
            .as_str()
            .to_string();
        let n = st["requests"].as_u64().unwrap();
        let shown = format_thousands(n);
        assert!(
            row.contains(&format!("<span data-field=\"requests\">{shown}</span>")),
            "{row}"
        );
        let f = format_thousands(st["failed"].as_u64().unwrap());
        assert!(
            row.contains(&format!("<span data-field=\"failed\">{f}</span>")),
            "{row}"
        );
    }
    // The charts are drawn: one point per second of the timeline on each line.
    let seconds = s["timeline"].as_array().unwrap().len() as u64;
    assert!(seconds >= 3, "{seconds}");
    for chart in [
        "merged-latency",
        "merged-rps",
        "merged-errors",
        "merged-vus",
    ] {
        let pts = chart_points(&dom, chart);
        assert!(!pts.is_empty(), "chart {chart} has no lines");
        assert!(
            pts.iter().all(|p| *p == seconds),
            "{chart}: {pts:?} vs {seconds} s"
        );
    }
    assert_eq!(chart_points(&dom, "merged-latency").len(), 3, "p50/p90/p99");
    let node_lines = chart_points(&dom, "node-p99");
    assert_eq!(node_lines.len(), s["nodes"].as_array().unwrap().len());
    // Thresholds: one row each, the failed-rate one failing.
    assert!(dom.contains("id=\"verdict\""), "no verdict");
    assert!(dom.contains("thresholds FAILED"));
    assert_eq!(dom.matches("class=\"badge fail\">FAIL<").count(), 1);
    // The plan source is shown as text, never parsed as markup.
    assert!(
        dom.contains("&lt;/script&gt;&lt;b id=\"injected\"&gt;"),
        "plan source not escaped"
    );
    assert!(!dom.contains("<b id=\"injected\">"));
    assert!(dom.contains("name = \"report-check\""));
}

fn format_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
