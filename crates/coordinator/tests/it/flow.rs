//! The whole loop, as a contributor lives it: alice and bob train the model for real,
//! earn credit for their accepted work, alice spends hers on the model, the revenue comes
//! back to both as dividends, and anyone can check the ledger.

use ledger::{Entry, Ledger};
use protocol::WorkerId;
use test_support as ts;

#[test]
fn train_earn_query_dividends_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_config(dir.path(), 2);
    config.serving.price_prompt_token = 0;
    config.serving.price_output_token = 1;
    let server = ts::start(dir.path(), config);
    let url = server.url();
    // Alice and bob train two rounds of two units for real, at most two units each, so
    // each does at least one whatever the scheduling.
    let (alice, bob) = (ts::key(10), ts::key(11));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = [(alice.clone(), "alice"), (bob.clone(), "bob")]
        .into_iter()
        .map(|(key, name)| {
            let transport = worker::HttpTransport::new(&url).expect("transport");
            let mut options = ts::worker_options(dir.path(), name);
            options.max_units = Some(2);
            let stop = stop.clone();
            std::thread::spawn(move || worker::run(&transport, &key, &options, &stop, &mut ()))
        })
        .collect();
    for h in handles {
        let summary = h.join().expect("worker thread").expect("worker run");
        assert_eq!((summary.accepted, summary.rejected), (2, 0), "{summary:?}");
    }
    assert_eq!(ts::status(&url).version, 2);
    let view =
        |key: &ed25519_dalek::SigningKey| server.with_core(|c| c.wallet(WorkerId::of(key), None));
    let (a, b) = (view(&alice), view(&bob));
    assert!(
        a.units >= 1 && b.units >= 1 && a.units + b.units >= 4,
        "{a:?} {b:?}"
    );
    // Credit in proportion to accepted work: the same credit per unit.
    assert_eq!(a.earned * b.units, b.earned * a.units);
    assert!(a.earned > 0);

    // Alice asks the model; her credit pays, bob's does not move.
    let key = ts::api_key(&url, &alice);
    let reply: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"hivetrain","prompt":"KING HENRY:\n","max_tokens":2,"temperature":0}"#)
        .send()
        .expect("query")
        .json()
        .expect("json");
    let cost = reply["usage"]["completion_tokens"].as_u64().expect("usage");
    assert_eq!(cost, 2);
    assert_eq!(view(&alice).balance, a.balance - cost);
    assert_eq!(view(&bob).balance, b.balance);

    // Dividends: the pool goes back to both, in proportion to what each earned.
    let paid = server.with_core(|c| c.pay_dividends(coordinator::system_ms()).expect("pay"));
    assert!(paid >= 1);
    let (a2, b2) = (view(&alice), view(&bob));
    let total = a.earned + b.earned;
    assert_eq!(a2.dividends, cost * a.earned / total);
    assert_eq!(b2.dividends, cost * b.earned / total);

    // The ledger checks out from outside; one byte flipped in an export is caught at
    // its entry.
    let ledger = crate::ledger::verify_from_outside(&url);
    let authority = ledger.authority();
    let export: Vec<String> = ledger
        .entries()
        .iter()
        .map(|e| serde_json::to_string(e).expect("json"))
        .collect();
    let target = ledger.entries().len() / 2;
    let mut tampered = export.clone();
    let at = tampered[target].find("\"amount\":").expect("amount") + 9;
    let mut bytes = tampered[target].clone().into_bytes();
    bytes[at] = if bytes[at] == b'9' { b'8' } else { b'9' };
    tampered[target] = String::from_utf8(bytes).expect("utf8");
    let entries: Vec<Entry> = tampered
        .iter()
        .map(|l| serde_json::from_str(l).expect("still JSON"))
        .collect();
    let err = Ledger::replay(authority, entries).expect_err("tampered");
    assert_eq!(err.seq, target as u64, "{err}");
    server.stop();
}
