//! The tokenizer: a byte-level BPE trained by HF `tokenizers`, or any HF `tokenizer.json`.

use std::path::Path;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::DataError;

/// The end-of-text token hivetrain's own tokenizers carry (GPT-2's spelling).
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Bytes of text per piece when encoding in parallel.
const ENCODE_PIECE_BYTES: usize = 1 << 16;

/// A loaded tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    json: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TextTokenizer({} tokens)", self.vocab_size())
    }
}

impl TextTokenizer {
    /// Loads any HF `tokenizer.json`.
    pub fn load(path: &Path) -> Result<TextTokenizer, DataError> {
        let json = std::fs::read_to_string(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::InvalidData => DataError::Tokenizer {
                path: path.to_owned(),
                message: "the file is not UTF-8 JSON".into(),
            },
            _ => DataError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
        Self::from_json(path, json)
    }

    /// Parses a `tokenizer.json` held in memory; `path` names it in errors.
    pub fn from_json(path: &Path, json: String) -> Result<TextTokenizer, DataError> {
        let inner = json
            .parse::<Tokenizer>()
            .map_err(|e| DataError::Tokenizer {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if inner.get_vocab_size(true) == 0 {
            return Err(DataError::Tokenizer {
                path: path.to_owned(),
                message: "its vocabulary is empty".into(),
            });
        }
        Ok(TextTokenizer { inner, json })
    }

    /// Trains a GPT-2 style byte-level BPE of `vocab_size` tokens (including
    /// [`END_OF_TEXT`]) on `docs`. The same documents give the same tokenizer.
    pub fn train(docs: &[String], vocab_size: usize) -> Result<TextTokenizer, DataError> {
        let err = |e: tokenizers::Error| DataError::TokenizerTraining(e.to_string());
        let byte_level = ByteLevel::new(false, true, true);
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut tokenizer =
            TokenizerBuilder::<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel>::new()
                .with_model(BPE::default())
                .with_normalizer(None)
                .with_pre_tokenizer(Some(byte_level))
                .with_post_processor(Some(byte_level))
                .with_decoder(Some(byte_level))
                .build()
                .map_err(err)?;
        tokenizer.train(&mut trainer, docs.iter()).map_err(err)?;
        let json = tokenizer.to_string(true).map_err(err)?;
        Self::from_json(Path::new("<trained>"), json)
    }

    /// The `tokenizer.json` text, to save next to a model.
    pub fn to_json(&self) -> &str {
        &self.json
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        std::fs::write(path, &self.json).map_err(|source| DataError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of [`END_OF_TEXT`], if this tokenizer has it.
    pub fn end_of_text(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    /// Token ids of `text`. Long texts are cut where the pre-tokenizer splits anyway
    /// (see `split_for_encoding`) and encoded in parallel, which gives the same ids as
    /// encoding the whole text at once (tested on the corpus).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let pieces = split_for_encoding(text, ENCODE_PIECE_BYTES);
        let encodings =
            self.inner
                .encode_batch(pieces, false)
                .map_err(|e| DataError::Tokenizer {
                    path: "<encode>".into(),
                    message: e.to_string(),
                })?;
        Ok(encodings
            .iter()
            .flat_map(|e| e.get_ids().iter().copied())
            .collect())
    }

    /// Text of token ids (ids outside the vocabulary are skipped).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }
}

/// Cuts `text` into pieces of at least `min_bytes`, each ending in a lone `\n` (after a
/// non-space) and followed by a non-space. GPT-2's pre-tokenizer regex splits there
/// anyway, and a lone newline is the same pre-token at the end of a piece as before a
/// word; a run of blank lines would not be (`\s+(?!\S)` keeps one newline back).
fn split_for_encoding(text: &str, min_bytes: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = start + min_bytes;
    while i < bytes.len() {
        let cut_here = bytes[i - 1] == b'\n'
            && i >= 2
            && !bytes[i - 2].is_ascii_whitespace()
            && !bytes[i].is_ascii_whitespace();
        if cut_here && text.is_char_boundary(i) {
            pieces.push(&text[start..i]);
            start = i;
            i = start + min_bytes;
        } else {
            i += 1;
        }
    }
    pieces.push(&text[start..]);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text() {
        let text = "a\nb\n\nc d\ne\n".repeat(50);
        let pieces = split_for_encoding(&text, 16);
        assert!(pieces.len() > 10);
        assert_eq!(pieces.concat(), text);
        for p in &pieces[..pieces.len() - 1] {
            assert!(p.ends_with('\n'));
        }
    }

    fn committed() -> TextTokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json");
        TextTokenizer::load(&path).expect("the committed tokenizer loads")
    }

    #[test]
    fn committed_tokenizer_round_trips_and_chunking_changes_nothing() {
        let tokenizer = committed();
        assert_eq!(tokenizer.vocab_size(), 8192);
        assert!(tokenizer.end_of_text().is_some());
        let line = "Ham.\nTo be, or not to be, that is the question:\n";
        let ids = tokenizer.encode(line).expect("encode");
        assert_eq!(tokenizer.decode(&ids), line);
        // Encoding in pieces gives the ids of encoding the whole text at once.
        let corpus = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare.txt"),
        )
        .expect("corpus");
        let sample = &corpus[..200_000];
        let whole = tokenizer
            .inner
            .encode(sample, false)
            .expect("encode")
            .get_ids()
            .to_vec();
        assert_eq!(tokenizer.encode(sample).expect("encode"), whole);
    }

    #[test]
    fn any_hf_tokenizer_json_loads() {
        // A word-level tokenizer, nothing like hivetrain's own BPE.
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":{"[UNK]":0,"to":1,"be":2,"or":3,"not":4},"unk_token":"[UNK]"}}"#;
        let tokenizer =
            TextTokenizer::from_json(Path::new("word.json"), json.to_string()).expect("loads");
        assert_eq!(tokenizer.vocab_size(), 5);
        assert_eq!(
            tokenizer
                .encode("to be or not to be question")
                .expect("encode"),
            vec![1, 2, 3, 4, 1, 2, 0]
        );
        assert_eq!(tokenizer.end_of_text(), None);
    }

    #[test]
    fn training_is_deterministic() {
        let docs = vec![
            "the cat sat on the mat. ".repeat(50),
            "a dog and a cat. ".repeat(40),
        ];
        let a = TextTokenizer::train(&docs, 300).expect("train");
        let b = TextTokenizer::train(&docs, 300).expect("train");
        assert_eq!(a.to_json(), b.to_json());
        assert!(a.vocab_size() <= 300 && a.vocab_size() > 257);
    }
}
