//! RFC 9535 JSON paths and stampede's `.length()` on a real run against the demo shop:
//! a filter picks a product id out of a search, `.length()` counts the results, and the
//! next requests use both (an unset variable would make them 404).

use std::process::Command;

use stampede_tools::TargetConfig;

const BIN: &str = env!("CARGO_BIN_EXE_stampede");

#[test]
fn filters_and_length_extract_and_check_on_real_responses() {
    let tmp = tempfile::tempdir().unwrap();
    let target = stampede_tools::spawn(TargetConfig::default()).expect("target");
    let plan = tmp.path().join("plan.toml");
    std::fs::write(
        &plan,
        format!(
            r#"name = "json-paths"
[defaults]
base_url = "{url}"
timeout = "5s"
[scenarios.once]
executor = "per-vu-iterations"
vus = 1
iterations = 3
flow = "shop"
[[flows.shop.steps]]
name = "search"
request = {{ url = "/products", query = {{ q = "" }} }}
check = {{ status = 200, json = {{ "$.length()" = {limit} }} }}
extract = {{ count = {{ json = "$.length()" }}, id = {{ json = "$[?@.id > 5].id" }} }}
[[flows.shop.steps]]
name = "by count"
request = {{ url = "/products/{{{{ count }}}}" }}
check = {{ status = 200 }}
[[flows.shop.steps]]
name = "by filter"
request = {{ url = "/products/{{{{ id }}}}" }}
check = {{ status = 200, json = {{ "$.id" = 6 }} }}
"#,
            url = target.url(),
            limit = stampede_tools::SEARCH_LIMIT,
        ),
    )
    .unwrap();
    let json = tmp.path().join("summary.json");
    let out = Command::new(BIN)
        .arg("run")
        .arg(&plan)
        .arg("--quiet")
        .arg(format!("--out=json={}", json.display()))
        .output()
        .expect("run stampede");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("summary")).unwrap();
    let t = &s["totals"];
    assert_eq!(
        out.status.code(),
        Some(0),
        "{t}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(t["requests"], 9, "{t}");
    assert_eq!(t["failed"], 0, "{t}");
    assert_eq!(t["checks"]["failed"], 0, "{t}");
    // status on each request, plus the two JSON checks.
    assert_eq!(t["checks"]["passed"], 5 * 3, "{t}");
}
