//! `hivetrain model export --base --adapter --out` (a PEFT adapter directory and its
//! manifest entry) and `hivetrain model merge` (an HF `LlamaForCausalLM` directory of a
//! base with or without an adapter merged in), over `models::export`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use models::Pretrained;
use models::export::{ADAPTER_CONFIG_FILE, Adapter};
use models::manifest::{AdapterEntry, AdapterManifest};

/// Where an adapter comes from. (A coordinator run's version is the next source.)
#[derive(Clone, Debug)]
pub(crate) enum AdapterSource {
    /// An `adapter_model.safetensors` hivetrain wrote (`trained_to_bytes` of a LoRA
    /// spec: the spec, the base's sha256 and the version in its metadata).
    File(PathBuf),
    /// A PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    PeftDir(PathBuf),
    /// A version of a LoRA fine-tune's run (its checkpoint is the adapter file); the
    /// newest when none.
    Run { run: PathBuf, version: Option<u64> },
}

impl AdapterSource {
    /// A directory is a PEFT directory, a file hivetrain's adapter file.
    pub(crate) fn from_path(path: &Path) -> AdapterSource {
        if path.is_dir() {
            AdapterSource::PeftDir(path.to_owned())
        } else {
            AdapterSource::File(path.to_owned())
        }
    }

    fn path(&self) -> &Path {
        match self {
            AdapterSource::File(p) | AdapterSource::PeftDir(p) => p,
            AdapterSource::Run { run, .. } => run,
        }
    }
}

/// The sha256 of the file that names `base` (a GGUF file, or an HF directory's
/// model.safetensors).
fn base_sha256(base: &Pretrained) -> anyhow::Result<String> {
    let file = models::export::base_weights_file(&base.path);
    models::export::sha256_file(&file)
        .with_context(|| format!("hashing the base {}", file.display()))
}

/// Reads the adapter of `source` for `base`, refusing one that records another base's
/// sha256. The adapter returned records `base`'s sha256.
pub(crate) fn load_adapter(source: &AdapterSource, base: &Pretrained) -> anyhow::Result<Adapter> {
    let mut adapter = match source {
        AdapterSource::File(path) => {
            if path.file_name().is_some_and(|n| n == ADAPTER_CONFIG_FILE) {
                bail!(
                    "--adapter {}: give the PEFT directory that holds it, or an adapter_model.safetensors",
                    path.display()
                );
            }
            models::export::read_adapter_file(path, &base.config)?
        }
        AdapterSource::PeftDir(dir) => models::export::read_peft_dir(dir, &base.config)?,
        AdapterSource::Run { run, version } => {
            let (bytes, version) = crate::model::version_bytes(run, *version)?;
            let dir = tempfile::tempdir().context("making a temporary directory")?;
            let path = dir
                .path()
                .join(format!("version-{version}-adapter_model.safetensors"));
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            models::export::read_adapter_file(&path, &base.config).with_context(|| {
                format!(
                    "version {version} of the run in {} is not a LoRA adapter",
                    run.display()
                )
            })?
        }
    };
    let sha = base_sha256(base)?;
    adapter.check_base(source.path(), &sha)?;
    adapter.base_sha256 = Some(sha);
    Ok(adapter)
}

#[derive(Debug, clap::Args)]
pub(crate) struct MergeArgs {
    /// The base model: `smollm2` (the cached SmolLM2-135M-Instruct GGUF), a Llama `.gguf`
    /// file, or an HF Llama directory.
    #[arg(long)]
    base: String,
    /// The LoRA adapter to merge in (`W + alpha/r B A`): an adapter_model.safetensors
    /// hivetrain wrote, or a PEFT adapter directory. Without one the base itself is
    /// written.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The HF directory to write (config.json, model.safetensors in float32,
    /// tokenizer.json, tokenizer_config.json with the chat template,
    /// generation_config.json). It must be new, empty, or a directory this command wrote.
    #[arg(long)]
    out: PathBuf,
}

pub(crate) fn merge(args: MergeArgs) -> anyhow::Result<()> {
    let base = crate::pretrained::load_named("--base", &args.base, None)?;
    let adapter = match &args.adapter {
        Some(path) => Some(load_adapter(&AdapterSource::from_path(path), &base)?),
        None => None,
    };
    models::export::write_hf_dir(&args.out, &base, adapter.as_ref())?;
    match &adapter {
        Some(a) => println!(
            "merged the adapter {} (rank {}, alpha {}) into {} and wrote {} (load with LlamaForCausalLM.from_pretrained)",
            args.adapter.as_deref().unwrap_or(Path::new("")).display(),
            a.lora.rank,
            a.lora.alpha,
            base.path.display(),
            args.out.display()
        ),
        None => println!(
            "wrote {} as {} (load with LlamaForCausalLM.from_pretrained)",
            base.path.display(),
            args.out.display()
        ),
    }
    Ok(())
}

/// The adapter half of `model export`.
pub(crate) struct AdapterExport {
    pub(crate) base: String,
    pub(crate) adapter: AdapterSource,
    pub(crate) out: PathBuf,
    pub(crate) name: Option<String>,
    pub(crate) manifest: Option<PathBuf>,
}

/// Writes the PEFT directory and adds or replaces its manifest entry.
pub(crate) fn export_adapter(args: AdapterExport) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("--out has no final component to name the adapter by; give --name")?,
    };
    if !models::manifest::valid_name(&name) {
        return Err(models::manifest::ManifestError::BadName(name).into());
    }
    let manifest_path = match &args.manifest {
        Some(p) => p.clone(),
        None => args
            .out
            .parent()
            .unwrap_or(Path::new("."))
            .join("manifest.json"),
    };
    // Read the manifest first: a bad one stops the export before anything is written.
    let mut manifest = AdapterManifest::read(&manifest_path)?;
    let base = crate::pretrained::load_named("--base", &args.base, None)?;
    let adapter = load_adapter(&args.adapter, &base)?;
    let sha = adapter.base_sha256.clone().unwrap_or_default();
    models::export::write_peft_dir(
        &args.out,
        &base.name,
        &base.config,
        &adapter,
        &base.path.display().to_string(),
    )?;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut targets: Vec<String> = adapter
        .lora
        .targets
        .iter()
        .map(|t| models::export::peft_module(*t).to_owned())
        .collect();
    targets.sort();
    manifest.upsert(AdapterEntry {
        name: name.clone(),
        base_sha256: sha.clone(),
        version: adapter.version,
        path: args.out.display().to_string(),
        rank: adapter.lora.rank,
        alpha: adapter.lora.alpha,
        targets,
        created: models::manifest::rfc3339_utc(now_s),
    })?;
    manifest.write(&manifest_path).with_context(|| {
        format!(
            "the adapter is written to {}, but the manifest {} is not updated",
            args.out.display(),
            manifest_path.display()
        )
    })?;
    println!(
        "exported adapter {name} (rank {}, alpha {}, {}) for base {} (sha256 {sha}) to {}; manifest {}",
        adapter.lora.rank,
        adapter.lora.alpha,
        models::export::peft_adapter_config(&adapter.lora, "")["target_modules"],
        base.path.display(),
        args.out.display(),
        manifest_path.display()
    );
    println!(
        "load with: PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(BASE_HF_DIR), {:?}); `hivetrain model merge --base {}` writes BASE_HF_DIR",
        args.out.display().to_string(),
        args.base
    );
    Ok(())
}
