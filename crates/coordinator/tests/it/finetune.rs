//! A LoRA fine-tune of a pretrained model over real HTTP: the run names its base by
//! hash, workers fetch and check it once, train the adapter on chat data (the loss on
//! the answers only), and send adapter deltas that the coordinator validates, scores,
//! re-runs bit for bit, combines and credits at a LoRA step's FLOPs.

use protocol::api::DataFormat;
use test_support as ts;

/// Runs a worker for each `(key seed, name)` at once over HTTP, each for `units` units;
/// their summaries, in order.
fn run_workers<const N: usize>(
    url: &str,
    dir: &std::path::Path,
    workers: [(u8, &str); N],
    units: u64,
) -> Vec<worker::Summary> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handles: Vec<_> = workers
        .into_iter()
        .map(|(seed, name)| {
            let key = ts::key(seed);
            let transport = worker::HttpTransport::new(url).expect("transport");
            let mut options = ts::worker_options(dir, name);
            options.max_units = Some(units);
            let stop = stop.clone();
            std::thread::spawn(move || worker::run(&transport, &key, &options, &stop, &mut ()))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("worker thread").expect("worker run"))
        .collect()
}

#[test]
fn volunteers_fine_tune_a_lora_adapter_on_a_pretrained_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_finetune_config(dir.path(), 2);
    // Every accepted unit is re-run, so each round is checked bit for bit.
    config.spot_check.trusted_after = 1_000;
    // A tiny model earns micro-credits: price the answer within them.
    config.serving.price_prompt_token = 0;
    config.serving.price_output_token = 1;
    let base_path = config.finetune.as_ref().expect("a fine-tune").base.clone();
    let base_bytes = std::fs::read(&base_path).expect("base");
    let server = ts::start(dir.path(), config);
    let url = server.url();

    // The run names the base by its bytes' hash and trains the adapter alone.
    let info = server.with_core(|c| c.run_info());
    let base = info.base.clone().expect("the run names its base");
    assert_eq!(base.sha256, data::sha256_hex(&base_bytes));
    assert_eq!(base.bytes, base_bytes.len() as u64);
    assert_eq!(info.data, DataFormat::Chat);
    let (llama, lora) = info.model.lora().expect("a LoRA spec");
    assert_eq!(lora.rank, 4);
    let adapter_len = lora.n_params(llama);
    assert_eq!(info.n_params as usize, adapter_len);
    assert_eq!(info.model.trainable_len(), adapter_len);
    let served = ts::get(&url, "/v1/run/base");
    assert_eq!(served.status, 200);

    // Alice and bob train two rounds of two units.
    let summaries = run_workers(&url, dir.path(), [(20, "alice"), (21, "bob")], 2);
    for summary in summaries {
        assert_eq!(
            (summary.accepted, summary.rejected),
            (2, 0),
            "{summary:?} {:?}",
            ts::rejection_codes(&server)
        );
        // An update carries the adapter, not the model.
        assert!(
            summary.bytes_sent < 2 * (4 * adapter_len as u64 + 4096),
            "{summary:?}"
        );
    }
    let status = ts::status(&url);
    assert_eq!(status.version, 2);

    // Each worker kept the base under its hash, checked.
    for name in ["alice", "bob"] {
        let kept = ts::worker_options(dir.path(), name)
            .data_dir
            .join(format!("base-{}-tiny-llama.gguf", &base.sha256[..16]));
        assert_eq!(std::fs::read(&kept).expect("kept base"), base_bytes);
    }

    // The adapter learned: the holdout loss on the answers fell below the base's.
    let (initial, now) = server.with_core(|c| {
        (
            c.store().version(0).expect("v0").expect("v0").holdout_loss,
            c.holdout_loss().expect("loss"),
        )
    });
    assert!(now < initial, "holdout loss {initial} -> {now}");

    // Version 2 is a PEFT adapter file naming its base; the spot-checks re-ran units and
    // found the same bits.
    server.with_core(|c| {
        let (bytes, _) = c.model(2).expect("version 2");
        let trained =
            engine::checkpoint::trained_from_bytes(std::path::Path::new("v2"), &bytes, &info.model)
                .expect("an adapter checkpoint");
        assert_eq!(trained.trainable.len(), adapter_len);
        assert_eq!(
            trained.metadata[coordinator::core::BASE_SHA256_METADATA_KEY],
            base.sha256
        );
        assert_eq!(trained.trainable, c.params());
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let verified = loop {
        let checks = server.with_core(|c| c.store().checks(None).expect("checks"));
        let done: Vec<_> = checks
            .iter()
            .filter(|c| c.state != store::CheckState::Queued)
            .collect();
        if !checks.is_empty() && done.len() == checks.len() {
            break done
                .iter()
                .filter(|c| c.state == store::CheckState::Verified)
                .count();
        }
        assert!(std::time::Instant::now() < deadline, "{checks:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(verified >= 1, "no re-run verified");

    // Alice spends credit on the fine-tuned model: the chat is rendered through the base's
    // template, and the answer is the engine's greedy answer from base + adapter.
    let key = ts::api_key(&url, &ts::key(20));
    let reply: serde_json::Value = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(&key)
        .body(r#"{"model":"hivetrain","messages":[{"role":"user","content":"code 7"}],"max_tokens":2,"temperature":0}"#)
        .send()
        .expect("query")
        .json()
        .expect("json");
    let answer = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"));
    let pretrained = models::load_gguf(&base_path, Some(info.model.n_ctx())).expect("base");
    let prompt = pretrained
        .chat_prompt(&[models::ChatMessage {
            role: "user".into(),
            content: "code 7".into(),
        }])
        .expect("template");
    let ids = pretrained.encode(&prompt).expect("encode");
    assert_eq!(reply["usage"]["prompt_tokens"], ids.len(), "{reply}");
    let adapter = server.with_core(|c| c.params().to_vec());
    let mut full = pretrained.params.clone();
    full.extend_from_slice(&adapter);
    let mut backend =
        engine::open_model("cpu:1", &info.model, full, engine::Purpose::Eval).expect("backend");
    let stops: Vec<u32> = pretrained.eos_token_id.into_iter().chain([2]).collect();
    let mut ours = models::greedy(backend.as_mut(), &ids, 2, &stops, &mut |_| {}).expect("greedy");
    ours.retain(|id| !stops.contains(id));
    assert_eq!(answer, pretrained.decode(&ours).expect("decode"), "{reply}");

    // The reply names the weights that answered: the base (its file's stem and sha256
    // prefix) and the adapter's version, asked by its alias `hivetrain` as above or by
    // that name. /v1/models lists it; any other name is model_not_found.
    let named = format!("tiny-llama@{}+lora-v", &base.sha256[..8]);
    assert_eq!(reply["model"], format!("{named}2"), "{reply}");
    let models = ts::get(&url, "/v1/models");
    assert_eq!(
        models.body["data"][0]["id"],
        format!("{named}2"),
        "{models:?}"
    );
    let valid = format!(
        "use \"{named}2\" (the newest), {named}N for version N up to 2, or the aliases \"hivetrain\" (the newest) and hivetrain-vN"
    );
    // Bob pays for the two answered (a unit earns a few micro-credits; alice spent hers).
    let key = ts::api_key(&url, &ts::key(21));
    for (asked, answered) in [
        (format!("{named}2"), Ok(format!("{named}2"))),
        (format!("{named}0"), Ok(format!("{named}0"))),
        (format!("{named}3"), Err(())),
        (format!("{named}02"), Err(())),
        ("tiny-llama@00000000+lora-v2".to_owned(), Err(())),
        (format!("tiny-llama@{}+full-v2", &base.sha256[..8]), Err(())),
    ] {
        let body = serde_json::json!({
            "model": asked,
            "messages": [{"role": "user", "content": "code 7"}],
            "max_tokens": 1,
            "temperature": 0,
        });
        let r = reqwest::blocking::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .body(body.to_string())
            .send()
            .expect("query");
        let (status, r): (u16, serde_json::Value) = (r.status().as_u16(), r.json().expect("json"));
        match answered {
            Ok(model) => assert_eq!((status, &r["model"]), (200, &model.into()), "{asked}: {r}"),
            Err(()) => {
                assert_eq!(
                    (status, &r["error"]["code"]),
                    (404, &"model_not_found".into()),
                    "{asked}: {r}"
                );
                let message = r["error"]["message"].as_str().unwrap_or_default();
                assert!(message.ends_with(&valid), "{asked}: {message}");
            }
        }
    }

    // Credit follows a LoRA step's FLOPs: 4 per base parameter and 6 per adapter
    // parameter, per token.
    let flops = info.model.train_flops_per_token();
    let base_params = llama.n_params() as u64;
    assert_eq!(flops, 4 * base_params + 6 * adapter_len as u64);
}

/// Without `lora` every weight of the pretrained base trains over the network: the run
/// still names and serves its base by hash, updates carry the whole model, the versions
/// are HF `model.safetensors` files naming the base, re-runs reproduce the bits, and the
/// served name says it is a full fine-tune.
#[test]
fn volunteers_fine_tune_every_weight_of_a_pretrained_base() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::tiny_finetune_config(dir.path(), 2);
    config.finetune.as_mut().expect("a fine-tune").lora = None;
    config.spot_check.trusted_after = 1_000;
    config.schedule.inner_lr = 3e-3;
    let server = ts::start(dir.path(), config);
    let url = server.url();

    let info = server.with_core(|c| c.run_info());
    let base = info.base.clone().expect("the run names its base");
    assert!(info.model.lora().is_none());
    assert_eq!(info.model.trainable_len(), info.model.n_params());
    assert_eq!(info.n_params as usize, info.model.n_params());

    for summary in run_workers(&url, dir.path(), [(30, "carol"), (31, "dave")], 1) {
        assert_eq!(
            (summary.accepted, summary.rejected),
            (1, 0),
            "{summary:?} {:?}",
            ts::rejection_codes(&server)
        );
    }
    assert_eq!(ts::status(&url).version, 1);

    let (initial, now) = server.with_core(|c| {
        (
            c.store().version(0).expect("v0").expect("v0").holdout_loss,
            c.holdout_loss().expect("loss"),
        )
    });
    assert!(now < initial, "holdout loss {initial} -> {now}");
    server.with_core(|c| {
        let (bytes, _) = c.model(1).expect("version 1");
        let trained =
            engine::checkpoint::trained_from_bytes(std::path::Path::new("v1"), &bytes, &info.model)
                .expect("a full checkpoint");
        assert_eq!(trained.trainable.len(), info.model.n_params());
        assert_eq!(
            trained.metadata[coordinator::core::BASE_SHA256_METADATA_KEY],
            base.sha256
        );
        assert_eq!(trained.trainable, c.params());
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let checks = server.with_core(|c| c.store().checks(None).expect("checks"));
        if !checks.is_empty() && checks.iter().all(|c| c.state != store::CheckState::Queued) {
            assert!(
                checks
                    .iter()
                    .all(|c| c.state == store::CheckState::Verified),
                "{checks:?}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{checks:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let models = ts::get(&url, "/v1/models");
    assert_eq!(
        models.body["data"][0]["id"],
        format!("tiny-llama@{}+full-v1", &base.sha256[..8]),
        "{models:?}"
    );
}
