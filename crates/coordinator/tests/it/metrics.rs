//! `GET /metrics`: Prometheus reads what the network did, in its own format.

use test_support as ts;

/// The value of the sample line `name` (labels included, as written), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// A coordinator on `dir` where alice has sent one accepted update for `unit`.
fn one_update(dir: &std::path::Path) -> (coordinator::Coordinator, String, protocol::WorkUnit) {
    let config = ts::hand_made(ts::tiny_config(dir, 3));
    let server = ts::start(dir, config);
    let url = server.url();
    let alice = ts::key(1);
    ts::register(&url, &alice, "alice");
    let n = server.with_core(|c| c.params().len());
    let unit = ts::lease(&url, &alice);
    assert_eq!(ts::submit_crafted(&url, &alice, &unit, n).status, 200);
    (server, url, unit)
}

#[test]
fn metrics_count_requests_verdicts_and_read_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url, unit) = one_update(dir.path());
    let n = server.with_core(|c| c.params().len());
    let other: Vec<f32> = ts::crafted_delta(unit.id, n).iter().map(|x| -x).collect();
    let again = ts::submit(
        &url,
        ts::update_bytes(&ts::key(1), unit.id, unit.base_version, &other),
    );
    assert_eq!(again.code(), "duplicate", "{again:?}");
    assert_eq!(ts::get(&url, "/no/such/route").status, 404);
    let odd = reqwest::blocking::Client::new()
        .request(
            reqwest::Method::from_bytes(b"BREW").expect("method"),
            format!("{url}/health"),
        )
        .send()
        .expect("BREW");
    assert_eq!(odd.status(), 405);

    let response = reqwest::blocking::get(format!("{url}/metrics")).expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"].to_str().expect("type");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    let text = response.text().expect("text");
    let expected = [
        (r#"hivetrain_updates_total{verdict="accepted"}"#, 1.0),
        (r#"hivetrain_updates_total{verdict="duplicate"}"#, 1.0),
        (
            r#"hivetrain_http_requests_total{route="/v1/lease",method="POST",status="200"}"#,
            1.0,
        ),
        (
            r#"hivetrain_http_requests_total{route="/v1/updates",method="POST",status="409"}"#,
            1.0,
        ),
        (
            r#"hivetrain_http_requests_total{route="unmatched",method="GET",status="404"}"#,
            1.0,
        ),
        (
            r#"hivetrain_http_requests_total{route="/health",method="other",status="405"}"#,
            1.0,
        ),
        ("hivetrain_model_version", 0.0),
        ("hivetrain_workers", 1.0),
        ("hivetrain_accepted_updates", 1.0),
        ("hivetrain_ledger_entries", 1.0),
        (r#"hivetrain_credit_micro{what="burned"}"#, 0.0),
    ];
    for (name, want) in expected {
        assert_eq!(sample(&text, name), Some(want), "{name} in\n{text}");
    }
    let minted = sample(&text, r#"hivetrain_credit_micro{what="minted"}"#).expect("minted");
    assert!(minted > 0.0, "{text}");
    let bytes = sample(&text, "hivetrain_update_bytes_total").expect("bytes");
    assert!(bytes > 0.0, "{text}");
    let loss = sample(&text, "hivetrain_holdout_loss").expect("loss");
    assert!(loss.is_finite() && loss > 0.0, "{text}");
    assert!(
        text.contains("hivetrain_http_request_seconds_bucket"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    server.stop();
}

/// `GET /` is the dashboard; every endpoint it reads answers with the fields it shows.
#[test]
fn the_dashboard_reads_endpoints_that_answer_with_its_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url, _) = one_update(dir.path());

    let page = reqwest::blocking::get(format!("{url}/")).expect("GET /");
    assert_eq!(page.status(), 200);
    let kind = page.headers()["content-type"].to_str().expect("type");
    assert!(kind.starts_with("text/html"), "{kind}");
    let html = page.text().expect("html");
    let reads: [(&str, &[&str]); 3] = [
        (
            "/v1/status",
            &[
                "version",
                "round",
                "workers",
                "units_leased",
                "initial_holdout_loss",
                "rounds",
            ],
        ),
        (
            "/v1/stats",
            &[
                "accepted_updates",
                "tokens_trained",
                "minted",
                "pool",
                "entries",
            ],
        ),
        ("/v1/leaderboard", &[]),
    ];
    for (path, fields) in reads {
        assert!(html.contains(&format!("get(\"{path}")), "{path}");
        let reply = ts::get(&url, path);
        assert_eq!(reply.status, 200, "{path}: {reply:?}");
        for field in fields {
            assert!(html.contains(field), "{field}");
            assert!(!reply.body[field].is_null(), "{path} has no {field}");
        }
    }
    let round = &ts::get(&url, "/v1/status").body["rounds"][0];
    for field in [
        "round",
        "version",
        "holdout_loss",
        "accepted",
        "rejected",
        "tokens",
        "bytes",
        "seconds",
    ] {
        assert!(html.contains(&format!("r.{field}")), "{field}");
        assert!(round.get(field).is_some(), "a round has no {field}");
    }
    let leader = &ts::get(&url, "/v1/leaderboard").body[0];
    for field in ["name", "wallet", "units", "earned", "balance"] {
        assert!(html.contains(&format!("l.{field}")), "{field}");
        assert!(!leader[field].is_null(), "a leaderboard row has no {field}");
    }
    // Values reach the page as text only: volunteers choose their names.
    assert!(!html.contains("innerHTML"));

    // The page's script, run by Node against this coordinator with a small stand-in for
    // the DOM, renders the run.
    let shown = ts::render_under_node(dir.path(), &html, DOM, RENDER, &url);
    assert_eq!(shown["error"], "", "{shown}");
    let tiles = shown["tiles"].as_str().expect("tiles");
    assert!(
        tiles.contains("model version") && tiles.contains("|1|updates accepted|"),
        "{tiles}"
    );
    let leaders = shown["leaders"].as_str().expect("leaders");
    assert!(leaders.contains("alice"), "{leaders}");
    let rounds = shown["rounds"].as_str().expect("rounds");
    assert!(rounds.contains("training"), "{rounds}");
    assert!(
        shown["chart"].as_str().is_some_and(|p| !p.is_empty()),
        "{shown}"
    );
    server.stop();
}

/// A stand-in for the browser: elements that keep their text, children and attributes;
/// `fetch` against the coordinator's URL (the first argument); no timers.
const DOM: &str = r#"
const base = process.argv[2];
const realFetch = fetch;
globalThis.fetch = (path) => realFetch(base + path);
class El {
  constructor(tag) { this.tag = tag; this.children = []; this.textContent = ""; this.attrs = {}; this.className = ""; }
  appendChild(c) { this.children.push(c); return c; }
  append(...cs) { for (const c of cs) this.children.push(typeof c === "string" ? { textContent: c } : c); }
  replaceChildren(...cs) { this.children = cs; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
}
const elements = {};
const element = (id) => (elements[id] ??= new El(id));
globalThis.document = {
  getElementById: element,
  querySelector: (selector) => element(selector),
  createElement: (tag) => new El(tag),
  createElementNS: (_ns, tag) => new El(tag),
};
globalThis.setInterval = () => 0;
"#;

/// After the page's script: render once more, waiting for it, and print what is shown.
const RENDER: &str = r##"
await refresh();
const shown = (e) => [e.textContent, ...(e.children || []).map(shown)].filter((t) => t !== "").join("|");
console.log(JSON.stringify({
  error: element("error").textContent,
  tiles: shown(element("tiles")),
  leaders: shown(element("#leaders tbody")),
  rounds: shown(element("#rounds tbody")),
  chart: element("chart").children[0]?.attrs.points ?? "",
}));
"##;
