//! The `hivetrain` binary end to end: a short real run, and every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

mod chaos;
mod nat;
mod peers;
mod uploads;

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    /// As `run`, with `input` on standard input.
    fn run_with_stdin(&self, args: &[&str], input: &str) -> (bool, String, String) {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_hivetrain"))
            .args(args)
            .env("HIVETRAIN_CACHE_DIR", self.path("cache"))
            .current_dir(self.dir.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run hivetrain");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        let clean = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.success(), clean(&out.stdout), clean(&out.stderr))
    }

    /// Runs hivetrain with a private cache; returns (success, stdout, stderr) with the
    /// sandbox path replaced by `$TMP`.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_hivetrain"))
            .args(args)
            .env("HIVETRAIN_CACHE_DIR", self.path("cache"))
            .env("HIVETRAIN_DEVICE", "cpu:2")
            .current_dir(self.dir.path())
            .output()
            .expect("run hivetrain");
        let tmp = self.dir.path().to_string_lossy().into_owned();
        let clean = |b: &[u8]| String::from_utf8_lossy(b).replace(&tmp, "$TMP");
        (out.status.success(), clean(&out.stdout), clean(&out.stderr))
    }
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .to_string_lossy()
        .into_owned()
}

/// The first 300 KB of the corpus, cut at a line.
fn small_corpus(sandbox: &Sandbox) -> PathBuf {
    let text = std::fs::read_to_string(repo("data/shakespeare.txt")).expect("corpus");
    let cut = text[..300_000].rfind('\n').expect("a line");
    sandbox.write("small.txt", &text.as_bytes()[..cut + 1])
}

/// Copies the committed tokenizer into the sandbox; returns its relative path.
fn copy_tokenizer(sandbox: &Sandbox) -> &'static str {
    std::fs::copy(repo("data/tokenizer.json"), sandbox.path("tokenizer.json"))
        .expect("copy tokenizer");
    "tokenizer.json"
}

#[track_caller]
fn check_error(sandbox: &Sandbox, args: &[&str], expect: expect_test::Expect) {
    let (ok, _, stderr) = sandbox.run(args);
    assert!(!ok, "expected failure, got success: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error") || l.starts_with("  caused by"))
        .collect();
    expect.assert_eq(&errors.join("\n"));
}

#[test]
fn train_generate_export_round_trip() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let corpus = corpus.to_str().expect("utf-8 path");
    let tokenizer = repo("data/tokenizer.json");
    let (ok, stdout, stderr) = sandbox.run(&[
        "train",
        "--preset",
        "tiny",
        "--steps",
        "40",
        "--batch",
        "8",
        "--eval-every",
        "20",
        "--corpus",
        corpus,
        "--tokenizer",
        &tokenizer,
        "--out",
        "model",
        "--sample-tokens",
        "20",
        "--lr",
        "1e-2",
    ]);
    assert!(ok, "train failed: {stderr}");
    assert!(stdout.contains("--- sample ---"), "{stdout}");
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sandbox.path("model/train-log.json")).expect("log"))
            .expect("json");
    let curve = log["curve"].as_array().expect("curve");
    let first = curve[0]["holdout_loss"].as_f64().expect("loss");
    let last = curve[curve.len() - 1]["holdout_loss"]
        .as_f64()
        .expect("loss");
    assert!(last < first - 1.0, "holdout loss {first} -> {last}");

    let (ok, stdout, stderr) = sandbox.run(&[
        "generate",
        "--model",
        "model",
        "--max-tokens",
        "10",
        "--seed",
        "4",
        "KING.",
    ]);
    assert!(ok, "generate failed: {stderr}");
    assert!(stdout.starts_with("KING.") && stdout.len() > 6, "{stdout}");
    let (_, again, _) = sandbox.run(&[
        "generate",
        "--model",
        "model",
        "--max-tokens",
        "10",
        "--seed",
        "4",
        "KING.",
    ]);
    assert_eq!(stdout, again, "same seed, same text");

    let (ok, _, stderr) = sandbox.run(&["export", "--model", "model", "--hf", "hf"]);
    assert!(ok, "export failed: {stderr}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sandbox.path("hf/config.json")).expect("config"))
            .expect("json");
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_embd"], 32);
    let exported =
        engine::checkpoint::load(&sandbox.path("hf/model.safetensors")).expect("exported");
    let trained =
        engine::checkpoint::load(&sandbox.path("model/model.safetensors")).expect("trained");
    assert_eq!(exported.params, trained.params);
}

#[test]
fn bad_corpus_files() {
    let sandbox = Sandbox::new();
    let t = copy_tokenizer(&sandbox);
    check_error(
        &sandbox,
        &["train", "--corpus", "missing.txt", "--tokenizer", t],
        expect_test::expect![[r#"
        error: reading the corpus missing.txt
          caused by: cannot read missing.txt
          caused by: No such file or directory (os error 2)"#]],
    );
    sandbox.write("binary.txt", b"\x00\xff\xfe\x80 not text");
    check_error(
        &sandbox,
        &["train", "--corpus", "binary.txt", "--tokenizer", t],
        expect_test::expect![[r#"
        error: reading the corpus binary.txt
          caused by: binary.txt is not UTF-8 text (first bad byte at offset 1); give a UTF-8 text file or JSON lines with a "text" field"#]],
    );
    sandbox.write("short.txt", b"To be, or not to be, that is the question.");
    check_error(
        &sandbox,
        &["train", "--corpus", "short.txt", "--tokenizer", t],
        expect_test::expect![
            "error: short.txt gives 13 tokens; 2580 are needed (one context of 128 plus one for the target, in both the train and the holdout split)"
        ],
    );
    sandbox.write(
        "bad.jsonl",
        b"{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n",
    );
    check_error(
        &sandbox,
        &["train", "--corpus", "bad.jsonl", "--tokenizer", t],
        expect_test::expect![[r#"
        error: reading the corpus bad.jsonl
          caused by: bad.jsonl line 2: the object has no "text" field"#]],
    );
    // JSON lines that are fine train (documents joined by the end-of-text token).
    let text = std::fs::read_to_string(repo("data/shakespeare.txt")).expect("corpus");
    let lines: String = text[..120_000]
        .split("\n\n")
        .map(|doc| serde_json::json!({ "text": doc }).to_string() + "\n")
        .collect();
    sandbox.write("plays.jsonl", lines.as_bytes());
    let (ok, _, stderr) = sandbox.run(&[
        "train",
        "--corpus",
        "plays.jsonl",
        "--tokenizer",
        t,
        "--preset",
        "tiny",
        "--steps",
        "3",
        "--sample-tokens",
        "0",
        "--out",
        "jsonl-model",
    ]);
    assert!(ok, "training on JSON lines failed: {stderr}");
}

#[test]
fn bad_tokenizer_checkpoint_device_and_preset() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let c = corpus.to_str().expect("utf-8 path");
    check_error(
        &sandbox,
        &["train", "--corpus", c, "--tokenizer", "nope.json"],
        expect_test::expect![[r#"
        error: loading the tokenizer nope.json
          caused by: cannot read nope.json
          caused by: No such file or directory (os error 2)"#]],
    );
    sandbox.write("broken.json", b"{\"model\": 3}");
    check_error(
        &sandbox,
        &["train", "--corpus", c, "--tokenizer", "broken.json"],
        expect_test::expect![[r#"
        error: loading the tokenizer broken.json
          caused by: broken.json is not a usable tokenizer.json: data did not match any variant of untagged enum ModelUntagged at line 1 column 12"#]],
    );
    let t = copy_tokenizer(&sandbox);
    check_error(
        &sandbox,
        &["train", "--corpus", c, "--tokenizer", t, "--device", "gpu"],
        expect_test::expect![[
            r#"error: unknown device "gpu": expected auto, cpu, cpu:N, cuda or cuda:N (N a thread count for cpu, a GPU number for cuda)"#
        ]],
    );
    check_error(
        &sandbox,
        &[
            "train",
            "--corpus",
            c,
            "--tokenizer",
            t,
            "--eval-every",
            "0",
        ],
        expect_test::expect![
            "error: --steps, --batch, --eval-every and --eval-batches must be at least 1"
        ],
    );
    check_error(
        &sandbox,
        &["train", "--corpus", c, "--tokenizer", t, "--lr=-1"],
        expect_test::expect!["error: --lr must be a positive number, got -1"],
    );
    // A run that cannot fit in memory is refused up front (the available figure varies).
    let (ok, _, stderr) = sandbox.run(&[
        "train",
        "--corpus",
        c,
        "--tokenizer",
        t,
        "--preset",
        "base",
        "--batch",
        "4000",
    ]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("error: training with batch 4000 x 1024 tokens needs about"),
        "{stderr}"
    );
    assert!(stderr.contains("lower --batch or --seq"), "{stderr}");
    check_error(
        &sandbox,
        &["train", "--corpus", c, "--tokenizer", t, "--preset", "huge"],
        expect_test::expect![[
            r#"error: unknown preset "huge": choose one of tiny, small, medium, base"#
        ]],
    );

    sandbox.write("garbage.safetensors", b"this is not a checkpoint at all");
    check_error(
        &sandbox,
        &[
            "generate",
            "--model",
            "garbage.safetensors",
            "--tokenizer",
            t,
        ],
        expect_test::expect![[
            r#"error: garbage.safetensors is not a valid safetensors file: header too large"#
        ]],
    );
    check_error(
        &sandbox,
        &["generate", "--model", "nothing-here"],
        expect_test::expect![[
            r#"error: no checkpoint at nothing-here: give --model a directory written by `hivetrain train` or a .safetensors file"#
        ]],
    );
    // A checkpoint whose shapes do not match its config, and one whose vocabulary does
    // not match the tokenizer.
    let config = engine::Preset::Tiny.config(8192);
    let params = engine::init_params(&config, 1).expect("init");
    let mut bytes =
        engine::checkpoint::to_bytes(&config, &params, &Default::default()).expect("bytes");
    // The config sits in the header as an escaped JSON string.
    let escaped = |c: &engine::GptConfig| {
        let json = serde_json::to_string(&serde_json::to_string(c).expect("json")).expect("json");
        json[1..json.len() - 1].to_string()
    };
    let wrong = escaped(&engine::GptConfig {
        n_embd: 64,
        n_head: 2,
        ..config
    });
    let right = escaped(&config);
    let at = bytes
        .windows(right.len())
        .position(|w| w == right.as_bytes())
        .expect("config in header");
    assert_eq!(wrong.len(), right.len());
    bytes[at..at + right.len()].copy_from_slice(wrong.as_bytes());
    sandbox.write("mismatch.safetensors", &bytes);
    check_error(
        &sandbox,
        &[
            "generate",
            "--model",
            "mismatch.safetensors",
            "--tokenizer",
            t,
        ],
        expect_test::expect![[
            r#"error: mismatch.safetensors: tensor transformer.wte.weight has shape [8192, 32], the config needs [8192, 64]"#
        ]],
    );
    let small = engine::Preset::Tiny.config(300);
    let path = sandbox.path("small-vocab.safetensors");
    engine::checkpoint::save(
        &path,
        &small,
        &engine::init_params(&small, 1).expect("init"),
        &Default::default(),
    )
    .expect("save");
    check_error(
        &sandbox,
        &[
            "generate",
            "--model",
            "small-vocab.safetensors",
            "--tokenizer",
            t,
        ],
        expect_test::expect![[
            r#"error: the tokenizer tokenizer.json has 8192 tokens but the model small-vocab.safetensors expects 300"#
        ]],
    );
}

/// `demo --p2p`: peers with no coordinator certify every version, and every peer ends on
/// the same version hash with the same credit for each.
#[test]
fn a_p2p_demo_certifies_versions_every_peer_agrees_on() {
    let sandbox = Sandbox::new();
    let (ok, stdout, stderr) = sandbox.run(&[
        "demo",
        "--p2p",
        "--peers",
        "4",
        "--rounds",
        "3",
        "--local-steps",
        "10",
        "--sample-tokens",
        "10",
    ]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("no coordinator, over QUIC (iroh) on loopback"),
        "{stdout}"
    );
    assert!(stdout.contains("sample of version 3"), "{stdout}");
    let views: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("peer-") && l.contains(" version 3 "))
        .collect();
    assert_eq!(views.len(), 4, "{stdout}");
    // Everything but the name and the traffic is the same in every peer's view.
    let agreed = |l: &str| {
        let hash = l
            .split("hash ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next());
        let credit = l.split("credit: ").nth(1);
        (hash.map(str::to_owned), credit.map(str::to_owned))
    };
    assert!(
        views.iter().all(|l| agreed(l) == agreed(views[0])),
        "{stdout}"
    );
    // The loss fell from version 0 to version 3.
    let loss = |version: &str| -> f32 {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(version))
            // version, round, proposer, accepted, re-runs ok/failed, holdout loss
            .and_then(|l| l.split_whitespace().nth(5))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no version {version} row:\n{stdout}"))
    };
    assert!(loss("3") < loss("0"), "{stdout}");
}

#[test]
fn demo_then_the_registry_lists_exports_and_generates_its_versions() {
    let sandbox = Sandbox::new();
    let corpus = small_corpus(&sandbox);
    let corpus = corpus.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = sandbox.run(&[
        "demo",
        "--preset",
        "tiny",
        "--workers",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "60",
        "--corpus",
        &corpus,
        "--dir",
        "run",
        "--sample-tokens",
        "10",
    ]);
    assert!(ok, "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("over HTTP on loopback"), "{stdout}");
    assert!(
        stdout.contains("version  holdout loss  accepted"),
        "{stdout}"
    );
    assert!(stdout.contains("sample of version"), "{stdout}");
    // 60 steps of the tiny model earn each volunteer enough for the demo's paid query.
    assert!(
        stdout.contains("asks the model through POST /v1/completions and pays"),
        "{stdout}"
    );
    assert!(
        stdout.contains("dividends: the revenue paid back to"),
        "{stdout}"
    );

    let (ok, list, stderr) = sandbox.run(&["model", "list", "--run", "run"]);
    assert!(ok, "{stderr}");
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert!(rows.len() >= 3, "{list}");
    assert!(
        rows[0]
            .trim_start()
            .starts_with("0       -      -        0"),
        "{list}"
    );
    assert!(
        rows[1]
            .trim_start()
            .starts_with("1       0      0        2"),
        "{list}"
    );

    let (ok, text, stderr) = sandbox.run(&[
        "generate",
        "--run",
        "run",
        "--version",
        "1",
        "--max-tokens",
        "5",
        "To be",
    ]);
    assert!(ok, "{stderr}");
    assert!(text.starts_with("To be"), "{text}");
    let (ok, out, stderr) = sandbox.run(&[
        "model",
        "export",
        "--run",
        "run",
        "--version",
        "2",
        "--hf",
        "hf",
    ]);
    assert!(ok, "{stderr}");
    assert!(out.contains("exported version 2"), "{out}");
    assert!(sandbox.path("hf/config.json").exists());

    // How many versions the demo made depends on when its last round ended.
    let (ok, _, stderr) = sandbox.run(&["generate", "--run", "run", "--version", "99"]);
    assert!(
        !ok && stderr.contains("error: the run in run has no version 99; it has 0 to "),
        "{stderr}"
    );
    check_error(
        &sandbox,
        &["model", "list", "--run", "nowhere"],
        expect_test::expect![
            "error: nowhere holds no run: give --run the directory a coordinator (or the demo) used"
        ],
    );
    check_error(
        &sandbox,
        &["demo", "--workers", "0"],
        expect_test::expect![
            "error: --workers, --threads-per-worker and --rounds must be at least 1"
        ],
    );
    check_error(
        &sandbox,
        &["coordinator", "--codec", "int4", "--print-config"],
        expect_test::expect![[
            r#"error: unknown codec "int4": choose fp32, fp16, int8 or int8-codebook"#
        ]],
    );
}

#[test]
fn coordinator_and_demo_print_their_effective_config() {
    let sandbox = Sandbox::new();
    // (arguments, lines the TOML must hold): flags override the defaults, and the demo
    // shows its own defaults (two workers' units, outer momentum 0.5).
    let cases: &[(&[&str], &[&str])] = &[
        (
            &[
                "coordinator",
                "--print-config",
                "--preset",
                "tiny",
                "--local-steps",
                "7",
                "--codec",
                "fp16",
            ],
            &["preset = \"tiny\"", "steps_per_unit = 7", "kind = \"fp16\""],
        ),
        (
            &["demo", "--print-config", "--workers", "3"],
            &["units_per_round = 3", "momentum = 0.5"],
        ),
        // The fine-tune demo: SmolLM2 (fetched once, cached) with a rank-8 adapter on
        // the Shakespeare chats, in windows of 256 tokens.
        (
            &["demo", "--finetune", "--print-config"],
            &["batch = 2", "seq = 256", "data = \"chat\"", "rank = 8"],
        ),
    ];
    for (args, lines) in cases {
        let (ok, out, stderr) = sandbox.run(args);
        assert!(ok, "{args:?}: {stderr}");
        for line in *lines {
            assert!(
                out.lines().any(|l| l == *line),
                "{args:?}: no {line:?} in\n{out}"
            );
        }
    }
}

/// Writes `key` as a key file the CLI accepts (hex seed, mode 0600).
fn key_file(sandbox: &Sandbox, name: &str, key: &ed25519_dalek::SigningKey) -> String {
    let path = sandbox.write(
        name,
        format!("{}\n", hex::encode(key.to_bytes())).as_bytes(),
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    path.to_string_lossy().into_owned()
}

#[test]
fn wallets_leaderboard_and_a_ledger_checked_offline() {
    let sandbox = Sandbox::new();
    let server_dir = tempfile::tempdir().expect("tempdir");
    let mut config = test_support::hand_made(test_support::tiny_config(server_dir.path(), 3));
    // Long units (crafted here, not trained), so that a unit's credit pays for queries.
    config.schedule.steps_per_unit = 1000;
    let server = test_support::start(server_dir.path(), config);
    let url = server.url();
    let (alice, bob) = (test_support::key(1), test_support::key(2));
    test_support::register(&url, &alice, "alice");
    test_support::register(&url, &bob, "bob");
    let n = server.with_core(|c| c.params().len());
    for key in [&alice, &alice, &bob] {
        let unit = test_support::lease(&url, key);
        assert_eq!(
            test_support::submit_crafted(&url, key, &unit, n).status,
            200
        );
    }
    let alice_key = key_file(&sandbox, "alice.key", &alice);
    let bob_wallet = protocol::WorkerId::of(&bob).to_string();
    let remote = ["--coordinator", url.as_str(), "--key", alice_key.as_str()];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&remote);
        let (ok, out, err) = sandbox.run(&all);
        assert!(ok, "{args:?}: {err}");
        out
    };

    let balance = run(&["wallet", "balance"]);
    assert!(balance.contains("for 2 accepted units"), "{balance}");
    let sent = run(&[
        "wallet",
        "transfer",
        &bob_wallet,
        "0.000002",
        "--reference",
        "gift",
    ]);
    assert!(sent.contains("sent 0.000002 credits"), "{sent}");
    let board = run(&["leaderboard"]);
    let names: Vec<&str> = board
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(names, ["alice", "bob"], "{board}");
    assert!(run(&["stats"]).contains("accepted updates   3"));
    let history = run(&["wallet", "history"]);
    assert!(
        history.contains("transfer") && history.contains("update:"),
        "{history}"
    );

    let online = run(&["ledger", "verify"]);
    assert!(online.contains("ledger ok: 4 entries"), "{online}");
    assert!(online.contains("3 entries of wallet"), "{online}");
    let export = sandbox.path("ledger.jsonl");
    run(&["ledger", "export", "--out", export.to_str().expect("path")]);
    let offline = run(&["ledger", "verify", "--file", export.to_str().expect("path")]);
    assert!(offline.contains("ledger ok: 4 entries"), "{offline}");

    // One byte flipped in entry 2 (the third entry line): verification fails there.
    let text = std::fs::read_to_string(&export).expect("export");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let at = lines[3].find("\"time_ms\":").expect("time field") + 11;
    let mut bytes = lines[3].clone().into_bytes();
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    lines[3] = String::from_utf8(bytes).expect("utf8");
    let tampered = sandbox.write("tampered.jsonl", (lines.join("\n") + "\n").as_bytes());
    let (ok, _, err) = sandbox.run(&[
        "ledger",
        "verify",
        "--file",
        tampered.to_str().expect("path"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("ledger broken at entry 2: its hash does not match"),
        "{err}"
    );

    // Bad input: a clear sentence, non-zero exit.
    let (ok, _, err) = sandbox.run(&[
        "wallet",
        "transfer",
        "nobody",
        "1",
        "--coordinator",
        &url,
        "--key",
        &alice_key,
    ]);
    assert!(!ok && err.contains("is not a wallet"), "{err}");
    let (ok, _, err) = sandbox.run(&[
        "wallet",
        "transfer",
        &bob_wallet,
        "1e3",
        "--coordinator",
        &url,
        "--key",
        &alice_key,
    ]);
    assert!(!ok && err.contains("is not an amount of credits"), "{err}");
    let (ok, _, err) = sandbox.run(&[
        "wallet",
        "transfer",
        &bob_wallet,
        "1000",
        "--coordinator",
        &url,
        "--key",
        &alice_key,
    ]);
    assert!(!ok && err.contains("insufficient_credit"), "{err}");
    let (ok, _, err) = sandbox.run(&[
        "wallet",
        "balance",
        "--coordinator",
        &url,
        "--key",
        "missing.key",
    ]);
    assert!(!ok && err.contains("run `hivetrain worker` once"), "{err}");

    // Queries: one prompt, then a chat; each spends alice's credit.
    let before = server.with_core(|c| c.wallet(protocol::WorkerId::of(&alice), Some(0)).balance);
    let (ok, out, err) = sandbox.run(&[
        "query",
        "KING HENRY:",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--coordinator",
        &url,
        "--key",
        &alice_key,
    ]);
    assert!(ok, "{err}");
    assert!(out.starts_with("KING HENRY:"), "{out}");
    assert!(err.contains("generated tokens; balance"), "{err}");
    let (ok, out, err) = sandbox.run_with_stdin(
        &[
            "query",
            "--max-tokens",
            "4",
            "--coordinator",
            &url,
            "--key",
            &alice_key,
        ],
        "balance\nWho goes there?\nquit\n",
    );
    assert!(ok, "{err}");
    assert!(
        out.lines().next().is_some_and(|l| l.ends_with(" credits")),
        "{out}"
    );
    assert!(err.contains("`quit` leaves"), "{err}");
    let after = server.with_core(|c| c.wallet(protocol::WorkerId::of(&alice), Some(0)).balance);
    assert!(after < before, "queries spend credit: {before} -> {after}");
    let key = run(&["wallet", "api-key"]);
    assert!(key.trim().starts_with("hk-"), "{key}");
    // The queries revoked the keys they made: only this one is left to revoke.
    let revoked = run(&["wallet", "revoke-keys"]);
    assert_eq!(revoked.trim(), "revoked 1 API keys of your wallet");
    server.stop();

    // The stopped run served alone: the model and the ledger, no work for workers.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hivetrain"))
        .args(["serve", "--bind", "127.0.0.1:0", "--run"])
        .arg(server_dir.path().join("store"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hivetrain serve");
    // The reader lives until the child is killed: a closed pipe would end the server
    // at its next line of output.
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    // The line that names the URL comes after the start's log lines (a few at most).
    let served = (0..32)
        .find_map(|_| {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut stderr, &mut line).expect("serve's output");
            line.split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(|url| url.trim_end_matches("/v1").to_owned())
        })
        .expect("serve prints its URL");
    let models = reqwest::blocking::get(format!("{served}/v1/models")).expect("models");
    assert_eq!(models.status(), 200);
    let lease = reqwest::blocking::Client::new()
        .post(format!("{served}/v1/lease"))
        .send()
        .expect("lease");
    assert_eq!(lease.status(), 404);
    let (ok, out, err) = sandbox.run(&[
        "query",
        "To be",
        "--max-tokens",
        "3",
        "--coordinator",
        &served,
        "--key",
        &alice_key,
    ]);
    child.kill().expect("kill");
    let _ = child.wait();
    drop(stderr);
    assert!(ok && out.starts_with("To be"), "{out}{err}");
}

/// `hivetrain query` against a LoRA fine-tune of a pretrained base: a prompt (completed on
/// base + adapter) and a chat (rendered through the base's template), each paid with a
/// volunteer's credit.
#[test]
fn query_a_fine_tuned_model() {
    use test_support as ts;
    let sandbox = Sandbox::new();
    let server_dir = tempfile::tempdir().expect("tempdir");
    let mut config = ts::hand_made(ts::tiny_finetune_config(server_dir.path(), 2));
    // Long units (crafted here, not trained), and a tiny model's answers priced within
    // the micro-credits they earn.
    config.schedule.steps_per_unit = 1000;
    config.serving.price_prompt_token = 0;
    config.serving.price_output_token = 1;
    let server = ts::start(server_dir.path(), config);
    let url = server.url();
    let alice = ts::key(1);
    ts::register(&url, &alice, "alice");
    let n = server.with_core(|c| c.params().len());
    for _ in 0..2 {
        let unit = ts::lease(&url, &alice);
        assert_eq!(ts::submit_crafted(&url, &alice, &unit, n).status, 200);
    }
    let alice_key = key_file(&sandbox, "alice.key", &alice);
    let remote = ["--coordinator", url.as_str(), "--key", alice_key.as_str()];
    let before = server.with_core(|c| c.wallet(protocol::WorkerId::of(&alice), Some(0)).balance);
    let mut args = vec!["query", "code 7", "--max-tokens", "3", "--temperature", "0"];
    args.extend_from_slice(&remote);
    let (ok, out, err) = sandbox.run(&args);
    assert!(ok, "{err}");
    assert!(out.starts_with("code 7"), "{out}");
    assert!(err.contains("generated tokens; balance"), "{err}");
    let mut args = vec!["query", "--max-tokens", "2"];
    args.extend_from_slice(&remote);
    let (ok, out, err) = sandbox.run_with_stdin(&args, "code 7\nbalance\nquit\n");
    assert!(ok && !err.contains("error"), "{out}{err}");
    assert!(err.contains("generated tokens; balance"), "{err}");
    assert!(out.lines().any(|l| l.ends_with(" credits")), "{out}");
    let after = server.with_core(|c| c.wallet(protocol::WorkerId::of(&alice), Some(0)).balance);
    assert!(after < before, "queries spend credit: {before} -> {after}");
    server.stop();
}

/// `hivetrain model prune` on a stopped run that kept everything: refused while a
/// coordinator holds the run, then it removes the checkpoints, optimizer states and
/// update blobs the policy lets go of, and what a crash left, and says so; the registry
/// still lists every version, marking the pruned ones, and exporting one is refused
/// with the versions kept.
#[test]
fn model_prune_thins_a_stopped_run() {
    use test_support as ts;
    let sandbox = Sandbox::new();
    let mut config = ts::hand_made(ts::tiny_config(sandbox.dir.path(), 2));
    config.retention.enabled = false;
    let server = ts::start(sandbox.dir.path(), config.clone());
    let url = server.url();
    let keys = [ts::key(1), ts::key(2)];
    ts::register(&url, &keys[0], "alice");
    ts::register(&url, &keys[1], "bob");
    for _ in 0..4 {
        for key in &keys {
            let unit = ts::lease(&url, key);
            assert_eq!(ts::submit_crafted(&url, key, &unit, 289_664).status, 200);
        }
    }
    let args = [
        "model",
        "prune",
        "--run",
        "store",
        "--keep-last",
        "1",
        "--keep-every",
        "0",
        "--update-rounds",
        "0",
    ];
    let (ok, _, stderr) = sandbox.run(&args);
    assert!(
        !ok && stderr.contains("another hivetrain process (a coordinator or `hivetrain serve`) has the run in store open"),
        "{stderr}"
    );
    server.stop();
    let store = sandbox.path("store");
    // A blob write a crash cut short.
    let prefix = store.join("blobs").join("ab");
    std::fs::create_dir_all(&prefix).expect("prefix");
    std::fs::write(
        prefix.join(format!("{}.7.0.tmp", "ab".repeat(32))),
        b"cut short",
    )
    .expect("plant a temporary file");

    let (ok, out, stderr) = sandbox.run(&args);
    assert!(ok, "{stderr}");
    expect_test::expect![[r#"
        checkpoints removed: versions 1, 2
        optimizer states removed: versions 1, 2, 3
        update blobs removed: 8
        left by crashes: 1 temporary files, 0 blobs no row named
        18545401 bytes freed; checkpoints kept: versions 0, 3-4
    "#]]
    .assert_eq(&out);
    assert_eq!(ts::stray_blobs(&store), Vec::<String>::new());
    let (ok, list, stderr) = sandbox.run(&["model", "list", "--run", "store"]);
    assert!(ok, "{stderr}");
    let checkpoints: Vec<&str> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().last().unwrap_or(""))
        .map(|c| if c == "pruned" { c } else { "kept" })
        .collect();
    assert_eq!(
        checkpoints,
        ["kept", "pruned", "pruned", "kept", "kept"],
        "{list}"
    );
    check_error(
        &sandbox,
        &[
            "model",
            "export",
            "--run",
            "store",
            "--version",
            "1",
            "--hf",
            "hf",
        ],
        expect_test::expect![
            "error: version 1 of the run in store was pruned by its retention policy; the versions kept are 0, 3-4"
        ],
    );
    // Nothing more to let go of.
    let (ok, out, stderr) = sandbox.run(&args);
    assert!(ok, "{stderr}");
    assert!(out.contains("0 bytes freed"), "{out}");
}

/// `hivetrain model fetch|info|chat` on files that are not models: a clear error, no
/// panic, nothing downloaded (the real SmolLM2 is loaded by one test, in `models`).
#[test]
fn pretrained_model_commands_refuse_bad_files() {
    let sandbox = Sandbox::new();
    check_error(
        &sandbox,
        &["model", "fetch", "llama"],
        expect_test::expect![[
            r#"error: unknown model "llama": the models hivetrain fetches by name are: smollm2"#
        ]],
    );
    check_error(
        &sandbox,
        &["model", "info", "--model", "missing.gguf"],
        expect_test::expect![
            "error: --model missing.gguf: no such file or directory (give smollm2, a .gguf file or an HF Llama directory)"
        ],
    );
    sandbox.write("old.gguf", b"GGUF\x02\0\0\0");
    check_error(
        &sandbox,
        &["model", "chat", "--model", "old.gguf", "hi"],
        expect_test::expect!["error: old.gguf: GGUF version 2; this reader takes version 3 only"],
    );
    std::fs::create_dir(sandbox.path("hf")).expect("mkdir");
    sandbox.write("hf/config.json", br#"{"model_type": "llama"}"#);
    check_error(
        &sandbox,
        &["model", "info", "--model", "hf"],
        expect_test::expect![
            "error: hf/config.json: missing field `hidden_size` at line 1 column 23"
        ],
    );
}
