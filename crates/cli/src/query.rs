//! `hivetrain query` and `hivetrain serve`: use the trained model, paying with credit.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::Signer;
use ledger::format_credits;
use ledger::wire::WalletView;
use protocol::WorkerId;

use crate::wallet::Remote;

#[derive(Debug, clap::Args)]
pub(crate) struct QueryArgs {
    /// The prompt; without one, an interactive chat (`balance` shows your credit,
    /// `quit` leaves).
    prompt: Option<String>,
    /// An API key (default: one is made for your key file's wallet).
    #[arg(long, env = "HIVETRAIN_API_KEY")]
    api_key: Option<String>,
    /// Model: `hivetrain` (the newest version), `hivetrain-vN`, or a fine-tune's version
    /// by the name `GET /v1/models` lists (`SmolLM2-135M-Instruct.Q4_1@b179c952+lora-v4`).
    #[arg(long, default_value = "hivetrain")]
    model: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 100)]
    max_tokens: u64,
    /// 0 is greedy; higher is more varied.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed of the sampler (default: the server picks one).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    remote: Remote,
}

/// Signs a fresh challenge's `field` (`message` to make a key, `revoke_message` to
/// revoke them all) with the key file and posts it to `path`.
fn signed_challenge(remote: &Remote, field: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let key = remote.key()?;
    let challenge: serde_json::Value = remote.get("/v1/keys/challenge")?;
    let message = challenge[field]
        .as_str()
        .with_context(|| format!("the challenge reply has no {field}"))?;
    let body = serde_json::json!({
        "wallet": WorkerId::of(&key).to_string(),
        "challenge": challenge["challenge"],
        "signature": hex::encode(key.sign(message.as_bytes()).to_bytes()),
    });
    let response = reqwest::blocking::Client::new()
        .post(remote.url(path))
        .json(&body)
        .send()
        .with_context(|| format!("cannot reach the coordinator at {}", remote.coordinator))?;
    crate::wallet::read(response, "API key")
}

/// Makes an API key for the key file's wallet: signs a fresh challenge.
pub(crate) fn make_api_key(remote: &Remote) -> anyhow::Result<String> {
    let reply = signed_challenge(remote, "message", "/v1/keys")?;
    Ok(reply["api_key"]
        .as_str()
        .context("the reply has no api_key")?
        .to_owned())
}

/// Revokes every API key of the key file's wallet; returns how many.
pub(crate) fn revoke_all_api_keys(remote: &Remote) -> anyhow::Result<u64> {
    let reply = signed_challenge(remote, "revoke_message", "/v1/keys/revoke")?;
    reply["keys"].as_u64().context("the reply has no count")
}

/// An API key made for one command, revoked when it ends (a wallet holds a bounded
/// number of keys).
pub(crate) struct TemporaryKey {
    remote: Remote,
    pub(crate) key: String,
}

impl TemporaryKey {
    pub(crate) fn make(remote: &Remote) -> anyhow::Result<TemporaryKey> {
        Ok(TemporaryKey {
            remote: remote.clone(),
            key: make_api_key(remote)?,
        })
    }
}

impl Drop for TemporaryKey {
    fn drop(&mut self) {
        // Best effort: a key left behind is revoked by `hivetrain wallet revoke-keys`.
        let _ = reqwest::blocking::Client::new()
            .post(self.remote.url("/v1/keys/revoke"))
            .bearer_auth(&self.key)
            .timeout(Duration::from_secs(10))
            .send();
    }
}

/// Streams one request, printing the text as it comes; returns the reply's text.
fn stream(
    remote: &Remote,
    api_key: &str,
    path: &str,
    mut body: serde_json::Value,
    chat: bool,
) -> anyhow::Result<(String, Option<serde_json::Value>)> {
    body["stream"] = true.into();
    body["stream_options"] = serde_json::json!({ "include_usage": true });
    let response = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()?
        .post(remote.url(path))
        .bearer_auth(api_key)
        .json(&body)
        .send()
        .with_context(|| format!("cannot reach the coordinator at {}", remote.coordinator))?;
    if !response.status().is_success() {
        let _: serde_json::Value = crate::wallet::read(response, "query")?;
        bail!("the query was refused");
    }
    let mut text = String::new();
    let mut usage = None;
    let mut out = std::io::stdout();
    for line in BufReader::new(response).lines() {
        let line = line.context("reading the reply stream")?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: serde_json::Value =
            serde_json::from_str(data).context("a chunk of the stream is not JSON")?;
        if let Some(message) = chunk["error"]["message"].as_str() {
            bail!("the server failed mid-stream: {message}");
        }
        if !chunk["usage"].is_null() {
            usage = Some(chunk["usage"].clone());
        }
        let piece = if chat {
            chunk["choices"][0]["delta"]["content"].as_str()
        } else {
            chunk["choices"][0]["text"].as_str()
        };
        if let Some(piece) = piece {
            text.push_str(piece);
            print!("{piece}");
            out.flush()?;
        }
    }
    println!();
    Ok((text, usage))
}

fn balance(remote: &Remote) -> anyhow::Result<u64> {
    let wallet = remote.wallet(None)?;
    let view: WalletView = remote.get(&format!("/v1/wallets/{wallet}?entries=0"))?;
    Ok(view.balance)
}

pub(crate) fn query(args: QueryArgs) -> anyhow::Result<()> {
    let remote = &args.remote;
    let made = match &args.api_key {
        Some(_) => None,
        None => Some(TemporaryKey::make(remote)?),
    };
    let api_key = match (&args.api_key, &made) {
        (Some(k), _) => k.clone(),
        (None, Some(made)) => made.key.clone(),
        (None, None) => bail!("no API key"),
    };
    let mut request = serde_json::json!({
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    });
    if let Some(seed) = args.seed {
        request["seed"] = seed.into();
    }
    let report = |usage: Option<serde_json::Value>| {
        if let Some(u) = usage {
            let left = balance(remote)
                .map(format_credits)
                .unwrap_or_else(|_| "?".into());
            eprintln!(
                "[{} prompt + {} generated tokens; balance {left} credits]",
                u["prompt_tokens"], u["completion_tokens"]
            );
        }
    };
    if let Some(prompt) = &args.prompt {
        request["prompt"] = prompt.clone().into();
        print!("{prompt}");
        let (_, usage) = stream(remote, &api_key, "/v1/completions", request, false)?;
        report(usage);
        return Ok(());
    }
    eprintln!(
        "chatting with {} at {}: `balance` shows your credit, `quit` leaves",
        args.model, remote.coordinator
    );
    let mut messages: Vec<serde_json::Value> = Vec::new();
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "quit" | "exit" => break,
            "balance" => {
                println!("{} credits", format_credits(balance(remote)?));
                continue;
            }
            text => {
                messages.push(serde_json::json!({ "role": "user", "content": text }));
                let mut body = request.clone();
                body["messages"] = messages.clone().into();
                match stream(remote, &api_key, "/v1/chat/completions", body, true) {
                    Ok((reply, usage)) => {
                        messages.push(serde_json::json!({ "role": "assistant", "content": reply }));
                        report(usage);
                    }
                    Err(e) => {
                        messages.pop();
                        eprintln!("error: {e:#}");
                    }
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The run's directory (a coordinator's `--dir`; that coordinator must be stopped).
    #[arg(long)]
    run: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "HIVETRAIN_BIND", default_value = "127.0.0.1:8480")]
    bind: String,
    /// TOML file whose `[serving]` table sets prices, rate limit and dividends.
    #[arg(long, env = "HIVETRAIN_CONFIG")]
    config: Option<PathBuf>,
}

pub(crate) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = crate::model::open_run(&args.run)?;
    let stored = store
        .meta("config")?
        .context("the run has no stored config")?;
    drop(store);
    let mut config: CoordinatorConfig =
        serde_json::from_str(&stored).context("the run's stored config does not parse")?;
    if let Some(path) = &args.config {
        config.serving = CoordinatorConfig::from_file(path)?.serving;
    }
    let server = Coordinator::serve(&args.run, config.clone(), &args.bind)
        .with_context(|| format!("serving the run in {}", args.run.display()))?;
    let version = server.with_core(|c| c.version());
    eprintln!(
        "serving version {version} of {} at {}/v1 (OpenAI-compatible; {} + {} micro-credits a prompt and a generated token)\n  hivetrain query --coordinator {} \"KING HENRY:\"\nCtrl-C stops it.",
        args.run.display(),
        server.url(),
        config.serving.price_prompt_token,
        config.serving.price_output_token,
        server.url()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    server.stop();
    Ok(())
}
