//! A slow worker's training is not lost: a unit still leased when its round closes is
//! accepted within `max_staleness` versions, credited, and joins the next version.

use coordinator::Core;
use protocol::WorkerId;
use protocol::api::LeaseReply;
use test_support as ts;

const T0: u64 = 1_700_000_000_000;

#[test]
fn an_update_one_version_late_is_accepted_credited_and_aggregated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_config(dir.path(), 2);
    config.schedule.min_updates = 1;
    config.schedule.round_timeout_ms = 1_000;
    config.spot_check.enabled = false;
    let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
    let keys = [ts::key(1), ts::key(2), ts::key(3)];
    let ids: Vec<WorkerId> = keys.iter().map(WorkerId::of).collect();
    for (id, name) in ids.iter().zip(["fast", "slow", "third"]) {
        core.register(*id, name, Some(&test_support::this_machine()), T0)
            .expect("register");
    }

    // Round 0: both units leased; the slow worker's is trained on version 0 but sent
    // only after the round timed out with the fast worker's update alone.
    let fast = ts::core_lease(&mut core, ids[0], T0);
    let slow = ts::core_lease(&mut core, ids[1], T0);
    let slow_delta = crate::checks::train(&core, &slow);
    let fast_delta = crate::checks::train(&core, &fast);
    ts::core_submit(&mut core, &keys[0], &fast, &fast_delta, T0 + 10).expect("fast accepted");
    // The first request after the timeout closes the round; the next gets a unit.
    assert!(matches!(
        core.lease(ids[2], T0 + 2_000).expect("lease"),
        LeaseReply::NoWork { .. }
    ));
    let third = ts::core_lease(&mut core, ids[2], T0 + 2_001);
    assert_eq!((core.version(), third.base_version), (1, 1));

    ts::core_submit(&mut core, &keys[1], &slow, &slow_delta, T0 + 2_100).expect("late accepted");
    assert!(
        core.wallet(ids[1], None).balance > 0,
        "the late unit is credited"
    );
    // Sent again, it is answered as accepted (a lost reply's retry); another update for
    // the unit is a duplicate.
    assert_eq!(
        ts::core_submit(&mut core, &keys[1], &slow, &slow_delta, T0 + 2_200),
        Ok(())
    );
    let other: Vec<f32> = slow_delta.iter().map(|x| x * 0.5).collect();
    assert_eq!(
        ts::core_submit(&mut core, &keys[1], &slow, &other, T0 + 2_200),
        Err("duplicate".into())
    );

    // Round 1 closes with its own two units; version 2 is built from all three.
    let third_delta = crate::checks::train(&core, &third);
    let again = ts::core_lease(&mut core, ids[0], T0 + 2_300);
    let again_delta = crate::checks::train(&core, &again);
    ts::core_submit(&mut core, &keys[2], &third, &third_delta, T0 + 2_400).expect("accepted");
    ts::core_submit(&mut core, &keys[0], &again, &again_delta, T0 + 2_500).expect("accepted");
    assert_eq!(core.version(), 2);
    let v2 = core.store().version(2).expect("read").expect("version 2");
    let mut want = vec![slow.id, third.id, again.id];
    want.sort_unstable();
    assert_eq!(v2.updates, want);
}

#[test]
fn an_update_past_max_staleness_is_refused_as_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 1));
    config.schedule.max_staleness = 0;
    let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
    let (a, b) = (ts::key(1), ts::key(2));
    core.register(
        WorkerId::of(&a),
        "a",
        Some(&test_support::this_machine()),
        T0,
    )
    .expect("register");
    core.register(
        WorkerId::of(&b),
        "b",
        Some(&test_support::this_machine()),
        T0,
    )
    .expect("register");
    let first = ts::core_lease(&mut core, WorkerId::of(&a), T0);
    let n = core.params().len();
    ts::core_submit(
        &mut core,
        &a,
        &first,
        &ts::crafted_delta(first.id, n),
        T0 + 1,
    )
    .expect("accepted");
    assert_eq!(core.version(), 1);
    // A unit of version 0 sent now (hand-made: the base version is all that counts).
    assert_eq!(
        ts::core_submit(
            &mut core,
            &b,
            &first,
            &ts::crafted_delta(first.id, n),
            T0 + 2
        ),
        Err("stale".into())
    );
}

/// An update judged in time when it arrived is accepted however long its scoring keeps
/// it from its verdict: here its verdict comes 800 ms after the lease's deadline. Before,
/// the lease was judged again after scoring, and a busy coordinator refused, as
/// `not_leased`, work that had arrived in time (the fine-tune demo on a slow laptop).
#[test]
fn an_update_that_arrived_in_time_is_not_refused_for_the_time_it_took_to_judge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 1));
    config.schedule.lease_ms = 1_000;
    let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
    let key = ts::key(1);
    core.register(WorkerId::of(&key), "w", None, T0)
        .expect("register");
    let unit = ts::core_lease(&mut core, WorkerId::of(&key), T0);
    let delta = ts::crafted_delta(unit.id, core.params().len());
    let bytes = ts::update_bytes(&key, unit.id, unit.base_version, &delta);
    let update = validation::inspect(&bytes, &core.config().limits).expect("inspected");
    // It arrives 100 ms before the lease's deadline; nothing to score (hand-made).
    assert!(
        core.precheck(&update, T0 + 900)
            .expect("precheck")
            .is_none()
    );
    let blob = store::BlobHash::from_digest(&update.address);
    core.store().blobs().put_as(&bytes, &blob).expect("blob");
    let reply = core.accept(&update, &blob, bytes.len() as u64, None, T0 + 1_800);
    assert!(reply.is_ok(), "{reply:?}");
    assert!(core.wallet(WorkerId::of(&key), None).balance > 0);
}

/// A worker slower than its lease is not refused while no one else took its unit: its
/// update is taken and credited (BOINC's late result). Once another worker is leased the
/// unit, its heartbeat is answered `not_leased` and its update `not_your_lease`.
#[test]
fn an_expired_lease_still_takes_its_update_until_the_unit_is_leased_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    config.schedule.lease_ms = 1_000;
    let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
    let keys = [ts::key(1), ts::key(2), ts::key(3)];
    for (n, key) in keys.iter().enumerate() {
        core.register(WorkerId::of(key), &format!("w{n}"), None, T0)
            .expect("register");
    }
    let n = core.params().len();
    let (slow, other) = (
        ts::core_lease(&mut core, WorkerId::of(&keys[0]), T0),
        ts::core_lease(&mut core, WorkerId::of(&keys[1]), T0),
    );
    // Both leases end at T0 + 1 s. Told so at the next heartbeat, the slow worker goes
    // on and is credited.
    let heartbeat = |core: &mut Core, key: &ed25519_dalek::SigningKey, unit: u64, at: u64| {
        core.heartbeat(WorkerId::of(key), unit, at)
            .map_err(|e| e.code)
    };
    assert_eq!(
        heartbeat(&mut core, &keys[0], slow.id, T0 + 4_000),
        Err("lease_expired".into())
    );
    let delta = ts::crafted_delta(slow.id, n);
    ts::core_submit(&mut core, &keys[0], &slow, &delta, T0 + 5_000).expect("a late result");
    assert!(core.wallet(WorkerId::of(&keys[0]), None).balance > 0);
    // The other's unit goes to a third worker first: then its late update is refused.
    let again = ts::core_lease(&mut core, WorkerId::of(&keys[2]), T0 + 5_100);
    assert_eq!(again.id, other.id);
    assert_eq!(
        heartbeat(&mut core, &keys[1], other.id, T0 + 5_200),
        Err("not_leased".into())
    );
    let delta = ts::crafted_delta(other.id, n);
    assert_eq!(
        ts::core_submit(&mut core, &keys[1], &other, &delta, T0 + 5_300),
        Err("not_your_lease".into())
    );
}
