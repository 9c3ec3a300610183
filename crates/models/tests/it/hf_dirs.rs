//! HF Llama directories: `config.json`, `model.safetensors`, `tokenizer.json`.

use std::collections::HashMap;

use engine::{LlamaConfig, LlamaLayout};
use models::{ChatMessage, load_gguf, load_hf_dir};
use serde_json::json;

use crate::writer::{Storage, llama_gguf, random_params, tiny_config};

fn config_json(c: &LlamaConfig) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden,
        "intermediate_size": c.intermediate,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "vocab_size": c.vocab_size,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_seq,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    })
}

/// Writes an HF directory of `config`'s `params` (with `edit` applied to config.json)
/// and returns what loading it gives.
fn load(
    config: &LlamaConfig,
    params: &[f32],
    edit: impl Fn(&mut serde_json::Value),
) -> Result<models::Pretrained, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cj = config_json(config);
    edit(&mut cj);
    std::fs::write(dir.path().join("config.json"), cj.to_string()).map_err(|e| e.to_string())?;
    let layout = LlamaLayout::new(config);
    let data: HashMap<String, Vec<u8>> = layout
        .table()
        .tensors()
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                params[t.range()]
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = layout
        .table()
        .tensors()
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                &data[&t.name],
            )
            .unwrap_or_else(|e| panic!("{e}"));
            (t.name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors"))
        .map_err(|e| e.to_string())?;
    // The tokenizer and template from the equivalent GGUF.
    let (gguf, _) = llama_gguf(
        &tiny_config(true),
        &random_params(&tiny_config(true), 1),
        Storage::F32,
    );
    let gguf_path = dir.path().join("t.gguf");
    std::fs::write(&gguf_path, gguf.bytes()).map_err(|e| e.to_string())?;
    let from_gguf = load_gguf(&gguf_path, None).map_err(|e| e.to_string())?;
    std::fs::remove_file(&gguf_path).map_err(|e| e.to_string())?;
    from_gguf
        .tokenizer
        .save(dir.path().join("tokenizer.json"), false)
        .map_err(|e| e.to_string())?;
    let template = from_gguf
        .chat_template
        .as_ref()
        .map(|t| t.source().to_string());
    let tc = json!({"chat_template": template, "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}});
    std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string())
        .map_err(|e| e.to_string())?;
    load_hf_dir(dir.path(), None).map_err(|e| {
        e.to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    })
}

#[track_caller]
fn check(config: &LlamaConfig, edit: impl Fn(&mut serde_json::Value), expect: expect_test::Expect) {
    let params = random_params(config, 3);
    let got = match load(config, &params, edit) {
        Ok(model) => {
            // Every tensor as written (a tied load of an untied file reads all but the
            // head, which comes last).
            assert!(params.starts_with(&model.params), "the parameters changed");
            let prompt = model
                .chat_prompt(&[ChatMessage::user("Hello")])
                .unwrap_or_else(|e| panic!("{e}"));
            format!(
                "ok {} params, eos {:?}, prompt {prompt:?}",
                model.params.len(),
                model.eos_token_id
            )
        }
        Err(e) => e,
    };
    expect.assert_eq(&got);
}

#[test]
fn loads_and_rejects_disagreement() {
    let tied = tiny_config(true);
    let untied = tiny_config(false);
    check(
        &tied,
        |_| {},
        expect_test::expect![[
            r#"ok 78848 params, eos Some(2), prompt "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n""#
        ]],
    );
    check(
        &untied,
        |_| {},
        expect_test::expect![[
            r#"ok 95936 params, eos Some(2), prompt "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n""#
        ]],
    );
    check(
        &tied,
        |c| c["num_hidden_layers"] = json!(3),
        expect_test::expect![
            "DIR/model.safetensors: tensor model.layers.2.input_layernorm.weight is missing"
        ],
    );
    check(
        &tied,
        |c| c["intermediate_size"] = json!(128),
        expect_test::expect![
            "DIR/model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [96, 64], the config says [128, 64]"
        ],
    );
    check(
        &tied,
        |c| c["tie_word_embeddings"] = json!(false),
        expect_test::expect![
            "DIR/model.safetensors: tensor lm_head.weight (config.json says tie_word_embeddings is false) is missing"
        ],
    );
    check(
        &untied,
        |c| c["tie_word_embeddings"] = json!(true),
        expect_test::expect![[
            r#"ok 78848 params, eos Some(2), prompt "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n""#
        ]],
    );
    check(
        &tied,
        |c| c["num_hidden_layers"] = json!(1),
        expect_test::expect![
            "DIR/model.safetensors: tensor model.layers.1.input_layernorm.weight is not part of a Llama of this config"
        ],
    );
    check(
        &tied,
        |c| c["model_type"] = json!("qwen2"),
        expect_test::expect![[
            r#"DIR/config.json: unsupported model: model_type "qwen2"; this loader reads "llama""#
        ]],
    );
    check(
        &tied,
        |c| c["vocab_size"] = json!(100),
        expect_test::expect![
            "DIR/model.safetensors: tensor model.embed_tokens.weight has shape [267, 64], the config says [100, 64]"
        ],
    );
    check(
        &tied,
        |c| {
            c.as_object_mut().map(|o| o.remove("hidden_size"));
        },
        expect_test::expect!["DIR/config.json: missing field `hidden_size` at line 1 column 313"],
    );
}
