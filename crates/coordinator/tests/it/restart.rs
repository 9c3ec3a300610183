//! A coordinator killed between or during rounds restarts with nothing accepted lost,
//! and with nothing left on disk that no row names.

use test_support as ts;

#[test]
fn killed_between_rounds_it_resumes_the_next_round() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    let server = ts::start(dir.path(), config.clone());
    crate::rounds::train_until(dir.path(), &server.url(), 2, 1);
    let (version, params) = server.with_core(|c| (c.version(), c.params().to_vec()));
    server.kill();
    // What a crash can leave: a blob write cut short, and a blob whose row never
    // committed.
    let planted = plant_crash_leftovers(&dir.path().join("store"));

    let server = ts::start(dir.path(), config);
    server.with_core(|c| {
        assert_eq!(c.version(), version);
        assert!(
            c.params() == params.as_slice(),
            "the model changed across the restart"
        );
    });
    for path in &planted {
        assert!(!path.exists(), "{} survived the reopen", path.display());
    }
    crate::rounds::train_until(dir.path(), &server.url(), 2, version + 1);
    server.stop();
    assert_eq!(
        ts::stray_blobs(&dir.path().join("store")),
        Vec::<String>::new()
    );
}

/// Writes a temporary file and a blob no row names into the blob directory of the
/// stopped run in `store_dir`; their paths.
pub(crate) fn plant_crash_leftovers(store_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let store = store::Store::open(store_dir).expect("store");
    let orphan = store
        .blobs()
        .put(b"a checkpoint whose row never committed")
        .expect("put");
    let blobs = store_dir.join("blobs");
    let path_of = |name: &str| blobs.join(&name[..2]).join(name);
    let temporary = path_of(&format!("{}.4242.0.tmp", orphan.as_str()));
    std::fs::write(&temporary, b"half a blob").expect("write");
    let planted = vec![path_of(orphan.as_str()), temporary];
    assert_eq!(ts::stray_blobs(store_dir).len(), 2);
    planted
}

#[test]
fn killed_mid_round_it_keeps_the_accepted_update_and_ends_as_if_never_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    let keys = [ts::key(1), ts::key(2)];
    ts::register(&url, &keys[0], "alice");
    ts::register(&url, &keys[1], "bob");
    let units = [ts::lease(&url, &keys[0]), ts::lease(&url, &keys[1])];
    let n = server.with_core(|c| c.params().len());
    let update = |i: usize| {
        ts::update_bytes(
            &keys[i],
            units[i].id,
            units[i].base_version,
            &ts::crafted_delta(units[i].id, n),
        )
    };
    assert_eq!(ts::submit(&url, update(0)).status, 200);
    server.kill();

    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    let status = ts::status(&url);
    assert_eq!(
        (status.version, status.units_accepted, status.units_leased),
        (0, 1, 1),
        "{status:?}"
    );
    // The accepted update is not taken twice (sent again, it gets its first reply), and
    // bob's lease survived the restart.
    assert_eq!(ts::submit(&url, update(0)).status, 200);
    assert_eq!(ts::status(&url).units_accepted, 1);
    assert_eq!(ts::submit(&url, update(1)).status, 200);
    assert_eq!(ts::status(&url).version, 1);
    let resumed = server.with_core(|c| c.params().to_vec());
    server.stop();
    assert_eq!(
        ts::stray_blobs(&dir.path().join("store")),
        Vec::<String>::new()
    );

    let clean_dir = tempfile::tempdir().expect("tempdir");
    let clean = ts::start(
        clean_dir.path(),
        ts::hand_made(ts::tiny_config(clean_dir.path(), 2)),
    );
    let url = clean.url();
    ts::register(&url, &keys[0], "alice");
    ts::register(&url, &keys[1], "bob");
    assert_eq!(
        [ts::lease(&url, &keys[0]), ts::lease(&url, &keys[1])],
        units
    );
    assert_eq!(ts::submit(&url, update(0)).status, 200);
    assert_eq!(ts::submit(&url, update(1)).status, 200);
    let straight = clean.with_core(|c| c.params().to_vec());
    assert!(resumed == straight, "the restart changed the result");
    clean.stop();
}

#[test]
fn a_different_config_on_restart_is_refused_with_a_sentence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    ts::start(dir.path(), config.clone()).stop();
    let mut other = config;
    other.schedule.steps_per_unit += 1;
    let err = coordinator::Coordinator::start(&dir.path().join("store"), other, "127.0.0.1:0")
        .expect_err("mismatch");
    assert!(err.to_string().contains("different config"), "{err}");
}

/// One process writes a run at a time: a second coordinator (or `hivetrain serve`) on
/// the same directory is refused with a sentence while the first is open, and opens once
/// it has stopped.
#[test]
fn a_second_coordinator_on_the_same_run_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    let first = ts::start(dir.path(), config.clone());
    let err =
        coordinator::Coordinator::start(&dir.path().join("store"), config.clone(), "127.0.0.1:0")
            .expect_err("busy");
    assert!(err.to_string().contains("has the run in"), "{err}");
    first.stop();
    ts::start(dir.path(), config).stop();
}

/// Lease renewals are kept in memory and written within `HEARTBEAT_FLUSH_MS` (or when
/// the server stops): a crash loses at most that window of renewals, which only ends a
/// lease sooner; a flushed renewal survives the restart.
#[test]
fn a_renewal_survives_a_restart_once_flushed_and_a_crash_loses_only_the_unflushed_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::hand_made(ts::tiny_config(dir.path(), 2));
    let key = ts::key(1);
    let worker = protocol::WorkerId::of(&key);
    let t0 = 1_000_000;
    let lease_ms = config.schedule.lease_ms;
    // The lease left at `t0 + 20 s` after a renewal at `t0 + 10 s`, across a reopen
    // with or without a flush in between.
    let left_after_reopen = |flush: bool| {
        let run = dir.path().join(if flush { "flushed" } else { "crashed" });
        let mut core = coordinator::Core::open(&run, config.clone(), t0).expect("open");
        // No machine report: the lease may be renewed up to `lease_max_ms` (a fast
        // machine's would end at `lease_ms`, its hard deadline, renewed or not).
        core.register(worker, "w", None, t0).expect("register");
        let unit = ts::core_lease(&mut core, worker, t0);
        core.heartbeat(worker, unit.id, t0 + 10_000)
            .expect("heartbeat");
        if flush {
            // Not yet due: nothing is written before the window has passed.
            core.flush(
                t0 + 10_000 + coordinator::core::HEARTBEAT_FLUSH_MS - 1,
                false,
            )
            .expect("flush");
            core.flush(t0 + 10_000 + coordinator::core::HEARTBEAT_FLUSH_MS, false)
                .expect("flush");
        }
        drop(core);
        let mut core = coordinator::Core::open(&run, config.clone(), t0 + 20_000).expect("open");
        match core.lease(worker, t0 + 20_000).expect("lease") {
            protocol::api::LeaseReply::Lease {
                unit: again,
                lease_ms,
                ..
            } => {
                assert_eq!(again.id, unit.id, "the worker's own unit comes back");
                lease_ms
            }
            other => panic!("no lease: {other:?}"),
        }
    };
    let check = |flush: bool, expected: u64| {
        assert_eq!(left_after_reopen(flush), expected, "flush: {flush}");
    };
    check(true, lease_ms + 10_000 - 20_000);
    check(false, lease_ms - 20_000);
}
