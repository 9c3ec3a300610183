use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use test_support as ts;

/// Runs `n` worker threads against `url` until the coordinator reaches `version`.
pub(crate) fn train_until(dir: &std::path::Path, url: &str, n: u8, version: u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let transport = worker::HttpTransport::new(url).expect("transport");
            let options = ts::worker_options(dir, &format!("w{i}"));
            let stop = stop.clone();
            std::thread::spawn(move || {
                worker::run(&transport, &ts::key(10 + i), &options, &stop, &mut ())
            })
        })
        .collect();
    let started = Instant::now();
    while ts::status(url).version < version {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no version {version} after 240 s: {:?}",
            ts::status(url)
        );
        assert!(
            !handles.iter().any(|h| h.is_finished()),
            "a worker stopped early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let summary = h.join().expect("worker thread").expect("worker run");
        assert_eq!(summary.rejected, 0, "{summary:?}");
    }
}

#[test]
fn three_workers_complete_three_rounds_and_the_holdout_loss_falls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), ts::tiny_config(dir.path(), 3));
    let url = server.url();
    train_until(dir.path(), &url, 3, 3);
    let status = ts::status(&url);
    let done: Vec<_> = status
        .rounds
        .iter()
        .filter(|r| r.version.is_some())
        .collect();
    assert!(done.len() >= 3, "{status:?}");
    for r in &done {
        assert_eq!((r.accepted, r.rejected), (3, 0), "{r:?}");
    }
    let losses: Vec<f32> = std::iter::once(status.initial_holdout_loss)
        .chain(done.iter().map(|r| r.holdout_loss.expect("loss")))
        .collect();
    assert!(
        losses[3] < losses[0] - 0.5,
        "the holdout loss did not fall: {losses:?}"
    );
    // `?rounds=N`: the newest N rounds, as in the whole list; a bad N is refused.
    let newest = ts::get(&url, "/v1/status?rounds=2");
    let rounds = newest.body["rounds"].as_array().expect("rounds");
    let all = ts::status(&url);
    let tail = &all.rounds[all.rounds.len() - 2..];
    assert_eq!(rounds.len(), 2, "{newest:?}");
    for (got, want) in rounds.iter().zip(tail) {
        assert_eq!(got["round"], want.round);
        assert_eq!(got["version"].as_u64(), want.version);
    }
    let bad = ts::get(&url, "/v1/status?rounds=many");
    assert_eq!((bad.status, bad.code()), (400, "bad_query"), "{bad:?}");
    // The registry holds every version with its parent and the updates it was built from.
    server.with_core(|core| {
        let versions = core.store().versions().expect("versions");
        assert!(versions.len() >= 4);
        for v in &versions[1..] {
            assert_eq!(v.parent, Some(v.version - 1));
            assert_eq!(v.updates.len(), 3);
        }
    });
    server.stop();
}

#[test]
fn an_expired_lease_is_reissued_and_the_first_holder_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ts::ManualClock::new(coordinator::system_ms());
    let config = ts::hand_made(ts::tiny_config(dir.path(), 1));
    let lease_ms = config.schedule.lease_ms;
    let server = ts::start_with_clock(dir.path(), config, &clock);
    let url = server.url();
    let (a, b) = (ts::key(1), ts::key(2));
    ts::register(&url, &a, "a");
    ts::register(&url, &b, "b");
    let unit = ts::lease_at(&url, &a, clock.now());
    // b finds nothing while a holds the only unit.
    let r = ts::post_signed_at(&url, &b, "/v1/lease", "", clock.now());
    assert_eq!(r.body["kind"], "no_work", "{r:?}");
    clock.advance(lease_ms + 1);
    let again = ts::lease_at(&url, &b, clock.now());
    assert_eq!(again, unit, "the same unit, the same data");
    let n = server.with_core(|c| c.params().len());
    let late = ts::update_bytes(
        &a,
        unit.id,
        unit.base_version,
        &ts::crafted_delta(unit.id, n),
    );
    let r = ts::submit(&url, late);
    assert_eq!((r.status, r.code()), (403, "not_your_lease"), "{r:?}");
    let r = ts::post_signed_at(
        &url,
        &a,
        "/v1/heartbeat",
        &format!("{{\"unit\":{}}}", unit.id),
        clock.now(),
    );
    assert_eq!((r.status, r.code()), (409, "not_leased"), "{r:?}");
    server.stop();
}

/// A lease's hard deadline follows the speed its worker reported: heartbeats renew a
/// fast machine's lease only up to `lease_ms` (a unit should take it seconds), a slow
/// one's up to `schedule.slack` times its unit, and one with no report up to
/// `lease_max_ms`, as before machines were reported.
#[test]
fn heartbeats_renew_a_lease_up_to_what_its_workers_speed_allows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let t0 = 1_000_000;
    let clock = ts::ManualClock::new(t0);
    let config = ts::hand_made(ts::tiny_config(dir.path(), 3));
    let (lease_ms, slack) = (config.schedule.lease_ms, config.schedule.slack);
    assert_eq!((lease_ms, slack), (60_000, 3.0));
    // The tiny run's unit: 10 steps of 4 rows of 64 tokens.
    let unit_tokens = u64::from(config.schedule.steps_per_unit) * config.batch as u64 * 64;
    let server = ts::start_with_clock(dir.path(), config, &clock);
    let url = server.url();
    let machine = |tokens_per_s: f64| protocol::api::Machine {
        tokens_per_s,
        ..ts::this_machine()
    };
    // Slow: a unit in 40 s, so a hard deadline of 120 s.
    let workers = [
        ("fast", Some(machine(1e6))),
        ("slow", Some(machine(unit_tokens as f64 / 40.0))),
        ("unreported", None),
    ];
    let mut held = Vec::new();
    for (n, (name, machine)) in workers.into_iter().enumerate() {
        let key = ts::key(n as u8 + 1);
        let body = serde_json::to_string(&protocol::api::RegisterRequest {
            name: name.into(),
            machine,
        })
        .expect("json");
        let r = ts::post_signed_at(&url, &key, "/v1/workers", &body, t0);
        assert_eq!(r.status, 200, "{r:?}");
        let r = ts::post_signed_at(&url, &key, "/v1/lease", "", t0);
        match serde_json::from_value(r.body.clone()).expect("lease reply") {
            protocol::api::LeaseReply::Lease {
                unit,
                lease_ms: granted,
                ..
            } => {
                assert_eq!(granted, lease_ms, "{name}: the first deadline is the lease");
                held.push((name, key, unit.id));
            }
            other => panic!("{name}: no lease: {other:?}"),
        }
    }
    // Which holders a heartbeat at `at` finds still holding their unit.
    let alive = |at: u64| -> Vec<&str> {
        clock.advance(at - clock.now());
        held.iter()
            .filter(|(_, key, unit)| {
                let body = format!("{{\"unit\":{unit}}}");
                let r = ts::post_signed_at(&url, key, "/v1/heartbeat", &body, at);
                match r.status {
                    204 => true,
                    409 => {
                        // Expired, and no one else took the unit yet (nobody asks here).
                        assert_eq!(r.code(), "lease_expired", "{r:?}");
                        false
                    }
                    _ => panic!("heartbeat: {r:?}"),
                }
            })
            .map(|(name, _, _)| *name)
            .collect()
    };
    assert_eq!(alive(t0 + 50_000), ["fast", "slow", "unreported"]);
    assert_eq!(alive(t0 + 100_000), ["slow", "unreported"]);
    assert_eq!(alive(t0 + 115_000), ["slow", "unreported"]);
    assert_eq!(alive(t0 + 150_000), ["unreported"]);
    server.stop();
}
