//! GGUF files: a round trip through the loader and the engine, the tokenizer and chat
//! template rebuilt from metadata, and every kind of bad file.

use std::path::Path;

use models::{ChatMessage, load_gguf};

use crate::writer::{GgufFile, Meta, Storage, llama_gguf, logits, random_params, tiny_config};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

/// Loads `file` (written as `tiny.gguf` in a temp dir) and prints the outcome: the
/// error, or the config.
#[track_caller]
fn check(file: &GgufFile, expect: expect_test::Expect) {
    check_bytes(&file.bytes(), expect);
}

#[track_caller]
fn check_bytes(bytes: &[u8], expect: expect_test::Expect) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = write(dir.path(), "tiny.gguf", bytes);
    let got = match load_gguf(&path, None) {
        Ok(model) => format!("ok {:?}", model.config),
        Err(e) => e
            .to_string()
            .replace(&dir.path().display().to_string(), "DIR"),
    };
    expect.assert_eq(&got);
}

fn tiny() -> GgufFile {
    let config = tiny_config(true);
    llama_gguf(&config, &random_params(&config, 1), Storage::F32).0
}

#[test]
fn round_trip_undoes_the_rotary_permutation() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let tokens: Vec<u32> = vec![1, 40, 80, 120, 200, 259, 266, 2, 7];
    for tie in [true, false] {
        let config = tiny_config(tie);
        let params = random_params(&config, 7);
        let want = logits(&config, params.clone(), &tokens);
        for storage in [Storage::F32, Storage::Quantized, Storage::F32Unpermuted] {
            let (file, expected) = llama_gguf(&config, &params, storage);
            let path = write(dir.path(), "m.gguf", &file.bytes());
            let model = load_gguf(&path, None).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(model.config, config, "{storage:?}");
            let got = logits(&config, model.params.clone(), &tokens);
            let max_diff = want
                .iter()
                .zip(&got)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            match storage {
                Storage::F32 => {
                    // Written values come back bit for bit, so the engine agrees exactly.
                    assert_eq!(model.params, params, "tie {tie}");
                    assert_eq!(got, want, "tie {tie}");
                }
                Storage::Quantized => {
                    // Exactly the values the blocks hold, in HF's row order.
                    assert_eq!(model.params, expected, "tie {tie}: the dequantized values");
                    assert_eq!(got, logits(&config, expected, &tokens), "tie {tie}");
                    assert!(max_diff > 0.0, "tie {tie}: quantization changed nothing");
                }
                Storage::F32Unpermuted => {
                    // A file whose q and k are in HF's order is read as permuted: the
                    // loader's un-permutation shows in the logits.
                    assert_ne!(model.params, params);
                    assert!(
                        max_diff > 1e-3,
                        "tie {tie}: permutation made no difference ({max_diff})"
                    );
                }
            }
        }
    }
}

#[test]
fn tokenizer_and_chat_template_from_metadata() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = write(dir.path(), "t.gguf", &tiny().bytes());
    let model = load_gguf(&path, None).unwrap_or_else(|e| panic!("{e}"));
    let show = |text: &str| {
        let ids = model.encode(text).unwrap_or_else(|e| panic!("{e}"));
        let pieces: Vec<String> = ids
            .iter()
            .map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default())
            .collect();
        let back = model.decode(&ids).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, text);
        format!("{ids:?} {}", pieces.join(" "))
    };
    expect_test::expect!["[262, 265, 266, 47, 35, 52, 53, 54, 55, 56] Hello Ġwor ld , Ġ 1 2 3 4 5"]
        .assert_eq(&show("Hello world, 12345"));
    let prompt = model
        .chat_prompt(&[ChatMessage::user("Hello")])
        .unwrap_or_else(|e| panic!("{e}"));
    expect_test::expect!["[1, 120, 118, 104, 117, 13, 262, 2, 13, 1, 100, 118, 118, 108, 118, 119, 100, 113, 119, 13] <|im_start|> u s e r Ċ Hello <|im_end|> Ċ <|im_start|> a s s i s t a n t Ċ"]
        .assert_eq(&show(&prompt));
    assert_eq!((model.bos_token_id, model.eos_token_id), (Some(1), Some(2)));
}

#[test]
fn bad_files_are_typed_errors_naming_the_file() {
    let good = tiny();
    let bytes = good.bytes();

    check_bytes(
        &bytes[..bytes.len() / 2],
        expect_test::expect![
            "DIR/tiny.gguf: truncated: tensor blk.0.ffn_up.weight's data needs 24576 bytes at offset 148576, the file has 160688"
        ],
    );
    check_bytes(
        &bytes[..100],
        expect_test::expect![
            "DIR/tiny.gguf: truncated: the metadata (19 items) needs 247 bytes at offset 24, the file has 100"
        ],
    );
    check_bytes(
        b"GGML\x03\0\0\0",
        expect_test::expect![[
            r#"DIR/tiny.gguf: not a GGUF file (it starts with [47, 47, 4d, 4c], a GGUF with "GGUF")"#
        ]],
    );
    check_bytes(
        b"GG",
        expect_test::expect![[
            r#"DIR/tiny.gguf: not a GGUF file (it starts with [47, 47], a GGUF with "GGUF")"#
        ]],
    );
    check(
        &GgufFile {
            version: 2,
            ..good.clone()
        },
        expect_test::expect!["DIR/tiny.gguf: GGUF version 2; this reader takes version 3 only"],
    );

    let mut f = good.clone();
    f.tensor_mut("blk.0.attn_v.weight").type_id = 12;
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: tensor blk.0.attn_v.weight has type 12, which this reader does not know"
        ],
    );

    let mut f = good.clone();
    f.tensors.retain(|t| t.name != "blk.1.ffn_up.weight");
    check(
        &f,
        expect_test::expect!["DIR/tiny.gguf: tensor blk.1.ffn_up.weight is missing"],
    );

    let mut f = good.clone();
    f.tensor_mut("blk.1.ffn_up.weight").dims = vec![96, 64];
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: tensor blk.1.ffn_up.weight has shape [64, 96], the config says [96, 64]"
        ],
    );

    let mut f = good.clone();
    f.set("llama.block_count", Meta::Str("2".into()));
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: metadata llama.block_count is a string, expected a non-negative integer"
        ],
    );

    let mut f = good.clone();
    f.set("llama.block_count", Meta::U32(3));
    check(
        &f,
        expect_test::expect!["DIR/tiny.gguf: tensor blk.2.attn_norm.weight is missing"],
    );

    let mut f = good.clone();
    f.set("llama.block_count", Meta::U32(1));
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: tensor blk.1.attn_k.weight is not part of a Llama of this config"
        ],
    );

    let mut f = good.clone();
    f.metadata
        .retain(|(k, _)| k != "llama.attention.layer_norm_rms_epsilon");
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: metadata llama.attention.layer_norm_rms_epsilon is missing"
        ],
    );

    let mut f = good.clone();
    f.set("llama.attention.head_count_kv", Meta::U32(3));
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: the configuration is not a usable Llama: kv_heads 3 does not divide heads 4"
        ],
    );

    let mut f = good.clone();
    f.set("general.architecture", Meta::Str("gpt2".into()));
    check(
        &f,
        expect_test::expect![[
            r#"DIR/tiny.gguf: unsupported model: general.architecture is "gpt2"; this loader reads "llama""#
        ]],
    );

    let mut f = good.clone();
    f.set("tokenizer.ggml.pre", Meta::Str("qwen2".into()));
    check(
        &f,
        expect_test::expect![[
            r#"DIR/tiny.gguf: tokenizer: pre-tokenizer "qwen2" is not one this loader knows (smollm, gpt2)"#
        ]],
    );

    let mut f = good.clone();
    f.set("tokenizer.chat_template", Meta::Str("{% if %}".into()));
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: chat template: syntax error: unexpected end of block (in <string>:1)"
        ],
    );

    // Lengths read from the file are bounded by the bytes left: nothing is allocated
    // for 2^60 tensors, metadata pairs, array items or string bytes.
    let mut huge = bytes.clone();
    huge[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check_bytes(
        &huge,
        expect_test::expect![
            "DIR/tiny.gguf: truncated: the tensor infos (1152921504606846976 items) needs 18446744073709551615 bytes at offset 4802, the file has 321376"
        ],
    );
    let mut huge = bytes.clone();
    huge[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
    check_bytes(
        &huge,
        expect_test::expect![
            "DIR/tiny.gguf: truncated: the metadata (1152921504606846976 items) needs 14987979559889010688 bytes at offset 24, the file has 321376"
        ],
    );
    let mut f = good.clone();
    f.set(
        "tokenizer.ggml.merges",
        Meta::Raw(
            9,
            [8u32.to_le_bytes().as_slice(), &(1u64 << 60).to_le_bytes()].concat(),
        ),
    );
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: truncated: metadata tokenizer.ggml.merges (1152921504606846976 items) needs 9223372036854775808 bytes at offset 4339, the file has 321280"
        ],
    );
    let mut f = good.clone();
    f.set(
        "general.name",
        Meta::Raw(8, (1u64 << 62).to_le_bytes().to_vec()),
    );
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: truncated: metadata general.name needs 4611686018427387904 bytes at offset 101, the file has 321376"
        ],
    );
    let mut f = good.clone();
    f.set("general.name", Meta::Raw(13, vec![]));
    check(
        &f,
        expect_test::expect!["DIR/tiny.gguf: metadata general.name has unknown value type 13"],
    );
    let mut f = good.clone();
    f.tensor_mut("output_norm.weight").dims = vec![1 << 40];
    check(
        &f,
        expect_test::expect![
            "DIR/tiny.gguf: truncated: tensor output_norm.weight's data needs 4398046511104 bytes at offset 321120, the file has 321376"
        ],
    );
}
