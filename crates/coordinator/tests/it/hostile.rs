//! What hostile traffic found, through the real API: leases held by heartbeats alone, ids
//! no store can hold, credit sent to keys that cannot spend it, floods of registrations
//! and rejections, and a worker retrying an update whose reply it lost.

use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::SigningKey;
use protocol::WorkerId;
use protocol::api::LeaseReply;
use test_support as ts;

const T0: u64 = 1_700_000_000_000;

/// Asserts a reply's status and code.
#[track_caller]
fn check(r: &ts::Reply, status: u16, code: &str) {
    assert_eq!((r.status, r.code()), (status, code), "{r:?}");
}

/// Rows of every table, blobs and the ledger's length: what a refused request or a retry
/// may not change.
fn footprint(server: &Coordinator) -> (Vec<(&'static str, u64)>, usize, u64) {
    server.with_core(|core| {
        let rows = core.store().row_counts().expect("counts");
        let blobs = core.store().blobs().count().expect("blobs");
        (rows, blobs, core.stats().expect("stats").entries)
    })
}

fn config(dir: &std::path::Path, units: u32) -> CoordinatorConfig {
    ts::hand_made(ts::tiny_config(dir, units))
}

/// Lease at `now` for `key`: the unit id, or `None` for "no work".
fn lease_at(url: &str, key: &SigningKey, now: u64) -> Option<u64> {
    let r = ts::post_signed_at(url, key, "/v1/lease", "", now);
    check(&r, 200, "");
    match serde_json::from_value(r.body.clone()).expect("lease reply") {
        LeaseReply::Lease { unit, .. } => Some(unit.id),
        LeaseReply::NoWork { .. } => None,
    }
}

/// Two keys that lease a unit each and then only send heartbeats hold a round of three
/// units (MIN 2) back only until the lease's hard limit: then their units go to an
/// honest worker, they get no other unit of the round, and the round aggregates. Past
/// the limit their heartbeats renew nothing (`lease_expired` while no one has taken
/// their unit: their update would still be taken, as BOINC takes a late result).
#[test]
fn heartbeats_alone_hold_a_unit_only_until_the_leases_hard_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), 3);
    c.schedule.min_updates = 2;
    c.schedule.lease_ms = 60_000;
    c.schedule.lease_max_ms = 150_000;
    c.schedule.round_timeout_ms = 100_000;
    let clock = ts::ManualClock::new(T0);
    let server = ts::start_with_clock(dir.path(), c, &clock);
    let url = server.url();
    let n = server.with_core(|c| c.params().len());
    let (hogs, honest) = ([ts::key(1), ts::key(2)], ts::key(3));
    for (key, name) in hogs
        .iter()
        .chain([&honest])
        .zip(["hog-1", "hog-2", "honest"])
    {
        let body = format!("{{\"name\":\"{name}\"}}");
        check(
            &ts::post_signed_at(&url, key, "/v1/workers", &body, T0),
            200,
            "",
        );
    }
    let held: Vec<u64> = hogs
        .iter()
        .map(|k| lease_at(&url, k, T0).expect("a unit"))
        .collect();
    let submit = |unit: u64| {
        let spec = server.with_core(|c| {
            let u = c.store().unit(unit).expect("unit").expect("issued");
            (u.id, u.base_version)
        });
        let delta = ts::crafted_delta(spec.0, n);
        let r = ts::submit(&url, ts::update_bytes(&honest, spec.0, spec.1, &delta));
        check(&r, 200, "");
    };
    let own = lease_at(&url, &honest, T0).expect("the third unit");
    submit(own);
    assert_eq!(
        lease_at(&url, &honest, T0 + 1_000),
        None,
        "both others held"
    );

    // Heartbeats every 50 s keep the leases (60 s each) alive up to 150 s, past the
    // round's timeout: the round cannot reach MIN while they hold.
    for step in 1..=2 {
        let now = T0 + step * 50_000;
        clock.advance(50_000);
        for (key, unit) in hogs.iter().zip(&held) {
            let body = format!("{{\"unit\":{unit}}}");
            check(
                &ts::post_signed_at(&url, key, "/v1/heartbeat", &body, now),
                204,
                "",
            );
        }
        assert_eq!(lease_at(&url, &honest, now), None, "held at {step}");
        assert_eq!(ts::status(&url).version, 0);
    }
    clock.advance(50_000);
    let now = T0 + 150_000;
    for key in &hogs {
        assert_eq!(
            lease_at(&url, key, now),
            None,
            "an overdue key gets nothing"
        );
    }
    let freed = lease_at(&url, &honest, now).expect("a freed unit");
    assert!(held.contains(&freed), "{freed} is not one of {held:?}");
    // The hog whose unit was taken is told so; the other is told its lease expired: its
    // update would still be taken while no one has its unit (a late result), but its
    // heartbeats hold nothing.
    for (key, unit) in hogs.iter().zip(&held) {
        let body = format!("{{\"unit\":{unit}}}");
        let code = if *unit == freed {
            "not_leased"
        } else {
            "lease_expired"
        };
        check(
            &ts::post_signed_at(&url, key, "/v1/heartbeat", &body, now),
            409,
            code,
        );
    }
    submit(freed);
    assert_eq!(ts::status(&url).version, 1, "past its timeout with MIN");
    server.stop();
}

/// A worker whose accepted update's reply was lost (a dropped connection, a coordinator
/// killed right after the commit) sends it again and is told it was accepted, with the
/// same reply, before and after a restart; nothing is written twice. Another update
/// for the same unit is still a duplicate.
#[test]
fn an_accepted_update_sent_again_gets_its_first_reply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path(), 2));
    let url = server.url();
    let key = ts::key(1);
    ts::register(&url, &key, "alice");
    let unit = ts::lease(&url, &key);
    let n = server.with_core(|c| c.params().len());
    let bytes = ts::update_bytes(
        &key,
        unit.id,
        unit.base_version,
        &ts::crafted_delta(unit.id, n),
    );
    let first = ts::submit(&url, bytes.clone());
    check(&first, 200, "");
    assert!(
        first.body["credit"].as_u64().is_some_and(|c| c > 0),
        "{first:?}"
    );
    let after = footprint(&server);
    assert_eq!(ts::submit(&url, bytes.clone()), first, "a retry");
    assert_eq!(footprint(&server), after);
    let other: Vec<f32> = ts::crafted_delta(unit.id, n).iter().map(|x| -x).collect();
    let r = ts::submit(
        &url,
        ts::update_bytes(&key, unit.id, unit.base_version, &other),
    );
    check(&r, 409, "duplicate");
    let after = footprint(&server);

    server.kill();
    let server = ts::start(dir.path(), config(dir.path(), 2));
    assert_eq!(
        ts::submit(&server.url(), bytes),
        first,
        "a retry after a crash"
    );
    assert_eq!(footprint(&server), after);
    server.stop();
}

/// Numbers a store cannot hold are a 400 `out_of_range`, not a 500; no reply names the
/// server's files.
#[test]
fn ids_out_of_range_are_refused_with_a_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path(), 2));
    let url = server.url();
    let key = ts::key(1);
    ts::register(&url, &key, "alice");
    let n = server.with_core(|c| c.params().len());
    let before = footprint(&server);
    let huge = i64::MAX as u64 + 1;
    let cases = [
        (
            ts::get(&url, &format!("/v1/models/{huge}")),
            400,
            "out_of_range",
        ),
        (
            ts::get(&url, &format!("/v1/models/{}", u64::MAX)),
            400,
            "out_of_range",
        ),
        (ts::get(&url, "/v1/models/1000"), 404, "unknown_version"),
        (
            ts::submit(
                &url,
                ts::update_bytes(&key, huge, 0, &ts::crafted_delta(1, n)),
            ),
            400,
            "out_of_range",
        ),
        (
            ts::submit(
                &url,
                ts::update_bytes(&key, 1, u64::MAX, &ts::crafted_delta(1, n)),
            ),
            400,
            "out_of_range",
        ),
    ];
    let store_path = dir.path().display().to_string();
    for (r, status, code) in cases {
        check(&r, status, code);
        assert!(!r.body.to_string().contains(&store_path), "{r:?}");
    }
    assert_eq!(footprint(&server), before);
    server.stop();
}

/// Credit goes only to keys that can sign: 64 hex digits that are not an ed25519 public
/// key (or one of small order) are refused, and no entry is written.
#[test]
fn transfers_go_only_to_public_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path(), 2));
    let url = server.url();
    let key = ts::key(1);
    ts::register(&url, &key, "alice");
    check(
        &ts::submit_crafted(
            &url,
            &key,
            &ts::lease(&url, &key),
            server.with_core(|c| c.params().len()),
        ),
        200,
        "",
    );
    let not_a_point = (0u8..=255)
        .map(|b| WorkerId([b; 32]))
        .find(|id| ed25519_dalek::VerifyingKey::from_bytes(&id.0).is_err())
        .expect("some 32 equal bytes are not a point");
    // The identity point, of order 1: a valid encoding that no key signs with.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let before = footprint(&server);
    for to in [not_a_point, WorkerId(identity)] {
        let body = format!("{{\"to\":\"{to}\",\"amount\":1,\"reference\":\"r-{to}\"}}");
        check(
            &ts::post_signed(&url, &key, "/v1/transfers", &body),
            400,
            "bad_wallet",
        );
    }
    assert_eq!(footprint(&server), before);
    let body = format!(
        "{{\"to\":\"{}\",\"amount\":1,\"reference\":\"ok\"}}",
        WorkerId::of(&ts::key(2))
    );
    check(
        &ts::post_signed(&url, &key, "/v1/transfers", &body),
        200,
        "",
    );
    server.stop();
}

/// Registrations and rejection records are bounded over all keys: a flood of fresh keys
/// replaces registrations that did nothing (never one holding a lease or with an
/// accepted update), a dropped worker registers again, and when every registration is
/// in use a new one is refused; rejections beyond the bound drop the oldest.
#[test]
fn registrations_and_rejections_are_bounded_over_all_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), 2);
    c.records.workers_max = 4;
    c.records.rejections_max = 10;
    let server = ts::start(dir.path(), c);
    let url = server.url();
    let n = server.with_core(|c| c.params().len());
    let (worker, leasing) = (ts::key(1), ts::key(2));
    ts::register(&url, &worker, "contributor");
    check(
        &ts::submit_crafted(&url, &worker, &ts::lease(&url, &worker), n),
        200,
        "",
    );
    ts::register(&url, &leasing, "leasing");
    let held = ts::lease(&url, &leasing);
    let count = || server.with_core(|c| c.store().workers().expect("workers").len());
    for i in 10..40u8 {
        let key = ts::key(i);
        ts::register(&url, &key, &format!("flood-{i}"));
        let mut nan = ts::crafted_delta(held.id, n);
        nan[0] = f32::NAN;
        let r = ts::submit(&url, ts::update_bytes(&key, held.id, 0, &nan));
        check(&r, 403, "not_your_lease");
    }
    assert_eq!(count(), 4);
    assert_eq!(ts::rejection_codes(&server).len(), 10);
    // The contributor and the lease holder kept their registrations.
    let r = ts::post_signed(
        &url,
        &leasing,
        "/v1/heartbeat",
        &format!("{{\"unit\":{}}}", held.id),
    );
    check(&r, 204, "");
    check(&ts::post_signed(&url, &worker, "/v1/lease", ""), 200, "");
    // An early flood key was dropped; registering again lets it in.
    let dropped = ts::key(10);
    check(
        &ts::post_signed(&url, &dropped, "/v1/lease", ""),
        403,
        "unknown_worker",
    );
    ts::register(&url, &dropped, "back");
    check(&ts::post_signed(&url, &dropped, "/v1/lease", ""), 200, "");
    server.stop();

    // Every registration in use (two contributors, two leases): a new one is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path(), 2);
    c.records.workers_max = 2;
    let server = ts::start(dir.path(), c);
    let url = server.url();
    for i in 1..=2 {
        ts::register(&url, &ts::key(i), "busy");
        ts::lease(&url, &ts::key(i));
    }
    let r = ts::post_signed(&url, &ts::key(3), "/v1/workers", "{\"name\":\"late\"}");
    check(&r, 503, "registrations_full");
    server.stop();
}
