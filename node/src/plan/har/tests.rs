use super::*;
use serde_json::json;

/// One HAR entry: `(method, url, request headers, post (mime, text), status, response
/// headers, response (mime, text), ms since the start)`.
struct E<'a> {
    method: &'a str,
    url: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    post: Option<(&'a str, &'a str)>,
    status: u16,
    resp_headers: Vec<(&'a str, &'a str)>,
    resp: (&'a str, &'a str),
    at_ms: u64,
    kind: &'a str,
}

fn e<'a>(method: &'a str, url: &'a str, at_ms: u64) -> E<'a> {
    E {
        method,
        url,
        headers: vec![],
        post: None,
        status: 200,
        resp_headers: vec![],
        resp: ("application/json", "{}"),
        at_ms,
        kind: "",
    }
}

fn har(entries: &[E]) -> String {
    let nv = |v: &[(&str, &str)]| -> Value {
        v.iter()
            .map(|(n, v)| json!({ "name": n, "value": v }))
            .collect()
    };
    let list: Vec<Value> = entries
        .iter()
        .map(|x| {
            let mut req = json!({ "method": x.method, "url": x.url, "headers": nv(&x.headers) });
            if let Some((m, t)) = x.post {
                req["postData"] = json!({ "mimeType": m, "text": t });
            }
            let ms = x.at_ms;
            let mut v = json!({
                "startedDateTime": format!("2026-12-05T10:00:{:02}.{:03}Z", ms / 1000, ms % 1000),
                "time": 5,
                "request": req,
                "response": { "status": x.status, "headers": nv(&x.resp_headers),
                              "content": { "mimeType": x.resp.0, "text": x.resp.1 } },
            });
            if !x.kind.is_empty() {
                v["_resourceType"] = json!(x.kind);
            }
            v
        })
        .collect();
    json!({ "log": { "version": "1.2", "creator": { "name": "t", "version": "1" }, "entries": list } })
        .to_string()
}

fn opts() -> Options {
    Options {
        name: "t".into(),
        ..Options::default()
    }
}

/// Imports and checks that the plan compiles as `stampede validate` would.
fn plan(entries: &[E], o: &Options) -> String {
    let p = import(&har(entries), o).expect("import").plan;
    if let Err(e) = crate::commands::compile_text("t.toml", &p, &[], std::path::Path::new(".")) {
        panic!("the plan does not validate: {e}\n{p}");
    }
    p
}

fn login_journey<'a>() -> Vec<E<'a>> {
    let mut login = e("POST", "http://127.0.0.1:8080/login", 0);
    login.post = Some(("application/json", r#"{"user":"user1","password":"pass1"}"#));
    login.resp = ("application/json", r#"{"token":"1.7.00ab34cd56ef7890"}"#);
    let mut cart = e("POST", "http://127.0.0.1:8080/cart", 1500);
    cart.headers = vec![
        ("Authorization", "Bearer 1.7.00ab34cd56ef7890"),
        ("Content-Type", "application/json"),
        ("Accept", "application/json"),
    ];
    cart.post = Some(("application/json", r#"{"product":103,"qty":1}"#));
    let mut account = e("GET", "http://127.0.0.1:8080/account", 2000);
    account.headers = vec![("authorization", "Bearer 1.7.00ab34cd56ef7890")];
    vec![login, cart, account]
}

#[test]
fn a_token_from_a_response_is_extracted_and_templated() {
    let p = plan(&login_journey(), &opts());
    assert!(
        p.contains("extract = { token = { json = \"$.token\" } }"),
        "{p}"
    );
    assert_eq!(
        p.matches("authorization = \"Bearer {{ token }}\"").count(),
        2,
        "{p}"
    );
    assert!(
        p.contains(
            "# token: a value of this response (json $.token), sent again in step 2, step 3"
        ),
        "{p}"
    );
    assert!(
        !p.contains("00ab34cd56ef7890"),
        "the recorded token is gone: {p}"
    );
    assert!(p.contains("base_url = \"http://127.0.0.1:8080\""), "{p}");
    assert!(p.contains("url = \"/login\""), "{p}");
    // Think times from the recorded gaps (start of the next minus end of this one).
    assert!(p.contains("think = \"1495ms\""), "{p}");
    assert!(p.contains("think = \"495ms\""), "{p}");
}

#[test]
fn without_correlation_the_recorded_values_stay() {
    let o = Options {
        no_correlate: true,
        ..opts()
    };
    let p = plan(&login_journey(), &o);
    assert!(!p.contains("extract"), "{p}");
    assert!(p.contains("Bearer 1.7.00ab34cd56ef7890"), "{p}");
}

#[test]
fn values_the_client_sent_first_and_small_numbers_are_not_correlated() {
    let mut search = e("GET", "http://h/products?q=user1234&page=2", 0);
    search.resp = (
        "application/json",
        r#"{"echo":"user1234","page":2,"items":[{"id":104}]}"#,
    );
    let mut next = e("GET", "http://h/products?q=user1234&page=2", 100);
    next.resp = ("application/json", "[]");
    let product = e("GET", "http://h/products/104", 200);
    let p = plan(&[search, next, product], &opts());
    // user1234 was typed by the user before any response had it; 2 is too short.
    assert!(
        p.contains("query = { q = \"user1234\", page = \"2\" }"),
        "{p}"
    );
    assert_eq!(p.matches("query = { q = \"user1234\"").count(), 2, "{p}");
    // 104 came from the first response, at its JSON path.
    assert!(
        p.contains("extract = { id = { json = \"$.items[0].id\" } }"),
        "{p}"
    );
    assert!(p.contains("url = \"/products/{{ id }}\""), "{p}");
    assert!(p.contains("name = \"GET /products/{id}\""), "{p}");
}

#[test]
fn numbers_in_json_bodies_stay_numbers_and_header_sources_work() {
    let mut first = e("GET", "http://h/form", 0);
    first.resp_headers = vec![
        ("X-CSRF-Token", "abc123def456"),
        ("Date", "Sat, 05 Dec 2026 10:00:00 GMT"),
    ];
    first.resp = ("application/json", r#"{"product":{"id":555}}"#);
    let mut post = e("POST", "http://h/cart", 100);
    post.headers = vec![("x-csrf-token", "abc123def456")];
    post.post = Some((
        "application/json",
        r#"{"product":555,"tags":["a","b"],"x":{"y":1.5}}"#,
    ));
    let p = plan(&[first, post], &opts());
    assert!(
        p.contains("extract = { x_csrf_token = { header = \"x-csrf-token\" } }"),
        "{p}"
    );
    assert!(p.contains("x-csrf-token = \"{{ x_csrf_token }}\""), "{p}");
    assert!(
        p.contains("json = { product = 555, tags = [\"a\", \"b\"], x = { y = 1.5 } }"),
        "{p}"
    );
}

#[test]
fn headers_that_do_not_matter_are_dropped() {
    let mut a = e("GET", "http://h/api/a", 0);
    a.headers = vec![
        (":authority", "h"),
        ("Host", "h"),
        ("Connection", "keep-alive"),
        ("Cookie", "sid=1"),
        ("User-Agent", "Mozilla/5.0"),
        ("sec-ch-ua", "\"Chromium\""),
        ("Sec-Fetch-Mode", "cors"),
        ("Accept-Encoding", "gzip"),
        ("Accept-Language", "en"),
        ("Referer", "http://h/"),
        ("Accept", "*/*"),
        ("X-Api-Version", "3"),
    ];
    let mut b = e("GET", "http://h/api/b", 10);
    b.headers = vec![("X-Api-Version", "3"), ("Accept", "application/json")];
    let p = plan(&[a, b], &opts());
    for gone in [
        "authority",
        "host",
        "connection",
        "cookie",
        "Mozilla",
        "sec-",
        "gzip",
        "accept-language",
        "referer",
        "*/*",
    ] {
        assert!(
            !p.to_ascii_lowercase().contains(&gone.to_ascii_lowercase()),
            "{gone}: {p}"
        );
    }
    // Sent alike by every step: in the defaults.
    assert!(p.contains("headers = { x-api-version = \"3\" }"), "{p}");
    assert!(
        p.contains("headers = { accept = \"application/json\" }"),
        "{p}"
    );
}

#[test]
fn bodies_become_json_form_or_text() {
    let mut j = e("POST", "http://h/a", 0);
    j.post = Some((
        "application/json",
        r#"{"a":[1,2],"b":"x","nested":{"ok":true}}"#,
    ));
    let mut n = e("POST", "http://h/b", 10);
    n.post = Some(("application/json", r#"{"a":null}"#));
    n.headers = vec![("content-type", "application/json")];
    let mut f = e("POST", "http://h/c", 20);
    f.post = Some((
        "application/x-www-form-urlencoded",
        "q=red+oak&page=2&x=%C3%A9",
    ));
    let mut t = e("PUT", "http://h/d", 30);
    t.post = Some(("text/plain", "line one\nline \"two\""));
    t.headers = vec![("Content-Type", "text/plain")];
    let p = plan(&[j, n, f, t], &opts());
    assert!(
        p.contains("json = { a = [1, 2], b = \"x\", nested = { ok = true } }"),
        "{p}"
    );
    // TOML has no null: the body is sent as recorded text.
    assert!(p.contains(r#"body = '{"a":null}'"#), "{p}");
    assert!(
        p.contains("headers = { content-type = \"application/json\" }"),
        "{p}"
    );
    assert!(
        p.contains("form = { q = \"red oak\", page = \"2\", x = \"é\" }"),
        "{p}"
    );
    assert!(p.contains("method = \"PUT\""), "{p}");
    assert!(p.contains("content-type = \"text/plain\""), "{p}");
    assert!(p.contains(r#"body = "line one\nline \"two\"""#), "{p}");
}

#[test]
fn assets_other_hosts_preflights_and_followed_redirects_are_left_out() {
    let mut doc = e("GET", "http://h:8080/", 0);
    doc.resp = ("text/html", "<html></html>");
    doc.kind = "document";
    let mut css = e("GET", "http://h:8080/site.css", 5);
    css.resp = ("text/css", "body{}");
    let mut img = e("GET", "http://h:8080/logo", 6);
    img.resp = ("image/png", "");
    let js = e("GET", "http://h:8080/app.js?v=3", 7);
    let cdn = e("GET", "https://cdn.example.com/lib.json", 8);
    let mut pre = e("OPTIONS", "http://h:8080/api", 9);
    pre.headers = vec![("Access-Control-Request-Method", "POST")];
    let mut moved = e("GET", "http://h:8080/old", 10);
    moved.status = 302;
    let mut v: Value = serde_json::from_str(&har(&[
        doc,
        css,
        img,
        js,
        cdn,
        pre,
        moved,
        e("GET", "http://h:8080/new", 12),
    ]))
    .unwrap();
    v["log"]["entries"][6]["response"]["redirectURL"] = json!("/new");
    let har_text = v.to_string();
    let p = import(&har_text, &opts()).unwrap().plan;
    assert!(p.contains("url = \"/\""), "{p}");
    assert!(p.contains("url = \"/old\""), "{p}");
    for gone in [
        "/site.css",
        "/logo\"",
        "/app.js",
        "cdn.example.com/lib",
        "/new\"",
        "OPTIONS",
    ] {
        assert!(
            !p.contains(&format!("url = \"{gone}")) && !p.contains(&format!("\"{gone}")),
            "{gone}: {p}"
        );
    }
    assert!(p.contains("# 3 static asset request(s)"), "{p}");
    assert!(p.contains("#   cdn.example.com: 1 request(s)"), "{p}");
    assert!(p.contains("# 1 CORS preflight"), "{p}");
    assert!(p.contains("# 1 request(s) that followed a redirect"), "{p}");
    // A 3xx is not checked for its status: the client follows it.
    assert!(!p.contains("status = 302"), "{p}");

    let o = Options {
        include_assets: true,
        include_hosts: vec!["cdn.example.com".into()],
        ..opts()
    };
    let p = import(&har_text, &o).unwrap().plan;
    assert!(p.contains("url = \"/site.css\""), "{p}");
    assert!(
        p.contains("url = \"/app.js\",\n            query = { v = \"3\" }"),
        "{p}"
    );
    assert!(
        p.contains("url = \"https://cdn.example.com/lib.json\""),
        "{p}"
    );
}

#[test]
fn base_url_with_a_path_prefix() {
    let o = Options {
        base_url: Some("http://h/api/".into()),
        ..opts()
    };
    let p = plan(
        &[
            e("GET", "http://h/api/items", 0),
            e("GET", "http://h/health", 1),
        ],
        &o,
    );
    assert!(p.contains("base_url = \"http://h/api\""), "{p}");
    assert!(p.contains("url = \"/items\""), "{p}");
    assert!(p.contains("url = \"http://h/health\""), "{p}");
    // Another environment than the recorded one takes the first request's origin.
    let o = Options {
        base_url: Some("https://staging.example.com/api".into()),
        ..opts()
    };
    let p = plan(
        &[
            e("GET", "http://h/api/items", 0),
            e("GET", "http://other/x", 1),
        ],
        &o,
    );
    assert!(
        p.contains("base_url = \"https://staging.example.com/api\""),
        "{p}"
    );
    assert!(
        p.contains("# recorded against h; its requests are sent to base_url"),
        "{p}"
    );
    assert!(p.contains("url = \"/items\""), "{p}");
    assert!(p.contains("#   other: 1 request(s)"), "{p}");
}

#[test]
fn one_flow_per_page() {
    let mut text = har(&[e("GET", "http://h/a", 0), e("GET", "http://h/b", 10)]);
    text = text.replacen("\"request\"", "\"pageref\":\"p1\",\"request\"", 1);
    text = text.replacen(
        "\"time\":5,\"request\"",
        "\"pageref\":\"p2\",\"time\":5,\"request\"",
        1,
    );
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["log"]["pages"] =
        json!([{ "id": "p1", "title": "Home page" }, { "id": "p2", "title": "Cart" }]);
    v["log"]["entries"][0]["pageref"] = json!("p1");
    v["log"]["entries"][1]["pageref"] = json!("p2");
    let o = Options {
        flow_per_page: true,
        ..opts()
    };
    let p = import(&v.to_string(), &o).unwrap().plan;
    assert!(
        p.contains("flows = [{ flow = \"home_page\" }, { flow = \"cart\" }]"),
        "{p}"
    );
    assert!(
        p.contains("[[flows.home_page.steps]]") && p.contains("[[flows.cart.steps]]"),
        "{p}"
    );
    crate::commands::compile_text("t.toml", &p, &[], std::path::Path::new(".")).unwrap();
}

#[test]
fn errors_name_the_json_path() {
    let bad = |text: &str| import(text, &opts()).unwrap_err().to_string();
    assert!(
        bad("{ not json").starts_with("$: not JSON (line 1, column 3)"),
        "{}",
        bad("{ not json")
    );
    assert_eq!(bad("[]"), "$: expected an object, found an array");
    assert_eq!(bad("{}"), "$.log: missing (HAR 1.2 requires it)");
    assert_eq!(
        bad(r#"{"log":{"version":"2.0","entries":[]}}"#),
        "$.log.version: HAR version \"2.0\" is not supported (1.1 and 1.2 are)"
    );
    assert_eq!(
        bad(r#"{"log":{"version":1.2,"entries":[]}}"#),
        "$.log.version: expected a string, found a number"
    );
    assert_eq!(
        bad(r#"{"log":{"version":"1.2"}}"#),
        "$.log.entries: missing (HAR 1.2 requires it)"
    );
    let ok = har(&[e("GET", "http://h/a", 0), e("GET", "http://h/b", 1)]);
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][1]["request"]
        .as_object_mut()
        .unwrap()
        .remove("url");
    assert_eq!(
        bad(&v.to_string()),
        "$.log.entries[1].request.url: missing (HAR 1.2 requires it)"
    );
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][0]["startedDateTime"] = json!("yesterday");
    assert_eq!(
        bad(&v.to_string()),
        "$.log.entries[0].startedDateTime: \"yesterday\" is not an ISO 8601 date and time"
    );
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][1]["request"]["headers"] = json!([{ "name": "a" }]);
    assert_eq!(
        bad(&v.to_string()),
        "$.log.entries[1].request.headers[0].value: missing (HAR 1.2 requires it)"
    );
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][0]["response"]["status"] = json!("200");
    assert_eq!(
        bad(&v.to_string()),
        "$.log.entries[0].response.status: expected a status code (0 to 999)"
    );
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][0]["request"]["url"] = json!("http://");
    assert!(
        bad(&v.to_string()).starts_with("$.log.entries[0].request.url: "),
        "{}",
        bad(&v.to_string())
    );
    let mut v: Value = serde_json::from_str(&ok).unwrap();
    v["log"]["entries"][0]["request"]["method"] = json!("GE T");
    assert_eq!(
        bad(&v.to_string()),
        "$.log.entries[0].request.method: \"GE T\" is not an HTTP method"
    );
}

#[test]
fn sizes_and_counts_are_bounded() {
    let many = format!(
        r#"{{"log":{{"version":"1.2","entries":[{}]}}}}"#,
        vec!["1"; MAX_ENTRIES + 1].join(",")
    );
    assert_eq!(
        import(&many, &opts()).unwrap_err().to_string(),
        format!("$.log.entries: {} entries; at most {MAX_ENTRIES} are imported (record a shorter journey)", MAX_ENTRIES + 1)
    );
    let huge = " ".repeat(MAX_HAR_BYTES + 1);
    assert!(import(&huge, &opts())
        .unwrap_err()
        .message
        .contains("at most"));
    // Nothing to replay is said, not written as an empty plan.
    let only_assets = har(&[E {
        kind: "script",
        ..e("GET", "http://h/a.js", 0)
    }]);
    assert!(import(&only_assets, &opts())
        .unwrap_err()
        .message
        .contains("no request of h is left"));
    // A body beyond the bound is left out with a comment.
    let big = "x".repeat(MAX_REQUEST_BODY + 1);
    let mut b = e("POST", "http://h/upload", 0);
    b.post = Some(("text/plain", &big));
    let p = plan(&[b], &opts());
    assert!(
        p.contains("larger than 262144 bytes and was left out"),
        "{}",
        &p[..400.min(p.len())]
    );
}

#[test]
fn literal_braces_cannot_be_written_and_are_left_out() {
    let mut b = e("POST", "http://h/tpl", 10);
    b.post = Some(("text/plain", "Hello {{ name }}"));
    let p = plan(&[e("GET", "http://h/", 0), b], &opts());
    assert!(p.contains("left out: it sends `{{`"), "{p}");
    assert!(!p.contains("/tpl\""), "{p}");
}

#[test]
fn dates() {
    let t = |s| parse_datetime(s);
    assert_eq!(t("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(t("1970-01-01T00:00:01.5Z"), Some(1_500_000));
    assert_eq!(t("1970-01-01T01:00:00+01:00"), Some(0));
    assert_eq!(t("1970-01-01T00:00:00.123456789-0100"), Some(3_600_123_456));
    assert_eq!(t("2026-12-05T22:10:00.123Z"), Some(1_796_508_600_123_000));
    assert_eq!(t("2026-13-05T22:10:00Z"), None);
    assert_eq!(t("2026-12-05"), None);
    assert_eq!(t("2026-12-05T22:10:00.Z"), None);
    assert_eq!(t("2026-12-05T22:10:00 CET"), None);
    assert_eq!(t("2026-12-05T22:10:00+€a"), None);
    assert_eq!(t("2026-12-05T22:10:0é"), None);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Whatever the bytes, an import ends in a plan or one error, never a panic.
    #[test]
    fn damaged_recordings_never_panic(cut in 0usize..4000, junk in "\\PC{0,12}", date in "\\PC{0,30}") {
        let mut text = har(&login_journey());
        let at = (cut % text.len().max(1)).min(text.len());
        if text.is_char_boundary(at) {
            text.insert_str(at, &junk);
        }
        let _ = import(&text, &opts());
        let _ = parse_datetime(&date);
    }
}
