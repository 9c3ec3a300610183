//! The one test that loads the real SmolLM2-135M-Instruct (fetched and cached on first
//! use), once, and checks what needs it: its greedy tokens equal HF transformers' on the
//! same GGUF (recorded in `tests/golden/smollm2_greedy.json` by
//! `scripts/smollm2_greedy.py`), the chat datasets through its tokenizer and template,
//! and base + a LoRA adapter against PEFT (`crate::export`).

use models::{ChatMessage, load_gguf, smollm2};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    eos_token_id: u32,
    max_new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    prompt: String,
    prompt_ids: Vec<u32>,
    new_ids: Vec<u32>,
    text: String,
}

#[test]
fn smollm2_loaded_once_checks_everything_that_needs_it() {
    let path = smollm2::fetch::ensure_gguf().unwrap_or_else(|e| panic!("fetching SmolLM2: {e}"));
    let model = load_gguf(&path, Some(256)).unwrap_or_else(|e| panic!("{e}"));
    greedy_tokens_equal_hf_transformers(&model);
    shakespeare_chat_set_is_regenerated_byte_for_byte(&model);
    // Last: it takes the weights.
    crate::export::smollm2_with_the_random_adapter_gives_peft_s_greedy_tokens(model);
}

fn greedy_tokens_equal_hf_transformers(model: &models::Pretrained) {
    let golden: Golden = serde_json::from_str(include_str!("../golden/smollm2_greedy.json"))
        .unwrap_or_else(|e| panic!("the golden file: {e}"));
    assert_eq!(model.eos_token_id, Some(golden.eos_token_id));
    let mut backend = engine::open_model(
        "cpu",
        &model.spec(),
        model.params.clone(),
        engine::Purpose::Eval,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    for case in &golden.cases {
        let prompt = match case.kind.as_str() {
            "chat" => {
                let user = "What is the capital of France?";
                model
                    .chat_prompt(&[ChatMessage::user(user)])
                    .unwrap_or_else(|e| panic!("{e}"))
            }
            _ => case.prompt.clone(),
        };
        assert_eq!(prompt, case.prompt, "{}: the rendered prompt", case.kind);
        let ids = model.encode(&prompt).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ids, case.prompt_ids, "{}: the prompt's tokens", case.kind);
        if case.kind == "chat" {
            // The chat dataset's turn-by-turn tokens of the user turn are HF's prompt
            // tokens up to the generation prompt.
            let user = ChatMessage::user("What is the capital of France?");
            let t = models::tokenize_chat(model, &[user]).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                case.prompt_ids.starts_with(&t.ids),
                "chat tokens {:?}",
                t.ids
            );
            assert_eq!(t.n_loss(), 0);
        }
        let new = models::greedy(
            backend.as_mut(),
            &ids,
            golden.max_new_tokens,
            &[golden.eos_token_id],
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let text = model.decode(&new).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (&new, &text),
            (&case.new_ids, &case.text),
            "{}: greedy tokens",
            case.kind
        );
    }
    // The example chat dataset through the real tokenizer: every conversation's turns
    // tokenize as the whole rendering does, and what counts is each answer and its
    // `<|im_end|>`.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/chat-example.jsonl");
    for c in models::read_chat_jsonl(&path).unwrap_or_else(|e| panic!("{e}")) {
        let t = models::tokenize_chat(model, &c.messages)
            .unwrap_or_else(|e| panic!("line {}: {e}", c.line));
        let counted: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.loss)
            .filter(|(_, l)| **l)
            .map(|(&id, _)| id)
            .collect();
        let answers: String = c
            .messages
            .iter()
            .filter(|m| m.role == "assistant")
            .map(|m| format!("{}<|im_end|>", m.content))
            .collect();
        let text = model.decode(&counted).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text, answers, "line {}", c.line);
    }
}

/// `data/shakespeare-chat.jsonl` is what `models::shakespeare_chat` makes of the committed
/// corpus through SmolLM2's tokenizer and chat template, byte for byte (so `cargo xtask
/// chat-data` rewrites it unchanged), and every conversation renders to at most 256
/// tokens with its answer counting in the loss.
fn shakespeare_chat_set_is_regenerated_byte_for_byte(model: &models::Pretrained) {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let corpus = std::fs::read_to_string(data.join("shakespeare.txt"))
        .unwrap_or_else(|e| panic!("the corpus: {e}"));
    let conversations =
        models::shakespeare_chat::conversations(&corpus, Default::default(), |messages| {
            models::tokenize_chat(model, messages).map(|t| t.ids.len())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let text = models::shakespeare_chat::to_jsonl(&conversations);
    let committed = std::fs::read_to_string(data.join("shakespeare-chat.jsonl"))
        .unwrap_or_else(|e| panic!("the committed set: {e}"));
    assert!(
        text == committed,
        "data/shakespeare-chat.jsonl is not what the generator writes: run `cargo xtask chat-data`"
    );
    let read = models::read_chat_jsonl(&data.join("shakespeare-chat.jsonl"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read.len(), conversations.len());
    for c in &read {
        let t = models::tokenize_chat(model, &c.messages)
            .unwrap_or_else(|e| panic!("line {}: {e}", c.line));
        assert!(
            t.ids.len() <= 256,
            "line {}: {} tokens",
            c.line,
            t.ids.len()
        );
        assert!(t.n_loss() > 0, "line {}: no answer", c.line);
    }
}
