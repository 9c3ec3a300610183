//! `GET /metrics`: Prometheus reads what the network did, in its own format.

use test_support as ts;

/// The value of the sample line `name` (labels included, as written), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_count_requests_verdicts_and_read_the_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 3));
    let server = ts::start(dir.path(), config);
    let url = server.url();
    let alice = ts::key(1);
    ts::register(&url, &alice, "alice");
    let n = server.with_core(|c| c.params().len());
    let unit = ts::lease(&url, &alice);
    assert_eq!(ts::submit_crafted(&url, &alice, &unit, n).status, 200);
    let again = ts::submit_crafted(&url, &alice, &unit, n);
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
