//! The scoring pool: however many updates arrive at once, the coordinator holds no more
//! scoring backends than `devices.scoring_memory_mb` pays for (at least one, at most the
//! uploads read at once), and every update is still scored.

use std::sync::Barrier;

use test_support as ts;

/// The sample `hivetrain_scorers{what="WHAT"}` of a `/metrics` text.
fn scorers(text: &str, what: &str) -> Option<u64> {
    let name = format!("hivetrain_scorers{{what=\"{what}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .and_then(|v| v.parse().ok())
}

/// `n` updates submitted at once with a budget of `backends` evaluation backends (in MB,
/// rounded up) and `uploads` read at once: the pool's size is `expect`, it never held
/// more, and each update got a scored verdict (never a 5xx).
#[track_caller]
fn check(backends: u64, uploads: u32, n: u8, expect: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_config(dir.path(), u32::from(n));
    config.spot_check.enabled = false;
    config.codec = protocol::Codec::Fp32;
    config.http.upload_concurrency = uploads;
    // The bytes of one scoring backend, stated by the engine for this run's model.
    let probe = ts::start(dir.path(), config.clone());
    let (spec, info) = probe.with_core(|c| (c.model_spec().clone(), c.run_info()));
    probe.stop();
    let bytes = engine::backend_bytes(
        &spec,
        engine::Purpose::Eval,
        info.batch as usize,
        info.seq as usize,
    );
    const MB: u64 = 1024 * 1024;
    config.devices.scoring_memory_mb = Some((backends * bytes).div_ceil(MB).max(1));
    let server = ts::start(dir.path(), config);
    let url = server.url();
    let keys: Vec<_> = (1..=n).map(ts::key).collect();
    let units: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            ts::register(&url, key, &format!("worker {i}"));
            ts::lease(&url, key)
        })
        .collect();
    let n_params = info.n_params as usize;
    let start = Barrier::new(usize::from(n));
    let replies: Vec<ts::Reply> = std::thread::scope(|s| {
        let sent: Vec<_> = keys
            .iter()
            .zip(&units)
            .map(|(key, unit)| {
                let start = &start;
                let url = &url;
                s.spawn(move || {
                    let bytes = ts::update_bytes(
                        key,
                        unit.id,
                        unit.base_version,
                        &ts::crafted_delta(unit.id, n_params),
                    );
                    start.wait();
                    ts::submit(url, bytes)
                })
            })
            .collect();
        sent.into_iter()
            .map(|t| t.join().expect("submit thread"))
            .collect()
    });
    for r in &replies {
        // 200 or a scored refusal (422): every update went through a scoring backend.
        assert!(
            [200, 422].contains(&r.status),
            "{backends} backends, {uploads} uploads: {r:?}"
        );
    }
    let text = reqwest::blocking::get(format!("{url}/metrics"))
        .and_then(|r| r.text())
        .expect("GET /metrics");
    let counts = ["size", "open", "in_use", "peak_in_use"].map(|w| scorers(&text, w));
    let [size, open, in_use, peak] = counts.map(|c| c.unwrap_or(u64::MAX));
    assert_eq!(
        size, expect,
        "{backends} backends, {uploads} uploads: {text}"
    );
    assert!(
        (1..=size).contains(&open) && (1..=size).contains(&peak) && in_use == 0,
        "{backends} backends, {uploads} uploads: {counts:?}"
    );
    server.stop();
}

#[test]
fn concurrent_updates_never_hold_more_scoring_backends_than_the_budget_pays_for() {
    for (backends, uploads, n, expect) in [
        // Less than one backend's bytes: one, all the same.
        (0, 6, 6, 1),
        (2, 6, 6, 2),
        // More than the uploads read at once: no more backends than them.
        (100, 3, 3, 3),
    ] {
        check(backends, uploads, n, expect);
    }
}
