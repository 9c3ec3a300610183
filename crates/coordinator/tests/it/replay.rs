//! The ground replay spot-checks stand on: a worker's accepted update, re-run from the
//! same weights, data, seed and learning rate on another thread count, is the same bytes;
//! and the coordinator's checker thread finds it so.

use protocol::{SignedUpdate, WorkUnit};
use test_support as ts;

/// Records the units a worker starts.
#[derive(Default)]
struct Units(Vec<WorkUnit>);

impl worker::Reporter for Units {
    fn unit_started(&mut self, unit: &WorkUnit) {
        self.0.push(*unit);
    }
}

#[test]
fn a_replayed_unit_reproduces_the_workers_update_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ts::tiny_config(dir.path(), 2);
    let server = ts::start(dir.path(), config.clone());
    let url = server.url();
    let transport = worker::HttpTransport::new(&url).expect("transport");
    let mut options = ts::worker_options(dir.path(), "alice");
    options.max_units = Some(2);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut units = Units::default();
    let summary = worker::run(&transport, &ts::key(1), &options, &stop, &mut units).expect("run");
    assert_eq!(summary.accepted, 2);

    // What the coordinator kept: the updates and version 0's weights.
    let (rows, base, n_shards, info) = server.with_core(|c| {
        let rows = c.store().updates_of_round(0).expect("updates");
        let (bytes, _) = c.model(0).expect("version 0");
        let ckpt = engine::checkpoint::from_bytes(std::path::Path::new("v0"), &bytes, None)
            .expect("checkpoint");
        (rows, ckpt, c.config().schedule.n_shards, c.run_info())
    });
    let tokenizer = data::TextTokenizer::load(&config.tokenizer).expect("tokenizer");
    let tokens = data::cache::load_or_build(&config.corpus, &tokenizer, &dir.path().join("cache"))
        .expect("tokens");
    let (train, _) =
        data::Examples::split_stream(&config.corpus, &tokens.tokens, info.seq as usize)
            .expect("split");
    // Another thread count than the worker's one: CPU training does not depend on it.
    let mut backend =
        engine::open_backend("cpu:2", base.config, base.params.clone()).expect("backend");
    let unit_data = worker::unit::UnitData {
        train: &train,
        n_shards,
        batch: info.batch as usize,
        seq: info.seq as usize,
    };
    for unit in &units.0 {
        let row = rows
            .iter()
            .find(|r| r.unit == unit.id)
            .expect("the unit's update");
        let stored = server.with_core(|c| c.update_bytes(&row.blob).expect("blob"));
        let stored = SignedUpdate::parse(&stored, &config.limits).expect("parse");
        let delta = worker::unit::train(
            backend.as_mut(),
            &base.params,
            unit_data,
            unit,
            &mut |_, _| true,
        )
        .expect("replay")
        .expect("not stopped");
        let payload = stored.header.codec.encode(&delta);
        assert!(
            payload == stored.payload(),
            "unit {}: the replay differs",
            unit.id
        );
        // A different learning rate is caught.
        let other = WorkUnit {
            lr: unit.lr * 1.01,
            ..*unit
        };
        let changed = worker::unit::train(
            backend.as_mut(),
            &base.params,
            unit_data,
            &other,
            &mut |_, _| true,
        )
        .expect("replay")
        .expect("not stopped");
        assert!(stored.header.codec.encode(&changed) != stored.payload());
    }
    // The coordinator's own checker thread re-runs the new worker's units and finds them
    // true.
    let started = std::time::Instant::now();
    loop {
        let checks = server.with_core(|c| c.store().checks(None).expect("checks"));
        let verified = checks
            .iter()
            .filter(|c| c.state == store::CheckState::Verified)
            .count();
        if verified == 2 {
            assert!(checks.iter().all(|c| c.distance == Some(0.0)), "{checks:?}");
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{checks:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        server.with_core(|c| c.trust(protocol::WorkerId::of(&ts::key(1))).verified),
        2
    );
    server.stop();
}
