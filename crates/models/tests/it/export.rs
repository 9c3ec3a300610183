//! Export: a tiny random Llama's LoRA adapter as a PEFT directory and back, the merged HF
//! directory, and the adapters that must be refused.

use std::path::Path;

use engine::lora::{LoraConfig, LoraLayout, LoraTarget};
use models::Pretrained;
use models::export::{self, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, Adapter};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::writer::{Storage, llama_gguf, logits, random_params, tiny_config};

/// The tiny Llama as a GGUF file in `dir` (q and k rows permuted as llama.cpp stores
/// them), loaded.
fn tiny_base(dir: &Path) -> Pretrained {
    let config = tiny_config(true);
    let (gguf, _) = llama_gguf(&config, &random_params(&config, 1), Storage::F32);
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, gguf.bytes()).unwrap_or_else(|e| panic!("{e}"));
    models::load_gguf(&path, None).unwrap_or_else(|e| panic!("{e}"))
}

fn lora() -> LoraConfig {
    // Out of order: the layout is q, v, down whatever the order.
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::V, LoraTarget::Q, LoraTarget::Down],
    }
}

/// PEFT's initialization with every `B` drawn too, so that the adapter does something.
fn random_adapter(base: &Pretrained, sha: &str) -> Adapter {
    let lora = lora();
    let mut tensors = engine::lora::init_adapter(&base.config, &lora, 9);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    for t in LoraLayout::new(&base.config, &lora).table().tensors() {
        if t.name.ends_with("lora_B.weight") {
            for x in &mut tensors[t.range()] {
                *x = 0.3 * (rng.random::<f32>() * 2.0 - 1.0);
            }
        }
    }
    Adapter {
        lora,
        tensors,
        base_sha256: Some(sha.to_owned()),
        version: Some(3),
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn peft_dir_round_trips_and_the_merged_dir_computes_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let base = tiny_base(tmp.path());
    let config = base.config;
    let sha = export::sha256_file(&base.path).unwrap_or_else(|e| panic!("{e}"));
    let adapter = random_adapter(&base, &sha);

    // PEFT directory: written, read back bit for bit, by both readers.
    let peft = tmp.path().join("adapters/tiny");
    export::write_peft_dir(&peft, "tiny", &config, &adapter, "tiny.gguf")
        .unwrap_or_else(|e| panic!("{e}"));
    let read = export::read_peft_dir(&peft, &config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&read.tensors), bits(&adapter.tensors));
    assert_eq!((read.lora.rank, read.lora.alpha), (4, 8.0));
    let mut targets = read.lora.targets.clone();
    targets.sort();
    assert_eq!(targets, [LoraTarget::Q, LoraTarget::V, LoraTarget::Down]);
    assert_eq!(
        (read.base_sha256.as_deref(), read.version),
        (Some(sha.as_str()), Some(3))
    );
    let file = export::read_adapter_file(&peft.join(ADAPTER_WEIGHTS_FILE), &config)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(file, adapter);
    read.check_base(&peft, &sha)
        .unwrap_or_else(|e| panic!("{e}"));

    // Merged HF directory: the merged weights exactly, and the logits of the engine
    // running base + adapter unmerged.
    let merged_dir = tmp.path().join("merged");
    export::write_hf_dir(&merged_dir, &base, Some(&read)).unwrap_or_else(|e| panic!("{e}"));
    let merged = models::load_hf_dir(&merged_dir, None).unwrap_or_else(|e| panic!("{e}"));
    let want = engine::lora::merge(&config, &read.lora, &base.params, &read.tensors);
    assert_eq!(bits(&merged.params), bits(&want));
    let tokens = [5, 17, 3, 250, 9, 42, 7, 1];
    let (spec, full) = export::with_adapter(&base.name, &config, base.params.clone(), &read);
    assert_eq!(spec.trainable_len(), read.tensors.len());
    let mut unmerged = engine::llama::cpu::LlamaCpuBackend::open_lora(
        config,
        read.lora.clone(),
        full,
        1,
        engine::Purpose::Eval,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let with_adapter = unmerged
        .logits(&tokens)
        .unwrap_or_else(|e| panic!("{e}"))
        .to_vec();
    let from_merged = logits(&config, merged.params.clone(), &tokens);
    let from_base = logits(&config, base.params.clone(), &tokens);
    let scale = with_adapter.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    assert!(
        max_abs_diff(&with_adapter, &from_merged) < 1e-5 * scale.max(1.0),
        "merged {} vs unmerged, scale {scale}",
        max_abs_diff(&with_adapter, &from_merged)
    );
    assert!(
        max_abs_diff(&with_adapter, &from_base) > 1e-2 * scale,
        "the adapter changes the logits"
    );

    // The base alone: the same weights, tokenizer, template and special tokens.
    let base_dir = tmp.path().join("base");
    export::write_hf_dir(&base_dir, &base, None).unwrap_or_else(|e| panic!("{e}"));
    let again = models::load_hf_dir(&base_dir, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&again.params), bits(&base.params));
    assert_eq!(again.config, base.config);
    assert_eq!(
        (again.bos_token_id, again.eos_token_id),
        (base.bos_token_id, base.eos_token_id)
    );
    let chat = [models::ChatMessage::user("Hello there")];
    let prompt = base.chat_prompt(&chat).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.chat_prompt(&chat).ok(), Some(prompt.clone()));
    assert_eq!(again.encode(&prompt).ok(), base.encode(&prompt).ok());

    // Writing again replaces what this writer wrote; a directory with other files is
    // left alone.
    export::write_hf_dir(&base_dir, &base, None).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(base_dir.join("notes.txt"), "mine").unwrap_or_else(|e| panic!("{e}"));
    let refused = export::write_hf_dir(&base_dir, &base, Some(&read))
        .map(|()| "written".to_owned())
        .unwrap_or_else(|e| {
            e.to_string()
                .replace(&tmp.path().display().to_string(), "TMP")
        });
    expect_test::expect![[
        "TMP/base: exists and holds other files (notes.txt); give a new or empty directory, or one this command wrote"
    ]]
    .assert_eq(&refused);
    let reloaded = models::load_hf_dir(&base_dir, None).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(bits(&reloaded.params), bits(&base.params));
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Writes the tiny adapter's PEFT directory, applies `edit` to it, then reads it back
/// and checks its base; prints the adapter's shape or the error.
#[track_caller]
fn check(edit: impl Fn(&Path, &Pretrained), expect: expect_test::Expect) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let base = tiny_base(tmp.path());
    let sha = export::sha256_file(&base.path).unwrap_or_else(|e| panic!("{e}"));
    let dir = tmp.path().join("peft");
    export::write_peft_dir(
        &dir,
        "tiny",
        &base.config,
        &random_adapter(&base, &sha),
        "tiny",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    edit(&dir, &base);
    let got = export::read_peft_dir(&dir, &base.config)
        .and_then(|a| a.check_base(&dir, &sha).map(|()| a))
        .map(|a| {
            format!(
                "ok rank {} alpha {} {:?}",
                a.lora.rank, a.lora.alpha, a.lora.targets
            )
        })
        .unwrap_or_else(|e| e.to_string().replace(&dir.display().to_string(), "DIR"));
    expect.assert_eq(&got);
}

/// An edit of adapter_config.json.
fn config_edit(f: impl Fn(&mut serde_json::Value)) -> impl Fn(&Path, &Pretrained) {
    move |dir, _| {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut config: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        f(&mut config);
        std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn bad_adapters_are_refused_with_the_file_named() {
    check(
        |_, _| {},
        expect_test::expect!["ok rank 4 alpha 8 [Down, Q, V]"],
    );
    check(
        |dir, base| {
            let mut other = random_adapter(base, &"0".repeat(64));
            other.version = None;
            let bytes = export::adapter_bytes("tiny", &base.config, &other)
                .unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), bytes).unwrap_or_else(|e| panic!("{e}"));
        },
        expect_test::expect![
            "DIR: the adapter was trained on a base with sha256 0000000000000000000000000000000000000000000000000000000000000000, but the base given has sha256 dcdcc0b94a5e4c47b537d89dcebf5c9fc60e34ba807c4aca7485528b9a1b6954"
        ],
    );
    check(
        config_edit(|c| c["r"] = json!(5)),
        expect_test::expect![
            "DIR/adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has shape [4, 64]; the adapter config on this base needs [5, 64]"
        ],
    );
    check(
        config_edit(|c| {
            c["target_modules"] = json!(["q_proj", "v_proj", "down_proj", "embed_tokens"])
        }),
        expect_test::expect![[
            r#"DIR/adapter_config.json: unsupported adapter: target module "embed_tokens"; hivetrain's LoRA targets q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"#
        ]],
    );
    check(
        config_edit(|c| c["target_modules"] = json!(["q_proj", "v_proj"])),
        expect_test::expect![
            "DIR/adapter_model.safetensors: tensor base_model.model.model.layers.0.mlp.down_proj.lora_A.weight is not part of this adapter (rank, targets and base shape say which are)"
        ],
    );
    check(
        config_edit(|c| c["target_modules"] = json!("all-linear")),
        expect_test::expect![[
            r#"DIR/adapter_config.json: unsupported adapter: target_modules is the pattern "all-linear"; hivetrain reads a list of module names"#
        ]],
    );
    check(
        config_edit(|c| {
            c.as_object_mut().map(|o| o.remove("r"));
        }),
        expect_test::expect!["DIR/adapter_config.json: r (the rank) is missing"],
    );
    check(
        config_edit(|c| {
            c.as_object_mut().map(|o| o.remove("lora_alpha"));
        }),
        expect_test::expect!["DIR/adapter_config.json: lora_alpha is missing"],
    );
    check(
        config_edit(|c| c["use_dora"] = json!(true)),
        expect_test::expect![
            "DIR/adapter_config.json: unsupported adapter: use_dora is true; hivetrain's adapters have false"
        ],
    );
    check(
        config_edit(|c| c["peft_type"] = json!("IA3")),
        expect_test::expect![[
            r#"DIR/adapter_config.json: unsupported adapter: peft_type "IA3"; hivetrain reads "LORA""#
        ]],
    );
    check(
        |dir, _| {
            let path = dir.join(ADAPTER_WEIGHTS_FILE);
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap_or_else(|e| panic!("{e}"));
        },
        expect_test::expect![
            "DIR/adapter_model.safetensors: not a valid safetensors file: incomplete metadata, file not fully covered"
        ],
    );
    check(
        |dir, _| {
            std::fs::remove_file(dir.join(ADAPTER_CONFIG_FILE)).unwrap_or_else(|e| panic!("{e}"));
        },
        expect_test::expect!["DIR/adapter_config.json: No such file or directory (os error 2)"],
    );
}

#[derive(serde::Deserialize)]
struct PeftGolden {
    all_equal: bool,
    max_new_tokens: usize,
    cases: Vec<PeftCase>,
}

#[derive(serde::Deserialize)]
struct PeftCase {
    kind: String,
    prompt: String,
    hivetrain_base: Vec<u32>,
    peft: Vec<u32>,
    merged: Vec<u32>,
}

/// SmolLM2 with the adapter of scripts/check_peft_export.py (`cargo xtask random-adapter
/// --b 0.1`: rank 8, alpha 16, every target, seed 7) gives the greedy tokens PEFT and the
/// merged HF directory gave there, recorded in tests/golden/peft_export.json; and they
/// differ from the base's.
/// (Called by the one test of the real model, `crate::smollm2`.)
pub(crate) fn smollm2_with_the_random_adapter_gives_peft_s_greedy_tokens(
    mut model: models::Pretrained,
) {
    let golden: PeftGolden = serde_json::from_str(include_str!("../golden/peft_export.json"))
        .unwrap_or_else(|e| panic!("the golden file: {e}"));
    assert!(golden.all_equal, "the recorded check did not pass");
    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        targets: LoraTarget::ALL.to_vec(),
    };
    let adapter = Adapter {
        tensors: export::random_adapter_tensors(&model.config, &lora, 7, 0.1),
        lora,
        base_sha256: None,
        version: None,
    };
    let params = std::mem::take(&mut model.params);
    let (spec, params) = export::with_adapter(&model.name, &model.config, params, &adapter);
    let mut backend = engine::open_model("cpu", &spec, params, engine::Purpose::Eval)
        .unwrap_or_else(|e| panic!("{e}"));
    let stop: Vec<u32> = model.eos_token_id.into_iter().collect();
    for case in &golden.cases {
        let ids = model.encode(&case.prompt).unwrap_or_else(|e| panic!("{e}"));
        let new = models::greedy(
            backend.as_mut(),
            &ids,
            golden.max_new_tokens,
            &stop,
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(new, case.peft, "{}: PEFT's tokens", case.kind);
        assert_eq!(new, case.merged, "{}: the merged model's tokens", case.kind);
        assert_ne!(
            new, case.hivetrain_base,
            "{}: the adapter changes the tokens",
            case.kind
        );
    }
}
