//! Property tests (a fuzz pass on stable Rust) of what a plan's author controls and a
//! node parses: plan TOML → validate → compile (arbitrary bytes, and valid plans
//! mutated line by line and number by number), templates, and CSV / JSON-lines data.
//! The properties: nothing panics, every error is one line, valid data round-trips.
//!
//! Cases per target: `STAMPEDE_FUZZ_CASES` (default 256, the CI pass); `tools/fuzz.sh
//! DURATION` runs these targets again and again with larger counts and fresh seeds.

use std::collections::BTreeMap;

use proptest::prelude::*;
use proptest::test_runner::Config;
use rand::SeedableRng;
use stampede::plan::compile::{compile_from, DataFiles};
use stampede::plan::data::{self, DataFormat};
use stampede::plan::template::{JsonTemplate, RenderCtx, Scope, Template};
use stampede_protocol::plan::parse_plan;

fn cases() -> u32 {
    std::env::var("STAMPEDE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn config() -> Config {
    Config {
        cases: cases(),
        // Shrinking a failure is worth it; the persisted seeds go in the repo.
        max_shrink_iters: 2048,
        ..Config::default()
    }
}

/// A valid plan using every kind of section, with its data file.
const PLAN: &str = r#"name = "fuzz"
seed = 7

[defaults]
base_url = "http://127.0.0.1:9"
timeout = "2s"
headers = { "x-run" = "{{ node }}" }
max_redirects = 3

[data.accounts]
file = "accounts.csv"
mode = "unique"
on_exhausted = "stop"

[data.users]
file = "users.jsonl"

[scenarios.browse]
executor = "ramping-arrival-rate"
start_rate = 1
stages = [{ target = 20, duration = "10s" }, { target = 0, duration = "5s" }]
max_vus = 50
pre_allocated_vus = 10
flows = [{ flow = "shop", weight = 3 }, { flow = "login", weight = 1 }]

[scenarios.steady]
executor = "constant-vus"
vus = 4
duration = "30s"
start_after = "5s"
graceful_stop = "2s"
flow = "login"

[scenarios.batch]
executor = "per-vu-iterations"
vus = 2
iterations = 10
max_duration = "1m"
flow = "shop"

[flows.shop]
steps = [
  { name = "search", request = { url = "/products?q={{ users.name }}&n={{ random_int(1, 9) }}" }, check = { status = 200, body_contains = "id" }, extract = { first = { json = "$[0].id" } }, think = "1ms..5ms" },
  { name = "item", request = { url = "/products/{{ first }}", headers = { accept = "application/json" } }, check = { json = { "$.id" = 1 } } },
]

[flows.login]
steps = [
  { request = { method = "POST", url = "/login", json = { user = "{{ accounts.user }}", password = "{{ accounts.password }}", n = "{{ vu }}" } }, extract = { token = { regex = "token\":\"([^\"]+)" } } },
  { request = { method = "POST", url = "/cart", form = { product = "{{ iteration }}", id = "{{ uuid() }}" }, timeout = "1s" }, check = { status = [200, 201] } },
]

[thresholds]
"http_req_duration" = ["p(95) < 200", "max < 2000"]
"checks" = ["rate > 0.9"]

[requirements]
min_nodes = 1
"#;

fn files() -> BTreeMap<String, Vec<u8>> {
    let mut accounts = String::from("user,password\n");
    for i in 0..64 {
        accounts.push_str(&format!("user{i},\"pa,ss{i}\"\n"));
    }
    let users = "{\"name\":\"ann\",\"age\":3}\n{\"name\":\"bob\"}\n";
    [
        ("accounts.csv".to_string(), accounts.into_bytes()),
        ("users.jsonl".to_string(), users.as_bytes().to_vec()),
    ]
    .into()
}

/// Parses and compiles the text as a mesh node would (data only from `files`); the
/// only property is: no panic, and an error is one line naming the plan.
fn check_plan(src: &str, files: &BTreeMap<String, Vec<u8>>) -> Result<(), TestCaseError> {
    let result = parse_plan("p.toml", src)
        .and_then(|plan| compile_from(plan, "p.toml", DataFiles::Bundle(files)).map(|_| ()));
    if let Err(e) = result {
        let text = e.to_string();
        prop_assert!(
            !text.contains('\n') && !text.contains('\r'),
            "error is not one line: {text:?}"
        );
        prop_assert!(
            text.starts_with("p.toml"),
            "error does not name the plan: {text}"
        );
    }
    Ok(())
}

/// Values that break naive arithmetic and parsers.
fn hostile_number() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1e12".to_string()),
        Just("1000000000000".to_string()),
        Just("18446744073709551615".to_string()),
        Just("9223372036854775807".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("0.0001".to_string()),
        Just("\"100000000000000000s\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"1ns\"".to_string()),
        Just("\"720h\"".to_string()),
        Just("\"720h0m0.000000001s\"".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
    ]
}

/// One edit of a valid plan.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the n-th number (or quoted duration) with a hostile value.
    Number(usize, String),
    DeleteLine(usize),
    DuplicateLine(usize),
    /// Insert text at a byte position (moved to a char boundary).
    Insert(usize, String),
    /// Cut the plan at a byte position.
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0usize..200, hostile_number()).prop_map(|(i, v)| Mutation::Number(i, v)),
        1 => (0usize..200).prop_map(Mutation::DeleteLine),
        1 => (0usize..200).prop_map(Mutation::DuplicateLine),
        2 => (0usize..8000, "[\\[\\]{}=\",.\n#a-z0-9 {}]{0,12}").prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => (0usize..8000).prop_map(Mutation::Truncate),
    ]
}

fn boundary(s: &str, at: usize) -> usize {
    let mut at = at % (s.len() + 1);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(src: &str, m: &Mutation) -> String {
    match m {
        Mutation::Number(n, v) => {
            // Numbers and quoted durations: the places where bounds matter.
            let re = regex::Regex::new(r#"-?\b\d+(\.\d+)?\b|"\d+(\.\d+)?(ms|s|m|h|d)""#).unwrap();
            let spots: Vec<_> = re.find_iter(src).collect();
            if spots.is_empty() {
                return src.to_string();
            }
            let spot = &spots[n % spots.len()];
            format!("{}{}{}", &src[..spot.start()], v, &src[spot.end()..])
        }
        Mutation::DeleteLine(n) | Mutation::DuplicateLine(n) => {
            let mut lines: Vec<&str> = src.lines().collect();
            if lines.is_empty() {
                return src.to_string();
            }
            let i = n % lines.len();
            if matches!(m, Mutation::DeleteLine(_)) {
                lines.remove(i);
            } else {
                lines.insert(i, lines[i]);
            }
            lines.join("\n")
        }
        Mutation::Insert(at, text) => {
            let at = boundary(src, *at);
            format!("{}{}{}", &src[..at], text, &src[at..])
        }
        Mutation::Truncate(at) => src[..boundary(src, *at)].to_string(),
    }
}

#[test]
fn the_seed_plan_is_valid() {
    let plan = parse_plan("p.toml", PLAN).unwrap();
    compile_from(plan, "p.toml", DataFiles::Bundle(&files())).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_plan_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_plan(&String::from_utf8_lossy(&bytes), &files())?;
    }

    #[test]
    fn fuzz_plan_mutations(ms in proptest::collection::vec(mutation(), 1..6)) {
        let mut src = PLAN.to_string();
        for m in &ms {
            src = apply(&src, m);
        }
        check_plan(&src, &files())?;
    }
}

fn scope() -> Scope {
    let mut s = Scope::new();
    s.add_feeder("accounts", &["user".to_string(), "password".to_string()]);
    s.add_var("token");
    s
}

/// Template source made mostly of template syntax, so holes are reached often.
fn template_source() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("{{".to_string()),
        Just("}}".to_string()),
        Just("{{ token }}".to_string()),
        Just("{{ accounts.user }}".to_string()),
        Just("{{ accounts.nope }}".to_string()),
        Just("{{ vu }}".to_string()),
        Just("{{ uuid() }}".to_string()),
        Just("{{ timestamp_ms() }}".to_string()),
        (any::<i64>(), any::<i64>()).prop_map(|(a, b)| format!("{{{{ random_int({a}, {b}) }}}}")),
        Just("random_int(".to_string()),
        Just(",".to_string()),
        Just(")".to_string()),
        Just(".".to_string()),
        "[a-z_ ]{0,6}",
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn render(t: &Template) -> String {
    let vars = vec![Some("tok".to_string())];
    let row = vec!["u1".to_string(), "p\"1".to_string()];
    let rows = [Some(row.as_slice())];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut ctx = RenderCtx {
        vu: u64::MAX,
        iteration: u64::MAX,
        node: "n",
        vars: &vars,
        rows: &rows,
        rng: &mut rng,
    };
    t.render_to_string(&mut ctx)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_templates(src in template_source()) {
        match Template::compile(&src, &scope()) {
            Ok(t) => {
                let out = render(&t);
                if t.is_static() {
                    prop_assert_eq!(out, src);
                }
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(!text.contains('\n'), "error is not one line: {text:?}");
            }
        }
    }

    #[test]
    fn fuzz_json_templates(src in template_source(), key in "[a-z]{1,4}") {
        let value = serde_json::json!({ key: [src.clone(), { "k": src }] });
        if let Ok(t) = JsonTemplate::compile(&value, &scope()) {
            let vars = vec![Some("tok\"\n".to_string())];
            let row = vec!["u1".to_string(), "p\\1".to_string()];
            let rows = [Some(row.as_slice())];
            let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
            let mut ctx = RenderCtx { vu: 1, iteration: 0, node: "n", vars: &vars, rows: &rows, rng: &mut rng };
            let mut out = Vec::new();
            t.render_json(&mut ctx, &mut out);
            // Whatever the holes rendered, the body is JSON.
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(),
                "not JSON: {}", String::from_utf8_lossy(&out));
        }
    }
}

/// A data error is one line and names the feeder.
fn check_data_error(e: &data::DataError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        !text.contains('\n') && !text.contains('\r'),
        "error is not one line: {text:?}"
    );
    prop_assert!(text.starts_with("data.d"), "{text}");
    Ok(())
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) || f.trim() != f || f.is_empty() {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_csv_bytes(bytes in proptest::collection::vec(
        prop_oneof![Just(b','), Just(b'"'), Just(b'\n'), Just(b'\r'), any::<u8>()], 0..512)) {
        if let Err(e) = data::parse("d", "d.csv", &bytes, DataFormat::Csv) {
            check_data_error(&e)?;
        }
    }

    #[test]
    fn fuzz_jsonl_bytes(bytes in proptest::collection::vec(
        prop_oneof![Just(b'{'), Just(b'}'), Just(b'"'), Just(b':'), Just(b'\n'), any::<u8>()], 0..512)) {
        if let Err(e) = data::parse("d", "d.jsonl", &bytes, DataFormat::JsonLines) {
            check_data_error(&e)?;
        }
    }

    /// Any table written with CSV quoting reads back as written.
    #[test]
    fn fuzz_csv_round_trip(
        cols in 1usize..5,
        cells in proptest::collection::vec(any::<String>(), 1..40),
        crlf in any::<bool>(),
    ) {
        let header: Vec<String> = (0..cols).map(|i| format!("c{i}")).collect();
        let rows: Vec<Vec<String>> = cells.chunks(cols).filter(|c| c.len() == cols).map(|c| c.to_vec()).collect();
        prop_assume!(!rows.is_empty());
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut text = header.join(",") + nl;
        for r in &rows {
            text.push_str(&r.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
            text.push_str(nl);
        }
        let set = data::parse("d", "d.csv", text.as_bytes(), DataFormat::Csv).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&set.columns, &header);
        prop_assert_eq!(set.len(), rows.len());
        for (i, r) in rows.iter().enumerate() {
            prop_assert_eq!(set.row(i).unwrap(), r.as_slice());
        }
    }
}
