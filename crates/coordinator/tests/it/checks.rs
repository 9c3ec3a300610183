//! Catching liars. Replay spot-checks in the core: an honest unit re-runs to the same
//! bytes and earns trust; a subtle lie (the honest delta, 5% larger: it passes scoring) is
//! caught, its credit clawed back, its worker's unchecked units checked again, and none of
//! its units enters the next version. Scoring and the copy check through the real API.

use coordinator::{CoordinatorConfig, Core};
use protocol::{UpdateHeader, WorkUnit, WorkerId};
use test_support as ts;

const T0: u64 = 1_700_000_000_000;

fn lease(core: &mut Core, worker: WorkerId) -> WorkUnit {
    ts::core_lease(core, worker, T0)
}

/// A backend of the core's model that trains, on `device`, as the checker's re-runs use.
pub(crate) fn replay_backend(core: &Core, device: &str) -> Box<dyn engine::Backend> {
    core.run_model()
        .open(device, core.params(), engine::Purpose::Train)
        .expect("backend")
}

/// The unit's honest delta, trained as a worker would.
pub(crate) fn train(core: &Core, unit: &WorkUnit) -> Vec<f32> {
    let info = core.run_info();
    let train = core.train_examples();
    let mut backend = replay_backend(core, "cpu:1");
    let data = worker::unit::UnitData {
        train: &train,
        n_shards: info.n_shards,
        batch: info.batch as usize,
        seq: info.seq as usize,
    };
    worker::unit::train(backend.as_mut(), core.params(), data, unit, &mut |_, _| {
        true
    })
    .expect("train")
    .expect("not stopped")
}

fn submit(core: &mut Core, key: &ed25519_dalek::SigningKey, unit: &WorkUnit, delta: &[f32]) {
    ts::core_submit(core, key, unit, delta, T0).expect("accepted");
}

fn states(core: &Core) -> Vec<(u64, String)> {
    core.store()
        .checks(None)
        .expect("checks")
        .into_iter()
        .map(|c| (c.unit, c.state.as_str().to_owned()))
        .collect()
}

#[test]
fn a_lie_is_caught_clawed_back_and_kept_out_and_its_workers_other_units_rechecked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: CoordinatorConfig = ts::tiny_config(dir.path(), 4);
    // One unit waits at a time: the liar's second unit goes unchecked at first.
    config.spot_check.max_backlog = 1;
    let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
    let (liar, honest) = (ts::key(1), ts::key(2));
    let (l, h) = (WorkerId::of(&liar), WorkerId::of(&honest));
    core.register(l, "liar", Some(&test_support::this_machine()), T0)
        .expect("register");
    core.register(h, "honest", Some(&test_support::this_machine()), T0)
        .expect("register");

    let lies: Vec<WorkUnit> = (0..2)
        .map(|_| {
            let unit = lease(&mut core, l);
            let lie: Vec<f32> = train(&core, &unit).iter().map(|x| 1.05 * x).collect();
            submit(&mut core, &liar, &unit, &lie);
            unit
        })
        .collect();
    let first = lease(&mut core, h);
    let delta = train(&core, &first);
    submit(&mut core, &honest, &first, &delta);
    assert_eq!(
        states(&core),
        vec![
            (lies[0].id, "queued".into()),
            (lies[1].id, "unchecked".into()),
            (first.id, "unchecked".into()),
        ]
    );
    let earned = core.wallet(l, None).balance;
    assert!(earned > 0);

    let mut backend = replay_backend(&core, "cpu:2");
    let outcomes = core.run_checks(backend.as_mut(), T0 + 1).expect("checks");
    let seen: Vec<(u64, bool, u64, usize)> = outcomes
        .iter()
        .map(|o| (o.unit, o.matched, o.clawed_back, o.requeued))
        .collect();
    assert_eq!(
        seen,
        vec![
            (lies[0].id, false, earned / 2, 1),
            (lies[1].id, false, earned / 2, 0),
        ]
    );
    assert!(outcomes.iter().all(|o| o.distance > 0.01), "{outcomes:?}");
    assert_eq!(core.wallet(l, None).balance, 0);
    assert_eq!(core.trust(l).verified, 0);

    // The honest worker's next unit is checked and matches bit for bit.
    let second = lease(&mut core, h);
    let delta = train(&core, &second);
    submit(&mut core, &honest, &second, &delta);
    let outcomes = core.run_checks(backend.as_mut(), T0 + 2).expect("checks");
    assert_eq!(outcomes.len(), 1);
    assert!(
        outcomes[0].matched && outcomes[0].distance == 0.0,
        "{outcomes:?}"
    );
    assert_eq!(core.trust(h).verified, 1);

    // Four accepted: the round aggregates, from the honest units alone.
    assert_eq!(core.version(), 1);
    let v1 = core.store().version(1).expect("read").expect("version 1");
    assert_eq!(v1.updates, vec![first.id, second.id]);
    // The ledger still verifies, and the clawbacks survive a restart.
    let config = core.config().clone();
    drop(core);
    let core = Core::open(&dir.path().join("store"), config, T0 + 3).expect("reopen");
    assert_eq!(core.wallet(l, None).balance, 0);
    assert_eq!(core.trust(h).verified, 1);
    // The liar's record keeps its latest failed unit: re-checks of older units cannot
    // raise its trust again.
    assert_eq!(
        (core.trust(l).verified, core.trust(l).failed_unit),
        (0, Some(lies[1].id))
    );
    assert_eq!(core.checks_queued(), 0);
}

/// Issue 5's refusals through the real API: a zero update is `no_progress` (422) and its
/// unit goes to another worker; a byte-equal copy of an accepted update is `copied`
/// (409).
#[test]
fn scored_refusals_through_the_api_and_the_unit_goes_to_another_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), ts::tiny_config(dir.path(), 2));
    let url = server.url();
    let (a, b) = (ts::key(1), ts::key(2));
    ts::register(&url, &a, "a");
    ts::register(&url, &b, "b");
    let first = ts::lease(&url, &a);
    let (n, codec) = server.with_core(|c| (c.params().len(), c.config().codec));
    let encode = |key: &ed25519_dalek::SigningKey, unit: &WorkUnit, delta: &[f32]| {
        let header = UpdateHeader {
            work_unit: unit.id,
            base_version: unit.base_version,
            worker: WorkerId::of(key),
            nonce: unit.id,
            codec,
            n_params: n as u32,
        };
        protocol::encode_update(&header, delta, key)
    };

    let r = ts::submit(&url, encode(&a, &first, &vec![0.0; n]));
    assert_eq!((r.status, r.code()), (422, "no_progress"), "{r:?}");
    // The refused unit is b's now; a gets the round's other unit.
    let taken = ts::lease(&url, &b);
    assert_eq!(taken.id, first.id);
    let other = ts::lease(&url, &a);
    assert_ne!(other.id, first.id);

    // b trains its unit honestly: accepted. a sends b's values as its own: a copy.
    let delta = server.with_core(|c| train(c, &taken));
    let r = ts::submit(&url, encode(&b, &taken, &delta));
    assert_eq!(r.status, 200, "{r:?}");
    let r = ts::submit(&url, encode(&a, &other, &delta));
    assert_eq!((r.status, r.code()), (409, "copied"), "{r:?}");
    let codes = ts::rejection_codes(&server);
    assert_eq!(codes, vec!["no_progress", "copied"]);
    server.stop();
}

/// A unit whose honest training scores low (here: a bar no update clears) is refused
/// for its first worker; a second worker sending the same bytes for it agrees bit for
/// bit, so it is accepted with a re-run forced, which verifies it and keeps its credit.
/// Different bytes from the second worker are refused as before. Agreement survives a
/// restart between the two (the refusal's payload hash is in its row).
#[test]
fn a_second_worker_agreeing_bit_for_bit_on_a_refused_unit_is_accepted_and_rechecked() {
    for restart in [false, true] {
        agreement(restart);
    }
}

fn agreement(restart: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config: CoordinatorConfig = ts::tiny_config(dir.path(), 2);
    config.scoring.min_gain = 0.5;
    let store = dir.path().join("store");
    let mut core = Core::open(&store, config.clone(), T0).expect("open");
    let keys = [ts::key(1), ts::key(2), ts::key(3)];
    let ids: Vec<WorkerId> = keys.iter().map(WorkerId::of).collect();
    for (id, name) in ids.iter().zip(["a", "b", "c"]) {
        core.register(*id, name, Some(&test_support::this_machine()), T0)
            .expect("register");
    }
    let try_submit = |core: &mut Core, i: usize, unit: &WorkUnit, delta: &[f32]| {
        ts::core_submit(core, &keys[i], unit, delta, T0)
    };

    let unit = lease(&mut core, ids[0]);
    let delta = train(&core, &unit);
    assert_eq!(
        try_submit(&mut core, 0, &unit, &delta),
        Err("no_progress".into())
    );
    // b takes the unit and sends other bytes: refused.
    assert_eq!(lease(&mut core, ids[1]).id, unit.id);
    let other: Vec<f32> = delta.iter().map(|x| 1.01 * x).collect();
    assert_eq!(
        try_submit(&mut core, 1, &unit, &other),
        Err("no_progress".into())
    );
    if restart {
        drop(core);
        core = Core::open(&store, config, T0).expect("reopen");
    }
    // c takes it and sends what a sent: they agree, it is accepted and queued for a re-run.
    assert_eq!(lease(&mut core, ids[2]).id, unit.id, "restart: {restart}");
    assert_eq!(
        try_submit(&mut core, 2, &unit, &delta),
        Ok(()),
        "restart: {restart}"
    );
    assert_eq!(states(&core), vec![(unit.id, "queued".into())]);
    let mut backend = replay_backend(&core, "cpu:1");
    let outcomes = core.run_checks(backend.as_mut(), T0 + 1).expect("checks");
    assert!(outcomes.len() == 1 && outcomes[0].matched, "{outcomes:?}");
    assert!(core.wallet(ids[2], None).balance > 0);
    assert_eq!(core.wallet(ids[0], None).balance, 0);
}
