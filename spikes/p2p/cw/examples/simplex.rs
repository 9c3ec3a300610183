//! Spike: 4 commonware simplex validators (ed25519 scheme, mock application) in the
//! deterministic runtime over the simulated p2p network, until each finalizes view 5.
//! Adapted from commonware-consensus 2026.10.0 src/simplex/mod.rs `all_online` test.
use commonware_consensus::{
    simplex::{
        config::{self, ForwardPolicy, SkipBudget, SkipPolicy},
        elector::RoundRobin,
        max_payload_size, mocks,
        scheme::ed25519,
        Engine,
    },
    types::{Epoch, View, ViewDelta},
    Monitor as _,
};
use commonware_cryptography::{
    certificate::mocks::Fixture, ed25519::PublicKey, sha256::Digest as Sha256Digest, Sha256,
};
use commonware_p2p::{
    max_message_size,
    simulated::{Config, Link, Network},
};
use commonware_parallel::Sequential;
use commonware_runtime::{buffer::paged::CacheRef, deterministic, Clock as _, Quota, Runner as _, Spawner as _, Supervisor as _};
use commonware_utils::{probability, NZDuration, NZUsize, NZU16, NZU32};
use futures::future::join_all;
use std::{sync::Arc, time::Duration};

fn main() {
    // hivetrain's ed25519-dalek 2.2 key seed -> commonware ed25519 key: same public key.
    {
        use commonware_codec::DecodeExt as _;
        use commonware_cryptography::{Signer as _, Verifier as _};
        let k22 = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
        let ck = commonware_cryptography::ed25519::PrivateKey::decode(k22.to_bytes().to_vec()).unwrap();
        let cpk = ck.public_key();
        assert_eq!(cpk.as_ref(), k22.verifying_key().as_bytes());
        // commonware signs namespace-prefixed messages; a raw dalek signature is not the same message.
        let sig = ck.sign(b"ns", b"msg");
        assert!(cpk.verify(b"ns", b"msg", &sig));
        println!("ed25519-dalek 2.2 seed -> commonware ed25519 key: same public key");
    }
    let wall = std::time::Instant::now();
    let n = 4u32;
    let required = View::new(5);
    let namespace = b"hivetrain-spike".to_vec();
    let executor = deterministic::Runner::timed(Duration::from_secs(300));
    let simulated_ms = executor.start(|mut context| async move {
        let Fixture { participants, schemes, .. } = ed25519::fixture(&mut context, &namespace, n);
        let (network, mut oracle) = Network::new_with_peers(
            context.child("network"),
            Config {
                max_size: max_message_size(&[max_payload_size::<ed25519::Scheme, Sha256Digest>(n)]),
                max_peers_per_set: NZUsize!(n as usize + 1),
                disconnect_on_block: true,
                tracked_peer_sets: NZUsize!(1),
            },
            participants.clone(),
        )
        .await;
        network.start();
        let quota = Quota::per_second(NZU32!(1_024));
        let link = Link { latency: Duration::from_millis(50), jitter: Duration::from_millis(1), success_rate: probability!(1.0) };
        for a in participants.iter() {
            for b in participants.iter() {
                if a != b { oracle.add_link(a.clone(), b.clone(), link.clone()).await.unwrap(); }
            }
        }
        let relay = Arc::new(mocks::relay::Relay::<Sha256Digest, PublicKey>::new());
        let elector: RoundRobin = RoundRobin::default();
        let mut reporters = Vec::new();
        for (idx, validator) in participants.iter().enumerate() {
            let context = context.child("validator").with_attribute("public_key", validator);
            let control = oracle.control(validator.clone());
            let votes = control.register(0, quota).await.unwrap();
            let certs = control.register(1, quota).await.unwrap();
            let resolver = control.register(2, quota).await.unwrap();
            let reporter = mocks::reporter::Reporter::new(
                context.child("reporter"),
                mocks::reporter::Config { participants: participants.clone().try_into().unwrap(), scheme: schemes[idx].clone(), elector: elector.clone() },
            );
            reporters.push(reporter.clone());
            let (actor, application) = mocks::application::Application::new(
                context.child("application"),
                mocks::application::Config::<Sha256, _> {
                    relay: relay.clone(),
                    me: validator.clone(),
                    propose_latency: (10.0, 5.0),
                    verify_latency: (10.0, 5.0),
                    certify_latency: (10.0, 5.0),
                    should_certify: mocks::application::Certifier::Always,
                },
            );
            actor.start();
            let cfg = config::Config {
                scheme: schemes[idx].clone(),
                elector: elector.clone(),
                blocker: oracle.control(validator.clone()),
                automaton: application.clone(),
                relay: application.clone(),
                reporter: reporter.clone(),
                strategy: Sequential,
                partition: validator.to_string(),
                mailbox_size: NZUsize!(1024),
                epoch: Epoch::new(0),
                floor: config::Floor::Genesis(mocks::application::genesis::<Sha256>(Epoch::new(0))),
                leader_timeout: Duration::from_secs(2),
                certification_timeout: Duration::from_secs(3),
                timeout_retry: Duration::from_secs(10),
                fetch_timeout: NZDuration!(Duration::from_secs(1)),
                fetch_retry_delay: Duration::from_millis(100),
                view_retention: ViewDelta::new(10),
                skip: SkipPolicy::Enabled { timeout: Duration::from_secs(12), budget: SkipBudget::Participants },
                replay_buffer: NZUsize!(1024 * 1024),
                write_buffer: NZUsize!(1024 * 1024),
                page_cache: CacheRef::new(NZU16!(1024), NZUsize!(10)),
                forward: ForwardPolicy::Disabled,
                track_historical_votes: false,
            };
            Engine::new(context.child("engine"), cfg).start(votes, certs, resolver);
        }
        let start = context.current();
        let mut waits = Vec::new();
        for reporter in reporters.iter_mut() {
            let (mut latest, mut monitor) = reporter.subscribe().await;
            waits.push(context.child("finalizer").spawn(move |_| async move {
                while latest < required { latest = monitor.recv().await.expect("event missing"); }
            }));
        }
        join_all(waits).await;
        for r in reporters.iter() { r.assert_no_faults(); r.assert_no_invalid(); }
        context.current().duration_since(start).unwrap().as_millis()
    });
    println!("4/4 validators finalized view {} ; simulated time {} ms ; wall {:?}", 5, simulated_ms, wall.elapsed());
}
