//! What stays on disk: checkpoints that are the same bytes in every process, pruning as
//! the run goes (rows kept, 410 for a pruned version, a restart that resumes), and
//! re-runs of units whose blobs are gone skipped rather than failed.

use coordinator::config::RetentionConfig;
use coordinator::{CoordinatorConfig, Core};
use protocol::WorkerId;
use test_support as ts;

const T0: u64 = 1_700_000_000_000;

/// Runs `rounds` rounds of hand-made updates from two keys straight on `core`.
fn hand_made_rounds(core: &mut Core, rounds: u64) {
    let keys = [ts::key(1), ts::key(2)];
    for key in &keys {
        core.register(
            WorkerId::of(key),
            "w",
            Some(&test_support::this_machine()),
            T0,
        )
        .expect("register");
    }
    let n = core.params().len();
    for _ in 0..rounds {
        for key in &keys {
            let unit = ts::core_lease(core, WorkerId::of(key), T0);
            ts::core_submit(core, key, &unit, &ts::crafted_delta(unit.id, n), T0)
                .expect("accepted");
        }
    }
}

/// The same run from scratch in two directories stores the same checkpoint bytes, so
/// the same blob names and `ETag`s: the safetensors metadata is written in key order,
/// not in a hash map's (each map has hasher keys of its own, as each process does).
#[test]
fn a_run_made_twice_stores_the_same_checkpoints() {
    let hashes = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
        let mut core = Core::open(&dir.path().join("store"), config, T0).expect("open");
        hand_made_rounds(&mut core, 1);
        assert_eq!(core.version(), 1);
        [0, 1].map(|v| core.model(v).expect("model").1)
    };
    assert_eq!(hashes(), hashes());
}

/// A run of five rounds that keeps the newest 2 checkpoints, every 3rd, and the update
/// blobs of one round back: versions 1 and 2 lose their checkpoints, every version but
/// the newest its optimizer state, rounds 0 to 3 their update blobs; every row stays,
/// `GET /v1/models/1` is 410 `version_pruned` naming what is kept, and the run resumes
/// after a kill and goes on pruning.
#[test]
fn old_blobs_are_pruned_as_the_run_goes_and_the_run_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    config.retention = RetentionConfig {
        enabled: true,
        keep_last: 2,
        keep_every: 3,
        update_rounds: 1,
    };
    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    let keys = [ts::key(1), ts::key(2)];
    ts::register(&url, &keys[0], "alice");
    ts::register(&url, &keys[1], "bob");
    let n = server.with_core(|c| c.params().len());
    let round = |url: &str| {
        for key in &keys {
            let unit = ts::lease(url, key);
            assert_eq!(ts::submit_crafted(url, key, &unit, n).status, 200);
        }
    };
    for _ in 0..5 {
        round(&url);
    }
    let on_disk = |core: &Core| {
        let store = core.store();
        let versions = store.versions().expect("versions");
        let checkpoints: Vec<u64> = versions
            .iter()
            .filter(|v| store.blobs().contains(&v.checkpoint))
            .map(|v| v.version)
            .collect();
        let marked: Vec<u64> = versions
            .iter()
            .filter(|v| v.checkpoint_pruned_ms.is_some())
            .map(|v| v.version)
            .collect();
        let optimizers: Vec<u64> = versions
            .iter()
            .filter(|v| {
                v.optimizer
                    .as_ref()
                    .is_some_and(|o| store.blobs().contains(o))
            })
            .map(|v| v.version)
            .collect();
        let updates: Vec<u64> = (0..core.round())
            .flat_map(|r| store.updates_of_round(r).expect("updates"))
            .filter(|u| store.blobs().contains(&u.blob))
            .map(|u| u.round)
            .collect();
        format!(
            "rows {} checkpoints {checkpoints:?} marked {marked:?} optimizers {optimizers:?} update rounds {updates:?}",
            versions.len()
        )
    };
    server.with_core(|c| {
        assert_eq!(
            on_disk(c),
            "rows 6 checkpoints [0, 3, 4, 5] marked [1, 2] optimizers [5] update rounds [4, 4]"
        );
        // The ledger's references stay: every accepted update keeps its row and mint.
        assert_eq!(c.store().accepted_count().expect("count"), 10);
    });
    let gone = ts::get(&url, "/v1/models/1");
    assert_eq!(
        (gone.status, gone.code()),
        (410, "version_pruned"),
        "{gone:?}"
    );
    assert_eq!(
        gone.body["error"]["message"],
        "version 1's checkpoint was removed by the run's retention policy; the versions kept are 0, 3-5"
    );
    assert_eq!(ts::get(&url, "/v1/models/3").status, 200);
    server.kill();

    let server = ts::start(dir.path(), config);
    let url = server.url();
    assert_eq!(ts::status(&url).version, 5);
    round(&url);
    server.with_core(|c| {
        assert_eq!(c.version(), 6);
        assert_eq!(
            on_disk(c),
            "rows 7 checkpoints [0, 3, 5, 6] marked [1, 2, 4] optimizers [6] update rounds [5, 5]"
        );
    });
    server.stop();
    assert_eq!(
        ts::stray_blobs(&dir.path().join("store")),
        Vec::<String>::new()
    );
}

/// A liar's lies went unchecked for four rounds (no room to queue re-runs); its fifth
/// is re-run and fails, and its older units are queued again. Those whose blobs the
/// policy let go (rounds 0 to 2) are recorded `skipped`, their credit standing; the one
/// still in the window (round 3) is re-run, fails and is clawed back. Nothing errs.
#[test]
fn a_liar_caught_late_has_its_pruned_units_skipped_and_the_kept_ones_clawed_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store_dir = dir.path().join("store");
    let mut config: CoordinatorConfig = ts::tiny_config(dir.path(), 2);
    config.scoring.enabled = false;
    config.spot_check.max_backlog = 0;
    config.retention = RetentionConfig {
        enabled: true,
        keep_last: 1,
        keep_every: 0,
        update_rounds: 1,
    };
    let (liar, honest) = (ts::key(1), ts::key(2));
    let (l, h) = (WorkerId::of(&liar), WorkerId::of(&honest));
    let mut core = Core::open(&store_dir, config.clone(), T0).expect("open");
    core.register(l, "liar", Some(&test_support::this_machine()), T0)
        .expect("register");
    core.register(h, "honest", Some(&test_support::this_machine()), T0)
        .expect("register");
    let lie = |core: &mut Core| {
        let unit = ts::core_lease(core, l, T0);
        let delta: Vec<f32> = crate::checks::train(core, &unit)
            .iter()
            .map(|x| 1.05 * x)
            .collect();
        ts::core_submit(core, &liar, &unit, &delta, T0).expect("accepted");
        unit.id
    };
    let mut lies = Vec::new();
    for _ in 0..4 {
        lies.push(lie(&mut core));
        let unit = ts::core_lease(&mut core, h, T0);
        let delta = crate::checks::train(&core, &unit);
        ts::core_submit(&mut core, &honest, &unit, &delta, T0).expect("accepted");
    }
    assert_eq!(core.version(), 4);
    drop(core);

    // Room for re-runs again: the liar's next unit (a new worker's) is queued.
    config.spot_check.max_backlog = 100;
    let mut core = Core::open(&store_dir, config, T0).expect("reopen");
    lies.push(lie(&mut core));
    let earned = core.wallet(l, None).balance;
    let mut backend = crate::checks::replay_backend(&core, "cpu:1");
    let outcomes: Vec<(u64, bool, u64)> = core
        .run_checks(backend.as_mut(), T0 + 1)
        .expect("checks")
        .iter()
        .map(|o| (o.unit, o.matched, o.clawed_back))
        .collect();
    let per_unit = earned / 5;
    assert_eq!(
        outcomes,
        vec![(lies[4], false, per_unit), (lies[3], false, per_unit)]
    );
    let states: Vec<(u64, String)> = core
        .store()
        .checks(None)
        .expect("checks")
        .into_iter()
        .filter(|c| c.worker == l.to_string())
        .map(|c| (c.unit, c.state.as_str().to_owned()))
        .collect();
    let expected: Vec<(u64, String)> = lies
        .iter()
        .zip(["skipped", "skipped", "skipped", "failed", "failed"])
        .map(|(u, s)| (*u, s.to_owned()))
        .collect();
    assert_eq!(states, expected);
    assert_eq!(core.wallet(l, None).balance, earned - 2 * per_unit);
    assert_eq!(core.checks_queued(), 0);
}
