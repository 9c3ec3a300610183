//! `cargo xtask bench decode`: greedy decoding tokens/s of the inference endpoint (HTTP,
//! the real coordinator) and of the engine in-process, against PyTorch decoding from
//! the same weights and prompt in the same run. The tokens must match.
//!
//! `--model gpt2` (the default) decodes a fresh run's GPT-2 preset, in-process and
//! through `POST /v1/completions`. With `--device cuda` either model decodes on the GPU
//! against PyTorch on the same GPU in the same precision (bf16, or f32 with
//! `--gpu-f32`), including transformers' compiled static-cache `generate`. `--model smollm2` decodes the cached
//! SmolLM2-135M-Instruct (its GGUF dequantized to f32, the weights HF gets too, as
//! safetensors) from a ChatML prompt, in-process and through `POST /v1/chat/completions`
//! of a LoRA fine-tune run of it at version 0 (the adapter's B is zero, so its answers
//! are the base's).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};
use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::{Signer, SigningKey};
use engine::generate::SamplingParams;
use protocol::WorkerId;

/// Which model the benchmark decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DecodeModel {
    /// A GPT-2 preset's fresh weights (`--preset`, `--seed`).
    Gpt2,
    /// SmolLM2-135M-Instruct from the model cache (`hivetrain model fetch smollm2`).
    Smollm2,
}

/// SmolLM2's chat prompt: this user message in its ChatML template (with the template's
/// default system message, about 40 tokens in all).
const SMOLLM2_USER: &str =
    "Write a short story about a lighthouse keeper who finds a message in a bottle.";
/// The context SmolLM2 is loaded with: the KV cache of prompt and new tokens fits.
const SMOLLM2_CONTEXT: usize = 1024;

#[derive(Debug, clap::Args)]
pub(crate) struct DecodeBench {
    /// The model to decode.
    #[arg(long, value_enum, default_value = "gpt2")]
    model: DecodeModel,
    /// Model preset of `--model gpt2` (its weights: version 0 of a fresh run with `--seed`).
    #[arg(long, default_value = "small")]
    preset: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tokens to generate (prompt and tokens must fit the preset's context).
    #[arg(long, default_value_t = 120)]
    tokens: usize,
    /// The prompt (`--model gpt2`, default "KING HENRY:\n"), or the user message of the
    /// chat prompt (`--model smollm2`, default a request for a short story).
    #[arg(long)]
    prompt: Option<String>,
    /// Threads of each side.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed repeats of each side (the best is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Python with torch and transformers.
    #[arg(long, default_value = "python3")]
    python: String,
    /// hivetrain's device (default `cpu:THREADS`). With `cuda` the engine decodes on the
    /// GPU in bf16 against PyTorch on the same GPU in bf16: the table says how many of
    /// the tokens match (bf16 rounding may turn a near tie), and the endpoint (which
    /// serves on the CPU) is skipped.
    #[arg(long)]
    device: Option<String>,
    /// With `--device cuda:N`: decode in f32 on the GPU (f32 activations, true f32
    /// products) instead of bf16, the training precision, against PyTorch in f32 on the
    /// same GPU.
    #[arg(long)]
    gpu_f32: bool,
}

pub(crate) fn run(root: &Path, args: DecodeBench) -> anyhow::Result<()> {
    ensure!(
        args.tokens > 0 && args.repeat > 0,
        "--tokens and --repeat must be at least 1"
    );
    match args.model {
        DecodeModel::Gpt2 => gpt2(root, args),
        DecodeModel::Smollm2 => smollm2(root, args),
    }
}

/// Greedy sampling.
const GREEDY: SamplingParams = SamplingParams {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
    seed: 0,
};

/// The engine's KV-cache generation in-process, as the endpoint runs it: the tokens and
/// the best tokens/s of `repeat` timed runs after an untimed one.
fn in_process(
    backend: &mut dyn engine::Backend,
    prompt: &[u32],
    tokens: usize,
    repeat: usize,
) -> anyhow::Result<(Vec<u32>, f64)> {
    let mut ours = Vec::new();
    let mut best = 0.0f64;
    for i in 0..=repeat {
        let started = Instant::now();
        ours = engine::generate::generate(backend, prompt, tokens, &GREEDY, &mut |_| true)?;
        let rate = ours.len() as f64 / started.elapsed().as_secs_f64();
        if i > 0 {
            best = best.max(rate);
        }
    }
    Ok((ours, best))
}

/// Runs scripts/torch_decode.py on `dir` and compares its tokens (each way it decodes)
/// with `ours`: with `strict`, any difference is an error; otherwise how many of the
/// first match is reported. Returns its JSON line.
fn torch_side_matching(
    python: &str,
    root: &Path,
    dir: &Path,
    ours: &[u32],
    strict: bool,
) -> anyhow::Result<serde_json::Value> {
    let stdout = crate::bench::run_python(python, root, "torch_decode.py", dir)?;
    let mut torch: serde_json::Value =
        serde_json::from_slice(&stdout).context("the PyTorch script printed no JSON line")?;
    let mut all_match = true;
    let tokens = |name: &str| -> Vec<u32> {
        torch[name]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_u64().map(|t| t as u32))
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in ["generate_tokens", "loop_tokens", "compiled_tokens"] {
        if torch.get(name).is_none() {
            continue;
        }
        let theirs = tokens(name);
        let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        if !strict {
            all_match &= theirs == ours;
            println!(
                "PyTorch's {name}: the first {same} of {} tokens equal hivetrain's{}",
                ours.len(),
                if theirs == ours { " (all)" } else { "" }
            );
            continue;
        }
        ensure!(
            theirs == ours,
            "PyTorch's {name} differ from hivetrain's at token {same} of {}",
            ours.len()
        );
    }
    torch["all_match"] = serde_json::Value::Bool(all_match);
    Ok(torch)
}

/// PyTorch's ways of decoding that scripts/torch_decode.py times: its JSON key and the
/// table's name. The compiled one runs on a GPU only.
const TORCH_WAYS: [(&str, &str); 3] = [
    ("generate", "PyTorch transformers generate"),
    ("loop", "PyTorch loop with past_key_values"),
    (
        "compiled",
        "PyTorch generate, static cache (transformers compiles it)",
    ),
];

/// The table: each side's tokens/s and its ratio to PyTorch's fastest way.
fn print_table(torch: &serde_json::Value, n_tokens: usize, repeat: usize, ours: &[(&str, f64)]) {
    let rate = |way: &str| torch[format!("{way}_tokens_per_s")].as_f64();
    let (best_way, peer) = TORCH_WAYS
        .iter()
        .filter_map(|&(way, _)| Some((way, rate(way)?)))
        .fold(("?", f64::NAN), |best, (way, r)| {
            if best.1.is_nan() || r > best.1 {
                (way, r)
            } else {
                best
            }
        });
    println!(
        "{}: hivetrain and PyTorch ({} {best_way}, transformers {}, {} {}) give the same {} greedy tokens",
        if torch["all_match"].as_bool() == Some(false) {
            "tokens DIFFER (counts above); NOT"
        } else {
            "tokens match"
        },
        torch["torch"].as_str().unwrap_or("?"),
        torch["transformers"].as_str().unwrap_or("?"),
        torch["device"].as_str().unwrap_or("cpu"),
        torch["dtype"].as_str().unwrap_or("torch.float32"),
        n_tokens
    );
    if let Some(why) = torch["compiled_error"].as_str() {
        println!("PyTorch's static-cache decoding did not run: {why}");
    }
    if torch["compiled_auto"] == false {
        println!("PyTorch's static-cache generate ran without compiling");
    }
    println!("| side | tokens/s (best of {repeat}) | vs PyTorch |");
    println!("|---|---|---|");
    for (side, rate) in ours {
        println!("| {side} | {rate:.1} | {:.2}x |", rate / peer);
    }
    for (way, name) in TORCH_WAYS {
        if let Some(r) = rate(way) {
            println!("| {name} | {r:.1} | {:.2}x |", r / peer);
        }
    }
}

/// Where and in what PyTorch decodes (decode.json's "device" and "dtype"): on the GPU
/// in hivetrain's precision when hivetrain decodes on one, else on the CPU in f32.
fn torch_placement(on_gpu: bool, gpu_f32: bool) -> (&'static str, &'static str) {
    match (on_gpu, gpu_f32) {
        (false, _) => ("cpu", "float32"),
        (true, true) => ("cuda", "float32"),
        (true, false) => ("cuda", "bfloat16"),
    }
}

/// `--model smollm2`: SmolLM2-135M-Instruct in-process against HF on the same f32 weights.
fn smollm2(root: &Path, args: DecodeBench) -> anyhow::Result<()> {
    let path = models::smollm2::fetch::ensure_gguf().context("fetching SmolLM2-135M-Instruct")?;
    let model = models::load_gguf(&path, Some(SMOLLM2_CONTEXT))?;
    let user = args.prompt.as_deref().unwrap_or(SMOLLM2_USER);
    let text = model.chat_prompt(&[models::ChatMessage::user(user)])?;
    let prompt = model.encode(&text)?;
    ensure!(
        prompt.len() + args.tokens <= SMOLLM2_CONTEXT,
        "{} prompt tokens + {} new exceed the context of {SMOLLM2_CONTEXT}",
        prompt.len(),
        args.tokens,
    );
    let spec = model.spec();
    println!(
        "{} ({} parameters, f32), ChatML prompt {text:?} ({} tokens), {} greedy tokens, {} thread(s)",
        model.name,
        model.params.len(),
        prompt.len(),
        args.tokens,
        args.threads
    );
    let device = crate::bench::device_or_cpu(args.device.as_deref(), args.threads);
    let on_gpu = device.starts_with("cuda");
    let mut backend = match engine::resolve_device(&device)? {
        engine::Device::Cuda { ordinal } if args.gpu_f32 => {
            Box::new(engine::cuda::LlamaCuda::open_with(
                model.config,
                &model.params,
                ordinal,
                engine::Purpose::Eval,
                engine::cuda::Precision::F32,
            )?) as Box<dyn engine::Backend>
        }
        _ => engine::open_model(&device, &spec, model.params.clone(), engine::Purpose::Eval)?,
    };
    println!("hivetrain decodes on {}", backend.device());
    let (ours, rate) = in_process(backend.as_mut(), &prompt, args.tokens, args.repeat)?;
    drop(backend);
    let endpoint = if on_gpu {
        None
    } else {
        Some(smollm2_endpoint(
            root, &args, &path, &model, &prompt, &ours,
        )?)
    };

    // HF: the same dequantized weights under their HF names, and the engine's config.
    let (torch_device, torch_dtype) = torch_placement(on_gpu, args.gpu_f32);
    let temp = tempfile::tempdir()?;
    let dir = temp.path();
    crate::lora_bench::save_safetensors(&dir.join("model.safetensors"), &spec, &model.params)?;
    std::fs::write(
        dir.join("decode.json"),
        serde_json::to_string(&serde_json::json!({
            "llama": model.config,
            "prompt": prompt,
            "tokens": args.tokens,
            "threads": args.threads,
            "repeat": args.repeat,
            "device": torch_device,
            "dtype": torch_dtype,
        }))?,
    )?;
    let torch = torch_side_matching(&args.python, root, dir, &ours, !on_gpu)?;
    println!("text: {:?}", model.decode(&ours)?);
    let mut sides = vec![("hivetrain in-process", rate)];
    if let Some(endpoint) = endpoint {
        sides.push(("hivetrain endpoint (HTTP, LoRA v0)", endpoint));
    }
    print_table(&torch, ours.len(), args.repeat, &sides);
    Ok(())
}

/// The endpoint's side of `--model smollm2`: a coordinator serving a rank-8 LoRA
/// fine-tune of the GGUF at `path` (version 0, whose adapter adds zero), asked the same
/// chat greedily for as many tokens as the engine made in-process. Fails unless its
/// prompt is the same `prompt` tokens and its answer is the text of `ours` up to the
/// first stop token; returns the best tokens/s.
fn smollm2_endpoint(
    root: &Path,
    args: &DecodeBench,
    path: &Path,
    model: &models::Pretrained,
    prompt: &[u32],
    ours: &[u32],
) -> anyhow::Result<f64> {
    let temp = tempfile::tempdir()?;
    let mut config = CoordinatorConfig {
        seed: args.seed,
        corpus: root.join("data/shakespeare-chat.jsonl"),
        tokenizer: root.join("data/tokenizer.json"),
        seq: 256,
        batch: 2,
        holdout_batches: 1,
        finetune: Some(coordinator::config::FinetuneConfig {
            base: path.to_owned(),
            lora: Some(engine::LoraConfig {
                rank: 8,
                alpha: 16.0,
                targets: engine::LoraTarget::ALL.to_vec(),
            }),
            data: protocol::api::DataFormat::Chat,
        }),
        ..CoordinatorConfig::default()
    };
    serve_free(&mut config, args.threads);
    let server = Coordinator::start(&temp.path().join("store"), config, "127.0.0.1:0")
        .context("starting the coordinator")?;
    let url = server.url();
    let client = reqwest::blocking::Client::new();
    let n_params = server.with_core(|c| c.params().len());
    let api_key = api_key(&client, &url, n_params)?;
    let user = args.prompt.as_deref().unwrap_or(SMOLLM2_USER);
    let body = serde_json::json!({
        "model": "hivetrain",
        "messages": [{"role": "user", "content": user}],
        "max_tokens": ours.len(),
        "temperature": 0,
    });
    let timed = time_endpoint(
        &client,
        &format!("{url}/v1/chat/completions"),
        &api_key,
        &body,
        args.repeat,
    );
    server.stop();
    let (rate, reply) = timed?;
    // The endpoint stops before a stop token; the engine's loop ran on.
    let vocab = inference::PretrainedVocab::new(model)?;
    let stops = inference::Vocab::stop_tokens(&vocab);
    let answered: Vec<u32> = ours
        .iter()
        .copied()
        .take_while(|t| !stops.contains(t))
        .collect();
    let want = inference::Vocab::decode(&vocab, &answered);
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .with_context(|| format!("no answer in {reply}"))?;
    ensure!(
        reply["usage"]["prompt_tokens"] == prompt.len()
            && reply["usage"]["completion_tokens"] == answered.len()
            && text == want,
        "the endpoint's answer differs from the engine's {} prompt and {} answer tokens:\n{reply}\n{want:?}",
        prompt.len(),
        answered.len()
    );
    println!(
        "the endpoint ({}) answered the engine's {} tokens",
        reply["model"].as_str().unwrap_or("?"),
        answered.len()
    );
    Ok(rate)
}

/// Serving settings of a benchmark's coordinator: free, unthrottled, `threads` threads;
/// made-up updates accepted (no scoring, no re-runs, fp32), and two of them needed for a
/// round, so the one [`api_key`] sends leaves version 0 served.
fn serve_free(config: &mut CoordinatorConfig, threads: usize) {
    *config = test_support::hand_made(config.clone());
    config.schedule.min_updates = 2;
    config.schedule.units_per_round = 3;
    config.serving.price_prompt_token = 0;
    config.serving.price_output_token = 0;
    config.devices.serving = format!("cpu:{}", threads.max(1));
    config.serving.requests_per_minute = 10_000;
}

/// An API key for a fixed wallet on the coordinator at `url`. A key is given only to a
/// wallet that holds credit, so the wallet first earns some: it registers, leases a unit
/// and sends a made-up update of the run's `n_params` floats, which [`serve_free`]'s
/// settings accept without training (and, one update short of a round, leave version 0
/// served).
fn api_key(
    client: &reqwest::blocking::Client,
    url: &str,
    n_params: usize,
) -> anyhow::Result<String> {
    let key = SigningKey::from_bytes(&[5; 32]);
    test_support::register(url, &key, "decode-bench");
    let unit = test_support::lease(url, &key);
    let accepted = test_support::submit_crafted(url, &key, &unit, n_params);
    ensure!(
        accepted.status == 200,
        "the made-up update was refused: {accepted:?}"
    );
    let challenge: serde_json::Value = client
        .get(format!("{url}/v1/keys/challenge"))
        .send()?
        .json()?;
    let message = challenge["message"].as_str().context("challenge")?;
    let issued: serde_json::Value = client
        .post(format!("{url}/v1/keys"))
        .json(&serde_json::json!({
            "wallet": WorkerId::of(&key).to_string(),
            "challenge": challenge["challenge"],
            "signature": hex::encode(key.sign(message.as_bytes()).to_bytes()),
        }))
        .send()?
        .json()?;
    let api_key = issued["api_key"].as_str();
    Ok(api_key
        .with_context(|| format!("no API key in {issued}"))?
        .to_owned())
}

/// `POST endpoint` with `body`, `repeat` timed times after an untimed one: the best
/// tokens/s (by the reply's `usage.completion_tokens`) and the last reply.
fn time_endpoint(
    client: &reqwest::blocking::Client,
    endpoint: &str,
    api_key: &str,
    body: &serde_json::Value,
    repeat: usize,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let mut best = 0.0f64;
    let mut reply = serde_json::Value::Null;
    for i in 0..=repeat {
        let started = Instant::now();
        reply = client
            .post(endpoint)
            .bearer_auth(api_key)
            .json(body)
            .send()?
            .json()?;
        let secs = started.elapsed().as_secs_f64();
        let n = reply["usage"]["completion_tokens"]
            .as_u64()
            .with_context(|| format!("no usage in {reply}"))?;
        if i > 0 {
            best = best.max(n as f64 / secs);
        }
    }
    Ok((best, reply))
}

/// `--model gpt2`: a GPT-2 preset in-process and through the endpoint.
fn gpt2(root: &Path, args: DecodeBench) -> anyhow::Result<()> {
    let prompt_text = args
        .prompt
        .clone()
        .unwrap_or_else(|| "KING HENRY:\n".into());
    let temp = tempfile::tempdir()?;
    let mut config = CoordinatorConfig {
        preset: args.preset.clone(),
        seed: args.seed,
        corpus: root.join("data/shakespeare.txt"),
        tokenizer: root.join("data/tokenizer.json"),
        holdout_batches: 1,
        ..CoordinatorConfig::default()
    };
    serve_free(&mut config, args.threads);
    let server = Coordinator::start(&temp.path().join("store"), config, "127.0.0.1:0")
        .context("starting the coordinator")?;
    let url = server.url();
    let (spec, params) = server
        .with_core(|c| {
            let snapshot = c.reads().snapshot("hivetrain");
            snapshot.map(|s| (s.model.spec.clone(), s.params.to_vec()))
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let model = *spec.gpt_config("the decode benchmark")?;
    let tokenizer = data::TextTokenizer::load(&root.join("data/tokenizer.json"))?;
    let prompt = tokenizer.encode(&prompt_text)?;
    ensure!(
        prompt.len() + args.tokens <= model.n_ctx,
        "{} prompt tokens + {} new exceed the {} preset's context of {}",
        prompt.len(),
        args.tokens,
        args.preset,
        model.n_ctx
    );
    println!(
        "{} preset ({} parameters), prompt {:?} ({} tokens), {} greedy tokens, {} thread(s)",
        args.preset,
        params.len(),
        prompt_text,
        prompt.len(),
        args.tokens,
        args.threads
    );

    let device = crate::bench::device_or_cpu(args.device.as_deref(), args.threads);
    let on_gpu = device.starts_with("cuda");
    let mut backend = match engine::resolve_device(&device)? {
        engine::Device::Cuda { ordinal } if args.gpu_f32 => Box::new(engine::cuda::Gpt2Cuda::open(
            model,
            &params,
            ordinal,
            engine::cuda::Precision::F32,
            engine::Purpose::Eval,
        )?) as Box<dyn engine::Backend>,
        _ => engine::open_model(&device, &spec, params.clone(), engine::Purpose::Eval)?,
    };
    println!("hivetrain decodes on {}", backend.device());
    let (ours, in_process) = in_process(backend.as_mut(), &prompt, args.tokens, args.repeat)?;
    drop(backend);

    // The endpoint (on the CPU): POST /v1/completions over loopback, paid by a wallet's
    // API key.
    let endpoint = if on_gpu {
        server.stop();
        None
    } else {
        let client = reqwest::blocking::Client::new();
        let api_key = api_key(&client, &url, params.len())?;
        let body = serde_json::json!({
            "model": "hivetrain",
            "prompt": prompt_text,
            "max_tokens": args.tokens,
            "temperature": 0,
        });
        let timed = time_endpoint(
            &client,
            &format!("{url}/v1/completions"),
            &api_key,
            &body,
            args.repeat,
        );
        server.stop();
        let (endpoint, reply) = timed?;
        let endpoint_text = reply["choices"][0]["text"].as_str().unwrap_or_default();
        let ours_text = tokenizer.decode(&ours);
        ensure!(
            ours_text.starts_with(endpoint_text),
            "the endpoint's text differs from the engine's:\n{endpoint_text:?}\n{ours_text:?}"
        );
        println!("the endpoint's text is the engine's");
        Some(endpoint)
    };

    // PyTorch: the same weights through an HF export.
    let (torch_device, torch_dtype) = torch_placement(on_gpu, args.gpu_f32);
    let dir = temp.path().join("hf");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&engine::checkpoint::hf_config_json(
            &model,
            tokenizer.end_of_text(),
        ))?,
    )?;
    engine::checkpoint::save(
        &dir.join("model.safetensors"),
        &model,
        &params,
        &Default::default(),
    )?;
    std::fs::write(
        dir.join("decode.json"),
        serde_json::to_string(&serde_json::json!({
            "prompt": prompt,
            "tokens": args.tokens,
            "threads": args.threads,
            "repeat": args.repeat,
            "device": torch_device,
            "dtype": torch_dtype,
        }))?,
    )?;
    let torch = torch_side_matching(&args.python, root, &dir, &ours, !on_gpu)?;
    println!("text: {:?}", tokenizer.decode(&ours));
    let mut sides = vec![("hivetrain in-process", in_process)];
    if let Some(endpoint) = endpoint {
        sides.push(("hivetrain endpoint (HTTP)", endpoint));
    }
    print_table(&torch, ours.len(), args.repeat, &sides);
    Ok(())
}
