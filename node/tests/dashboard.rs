//! The live dashboard, `/api/live` and `/metrics` of real `stampede node` processes
//! during and after a real mesh run against a real stampede-target, with the nodes
//! labelled region=eu and region=us: headless Chromium shows numbers that move and agree
//! with `/api/live`; `/metrics` parses as Prometheus text and its counters equal the
//! JSON summary; the regions stay separate in the summary, the API and the metrics.
//!
//! Set STAMPEDE_SCREENSHOTS=DIR to also save screenshots of the dashboard and of the
//! run's report there (how docs/screenshots/ is made).

mod browser_support;
mod mesh_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use browser_support::{
    attr_of_id, chart_points, chromium, dump_dom, http_get, screenshot, sse_messages,
};
use mesh_support::{all_see, wait_until, Mesh, Node, BIN};
use serde_json::Value;
use stampede_tools::TargetConfig;

const NODE_ENV: &[(&str, &str)] = &[("STAMPEDE_CAPACITY", "1")];

fn http_addr(n: &Node) -> String {
    n.control().expect("node up")["http"]
        .as_str()
        .expect("the node serves HTTP")
        .to_string()
}

fn api(addr: &str) -> Value {
    let (status, body) = http_get(addr, "/api/live");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/api/live is JSON")
}

/// Requests so far in the newest run the node shows.
fn live_requests(v: &Value) -> u64 {
    v["runs"][0]["totals"]["requests"].as_u64().unwrap_or(0)
}

fn wait_child(mut c: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while matches!(c.try_wait(), Ok(None)) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    c.wait_with_output().expect("CLI output")
}

#[test]
fn dashboard_api_and_metrics_show_a_live_mesh_run_per_node_and_region() {
    let mesh = Mesh::new();
    let eu = mesh.node("eu-1", &["--label", "region=eu"], NODE_ENV);
    let a = eu.addr();
    let us = mesh.node(
        "us-1",
        &["--bootstrap", a.as_str(), "--label", "region=us"],
        NODE_ENV,
    );
    let ids = vec![eu.peer_id(), us.peer_id()];
    assert!(
        wait_until(Duration::from_secs(30), || all_see(&[&eu, &us], &ids)),
        "the mesh did not form"
    );
    let addr = http_addr(&eu);
    let target = stampede_tools::spawn(TargetConfig::default()).expect("target");
    let plan = mesh.tmp.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"
name = "dashboard-check"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.steady]
executor = "constant-arrival-rate"
rate = 30
# Long enough that the checks on the live page still see the run going when a
# Chromium run had to be retried (see browser_support::dump_dom).
duration = "60s"
max_vus = 50
flow = "shop"
[[flows.shop.steps]]
name = "product"
request = {{ url = "/products/{{{{ random_int(1, 1000) }}}}" }}
check = {{ status = 200 }}
"#,
            url = target.url()
        ),
    )
    .unwrap();
    let json = mesh.tmp.path().join("summary.json");
    let html = mesh.tmp.path().join("report.html");
    let cli = Command::new(BIN)
        .args(["run", "--mesh", "--quiet", "--data-dir"])
        .arg(&eu.dir)
        .arg(&plan)
        .arg("--out")
        .arg(format!("json={}", json.display()))
        .arg("--out")
        .arg(format!("html={}", html.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stampede run --mesh");

    // The run shows up live, with both nodes' own timelines.
    assert!(
        wait_until(Duration::from_secs(60), || {
            let v = api(&addr);
            v["runs"][0]["phase"] == "running"
                && live_requests(&v) > 0
                && v["runs"][0]["per_node"]
                    .as_object()
                    .is_some_and(|m| m.len() == 2)
        }),
        "no live run with two nodes on /api/live: {}",
        api(&addr)
    );
    let v = api(&addr);
    let run_id = v["runs"][0]["run_id"].as_str().unwrap().to_string();
    let members: BTreeSet<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, BTreeSet::from(["eu-1", "us-1"]));

    // `/events` streams the same document once per second, moving with the run.
    let msgs = sse_messages(&addr, "/events", 3, Duration::from_secs(20));
    assert_eq!(msgs.len(), 3, "server-sent events: {msgs:?}");
    let counts: Vec<u64> = msgs
        .iter()
        .map(|m| live_requests(&serde_json::from_str(m).expect("event is JSON")))
        .collect();
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    assert!(counts[2] > counts[0], "events did not move: {counts:?}");

    let test = "dashboard_api_and_metrics_show_a_live_mesh_run_per_node_and_region";
    if let Some(browser) = chromium(test) {
        let url = format!("http://{addr}/");
        let before = live_requests(&api(&addr));
        // The page embeds the live document and renders it at load: no virtual time
        // needed (and none of Chromium's virtual-time hangs).
        let dom1 = dump_dom(&browser, &url, 0, false);
        let after = live_requests(&api(&addr));
        let shown1: u64 = attr_of_id(&dom1, "kpi-requests", "data-value")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no requests figure on the dashboard:\n{dom1}"));
        assert!(
            (before..=after).contains(&shown1),
            "dashboard shows {shown1} requests; /api/live said {before} then {after}"
        );
        assert!(
            dom1.contains(&format!("data-run=\"{run_id}\"")),
            "run not shown"
        );
        for m in ["eu-1", "us-1"] {
            assert!(dom1.contains(&format!("data-member=\"{m}\"")), "member {m}");
            assert!(dom1.contains(&format!("data-node=\"{m}\"")), "node row {m}");
        }
        assert!(dom1.contains("region=eu") && dom1.contains("region=us"));
        assert!(
            dom1.contains("data-label-key=\"region\""),
            "no per-region table"
        );
        assert!(
            chart_points(&dom1, "live-merged-rps")
                .first()
                .is_some_and(|p| *p >= 1),
            "live throughput chart not drawn"
        );
        assert_eq!(
            chart_points(&dom1, "live-node-p99").len(),
            2,
            "per-node lines"
        );
        if let Ok(dir) = std::env::var("STAMPEDE_SCREENSHOTS") {
            let _ = std::fs::create_dir_all(&dir);
            screenshot(
                &browser,
                &url,
                &Path::new(&dir).join("dashboard.png"),
                1000,
                false,
            );
        }
        // Later, the page shows more.
        assert!(
            wait_until(Duration::from_secs(30), || live_requests(&api(&addr))
                > shown1 + 30),
            "the run stopped progressing"
        );
        let before = live_requests(&api(&addr));
        let dom2 = dump_dom(&browser, &url, 0, false);
        let after = live_requests(&api(&addr));
        let shown2: u64 = attr_of_id(&dom2, "kpi-requests", "data-value")
            .and_then(|v| v.parse().ok())
            .expect("requests figure");
        assert!(
            shown2 > shown1,
            "dashboard did not move: {shown1} then {shown2}"
        );
        assert!(
            (before..=after).contains(&shown2),
            "dashboard shows {shown2}; /api/live said {before} then {after}"
        );
    }

    let out = wait_child(cli, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "run failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let total = s["totals"]["requests"].as_u64().unwrap();
    assert_eq!(total, target.requests());
    assert_eq!(s["totals"]["failed"], 0);

    // Regions stay separate: node labels and by_label in the summary.
    let mut by_node = BTreeMap::new();
    for n in s["nodes"].as_array().unwrap() {
        let region = n["labels"]["region"].as_str().unwrap().to_string();
        assert_eq!(region, if n["name"] == "eu-1" { "eu" } else { "us" }, "{n}");
        by_node.insert(
            n["name"].as_str().unwrap().to_string(),
            n["requests"].as_u64().unwrap(),
        );
        assert!(
            n["timeline"].as_array().unwrap().len() >= 20,
            "node timeline"
        );
    }
    let eu_n = s["by_label"]["region"]["eu"]["requests"].as_u64().unwrap();
    let us_n = s["by_label"]["region"]["us"]["requests"].as_u64().unwrap();
    assert_eq!(eu_n, by_node["eu-1"]);
    assert_eq!(us_n, by_node["us-1"]);
    assert_eq!(eu_n + us_n, total);

    // The live view ends where the summary does.
    let v = api(&addr);
    let run = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run_id"] == run_id.as_str())
        .expect("run still listed");
    assert_eq!(run["totals"]["requests"].as_u64(), Some(total));
    assert_eq!(
        run["by_label"]["region"]["eu"]["requests"].as_u64(),
        Some(eu_n)
    );
    assert_eq!(v["recent"][0]["run_id"], run_id.as_str());
    let (status, report) = http_get(&addr, &format!("/runs/{run_id}/report.html"));
    assert_eq!(status, 200);
    assert!(report.contains(&run_id) && report.contains("id=\"summary\""));
    let (status, _) = http_get(&addr, "/runs/nope/report.html");
    assert_eq!(status, 404);

    // /metrics: strict text format, counters equal to the summary.
    let (status, text) = http_get(&addr, "/metrics");
    assert_eq!(status, 200);
    let families = strict_parse(&text);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus-parse accepts /metrics");
    let sum = |metric: &str, filter: &dyn Fn(&prometheus_parse::Labels) -> bool| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|x| x.metric == metric && filter(&x.labels))
            .map(|x| match x.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let all = |_: &prometheus_parse::Labels| true;
    let this_run = |l: &prometheus_parse::Labels| l.get("run") == Some(run_id.as_str());
    assert_eq!(sum("stampede_requests_total", &this_run), total as f64);
    assert_eq!(sum("stampede_requests_total", &all), total as f64);
    assert_eq!(
        sum("stampede_request_failures_total", &this_run),
        s["totals"]["failed"].as_f64().unwrap()
    );
    assert_eq!(
        sum("stampede_iterations_total", &this_run),
        s["totals"]["iterations"].as_f64().unwrap()
    );
    assert_eq!(
        sum("stampede_dropped_iterations_total", &this_run),
        s["totals"]["dropped_iterations"].as_f64().unwrap()
    );
    for (node, region, n) in [("eu-1", "eu", eu_n), ("us-1", "us", us_n)] {
        assert_eq!(
            sum("stampede_requests_total", &|l| l.get("node") == Some(node)),
            n as f64
        );
        assert_eq!(
            sum("stampede_requests_total", &|l| l.get("label_region")
                == Some(region)),
            n as f64
        );
    }
    assert_eq!(
        sum("stampede_checks_total", &|l| l.get("result")
            == Some("passed")),
        total as f64
    );
    // The histogram counts every request, and its buckets are cumulative.
    let hist = &families["stampede_request_duration_seconds"];
    assert_eq!(hist.kind, "histogram");
    let count: f64 = hist
        .samples
        .iter()
        .filter(|(n, _, _)| n.ends_with("_count"))
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(count, total as f64);
    assert!(families.contains_key("stampede_mesh_size"));
}

/// One histogram series: (le, cumulative count) and its `_count`.
type Buckets = (Vec<(f64, f64)>, Option<f64>);

struct Family {
    kind: String,
    /// (sample name, labels, value)
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

/// A strict reader of the text exposition format 0.0.4: every line is HELP, TYPE or a
/// sample; HELP and TYPE come once per family, before its samples, and a family's
/// samples are contiguous; label values are properly escaped; histogram buckets are
/// cumulative with ascending `le` and end at `+Inf` equal to `_count`.
fn strict_parse(text: &str) -> BTreeMap<String, Family> {
    let name_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*";
    let help = regex::Regex::new(&format!(r"^# HELP ({name_re}) \S.*$")).unwrap();
    let typ = regex::Regex::new(&format!(
        r"^# TYPE ({name_re}) (counter|gauge|histogram|summary|untyped)$"
    ))
    .unwrap();
    let sample = regex::Regex::new(&format!(
        r#"^({name_re})(?:\{{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*)?\}})? (\S+)$"#
    ))
    .unwrap();
    let label = regex::Regex::new(r#"([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)""#).unwrap();
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut closed = BTreeSet::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for line in text.lines() {
        if let Some(c) = help.captures(line) {
            assert!(helped.insert(c[1].to_string()), "HELP twice: {line}");
            continue;
        }
        if let Some(c) = typ.captures(line) {
            let name = c[1].to_string();
            assert!(!fams.contains_key(&name), "TYPE twice: {line}");
            if let Some(prev) = current.replace(name.clone()) {
                closed.insert(prev);
            }
            fams.insert(
                name,
                Family {
                    kind: c[2].to_string(),
                    samples: Vec::new(),
                },
            );
            continue;
        }
        let c = sample
            .captures(line)
            .unwrap_or_else(|| panic!("not a valid exposition line: {line:?}"));
        let sname = c[1].to_string();
        let value: f64 = match &c[3] {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let labels: BTreeMap<String, String> = c
            .get(2)
            .map(|m| {
                label
                    .captures_iter(m.as_str())
                    .map(|l| (l[1].to_string(), l[2].to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let fam = current.clone().expect("sample before any TYPE");
        let f = fams.get_mut(&fam).unwrap();
        let ok = sname == fam
            || (f.kind == "histogram"
                && [
                    format!("{fam}_bucket"),
                    format!("{fam}_sum"),
                    format!("{fam}_count"),
                ]
                .contains(&sname));
        assert!(ok, "sample {sname} inside family {fam} ({})", f.kind);
        assert!(!closed.contains(&fam));
        f.samples.push((sname, labels, value));
    }
    for (name, f) in &fams {
        assert!(helped.contains(name), "no HELP for {name}");
        if f.kind != "histogram" {
            continue;
        }
        // Group buckets by their labels without `le`.
        let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
        for (sname, labels, v) in &f.samples {
            let key: Vec<(String, String)> = labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let e = series.entry(key).or_default();
            if sname.ends_with("_bucket") {
                let le = &labels["le"];
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("numeric le")
                };
                e.0.push((le, *v));
            } else if sname.ends_with("_count") {
                e.1 = Some(*v);
            }
        }
        for (key, (buckets, count)) in series {
            assert!(
                buckets.windows(2).all(|w| w[0].0 < w[1].0),
                "le order {key:?}"
            );
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "cumulative {key:?}"
            );
            let last = buckets.last().expect("buckets");
            assert!(last.0.is_infinite(), "no +Inf bucket {key:?}");
            assert_eq!(Some(last.1), count, "+Inf != _count {key:?}");
        }
    }
    fams
}
