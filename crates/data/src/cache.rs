//! Tokenize once: a binary cache of a corpus's token ids, keyed by the SHA-256 of the
//! corpus bytes and of the tokenizer.
//!
//! File layout (little-endian): magic `HVTOKEN2` (8 bytes), width in bytes per token
//! (u32: 2 or 4), token count (u64), corpus SHA-256 (32 bytes), tokenizer SHA-256 (32
//! bytes), then the ids. A cache whose key or length does not match is rebuilt.

use std::path::{Path, PathBuf};

use crate::{DataError, TextTokenizer, corpus, sha256_hex};

const MAGIC: &[u8; 8] = b"HVTOKEN2";
/// Bumped (with the magic) whenever the ids a corpus gives may change for the same corpus
/// and tokenizer; it is part of the file name, so an old cache is never read.
const CACHE_VERSION: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 8 + 32 + 32;

/// Token ids of a corpus, and where they came from.
#[derive(Debug, Clone)]
pub struct CorpusTokens {
    pub tokens: Vec<u32>,
    pub cache_path: PathBuf,
    /// Whether the ids were read from the cache (false: tokenized now).
    pub from_cache: bool,
}

fn hex_to_bytes(hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
    }
    out
}

/// Token ids of the corpus at `corpus_path`, read from `cache_dir` when a matching cache
/// exists and written there otherwise. Documents are joined with the tokenizer's
/// end-of-text token when it has one.
pub fn load_or_build(
    corpus_path: &Path,
    tokenizer: &TextTokenizer,
    cache_dir: &Path,
) -> Result<CorpusTokens, DataError> {
    let bytes = std::fs::read(corpus_path).map_err(|source| DataError::Read {
        path: corpus_path.to_owned(),
        source,
    })?;
    let corpus_hash = hex_to_bytes(&sha256_hex(&bytes));
    let tokenizer_hash = hex_to_bytes(&sha256_hex(tokenizer.to_json().as_bytes()));
    let stem = corpus_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("corpus");
    let key = format!(
        "{}-{}",
        &sha256_hex(&corpus_hash)[..12],
        &sha256_hex(&tokenizer_hash)[..12]
    );
    let cache_path = cache_dir.join(format!("{stem}-{key}.v{CACHE_VERSION}.tokens"));
    if let Ok(cached) = std::fs::read(&cache_path)
        && let Some(tokens) = parse(&cached, &corpus_hash, &tokenizer_hash)
    {
        return Ok(CorpusTokens {
            tokens,
            cache_path,
            from_cache: true,
        });
    }
    let docs = corpus::parse_documents(corpus_path, &bytes)?;
    let mut tokens = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        if i > 0
            && let Some(eot) = tokenizer.end_of_text()
        {
            tokens.push(eot);
        }
        tokens.extend(tokenizer.encode(doc)?);
    }
    let width: u32 = if tokenizer.vocab_size() <= 1 << 16 {
        2
    } else {
        4
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + tokens.len() * width as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&width.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    out.extend_from_slice(&corpus_hash);
    out.extend_from_slice(&tokenizer_hash);
    for &t in &tokens {
        if width == 2 {
            let t16 = u16::try_from(t).map_err(|_| DataError::TokenTooLarge { token: t })?;
            out.extend_from_slice(&t16.to_le_bytes());
        } else {
            out.extend_from_slice(&t.to_le_bytes());
        }
    }
    let write_err = |source| DataError::Write {
        path: cache_path.clone(),
        source,
    };
    std::fs::create_dir_all(cache_dir).map_err(write_err)?;
    // A name of this process's own: processes sharing a cache (workers or peers on one
    // machine) that tokenize at once each rename a whole file into place, and the last
    // wins; with one shared name, one renamed the other's half-written file, or found it
    // gone.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = cache_path.with_extension(format!("tokens.{}.{unique}.tmp", std::process::id()));
    std::fs::write(&tmp, &out).map_err(write_err)?;
    std::fs::rename(&tmp, &cache_path).map_err(write_err)?;
    Ok(CorpusTokens {
        tokens,
        cache_path,
        from_cache: false,
    })
}

fn parse(bytes: &[u8], corpus_hash: &[u8; 32], tokenizer_hash: &[u8; 32]) -> Option<Vec<u32>> {
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return None;
    }
    let width = u32::from_le_bytes(bytes[8..12].try_into().ok()?) as usize;
    let count = u64::from_le_bytes(bytes[12..20].try_into().ok()?) as usize;
    if &bytes[20..52] != corpus_hash || &bytes[52..84] != tokenizer_hash {
        return None;
    }
    let body = &bytes[HEADER_BYTES..];
    match width {
        2 if body.len() == count.checked_mul(2)? => Some(
            body.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect(),
        ),
        4 if body.len() == count.checked_mul(4)? => Some(
            body.chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writers that tokenize one corpus into one cache at once all get its tokens, and
    /// leave one cache file and nothing half-written.
    #[test]
    fn writers_racing_on_one_cache_all_succeed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(
            &corpus,
            "the quick brown fox jumps over the lazy dog. ".repeat(100_000),
        )
        .expect("write");
        let tokenizer = crate::TextTokenizer::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/tokenizer.json"),
        )
        .expect("tokenizer");
        let cache = dir.path().join("cache");
        let tokens: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_build(&corpus, &tokenizer, &cache)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread").expect("tokens").tokens)
                .collect()
        });
        assert!(tokens.iter().all(|t| *t == tokens[0] && !t.is_empty()));
        let files: Vec<_> = std::fs::read_dir(&cache).expect("dir").collect();
        assert_eq!(files.len(), 1, "{files:?}");
    }
}
