//! `cargo xtask bench decode`: greedy decoding tokens/s of the inference endpoint (HTTP,
//! the real coordinator) and of the engine in-process, against PyTorch decoding from
//! the same weights and prompt in the same run. The tokens must match.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, ensure};
use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::{Signer, SigningKey};
use engine::generate::SamplingParams;
use protocol::WorkerId;

#[derive(Debug, clap::Args)]
pub(crate) struct DecodeBench {
    /// Model preset (its weights: version 0 of a fresh run with `--seed`).
    #[arg(long, default_value = "small")]
    preset: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Tokens to generate (prompt and tokens must fit the preset's context).
    #[arg(long, default_value_t = 120)]
    tokens: usize,
    #[arg(long, default_value = "KING HENRY:\n")]
    prompt: String,
    /// Threads of each side.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timed repeats of each side (the best is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Python with torch and transformers.
    #[arg(long, default_value = "python3")]
    python: String,
}

pub(crate) fn run(root: &Path, args: DecodeBench) -> anyhow::Result<()> {
    ensure!(
        args.tokens > 0 && args.repeat > 0,
        "--tokens and --repeat must be at least 1"
    );
    let temp = tempfile::tempdir()?;
    let mut config = CoordinatorConfig {
        preset: args.preset.clone(),
        seed: args.seed,
        corpus: root.join("data/shakespeare.txt"),
        tokenizer: root.join("data/tokenizer.json"),
        holdout_batches: 1,
        ..CoordinatorConfig::default()
    };
    config.serving.price_prompt_token = 0;
    config.serving.price_output_token = 0;
    config.devices.serving = format!("cpu:{}", args.threads.max(1));
    config.serving.requests_per_minute = 10_000;
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
    let prompt = tokenizer.encode(&args.prompt)?;
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
        args.prompt,
        prompt.len(),
        args.tokens,
        args.threads
    );

    // In-process: the engine's KV-cache generation, as the endpoint runs it.
    let greedy = SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let mut backend =
        engine::open_backend(&format!("cpu:{}", args.threads), model, params.clone())?;
    let mut ours = Vec::new();
    let mut in_process = 0.0f64;
    for i in 0..=args.repeat {
        let started = Instant::now();
        ours = engine::generate::generate(
            backend.as_mut(),
            &prompt,
            args.tokens,
            &greedy,
            &mut |_| true,
        )?;
        let rate = ours.len() as f64 / started.elapsed().as_secs_f64();
        if i > 0 {
            in_process = in_process.max(rate);
        }
    }

    // The endpoint: POST /v1/completions over loopback, paid by a wallet's API key.
    let key = SigningKey::from_bytes(&[5; 32]);
    let client = reqwest::blocking::Client::new();
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
    let api_key = issued["api_key"].as_str().context("api key")?.to_owned();
    let mut endpoint = 0.0f64;
    let mut endpoint_text = String::new();
    for i in 0..=args.repeat {
        let started = Instant::now();
        let reply: serde_json::Value = client
            .post(format!("{url}/v1/completions"))
            .bearer_auth(&api_key)
            .json(&serde_json::json!({
                "model": "hivetrain",
                "prompt": args.prompt,
                "max_tokens": args.tokens,
                "temperature": 0,
            }))
            .send()?
            .json()?;
        let secs = started.elapsed().as_secs_f64();
        let n = reply["usage"]["completion_tokens"]
            .as_u64()
            .with_context(|| format!("no usage in {reply}"))?;
        endpoint_text = reply["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if i > 0 {
            endpoint = endpoint.max(n as f64 / secs);
        }
    }
    server.stop();
    let ours_text = tokenizer.decode(&ours);
    ensure!(
        ours_text.starts_with(&endpoint_text),
        "the endpoint's text differs from the engine's:\n{endpoint_text:?}\n{ours_text:?}"
    );

    // PyTorch: the same weights through an HF export.
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
        }))?,
    )?;
    let stdout = crate::bench::run_python(&args.python, root, "torch_decode.py", &dir)?;
    let torch: serde_json::Value =
        serde_json::from_slice(&stdout).context("the PyTorch script printed no JSON line")?;
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
    for name in ["generate_tokens", "loop_tokens"] {
        let theirs = tokens(name);
        let same = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        ensure!(
            theirs == ours,
            "PyTorch's {name} differ from hivetrain's at token {same} of {}",
            ours.len()
        );
    }
    let torch_generate = torch["generate_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let torch_loop = torch["loop_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    let peer = torch_generate.max(torch_loop);
    println!(
        "tokens match: hivetrain, the endpoint and PyTorch ({} {}, transformers {}) give the same {} greedy tokens",
        torch["torch"].as_str().unwrap_or("?"),
        if torch_generate >= torch_loop {
            "generate"
        } else {
            "loop"
        },
        torch["transformers"].as_str().unwrap_or("?"),
        ours.len()
    );
    println!("| side | tokens/s (best of {}) | vs PyTorch |", args.repeat);
    println!("|---|---|---|");
    println!(
        "| hivetrain in-process | {in_process:.0} | {:.2}x |",
        in_process / peer
    );
    println!(
        "| hivetrain endpoint (HTTP) | {endpoint:.0} | {:.2}x |",
        endpoint / peer
    );
    println!(
        "| PyTorch transformers generate | {torch_generate:.0} | {:.2}x |",
        torch_generate / peer
    );
    println!(
        "| PyTorch loop with past_key_values | {torch_loop:.0} | {:.2}x |",
        torch_loop / peer
    );
    Ok(())
}
