//! Every bad input of the issue, through the real API: a typed 4xx with a stable code,
//! nothing written but the rejection's own record, and the next version bit-identical to
//! a run that never saw it.

use coordinator::Coordinator;
use protocol::WorkUnit;
use test_support as ts;

/// What a request may not change: rows of every table but `rejections`, blobs, the model.
fn footprint(server: &Coordinator) -> (Vec<(&'static str, u64)>, usize, Vec<f32>) {
    server.with_core(|core| {
        let rows = core
            .store()
            .row_counts()
            .expect("counts")
            .into_iter()
            .filter(|(t, _)| *t != "rejections")
            .collect();
        let blobs = core.store().blobs().count().expect("blobs");
        (rows, blobs, core.params().to_vec())
    })
}

fn config(dir: &std::path::Path) -> coordinator::CoordinatorConfig {
    let mut c = ts::hand_made(ts::tiny_config(dir, 2));
    c.delta_norm_max = 5.0;
    c.limits.update_bytes_max = 2 << 20;
    c.schedule.max_staleness = 0;
    c
}

/// Two workers lease the round's two units; returns (server, keys, units, n_params).
fn setup(
    dir: &std::path::Path,
) -> (
    Coordinator,
    [ed25519_dalek::SigningKey; 2],
    [WorkUnit; 2],
    usize,
) {
    let server = ts::start(dir, config(dir));
    let url = server.url();
    let keys = [ts::key(1), ts::key(2)];
    ts::register(&url, &keys[0], "alice");
    ts::register(&url, &keys[1], "bob");
    let units = [ts::lease(&url, &keys[0]), ts::lease(&url, &keys[1])];
    let n = server.with_core(|c| c.params().len());
    (server, keys, units, n)
}

fn good(
    keys: &[ed25519_dalek::SigningKey; 2],
    units: &[WorkUnit; 2],
    n: usize,
    i: usize,
) -> Vec<u8> {
    ts::update_bytes(
        &keys[i],
        units[i].id,
        units[i].base_version,
        &ts::crafted_delta(units[i].id, n),
    )
}

#[test]
fn every_bad_update_is_refused_with_its_code_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, keys, units, n) = setup(dir.path());
    let url = server.url();
    let valid = good(&keys, &units, n, 0);
    let u = units[0];

    let mut bad_signature = valid.clone();
    bad_signature[150] ^= 1;
    let mut bad_hash = valid.clone();
    let last = bad_hash.len() - 1;
    bad_hash[last] ^= 1;
    let truncated = valid[..valid.len() - 10].to_vec();
    let short = ts::update_bytes(
        &keys[0],
        u.id,
        u.base_version,
        &ts::crafted_delta(u.id, n - 1),
    );
    let mut nan = ts::crafted_delta(u.id, n);
    nan[17] = f32::NAN;
    let mut inf = ts::crafted_delta(u.id, n);
    inf[3] = f32::NEG_INFINITY;
    let huge: Vec<f32> = ts::crafted_delta(u.id, n).iter().map(|x| x * 1e4).collect();
    let not_yours = ts::update_bytes(&keys[1], u.id, u.base_version, &ts::crafted_delta(u.id, n));
    let never_leased = ts::update_bytes(&keys[0], 999, u.base_version, &ts::crafted_delta(999, n));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("bad signature", bad_signature, 401, "bad_signature"),
        (
            "payload not matching its hash",
            bad_hash,
            400,
            "hash_mismatch",
        ),
        ("truncated body", truncated, 400, "malformed"),
        ("wrong length", short, 422, "wrong_shape"),
        (
            "NaN",
            ts::update_bytes(&keys[0], u.id, u.base_version, &nan),
            422,
            "non_finite",
        ),
        (
            "infinity",
            ts::update_bytes(&keys[0], u.id, u.base_version, &inf),
            422,
            "non_finite",
        ),
        (
            "norm over the bound",
            ts::update_bytes(&keys[0], u.id, u.base_version, &huge),
            422,
            "norm_too_large",
        ),
        (
            "a unit leased to another worker",
            not_yours,
            403,
            "not_your_lease",
        ),
        ("a unit never leased", never_leased, 409, "not_leased"),
        ("garbage", b"not an update".to_vec(), 400, "malformed"),
    ];
    let before = footprint(&server);
    for (what, bytes, status, code) in cases {
        let r = ts::submit(&url, bytes);
        assert_eq!((r.status, r.code()), (status, code), "{what}: {r:?}");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.len() > 10),
            "{what}: no sentence: {r:?}"
        );
        assert_eq!(footprint(&server), before, "{what} wrote something");
    }
    let r = ts::post_declared(&url, "/v1/updates", 3 << 20);
    assert_eq!((r.status, r.code()), (413, "body_too_large"), "{r:?}");
    assert_eq!(
        footprint(&server),
        before,
        "an oversized body wrote something"
    );
    // Signed rejections are recorded (attributable); unsigned ones are not.
    let codes = ts::rejection_codes(&server);
    assert_eq!(
        codes,
        [
            "wrong_shape",
            "non_finite",
            "non_finite",
            "norm_too_large",
            "not_your_lease",
            "not_leased"
        ]
    );

    // The valid update is accepted once: sent again, it gets the same reply and nothing
    // is written; another update for the unit is a duplicate.
    let first = ts::submit(&url, valid.clone());
    assert_eq!(first.status, 200, "{first:?}");
    let after_accept = footprint(&server);
    assert_eq!(ts::submit(&url, valid), first);
    let other: Vec<f32> = ts::crafted_delta(u.id, n).iter().map(|x| x * 0.5).collect();
    let r = ts::submit(
        &url,
        ts::update_bytes(&keys[0], u.id, u.base_version, &other),
    );
    assert_eq!((r.status, r.code()), (409, "duplicate"), "{r:?}");
    assert_eq!(footprint(&server), after_accept);

    // Finish the round; the version equals that of a run that saw only the valid updates.
    let r = ts::submit(&url, good(&keys, &units, n, 1));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(ts::status(&url).version, 1);
    let noisy = server.with_core(|c| c.params().to_vec());
    server.stop();

    let clean_dir = tempfile::tempdir().expect("tempdir");
    let (clean, keys, units2, n) = setup(clean_dir.path());
    assert_eq!(units2, units, "the same config issues the same units");
    for i in 0..2 {
        let r = ts::submit(&clean.url(), good(&keys, &units, n, i));
        assert_eq!(r.status, 200, "{r:?}");
    }
    let quiet = clean.with_core(|c| c.params().to_vec());
    assert!(noisy == quiet, "bad inputs changed the model");

    // Once a newer version exists, an update on the old one is stale (MAX_STALENESS 0).
    let half: Vec<f32> = ts::crafted_delta(units[0].id, n)
        .iter()
        .map(|x| x * 0.5)
        .collect();
    let r = ts::submit(
        &clean.url(),
        ts::update_bytes(&keys[0], units[0].id, units[0].base_version, &half),
    );
    assert_eq!((r.status, r.code()), (409, "stale"), "{r:?}");
    clean.stop();
}

#[test]
fn bad_requests_get_typed_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, keys, _, _) = setup(dir.path());
    let url = server.url();
    let stranger = ts::key(9);
    let check = |r: ts::Reply, status: u16, code: &str| {
        assert_eq!((r.status, r.code()), (status, code), "{r:?}");
    };
    check(
        ts::post_signed(&url, &stranger, "/v1/lease", ""),
        403,
        "unknown_worker",
    );
    check(
        ts::post_signed_at(&url, &keys[0], "/v1/lease", "", 1),
        401,
        "clock_skew",
    );
    let unsigned = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/lease"))
        .send()
        .expect("post");
    assert_eq!(unsigned.status().as_u16(), 401);
    check(
        ts::post_signed(&url, &keys[0], "/v1/workers", "{\"name\":\"\"}"),
        400,
        "bad_name",
    );
    check(
        ts::post_signed(&url, &keys[0], "/v1/workers", "{nope"),
        400,
        "bad_json",
    );
    // A machine report out of bounds, or with a field it does not know.
    for (machine, code) in [
        (
            r#"{"device":"cpu","class":"","tokens_per_s":10}"#,
            "bad_machine",
        ),
        (
            r#"{"device":"cpu","class":"c","tokens_per_s":-1}"#,
            "bad_machine",
        ),
        (
            r#"{"device":"cpu","class":"c","tokens_per_s":1e12}"#,
            "bad_machine",
        ),
        (
            r#"{"device":"cpu","class":"c","tokens_per_s":1,"tier":"fast"}"#,
            "bad_json",
        ),
    ] {
        let body = format!(r#"{{"name":"w","machine":{machine}}}"#);
        check(
            ts::post_signed(&url, &keys[0], "/v1/workers", &body),
            400,
            code,
        );
    }
    check(
        ts::post_signed(&url, &keys[0], "/v1/heartbeat", "{\"unit\":424242}"),
        409,
        "not_leased",
    );
    let get = |path: &str| {
        let r = reqwest::blocking::get(format!("{url}{path}")).expect("get");
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().unwrap_or_default();
        ts::Reply { status, body }
    };
    check(get("/v1/models/7"), 404, "unknown_version");
    check(get("/v1/models/x"), 400, "bad_version");
    check(get("/v1/nothing"), 404, "not_found");
    server.stop();
}

/// One key sending garbage cannot fill the disk: its rejections are recorded up to a
/// bound a round, and every reply past it is still the typed refusal.
#[test]
fn a_keys_rejections_are_recorded_up_to_a_bound_a_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, keys, units, n) = setup(dir.path());
    let url = server.url();
    let mut nan = ts::crafted_delta(units[0].id, n);
    nan[0] = f32::NAN;
    let bytes = ts::update_bytes(&keys[0], units[0].id, units[0].base_version, &nan);
    let extra = 6;
    for _ in 0..coordinator::MAX_REJECTIONS_RECORDED + extra {
        let r = ts::submit(&url, bytes.clone());
        assert_eq!((r.status, r.code()), (422, "non_finite"), "{r:?}");
    }
    let recorded = ts::rejection_codes(&server).len() as u64;
    assert_eq!(recorded, coordinator::MAX_REJECTIONS_RECORDED);
    server.stop();
}

/// An update far longer than the others is refused as `norm_outlier` even when it is the
/// first of its round: the last round's norms (reloaded from the store on restart) set
/// the bar until this round has its own.
#[test]
fn an_outlier_first_in_its_round_meets_the_last_rounds_median_norm() {
    const T0: u64 = 1_700_000_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    let keys = [ts::key(1), ts::key(2)];
    let ids = [&keys[0], &keys[1]].map(protocol::WorkerId::of);
    let mut core = coordinator::Core::open(&store_dir, config.clone(), T0).expect("open");
    let n = core.params().len();
    for (id, name) in ids.iter().zip(["alice", "bob"]) {
        core.register(*id, name, Some(&test_support::this_machine()), T0)
            .expect("register");
    }
    // Round 0: two ordinary updates make version 1.
    for (id, key) in ids.iter().zip(&keys) {
        let unit = ts::core_lease(&mut core, *id, T0);
        ts::core_submit(
            &mut core,
            key,
            &unit,
            &ts::crafted_delta(unit.id, n),
            T0 + 10,
        )
        .expect("accepted");
    }
    assert_eq!(core.version(), 1);
    drop(core);

    let mut core = coordinator::Core::open(&store_dir, config, T0 + 20).expect("reopen");
    let unit = ts::core_lease(&mut core, ids[0], T0 + 20);
    let ordinary = ts::crafted_delta(unit.id, n);
    let long: Vec<f32> = ordinary.iter().map(|x| 100.0 * x).collect();
    // (delta, what the core answers): the long one first, then the ordinary one.
    let cases = [(long, Err("norm_outlier".to_owned())), (ordinary, Ok(()))];
    for (delta, expect) in cases {
        assert_eq!(
            ts::core_submit(&mut core, &keys[0], &unit, &delta, T0 + 30),
            expect
        );
    }
}

/// A run whose corpus, tokenizer or base is larger than workers download does not start:
/// the coordinator refuses it, naming the file and the bound, before reading it (the
/// files here are sparse: their length is all there is of them).
#[test]
fn files_workers_would_refuse_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sparse = |name: &str, len: u64| {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(len))
            .expect("sparse file");
        path
    };
    let corpus = sparse("huge.txt", worker::CORPUS_BYTES_MAX + 1);
    let tokenizer = sparse("huge-tokenizer.json", worker::TOKENIZER_BYTES_MAX + 1);
    let base = sparse("huge.gguf", worker::BASE_BYTES_MAX + 1);
    let cases = [
        (
            {
                let mut c = ts::tiny_config(dir.path(), 2);
                c.corpus = corpus.clone();
                c
            },
            format!(
                "{}: the corpus is 2147483649 bytes, and workers download at most 2147483648 (CORPUS_BYTES_MAX)",
                corpus.display()
            ),
        ),
        (
            {
                let mut c = ts::tiny_config(dir.path(), 2);
                c.tokenizer = tokenizer.clone();
                c
            },
            format!(
                "{}: the tokenizer is 67108865 bytes, and workers download at most 67108864 (TOKENIZER_BYTES_MAX)",
                tokenizer.display()
            ),
        ),
        (
            {
                let mut c = ts::tiny_finetune_config(dir.path(), 2);
                c.finetune.as_mut().expect("a fine-tune").base = base.clone();
                c
            },
            format!(
                "{}: the base is 8589934593 bytes, and workers download at most 8589934592 (BASE_BYTES_MAX)",
                base.display()
            ),
        ),
    ];
    for (i, (config, expect)) in cases.into_iter().enumerate() {
        let store = dir.path().join(format!("store-{i}"));
        let err = coordinator::Core::open(&store, config, 0)
            .map_or_else(|e| e.to_string(), |_| "opened".into());
        assert!(err.contains(&expect), "{err}");
    }
}
