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

/// The bytes of a tiny checkpoint whose metadata holds many keys, built from a map with
/// hasher keys of its own and in the given insertion order.
fn many_keys_bytes(reverse: bool) -> Vec<u8> {
    let config = Preset::Tiny.config(300);
    let params = engine::init_params(&config, 3).expect("init");
    let mut keys: Vec<usize> = (0..24).collect();
    if reverse {
        keys.reverse();
    }
    let mut extra = HashMap::with_hasher(std::collections::hash_map::RandomState::new());
    for k in keys {
        extra.insert(format!("hivetrain.key{k:02}"), k.to_string());
    }
    checkpoint::to_bytes(&config, &params, &extra).expect("bytes")
}

/// A checkpoint's bytes (and so its blake3, a coordinator's blob name and ETag) depend
/// only on its config, parameters and metadata: not on a hash map's iteration order,
/// which differs from map to map and from process to process. The layout is the
/// `safetensors` crate's: the same tensor bytes after the header, which it reads back.
#[test]
fn the_same_checkpoint_gives_the_same_bytes_whatever_the_map_order() {
    let bytes = many_keys_bytes(false);
    assert!(bytes == many_keys_bytes(true), "the metadata order leaked");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf-8 header");
    let keys: Vec<usize> = (0..24)
        .map(|k| {
            header
                .find(&format!("\"hivetrain.key{k:02}\""))
                .expect("key")
        })
        .collect();
    assert!(keys.is_sorted(), "metadata keys not in order: {header}");

    let config = Preset::Tiny.config(300);
    let params = engine::init_params(&config, 3).expect("init");
    let views: Vec<_> = engine::ParamLayout::new(&config)
        .tensors()
        .iter()
        .map(|spec| {
            let data: &[u8] = bytemuck::cast_slice(&params[spec.range()]);
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                spec.shape.clone(),
                data,
            )
            .expect("view");
            (spec.name.clone(), view)
        })
        .collect();
    let theirs = safetensors::serialize(views, None).expect("serialize");
    let their_n = u64::from_le_bytes(theirs[..8].try_into().expect("8 bytes")) as usize;
    assert!(
        bytes[8 + n..] == theirs[8 + their_n..],
        "tensor bytes differ from the crate's layout"
    );
    let loaded = checkpoint::from_bytes(std::path::Path::new("m"), &bytes, None).expect("load");
    assert_eq!(loaded.params, params);
    assert_eq!(loaded.metadata.len(), 26);
}

/// Two processes write the same checkpoint to the same bytes: this test runs itself
/// again as a child (`HIVETRAIN_CHECKPOINT_CHILD`), which prints its blake3.
#[test]
fn another_process_writes_the_same_bytes() {
    // `DefaultHasher::new` has fixed keys: the same bytes hash alike in any process.
    let hash = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        many_keys_bytes(false).hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    };
    if std::env::var_os("HIVETRAIN_CHECKPOINT_CHILD").is_some() {
        println!("checkpoint-hash={hash}");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "checkpoint::another_process_writes_the_same_bytes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HIVETRAIN_CHECKPOINT_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let child = stdout
        .lines()
        .find_map(|l| l.split("checkpoint-hash=").nth(1))
        .unwrap_or_else(|| panic!("no hash from the child: {stdout}"));
    assert_eq!(child, hash);
}
