//! Chat datasets through a tiny GGUF's tokenizer and ChatML template: the loss mask on
//! the assistant turns, the turn-by-turn tokens checked against the whole rendering, and
//! the committed example dataset packed into windows.

use std::num::NonZeroUsize;
use std::path::Path;

use models::{ChatMessage, IGNORE_TARGET, Pretrained, load_gguf, tokenize_chat};

use crate::writer::{Storage, llama_gguf, random_params, tiny_config};

fn tiny_model(dir: &Path) -> Pretrained {
    let config = tiny_config(true);
    let (file, _) = llama_gguf(&config, &random_params(&config, 1), Storage::F32);
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, file.bytes()).unwrap_or_else(|e| panic!("{e}"));
    load_gguf(&path, None).unwrap_or_else(|e| panic!("{e}"))
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// Tokenizes `messages` and prints the tokens, those that count in the loss in
/// brackets, or the error.
#[track_caller]
fn check(model: &Pretrained, messages: &[ChatMessage], expect: expect_test::Expect) {
    let got = match tokenize_chat(model, messages) {
        Ok(t) => t
            .ids
            .iter()
            .zip(&t.loss)
            .map(|(&id, &loss)| {
                let piece = model.tokenizer.id_to_token(id).unwrap_or_default();
                if loss { format!("[{piece}]") } else { piece }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => format!("error: {e}"),
    };
    expect.assert_eq(&got);
}

#[test]
fn loss_on_assistant_turns_only() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let model = tiny_model(dir.path());
    check(
        &model,
        &[
            message("system", "s"),
            message("user", "Hello"),
            message("assistant", "Hello world"),
            message("user", "or"),
            message("assistant", "ld"),
        ],
        expect_test::expect![
            "<|im_start|> s y s t e m Ċ s <|im_end|> Ċ <|im_start|> u s e r Ċ Hello <|im_end|> Ċ <|im_start|> a s s i s t a n t Ċ [Hello] [Ġwor] [ld] [<|im_end|>] Ċ <|im_start|> u s e r Ċ or <|im_end|> Ċ <|im_start|> a s s i s t a n t Ċ [ld] [<|im_end|>] Ċ"
        ],
    );
    // An answer that writes the end-of-turn token itself counts up to the last one.
    check(
        &model,
        &[message("assistant", "H<|im_end|>e")],
        expect_test::expect![
            "<|im_start|> a s s i s t a n t Ċ [H] [<|im_end|>] [e] [<|im_end|>] Ċ"
        ],
    );
    check(
        &model,
        &[message("user", "Hello")],
        expect_test::expect!["<|im_start|> u s e r Ċ Hello <|im_end|> Ċ"],
    );
    let mut no_template = tiny_model(dir.path());
    no_template.chat_template = None;
    check(
        &no_template,
        &[message("user", "x")],
        expect_test::expect!["error: the model has no chat template"],
    );
    // A template that renders each turn differently once another follows gives no exact
    // spans, and says so.
    let mut rewriting = tiny_model(dir.path());
    rewriting.chat_template = Some(
        models::ChatTemplate::new(
            Path::new("t.gguf"),
            "{% for m in messages %}{% if loop.last %}{{ m.content }}{% else %}[{{ m.content }}]{% endif %}{% endfor %}",
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    check(
        &rewriting,
        &[message("user", "a"), message("assistant", "b")],
        expect_test::expect![
            "error: the template's text for the first 1 messages is not a prefix of its text for 2 (a template that rewrites earlier turns cannot give exact spans)"
        ],
    );
    // Without special tokens between turns, BPE merges across the boundary and the
    // turn-by-turn tokens differ from the whole rendering's.
    let mut merging = tiny_model(dir.path());
    merging.chat_template = Some(
        models::ChatTemplate::new(
            Path::new("t.gguf"),
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap_or_else(|e| panic!("{e}")),
    );
    check(
        &merging,
        &[message("user", "Hel"), message("assistant", "lo")],
        expect_test::expect![
            "error: tokenized turn by turn the conversation is 4 tokens, tokenized whole 1 (first difference at token 0): a BPE merge crosses a turn boundary"
        ],
    );
}

#[test]
fn the_example_dataset_packs_into_windows() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let model = tiny_model(dir.path());
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/chat-example.jsonl");
    let conversations = models::read_chat_jsonl(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        (20..=50).contains(&conversations.len()),
        "{} conversations",
        conversations.len()
    );
    let mut chats = Vec::new();
    for c in &conversations {
        let t =
            tokenize_chat(&model, &c.messages).unwrap_or_else(|e| panic!("line {}: {e}", c.line));
        assert!(t.n_loss() > 0, "line {}: no assistant token", c.line);
        chats.push(t);
    }
    let longest = chats.iter().map(|c| c.ids.len()).max().unwrap_or(0);
    let total_loss: usize = chats.iter().map(|c| c.n_loss()).sum();
    let seq = NonZeroUsize::new(longest).unwrap_or(NonZeroUsize::MIN);
    let windows = models::load_chat_windows(&path, &model, seq).unwrap_or_else(|e| panic!("{e}"));
    // Every conversation fits, so every counted token is a target, once.
    assert_eq!(
        (
            windows.n_packed,
            windows.skipped_too_long,
            windows.skipped_no_loss
        ),
        (conversations.len(), 0, 0)
    );
    assert_eq!(windows.n_loss(), total_loss);
    assert_eq!(windows.inputs.len(), windows.n_windows() * longest);
    assert_eq!(windows.targets.len(), windows.inputs.len());
    // A target is the next input of its window, or ignored.
    for (inputs, targets) in windows
        .inputs
        .chunks(longest)
        .zip(windows.targets.chunks(longest))
    {
        for (p, &t) in targets.iter().enumerate() {
            assert!(t == IGNORE_TARGET || inputs.get(p + 1) == Some(&t));
        }
    }
    // Windows shorter than the longest conversation skip it, with a count.
    let shorter = NonZeroUsize::new(longest - 1).unwrap_or(NonZeroUsize::MIN);
    let windows =
        models::load_chat_windows(&path, &model, shorter).unwrap_or_else(|e| panic!("{e}"));
    assert!(windows.skipped_too_long >= 1);
    assert_eq!(
        windows.n_packed + windows.skipped_too_long,
        conversations.len()
    );
}

#[test]
fn errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let model = tiny_model(dir.path());
    let path = dir.path().join("bad.jsonl");
    let show = |text: &str| {
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let seq = NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN);
        match models::load_chat_windows(&path, &model, seq) {
            Ok(w) => format!("ok {} windows", w.n_windows()),
            Err(e) => e
                .to_string()
                .replace(&dir.path().display().to_string(), "DIR"),
        }
    };
    expect_test::expect![[r#"DIR/bad.jsonl:3: messages[1].role is "robot", not system, user or assistant"#]]
        .assert_eq(&show("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"robot\", \"content\": \"b\"}]}\n"));
    expect_test::expect!["ok 1 windows"].assert_eq(&show("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n"));
    let missing = dir.path().join("missing.jsonl");
    let seq = NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN);
    let err = models::load_chat_windows(&missing, &model, seq)
        .map(|_| ())
        .map_err(|e| {
            e.to_string()
                .replace(&dir.path().display().to_string(), "DIR")
        });
    assert_eq!(
        err,
        Err("DIR/missing.jsonl: No such file or directory (os error 2)".to_string())
    );
}
