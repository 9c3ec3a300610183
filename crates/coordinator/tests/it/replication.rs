//! Checks by volunteers (BOINC's replication) over real HTTP, with `spot_check.replicate`
//! on so that workers of one CPU class check each other: a sampled unit is leased to
//! another worker as an ordinary unit under a fresh id, matched bit for bit, and its
//! checker credited; a tampered update's volunteer check disagrees, the coordinator's
//! own re-run then catches the lie, and the volunteer is paid for its check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use coordinator::Coordinator;
use ledger::{Account, Entry, Kind};
use protocol::{WorkUnit, WorkerId};
use store::CheckState;
use test_support as ts;

/// Records the units a worker starts (a check is one of them, as far as it can tell).
#[derive(Default)]
struct Units(Vec<WorkUnit>);

impl worker::Reporter for Units {
    fn unit_started(&mut self, unit: &WorkUnit) {
        self.0.push(*unit);
    }
}

fn config(dir: &std::path::Path) -> coordinator::CoordinatorConfig {
    let mut config = ts::tiny_config(dir, 2);
    config.spot_check.replicate = true;
    config
}

fn ledger(server: &Coordinator) -> Vec<Entry> {
    server.with_core(|c| c.store().ledger_entries().expect("ledger"))
}

fn wallet(entry: &Entry) -> Option<WorkerId> {
    match entry.to {
        Some(Account::Wallet(w)) => Some(w),
        _ => None,
    }
}

/// The checks' mints: (check id, checker, amount).
fn check_mints(entries: &[Entry]) -> Vec<(u64, WorkerId, u64)> {
    entries
        .iter()
        .filter(|e| e.kind == Kind::Mint)
        .filter_map(|e| {
            let id = e.reference.strip_prefix("check:")?.parse().ok()?;
            Some((id, wallet(e)?, e.amount))
        })
        .collect()
}

/// Waits up to a minute for `done` on the core.
fn wait_for(server: &Coordinator, what: &str, done: impl Fn(&coordinator::Core) -> bool) {
    let started = Instant::now();
    while !server.with_core(|c| done(c)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no {what} after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_workers_of_one_class_check_each_others_units_blind_and_are_credited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path()));
    let url = server.url();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..3u8)
        .map(|i| {
            let transport = worker::HttpTransport::new(&url).expect("transport");
            let options = ts::worker_options(dir.path(), &format!("w{i}"));
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut units = Units::default();
                let summary =
                    worker::run(&transport, &ts::key(20 + i), &options, &stop, &mut units);
                (WorkerId::of(&ts::key(20 + i)), summary, units.0)
            })
        })
        .collect();
    // Until two checks have matched and the run has moved on a version.
    wait_for(&server, "two checks by volunteers", |c| {
        check_mints(&c.store().ledger_entries().expect("ledger")).len() >= 2 && c.version() >= 1
    });
    stop.store(true, Ordering::SeqCst);
    let workers: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("worker thread"))
        .collect();
    for (_, summary, _) in &workers {
        let summary = summary.as_ref().expect("worker run");
        assert_eq!(summary.rejected, 0, "{summary:?}");
    }
    let entries = ledger(&server);
    let mints = check_mints(&entries);
    for &(check, checker, amount) in &mints {
        // The checker was leased the check as a unit of its own, under an id no unit of
        // the run's rounds has, with another unit's training inputs.
        let leased = workers
            .iter()
            .find(|(w, _, _)| *w == checker)
            .and_then(|(_, _, units)| units.iter().find(|u| u.id == check))
            .unwrap_or_else(|| panic!("check {check} was never started by {checker}"));
        let (unit_row, update_row, original) = server.with_core(|c| {
            let s = c.store();
            let original = (0..check)
                .filter_map(|id| s.unit(id).expect("unit"))
                .find(|u| u.address == leased.address && u.base_version == leased.base_version)
                .expect("the unit the check re-ran");
            (
                s.unit(check).expect("unit"),
                s.update(check).expect("update"),
                original,
            )
        });
        assert_eq!((unit_row, update_row.map(|r| r.unit)), (None, None));
        let original_row = server
            .with_core(|c| c.store().update(original.id).expect("update"))
            .expect("the checked unit was accepted");
        // Never its own worker's, and paid as the unit was.
        assert_ne!(original_row.worker, checker.to_string(), "check {check}");
        let unit_mint = entries
            .iter()
            .find(|e| e.reference == format!("update:{}", original.id))
            .expect("the unit's mint");
        assert_eq!(amount, unit_mint.amount, "check {check}");
        // The unit's check row: verified bit for bit.
        let row = server.with_core(|c| {
            c.store()
                .checks(None)
                .expect("checks")
                .into_iter()
                .find(|r| r.unit == original.id)
                .expect("a check row")
        });
        assert_eq!(
            (row.state, row.distance),
            (CheckState::Verified, Some(0.0)),
            "unit {}",
            original.id
        );
        // The check's update entered no version.
        server.with_core(|c| {
            for v in c.store().versions().expect("versions") {
                assert!(
                    !v.updates.contains(&check),
                    "check {check} is in version {}",
                    v.version
                );
            }
        });
    }
    let waiting = server.with_core(|c| {
        let rows = c.store().replicas().expect("replicas");
        assert_eq!(rows.len(), c.checks_with_volunteers());
        rows
    });
    server.stop();
    // The checks' mints are no units' mints: the run opens again (its ledger matches
    // its accepted updates), with the checks that were waiting for volunteers.
    let again = ts::start(dir.path(), config(dir.path()));
    again.with_core(|c| {
        assert_eq!(c.store().replicas().expect("replicas"), waiting);
        assert_eq!(c.checks_with_volunteers(), waiting.len());
    });
    again.stop();
}

#[test]
fn a_check_leased_before_a_restart_is_taken_after_it() {
    const T0: u64 = 1_700_000_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut core = coordinator::Core::open(&store, config(dir.path()), T0).expect("open");
    let (a, b) = (ts::key(40), ts::key(41));
    for key in [&a, &b] {
        core.register(WorkerId::of(key), "w", Some(&ts::this_machine()), T0)
            .expect("register");
    }
    let unit = ts::core_lease(&mut core, WorkerId::of(&a), T0);
    let delta = crate::checks::train(&core, &unit);
    ts::core_submit(&mut core, &a, &unit, &delta, T0).expect("accepted");
    // `b` asks for work and is leased the check of `a`'s unit.
    let check = ts::core_lease(&mut core, WorkerId::of(&b), T0 + 1);
    assert_eq!(
        (check.address, check.base_version),
        (unit.address, unit.base_version)
    );
    assert_ne!(check.id, unit.id);
    drop(core);
    let mut core = coordinator::Core::open(&store, config(dir.path()), T0 + 2).expect("reopen");
    assert_eq!(core.checks_with_volunteers(), 1);
    // Its heartbeat and upload are answered as before the restart.
    core.heartbeat(WorkerId::of(&b), check.id, T0 + 3)
        .expect("heartbeat");
    let rerun = crate::checks::train(&core, &check);
    ts::core_submit(&mut core, &b, &check, &rerun, T0 + 4).expect("the check is taken");
    assert_eq!(core.checks_with_volunteers(), 0);
    let entries = core.store().ledger_entries().expect("ledger");
    let mints = check_mints(&entries);
    assert_eq!(mints.len(), 1);
    assert_eq!((mints[0].0, mints[0].1), (check.id, WorkerId::of(&b)));
    let row = core
        .store()
        .checks(None)
        .expect("checks")
        .into_iter()
        .find(|r| r.unit == unit.id)
        .expect("a check row");
    assert_eq!((row.state, row.distance), (CheckState::Verified, Some(0.0)));
    // Its update is no unit's: not stored, not in the round.
    assert!(core.store().update(check.id).expect("update").is_none());
}

#[test]
fn a_tampered_update_is_disputed_by_a_volunteer_and_caught_by_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ts::start(dir.path(), config(dir.path()));
    let url = server.url();
    // The liar: the honest delta of its unit, 5% larger (it passes scoring).
    let liar = ts::key(30);
    let lied = server.with_core(|c| {
        let now = coordinator::system_ms();
        c.register(WorkerId::of(&liar), "liar", Some(&ts::this_machine()), now)
            .expect("register");
        let unit = ts::core_lease(c, WorkerId::of(&liar), now);
        let lie: Vec<f32> = crate::checks::train(c, &unit)
            .iter()
            .map(|x| 1.05 * x)
            .collect();
        ts::core_submit(c, &liar, &unit, &lie, now).expect("the lie is accepted");
        unit
    });
    // An honest real worker trains the round's other unit, then is leased the lie's
    // check, not knowing it.
    let transport = worker::HttpTransport::new(&url).expect("transport");
    let mut options = ts::worker_options(dir.path(), "honest");
    options.max_units = Some(2);
    let stop = AtomicBool::new(false);
    let mut units = Units::default();
    let summary = worker::run(&transport, &ts::key(31), &options, &stop, &mut units).expect("run");
    assert_eq!(summary.rejected, 0, "{summary:?}");
    let check = units
        .0
        .iter()
        .find(|u| u.address == lied.address)
        .expect("the honest worker was leased the lie's check");
    assert_ne!(check.id, lied.id);
    // The volunteer disagreed: the unit went to the coordinator's own re-run, which
    // fails it and claws its credit back.
    wait_for(&server, "the lie's failed re-run", |c| {
        c.store()
            .checks(Some(CheckState::Failed))
            .expect("checks")
            .iter()
            .any(|r| r.unit == lied.id)
    });
    let entries = ledger(&server);
    let reference = format!("update:{}", lied.id);
    assert!(
        entries
            .iter()
            .any(|e| e.kind == Kind::Clawback && e.reference == reference),
        "no clawback of {reference}"
    );
    // The volunteer was right: once the coordinator's re-run upholds its dispute, it is
    // paid its check, as for a match, and the dispute is settled.
    let paid: Vec<WorkerId> = check_mints(&entries)
        .iter()
        .filter(|&&(id, _, _)| id == check.id)
        .map(|&(_, checker, _)| checker)
        .collect();
    assert_eq!(paid, [WorkerId::of(&ts::key(31))]);
    assert_eq!(
        server.with_core(|c| c.store().dispute(lied.id).expect("dispute")),
        None
    );
    server.stop();
}

#[test]
fn a_volunteer_whose_dispute_the_coordinators_re_run_refutes_loses_its_trust() {
    const T0: u64 = 1_700_000_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut core = coordinator::Core::open(&store, config(dir.path()), T0).expect("open");
    let (honest, accuser) = (ts::key(50), ts::key(51));
    for key in [&honest, &accuser] {
        core.register(WorkerId::of(key), "w", Some(&ts::this_machine()), T0)
            .expect("register");
    }
    let unit = ts::core_lease(&mut core, WorkerId::of(&honest), T0);
    let delta = crate::checks::train(&core, &unit);
    ts::core_submit(&mut core, &honest, &unit, &delta, T0).expect("accepted");
    // The volunteer sends a false check: the honest re-run, 5% larger.
    let check = ts::core_lease(&mut core, WorkerId::of(&accuser), T0 + 1);
    let false_check: Vec<f32> = crate::checks::train(&core, &check)
        .iter()
        .map(|x| 1.05 * x)
        .collect();
    ts::core_submit(&mut core, &accuser, &check, &false_check, T0 + 2).expect("answered");
    assert!(core.store().dispute(unit.id).expect("dispute").is_some());
    // The coordinator's own re-run, of the worker's class, clears the worker bit for bit:
    // the volunteer's check counts as a failed unit of its own, and earns nothing.
    let mut backend = crate::checks::replay_backend(&core, "cpu:1");
    let outcomes = core.run_checks(backend.as_mut(), T0 + 3).expect("checks");
    assert_eq!(
        outcomes
            .iter()
            .map(|o| (o.unit, o.matched))
            .collect::<Vec<_>>(),
        [(unit.id, true)]
    );
    assert_eq!(core.trust(WorkerId::of(&honest)).verified, 1);
    let refuted = core.trust(WorkerId::of(&accuser));
    assert_eq!((refuted.verified, refuted.failed_unit), (0, Some(check.id)));
    assert!(check_mints(&core.store().ledger_entries().expect("ledger")).is_empty());
    assert!(core.store().dispute(unit.id).expect("dispute").is_none());
    // As stored: a restart keeps it.
    drop(core);
    let core = coordinator::Core::open(&store, config(dir.path()), T0 + 4).expect("reopen");
    assert_eq!(core.trust(WorkerId::of(&accuser)), refuted);
}

/// A disputed check of a unit the coordinator cannot re-run (a GPU class, longer than
/// `GPU_ON_CPU_STEPS_MAX` steps) goes to a third volunteer of the class, kept across a
/// restart, never to the disputer; the third's check decides two to one. Agreeing with
/// the worker, it clears the unit and refutes the first volunteer; agreeing with the
/// first volunteer, it fails the unit (its credit clawed back) and both volunteers are
/// paid their checks.
#[test]
fn a_third_volunteer_settles_a_dispute_the_coordinator_cannot_re_run() {
    const T0: u64 = 1_700_000_000_000;
    let gpu = protocol::api::Machine {
        device: "cuda:0 (test)".into(),
        class: "cuda/sm90/132sm/test".into(),
        tokens_per_s: 100_000.0,
    };
    for third_agrees_with_worker in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let mut config = config(dir.path());
        config.schedule.steps_per_unit = run::replicas::GPU_ON_CPU_STEPS_MAX + 1;
        let mut core = coordinator::Core::open(&store, config.clone(), T0).expect("open");
        let (worker, accuser, third) = (ts::key(60), ts::key(61), ts::key(62));
        for key in [&worker, &accuser, &third] {
            core.register(WorkerId::of(key), "rig", Some(&gpu), T0)
                .expect("register");
        }
        let unit = ts::core_lease(&mut core, WorkerId::of(&worker), T0);
        let honest = crate::checks::train(&core, &unit);
        ts::core_submit(&mut core, &worker, &unit, &honest, T0).expect("accepted");
        // The first volunteer's check disagrees: the honest delta, 5% larger.
        let check = ts::core_lease(&mut core, WorkerId::of(&accuser), T0 + 1);
        assert_eq!(check.address, unit.address);
        let skewed: Vec<f32> = honest.iter().map(|x| 1.05 * x).collect();
        ts::core_submit(&mut core, &accuser, &check, &skewed, T0 + 2).expect("answered");
        assert_eq!(core.store().dispute(unit.id).expect("dispute"), None);
        // The third check waits, stored: a restart keeps it, and the disputer is not
        // leased it.
        drop(core);
        let mut core = coordinator::Core::open(&store, config, T0 + 3).expect("reopen");
        let retry = ts::core_lease(&mut core, WorkerId::of(&accuser), T0 + 3);
        assert_ne!(
            retry.address, unit.address,
            "the disputer was leased the third check"
        );
        let settle = ts::core_lease(&mut core, WorkerId::of(&third), T0 + 4);
        assert_eq!(settle.address, unit.address);
        assert!(settle.id != check.id && settle.id != unit.id);
        let answer = if third_agrees_with_worker {
            honest.clone()
        } else {
            skewed.clone()
        };
        ts::core_submit(&mut core, &third, &settle, &answer, T0 + 5).expect("answered");
        let entries = core.store().ledger_entries().expect("ledger");
        let mut paid = check_mints(&entries)
            .iter()
            .map(|&(id, checker, _)| (id, checker))
            .collect::<Vec<_>>();
        paid.sort();
        let row = core
            .store()
            .checks(None)
            .expect("checks")
            .into_iter()
            .find(|r| r.unit == unit.id)
            .expect("the unit's check");
        let clawed = entries
            .iter()
            .any(|e| e.kind == Kind::Clawback && e.reference == format!("update:{}", unit.id));
        if third_agrees_with_worker {
            assert_eq!(row.state, CheckState::Verified);
            assert!(!clawed);
            assert_eq!(paid, [(settle.id, WorkerId::of(&third))]);
            let refuted = core.trust(WorkerId::of(&accuser));
            assert_eq!(refuted.failed_unit, Some(check.id));
        } else {
            assert_eq!(row.state, CheckState::Failed);
            assert!(clawed, "the unit's credit was not clawed back");
            let mut want = vec![
                (check.id, WorkerId::of(&accuser)),
                (settle.id, WorkerId::of(&third)),
            ];
            want.sort();
            assert_eq!(paid, want);
        }
        assert!(core.store().replicas().expect("replicas").is_empty());
    }
}
