//! hivetrain's command line: thin subcommands over the `engine` and `data` crates.

mod coordinator;
mod demo;
mod env;
mod export;
mod generate;
mod model;
mod model_export;
mod p2p_demo;
mod paths;
mod peer;
mod peer_dashboard;
mod pretrained;
mod query;
mod tokenizer;
mod train;
mod wallet;
mod worker;

use clap::{Parser, Subcommand};

/// Train open language models on volunteered computers: a coordinator leases work, the
/// workers train and send signed updates, every update is checked before it counts, and
/// the credit it earns buys use of the model.
#[derive(Debug, Parser)]
#[command(
    name = "hivetrain",
    version,
    after_help = "Start here:
  hivetrain demo                        the whole network on this machine, about 5 minutes
  hivetrain coordinator --print-config  the settings a run would use (then drop the flag to serve it)
  hivetrain worker --coordinator URL    lend this machine to someone's run
  hivetrain peer join TICKET            join a run with no coordinator
  hivetrain wallet balance              the credit your work has earned
  hivetrain query \"PROMPT\"              ask the model, paying with that credit
  hivetrain model chat \"PROMPT\"         ask SmolLM2-135M-Instruct, fetched once and run here

Each command's --help says more."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole network on this machine: a coordinator and volunteer workers over
    /// HTTP on loopback train one GPT on Shakespeare, then print a sample.
    Demo(demo::DemoArgs),
    /// Serve a training run: lease work units, validate and aggregate updates.
    Coordinator(coordinator::CoordinatorArgs),
    /// Lend this machine to a coordinator: train work units, send signed updates.
    Worker(worker::WorkerArgs),
    /// The model versions of a coordinator's run (list, export, prune), pretrained
    /// models (fetch, info, chat), and LoRA adapters (export to PEFT, merge).
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Train a GPT on a corpus and print a sample (the default trains the `small` model
    /// on Shakespeare for a few minutes on a laptop).
    Train(train::TrainArgs),
    /// Generate text from a trained model.
    Generate(generate::GenerateArgs),
    /// Train, inspect or use a BPE tokenizer.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Export a trained model for HF transformers (`GPT2LMHeadModel`).
    Export(export::ExportArgs),
    /// Your credit: balance, history, transfers, dividends.
    #[command(subcommand)]
    Wallet(wallet::WalletCommand),
    /// Contributors by credit earned.
    Leaderboard(wallet::Remote),
    /// Network totals: workers, updates, tokens, credit.
    Stats(wallet::Remote),
    /// Ask the model, paying with your credit: one prompt, or an interactive chat.
    Query(query::QueryArgs),
    /// Serve a stopped run's model and ledger (OpenAI-compatible API), without training.
    Serve(query::ServeArgs),
    /// Check or export the credit ledger.
    #[command(subcommand)]
    Ledger(wallet::LedgerCommand),
    /// A run with no coordinator, one peer a process: print your key, make a run's
    /// ticket, or join a run from its ticket.
    #[command(subcommand)]
    Peer(peer::PeerCommand),
    /// Serve a relay for peers that NATs keep apart (anyone can run one).
    Relay(peer::RelayArgs),
}

/// Parses the command line and runs it; errors are printed with their causes.
/// Logs (the `tracing` events of the coordinator) to standard error, filtered by
/// `RUST_LOG` (e.g. `RUST_LOG=debug`, `RUST_LOG=coordinator=warn`), else by `default`.
fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // A coordinator logs a line per accepted or refused update and per re-run; the other
    // commands (the demo included, whose table is its output) only warnings and errors.
    // Malachite warns of routine events (each rebroadcast of a peer's votes while a
    // height goes on, a message of another height): its errors only.
    let default = match cli.command {
        Command::Coordinator(_) | Command::Serve(_) | Command::Relay(_) => {
            "info,informalsystems_malachitebft_core_consensus=error"
        }
        _ => "warn,informalsystems_malachitebft_core_consensus=error",
    };
    init_logs(default);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Model(command) => model::run(command),
        Command::Train(args) => train::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Tokenizer(command) => tokenizer::run(command),
        Command::Export(args) => export::run(args),
        Command::Wallet(command) => wallet::run_wallet(command),
        Command::Leaderboard(remote) => wallet::leaderboard(remote),
        Command::Stats(remote) => wallet::stats(remote),
        Command::Ledger(command) => wallet::run_ledger(command),
        Command::Query(args) => query::query(args),
        Command::Serve(args) => query::serve(args),
        Command::Peer(command) => peer::run(command),
        Command::Relay(args) => peer::relay(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap's own checks of every command, argument and default (conflicting names,
    /// defaults that do not parse, ...), and a first screen that says where to start.
    #[test]
    fn the_command_line_is_well_formed_and_says_where_to_start() {
        let mut command = Cli::command();
        command.clone().debug_assert();
        let help = command.render_help().to_string();
        assert!(help.contains("hivetrain demo"), "{help}");
        assert!(help.contains("volunteered computers"), "{help}");
    }
}
