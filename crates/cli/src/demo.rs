//! `hivetrain demo`: a coordinator and N volunteer workers on this machine, talking real
//! HTTP over loopback, train one GPT on Shakespeare; a round table as versions appear,
//! then a sample from the last version. `hivetrain demo --finetune`: the same volunteers
//! fine-tune SmolLM2-135M-Instruct with a LoRA adapter on Shakespeare chats, and a
//! volunteer pays credit for the same question to the base and to the fine-tuned model.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use coordinator::{Coordinator, CoordinatorConfig};
use engine::generate::SamplingParams;
use protocol::api::Status;
use worker::{HttpTransport, WorkerOptions};

use crate::coordinator::RunFlags;

#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Volunteer workers to start (each trains on `--threads-per-worker` threads).
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// Engine threads of each worker.
    #[arg(long, default_value_t = 1)]
    threads_per_worker: u32,
    /// Fine-tune SmolLM2-135M-Instruct (fetched once, 98 MB, sha256-pinned) with a LoRA
    /// adapter (rank 8, all seven projections) on data/shakespeare-chat.jsonl instead of
    /// training a GPT from scratch; at the end the same question goes to the base and to
    /// the fine-tuned model through the API.
    #[arg(long)]
    finetune: bool,
    /// Stop after this many rounds (model versions) [default: 12, or 4 with --finetune].
    #[arg(long)]
    rounds: Option<u64>,
    /// Stop after this many minutes even if rounds remain (a cap: the fine-tune demo's 4
    /// rounds took 6.5 minutes on a 2-core machine, and past 15 on a slower day).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// Directory of the run's store (default: a fresh temporary directory, removed at
    /// the end). A given directory is kept, and an existing run in it resumes.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Tokens of the sample printed at the end.
    #[arg(long, default_value_t = 200)]
    sample_tokens: usize,
    /// Prompt of the sample [default: "KING HENRY:\n", or with --finetune a request to
    /// continue a passage of Hamlet].
    #[arg(long)]
    prompt: Option<String>,
    /// No coordinator: `--peers` peers on this machine, each with its own key, QUIC
    /// endpoint (iroh, loopback), replica of the run and engine, train the tiny GPT and
    /// agree on every version (each re-executes the proposer's value before it votes).
    #[arg(long, conflicts_with = "finetune")]
    p2p: bool,
    /// Peers of `--p2p` (4 or more: then a silent or lying peer cannot stop the run).
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Print the demo's effective coordinator config as TOML and exit (a file of such
    /// keys is what --config takes).
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    run: RunFlags,
}

/// The question the fine-tune demo asks the base and the fine-tuned model: phrased as the
/// training chats are, about a passage that is in the holdout's play but asked anew.
const FINETUNE_PROMPT: &str = "Continue this passage from Hamlet, Act III, Scene I:\n\nHam.\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\nAnd by opposing end them?";

/// Local steps of a `--p2p` peer's unit.
pub(crate) const P2P_STEPS: u32 = 50;

pub(crate) fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(if args.finetune { 4 } else { 12 });
    if args.p2p {
        let base = crate::p2p_demo::config(args.peers, rounds, P2P_STEPS)?;
        let config = crate::p2p_demo::for_peers(args.run.config(base)?, args.peers);
        if args.print_config {
            print!("{}", config.to_toml());
            return Ok(());
        }
        return crate::p2p_demo::run(crate::p2p_demo::P2pArgs {
            config,
            peers: args.peers,
            versions: rounds,
            sample_tokens: args.sample_tokens,
            prompt: args
                .prompt
                .clone()
                .unwrap_or_else(|| "KING HENRY:\n".to_owned()),
        });
    }
    let prompt = args.prompt.clone().unwrap_or_else(|| {
        if args.finetune {
            FINETUNE_PROMPT.to_owned()
        } else {
            "KING HENRY:\n".to_owned()
        }
    });
    if args.workers == 0 || args.threads_per_worker == 0 || rounds == 0 {
        bail!("--workers, --threads-per-worker and --rounds must be at least 1");
    }
    if !(args.minutes.is_finite() && args.minutes > 0.0) {
        bail!("--minutes must be a positive number");
    }
    let mut base = CoordinatorConfig::default();
    base.schedule.units_per_round = args.workers;
    base.schedule.min_updates = args.workers;
    // Every worker of this machine reports back well within a minute or two.
    base.schedule.round_timeout_ms = 300_000;
    base.schedule.lease_ms = 120_000;
    if args.finetune {
        let gguf =
            models::smollm2::fetch::ensure_gguf().context("fetching SmolLM2-135M-Instruct")?;
        base = base.finetune_demo(gguf);
    }
    let config = args.run.config(base)?;
    if args.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    let temp;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().context("making a temporary directory")?;
            temp.path().to_owned()
        }
    };
    println!(
        "hivetrain demo: a coordinator and {} workers on this machine, over HTTP on loopback",
        args.workers
    );
    let model_name = match &config.finetune {
        Some(f) => {
            let base = f.base.file_name().map_or_else(
                || f.base.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            );
            match &f.lora {
                Some(l) => format!(
                    "{base} + LoRA rank {} alpha {} on {} projections",
                    l.rank,
                    l.alpha,
                    l.targets.len()
                ),
                None => format!("{base}, every weight trained"),
            }
        }
        None => config.preset.clone(),
    };
    println!(
        "model {} | {} units per round, H = {} local steps of {} sequences | codec {:?} | outer {:?}",
        model_name,
        config.schedule.units_per_round,
        config.schedule.steps_per_unit,
        config.batch,
        config.codec,
        config.outer
    );
    println!("store: {}", dir.display());
    let server =
        Coordinator::start(&dir, config, "127.0.0.1:0").context("starting the coordinator")?;
    let url = server.url();
    println!("coordinator: {url} (dashboard: {url}/, Prometheus metrics: {url}/metrics)\n");

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping the demo (Ctrl-C again quits now)");
    })
    .context("installing the Ctrl-C handler")?;

    let mut handles = Vec::new();
    for i in 0..args.workers {
        let key_path = dir.join("keys").join(format!("worker-{i}.key"));
        let (key, _) = worker::identity::load_or_create(&key_path)?;
        let options = WorkerOptions {
            name: format!("volunteer-{i}"),
            device: format!("cpu:{}", args.threads_per_worker),
            max_units: None,
            data_dir: dir.join(format!("worker-{i}")),
            unreachable_timeout: Duration::from_secs(30),
        };
        let transport = HttpTransport::new(&url)?;
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            worker::run(&transport, &key, &options, &stop, &mut ())
        }));
    }

    // The table is read the way any client would: GET /v1/status.
    let client = reqwest::blocking::Client::new();
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(args.minutes * 60.0);
    let mut printed = 0u64;
    let mut first = None;
    let mut last_loss = f32::NAN;
    let mut total_bytes = 0u64;
    let mut total_tokens = 0u64;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let status: Status = match client
            .get(format!("{url}/v1/status"))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
        {
            Ok(s) => s,
            Err(e) => {
                eprintln!("status: {e}");
                continue;
            }
        };
        if first.is_none() {
            first = Some(status.initial_holdout_loss);
            println!("version  holdout loss  accepted  rejected     tokens  bytes sent  seconds");
            println!(
                "{:>7}  {:>12.4}  {:>8}  {:>8}  {:>9}  {:>10}  {:>7}",
                0, status.initial_holdout_loss, "-", "-", "-", "-", "-"
            );
        }
        let seen = printed;
        for r in status
            .rounds
            .iter()
            .filter(|r| r.version.is_some_and(|v| v > seen))
        {
            printed = r.version.unwrap_or(printed);
            total_bytes += r.bytes;
            total_tokens += r.tokens;
            last_loss = r.holdout_loss.unwrap_or(f32::NAN);
            println!(
                "{:>7}  {:>12.4}  {:>8}  {:>8}  {:>9}  {:>10}  {:>7.1}",
                printed, last_loss, r.accepted, r.rejected, r.tokens, r.bytes, r.seconds
            );
        }
        for h in &handles {
            if h.is_finished() {
                stop.store(true, Ordering::SeqCst);
            }
        }
        if printed >= rounds {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        match h.join() {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("a worker failed: {e}"),
            Err(_) => eprintln!("a worker panicked"),
        }
    }
    // Credit: one mint per accepted update, in the coordinator's signed ledger.
    let (board, entries) = server.with_core(|c| (c.leaderboard(), c.stats().map(|s| s.entries)));
    if let (Ok(board), Ok(entries)) = (board, entries) {
        println!(
            "\ncredit earned ({entries} ledger entries; `hivetrain ledger verify` checks them):"
        );
        for row in &board {
            println!(
                "  {:<12} {:>4} units  {:>12} credits",
                row.name,
                row.units,
                ledger::format_credits(row.earned)
            );
        }
    }
    // Replay spot-checks: units the coordinator trained again and compared.
    if let Ok(checks) = server.with_core(|c| c.store().checks(None)) {
        let count = |state: store::CheckState| checks.iter().filter(|c| c.state == state).count();
        println!(
            "
spot-checks: {} units re-run by the coordinator, {} the same bits as sent, {} found false (credit clawed back); {} waiting, {} not sampled",
            count(store::CheckState::Verified) + count(store::CheckState::Failed),
            count(store::CheckState::Verified),
            count(store::CheckState::Failed),
            count(store::CheckState::Queued),
            count(store::CheckState::Unchecked),
        );
    }
    // The volunteer who earned most spends some of it.
    let richest = server
        .with_core(|c| c.leaderboard())
        .ok()
        .and_then(|rows| rows.into_iter().next())
        .and_then(|row| row.name.strip_prefix("volunteer-").map(str::to_owned));
    if let Some(i) = richest {
        let key = dir.join("keys").join(format!("worker-{i}.key"));
        let asked = Asked {
            prompt: &prompt,
            finetune: args.finetune,
            version: printed,
        };
        if let Err(e) = spend_and_share(&server, &url, &format!("volunteer-{i}"), &key, &asked) {
            println!("\n(no query: {e:#})");
        }
    }
    server.stop();
    if args.finetune {
        println!(
            "\n{printed} versions in {:.0} s: holdout loss on the answers {:.4} -> {:.4}; {} tokens trained, {:.2} MB of adapter updates sent",
            started.elapsed().as_secs_f64(),
            first.unwrap_or(f32::NAN),
            last_loss,
            total_tokens,
            total_bytes as f64 / 1e6
        );
        return Ok(());
    }

    let model = crate::model::load_version(&dir, None)?;
    println!(
        "\n{} versions in {:.0} s: holdout loss {:.4} -> {:.4}; {} tokens trained, {:.2} MB of updates sent",
        model.row.version,
        started.elapsed().as_secs_f64(),
        first.unwrap_or(f32::NAN),
        model.row.holdout_loss,
        total_tokens,
        total_bytes as f64 / 1e6
    );
    if args.sample_tokens > 0 {
        let mut backend =
            engine::open_backend("cpu", model.checkpoint.config, model.checkpoint.params)?;
        let text = sample(
            backend.as_mut(),
            &model.tokenizer,
            &prompt,
            args.sample_tokens,
        )?;
        println!(
            "\nsample of version {}:\n{}{}",
            model.row.version, prompt, text
        );
    }
    if args.dir.is_some() {
        println!(
            "\nthe run is kept in {}: `hivetrain model list --run {}`",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// What the volunteer asks at the end.
struct Asked<'a> {
    prompt: &'a str,
    /// Ask the base (version 0) and the newest version the same chat question.
    finetune: bool,
    /// The newest version.
    version: u64,
}

/// The loop closes: a volunteer spends some of its credit on the model through the
/// OpenAI-compatible API (real HTTP, its own API key), and the revenue is paid out to the
/// volunteers as dividends, in proportion to what each earned.
fn spend_and_share(
    server: &Coordinator,
    url: &str,
    name: &str,
    key_path: &std::path::Path,
    asked: &Asked<'_>,
) -> anyhow::Result<()> {
    let remote = crate::wallet::Remote {
        coordinator: url.to_owned(),
        key: Some(key_path.to_owned()),
    };
    let api_key = crate::query::TemporaryKey::make(&remote)?;
    let client = reqwest::blocking::Client::new();
    if asked.finetune {
        println!(
            "\n{name} asks the same question before and after, through POST /v1/chat/completions:\n\n{}",
            asked.prompt
        );
        for (label, model) in [
            ("the base (version 0)".to_owned(), "hivetrain-v0".to_owned()),
            (
                format!("the fine-tuned model (version {})", asked.version),
                format!("hivetrain-v{}", asked.version),
            ),
        ] {
            let reply = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&api_key.key)
                .json(&serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": asked.prompt}],
                    "max_tokens": 60,
                    "temperature": 0,
                }))
                .send()?;
            let charged = charged(&reply);
            let body: serde_json::Value = crate::wallet::read(reply, "query")?;
            println!(
                "\n{label}, answered as {}, {} credits ({} tokens):\n{}",
                body["model"].as_str().unwrap_or("?"),
                ledger::format_credits(charged.unwrap_or(0)),
                body["usage"]["total_tokens"],
                body["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
            );
        }
    } else {
        let reply = client
            .post(format!("{url}/v1/completions"))
            .bearer_auth(&api_key.key)
            .json(&serde_json::json!({
                "model": "hivetrain",
                "prompt": asked.prompt,
                "max_tokens": 24,
                "temperature": 0.8,
                "seed": 1,
            }))
            .send()?;
        let charged = charged(&reply);
        let body: serde_json::Value = crate::wallet::read(reply, "query")?;
        println!(
            "\n{name} asks the model through POST /v1/completions and pays {} credits ({} tokens):\n{}{}",
            ledger::format_credits(charged.unwrap_or(0)),
            body["usage"]["total_tokens"],
            asked.prompt,
            body["choices"][0]["text"].as_str().unwrap_or_default()
        );
    }
    let paid = server.with_core(|c| c.pay_dividends(coordinator::system_ms()));
    let paid = paid.map_err(|e| anyhow::anyhow!("{e}"))?;
    let board = server
        .with_core(|c| c.leaderboard())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("\ndividends: the revenue paid back to {paid} volunteers; balances now:");
    for row in board {
        let dividends = server.with_core(|c| {
            protocol::WorkerId::parse(&row.wallet).map_or(0, |w| c.wallet(w, Some(0)).dividends)
        });
        println!(
            "  {:<12} {:>12} credits (dividends {})",
            row.name,
            ledger::format_credits(row.balance),
            ledger::format_credits(dividends)
        );
    }
    Ok(())
}

/// The credits a reply says it charged.
fn charged(reply: &reqwest::blocking::Response) -> Option<u64> {
    reply
        .headers()
        .get("x-hivetrain-charged")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// `tokens` tokens sampled after `prompt` (temperature 0.8, top-k 40, top-p 0.95, seed 0):
/// the sample both demos print.
pub(crate) fn sample(
    backend: &mut dyn engine::Backend,
    tokenizer: &data::TextTokenizer,
    prompt: &str,
    tokens: usize,
) -> anyhow::Result<String> {
    let prompt_ids = tokenizer.encode(prompt)?;
    let mut ids = Vec::new();
    engine::generate::generate(
        backend,
        &prompt_ids,
        tokens,
        &SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 0,
        },
        &mut |id| {
            ids.push(id);
            true
        },
    )?;
    Ok(tokenizer.decode(&ids))
}
