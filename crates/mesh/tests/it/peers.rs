//! Peers that train the tiny model and certify its versions over a real transport, each
//! on its own tasks and its own backend, on the wall clock.

use std::path::PathBuf;
use std::sync::Arc;

use engine::Purpose;
use mesh::Transport;
use peer::local::{Scenario, Setup};
use peer::{Behaviour, Node, Timings};
use protocol::WorkerId;

struct Inputs {
    dir: tempfile::TempDir,
    corpus: PathBuf,
    tokenizer: PathBuf,
}

fn inputs() -> Inputs {
    let dir = tempfile::tempdir().expect("tempdir");
    Inputs {
        corpus: test_support::small_corpus(dir.path()),
        tokenizer: test_support::repo_root().join("data/tokenizer.json"),
        dir,
    }
}

/// Runs every peer of `setup` over `nets` to version `heights`, and checks that they
/// end on one chain, bit for bit, with the loss down.
async fn certify<T: Transport>(
    setup: Arc<Setup>,
    nets: Vec<T>,
    heights: u64,
    liar: Option<(usize, Behaviour)>,
) -> Vec<Node> {
    let members = setup.spec.members.clone();
    let mut tasks = Vec::new();
    for (i, net) in nets.into_iter().enumerate() {
        let behaviour = match liar {
            Some((l, b)) if l == i => b,
            _ => Behaviour::Honest,
        };
        let node = setup.node(i, behaviour, Timings::default()).expect("node");
        assert_eq!(node.id(), net.id());
        let mut backend = setup
            .prepared
            .model
            .open_empty("cpu:1", Purpose::Train)
            .expect("backend");
        let s = setup.clone();
        let train: mesh::drive::Train = Box::new(move |unit, base| {
            s.train(backend.as_mut(), unit, base)
                .map_err(|e| e.to_string())
        });
        let quiet: mesh::drive::OnVersion = Box::new(|_| ());
        let run = mesh::drive::run(node, net, members.clone(), train, heights, quiet);
        tasks.push(tokio::spawn(run));
    }
    let mut nodes = Vec::new();
    for task in tasks {
        nodes.push(task.await.expect("task").expect("peer").0);
    }
    // A peer may stop as soon as it reaches the height; the others may still be on it.
    for n in &nodes {
        assert!(n.replica().version() >= heights);
    }
    let first = &nodes[0];
    for n in &nodes {
        let common = n.chain().len().min(first.chain().len());
        let ids = |n: &Node| -> Vec<_> {
            n.chain()[..common]
                .iter()
                .map(|c| c.decision.value.id())
                .collect()
        };
        assert_eq!(ids(n), ids(first));
        if n.replica().version() == first.replica().version() {
            assert_eq!(n.replica().hash(), first.replica().hash());
            assert_eq!(n.replica().credit(), first.replica().credit());
        }
    }
    let before = setup.holdout_loss(&setup.prepared.initial).expect("loss");
    let after = setup.holdout_loss(first.replica().params()).expect("loss");
    assert!(after < before, "loss {before} -> {after}");
    nodes
}

fn setup(inputs: &Inputs, seed: u64, peers: usize, heights: u64) -> Arc<Setup> {
    let scenario = Scenario::new(seed, peers, heights);
    Arc::new(
        Setup::new(
            &scenario,
            &inputs.corpus,
            &inputs.tokenizer,
            &inputs.dir.path().join("cache"),
        )
        .expect("setup"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_certify_versions_in_process() {
    let inputs = inputs();
    let setup = setup(&inputs, 41, 4, 3);
    let ids: Vec<WorkerId> = setup.keys.iter().map(WorkerId::of).collect();
    certify(setup.clone(), mesh::memory::network(&ids), 3, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_certify_versions_over_iroh() {
    let inputs = inputs();
    let setup = setup(&inputs, 42, 4, 3);
    let nets = super::transport::iroh_network(&setup.keys).await;
    let started = std::time::Instant::now();
    let nodes = certify(setup.clone(), nets, 3, None).await;
    eprintln!(
        "4 peers over iroh on loopback: 3 versions certified in {:.2} s (rounds {:?})",
        started.elapsed().as_secs_f64(),
        nodes[0]
            .chain()
            .iter()
            .map(|c| c.decision.round.as_i64())
            .collect::<Vec<_>>()
    );
}

/// Peers that know each other only by key and the run's relay certify versions as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_certify_versions_through_a_relay() {
    let inputs = inputs();
    let setup = setup(&inputs, 45, 4, 2);
    let members = setup.spec.members.clone();
    let relay = super::transport::relay(Some(members)).await;
    let nets = super::transport::relayed_network(&setup.keys, relay.reference()).await;
    certify(setup.clone(), nets, 2, None).await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_peers_certify_versions_over_iroh() {
    let inputs = inputs();
    let setup = setup(&inputs, 43, 8, 2);
    let nets = super::transport::iroh_network(&setup.keys).await;
    certify(setup.clone(), nets, 2, None).await;
}

/// Over the network too, a proposer that lies (here: the first height's first, with a
/// wrong version hash) costs a round and no more: the next proposer's value is certified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_proposer_over_iroh_costs_a_round() {
    let inputs = inputs();
    let setup = setup(&inputs, 44, 4, 2);
    let liar = peer::local::proposer(&Scenario::new(44, 4, 2), 1, 0);
    let nets = super::transport::iroh_network(&setup.keys).await;
    let nodes = certify(
        setup.clone(),
        nets,
        2,
        Some((liar, Behaviour::WrongAggregate)),
    )
    .await;
    for n in &nodes {
        let first = &n.chain()[0].decision;
        assert!(
            first.round.as_i64() > 0,
            "height 1 was decided in its first round"
        );
    }
}

/// A peer's stored chain replays, from version 0 and the run alone, to the version and
/// the credit every peer holds; a chain that was tampered with stops at the height
/// tampered with, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_chain_replays_to_the_peers_ledger_and_tampering_is_caught() {
    use peer::audit::{self, AuditError};
    let inputs = inputs();
    let setup = setup(&inputs, 46, 4, 3);
    let ids: Vec<WorkerId> = setup.keys.iter().map(WorkerId::of).collect();
    let nodes = certify(setup.clone(), mesh::memory::network(&ids), 3, None).await;
    let node = &nodes[0];
    let chain: Vec<peer::node::Certified> = node.chain()[..3].to_vec();
    let path = inputs.dir.path().join("chain.bin");
    let mut writer = audit::ChainWriter::create(&path).expect("create");
    for c in &chain {
        writer.append(c).expect("append");
    }
    let update_max = setup.spec.update_bytes();
    let stored = audit::read_chain(&path, update_max).expect("read");
    let audited =
        audit::replay(&setup.spec, setup.genesis.clone(), stored, |_, _| ()).expect("replay");
    assert_eq!(audited.heights, 3);
    let at_three = nodes
        .iter()
        .find(|n| n.replica().version() == 3)
        .expect("a peer that stopped at version 3");
    assert_eq!(audited.replica.hash(), at_three.replica().hash());
    assert_eq!(audited.replica.credit(), at_three.replica().credit());
    assert!(audited.replica.credit().values().all(|c| *c > 0));

    // Each case spoils a copy of the chain; the replay stops at its height, in words.
    type Spoil = Box<dyn Fn(&mut Vec<peer::node::Certified>)>;
    let cases: Vec<(Spoil, u64, &str)> = vec![
        (
            Box::new(|c| {
                let sigs = &mut c[1].decision.certificate.commit_signatures;
                sigs.truncate(2);
            }),
            2,
            "certificate",
        ),
        (
            Box::new(|c| {
                let other = c[0].updates[0].clone();
                c[2].updates[0] = other;
            }),
            3,
            "not the one its value names",
        ),
        (
            Box::new(|c| {
                c.remove(1);
            }),
            2,
            "holds height 3",
        ),
        (
            Box::new(|c| c[0].updates.pop().map(drop).unwrap_or(())),
            1,
            "without the updates",
        ),
    ];
    for (spoil, height, words) in cases {
        let mut bad = chain.clone();
        spoil(&mut bad);
        let result = audit::replay(
            &setup.spec,
            setup.genesis.clone(),
            bad.into_iter().map(Ok::<_, AuditError>),
            |_, _| (),
        );
        match result {
            Err(AuditError::Height { height: h, why }) => {
                assert_eq!(h, height, "{why}");
                assert!(why.contains(words), "{why}");
            }
            other => panic!("{words}: {other:?}"),
        }
    }
    // A file cut short ends in an error, not a shorter chain taken for the whole.
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
    let stored = audit::read_chain(&path, update_max).expect("read");
    let cut = audit::replay(&setup.spec, setup.genesis.clone(), stored, |_, _| ());
    assert!(
        matches!(cut, Err(AuditError::File(ref w)) if w.contains("cut short")),
        "{cut:?}"
    );
}

/// A member that sends garbage, truncated and repeated messages, chain requests and
/// update requests over and over to every peer, while four honest members certify:
/// they certify every version all the same, and answer its requests within their
/// bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_member_flooding_junk_and_requests_stops_nothing() {
    let inputs = inputs();
    let setup = setup(&inputs, 47, 5, 3);
    let ids: Vec<WorkerId> = setup.keys.iter().map(WorkerId::of).collect();
    let mut nets = mesh::memory::network(&ids);
    let hostile = nets.pop().expect("five");
    let honest: Vec<WorkerId> = ids[..4].to_vec();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        let update_bytes = setup.spec.update_bytes();
        tokio::spawn(async move {
            let mut hostile = hostile;
            let request = peer::wire::to_bytes(&peer::Message::ChainRequest { from: 1 });
            let want = peer::wire::to_bytes(&peer::Message::Want(vec![[7; 32]; 300]));
            let junk_update =
                peer::wire::to_bytes(&peer::Message::Update(Arc::new(vec![1u8; update_bytes])));
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for to in &honest {
                    for bytes in [
                        vec![0xff; 64],
                        request[..request.len() - 1].to_vec(),
                        request.clone(),
                        want.clone(),
                        junk_update.clone(),
                        Vec::new(),
                    ] {
                        hostile.send(*to, Arc::new(bytes));
                        sent += 1;
                    }
                }
                // What the peers answer is read and dropped.
                while let Ok(Some(_)) =
                    tokio::time::timeout(std::time::Duration::from_millis(20), hostile.recv()).await
                {
                }
            }
            sent
        })
    };
    let nodes = certify(setup.clone(), nets, 3, None).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = flooding.await.expect("flooding");
    assert!(sent > 100, "the hostile member sent only {sent} messages");
    assert!(nodes.iter().all(|n| n.replica().version() >= 3));
}

/// A member that asks for the chain again and again gets at most one message's worth
/// of it while this peer is on one height; a key that is not a member gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_requests_are_answered_within_a_budget_per_height() {
    let inputs = inputs();
    let setup = setup(&inputs, 48, 4, 3);
    let ids: Vec<WorkerId> = setup.keys.iter().map(WorkerId::of).collect();
    let mut nodes = certify(setup.clone(), mesh::memory::network(&ids), 3, None).await;
    let node = &mut nodes[0];
    let asker = ids[1];
    let mut answered = Vec::new();
    for _ in 0..100 {
        let outs = node
            .receive(asker, peer::Message::ChainRequest { from: 1 })
            .expect("receive");
        for out in outs {
            if let peer::Out::Send {
                message: message @ peer::Message::Chain(_),
                ..
            } = out
            {
                answered.push(peer::wire::to_bytes(&message).len());
            }
        }
    }
    let total: usize = answered.iter().sum();
    assert!(!answered.is_empty());
    assert!(
        total <= peer::node::CHAIN_BYTES_PER_HEIGHT,
        "{} answers, {total} bytes",
        answered.len()
    );
    assert!(answered.len() < 100, "every request was answered");
    let stranger = WorkerId::of(&ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
    let outs = node
        .receive(stranger, peer::Message::ChainRequest { from: 1 })
        .expect("receive");
    assert!(outs.is_empty());
}

/// Seats are kept by verified work. Of seven members two never come and a third leaves
/// after version 5: four of seven are fewer than a fixed committee's quorum (five), yet
/// the four certify every version, because past the first `SEAT_WINDOW` versions the
/// chain seats only members whose updates it accepted lately (five, then the four). The
/// stored chain replays with the seats it shrank to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_follow_verified_work_so_members_who_left_stop_counting() {
    use peer::audit;
    let inputs = inputs();
    let heights = 9;
    let setup = setup(&inputs, 49, 7, heights);
    let ids: Vec<WorkerId> = setup.keys.iter().map(WorkerId::of).collect();
    let nets = mesh::memory::network(&ids);
    let members = setup.spec.members.clone();
    let timings = Timings {
        agree: agree::Timeouts {
            propose_ms: 1_000,
            vote_ms: 500,
            step_ms: 200,
        },
        collect_ms: 400,
        catch_up_ms: 300,
    };
    let mut tasks = Vec::new();
    for (i, net) in nets.into_iter().enumerate().take(5) {
        let node = setup.node(i, Behaviour::Honest, timings).expect("node");
        let mut backend = setup
            .prepared
            .model
            .open_empty("cpu:1", Purpose::Train)
            .expect("backend");
        let s = setup.clone();
        let train: mesh::drive::Train = Box::new(move |unit, base| {
            s.train(backend.as_mut(), unit, base)
                .map_err(|e| e.to_string())
        });
        let until = if i == 4 { 5 } else { heights };
        let quiet: mesh::drive::OnVersion = Box::new(|_| ());
        let run = mesh::drive::run(node, net, members.clone(), train, until, quiet);
        tasks.push(tokio::spawn(run));
    }
    // With a fixed committee the four would wait forever: a deadline makes that a failure.
    let mut nodes = Vec::new();
    for task in tasks {
        let finished = tokio::time::timeout(std::time::Duration::from_secs(120), task)
            .await
            .expect("the members who stayed stalled");
        nodes.push(finished.expect("task").expect("peer").0);
    }
    let node = &nodes[0];
    assert!(node.replica().version() >= heights);
    let mut seated = Vec::new();
    let chain = node.chain()[..heights as usize].to_vec();
    audit::replay(
        &setup.spec,
        setup.genesis.clone(),
        chain.into_iter().map(Ok),
        |_, replica| seated.push(replica.seats(&setup.spec).len()),
    )
    .expect("the chain replays");
    // Seats for heights 2 on: all seven for the first versions, then the five who
    // worked, then the four who stayed.
    eprintln!("seats after each version: {seated:?}");
    assert_eq!(seated[0], 7, "{seated:?}");
    assert!(seated.contains(&5), "{seated:?}");
    assert_eq!(*seated.last().expect("seats"), 4, "{seated:?}");
    let absent = [ids[5], ids[6]];
    assert!(
        absent
            .iter()
            .all(|a| !node.replica().seats(&setup.spec).contains(a))
    );
}
