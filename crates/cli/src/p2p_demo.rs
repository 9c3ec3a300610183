//! `hivetrain demo --p2p`: N peers on this machine and no coordinator. Each peer has its
//! own key, its own iroh endpoint on loopback (QUIC; messages only between the run's
//! members), its own replica of the run and its own engine; every height, each trains its
//! unit and sends the signed update to the others, the drawn proposer proposes the next
//! version, and the others re-execute it bit for bit before they vote. A table as versions
//! are certified (peer 0's view), every peer's credit and traffic, then a sample.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use engine::Purpose;
use mesh::Transport;
use mesh::quic::IrohTransport;
use peer::local::{Scenario, Setup};
use peer::{Behaviour, Timings};
use protocol::WorkerId;

/// What the table shows of one certified version.
struct Certified {
    version: u64,
    round: i64,
    proposer: WorkerId,
    accepted: usize,
    /// What the run's re-runs found up to this version.
    checks: peer::Tally,
    params: Arc<Vec<f32>>,
    at: Instant,
}

/// The p2p demo's knobs (from `hivetrain demo`'s flags).
pub(crate) struct P2pArgs {
    /// The run (`config`, then the demo's run flags, then [`for_peers`]).
    pub config: coordinator::CoordinatorConfig,
    pub peers: usize,
    pub versions: u64,
    pub sample_tokens: usize,
    pub prompt: String,
}

/// The demo's run before its flags: the tiny GPT on the repository's Shakespeare, every
/// peer a unit of `steps` steps a version, the coordinator demo's outer step.
pub(crate) fn config(
    peers: usize,
    versions: u64,
    steps: u32,
) -> anyhow::Result<coordinator::CoordinatorConfig> {
    let scenario = Scenario {
        steps,
        ..Scenario::new(0, peers, versions)
    };
    Ok(peer::local::config(
        &scenario,
        &repo_file("data/shakespeare.txt")?,
        &repo_file("data/tokenizer.json")?,
    ))
}

/// What a run of peers requires whatever the flags say: one unit a member each round,
/// no stale updates, and every member's re-execution in place of scoring and re-runs.
pub(crate) fn for_peers(
    mut config: coordinator::CoordinatorConfig,
    peers: usize,
) -> coordinator::CoordinatorConfig {
    config.schedule.units_per_round = peers as u32;
    config.schedule.min_updates = 1;
    config.schedule.max_staleness = 0;
    config.scoring.enabled = false;
    config
}

fn repo_file(name: &str) -> anyhow::Result<PathBuf> {
    let candidates = [
        PathBuf::from(name),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("{name} not found: run the demo from the repository"))
}

pub(crate) fn run(args: P2pArgs) -> anyhow::Result<()> {
    if args.peers < 2 || args.peers > agree::COMMITTEE_MAX {
        bail!(
            "--peers must be 2 to {} (at 4 or more, a silent or lying peer cannot stop the run)",
            agree::COMMITTEE_MAX
        );
    }
    if args.versions == 0 {
        bail!("--rounds must be at least 1");
    }
    let cache = tempfile::tempdir().context("making a temporary directory")?;
    let steps = args.config.schedule.steps_per_unit;
    let keys: Vec<_> = (0..args.peers)
        .map(|i| peer::local::key(args.config.seed, i))
        .collect();
    let members = keys.iter().map(WorkerId::of).collect();
    let setup = Arc::new(Setup::from_config(
        args.config,
        members,
        keys,
        cache.path(),
        engine::cpu_class(),
    )?);
    let names: std::collections::BTreeMap<WorkerId, String> = setup
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (WorkerId::of(k), format!("peer-{i}")))
        .collect();
    println!(
        "hivetrain demo --p2p: {} peers on this machine and no coordinator, over QUIC (iroh) on loopback",
        args.peers
    );
    println!(
        "model {} | every peer trains one unit a version, H = {} local steps of {} sequences | outer {:?}",
        setup.config.preset, steps, setup.config.batch, setup.config.outer
    );
    println!(
        "each version: every peer re-executes the proposer's value (its updates, accepted units, version hash) before it votes; more than two thirds certify it; sampled units are trained again by another peer and compared bit for bit\n"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (tx, rx) = std::sync::mpsc::channel::<Certified>();
    let started = Instant::now();
    let finished = runtime.block_on(async {
        let members = setup.spec.members.clone();
        let mut nets = Vec::new();
        for key in &setup.keys {
            let net = IrohTransport::bind(
                key,
                "127.0.0.1:0".parse().expect("an address"),
                &members,
                None,
            )
            .await?;
            nets.push(net);
        }
        let addrs: Vec<_> = nets.iter().map(|n| (n.id(), n.addr())).collect();
        for net in &nets {
            for (id, addr) in &addrs {
                net.learn(*id, addr.clone());
            }
        }
        let mut tasks = Vec::new();
        for (i, net) in nets.into_iter().enumerate() {
            let node = setup.node(i, Behaviour::Honest, Timings::default())?;
            let mut backend = setup.prepared.model.open_empty("cpu:1", Purpose::Train)?;
            let s = setup.clone();
            let train: mesh::drive::Train = Box::new(move |unit, base| {
                s.train(backend.as_mut(), unit, base)
                    .map_err(|e| e.to_string())
            });
            let tx = tx.clone();
            let on_version: mesh::drive::OnVersion = if i == 0 {
                Box::new(move |node| {
                    if let Some(c) = node.chain().last() {
                        let round = c.decision.round.as_i64();
                        let proposer = node.last_proposer().unwrap_or(WorkerId([0; 32]));
                        let _ = tx.send(Certified {
                            version: node.replica().version(),
                            round,
                            proposer,
                            accepted: c.decision.value.accepted.len(),
                            checks: node.replica().tally(),
                            params: node.replica().params().clone(),
                            at: Instant::now(),
                        });
                    }
                })
            } else {
                Box::new(|_| ())
            };
            tasks.push(tokio::spawn(mesh::drive::run(
                node,
                net,
                members.clone(),
                train,
                args.versions,
                on_version,
            )));
        }
        drop(tx);
        let mut finished = Vec::new();
        for task in tasks {
            finished.push(task.await.context("a peer's task")??);
        }
        anyhow::Ok(finished)
    });
    // The table, from peer 0's certified versions (computed after the run: the holdout
    // loss is this demo's, not the peers').
    println!("version  round  proposer  accepted  re-runs ok/failed  holdout loss  seconds");
    println!(
        "{:>7}  {:>5}  {:>8}  {:>8}  {:>17}  {:>12.4}  {:>7}",
        0,
        "-",
        "-",
        "-",
        "-",
        setup.holdout_loss(&setup.prepared.initial)?,
        "-"
    );
    let mut last = None;
    for c in rx.iter() {
        println!(
            "{:>7}  {:>5}  {:>8}  {:>8}  {:>17}  {:>12.4}  {:>7.2}",
            c.version,
            c.round,
            names.get(&c.proposer).map_or("?", String::as_str),
            c.accepted,
            format!("{}/{}", c.checks.matched, c.checks.failed),
            setup.holdout_loss(&c.params)?,
            c.at.duration_since(started).as_secs_f64()
        );
        last = Some(c.params);
    }
    let finished = finished?;
    println!(
        "\nevery peer's view (credit: micro-credits minted by the accepted updates and re-runs of the certified chain):"
    );
    for (node, traffic) in &finished {
        let credit: Vec<String> = node
            .replica()
            .credit()
            .iter()
            .map(|(w, c)| {
                format!(
                    "{} {}",
                    names.get(w).map_or("?", String::as_str),
                    ledger::format_credits(*c)
                )
            })
            .collect();
        println!(
            "  {:<7} version {}  hash {}  sent {} messages, {:.2} MB | credit: {}",
            names.get(&node.id()).map_or("?", String::as_str),
            node.replica().version(),
            hex::encode(&node.replica().hash()[..6]),
            traffic.messages,
            traffic.bytes as f64 / 1e6,
            credit.join(", ")
        );
    }
    if args.sample_tokens > 0
        && let Some(params) = last
    {
        let mut backend = setup.prepared.model.open("cpu:1", &params, Purpose::Eval)?;
        let tokenizer = &setup.prepared.tokenizer;
        let text = crate::demo::sample(
            backend.as_mut(),
            tokenizer,
            &args.prompt,
            args.sample_tokens,
        )?;
        println!(
            "\nsample of version {}:\n{}{}",
            args.versions, args.prompt, text
        );
    }
    Ok(())
}
