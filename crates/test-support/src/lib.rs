//! Helpers for hivetrain's tests: a coordinator on port 0 with a temporary store and the
//! tiny model, deterministic keys, hand-made updates, and raw HTTP calls that show the
//! status and error code of every reply.

pub mod chaos;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use coordinator::{Coordinator, CoordinatorConfig};
use ed25519_dalek::SigningKey;
use protocol::api::LeaseReply;
use protocol::{Codec, UpdateHeader, WorkUnit, WorkerId};

/// The repository's root (for the committed corpus and tokenizer).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A short corpus (the first ~300 KB of the committed Shakespeare, cut at a line) written
/// into `dir`, so every test tokenizes in well under a second.
pub fn small_corpus(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join("data/shakespeare.txt"))
        .expect("the committed corpus data/shakespeare.txt");
    let cut = text[..300_000].rfind('\n').unwrap_or(300_000);
    let path = dir.join("shakespeare-300k.txt");
    std::fs::write(&path, &text[..cut]).expect("write corpus");
    path
}

/// The GGUF writer and tiny random Llama of the `models` tests, shared with the tests of
/// fine-tunes (one file, compiled into both).
#[path = "../../models/tests/it/writer.rs"]
#[allow(dead_code)]
mod gguf_writer;

/// Context of [`tiny_llama_gguf`]'s model.
pub const TINY_LLAMA_CONTEXT: usize = 96;

/// A tiny random Llama (byte-level BPE tokenizer with ChatML specials, a ChatML chat
/// template) written as an F32 GGUF at `dir/tiny-llama.gguf`.
pub fn tiny_llama_gguf(dir: &Path) -> PathBuf {
    let config = engine::LlamaConfig {
        max_seq: TINY_LLAMA_CONTEXT,
        ..gguf_writer::tiny_config(true)
    };
    let params = gguf_writer::random_params(&config, 7);
    let (file, _) = gguf_writer::llama_gguf(&config, &params, gguf_writer::Storage::F32);
    let path = dir.join("tiny-llama.gguf");
    std::fs::write(&path, file.bytes()).expect("write the tiny GGUF");
    path
}

/// A chat JSONL of `n` short lookups at `dir/codes.jsonl`: the user names a number, the
/// assistant answers its code word (four letters drawn from the number). What a unit
/// learns is the pairs it trained on, so honest updates help their own data more than
/// random data, as scoring asks.
pub fn codes_chat(dir: &Path, n: u32) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let word: String = (0..4u64)
                .map(|k| {
                    let r = protocol::splitmix64(i as u64 * 4 + k);
                    char::from(b'a' + (r % 26) as u8)
                })
                .collect();
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("code {i}")},
                {"role": "assistant", "content": word},
            ]})
            .to_string()
        })
        .collect();
    let path = dir.join("codes.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("write the chat data");
    path
}

/// A LoRA fine-tune of [`tiny_llama_gguf`] on [`codes_chat`]: rank 4 on q, v and down,
/// windows of 64 tokens; `units` per round, all needed to aggregate, H = 6.
pub fn tiny_finetune_config(dir: &Path, units: u32) -> CoordinatorConfig {
    let mut c = tiny_config(dir, units);
    c.finetune = Some(coordinator::config::FinetuneConfig {
        base: tiny_llama_gguf(dir),
        lora: Some(engine::LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: vec![
                engine::LoraTarget::Q,
                engine::LoraTarget::V,
                engine::LoraTarget::Down,
            ],
        }),
        data: protocol::api::DataFormat::Chat,
    });
    c.corpus = codes_chat(dir, 400);
    c.seq = 64;
    c.holdout_batches = 2;
    c.schedule.steps_per_unit = 6;
    c.schedule.inner_lr = 1e-2;
    c
}

/// The tiny model on the short corpus; `units` per round, all needed to aggregate, H = 10.
pub fn tiny_config(dir: &Path, units: u32) -> CoordinatorConfig {
    let mut c = CoordinatorConfig {
        preset: "tiny".into(),
        corpus: small_corpus(dir),
        tokenizer: repo_root().join("data/tokenizer.json"),
        batch: 4,
        holdout_batches: 4,
        devices: coordinator::config::DevicesConfig {
            holdout: "cpu:1".into(),
            ..Default::default()
        },
        ..CoordinatorConfig::default()
    };
    c.schedule.units_per_round = units;
    c.schedule.min_updates = units;
    c.schedule.steps_per_unit = 10;
    c.schedule.inner_lr = 3e-3;
    c.schedule.n_shards = 4;
    c.schedule.lease_ms = 60_000;
    c.schedule.round_timeout_ms = 600_000;
    c
}

/// `config` for tests that send hand-made deltas (not trained): no scoring and no
/// re-runs, which would refuse them or claw their credit back, and fp32 as the run's
/// codec, the one [`update_bytes`] encodes with (an update's body may not be larger
/// than the run's codec makes it).
pub fn hand_made(mut config: CoordinatorConfig) -> CoordinatorConfig {
    config.scoring.enabled = false;
    config.spot_check.enabled = false;
    config.codec = Codec::Fp32;
    config
}

/// A clock the test moves by hand.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start_ms: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(start_ms)))
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn as_fn(&self) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        let inner = self.0.clone();
        Arc::new(move || inner.load(Ordering::SeqCst))
    }
}

/// A coordinator on `127.0.0.1:0` over the store in `dir`.
pub fn start(dir: &Path, config: CoordinatorConfig) -> Coordinator {
    Coordinator::start(&dir.join("store"), config, "127.0.0.1:0").expect("start coordinator")
}

/// As [`start`], on a hand-moved clock.
pub fn start_with_clock(dir: &Path, config: CoordinatorConfig, clock: &ManualClock) -> Coordinator {
    Coordinator::start_with_clock(&dir.join("store"), config, "127.0.0.1:0", clock.as_fn())
        .expect("start coordinator")
}

/// A deterministic key (`n` names it).
pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Options for a worker thread that keeps its data in `dir`.
pub fn worker_options(dir: &Path, name: &str) -> worker::WorkerOptions {
    worker::WorkerOptions {
        name: name.to_owned(),
        device: "cpu:1".into(),
        max_units: None,
        data_dir: dir.join(format!("data-{name}")),
        unreachable_timeout: Duration::from_secs(30),
    }
}

/// A raw reply: status and body (JSON when it parses).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Reply {
    /// The error code of a refusal (`""` for a success).
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

fn now_ms() -> u64 {
    coordinator::system_ms()
}

fn reply(response: reqwest::blocking::Response) -> Reply {
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    }
}

/// A signed JSON POST at `time_ms`.
pub fn post_signed_at(url: &str, key: &SigningKey, path: &str, body: &str, time_ms: u64) -> Reply {
    let mut request = reqwest::blocking::Client::new()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json");
    for (name, value) in protocol::auth::sign_request(key, "POST", path, time_ms, body.as_bytes()) {
        request = request.header(name, value);
    }
    reply(request.body(body.to_owned()).send().expect("POST"))
}

/// A signed JSON POST now.
pub fn post_signed(url: &str, key: &SigningKey, path: &str, body: &str) -> Reply {
    post_signed_at(url, key, path, body, now_ms())
}

/// Registers `key` as `name`.
/// Registers `key` as `name` on this machine ([`this_machine`]).
pub fn register(url: &str, key: &SigningKey, name: &str) {
    let body = serde_json::to_string(&protocol::api::RegisterRequest {
        name: name.to_owned(),
        machine: Some(this_machine()),
    })
    .expect("json");
    let r = post_signed(url, key, "/v1/workers", &body);
    assert_eq!(r.status, 200, "register: {r:?}");
}

/// Leases a unit for `key` (which must get one), at `time_ms`.
pub fn lease_at(url: &str, key: &SigningKey, time_ms: u64) -> WorkUnit {
    let r = post_signed_at(url, key, "/v1/lease", "", time_ms);
    assert_eq!(r.status, 200, "lease: {r:?}");
    match serde_json::from_value(r.body.clone()).expect("lease reply") {
        LeaseReply::Lease { unit, .. } => unit,
        LeaseReply::NoWork { .. } => panic!("no work: {r:?}"),
    }
}

/// Leases a unit for `key` now.
pub fn lease(url: &str, key: &SigningKey) -> WorkUnit {
    lease_at(url, key, now_ms())
}

/// A deterministic small delta for a unit (norm about 0.5 for the tiny model).
pub fn crafted_delta(unit: u64, n_params: usize) -> Vec<f32> {
    (0..n_params)
        .map(|i| (((i as u64 * 7919 + unit * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 3e-3)
        .collect()
}

/// A signed fp32 update of `delta` for `unit` based on `base_version`.
pub fn update_bytes(key: &SigningKey, unit: u64, base_version: u64, delta: &[f32]) -> Vec<u8> {
    let header = UpdateHeader {
        work_unit: unit,
        base_version,
        worker: WorkerId::of(key),
        nonce: unit,
        codec: Codec::Fp32,
        n_params: delta.len() as u32,
    };
    protocol::encode_update(&header, delta, key)
}

/// `worker`'s lease from `core` at `now` (panics on "no work").
pub fn core_lease(core: &mut coordinator::Core, worker: WorkerId, now: u64) -> WorkUnit {
    match core.lease(worker, now).expect("lease") {
        LeaseReply::Lease { unit, .. } => unit,
        other => panic!("no lease: {other:?}"),
    }
}

/// Submits `key`'s update of `delta` for `unit` straight to `core` at `now`, encoded with
/// the core's codec; `Err` holds the refusal's code.
pub fn core_submit(
    core: &mut coordinator::Core,
    key: &SigningKey,
    unit: &WorkUnit,
    delta: &[f32],
    now: u64,
) -> Result<(), String> {
    let header = UpdateHeader {
        work_unit: unit.id,
        base_version: unit.base_version,
        worker: WorkerId::of(key),
        nonce: unit.id,
        codec: core.config().codec,
        n_params: delta.len() as u32,
    };
    let bytes = protocol::encode_update(&header, delta, key);
    core.submit(&bytes, now).map(|_| ()).map_err(|e| e.code)
}

/// Sends `key`'s update of [`crafted_delta`] for `unit` (leased to it).
pub fn submit_crafted(url: &str, key: &SigningKey, unit: &WorkUnit, n_params: usize) -> Reply {
    let delta = crafted_delta(unit.id, n_params);
    submit(url, update_bytes(key, unit.id, unit.base_version, &delta))
}

/// The codes of the rejections the coordinator recorded, oldest first.
pub fn rejection_codes(server: &Coordinator) -> Vec<String> {
    server.with_core(|c| {
        c.store()
            .rejections()
            .expect("rejections")
            .into_iter()
            .map(|r| r.code)
            .collect()
    })
}

/// POSTs raw bytes to `/v1/updates`.
pub fn submit(url: &str, bytes: Vec<u8>) -> Reply {
    reply(
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/updates"))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .expect("POST /v1/updates"),
    )
}

/// POSTs to `path` a head that declares a body of `length` bytes, and no body: the reply
/// to a body refused on its declared size. (A client that sends such a body races the
/// server's close: it may see a reset before it reads the 413.)
pub fn post_declared(url: &str, path: &str, length: u64) -> Reply {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).expect("write head");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Reply {
        status,
        body: serde_json::from_str(body).unwrap_or(serde_json::Value::String(body.to_owned())),
    }
}

/// `GET /v1/status`.
pub fn status(url: &str) -> protocol::api::Status {
    reqwest::blocking::get(format!("{url}/v1/status"))
        .expect("GET /v1/status")
        .json()
        .expect("status JSON")
}

/// A GET of `path`.
pub fn get(url: &str, path: &str) -> Reply {
    reply(reqwest::blocking::get(format!("{url}{path}")).expect("GET"))
}

/// An API key for `key`'s wallet: a challenge from the coordinator, signed, exchanged.
pub fn api_key(url: &str, key: &SigningKey) -> String {
    use ed25519_dalek::Signer;
    let challenge = get(url, "/v1/keys/challenge");
    assert_eq!(challenge.status, 200, "{challenge:?}");
    let message = challenge.body["message"].as_str().expect("message");
    let body = serde_json::json!({
        "wallet": WorkerId::of(key).to_string(),
        "challenge": challenge.body["challenge"],
        "signature": hex::encode(key.sign(message.as_bytes()).to_bytes()),
    });
    let r = reply(
        reqwest::blocking::Client::new()
            .post(format!("{url}/v1/keys"))
            .body(body.to_string())
            .send()
            .expect("POST /v1/keys"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    r.body["api_key"].as_str().expect("api_key").to_owned()
}

/// The files in the blob directory of the stopped run in `store_dir` that no row names
/// (orphans) or that are temporary files, by name; panics if a blob a row names is
/// missing. Empty once a coordinator has opened the run (it sweeps them).
pub fn stray_blobs(store_dir: &Path) -> Vec<String> {
    let store = store::Store::open(store_dir).expect("open the store");
    let live = store
        .live_blobs(&[coordinator::core::META_TOKENIZER])
        .expect("live blobs");
    for blob in &live {
        assert!(
            store.blobs().contains(blob),
            "blob {blob}, named by a row, is missing"
        );
    }
    let mut stray = Vec::new();
    for prefix in std::fs::read_dir(store_dir.join("blobs")).expect("blob dir") {
        let prefix = prefix.expect("entry").path();
        for file in std::fs::read_dir(&prefix).expect("prefix dir") {
            let name = file
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            let named = store::BlobHash::parse(&name).is_some_and(|h| live.contains(&h));
            if !named {
                stray.push(name);
            }
        }
    }
    stray.sort();
    stray
}

/// The machine a test's worker reports: this CPU's determinism class, so its units are
/// re-run bit for bit by the coordinator in the same process.
pub fn this_machine() -> protocol::api::Machine {
    protocol::api::Machine {
        device: "cpu (test)".into(),
        class: engine::cpu_class(),
        tokens_per_s: 1_000.0,
    }
}

/// Runs the `<script>` of `page` under Node (18 or later) in `dir`, between `dom` (a
/// stand-in for the browser; the script's first argument is `url`) and `render` (which
/// prints what is shown as JSON), and returns that JSON: a dashboard rendered without a
/// browser. Panics, with Node's standard error, if the script fails.
pub fn render_under_node(
    dir: &std::path::Path,
    page: &str,
    dom: &str,
    render: &str,
    url: &str,
) -> serde_json::Value {
    let start = page.find("<script>").expect("a script") + "<script>".len();
    let end = page.find("</script>").expect("its end");
    let file = dir.join("dashboard.mjs");
    std::fs::write(&file, format!("{dom}\n{}\n{render}", &page[start..end]))
        .expect("write harness");
    let out = std::process::Command::new("node")
        .arg(&file)
        .arg(url)
        .output()
        .expect("node (Node.js 18 or later) runs the dashboard's script");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}
