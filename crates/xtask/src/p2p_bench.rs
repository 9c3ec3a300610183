//! `cargo xtask bench p2p`: a run with no coordinator against coordinator mode on the
//! same run (the tiny GPT, one unit a member a version, the same codec), for 4, 8 and 16
//! peers in one process.
//!
//! - Bytes each peer sends per version: on the seeded simulated network (`peer::local`,
//!   every message through the wire format) and over iroh on loopback (`mesh`, counted
//!   by the driver), against what a coordinator-mode worker moves per version (its
//!   update up, the new checkpoint down: `protocol::update_len` and the checkpoint's
//!   bytes) and what the coordinator itself moves (N of each).
//! - Time to certify a version after its last update arrived (simulated network, delays
//!   5 to 80 ms: the agreement's own cost, proposal, re-execution and two voting steps),
//!   and wall time per version over iroh (training included, every peer on this
//!   machine's 2 cores).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use engine::Purpose;
use mesh::Transport;
use peer::local::{Scenario, Setup};
use peer::{Behaviour, Timings};
use protocol::WorkerId;

#[derive(Debug, clap::Args)]
pub(crate) struct P2pBench {
    /// Peer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    peers: Vec<usize>,
    /// Versions each run certifies.
    #[arg(long, default_value_t = 4)]
    versions: u64,
    /// Local steps of a unit.
    #[arg(long, default_value_t = 4)]
    steps: u32,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn run(root: &Path, args: P2pBench) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(root.join("data/shakespeare.txt"))?;
    let cut = text[..300_000].rfind('\n').unwrap_or(300_000);
    let corpus = dir.path().join("shakespeare-300k.txt");
    std::fs::write(&corpus, &text[..cut])?;
    let tokenizer = root.join("data/tokenizer.json");
    let cache = dir.path().join("cache");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "p2p against coordinator mode, tiny GPT, {} versions, H = {} (bytes per version)",
        args.versions, args.steps
    );
    println!(
        "peers  update KB  coord worker KB  coord server KB  p2p sim KB/peer  ratio  p2p iroh KB/peer  ratio  certify after last update (sim ms, median/max)  iroh s/version"
    );
    for &peers in &args.peers {
        let scenario = Scenario {
            steps: args.steps,
            ..Scenario::new(7, peers, args.versions)
        };
        let local = peer::local::run(&scenario, &corpus, &tokenizer, &cache)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let setup = Arc::new(
            Setup::new(&scenario, &corpus, &tokenizer, &cache)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let update = setup.spec.update_bytes() as f64;
        let checkpoint = engine::checkpoint::trained_to_bytes(
            &setup.prepared.model.spec,
            &setup.prepared.initial,
            &Default::default(),
        )
        .map_err(|e| anyhow::anyhow!(e))?
        .len() as f64;
        let worker = update + checkpoint;
        let server = peers as f64 * worker;
        let sim_per_peer = local.bytes as f64 / peers as f64 / args.versions as f64;
        let (iroh_per_peer, per_version) =
            runtime.block_on(over_iroh(setup.clone(), args.versions))?;
        let certify: Vec<f64> = local
            .certify_after_updates_ms
            .iter()
            .map(|&x| x as f64)
            .collect();
        let max = certify.iter().copied().fold(0.0, f64::max);
        println!(
            "{peers:>5}  {:>9.0}  {:>15.0}  {:>15.0}  {:>15.0}  {:>5.2}  {:>16.0}  {:>5.2}  {:>24.0} / {:<21.0}  {:>14.3}",
            update / 1e3,
            worker / 1e3,
            server / 1e3,
            sim_per_peer / 1e3,
            sim_per_peer / worker,
            iroh_per_peer / 1e3,
            iroh_per_peer / worker,
            median(certify),
            max,
            per_version,
        );
    }
    println!(
        "ratio: a peer's bytes sent per version over a coordinator-mode worker's (update up + checkpoint down); the coordinator itself moves N times a worker's"
    );
    Ok(())
}

/// Every peer of `setup` over iroh on loopback to `versions`: bytes each peer sent per
/// version (mean), and wall seconds per version (to the last peer's last version).
async fn over_iroh(setup: Arc<Setup>, versions: u64) -> anyhow::Result<(f64, f64)> {
    let members = setup.spec.members.clone();
    let mut nets = Vec::new();
    for key in &setup.keys {
        nets.push(
            mesh::quic::IrohTransport::bind(key, "127.0.0.1:0".parse()?, &members, None)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
    }
    let addrs: Vec<(WorkerId, _)> = nets.iter().map(|n| (n.id(), n.addr())).collect();
    for n in &nets {
        for (id, addr) in &addrs {
            n.learn(*id, addr.clone());
        }
    }
    let started = Instant::now();
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, net) in nets.into_iter().enumerate() {
        let node = setup
            .node(i, Behaviour::Honest, Timings::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut backend = setup.prepared.model.open_empty("cpu:1", Purpose::Train)?;
        let s = setup.clone();
        let train: mesh::drive::Train = Box::new(move |unit, base| {
            s.train(backend.as_mut(), unit, base)
                .map_err(|e| e.to_string())
        });
        let d = done.clone();
        let on_version: mesh::drive::OnVersion = Box::new(move |node| {
            if node.replica().version() == versions {
                d.lock()
                    .expect("lock")
                    .push(started.elapsed().as_secs_f64());
            }
        });
        tasks.push(tokio::spawn(mesh::drive::run(
            node,
            net,
            members.clone(),
            train,
            versions,
            on_version,
        )));
    }
    let mut bytes = 0u64;
    let mut by_kind = [0u64; 5];
    for task in tasks {
        let (_, traffic) = task
            .await
            .context("a peer")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        bytes += traffic.bytes;
        for (all, k) in by_kind.iter_mut().zip(traffic.by_kind) {
            *all += k;
        }
    }
    let kb = |b: u64| b as f64 / 1e3 / setup.keys.len() as f64 / versions as f64;
    eprintln!(
        "  {} peers over iroh, KB a peer a version by kind: votes and proposals {:.0}, updates {:.0}, wants {:.0}, chain requests {:.0}, chains {:.0}",
        setup.keys.len(),
        kb(by_kind[0]),
        kb(by_kind[1]),
        kb(by_kind[2]),
        kb(by_kind[3]),
        kb(by_kind[4])
    );
    let last = done
        .lock()
        .expect("lock")
        .iter()
        .copied()
        .fold(0.0, f64::max);
    let peers = setup.keys.len() as f64;
    Ok((
        bytes as f64 / peers / versions as f64,
        last / versions as f64,
    ))
}
