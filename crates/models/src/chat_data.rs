//! Chat JSONL datasets: one conversation a line (`{"messages": [{"role", "content"}..]}`),
//! rendered through a model's chat template into token ids with a loss mask on the
//! assistant turns only, and packed into fixed-length training windows.
//!
//! Three steps, each usable alone:
//! - [`read_chat_jsonl`] / [`parse_chat_jsonl`]: lines to [`Conversation`]s. Blank lines
//!   are skipped. Unknown keys *beside* `messages` are allowed and ignored (datasets carry
//!   ids and sources); a message has `role` and `content` only, and any other key is an
//!   error, since a key such as `name` or `tool_calls` would change what the model should
//!   see and dropping it silently would train on something else.
//! - [`tokenize_chat`]: a conversation to [`ChatTokens`]. The template is rendered
//!   incrementally (the first k messages, then k + 1) and each new piece of text is
//!   tokenized alone; the concatenated pieces are checked against the tokens of the whole
//!   rendering, so a BPE merge across a boundary is an error, never a silently shifted
//!   mask. An assistant turn's loss covers its content and its closing end-of-turn token
//!   (`<|im_end|>`), not its `<|im_start|>assistant\n` header nor the newline after it.
//! - [`pack_chats`]: whole conversations into windows of `seq` tokens; see
//!   [`ChatWindows`] for the layout, the padding and the policy for long conversations.

use std::io::{BufRead, Read};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{ChatMessage, ModelFileError, Pretrained};

/// The longest line read, in bytes (the newline not counted).
pub const CHAT_LINE_BYTES_MAX: usize = 1 << 20;
/// The most messages one conversation may have.
pub const CHAT_MESSAGES_MAX: usize = 128;
/// The most lines (blank ones included) one file may have.
pub const CHAT_LINES_MAX: usize = 1_000_000;
/// The target of a position whose prediction does not count in the loss (a system or
/// user token, an assistant header, padding): the engine's, which skips these targets.
pub use engine::IGNORE_TARGET;

/// The roles a message may have.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// One conversation of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// Its 1-based line number.
    pub line: usize,
    pub messages: Vec<ChatMessage>,
}

/// Why a chat JSONL file cannot be used; every variant names the file, and those about a
/// line give its 1-based number.
#[derive(Debug, thiserror::Error)]
pub enum ChatDataError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {problem}", .path.display())]
    Line {
        path: PathBuf,
        line: usize,
        problem: LineProblem,
    },
    #[error("{}: more than {CHAT_LINES_MAX} lines", .path.display())]
    TooManyLines { path: PathBuf },
    #[error("{}:{line}: {source}", .path.display())]
    Render {
        path: PathBuf,
        line: usize,
        source: ChatRenderError,
    },
}

/// What is wrong with one line of a chat JSONL file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineProblem {
    #[error("longer than {CHAT_LINE_BYTES_MAX} bytes")]
    TooLong,
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("no \"messages\" key")]
    NoMessages,
    #[error("\"messages\" is {found}, not an array")]
    MessagesNotArray { found: &'static str },
    #[error("\"messages\" is empty")]
    EmptyMessages,
    #[error("{n} messages, more than {CHAT_MESSAGES_MAX}")]
    TooManyMessages { n: usize },
    #[error("messages[{index}] is {found}, not an object")]
    MessageNotObject { index: usize, found: &'static str },
    #[error("messages[{index}] has no {key:?}")]
    MissingKey { index: usize, key: &'static str },
    #[error("messages[{index}].{key} is {found}, not a string")]
    NotString {
        index: usize,
        key: &'static str,
        found: &'static str,
    },
    #[error("messages[{index}].role is {role:?}, not system, user or assistant")]
    UnknownRole { index: usize, role: String },
    #[error("messages[{index}] has key {key:?}; a message has role and content only")]
    UnknownKey { index: usize, key: String },
}

/// Why a conversation cannot be turned into tokens with a loss mask.
#[derive(Debug, thiserror::Error)]
pub enum ChatRenderError {
    #[error("the model has no chat template")]
    NoTemplate,
    #[error("{0}")]
    Template(Box<ModelFileError>),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "the template's text for the first {k} messages is not a prefix of its text for {} (a template that rewrites earlier turns cannot give exact spans)",
        k + 1
    )]
    NotPrefix { k: usize },
    #[error(
        "tokenized turn by turn the conversation is {spans} tokens, tokenized whole {whole} (first difference at token {at}): a BPE merge crosses a turn boundary"
    )]
    SpansDiffer {
        spans: usize,
        whole: usize,
        at: usize,
    },
}

/// The name of a JSON value's kind, for errors.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The conversation of one non-blank line.
fn parse_line(text: &str) -> Result<Vec<ChatMessage>, LineProblem> {
    let value: Value = serde_json::from_str(text).map_err(|e| LineProblem::Json(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(LineProblem::NotObject);
    };
    let messages = match object.get("messages") {
        None => return Err(LineProblem::NoMessages),
        Some(Value::Array(messages)) => messages,
        Some(other) => return Err(LineProblem::MessagesNotArray { found: kind(other) }),
    };
    if messages.is_empty() {
        return Err(LineProblem::EmptyMessages);
    }
    if messages.len() > CHAT_MESSAGES_MAX {
        return Err(LineProblem::TooManyMessages { n: messages.len() });
    }
    let mut out = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let Value::Object(fields) = message else {
            return Err(LineProblem::MessageNotObject {
                index,
                found: kind(message),
            });
        };
        if let Some(key) = fields.keys().find(|k| *k != "role" && *k != "content") {
            return Err(LineProblem::UnknownKey {
                index,
                key: key.clone(),
            });
        }
        let string = |key: &'static str| match fields.get(key) {
            None => Err(LineProblem::MissingKey { index, key }),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(LineProblem::NotString {
                index,
                key,
                found: kind(other),
            }),
        };
        let role = string("role")?;
        if !ROLES.contains(&role.as_str()) {
            return Err(LineProblem::UnknownRole { index, role });
        }
        let content = string("content")?;
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// The conversations of the chat JSONL file at `path`.
pub fn read_chat_jsonl(path: &Path) -> Result<Vec<Conversation>, ChatDataError> {
    let file = std::fs::File::open(path).map_err(|source| ChatDataError::Io {
        path: path.to_owned(),
        source,
    })?;
    parse_chat_jsonl(path, std::io::BufReader::new(file))
}

/// The conversations of chat JSONL read from `reader`; `path` names it in errors.
pub fn parse_chat_jsonl(
    path: &Path,
    mut reader: impl BufRead,
) -> Result<Vec<Conversation>, ChatDataError> {
    let mut conversations = Vec::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        // One byte past the bound (plus the newline) tells a long line from a full one.
        let limit = (CHAT_LINE_BYTES_MAX + 2) as u64;
        let n = reader
            .by_ref()
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| ChatDataError::Io {
                path: path.to_owned(),
                source,
            })?;
        if n == 0 {
            break;
        }
        if line > CHAT_LINES_MAX {
            return Err(ChatDataError::TooManyLines {
                path: path.to_owned(),
            });
        }
        let line_err = |problem| ChatDataError::Line {
            path: path.to_owned(),
            line,
            problem,
        };
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        if buf.len() > CHAT_LINE_BYTES_MAX {
            return Err(line_err(LineProblem::TooLong));
        }
        let text = std::str::from_utf8(&buf).map_err(|_| line_err(LineProblem::NotUtf8))?;
        if text.trim().is_empty() {
            continue;
        }
        let messages = parse_line(text).map_err(line_err)?;
        conversations.push(Conversation { line, messages });
    }
    Ok(conversations)
}

/// A conversation as tokens: `loss[i]` says whether predicting `ids[i]` (from the tokens
/// before it) counts in the loss.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatTokens {
    pub ids: Vec<u32>,
    pub loss: Vec<bool>,
}

impl ChatTokens {
    /// How many tokens count in the loss.
    pub fn n_loss(&self) -> usize {
        self.loss.iter().filter(|&&l| l).count()
    }
}

/// `messages` rendered through `model`'s chat template and tokenized, the loss on the
/// assistant turns only (see the module's doc).
pub fn tokenize_chat(
    model: &Pretrained,
    messages: &[ChatMessage],
) -> Result<ChatTokens, ChatRenderError> {
    let template = model
        .chat_template
        .as_ref()
        .ok_or(ChatRenderError::NoTemplate)?;
    let encode = |text: &str| -> Result<Vec<u32>, ChatRenderError> {
        model
            .tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatRenderError::Tokenizer(e.to_string()))
    };
    let render = |k: usize, header: bool| {
        template
            .render(&messages[..k], header)
            .map_err(|e| ChatRenderError::Template(Box::new(e)))
    };
    let mut out = ChatTokens::default();
    if let (true, Some(bos)) = (model.add_bos, model.bos_token_id) {
        out.ids.push(bos);
        out.loss.push(false);
    }
    let mut done = String::new();
    for (k, message) in messages.iter().enumerate() {
        let assistant = message.role == "assistant";
        if assistant {
            let header = render(k, true)?;
            let piece = header
                .strip_prefix(&done)
                .ok_or(ChatRenderError::NotPrefix { k })?;
            let ids = encode(piece)?;
            out.loss.extend(std::iter::repeat_n(false, ids.len()));
            out.ids.extend(ids);
            done = header;
        }
        let next = render(k + 1, false)?;
        let piece = next
            .strip_prefix(&done)
            .ok_or(ChatRenderError::NotPrefix { k })?;
        let ids = encode(piece)?;
        // The turn counts up to its last end-of-turn token, inclusive; what follows it
        // (ChatML's newline) is the template's, not the answer's.
        let counted = match (assistant, model.eos_token_id) {
            (false, _) => 0,
            (true, Some(eos)) => ids
                .iter()
                .rposition(|&id| id == eos)
                .map_or(ids.len(), |i| i + 1),
            (true, None) => ids.len(),
        };
        out.loss.extend((0..ids.len()).map(|i| i < counted));
        out.ids.extend(ids);
        done = next;
    }
    let mut whole = Vec::with_capacity(out.ids.len());
    if let (true, Some(bos)) = (model.add_bos, model.bos_token_id) {
        whole.push(bos);
    }
    whole.extend(encode(&done)?);
    if whole != out.ids {
        let at = whole
            .iter()
            .zip(&out.ids)
            .position(|(a, b)| a != b)
            .unwrap_or(whole.len().min(out.ids.len()));
        return Err(ChatRenderError::SpansDiffer {
            spans: out.ids.len(),
            whole: whole.len(),
            at,
        });
    }
    Ok(out)
}

/// Conversations packed into training windows of `seq` tokens.
///
/// Window `w` is `inputs[w * seq..(w + 1) * seq]` and its `targets` the same range:
/// `targets[p]` is the token after `inputs[p]` when that token counts in the loss, else
/// [`IGNORE_TARGET`]. Whole conversations are laid end to end in file order; one that
/// does not fit in what is left of a window starts the next, and the rest of a window is
/// padded with `pad_id` (the model's end-of-turn token) as inputs and [`IGNORE_TARGET`]
/// as targets. A conversation is never split: one longer than `seq` tokens is skipped and
/// counted in `skipped_too_long` (a split would train answers on a cut-off context), and
/// one with no assistant token is skipped and counted in `skipped_no_loss`. Deterministic:
/// the same conversations give the same windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatWindows {
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Conversations packed.
    pub n_packed: usize,
    pub skipped_too_long: usize,
    pub skipped_no_loss: usize,
}

impl ChatWindows {
    pub fn n_windows(&self) -> usize {
        self.inputs.len() / self.seq
    }

    /// How many targets count in the loss.
    pub fn n_loss(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_TARGET).count()
    }
}

/// Packs `chats` into windows of `seq` tokens (see [`ChatWindows`]).
pub fn pack_chats(chats: &[ChatTokens], seq: NonZeroUsize, pad_id: u32) -> ChatWindows {
    let seq = seq.get();
    let mut out = ChatWindows {
        seq,
        inputs: Vec::new(),
        targets: Vec::new(),
        n_packed: 0,
        skipped_too_long: 0,
        skipped_no_loss: 0,
    };
    // The window being filled: its tokens and their loss flags.
    let mut ids: Vec<u32> = Vec::with_capacity(seq);
    let mut loss: Vec<bool> = Vec::with_capacity(seq);
    let flush = |ids: &mut Vec<u32>, loss: &mut Vec<bool>, out: &mut ChatWindows| {
        if ids.is_empty() {
            return;
        }
        for p in 0..seq {
            out.inputs.push(ids.get(p).copied().unwrap_or(pad_id));
            let target = match (ids.get(p + 1), loss.get(p + 1)) {
                (Some(&id), Some(true)) => id,
                _ => IGNORE_TARGET,
            };
            out.targets.push(target);
        }
        ids.clear();
        loss.clear();
    };
    for chat in chats {
        if chat.ids.len() > seq {
            out.skipped_too_long += 1;
            continue;
        }
        if !chat.loss.contains(&true) {
            out.skipped_no_loss += 1;
            continue;
        }
        if ids.len() + chat.ids.len() > seq {
            flush(&mut ids, &mut loss, &mut out);
        }
        ids.extend_from_slice(&chat.ids);
        loss.extend_from_slice(&chat.loss);
        out.n_packed += 1;
    }
    flush(&mut ids, &mut loss, &mut out);
    out
}

/// The chat JSONL file at `path`, tokenized through `model` and packed into windows of
/// `seq` tokens padded with the model's end-of-sequence token (id 0 if it has none;
/// padding is never a counted target, and causal attention keeps it out of the tokens
/// before it).
pub fn load_chat_windows(
    path: &Path,
    model: &Pretrained,
    seq: NonZeroUsize,
) -> Result<ChatWindows, ChatDataError> {
    let conversations = read_chat_jsonl(path)?;
    let chats = conversations
        .iter()
        .map(|c| {
            tokenize_chat(model, &c.messages).map_err(|source| ChatDataError::Render {
                path: path.to_owned(),
                line: c.line,
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pad = model.eos_token_id.unwrap_or(0);
    Ok(pack_chats(&chats, seq, pad))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `text` as a file named `d.jsonl` and prints each conversation (line, then
    /// role: content) or the error.
    #[track_caller]
    fn check(text: &str, expect: expect_test::Expect) {
        let got = match parse_chat_jsonl(Path::new("d.jsonl"), text.as_bytes()) {
            Ok(conversations) => conversations
                .iter()
                .map(|c| {
                    let turns: Vec<String> = c
                        .messages
                        .iter()
                        .map(|m| format!("{}: {}", m.role, m.content))
                        .collect();
                    format!("{} {}", c.line, turns.join(" | "))
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn lines_and_hostile_lines() {
        check(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}], \"id\": 7}\n\n  \r\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}]}\r\n",
            expect_test::expect![[r#"
                1 user: hi | assistant: hello
                4 system: s"#]],
        );
        check("", expect_test::expect![""]);
        check(
            "\n{\"messages\": [}",
            expect_test::expect![
                "error: d.jsonl:2: not valid JSON: expected value at line 1 column 15"
            ],
        );
        check(
            "[1]",
            expect_test::expect!["error: d.jsonl:1: not a JSON object"],
        );
        check(
            "{\"msgs\": []}",
            expect_test::expect![[r#"error: d.jsonl:1: no "messages" key"#]],
        );
        check(
            "{\"messages\": \"hi\"}",
            expect_test::expect![[r#"error: d.jsonl:1: "messages" is a string, not an array"#]],
        );
        check(
            "{\"messages\": []}",
            expect_test::expect![[r#"error: d.jsonl:1: "messages" is empty"#]],
        );
        check(
            "{\"messages\": [3]}",
            expect_test::expect!["error: d.jsonl:1: messages[0] is a number, not an object"],
        );
        check(
            "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}",
            expect_test::expect![[
                r#"error: d.jsonl:1: messages[0].role is "tool", not system, user or assistant"#
            ]],
        );
        check(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": [1]}]}",
            expect_test::expect!["error: d.jsonl:1: messages[1].content is an array, not a string"],
        );
        check(
            "{\"messages\": [{\"role\": \"user\"}]}",
            expect_test::expect![[r#"error: d.jsonl:1: messages[0] has no "content""#]],
        );
        check(
            "{\"messages\": [{\"role\": 1, \"content\": \"x\"}]}",
            expect_test::expect!["error: d.jsonl:1: messages[0].role is a number, not a string"],
        );
        check(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"x\", \"name\": \"bob\"}]}",
            expect_test::expect![[
                r#"error: d.jsonl:1: messages[0] has key "name"; a message has role and content only"#
            ]],
        );
        check(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"\\xff\"}]}",
            expect_test::expect![
                "error: d.jsonl:1: not valid JSON: invalid escape at line 1 column 45"
            ],
        );
        let many = vec![r#"{"role": "user", "content": "x"}"#; CHAT_MESSAGES_MAX + 1].join(",");
        check(
            &format!("{{\"messages\": [{many}]}}"),
            expect_test::expect!["error: d.jsonl:1: 129 messages, more than 128"],
        );
        let long = format!(
            "{{\"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
            "a".repeat(CHAT_LINE_BYTES_MAX)
        );
        check(
            &format!("\n{long}\n"),
            expect_test::expect!["error: d.jsonl:2: longer than 1048576 bytes"],
        );
        let bytes = b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}";
        let got = parse_chat_jsonl(Path::new("d.jsonl"), &bytes[..]).map_err(|e| e.to_string());
        assert_eq!(got, Err("d.jsonl:1: not UTF-8".to_string()));
    }

    /// Packs conversations written as `[t, t*, ..]` (a `*` marks a token that counts) into
    /// windows of `seq` tokens, pad 0, and prints each window's inputs and targets (`-`
    /// for [`IGNORE_TARGET`]).
    #[track_caller]
    fn check_pack(chats: &[&str], seq: usize, expect: expect_test::Expect) {
        let chats: Vec<ChatTokens> = chats
            .iter()
            .map(|c| {
                let mut t = ChatTokens::default();
                for token in c.split_whitespace() {
                    let counted = token.ends_with('*');
                    let id = token.trim_end_matches('*').parse().unwrap_or(u32::MAX - 1);
                    t.ids.push(id);
                    t.loss.push(counted);
                }
                t
            })
            .collect();
        let Some(seq) = NonZeroUsize::new(seq) else {
            panic!("seq 0")
        };
        let w = pack_chats(&chats, seq, 0);
        let show = |xs: &[u32]| {
            xs.iter()
                .map(|&x| match x {
                    IGNORE_TARGET => "-".to_string(),
                    x => x.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut lines = vec![format!(
            "{} windows, {} packed, {} too long, {} without loss, {} loss targets",
            w.n_windows(),
            w.n_packed,
            w.skipped_too_long,
            w.skipped_no_loss,
            w.n_loss()
        )];
        for (i, t) in w.inputs.chunks(w.seq).zip(w.targets.chunks(w.seq)) {
            lines.push(format!("{} -> {}", show(i), show(t)));
        }
        expect.assert_eq(&lines.join("\n"));
    }

    #[test]
    fn packing() {
        check_pack(
            &["1 2 3* 4*", "5 6*", "7 8 9 10 11 12*", "13 14", "15 16 17*"],
            6,
            expect_test::expect![[r#"
                3 windows, 4 packed, 0 too long, 1 without loss, 5 loss targets
                1 2 3 4 5 6 -> - 3 4 - 6 -
                7 8 9 10 11 12 -> - - - - 12 -
                15 16 17 0 0 0 -> - 17 - - - -"#]],
        );
        check_pack(
            &["1 2 3* 4* 5 6 7*", "8 9*"],
            6,
            expect_test::expect![[r#"
                1 windows, 1 packed, 1 too long, 0 without loss, 1 loss targets
                8 9 0 0 0 0 -> 9 - - - - -"#]],
        );
        check_pack(
            &[],
            4,
            expect_test::expect!["0 windows, 0 packed, 0 too long, 0 without loss, 0 loss targets"],
        );
    }
}
