//! Checkpoints round-trip, and bad files give errors that name the file and the problem.

use std::collections::HashMap;

use engine::Preset;
use engine::checkpoint::{self, CheckpointError};

#[test]
fn round_trip_keeps_every_bit_and_the_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.safetensors");
    let config = Preset::Tiny.config(300);
    let params = engine::init_params(&config, 3).expect("init");
    let extra = HashMap::from([("hivetrain.step".to_string(), "12".to_string())]);
    checkpoint::save(&path, &config, &params, &extra).expect("save");
    let loaded = checkpoint::load(&path).expect("load");
    assert_eq!(loaded.config, config);
    assert_eq!(loaded.params, params);
    assert_eq!(
        loaded.metadata.get("hivetrain.step").map(String::as_str),
        Some("12")
    );
    assert_eq!(
        loaded.metadata.get("format").map(String::as_str),
        Some("pt")
    );
}

#[track_caller]
fn check_error(bytes: &[u8], config: Option<engine::GptConfig>, expect: expect_test::Expect) {
    let err = checkpoint::from_bytes(std::path::Path::new("m.safetensors"), bytes, config)
        .expect_err("must fail");
    expect.assert_eq(&err.to_string());
}

#[test]
fn bad_files_are_named_errors() {
    let config = Preset::Tiny.config(300);
    let params = engine::init_params(&config, 3).expect("init");
    let good = checkpoint::to_bytes(&config, &params, &HashMap::new()).expect("bytes");
    check_error(
        b"not a checkpoint",
        None,
        expect_test::expect!["m.safetensors is not a valid safetensors file: header too large"],
    );
    check_error(
        &good[..good.len() / 2],
        None,
        expect_test::expect![
            "m.safetensors is not a valid safetensors file: incomplete metadata, file not fully covered"
        ],
    );
    let mut other = config;
    other.n_embd = 64;
    check_error(
        &good,
        Some(other),
        expect_test::expect![[
            r#"m.safetensors: tensor transformer.wte.weight has shape [300, 32], the config needs [300, 64]"#
        ]],
    );
    let missing_layer = engine::GptConfig {
        n_layer: 3,
        ..config
    };
    check_error(
        &good,
        Some(missing_layer),
        expect_test::expect![[r#"m.safetensors lacks tensor transformer.h.2.ln_1.weight"#]],
    );
    let missing = std::path::Path::new("/nonexistent/model.safetensors");
    assert!(matches!(
        checkpoint::load(missing),
        Err(CheckpointError::Read { .. })
    ));
}
