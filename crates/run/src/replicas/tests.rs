//! Checks by volunteers as data: a sequence of steps (a unit routed, a check offered and
//! leased, time passing) and what each must give.

use protocol::{WorkAddress, WorkUnit};

use super::{PENDING_CHECKS_MAX, PendingCheck, ReplicaRules, Replicas, Route};
use crate::testing::worker;

const CPU: &str = "cpu/test";
const GPU: &str = "cuda/test";

fn rules(replicate: bool) -> ReplicaRules {
    ReplicaRules {
        replicate,
        wait_ms: 100,
        checker_class: CPU.into(),
        own_reruns: true,
    }
}

/// Steps of the tests' units of `class`: GPU units longer than the coordinator re-runs
/// on its CPU ([`super::GPU_ON_CPU_STEPS_MAX`]), unless a test says otherwise.
fn steps_of(class: &str) -> u32 {
    if class.starts_with("cuda/") {
        super::GPU_ON_CPU_STEPS_MAX + 1
    } else {
        10
    }
}

/// Worker `w`'s unit `id` of `class`, sampled at `at_ms`.
fn pending(id: u64, w: u8, class: &str, at_ms: u64) -> PendingCheck {
    pending_of(id, w, class, at_ms, steps_of(class))
}

fn pending_of(id: u64, w: u8, class: &str, at_ms: u64, steps: u32) -> PendingCheck {
    PendingCheck {
        unit: WorkUnit {
            id,
            round: 0,
            base_version: 0,
            address: WorkAddress {
                shard: id as u32,
                offset: 0,
                steps,
                seed: id,
            },
            lr: 1e-3,
        },
        worker: worker(w),
        class: class.into(),
        queued_ms: at_ms,
        disputed: None,
    }
}

/// One step and what it must give.
enum Step {
    /// Where a unit of a worker of this class goes, under `replicate`.
    Route(bool, Option<&'static str>, Route),
    /// Unit `id` of worker `w` and class, sampled at a time, waits.
    Push(u64, u8, &'static str, u64),
    /// The same, a third replica: worker `d`'s check, leased as `id + 100`, disputed it.
    PushDisputed(u64, u8, &'static str, u64, u8),
    /// Worker `w` of a class asks; the unit it is leased under fresh id `id`, if any.
    Lease(u8, &'static str, u64, Option<u64>),
    /// Time passes: the units that fall back to the coordinator.
    Expire(u64, &'static [u64]),
}

#[track_caller]
fn check(name: &str, steps: &[Step]) -> Replicas {
    let mut replicas = Replicas::default();
    for (i, step) in steps.iter().enumerate() {
        match *step {
            Step::Route(replicate, class, want) => {
                assert_eq!(
                    replicas.route(&rules(replicate), class, class.map_or(10, steps_of)),
                    want,
                    "{name}, step {i}"
                );
            }
            Step::Push(id, w, class, at_ms) => replicas.push(pending(id, w, class, at_ms)),
            Step::PushDisputed(id, w, class, at_ms, d) => replicas.push(PendingCheck {
                disputed: Some(crate::Replica {
                    check: id + 100,
                    checker: worker(d),
                }),
                ..pending(id, w, class, at_ms)
            }),
            Step::Lease(w, class, id, want) => {
                let got = replicas
                    .offer(worker(w), class)
                    .and_then(|index| replicas.lease(index, id, 7, worker(w), 1_000));
                assert_eq!(
                    got.map(|u| (u.id, u.round, u.address.seed)),
                    want.map(|original| (id, 7, original)),
                    "{name}, step {i}: worker {w}'s lease"
                );
                if let Some(original) = want {
                    let leased = replicas.leased(id).expect("leased");
                    assert_eq!(leased.check.unit.id, original, "{name}, step {i}");
                }
            }
            Step::Expire(now_ms, want) => {
                let got: Vec<u64> = replicas
                    .expire(now_ms, &rules(true))
                    .iter()
                    .map(|p| p.unit.id)
                    .collect();
                assert_eq!(got, want, "{name}, step {i}: fallen back at {now_ms}");
            }
        }
    }
    replicas
}

#[test]
fn units_are_routed_by_class_and_replicate() {
    use Step::Route as R;
    check(
        "route",
        &[
            R(false, Some(CPU), Route::Coordinator),
            R(false, Some("cpu/other"), Route::Volunteer),
            R(false, Some(GPU), Route::Volunteer),
            R(false, None, Route::Coordinator),
            R(true, Some(CPU), Route::Volunteer),
            R(true, None, Route::Coordinator),
        ],
    );
}

#[test]
fn a_worker_never_checks_its_own_unit_nor_another_class_and_holds_one_check() {
    use Step::*;
    let replicas = check(
        "offer",
        &[
            Push(1, 1, CPU, 0),
            Push(2, 2, CPU, 0),
            Push(3, 2, GPU, 0),
            // Worker 1 skips its own unit 1 for unit 2.
            Lease(1, CPU, 10, Some(2)),
            // It holds a check: no second one.
            Lease(1, CPU, 11, None),
            // Worker 2 owns unit 3's and unit 2 is leased; unit 1 is its to check.
            Lease(2, CPU, 11, Some(1)),
            // A GPU volunteer gets the GPU unit only.
            Lease(4, GPU, 12, Some(3)),
            Lease(5, GPU, 13, None),
        ],
    );
    assert_eq!(replicas.len(), 3);
}

#[test]
fn a_full_queue_sends_units_to_the_coordinator_or_leaves_gpu_units_unchecked() {
    let mut replicas = Replicas::default();
    for id in 0..PENDING_CHECKS_MAX as u64 {
        assert_eq!(
            replicas.route(&rules(true), Some(CPU), 10),
            Route::Volunteer
        );
        replicas.push(pending(id, 1, CPU, 0));
    }
    assert_eq!(replicas.len(), PENDING_CHECKS_MAX);
    assert_eq!(
        replicas.route(&rules(true), Some(CPU), 10),
        Route::Coordinator
    );
    // A GPU unit the coordinator's CPU can re-run within the cross-class tolerance goes
    // there; a longer one stays unchecked.
    let short = super::GPU_ON_CPU_STEPS_MAX;
    assert_eq!(
        replicas.route(&rules(true), Some(GPU), short),
        Route::Coordinator
    );
    assert_eq!(
        replicas.route(&rules(true), Some(GPU), short + 1),
        Route::Nobody
    );
    // A leased check still holds its place.
    let index = replicas.offer(worker(2), CPU).expect("an offer");
    replicas.lease(index, 1_000, 0, worker(2), 50);
    assert_eq!(
        replicas.route(&rules(true), Some(CPU), 10),
        Route::Coordinator
    );
}

#[test]
fn an_expired_lease_is_offered_again_and_a_long_wait_falls_back_unless_no_one_can_run_it() {
    use Step::*;
    check(
        "expire",
        &[
            Push(1, 1, CPU, 0),
            Push(2, 1, GPU, 0),
            Push(3, 1, CPU, 60),
            // The check's lease ends at 1,000 (see `check`).
            Lease(2, CPU, 10, Some(1)),
            Expire(99, &[]),
            // Unit 3 has waited 100 ms, but unit 1 is leased; the GPU unit waits on.
            Expire(160, &[3]),
            // The lease ends: unit 1 is offered again, and it has waited past the bound.
            Expire(1_000, &[1]),
            Lease(3, CPU, 11, None),
            Lease(3, GPU, 11, Some(2)),
        ],
    );
}

#[test]
fn a_short_gpu_unit_falls_back_to_the_coordinator_after_the_wait() {
    let mut replicas = Replicas::default();
    replicas.push(pending_of(1, 1, GPU, 0, super::GPU_ON_CPU_STEPS_MAX));
    replicas.push(pending_of(2, 1, GPU, 0, super::GPU_ON_CPU_STEPS_MAX + 1));
    let fallen: Vec<u64> = replicas
        .expire(100, &rules(true))
        .iter()
        .map(|p| p.unit.id)
        .collect();
    assert_eq!(fallen, vec![1]);
    assert_eq!(replicas.len(), 1);
}

#[test]
fn a_stored_queue_resumes_as_it_was_less_what_breaks_its_rules() {
    use Step::*;
    let before = check(
        "before",
        &[
            Push(1, 1, CPU, 0),
            Push(2, 2, CPU, 5),
            Push(3, 1, CPU, 9),
            Lease(3, CPU, 10, Some(1)),
        ],
    );
    let resumed = Replicas::resume(before.pending().cloned(), before.leases().cloned());
    assert_eq!(resumed, before);
    // A unit held twice is kept once; a check leased to its own worker is dropped.
    let own = super::LeasedCheck {
        id: 11,
        check: pending(4, 4, CPU, 0),
        checker: worker(4),
        deadline_ms: 50,
    };
    let resumed = Replicas::resume(
        [pending(2, 2, CPU, 5), pending(1, 1, CPU, 0)],
        before.leases().cloned().chain([own]),
    );
    let waiting: Vec<u64> = resumed.pending().map(|p| p.unit.id).collect();
    let leased: Vec<u64> = resumed.leases().map(|l| l.check.unit.id).collect();
    assert_eq!((waiting, leased), (vec![2], vec![1]));
}

/// Who leased lately: another worker of the class within the window counts, the worker
/// itself, another class or an older lease do not; a worker that changes class counts
/// for the new one only; past [`super::CLASS_PEERS_MAX`] the longest unseen is forgotten.
#[test]
fn class_peers_remember_who_leased_lately() {
    let mut peers = super::ClassPeers::default();
    peers.saw(worker(1), GPU, 100);
    peers.saw(worker(2), CPU, 150);
    let check = |peers: &super::ClassPeers, who: u8, class: &str, now: u64, want: bool| {
        assert_eq!(
            peers.other_active(worker(who), class, now, 50),
            want,
            "worker {who} of {class} at {now}"
        );
    };
    check(&peers, 3, GPU, 150, true);
    check(&peers, 3, GPU, 151, false);
    check(&peers, 1, GPU, 100, false);
    check(&peers, 3, CPU, 150, true);
    peers.saw(worker(1), CPU, 160);
    check(&peers, 3, GPU, 160, false);
    check(&peers, 2, CPU, 160, true);
    for i in 0..super::CLASS_PEERS_MAX as u64 {
        let mut id = [0xff; 32];
        id[..8].copy_from_slice(&i.to_le_bytes());
        peers.saw(protocol::WorkerId(id), GPU, 200 + i);
    }
    assert_eq!(peers.len(), super::CLASS_PEERS_MAX);
    // Workers 1 and 2 (seen at 160 and 150) went first.
    check(&peers, 3, CPU, 160, false);
}

/// A third replica (a disputed unit the coordinator cannot re-run) goes to neither the
/// unit's worker nor the volunteer whose check disputed it, and, like any check of such
/// a unit, never falls back to the coordinator.
#[test]
fn a_third_replica_goes_to_neither_the_worker_nor_the_disputer() {
    use Step::*;
    check(
        "third replica",
        &[
            PushDisputed(1, 1, GPU, 0, 2),
            Lease(1, GPU, 10, None),
            Lease(2, GPU, 11, None),
            Expire(1_000, &[]),
            Lease(3, GPU, 12, Some(1)),
        ],
    );
}

#[test]
fn with_no_reruns_of_its_own_a_driver_sends_every_unit_to_volunteers_or_leaves_it_unchecked() {
    let peers = ReplicaRules {
        own_reruns: false,
        ..rules(false)
    };
    let mut replicas = Replicas::default();
    // Even a unit of the checker's class, or of no class, never goes to the driver.
    assert_eq!(replicas.route(&peers, Some(CPU), 10), Route::Nobody);
    assert_eq!(replicas.route(&peers, None, 10), Route::Nobody);
    let replicate = ReplicaRules {
        replicate: true,
        ..peers.clone()
    };
    for id in 0..PENDING_CHECKS_MAX as u64 {
        assert_eq!(replicas.route(&replicate, Some(CPU), 10), Route::Volunteer);
        replicas.push(pending(id, 1, CPU, 0));
    }
    assert_eq!(replicas.route(&replicate, Some(CPU), 10), Route::Nobody);
    // However long they wait, they stay for a volunteer.
    assert!(replicas.expire(u64::MAX, &replicate).is_empty());
    assert_eq!(replicas.len(), PENDING_CHECKS_MAX);
}
