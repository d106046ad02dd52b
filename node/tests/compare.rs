//! `stampede compare` on two real runs of the demo shop, with the shop's latency knob
//! raised between them: the p99 rule fires (exit 99, the rule and the row named), rules
//! about what did not change stay quiet, and a file that is not a summary is one clear
//! usage error. The second run embeds the first as the HTML report's baseline.

mod browser_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use stampede_tools::{Latency, TargetConfig};

const BIN: &str = env!("CARGO_BIN_EXE_stampede");

fn plan(dir: &Path, url: &str) -> PathBuf {
    let plan = dir.join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"name = "compare-check"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = 40
duration = "2s"
max_vus = 30
flow = "shop"
[[flows.shop.steps]]
name = "product"
request = {{ url = "/products/{{{{ random_int(1, 1000) }}}}" }}
check = {{ status = 200 }}
[[flows.shop.steps]]
name = "search"
request = {{ url = "/products", query = {{ q = "shoe" }} }}
check = {{ status = 200 }}
"#
        ),
    )
    .unwrap();
    plan
}

fn run(plan: &Path, extra: &[String]) -> Output {
    let out = Command::new(BIN)
        .arg("run")
        .arg(plan)
        .arg("--quiet")
        .args(extra)
        .output()
        .expect("run stampede");
    assert_eq!(
        out.status.code(),
        Some(0),
        "run failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn compare(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("compare")
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run stampede compare");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn compare_fires_the_p99_rule_when_the_shop_got_slower() {
    let tmp = tempfile::tempdir().unwrap();
    let target = stampede_tools::spawn(TargetConfig::default()).expect("target");
    let plan = plan(tmp.path(), &target.url());
    let base = tmp.path().join("base.json");
    let new = tmp.path().join("new.json");
    let html = tmp.path().join("report.html");

    target.set_latency(Latency::Fixed(Duration::from_millis(2)));
    run(&plan, &[format!("--out=json={}", base.display())]);
    target.set_latency(Latency::Fixed(Duration::from_millis(150)));
    run(
        &plan,
        &[
            format!("--out=json={}", new.display()),
            format!("--out=html={}", html.display()),
            format!("--baseline={}", base.display()),
        ],
    );
    let (b, n) = (base.to_str().unwrap(), new.to_str().unwrap());

    // The latency rose from ~2 ms to 150 ms: p99 is far above +30 % on every row, even
    // when a loaded machine puts the base run's p99 near 100 ms.
    let (code, stdout, stderr) = compare(&[
        b,
        n,
        "--fail-on",
        "p99{total} > +30%",
        "--fail-on",
        "error_rate > +0.5pp",
        "--fail-on",
        "rps{total} < -20%",
    ]);
    assert_eq!(code, Some(99), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("rule 'p99{total} > +30%' fired on total: p99 "),
        "{stderr}"
    );
    assert!(
        !stderr.contains("error_rate") && !stderr.contains("rps"),
        "only the latency rule fires: {stderr}"
    );
    for row in ["total", "flow shop", "request product", "request search"] {
        assert!(
            stdout.lines().any(|l| l == row),
            "row {row} in the table:\n{stdout}"
        );
    }
    assert!(!stdout.contains('\x1b'), "NO_COLOR and a pipe: no colour");

    // An unscoped rule names every row it fired on; the same run against itself is quiet.
    let (code, _, stderr) = compare(&[b, n, "--fail-on", "p99 > +30%"]);
    assert_eq!(code, Some(99));
    assert!(stderr.contains("fired on request search: p99"), "{stderr}");
    let (code, _, stderr) = compare(&[b, b, "--fail-on", "p99 > +30%"]);
    assert_eq!(code, Some(0), "{stderr}");

    let (code, stdout, _) = compare(&[b, n, "--format", "json", "--fail-on", "p50 > +20ms"]);
    assert_eq!(code, Some(99));
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["passed"], false);
    assert_eq!(j["rows"][0]["row"], "total");
    let p99 = &j["rows"][0]["cells"][3];
    assert_eq!(p99["metric"], "p99");
    assert!(
        p99["new"].as_f64().unwrap() >= 150_000.0
            && p99["new"].as_f64().unwrap() > p99["base"].as_f64().unwrap(),
        "{p99}"
    );
    let (code, stdout, _) = compare(&[b, n, "--format", "markdown"]);
    assert_eq!(code, Some(0), "no rule, no failure");
    assert!(stdout.contains("| total | p99 |"), "{stdout}");

    // Not a summary, and a bad rule: usage errors (exit 2) that say what is wrong.
    let (code, _, stderr) = compare(&[b, plan.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("plan.toml: not a stampede JSON summary"),
        "{stderr}"
    );
    let (code, _, stderr) = compare(&[b, n, "--fail-on", "p99 >> 5"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--fail-on 'p99 >> 5'"), "{stderr}");

    // The HTML report carries the baseline run for its comparison section.
    let report = std::fs::read_to_string(&html).unwrap();
    let base_id =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&base).unwrap())
            .unwrap()["run_id"]
            .as_str()
            .unwrap()
            .to_string();
    let embedded = report
        .split("<script type=\"application/json\" id=\"baseline\">")
        .nth(1)
        .and_then(|r| r.split("</script>").next())
        .expect("the report embeds the baseline");
    let embedded: serde_json::Value = serde_json::from_str(embedded).unwrap();
    assert_eq!(embedded["run_id"], base_id.as_str());
    assert!(embedded.get("plan_source").is_none());

    // Opened offline in a browser: the comparison section draws both runs.
    let Some(browser) =
        browser_support::chromium("compare_fires_the_p99_rule_when_the_shop_got_slower")
    else {
        return;
    };
    let dom = browser_support::dump_dom(&browser, &format!("file://{}", html.display()), 0, true);
    assert!(
        dom.contains(&format!("baseline run <code>{base_id}</code>")),
        "the section names the baseline run"
    );
    assert!(
        dom.contains("<tr data-row=\"total\" data-metric=\"p99\" class=\"worse\">"),
        "the slower p99 is marked worse"
    );
    let lines = browser_support::chart_points(&dom, "baseline-latency");
    assert_eq!(
        lines.len(),
        2,
        "this run's p99 and the baseline's: {lines:?}"
    );
    assert!(lines.iter().all(|&n| n >= 2), "{lines:?}");
}
