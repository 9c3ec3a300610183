//! The crash harness (`test_support::chaos`, the long run is `cargo xtask chaos`) with a
//! few kills: a real coordinator process SIGKILLed and restarted under two real workers
//! loses no accepted update, mints each once, keeps its versions consecutive, and ends
//! with the same versions as the same seed run without kills.

use std::io::Write;

use test_support::chaos::{ChaosOptions, check_run, run};

/// A loopback port free now (the harness needs the same one at every restart).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn kills_of_the_coordinator_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = ChaosOptions {
        binary: env!("CARGO_BIN_EXE_hivetrain").into(),
        dir: dir.path().to_owned(),
        kills: 4,
        seed: 7,
        workers: 2,
        port: free_port(),
        reference: true,
    };
    let report = run(&options, &mut |_, _| {}).expect("the harness runs");
    assert!(report.failures.is_empty(), "{:#?}", report.failures);
    let kills: u32 = report
        .kills
        .values()
        .map(|(hit, missed)| hit + missed)
        .sum();
    assert_eq!(kills, 4);
    assert_eq!(report.coordinator_starts, 5);
    assert!(report.versions >= 1, "{report:?}");
    assert!(report.accepted_told >= 2, "{report:?}");
    assert_eq!(report.accepted_told, report.accepted_stored, "{report:?}");
    assert!(report.lost.is_empty() && report.duplicate_mints.is_empty());
    assert!(report.ledger_verified);
    let (compared, identical) = report.reference.expect("the unkilled run");
    assert_eq!(compared, identical);
    assert_eq!(compared, report.versions + 1);

    // The same checks see a loss: an update a worker was told was accepted that has no
    // row, and a kept update whose blob is gone.
    let run_dir = dir.path().join("chaos");
    assert!(check_run(&run_dir).expect("check").failures.is_empty());
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(run_dir.join("w0.log"))
        .expect("w0.log");
    writeln!(
        log,
        "unit 999999: accepted (norm 1.000; 1 accepted this round; +0.000004 credits)"
    )
    .expect("append");
    let store = store::Store::open(&run_dir.join("store")).expect("store");
    let kept = store.updates_kept().expect("kept")[0].clone();
    drop(store);
    let blob = kept.blob.as_str();
    std::fs::remove_file(run_dir.join("store/blobs").join(&blob[..2]).join(blob))
        .expect("remove a blob");
    let report = check_run(&run_dir).expect("check");
    let mut lost = report.lost.clone();
    lost.sort();
    assert_eq!(lost, vec![kept.unit, 999_999], "{:#?}", report.failures);
}
