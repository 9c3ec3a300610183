//! Credit through the real API: a mint per accepted update, wallets, transfers, and a
//! ledger a client can check without trusting the server.

use ledger::merkle::{InclusionProof, verify_inclusion};
use ledger::wire::{EntriesPage, LeaderRow, Stats, WalletView};
use ledger::{Entry, Ledger, TreeHead};
use protocol::WorkerId;
use test_support as ts;

fn json<T: serde::de::DeserializeOwned>(reply: ts::Reply) -> T {
    assert_eq!(reply.status, 200, "{reply:?}");
    serde_json::from_value(reply.body).expect("reply shape")
}

/// Everything a client needs to check the ledger on its own: every entry replays under
/// the head's key and every entry's proof checks against the head.
pub(crate) fn verify_from_outside(url: &str) -> Ledger {
    let head: TreeHead = json(ts::get(url, "/v1/ledger/head"));
    let authority =
        ed25519_dalek::VerifyingKey::from_bytes(&head.authority.0).expect("authority key");
    assert!(head.verify(&authority));
    let page: EntriesPage = json(ts::get(url, "/v1/ledger?from=0&limit=3"));
    let mut entries: Vec<Entry> = page.entries;
    let mut next = page.next;
    while let Some(from) = next {
        let page: EntriesPage = json(ts::get(url, &format!("/v1/ledger?from={from}&limit=3")));
        entries.extend(page.entries);
        next = page.next;
    }
    let ledger = Ledger::replay(authority, entries).expect("the ledger verifies");
    assert_eq!(ledger.len() as u64, head.size);
    for e in ledger.entries() {
        let proof: InclusionProof = json(ts::get(
            url,
            &format!("/v1/ledger/proof/{}?size={}", e.seq, head.size),
        ));
        assert!(verify_inclusion(&e.hash, &proof, head.size, &head.root));
    }
    ledger
}

#[test]
fn accepted_work_is_credited_and_credit_moves_only_as_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 3));
    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    let (alice, bob) = (ts::key(1), ts::key(2));
    ts::register(&url, &alice, "alice");
    ts::register(&url, &bob, "bob");
    let n = server.with_core(|c| c.params().len());
    // Alice does two units, bob one: one round of three.
    let mut credited = [0u64; 2];
    for (who, key) in [(0, &alice), (0, &alice), (1, &bob)] {
        let unit = ts::lease(&url, key);
        let r = ts::submit_crafted(&url, key, &unit, n);
        assert_eq!(r.status, 200, "{r:?}");
        credited[who] += r.body["credit"].as_u64().expect("credit");
    }
    assert!(
        credited[1] > 0 && credited[0] == 2 * credited[1],
        "{credited:?}"
    );
    let wallet = |key: &ed25519_dalek::SigningKey| -> WalletView {
        json(ts::get(&url, &format!("/v1/wallets/{}", WorkerId::of(key))))
    };
    let (a, b) = (wallet(&alice), wallet(&bob));
    assert_eq!(
        (a.balance, a.earned, a.units),
        (credited[0], credited[0], 2)
    );
    assert_eq!(
        (b.balance, b.earned, b.units),
        (credited[1], credited[1], 1)
    );

    // The newest entries only: the same totals, fewer entries; a bad count is refused.
    let alice_id = WorkerId::of(&alice);
    let newest: WalletView = json(ts::get(&url, &format!("/v1/wallets/{alice_id}?entries=1")));
    assert_eq!(
        (newest.balance, newest.units, newest.entries.len()),
        (a.balance, a.units, 1)
    );
    assert_eq!(newest.entries[0], a.entries[1]);
    let none: WalletView = json(ts::get(&url, &format!("/v1/wallets/{alice_id}?entries=0")));
    assert!(none.entries.is_empty() && none.earned == a.earned);
    let bad = ts::get(&url, &format!("/v1/wallets/{alice_id}?entries=-1"));
    assert_eq!((bad.status, bad.code()), (400, "bad_query"), "{bad:?}");

    let board: Vec<LeaderRow> = json(ts::get(&url, "/v1/leaderboard"));
    let names: Vec<(&str, u64)> = board.iter().map(|r| (r.name.as_str(), r.units)).collect();
    assert_eq!(names, [("alice", 2), ("bob", 1)]);
    // Each row shows the device its worker reported and its tier: a unit of the tiny
    // run at 1,000 tokens/s against the run's lease.
    let unit_tokens = u64::from(config.schedule.steps_per_unit) * config.batch as u64 * 64;
    let tier = run::Tier::of(1_000.0, unit_tokens, config.schedule.lease_ms).name();
    for row in &board {
        assert_eq!(
            (row.device.as_str(), row.tier.as_str()),
            ("cpu (test)", tier),
            "{row:?}"
        );
    }
    // A worker that re-registers from a machine too slow for its lease shows as slow.
    let slow = serde_json::json!({
        "name": "bob",
        "machine": {"device": "cpu (1 thread)", "class": "cpu/other", "tokens_per_s": 1e-3},
    });
    assert_eq!(
        ts::post_signed(&url, &bob, "/v1/workers", &slow.to_string()).status,
        200
    );
    let board: Vec<LeaderRow> = json(ts::get(&url, "/v1/leaderboard"));
    assert_eq!(
        (board[1].device.as_str(), board[1].tier.as_str()),
        ("cpu (1 thread)", "slow")
    );

    // A transfer moves exactly what it says, once, however often it is sent.
    let body = format!(
        r#"{{"to":"{}","amount":{},"reference":"thanks"}}"#,
        WorkerId::of(&bob),
        credited[1]
    );
    let first = ts::post_signed(&url, &alice, "/v1/transfers", &body);
    let again = ts::post_signed(&url, &alice, "/v1/transfers", &body);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body["seq"], again.body["seq"]);
    assert_eq!(wallet(&alice).balance, credited[0] - credited[1]);
    assert_eq!(wallet(&bob).balance, 2 * credited[1]);

    // Refusals: each a code, none an entry.
    let entries_before = server.with_core(|c| c.stats().expect("stats").entries);
    let refused = [
        (
            format!(
                r#"{{"to":"{}","amount":{},"reference":"too-much"}}"#,
                WorkerId::of(&bob),
                10 * credited[0]
            ),
            "insufficient_credit",
        ),
        (
            r#"{"to":"nobody","amount":1,"reference":"x"}"#.to_owned(),
            "bad_wallet",
        ),
        (
            format!(
                r#"{{"to":"{}","amount":1,"reference":"self"}}"#,
                WorkerId::of(&alice)
            ),
            "bad_transfer",
        ),
        (
            format!(
                r#"{{"to":"{}","amount":0,"reference":"zero"}}"#,
                WorkerId::of(&bob)
            ),
            "bad_amount",
        ),
        (
            format!(
                r#"{{"to":"{}","amount":2,"reference":"thanks"}}"#,
                WorkerId::of(&bob)
            ),
            "reference_reused",
        ),
        (r#"{"to": 5}"#.to_owned(), "bad_json"),
    ];
    for (body, code) in &refused {
        let r = ts::post_signed(&url, &alice, "/v1/transfers", body);
        assert_eq!(r.code(), *code, "{body}: {r:?}");
        assert!((400..500).contains(&r.status), "{r:?}");
    }
    let r = ts::post_signed(&url, &alice, "/v1/transfers", &refused[0].0);
    assert_eq!(r.status, 402);
    assert_eq!(ts::get(&url, "/v1/wallets/xyz").code(), "bad_wallet");
    assert_eq!(
        ts::get(&url, "/v1/ledger/proof/99?size=4").code(),
        "no_such_entry"
    );
    assert_eq!(ts::get(&url, "/v1/ledger/proof/0").code(), "bad_query");
    assert_eq!(
        server.with_core(|c| c.stats().expect("stats").entries),
        entries_before
    );

    let stats: Stats = json(ts::get(&url, "/v1/stats"));
    assert_eq!(
        (
            stats.entries,
            stats.minted,
            stats.accepted_updates,
            stats.current_version
        ),
        (4, credited[0] + credited[1], 3, 1)
    );
    // A unit found false later is clawed back by an entry of its own, once.
    let bob_before = wallet(&bob).balance;
    let (first, again, missing) = server.with_core(|c| {
        let unit = c
            .wallet(WorkerId::of(&bob), None)
            .entries
            .iter()
            .find(|e| e.kind == ledger::Kind::Mint)
            .and_then(|e| e.reference.strip_prefix("update:").map(str::to_owned))
            .and_then(|u| u.parse::<u64>().ok())
            .expect("bob's unit");
        (
            c.claw_back(unit, 1).expect("clawback"),
            c.claw_back(unit, 2).expect("repeat"),
            c.claw_back(9_999, 3).map_err(|e| e.code),
        )
    });
    assert_eq!(first.seq, again.seq);
    assert_eq!(first.amount, credited[1]);
    assert_eq!(missing, Err("no_such_mint".to_owned()));
    assert_eq!(wallet(&bob).balance, bob_before - credited[1]);
    let ledger = verify_from_outside(&url);

    // A restart replays the same ledger.
    server.kill();
    let server = ts::start(dir.path(), config.clone());
    let again = verify_from_outside(&server.url());
    assert_eq!(again.balances(), ledger.balances());
    server.stop();

    // A ledger row changed behind the coordinator's back stops it from starting, naming
    // the entry.
    let conn = rusqlite::Connection::open(dir.path().join("store/hivetrain.sqlite3")).expect("db");
    let text: String = conn
        .query_row("SELECT entry FROM ledger WHERE seq = 1", [], |r| r.get(0))
        .expect("entry");
    let forged = text.replacen(
        &format!("\"amount\":{}", credited[0] / 2),
        "\"amount\":999999999",
        1,
    );
    assert_ne!(forged, text);
    conn.execute("UPDATE ledger SET entry = ?1 WHERE seq = 1", [forged])
        .expect("update");
    drop(conn);
    let err = coordinator::Coordinator::start(&dir.path().join("store"), config, "127.0.0.1:0")
        .expect_err("a tampered ledger is refused");
    assert!(
        err.to_string().contains("entry 1: its hash does not match"),
        "{err}"
    );
}

/// Units sized per worker (`schedule.unit_ms`): an old machine, a laptop and a GPU rig
/// each get the steps they train in the unit's time, within a quarter and four times the
/// run's 10; each update weighs and earns its tokens, so credit stays per FLOP; its row
/// records its unit's steps and its worker's class and tier (the old machine is slow
/// against a unit of the run's 10 steps, yet finishes its own).
#[test]
fn units_sized_for_their_workers_earn_per_flop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 3));
    config.schedule.unit_ms = 10_000;
    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    // A step of the tiny run: 4 rows of 64 tokens.
    let step_tokens = config.batch as f64 * 64.0;
    let workers = [
        ("old", "cpu (old)", step_tokens / 10.0, 2), // 10 s a step: the fewest, 2
        ("laptop", "cpu (test)", step_tokens, 10),   // 1 s a step: 10 in 10 s
        ("rig", "cuda:0 (test)", 1e6, 40),           // 0.26 ms a step: the most, 40
    ];
    // The rig's norm is 20 times the old machine's, over the median bar (5 times) but
    // for its scaling to the run's unit: it arrives last, after the bar is set.
    let n = server.with_core(|c| c.params().len());
    let mut credits = Vec::new();
    for (i, (name, device, tokens_per_s, want_steps)) in workers.into_iter().enumerate() {
        let key = ts::key(i as u8 + 1);
        let body = serde_json::json!({
            "name": name,
            "machine": {"device": device, "class": "cpu/test", "tokens_per_s": tokens_per_s},
        });
        let r = ts::post_signed(&url, &key, "/v1/workers", &body.to_string());
        assert_eq!(r.status, 200, "{r:?}");
        let unit = ts::lease(&url, &key);
        assert_eq!(unit.address.steps, want_steps, "{name}");
        // A delta as long as its unit: its norm grows with its steps, as training's does.
        let delta: Vec<f32> = ts::crafted_delta(unit.id, n)
            .iter()
            .map(|x| x * want_steps as f32 / 10.0)
            .collect();
        let r = ts::submit(
            &url,
            ts::update_bytes(&key, unit.id, unit.base_version, &delta),
        );
        assert_eq!(r.status, 200, "{r:?}");
        credits.push((unit.id, r.body["credit"].as_u64().expect("credit")));
    }
    // Each earns its unit's FLOPs, whatever its size.
    let flops_per_token = server.with_core(|c| c.run_info().model.train_flops_per_token());
    let earned: Vec<u64> = credits.iter().map(|&(_, credit)| credit).collect();
    let want: Vec<u64> = [2, 10, 40]
        .iter()
        .map(|steps| run::credit::unit_credit(flops_per_token, steps * 256))
        .collect();
    assert_eq!(earned, want);
    let rows = server.with_core(|c| {
        credits
            .iter()
            .map(|&(unit, _)| {
                let stored = c.store().unit(unit).expect("unit").expect("its row");
                let update = c.store().update(unit).expect("update").expect("its row");
                (
                    stored.address.steps,
                    update.weight,
                    update.class,
                    update.tier,
                )
            })
            .collect::<Vec<_>>()
    });
    let cpu = Some("cpu/test".to_owned());
    let tier = |t: &str| Some(t.to_owned());
    assert_eq!(
        rows,
        [
            (2, 2 * 256, cpu.clone(), tier("slow")),
            (10, 10 * 256, cpu.clone(), tier("fast")),
            (40, 40 * 256, cpu, tier("fast")),
        ]
    );
    server.stop();
}
