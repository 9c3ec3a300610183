//! A model's chat template (Jinja, as HF's `apply_chat_template` runs it), rendered with
//! `minijinja`, which reads HF's templates (Python-style string methods through
//! `minijinja-contrib`'s pycompat).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::ModelFileError;

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A checked chat template with the special tokens it may refer to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Where the template came from, for errors.
    path: PathBuf,
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // As HF's apply_chat_template: jinja2 with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env
}

impl ChatTemplate {
    /// Compiles `source` (from `path`) so that a syntax error is found at load time.
    pub fn new(
        path: &Path,
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, ModelFileError> {
        let env = environment();
        env.template_from_str(source)
            .map_err(|e| ModelFileError::ChatTemplate {
                path: path.to_owned(),
                what: e.to_string(),
            })?;
        Ok(ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            path: path.to_owned(),
        })
    }

    /// The template's text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as the model's prompt text; with `add_generation_prompt` it ends
    /// where the assistant's answer begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelFileError> {
        let env = environment();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        env.render_str(&self.source, ctx)
            .map_err(|e| ModelFileError::ChatTemplate {
                path: self.path.clone(),
                what: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as its GGUF carries it.
    pub(crate) const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[track_caller]
    fn check(source: &str, messages: &[ChatMessage], expect: expect_test::Expect) {
        let got = ChatTemplate::new(Path::new("t.gguf"), source, "<|im_start|>", "<|im_end|>")
            .and_then(|t| t.render(messages, true));
        match got {
            Ok(text) => expect.assert_eq(&text),
            Err(e) => expect.assert_eq(&format!("error: {e}")),
        }
    }

    #[test]
    fn chatml_and_errors() {
        check(
            SMOLLM2,
            &[ChatMessage::user("What is the capital of France?")],
            expect_test::expect![[r#"
                <|im_start|>system
                You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
                <|im_start|>user
                What is the capital of France?<|im_end|>
                <|im_start|>assistant
            "#]],
        );
        check(
            "{% for m in messages %}{{ m.content.strip() }}{% endfor %}",
            &[ChatMessage::user("  hi  ")],
            expect_test::expect!["hi"],
        );
        check(
            "{{ raise_exception('no system role') }}",
            &[],
            expect_test::expect![
                "error: t.gguf: chat template: invalid operation: no system role (in <string>:1)"
            ],
        );
        check(
            "{% for m in messages %}",
            &[],
            expect_test::expect![
                "error: t.gguf: chat template: syntax error: unexpected end of input, expected end of block (in <string>:1)"
            ],
        );
    }
}
