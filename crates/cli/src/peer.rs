//! `hivetrain peer` and `hivetrain relay`: a run with no coordinator, one peer a process,
//! on as many machines as it has members.
//!
//! The run's creator collects each member's key (`hivetrain peer id`), and makes a
//! ticket that names them, the run and its data (`hivetrain peer ticket`); each member
//! joins with it (`hivetrain peer join TICKET`): it binds its QUIC endpoint, finds the
//! others from the ticket (their sockets, or the run's relay), trains a unit of every
//! version, and certifies each next version with the others, voting only for a value its
//! own re-execution reproduces bit for bit. Where NATs keep members apart, anyone runs a
//! relay (`hivetrain relay`) and the ticket names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use engine::Purpose;
use mesh::quic::IrohTransport;
use mesh::ticket::{FileRef, Member, Ticket};
use peer::local::Setup;
use peer::{Behaviour, Timings};
use protocol::WorkerId;

use crate::coordinator::RunFlags;
use crate::paths;

/// A peer's copy of its run's ticket, and its certified chain, in its directory.
const TICKET_FILE: &str = "run.ticket";
const CHAIN_FILE: &str = "chain.bin";

/// How long a joining peer waits for the run's relay to take it.
const RELAY_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Subcommand)]
pub(crate) enum PeerCommand {
    /// Print this machine's key (made on first use): send it to a run's creator, who
    /// names it in the run's ticket.
    Id {
        /// Your key file (default: the config dir's hivetrain/worker.key, the worker's).
        #[arg(long, env = "HIVETRAIN_KEY")]
        key: Option<PathBuf>,
    },
    /// Make a run with no coordinator and print its ticket: the run's settings, its
    /// corpus and tokenizer by hash, its members, and their relay.
    Ticket(Box<TicketArgs>),
    /// Join a run from its ticket: train a unit of every version, check every other
    /// member's update and every proposed version, vote, and stop at the last version.
    Join(Box<JoinArgs>),
}

#[derive(Debug, clap::Args)]
pub(crate) struct TicketArgs {
    /// A member: its key (from `hivetrain peer id`), and the UDP socket it listens on
    /// when you know it (KEY or KEY@HOST:PORT). Once per member; with 4 or more, one
    /// silent or lying member cannot stop the run.
    #[arg(long = "member", value_name = "KEY[@HOST:PORT]", required = true)]
    members: Vec<String>,
    /// The relay members meet at when NATs keep them apart: the `hivetrain-relay1:...`
    /// string `hivetrain relay` prints (or a relay's URL alone: then members behind NATs
    /// reach each other through it, never directly).
    #[arg(long)]
    relay: Option<String>,
    /// Versions to certify.
    #[arg(long, default_value_t = 12)]
    versions: u64,
    /// The corpus every member trains on (default: the bundled Shakespeare).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// The tokenizer (default: the bundled one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Write the ticket to this file (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The members' CPU determinism class (default: this machine's, which `hivetrain
    /// peer id` prints on each member's). Sampled units are re-run by other members and
    /// compared bit for bit; for members of several classes, pass
    /// --spot-check-tolerance with the measured difference between classes (0.15).
    #[arg(long)]
    class: Option<String>,
    #[command(flatten)]
    run: RunFlags,
}

#[derive(Debug, clap::Args)]
pub(crate) struct JoinArgs {
    /// The run's ticket, or a file holding it.
    ticket: String,
    /// Your key file: the key the ticket names (default: the config dir's
    /// hivetrain/worker.key).
    #[arg(long, env = "HIVETRAIN_KEY")]
    key: Option<PathBuf>,
    /// The UDP socket to listen on (default: the one the ticket lists for your key, else
    /// any port on every interface).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Your copy of the run's corpus (default: the bundled one; its BLAKE3 hash must be
    /// the ticket's).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Your copy of the run's tokenizer (default: the bundled one; checked likewise).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to train: `cpu` (every core), `cpu:N` (N threads), `cuda`, `cuda:N` or
    /// `auto`. (Every member re-executes the aggregate on the CPU: versions are the
    /// same bits whatever each trained on.)
    #[arg(long, env = crate::env::DEVICE, default_value = "cpu")]
    device: String,
    /// Cache directory (the run's token cache).
    #[arg(long, env = crate::env::CACHE_DIR)]
    cache_dir: Option<PathBuf>,
    /// Serve this peer's dashboard (`/`), status (`/v1/peer`) and Prometheus metrics
    /// (`/metrics`) on this TCP socket while it runs (e.g. 127.0.0.1:8491).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Where this peer keeps the run: its ticket and the certified chain (every height's
    /// value, certificate and updates), which `hivetrain ledger verify --chain` checks
    /// (default: the data dir's hivetrain/runs/RUN/KEY).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct RelayArgs {
    /// The TCP socket to forward on (HTTP).
    #[arg(long, default_value = "0.0.0.0:3340")]
    listen: SocketAddr,
    /// The UDP port (same address) that tells peers the public address their NAT gives
    /// them, so that they can punch holes to each other (0: any free port).
    #[arg(long, default_value_t = 7842)]
    discovery_port: u16,
    /// Forward only: no address discovery, so members behind NATs always go through
    /// this relay.
    #[arg(long, conflicts_with = "discovery_port")]
    forward_only: bool,
    /// The address (or name) peers reach this machine at; needed when --listen binds
    /// every interface.
    #[arg(long)]
    public: Option<String>,
    /// Admit only the members of this run (a ticket, or a file holding one); default:
    /// anyone, up to the relay's bound on clients.
    #[arg(long)]
    ticket: Option<String>,
}

pub(crate) fn run(command: PeerCommand) -> anyhow::Result<()> {
    match command {
        PeerCommand::Id { key } => {
            let (key, path) = load_key(key, true)?;
            eprintln!("your key file: {}", path.display());
            eprintln!(
                "your CPU determinism class (the run's creator passes it to `peer ticket --class` when members differ from its machine): {}",
                engine::cpu_class()
            );
            println!("{}", WorkerId::of(&key));
            Ok(())
        }
        PeerCommand::Ticket(args) => ticket(*args),
        PeerCommand::Join(args) => join(*args),
    }
}

/// The key file's key, made first when `make` and it is missing.
fn load_key(
    path: Option<PathBuf>,
    make: bool,
) -> anyhow::Result<(ed25519_dalek::SigningKey, PathBuf)> {
    let path = match path {
        Some(p) => p,
        None => worker::identity::default_path()?,
    };
    if !make && !path.exists() {
        bail!(
            "no key at {}: run `hivetrain peer id` to make one and send it to the run's creator, or pass --key",
            path.display()
        );
    }
    let (key, made) = worker::identity::load_or_create(&path)?;
    if made {
        eprintln!(
            "made a new key at {} (it is your wallet: keep it)",
            path.display()
        );
    }
    Ok((key, path))
}

/// A ticket given as text, or as a file holding it.
fn read_ticket(text: &str) -> anyhow::Result<Ticket> {
    let path = Path::new(text);
    let text = if !text.starts_with(mesh::ticket::PREFIX) && path.is_file() {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading the ticket {}", path.display()))?
    } else {
        text.to_owned()
    };
    Ok(Ticket::parse(&text)?)
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}

fn ticket(args: TicketArgs) -> anyhow::Result<()> {
    let members = args
        .members
        .iter()
        .map(|m| parse_member(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let corpus = paths::bundled(
        args.corpus
            .as_deref()
            .unwrap_or(Path::new(paths::DEFAULT_CORPUS)),
    );
    let tokenizer = paths::bundled(
        args.tokenizer
            .as_deref()
            .unwrap_or(Path::new(paths::DEFAULT_TOKENIZER)),
    );
    let base = crate::p2p_demo::config(members.len(), args.versions, crate::demo::P2P_STEPS)?;
    let mut config = crate::p2p_demo::for_peers(args.run.config(base)?, members.len());
    config.corpus = corpus.clone();
    config.tokenizer = tokenizer.clone();
    let ticket = Ticket {
        corpus: FileRef::of(&file_name(&corpus), &read_file(&corpus, "corpus")?),
        tokenizer: FileRef::of(&file_name(&tokenizer), &read_file(&tokenizer, "tokenizer")?),
        config,
        versions: args.versions,
        members,
        class: args.class.unwrap_or_else(engine::cpu_class),
        relay: args
            .relay
            .as_deref()
            .map(mesh::relay::RelayRef::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    // What every member will check, checked before the ticket is handed out.
    let text = ticket.encode();
    Ticket::parse(&text)?;
    eprintln!(
        "run {}: {} members, {} versions, model {}, H = {}{}",
        ticket.run_id(),
        ticket.members.len(),
        ticket.versions,
        ticket.config.preset,
        ticket.config.schedule.steps_per_unit,
        ticket
            .relay
            .as_ref()
            .map_or(String::new(), |r| format!(", relay {}", r.url))
    );
    match &args.out {
        Some(path) => {
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "ticket written to {}: each member runs `hivetrain peer join {}`",
                path.display(),
                path.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// `KEY` or `KEY@HOST:PORT`.
fn parse_member(text: &str) -> anyhow::Result<Member> {
    let (key, addr) = match text.split_once('@') {
        Some((k, a)) => (k, Some(a)),
        None => (text, None),
    };
    let id = WorkerId::parse(key)
        .filter(WorkerId::is_public_key)
        .with_context(|| {
            format!("{key:?} is not a member's key: `hivetrain peer id` prints one (64 hex digits)")
        })?;
    let addrs = match addr {
        Some(a) => vec![a.parse::<SocketAddr>().with_context(|| {
            format!("{a:?} is not a socket address (HOST:PORT, e.g. 192.0.2.7:7001)")
        })?],
        None => Vec::new(),
    };
    Ok(Member {
        id: id.to_string(),
        addrs,
    })
}

fn join(args: JoinArgs) -> anyhow::Result<()> {
    let ticket = read_ticket(&args.ticket)?;
    let (key, _) = load_key(args.key.clone(), false)?;
    let me = WorkerId::of(&key);
    let members = ticket.member_ids()?;
    let Some(index) = members.iter().position(|m| *m == me) else {
        bail!(
            "your key {me} is not a member of run {}: send it (`hivetrain peer id` prints it) to the run's creator, for a ticket that names it",
            ticket.run_id()
        );
    };
    // Says what is missing (no driver, an old GPU) before anything else.
    engine::resolve_device(&args.device)?;
    let spot = &ticket.config.spot_check;
    let class = engine::cpu_class();
    if spot.enabled && class != ticket.class && spot.tolerance < spot.cross_class_tolerance {
        bail!(
            "this machine's CPU determinism class is {class}, and run {} is for {}: its re-runs compare units within {} (bit for bit at 0), so your honest units would fail their checks. Ask the run's creator for a ticket made with `--class {class}` if every member has this class, or with `--spot-check-tolerance {}` for members of several",
            ticket.run_id(),
            ticket.class,
            spot.tolerance,
            spot.cross_class_tolerance
        );
    }
    let cache = paths::cache_dir(args.cache_dir.as_deref()).join("peer");
    let setup = std::sync::Arc::new(run_setup(
        &ticket,
        args.corpus.as_deref(),
        args.tokenizer.as_deref(),
        vec![key.clone()],
        &cache,
    )?);
    let short = |w: &WorkerId| w.to_string()[..8].to_owned();
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => dirs::data_dir()
            .context("no data directory on this machine: pass --dir")?
            .join("hivetrain/runs")
            .join(ticket.run_id())
            .join(short(&me)),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
    std::fs::write(dir.join(TICKET_FILE), format!("{}\n", ticket.encode()))
        .with_context(|| format!("writing into {}", dir.display()))?;
    let chain_path = dir.join(CHAIN_FILE);
    // A chain already there (this peer ran before: it stopped, crashed, or the run was
    // extended) is replayed, and the peer goes on from its last version.
    let (mut chain, resumed) = if chain_path.exists() {
        let resumed = resume(&setup, &chain_path)?;
        let writer = peer::audit::ChainWriter::resume(&chain_path, resumed.whole_bytes)
            .with_context(|| format!("opening {}", chain_path.display()))?;
        (writer, Some(resumed))
    } else {
        let writer = peer::audit::ChainWriter::create(&chain_path)
            .with_context(|| format!("making {}", chain_path.display()))?;
        (writer, None)
    };
    let relay = ticket.relay.clone();
    let addrs = ticket.addrs()?;
    let listen = args
        .listen
        .or_else(|| ticket.members[index].addrs.first().copied())
        .unwrap_or_else(|| "0.0.0.0:0".parse().expect("an address"));
    println!(
        "hivetrain peer {}: run {}, member {} of {}, model {}, {} versions",
        short(&me),
        ticket.run_id(),
        index + 1,
        members.len(),
        setup.config.preset,
        ticket.versions
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = Instant::now();
    // How this peer last reached each other member (for the summary).
    let reached = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        WorkerId,
        mesh::quic::Path,
    >::new()));
    let finished = runtime.block_on(async {
        let net = IrohTransport::bind(&key, listen, &members, relay.as_ref())
            .await
            .with_context(|| format!("listening on {listen}"))?;
        if relay.is_some() && !net.online(RELAY_WAIT).await {
            bail!(
                "the run's relay {} did not take this peer within {} s: is it running, and reachable from here?",
                ticket.relay.as_ref().map_or("", |r| r.url.as_str()),
                RELAY_WAIT.as_secs()
            );
        }
        for (id, addr) in &addrs {
            net.learn(*id, addr.clone());
        }
        println!(
            "listening on {}{}",
            net.addr()
                .ip_addrs()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            relay
                .as_ref()
                .map_or(String::new(), |r| format!(", relay {}", r.url))
        );
        println!("version  round  proposer  accepted  holdout loss  paths (direct/relayed)  seconds");
        let node = match resumed {
            Some(r) => {
                println!(
                    "resumed at version {}: {} replayed from version 0",
                    r.replica.version(),
                    chain_path.display()
                );
                peer::Node::resume(
                    key.clone(),
                    setup.spec.clone(),
                    r.replica,
                    r.tail,
                    Timings::default(),
                    Behaviour::Honest,
                )?
            }
            None => setup.node(0, Behaviour::Honest, Timings::default())?,
        };
        let mut stored = node.replica().version();
        let mut backend = setup.prepared.model.open_empty(&args.device, Purpose::Train)?;
        let s = setup.clone();
        let train: mesh::drive::Train = Box::new(move |unit, base| {
            s.train(backend.as_mut(), unit, base)
                .map_err(|e| e.to_string())
        });
        let paths = net.paths();
        let dashboard = std::sync::Arc::new(crate::peer_dashboard::Dashboard::new(
            crate::peer_dashboard::PeerView {
                run: ticket.run_id(),
                me: me.to_string(),
                model: setup.config.preset.clone(),
                versions_wanted: ticket.versions,
                version: 0,
                hash: hex::encode(setup.genesis.hash()),
                relay: ticket.relay.as_ref().map(|r| r.url.clone()),
                members: crate::peer_dashboard::members_view(&setup.spec.members),
                history: Vec::new(),
                reruns: Default::default(),
            },
            paths.clone(),
            me,
            setup.spec.members.clone(),
        ));
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = match args.http {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("serving the dashboard on {addr}"))?;
                println!(
                    "dashboard at http://{}/ (metrics at /metrics)",
                    listener.local_addr().unwrap_or(addr)
                );
                let app = crate::peer_dashboard::router(dashboard.clone());
                Some(tokio::spawn(async move {
                    let limits = coordinator::config::HttpLimits::default();
                    coordinator::serve_bounded(listener, app, &limits, async {
                        let _ = stopped.await;
                    })
                    .await;
                }))
            }
            None => None,
        };
        let board = dashboard.clone();
        let reached = reached.clone();
        let s = setup.clone();
        let on_version: mesh::drive::OnVersion = Box::new(move |node| {
            // Every height certified since the last call (a peer catching up certifies
            // several at once), stored before it is shown.
            let from = stored;
            for c in node.chain().iter().filter(|c| c.decision.height.0 > from) {
                if let Err(e) = chain.append(c) {
                    eprintln!("error: storing height {}: {e}", c.decision.height.0);
                }
                stored = c.decision.height.0;
            }
            let Some(c) = node.chain().last() else {
                return;
            };
            let proposer = node.last_proposer().unwrap_or(WorkerId([0; 32]));
            let holdout = s.holdout_loss(node.replica().params());
            let loss = match &holdout {
                Ok(l) => format!("{l:.4}"),
                Err(e) => format!("({e})"),
            };
            board.certified(
                node,
                crate::peer_dashboard::VersionRow {
                    version: node.replica().version(),
                    round: c.decision.round.as_i64(),
                    proposer: short(&proposer),
                    accepted: c.decision.value.accepted.len(),
                    holdout_loss: holdout.ok(),
                    seconds: board.seconds(),
                },
            );
            let others = node.spec().members.iter().filter(|m| **m != node.id());
            let mut reached = reached.lock().unwrap_or_else(|p| p.into_inner());
            let (mut direct, mut relayed) = (0, 0);
            for m in others {
                match paths.of(*m) {
                    mesh::quic::Path::Direct => direct += 1,
                    mesh::quic::Path::Relayed => relayed += 1,
                    mesh::quic::Path::None => continue,
                }
                reached.insert(*m, paths.of(*m));
            }
            println!(
                "{:>7}  {:>5}  {:>8}  {:>8}  {:>12}  {:>22}  {:>7.2}",
                node.replica().version(),
                c.decision.round.as_i64(),
                short(&proposer),
                c.decision.value.accepted.len(),
                loss,
                format!("{direct}/{relayed}"),
                started.elapsed().as_secs_f64()
            );
        });
        let ran =
            mesh::drive::run(node, net, members.clone(), train, ticket.versions, on_version).await;
        let _ = stop_http.send(());
        if let Some(server) = server {
            let _ = server.await;
        }
        let (node, traffic) = ran?;
        anyhow::Ok((node, traffic))
    })?;
    let (node, traffic) = finished;
    let credit: Vec<String> = node
        .replica()
        .credit()
        .iter()
        .map(|(w, c)| format!("{} {}", short(w), ledger::format_credits(*c)))
        .collect();
    println!(
        "sent {} messages, {:.2} MB | credit: {}",
        traffic.messages,
        traffic.bytes as f64 / 1e6,
        credit.join(", ")
    );
    let reached = reached.lock().unwrap_or_else(|p| p.into_inner());
    let paths: Vec<String> = reached
        .iter()
        .map(|(w, p)| format!("{} {}", short(w), p.as_str()))
        .collect();
    println!("reached: {}", paths.join(", "));
    println!(
        "the certified chain is in {} (check it: hivetrain ledger verify --chain {} --ticket {})",
        chain_path.display(),
        chain_path.display(),
        dir.join(TICKET_FILE).display()
    );
    println!(
        "version {} hash {}",
        node.replica().version(),
        hex::encode(node.replica().hash())
    );
    Ok(())
}

pub(crate) fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let members = match &args.ticket {
        Some(t) => Some(read_ticket(t)?.member_ids()?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let options = mesh::relay::RelayOptions {
            http: args.listen,
            quic_port: (!args.forward_only).then_some(args.discovery_port),
            public_host: args.public.clone(),
            members: members.clone(),
        };
        let relay = mesh::relay::Relay::spawn(options)
            .await
            .with_context(|| format!("serving a relay on {}", args.listen))?;
        let reference = relay.reference();
        println!(
            "relay at {}{} for {}; name it in a run's ticket with `hivetrain peer ticket --relay` and this:",
            reference.url,
            reference
                .quic_port
                .map_or(String::new(), |p| format!(", address discovery on UDP {p}")),
            match &members {
                Some(m) => format!("the {} members of one run", m.len()),
                None => format!("anyone (up to {} at once)", mesh::relay::CONNECTIONS_MAX),
            }
        );
        println!("{}", reference.encode());
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
        relay.shutdown().await;
        anyhow::Ok(())
    })
}

/// The run a ticket names, for the peers of `keys` here: the corpus and tokenizer given
/// (default: the bundled ones) checked against the ticket's hashes.
fn run_setup(
    ticket: &Ticket,
    corpus: Option<&Path>,
    tokenizer: Option<&Path>,
    keys: Vec<ed25519_dalek::SigningKey>,
    cache: &Path,
) -> anyhow::Result<Setup> {
    let corpus = paths::bundled(corpus.unwrap_or(Path::new(paths::DEFAULT_CORPUS)));
    let tokenizer = paths::bundled(tokenizer.unwrap_or(Path::new(paths::DEFAULT_TOKENIZER)));
    for (path, want, what) in [
        (&corpus, &ticket.corpus, "corpus"),
        (&tokenizer, &ticket.tokenizer, "tokenizer"),
    ] {
        if !want.matches(&read_file(path, what)?) {
            bail!(
                "the {what} {} is not the run's {} (BLAKE3 {}): pass --{what} with the run's file",
                path.display(),
                want.name,
                want.blake3
            );
        }
    }
    let mut config = ticket.config.clone();
    config.corpus = corpus;
    config.tokenizer = tokenizer;
    Ok(Setup::from_config(
        config,
        ticket.member_ids()?,
        keys,
        cache,
        ticket.class.clone(),
    )?)
}

/// `hivetrain ledger verify --chain FILE --ticket TICKET`: the run's chain replayed from
/// version 0, every certificate and every value checked, and the ledger it makes.
pub(crate) fn verify_chain(
    chain: &Path,
    ticket: &str,
    corpus: Option<&Path>,
    tokenizer: Option<&Path>,
) -> anyhow::Result<()> {
    let ticket = read_ticket(ticket)?;
    let cache = paths::cache_dir(None).join("peer");
    let setup = run_setup(&ticket, corpus, tokenizer, Vec::new(), &cache)?;
    let short = |w: &WorkerId| w.to_string()[..8].to_owned();
    println!(
        "run {}: {} members; replaying {} from version 0",
        ticket.run_id(),
        ticket.members.len(),
        chain.display()
    );
    let heights = peer::audit::read_chain(chain, setup.spec.update_bytes())?;
    let audited = peer::audit::replay(&setup.spec, setup.genesis.clone(), heights, |c, replica| {
        println!(
            "  height {:>4}: certified by {} of {} members in round {}, {} updates re-executed, version hash {}",
            c.decision.height.0,
            c.decision.certificate.commit_signatures.len(),
            ticket.members.len(),
            c.decision.round.as_i64(),
            c.updates.len(),
            hex::encode(&replica.hash()[..8])
        );
    })
    .context("the chain is not the run's")?;
    println!(
        "ok: {} certified versions, each re-executed bit for bit; version {} hash {}",
        audited.heights,
        audited.replica.version(),
        hex::encode(audited.replica.hash())
    );
    let t = audited.replica.tally();
    println!(
        "re-runs of sampled units by other members: {} matched, {} failed (credit clawed back), {} disputed, {} refuted",
        t.matched, t.failed, t.disputed, t.refuted
    );
    println!("credit the chain mints:");
    for (worker, micros) in audited.replica.credit() {
        let punished = if audited.replica.punished().contains(worker) {
            " (punished: equivocated)"
        } else if audited.replica.caught().contains(worker) {
            " (caught: a unit failed its re-run)"
        } else {
            ""
        };
        println!(
            "  {} {}{punished}",
            short(worker),
            ledger::format_credits(*micros)
        );
    }
    Ok(())
}

/// A peer's chain file replayed: the version it reaches, its newest heights (for
/// members that catch up), and how much of the file was whole heights.
struct Resumed {
    replica: peer::Replica,
    tail: Vec<peer::Certified>,
    whole_bytes: u64,
}

/// Replays the chain file at `path` from the run's version 0 (every certificate and
/// value checked, as `ledger verify --chain` does); a last height cut short by a crash
/// is dropped.
fn resume(setup: &Setup, path: &Path) -> anyhow::Result<Resumed> {
    use peer::audit::{AuditError, CUT_SHORT};
    let mut reader = peer::audit::read_chain(path, setup.spec.update_bytes())?;
    let mut tail: std::collections::VecDeque<peer::Certified> = std::collections::VecDeque::new();
    let whole = reader.by_ref().map_while(|height| match height {
        Err(AuditError::File(why)) if why.starts_with(CUT_SHORT) => None,
        other => Some(other),
    });
    let audited = peer::audit::replay(&setup.spec, setup.genesis.clone(), whole, |c, _| {
        if tail.len() == peer::node::CHAIN_MAX {
            tail.pop_front();
        }
        tail.push_back(c.clone());
    })
    .with_context(|| {
        format!(
            "{} is not this run's chain: move it away, or pass another --dir",
            path.display()
        )
    })?;
    Ok(Resumed {
        replica: audited.replica,
        tail: tail.into(),
        whole_bytes: reader.whole_bytes(),
    })
}
