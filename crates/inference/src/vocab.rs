//! What serving needs of a model's tokenizer, as one trait ([`Vocab`]): encoding a
//! prompt, decoding what was generated, the tokens that end a generation, and how a chat
//! conversation becomes a prompt. hivetrain's own GPT-2 tokenizer ([`TextTokenizer`])
//! writes chats as the corpus writes plays and stops at a blank line; a pretrained model
//! ([`PretrainedVocab`]) renders its own chat template (ChatML for SmolLM2) and stops at
//! its end-of-turn token, which is never handed out as text.

use data::TextTokenizer;
use models::{ChatMessage, ChatTemplate, Pretrained};

use crate::api::Message;

/// A prompt the vocabulary cannot turn into tokens (a sentence for the requester), or a
/// model that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VocabError {
    /// The tokenizer refused the text.
    #[error("{what}")]
    Encode { what: String },
    /// The chat template refused the conversation (a template may require an order of
    /// roles).
    #[error("the model's chat template refused the messages: {what}")]
    ChatTemplate { what: String },
    /// A pretrained model without a chat template cannot serve chats.
    #[error("{path} has no chat template to serve chats with")]
    NoChatTemplate { path: std::path::PathBuf },
}

/// A served model's tokenizer and chat format. Shared by every request of the model
/// (`Arc<dyn Vocab>`), so it is immutable and thread-safe.
pub trait Vocab: Send + Sync {
    /// The token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>, VocabError>;
    /// The text of `ids`; an unfinished UTF-8 character at the end decodes as U+FFFD
    /// (generation holds such a tail back until its last byte comes).
    fn decode(&self, ids: &[u32]) -> String;
    /// The tokens that end a generation: each counts as generated, none becomes text.
    fn stop_tokens(&self) -> Vec<u32>;
    /// The prompt of a chat conversation (roles already checked: `system`, `developer`,
    /// `user`, `assistant`), ending where the assistant's answer begins.
    fn chat_prompt(&self, messages: &[Message]) -> Result<String, VocabError>;
    /// A chat reply's stop strings when the request names none.
    fn chat_stops(&self) -> &[&str];
}

/// hivetrain's GPT-2 tokenizer: chats in the corpus's speaker format
/// ([`crate::chat_prompt`]), a reply ending at a blank line ([`crate::CHAT_STOP`]) or the
/// end-of-text token.
impl Vocab for TextTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, VocabError> {
        TextTokenizer::encode(self, text).map_err(|e| VocabError::Encode {
            what: e.to_string(),
        })
    }

    fn decode(&self, ids: &[u32]) -> String {
        TextTokenizer::decode(self, ids)
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.end_of_text().into_iter().collect()
    }

    fn chat_prompt(&self, messages: &[Message]) -> Result<String, VocabError> {
        Ok(crate::chat_prompt(messages))
    }

    fn chat_stops(&self) -> &[&str] {
        &[crate::CHAT_STOP]
    }
}

/// Special tokens that end a pretrained model's generation besides its EOS token, where
/// its vocabulary has them: ChatML's end of turn and the end of a document.
const PRETRAINED_STOP_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// A pretrained model's tokenizer and chat template (SmolLM2's ChatML): a chat is the
/// template's rendering with the generation prompt, and a reply ends at the end-of-turn
/// token (`<|im_end|>`), EOS or `<|endoftext|>`, with no stop string by default.
#[derive(Clone, Debug)]
pub struct PretrainedVocab {
    tokenizer: tokenizers::Tokenizer,
    template: ChatTemplate,
    /// Prepended to every encoding when the model asks for it (`add_bos`).
    bos: Option<u32>,
    /// Sorted, without repeats.
    stop_tokens: Vec<u32>,
}

impl PretrainedVocab {
    /// The vocabulary of `model` (its tokenizer and template are copied: the model's
    /// weights can be dropped or handed to a backend). A model without a chat template
    /// cannot serve chats, so it is an error.
    pub fn new(model: &Pretrained) -> Result<PretrainedVocab, VocabError> {
        let Some(template) = model.chat_template.clone() else {
            return Err(VocabError::NoChatTemplate {
                path: model.path.clone(),
            });
        };
        let mut stop_tokens: Vec<u32> = PRETRAINED_STOP_TOKENS
            .iter()
            .filter_map(|t| model.tokenizer.token_to_id(t))
            .chain(model.eos_token_id)
            .collect();
        stop_tokens.sort_unstable();
        stop_tokens.dedup();
        Ok(PretrainedVocab {
            tokenizer: model.tokenizer.clone(),
            template,
            bos: model.add_bos.then_some(model.bos_token_id).flatten(),
            stop_tokens,
        })
    }
}

impl Vocab for PretrainedVocab {
    /// Special tokens written in the text (`<|im_start|>`) are recognized, as the
    /// template's rendering needs.
    fn encode(&self, text: &str) -> Result<Vec<u32>, VocabError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| VocabError::Encode {
                what: e.to_string(),
            })?;
        Ok(self
            .bos
            .into_iter()
            .chain(encoding.get_ids().iter().copied())
            .collect())
    }

    /// Special tokens are kept: generation stops before its stop tokens, and any other
    /// special token the model writes is part of its text.
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }

    fn stop_tokens(&self) -> Vec<u32> {
        self.stop_tokens.clone()
    }

    /// OpenAI's `developer` role is a system message to the template.
    fn chat_prompt(&self, messages: &[Message]) -> Result<String, VocabError> {
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: match m.role.as_str() {
                    "developer" => "system".to_owned(),
                    role => role.to_owned(),
                },
                content: m.content.text(),
            })
            .collect();
        self.template
            .render(&messages, true)
            .map_err(|e| VocabError::ChatTemplate {
                what: e.to_string(),
            })
    }

    fn chat_stops(&self) -> &[&str] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::api::{ChatRequest, Content, Sampling};
    use crate::{Finish, Limits, plan_chat, run};

    fn message(role: &str, text: &str) -> Message {
        Message {
            role: role.into(),
            content: Content::Text(text.into()),
        }
    }

    fn chat(messages: &[(&str, &str)]) -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            messages: messages.iter().map(|(r, t)| message(r, t)).collect(),
            sampling: Sampling {
                temperature: Some(0.0),
                max_tokens: Some(32),
                ..Sampling::default()
            },
        }
    }

    /// A chat request planned against `vocab`: the prompt's text (decoded from its
    /// tokens), the default stop strings and the stop tokens; or the refusal.
    #[track_caller]
    fn check(vocab: &dyn Vocab, messages: &[(&str, &str)], expect: expect_test::Expect) {
        let got = match plan_chat(&chat(messages), vocab, &Limits::default(), 0) {
            Ok(plan) => format!(
                "{}\n--- {} tokens, stops {:?}, stop tokens {:?}",
                vocab.decode(&plan.prompt),
                plan.prompt.len(),
                plan.stops,
                vocab.stop_tokens()
            ),
            Err(e) => format!("{}: {}", e.code, e.message),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn hivetrain_tokenizer_chats_in_speaker_turns() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json");
        let tokenizer = TextTokenizer::load(&path).expect("tokenizer");
        check(
            &tokenizer,
            &[("developer", "A play."), ("user", "Who goes there?")],
            expect_test::expect![[r#"
                A play.

                USER:
                Who goes there?

                ASSISTANT:

                --- 21 tokens, stops ["\n\n"], stop tokens [0]"#]],
        );
    }

    /// SmolLM2-135M-Instruct (fetched and cached on first use, as the models crate's one
    /// test of it does): a chat is its ChatML template with its default system message,
    /// `developer` is a system message, a reply has no stop string and stops at
    /// `<|im_end|>` (2) or `<|endoftext|>` (0); greedy generation of the golden chat
    /// (`crates/models/tests/golden/smollm2_greedy.json`) streams the answer and stops at
    /// `<|im_end|>` without handing it out.
    #[test]
    #[ignore = "loads the real SmolLM2 (98 MB): CI's one real-model test is models' it::smollm2; run by hand with `cargo test -p inference -- --ignored`"]
    fn smollm2_chats_in_its_template_and_stops_at_its_end_of_turn() {
        let path = models::smollm2::fetch::ensure_gguf()
            .unwrap_or_else(|e| panic!("fetching SmolLM2: {e}"));
        let model = models::load_gguf(&path, Some(256)).unwrap_or_else(|e| panic!("{e}"));
        let vocab = PretrainedVocab::new(&model).unwrap_or_else(|e| panic!("{e}"));
        check(
            &vocab,
            &[("user", "What is the capital of France?")],
            expect_test::expect![[r#"
                <|im_start|>system
                You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
                <|im_start|>user
                What is the capital of France?<|im_end|>
                <|im_start|>assistant

                --- 37 tokens, stops [], stop tokens [0, 2]"#]],
        );
        check(
            &vocab,
            &[
                ("developer", "Answer in one word."),
                ("user", "Capital of Peru?"),
            ],
            expect_test::expect![[r#"
                <|im_start|>system
                Answer in one word.<|im_end|>
                <|im_start|>user
                Capital of Peru?<|im_end|>
                <|im_start|>assistant

                --- 23 tokens, stops [], stop tokens [0, 2]"#]],
        );

        let plan = plan_chat(
            &chat(&[("user", "What is the capital of France?")]),
            &vocab,
            &Limits::default(),
            0,
        )
        .expect("plan");
        let mut backend = engine::open_model(
            "cpu",
            &model.spec(),
            model.params.clone(),
            engine::Purpose::Eval,
        )
        .expect("backend");
        let mut pieces = Vec::new();
        let outcome = run(backend.as_mut(), &vocab, &plan, &mut |piece| {
            pieces.push(piece.to_owned());
            true
        })
        .expect("run");
        assert_eq!(pieces.concat(), outcome.text);
        assert_eq!(outcome.finish, Finish::Stop);
        expect_test::expect![[r#""The capital of France is Paris.", 8 tokens: ["The", " capital", " of", " France", " is", " Paris", "."]"#]].assert_eq(&format!(
            "{:?}, {} tokens: {pieces:?}",
            outcome.text, outcome.completion_tokens
        ));
    }
}
