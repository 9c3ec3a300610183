//! The OpenAI-compatible API through real HTTP: API keys from signed challenges, credit
//! spent once per request, streaming, dividends, and every refusal writing nothing.

use ed25519_dalek::{Signer, SigningKey};
use ledger::wire::WalletView;
use protocol::WorkerId;
use test_support as ts;

/// A POST with an optional bearer key and extra headers: (status, body, headers).
fn post(
    url: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String, reqwest::header::HeaderMap) {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().expect("POST");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, response.text().expect("body"), headers)
}

fn code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

fn balance(url: &str, key: &SigningKey) -> u64 {
    let r = ts::get(url, &format!("/v1/wallets/{}", WorkerId::of(key)));
    let view: WalletView = serde_json::from_value(r.body).expect("wallet");
    view.balance
}

/// Alice (two units) and bob (one) earn credit; returns the server and its url.
fn network(dir: &std::path::Path, requests_per_minute: u32) -> (coordinator::Coordinator, String) {
    let mut config = ts::hand_made(ts::tiny_config(dir, 3));
    // Long units, so a unit's credit pays for a few requests (no unit is trained here).
    config.schedule.steps_per_unit = 1000;
    config.serving.requests_per_minute = requests_per_minute;
    let server = ts::start(dir, config);
    let url = server.url();
    let (alice, bob) = (ts::key(1), ts::key(2));
    ts::register(&url, &alice, "alice");
    ts::register(&url, &bob, "bob");
    let n = server.with_core(|c| c.params().len());
    for key in [&alice, &alice, &bob] {
        let unit = ts::lease(&url, key);
        let r = ts::submit_crafted(&url, key, &unit, n);
        assert_eq!(r.status, 200, "{r:?}");
    }
    (server, url)
}

/// Like [`network`] on a hand-moved clock, with the config changed by `tweak` (dividends
/// off, so balances move only by what a test does).
fn network_at(
    dir: &std::path::Path,
    clock: &ts::ManualClock,
    tweak: impl FnOnce(&mut coordinator::CoordinatorConfig),
) -> (coordinator::Coordinator, String) {
    let server = ts::start_with_clock(dir, network_config(dir, tweak), clock);
    let url = server.url();
    let (alice, bob) = (ts::key(1), ts::key(2));
    ts::register(&url, &alice, "alice");
    ts::register(&url, &bob, "bob");
    let n = server.with_core(|c| c.params().len());
    for key in [&alice, &alice, &bob] {
        let unit = ts::lease_at(&url, key, clock.now());
        let r = ts::submit_crafted(&url, key, &unit, n);
        assert_eq!(r.status, 200, "{r:?}");
    }
    (server, url)
}

/// The config of [`network_at`].
fn network_config(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut coordinator::CoordinatorConfig),
) -> coordinator::CoordinatorConfig {
    let mut config = ts::hand_made(ts::tiny_config(dir, 3));
    config.schedule.steps_per_unit = 1000;
    config.serving.requests_per_minute = 1000;
    config.serving.dividend_interval_s = 0;
    tweak(&mut config);
    config
}

/// A reply's status and error code against the expected ones.
#[track_caller]
fn check(reply: &(u16, String, reqwest::header::HeaderMap), want: (u16, &str)) {
    assert_eq!((reply.0, code(&reply.1).as_str()), want, "{}", reply.1);
}

/// Completion tokens generated so far, from `GET /metrics`.
fn tokens_generated(url: &str) -> u64 {
    let text = reqwest::blocking::get(format!("{url}/metrics"))
        .expect("metrics")
        .text()
        .expect("text");
    text.lines()
        .find(|l| l.contains("inference_tokens_total{kind=\"completion\"}"))
        .and_then(|l| l.split_whitespace().last())
        .map_or(0, |n| n.parse().expect("a count"))
}

/// The spend entries of `key`'s wallet.
fn spends(url: &str, key: &SigningKey) -> Vec<ledger::Entry> {
    let r = ts::get(url, &format!("/v1/wallets/{}", WorkerId::of(key)));
    let view: WalletView = serde_json::from_value(r.body).expect("wallet");
    view.entries
        .into_iter()
        .filter(|e| e.kind == ledger::Kind::Spend)
        .collect()
}

/// Sends `amount` micro-credits from `from` to `to`: the status and error code.
fn transfer(
    url: &str,
    from: &SigningKey,
    to: &SigningKey,
    amount: u64,
    reference: &str,
) -> (u16, String) {
    let body = serde_json::json!({
        "to": WorkerId::of(to).to_string(),
        "amount": amount,
        "reference": reference,
    });
    let r = ts::post_signed(url, from, "/v1/transfers", &body.to_string());
    (r.status, r.code().to_owned())
}

/// The text of a stream of server-sent events, and whether it ended with `[DONE]`.
fn read_stream(body: &str, chat: bool) -> (String, bool, Option<serde_json::Value>) {
    let mut text = String::new();
    let mut done = false;
    let mut usage = None;
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: serde_json::Value = serde_json::from_str(line).expect("chunk json");
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        let piece = if chat {
            &chunk["choices"][0]["delta"]["content"]
        } else {
            &chunk["choices"][0]["text"]
        };
        text.push_str(piece.as_str().unwrap_or_default());
    }
    (text, done, usage)
}

#[test]
fn queries_spend_the_callers_credit_once_and_pay_dividends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url) = network(dir.path(), 1000);
    let (alice, bob) = (ts::key(1), ts::key(2));
    let (alice_start, bob_start) = (balance(&url, &alice), balance(&url, &bob));
    assert_eq!(alice_start, 2 * bob_start);
    let key = ts::api_key(&url, &alice);

    let models = ts::get(&url, "/v1/models");
    assert_eq!(models.body["data"][0]["id"], "hivetrain");

    let request =
        r#"{"model":"hivetrain","prompt":"KING HENRY:\n","max_tokens":6,"temperature":0}"#;
    let (status, body, headers) = post(&url, "/v1/completions", Some(&key), request, &[]);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("json");
    let usage = &reply["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().expect("prompt"),
        usage["completion_tokens"].as_u64().expect("completion"),
    );
    assert_eq!(completion, 6);
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    let charged: u64 = headers["x-hivetrain-charged"]
        .to_str()
        .expect("header")
        .parse()
        .expect("number");
    assert_eq!(
        charged,
        prompt + 2 * completion,
        "price: 1 a prompt token, 2 a generated one"
    );
    assert_eq!(balance(&url, &alice), alice_start - charged);
    assert_eq!(balance(&url, &bob), bob_start, "bob's credit does not move");

    // The same request id twice: one charge, the same text.
    let once = [("idempotency-key", "retry-me")];
    let a = post(
        &url,
        "/v1/completions",
        Some(&key),
        request
            .replace("\"temperature\":0", "\"temperature\":1")
            .as_str(),
        &once,
    );
    let b = post(
        &url,
        "/v1/completions",
        Some(&key),
        request
            .replace("\"temperature\":0", "\"temperature\":1")
            .as_str(),
        &once,
    );
    assert_eq!((a.0, b.0), (200, 200));
    let text = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["choices"][0]["text"].as_str().expect("text").to_owned()
    };
    assert_eq!(text(&a.1), text(&b.1));
    assert_eq!(balance(&url, &alice), alice_start - 2 * charged);

    // Streaming: the same greedy text in pieces, then [DONE], and the usage when asked.
    let streamed = request.replace(
        "}",
        r#","stream":true,"stream_options":{"include_usage":true}}"#,
    );
    let (status, body, headers) = post(&url, "/v1/completions", Some(&key), &streamed, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(
        headers["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/event-stream")
    );
    let (stream_text, done, usage) = read_stream(&body, false);
    assert!(done, "{body}");
    assert_eq!(stream_text, text(&reply.to_string()));
    assert_eq!(usage.expect("usage")["completion_tokens"], 6);

    // Chat, plain and streamed.
    let chat = r#"{"model":"hivetrain","messages":[{"role":"user","content":"Who goes there?"}],"max_tokens":5,"temperature":0}"#;
    let (status, body, _) = post(&url, "/v1/chat/completions", Some(&key), chat, &[]);
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");
    let chat_text = reply["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_owned();
    let (status, body, _) = post(
        &url,
        "/v1/chat/completions",
        Some(&key),
        &chat.replace("}]", r#"}],"stream":true"#),
        &[],
    );
    assert_eq!(status, 200);
    let (stream_text, done, _) = read_stream(&body, true);
    assert!(done);
    assert_eq!(stream_text, chat_text);

    // Refusals: a code each, no ledger entry.
    let entries = server.with_core(|c| c.stats().expect("stats").entries);
    let big = "x".repeat(300 * 1024);
    let oversized = format!(r#"{{"model":"hivetrain","prompt":"{big}"}}"#);
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (None, request.to_owned(), 401, "missing_api_key"),
        (Some("hk-nope"), request.to_owned(), 401, "invalid_api_key"),
        (
            Some(&key),
            request.replace("\"hivetrain\"", "\"gpt-4\""),
            404,
            "model_not_found",
        ),
        (
            Some(&key),
            request.replace("6", "-3"),
            400,
            "bad_max_tokens",
        ),
        (
            Some(&key),
            request.replace("6", "100000"),
            400,
            "bad_max_tokens",
        ),
        (
            Some(&key),
            request.replace("KING HENRY:\\n", ""),
            400,
            "empty_prompt",
        ),
        (Some(&key), "{\"model\":".to_owned(), 400, "bad_json"),
        (Some(&key), oversized, 413, "body_too_large"),
        (
            Some(&key),
            request.replace("6", "1000"),
            402,
            "insufficient_credit",
        ),
    ];
    for (k, body, status, want) in &cases {
        let (got, text, _) = post(&url, "/v1/completions", *k, body, &[]);
        assert_eq!((got, code(&text).as_str()), (*status, *want), "{text}");
    }
    assert_eq!(
        server.with_core(|c| c.stats().expect("stats").entries),
        entries
    );

    // Revoked, the key is refused.
    assert_eq!(post(&url, "/v1/keys/revoke", Some(&key), "", &[]).0, 200);
    let (status, body, _) = post(&url, "/v1/completions", Some(&key), request, &[]);
    assert_eq!((status, code(&body).as_str()), (401, "invalid_api_key"));

    // Dividends pay the pool out 2:1, as alice and bob earned.
    let pool = server.with_core(|c| c.stats().expect("stats").pool);
    assert!(pool > 0);
    let (alice_before, bob_before) = (balance(&url, &alice), balance(&url, &bob));
    let paid = server.with_core(|c| {
        c.pay_dividends(coordinator::system_ms())
            .expect("dividends")
    });
    assert_eq!(paid, 2);
    let (alice_div, bob_div) = (
        balance(&url, &alice) - alice_before,
        balance(&url, &bob) - bob_before,
    );
    assert_eq!(alice_div, pool * 2 / 3);
    assert_eq!(bob_div, pool / 3);
    // Nothing earned since: the next payout pays nothing.
    assert_eq!(
        server.with_core(|c| c
            .pay_dividends(coordinator::system_ms())
            .expect("dividends")),
        0
    );
    server.stop();
}

#[test]
fn keys_are_rate_limited_and_challenges_serve_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url) = network(dir.path(), 2);
    let alice = ts::key(1);
    let key = ts::api_key(&url, &alice);
    let request = r#"{"model":"hivetrain","prompt":"To be","max_tokens":1}"#;
    for _ in 0..2 {
        assert_eq!(
            post(&url, "/v1/completions", Some(&key), request, &[]).0,
            200
        );
    }
    let (status, body, headers) = post(&url, "/v1/completions", Some(&key), request, &[]);
    assert_eq!((status, code(&body).as_str()), (429, "rate_limited"));
    assert!(headers.contains_key("retry-after"));

    // A challenge signed by another key, or used twice, gives no key.
    let challenge = ts::get(&url, "/v1/keys/challenge");
    let message = challenge.body["message"].as_str().expect("message");
    let forged = serde_json::json!({
        "wallet": WorkerId::of(&alice).to_string(),
        "challenge": challenge.body["challenge"],
        "signature": hex::encode(ts::key(9).sign(message.as_bytes()).to_bytes()),
    });
    let r = post(&url, "/v1/keys", None, &forged.to_string(), &[]);
    assert_eq!((r.0, code(&r.1).as_str()), (401, "bad_signature"));
    let signed = serde_json::json!({
        "wallet": WorkerId::of(&alice).to_string(),
        "challenge": challenge.body["challenge"],
        "signature": hex::encode(alice.sign(message.as_bytes()).to_bytes()),
    });
    assert_eq!(
        post(&url, "/v1/keys", None, &signed.to_string(), &[]).0,
        200
    );
    let r = post(&url, "/v1/keys", None, &signed.to_string(), &[]);
    assert_eq!((r.0, code(&r.1).as_str()), (401, "bad_challenge"));
    server.stop();
}

/// A Python with the pinned `openai` client: `$HIVETRAIN_PYTHON`, or a virtual
/// environment made in the target directory on first use (from PyPI).
fn openai_python() -> std::path::PathBuf {
    if let Some(python) = std::env::var_os("HIVETRAIN_PYTHON") {
        return python.into();
    }
    let root = ts::repo_root();
    let venv = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = venv.join("bin/python");
    let has_openai = |python: &std::path::Path| {
        std::process::Command::new(python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has_openai(&python) {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv (install Python 3)");
        assert!(made.success(), "python3 -m venv failed");
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "-r"])
            .arg(root.join("scripts/requirements-openai.txt"))
            .status()
            .expect("pip");
        assert!(
            installed.success(),
            "pip install -r scripts/requirements-openai.txt failed"
        );
    }
    python
}

#[test]
fn the_official_openai_client_works_streaming_included() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, url) = network(dir.path(), 1000);
    let key = ts::api_key(&url, &ts::key(1));
    // Only a wallet that holds credit gets a key: the poor one holds 10 micro-credits.
    assert_eq!(transfer(&url, &ts::key(2), &ts::key(3), 10, "alms").0, 200);
    let poor = ts::api_key(&url, &ts::key(3));
    let output = std::process::Command::new(openai_python())
        .arg(ts::repo_root().join("scripts/openai_client_check.py"))
        .arg(format!("{url}/v1"))
        .args([&key, &poor])
        .output()
        .expect("run the openai client check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(seen["bad_key"], 401);
    assert_eq!(seen["poor"], 402);
    server.stop();
}

/// A pinned version is served by name, an unknown one is refused; dividends are paid by
/// the coordinator's own ticker once the configured interval has passed.
#[test]
fn pinned_versions_and_dividends_on_their_interval() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 3));
    config.schedule.steps_per_unit = 1000;
    config.serving.dividend_interval_s = 60;
    let server = ts::start_with_clock(dir.path(), config, &clock);
    let url = server.url();
    let (alice, bob) = (ts::key(1), ts::key(2));
    ts::register(&url, &alice, "alice");
    ts::register(&url, &bob, "bob");
    let n = server.with_core(|c| c.params().len());
    for key in [&alice, &alice, &bob] {
        let unit = ts::lease_at(&url, key, clock.now());
        let r = ts::submit_crafted(&url, key, &unit, n);
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(server.with_core(|c| c.version()), 1);
    let api = ts::api_key(&url, &alice);
    let ask = |model: &str| {
        let body = format!(r#"{{"model":"{model}","prompt":"To be","max_tokens":2}}"#);
        post(&url, "/v1/completions", Some(&api), &body, &[])
    };
    let (status, body, _) = ask("hivetrain-v0");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"model\":\"hivetrain-v0\""), "{body}");
    let (status, body, _) = ask("hivetrain-v9");
    assert_eq!((status, code(&body).as_str()), (404, "model_not_found"));

    // The query's revenue waits in the pool until the interval has passed.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(server.with_core(|c| c.stats().expect("stats").pool) > 0);
    clock.advance(61_000);
    let started = std::time::Instant::now();
    while server.with_core(|c| c.stats().expect("stats").pool) > 1 {
        assert!(
            started.elapsed().as_secs() < 10,
            "no dividends after the interval"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let dividends = server.with_core(|c| c.wallet(WorkerId::of(&bob), None).dividends);
    assert!(dividends > 0);
    server.stop();
}

/// An `Idempotency-Key` names one request: the same request again is answered with the
/// stored reply and charged nothing; another request under the key is refused, charged
/// nothing and generates nothing; so is the key once its reply is no longer kept.
#[test]
fn an_idempotency_key_buys_one_request_not_a_bigger_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let (server, url) = network_at(dir.path(), &clock, |c| {
        c.serving.idempotency_retention_s = 60;
    });
    let alice = ts::key(1);
    let key = ts::api_key(&url, &alice);
    let paid = r#"{"model":"hivetrain","prompt":"To be","max_tokens":3,"temperature":1}"#;
    let bigger = r#"{"model":"hivetrain","prompt":"KING HENRY:\nWhat say you?","max_tokens":1000,"temperature":1}"#;
    let once = [("idempotency-key", "pay-once")];
    let start = balance(&url, &alice);

    let first = post(&url, "/v1/completions", Some(&key), paid, &once);
    check(&first, (200, ""));
    let charged: u64 = first.2["x-hivetrain-charged"]
        .to_str()
        .expect("header")
        .parse()
        .expect("number");
    assert!(charged > 0);
    assert_eq!(balance(&url, &alice), start - charged);
    let generated = tokens_generated(&url);
    assert_eq!(generated, 3);

    // Another request under the same key: refused, whatever it changes.
    let streamed_paid = paid.replace("}", r#","stream":true}"#);
    let chat =
        r#"{"model":"hivetrain","messages":[{"role":"user","content":"To be"}],"max_tokens":3}"#;
    let refused = [
        ("/v1/completions", bigger, "idempotency_key_reused"),
        (
            "/v1/completions",
            streamed_paid.as_str(),
            "idempotency_key_reused",
        ),
        ("/v1/chat/completions", chat, "idempotency_key_reused"),
    ];
    for (path, body, want) in refused {
        check(&post(&url, path, Some(&key), body, &once), (422, want));
    }
    // The same request: the stored reply, charged nothing, generated by no one.
    let again = post(&url, "/v1/completions", Some(&key), paid, &once);
    check(&again, (200, ""));
    assert_eq!(again.2["idempotent-replayed"], "true");
    assert_eq!(again.2["x-hivetrain-charged"], "0");
    let reply = |body: &str| -> serde_json::Value { serde_json::from_str(body).expect("json") };
    assert_eq!(reply(&again.1)["choices"], reply(&first.1)["choices"]);
    assert_eq!(reply(&again.1)["usage"], reply(&first.1)["usage"]);
    assert_eq!(balance(&url, &alice), start - charged);
    assert_eq!(tokens_generated(&url), generated);
    let reference = format!("{}:pay-once", WorkerId::of(&alice));
    let paid_for: Vec<u64> = spends(&url, &alice)
        .iter()
        .filter(|e| e.reference == reference)
        .map(|e| e.amount)
        .collect();
    assert_eq!(paid_for, [charged], "one spend for the key");

    // A streamed request, retried: the stored text as server-sent events.
    let streamed = r#"{"model":"hivetrain","prompt":"To be","max_tokens":4,"temperature":1,"stream":true,"stream_options":{"include_usage":true}}"#;
    let twice = [("idempotency-key", "stream-once")];
    let a = post(&url, "/v1/completions", Some(&key), streamed, &twice);
    let before_retry = balance(&url, &alice);
    let b = post(&url, "/v1/completions", Some(&key), streamed, &twice);
    assert_eq!((a.0, b.0), (200, 200));
    let ((text_a, done_a, usage_a), (text_b, done_b, usage_b)) =
        (read_stream(&a.1, false), read_stream(&b.1, false));
    assert!(done_a && done_b, "{}", b.1);
    assert_eq!((text_b, usage_b), (text_a, usage_a));
    assert_eq!(balance(&url, &alice), before_retry);
    assert_eq!(tokens_generated(&url), generated + 4);

    // While a request is generating, the same one again is told so (409); another one
    // under its key is refused as always.
    let mut asked = blake3::Hasher::new();
    asked.update(b"/v1/completions\0");
    asked.update(paid.as_bytes());
    let name = coordinator::core::serving::RequestName {
        id: "under-way".into(),
        request_hash: Some(asked.finalize().to_hex().to_string()),
    };
    let hold = server.with_core(|c| {
        match c
            .reserve(WorkerId::of(&alice), &name, 2, 3, clock.now())
            .expect("reserve")
        {
            coordinator::core::serving::Reservation::Held(hold) => hold,
            other => panic!("{other:?}"),
        }
    });
    let under_way = [("idempotency-key", "under-way")];
    check(
        &post(&url, "/v1/completions", Some(&key), paid, &under_way),
        (409, "request_in_progress"),
    );
    check(
        &post(&url, "/v1/completions", Some(&key), bigger, &under_way),
        (422, "idempotency_key_reused"),
    );
    server.with_core(|c| c.release(hold));
    check(
        &post(&url, "/v1/completions", Some(&key), paid, &under_way),
        (200, ""),
    );
    let before_retry = balance(&url, &alice);
    let generated = tokens_generated(&url);

    // Past the retention time the key is refused, never served again for free.
    clock.advance(61_000);
    let late = post(&url, "/v1/completions", Some(&key), paid, &once);
    check(&late, (422, "idempotency_key_expired"));
    assert_eq!(tokens_generated(&url), generated);
    assert_eq!(balance(&url, &alice), before_retry);
    server.stop();
}

/// A stored reply is committed with its charge: after a restart the retry is answered
/// from the store and charged nothing, and the API key still works.
#[test]
fn a_stored_reply_outlives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let (server, url) = network_at(dir.path(), &clock, |_| {});
    let alice = ts::key(1);
    let key = ts::api_key(&url, &alice);
    let request = r#"{"model":"hivetrain","prompt":"To be","max_tokens":3,"temperature":1}"#;
    let once = [("idempotency-key", "across-restarts")];
    let first = post(&url, "/v1/completions", Some(&key), request, &once);
    check(&first, (200, ""));
    let left = balance(&url, &alice);
    server.stop();

    let server = ts::start_with_clock(dir.path(), network_config(dir.path(), |_| {}), &clock);
    let url = server.url();
    let again = post(&url, "/v1/completions", Some(&key), request, &once);
    check(&again, (200, ""));
    assert_eq!(again.2["idempotent-replayed"], "true");
    let text = |body: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(body).expect("json")["choices"][0]["text"].clone()
    };
    assert_eq!(text(&again.1), text(&first.1));
    assert_eq!(balance(&url, &alice), left);
    assert_eq!(
        tokens_generated(&url),
        0,
        "nothing generated since the restart"
    );
    server.stop();
}

/// Eight requests priced 40 at `max_tokens` at once from a wallet of 41: the price is
/// held before generating, so exactly one is served and the wallet never pays more than
/// it holds. Credit held for a generation cannot be transferred either.
#[test]
fn concurrent_requests_never_spend_more_than_the_balance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let (server, url) = network_at(dir.path(), &clock, |c| {
        c.serving.price_prompt_token = 0;
        c.serving.concurrency = 8;
    });
    let (alice, carol) = (ts::key(1), ts::key(4));
    assert_eq!(
        transfer(&url, &alice, &carol, 41, "for carol"),
        (200, String::new())
    );
    let key = ts::api_key(&url, &carol);
    let request = r#"{"model":"hivetrain","prompt":"To be","max_tokens":20,"temperature":1}"#;
    let barrier = std::sync::Barrier::new(8);
    let replies: Vec<(u16, String, reqwest::header::HeaderMap)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    post(&url, "/v1/completions", Some(&key), request, &[])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut outcomes: Vec<(u16, String)> = replies.iter().map(|r| (r.0, code(&r.1))).collect();
    outcomes.sort();
    let mut expected = vec![(402, "insufficient_credit".to_owned()); 7];
    expected.insert(0, (200, String::new()));
    assert_eq!(outcomes, expected);
    let charged: u64 = spends(&url, &carol).iter().map(|e| e.amount).sum();
    assert!(charged <= 41 && charged > 0, "{charged}");
    assert_eq!(spends(&url, &carol).len(), 1);
    assert_eq!(balance(&url, &carol), 41 - charged);

    // While a generation holds carol's credit, she cannot send it away.
    assert_eq!(
        transfer(&url, &alice, &carol, 100, "more"),
        (200, String::new())
    );
    let name = coordinator::core::serving::RequestName {
        id: "held".into(),
        request_hash: None,
    };
    let left = balance(&url, &carol);
    let hold = server.with_core(|c| {
        match c
            .reserve(WorkerId::of(&carol), &name, 0, left / 2, clock.now())
            .expect("reserve")
        {
            coordinator::core::serving::Reservation::Held(hold) => hold,
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(
        transfer(&url, &carol, &alice, 2, "back"),
        (402, "insufficient_credit".to_owned())
    );
    server.with_core(|c| c.release(hold));
    assert_eq!(
        transfer(&url, &carol, &alice, 2, "back"),
        (200, String::new())
    );
    server.stop();
}

/// Challenges are stateless: ten thousand anonymous requests take nothing, and a wallet
/// then gets its key. A challenge this coordinator did not make, or an expired one, is
/// refused.
#[test]
fn a_challenge_flood_locks_no_wallet_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let (server, url) = network_at(dir.path(), &clock, |_| {});
    let started = std::time::Instant::now();
    let answered: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let client = reqwest::blocking::Client::new();
                    (0..2500)
                        .filter(|_| {
                            client
                                .get(format!("{url}/v1/keys/challenge"))
                                .send()
                                .is_ok_and(|r| r.status() == 200)
                        })
                        .count()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).sum()
    });
    assert_eq!(answered, 10_000);
    eprintln!("10,000 challenges in {:?}", started.elapsed());
    let alice = ts::key(1);
    let key = ts::api_key(&url, &alice);
    let request = r#"{"model":"hivetrain","prompt":"To be","max_tokens":1}"#;
    check(
        &post(&url, "/v1/completions", Some(&key), request, &[]),
        (200, ""),
    );

    let signed = |challenge: &str, message: &str| {
        serde_json::json!({
            "wallet": WorkerId::of(&alice).to_string(),
            "challenge": challenge,
            "signature": hex::encode(alice.sign(message.as_bytes()).to_bytes()),
        })
        .to_string()
    };
    let fresh = ts::get(&url, "/v1/keys/challenge").body;
    let challenge = fresh["challenge"].as_str().expect("challenge").to_owned();
    // One digit of the expiry changed: the MAC no longer matches.
    let mut forged = challenge.clone().into_bytes();
    forged[10] = if forged[10] == b'f' { b'e' } else { b'f' };
    let forged = String::from_utf8(forged).expect("hex");
    let context = "hivetrain-api-key-v1\n";
    let cases = [
        (forged.clone(), format!("{context}{forged}")),
        ("00".repeat(56), format!("{context}{}", "00".repeat(56))),
        ("not hex".to_owned(), format!("{context}not hex")),
    ];
    for (challenge, message) in &cases {
        check(
            &post(&url, "/v1/keys", None, &signed(challenge, message), &[]),
            (401, "bad_challenge"),
        );
    }
    clock.advance(300_001);
    let message = fresh["message"].as_str().expect("message");
    check(
        &post(&url, "/v1/keys", None, &signed(&challenge, message), &[]),
        (401, "bad_challenge"),
    );
    server.stop();
}

/// A wallet holds at most `api_keys_per_wallet_max` keys; revoking one frees its slot,
/// and a signed challenge revokes them all (for keys that are lost). Only a wallet that
/// holds credit gets a key, so keys grow only with funded wallets; a revoked key's row
/// is deleted.
#[test]
fn api_keys_are_capped_per_wallet_and_given_only_to_funded_wallets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let (server, url) = network_at(dir.path(), &clock, |c| {
        c.serving.api_keys_per_wallet_max = 3;
    });
    let alice = ts::key(1);
    let rows = || {
        server.with_core(|c| {
            c.store()
                .row_counts()
                .expect("rows")
                .into_iter()
                .find(|(table, _)| *table == "api_keys")
                .expect("api_keys")
                .1
        })
    };
    let ask = |key: &SigningKey, context: &str| {
        let challenge = ts::get(&url, "/v1/keys/challenge").body;
        let challenge = challenge["challenge"].as_str().expect("challenge");
        let body = serde_json::json!({
            "wallet": WorkerId::of(key).to_string(),
            "challenge": challenge,
            "signature": hex::encode(key.sign(format!("{context}{challenge}").as_bytes()).to_bytes()),
        });
        post(
            &url,
            if context.contains("revoke") {
                "/v1/keys/revoke"
            } else {
                "/v1/keys"
            },
            None,
            &body.to_string(),
            &[],
        )
    };
    let issue = "hivetrain-api-key-v1\n";
    let keys: Vec<String> = (0..3).map(|_| ts::api_key(&url, &alice)).collect();
    check(&ask(&alice, issue), (409, "too_many_api_keys"));
    assert_eq!(rows(), 3);
    check(
        &post(&url, "/v1/keys/revoke", Some(&keys[0]), "", &[]),
        (200, ""),
    );
    assert_eq!(rows(), 2, "a revoked key's row is deleted");
    let fourth = ts::api_key(&url, &alice);
    check(&ask(&alice, issue), (409, "too_many_api_keys"));

    // Every key of the wallet revoked by its signature: all refused, slots free.
    let revoked = ask(&alice, "hivetrain-revoke-api-keys-v1\n");
    check(&revoked, (200, ""));
    assert!(revoked.1.contains("\"keys\":3"), "{}", revoked.1);
    assert_eq!(rows(), 0);
    let request = r#"{"model":"hivetrain","prompt":"To be","max_tokens":1}"#;
    for key in [&keys[1], &keys[2], &fourth] {
        check(
            &post(&url, "/v1/completions", Some(key), request, &[]),
            (401, "invalid_api_key"),
        );
    }
    let key = ts::api_key(&url, &alice);
    check(
        &post(&url, "/v1/completions", Some(&key), request, &[]),
        (200, ""),
    );

    // An empty wallet gets no key; once it holds credit, it does.
    let dave = ts::key(5);
    check(&ask(&dave, issue), (402, "insufficient_credit"));
    assert_eq!(rows(), 1);
    assert_eq!(transfer(&url, &alice, &dave, 1, "a start").0, 200);
    check(&ask(&dave, issue), (200, ""));
    assert_eq!(rows(), 2);
    server.stop();
}
