//! `cargo xtask ptx`: compiles the CUDA backend's kernels (crates/engine/kernels/*.cu)
//! to the PTX the engine embeds, with a pinned NVRTC taken from PyPI, so no CUDA toolkit
//! is needed on any machine; `--check` compiles again and fails unless the committed PTX
//! and manifest are exactly what comes out.
//!
//! NVRTC is deterministic: the same source and options give the same bytes. The wheel is
//! fetched with `pip download`, checked against its sha256, and its two libraries are
//! unpacked under `target/nvrtc-<version>/`; the compiler is loaded from there with
//! `libloading` (its builtins library first, so that libnvrtc's own `dlopen` of it by
//! soname finds it already loaded).

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

/// The NVRTC wheel: CUDA 12.4's compiler, whose PTX ISA 8.4 loads on drivers R550 and
/// newer.
const WHEEL: &str = "nvidia-cuda-nvrtc-cu12==12.4.127";
const WHEEL_FILE: &str = "nvidia_cuda_nvrtc_cu12-12.4.127-py3-none-manylinux2014_x86_64.whl";
const WHEEL_SHA256: &str = "a178759ebb095827bd30ef56598ec182b85547f1508941a3d560eb7ea1fbf338";
const LIB: &str = "nvidia/cuda_nvrtc/lib/libnvrtc.so.12";
const BUILTINS: &str = "nvidia/cuda_nvrtc/lib/libnvrtc-builtins.so.12.4";

/// The oldest GPUs the PTX targets (Ampere); the driver compiles it for newer ones.
const ARCH: &str = "--gpu-architecture=compute_80";

/// One compiled output: a source, the variant's defines, the file it goes to.
struct Variant {
    source: &'static str,
    output: &'static str,
    defines: &'static [&'static str],
}

const VARIANTS: &[Variant] = &[
    Variant {
        source: "models.cu",
        output: "models.f32.ptx",
        defines: &[],
    },
    Variant {
        source: "models.cu",
        output: "models.bf16.ptx",
        defines: &["-DHT_BF16"],
    },
];

fn options(variant: &Variant) -> Vec<String> {
    let mut options = vec![ARCH.to_string(), "--fmad=false".to_string()];
    options.extend(variant.defines.iter().map(|d| d.to_string()));
    options
}

#[derive(Debug, clap::Args)]
pub(crate) struct PtxArgs {
    /// Compile and compare with the committed files instead of writing them.
    #[arg(long)]
    check: bool,
}

pub(crate) fn run(root: &Path, args: PtxArgs) -> anyhow::Result<()> {
    let dir = root.join("crates/engine/kernels");
    let nvrtc = Nvrtc::load(root)?;
    let version = nvrtc.version()?;
    let mut outputs = Vec::new();
    for variant in VARIANTS {
        let path = dir.join(variant.source);
        let source = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let ptx = nvrtc
            .compile(&source, variant.source, &options(variant))
            .with_context(|| format!("compiling {} for {}", variant.source, variant.output))?;
        outputs.push((variant, source, ptx));
    }
    let manifest = manifest(version, &outputs);
    let mut files: Vec<(PathBuf, Vec<u8>)> = outputs
        .iter()
        .map(|(v, _, ptx)| (dir.join(v.output), ptx.clone().into_bytes()))
        .collect();
    files.push((dir.join("manifest.json"), manifest.into_bytes()));
    if args.check {
        let mut stale = Vec::new();
        for (path, bytes) in &files {
            if std::fs::read(path).ok().as_deref() != Some(&bytes[..]) {
                stale.push(path.display().to_string());
            }
        }
        ensure!(
            stale.is_empty(),
            "{} differ from what the kernel sources compile to: run `cargo xtask ptx` and commit",
            stale.join(", ")
        );
        println!("PTX matches its sources ({} files)", files.len());
    } else {
        for (path, bytes) in &files {
            std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
    }
    Ok(())
}

/// The manifest the engine's test checks: the compiler, and the blake3 of every source
/// and output.
fn manifest(version: (i32, i32), outputs: &[(&Variant, String, String)]) -> String {
    let hash = |b: &[u8]| blake3::hash(b).to_hex().to_string();
    let mut sources = serde_json::Map::new();
    let mut ptx = serde_json::Map::new();
    for (variant, source, out) in outputs {
        sources.insert(variant.source.into(), hash(source.as_bytes()).into());
        ptx.insert(
            variant.output.into(),
            serde_json::json!({
                "source": variant.source,
                "options": options(variant),
                "blake3": hash(out.as_bytes()),
            }),
        );
    }
    let manifest = serde_json::json!({
        "generator": "cargo xtask ptx",
        "compiler": format!("NVRTC {}.{} ({WHEEL}, wheel sha256 {WHEEL_SHA256})", version.0, version.1),
        "sources": sources,
        "ptx": ptx,
    });
    let mut text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    text.push('\n');
    text
}

type CreateProgram = unsafe extern "C" fn(
    *mut *mut std::ffi::c_void,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type Compile = unsafe extern "C" fn(*mut std::ffi::c_void, c_int, *const *const c_char) -> c_int;
type GetSize = unsafe extern "C" fn(*mut std::ffi::c_void, *mut usize) -> c_int;
type Get = unsafe extern "C" fn(*mut std::ffi::c_void, *mut c_char) -> c_int;
type Destroy = unsafe extern "C" fn(*mut *mut std::ffi::c_void) -> c_int;
type Version = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;

/// The NVRTC library of the pinned wheel, loaded.
struct Nvrtc {
    _builtins: libloading::Library,
    lib: libloading::Library,
}

impl Nvrtc {
    fn load(root: &Path) -> anyhow::Result<Nvrtc> {
        let dir = unpack(root)?;
        // SAFETY: loading NVIDIA's NVRTC libraries, whose initializers have no
        // preconditions; the builtins first so that libnvrtc's dlopen by soname finds it.
        #[allow(unsafe_code)]
        let (builtins, lib) = unsafe {
            (
                libloading::Library::new(dir.join("libnvrtc-builtins.so.12.4"))?,
                libloading::Library::new(dir.join("libnvrtc.so.12"))?,
            )
        };
        Ok(Nvrtc {
            _builtins: builtins,
            lib,
        })
    }

    #[allow(unsafe_code)]
    fn version(&self) -> anyhow::Result<(i32, i32)> {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion writes two ints.
        unsafe {
            let f: libloading::Symbol<Version> = self.lib.get(b"nvrtcVersion")?;
            status(f(&mut major, &mut minor), "nvrtcVersion")?;
        }
        Ok((major, minor))
    }

    #[allow(unsafe_code)]
    fn compile(&self, source: &str, name: &str, options: &[String]) -> anyhow::Result<String> {
        let source = CString::new(source)?;
        let name = CString::new(name)?;
        let options: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()))
            .collect::<Result<_, _>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: the NVRTC API as documented: a program is created from NUL-terminated
        // strings that outlive it, compiled, its log and PTX copied into buffers of the
        // sizes NVRTC reports, then destroyed.
        unsafe {
            let create: libloading::Symbol<CreateProgram> = self.lib.get(b"nvrtcCreateProgram")?;
            let compile: libloading::Symbol<Compile> = self.lib.get(b"nvrtcCompileProgram")?;
            let log_size: libloading::Symbol<GetSize> = self.lib.get(b"nvrtcGetProgramLogSize")?;
            let log: libloading::Symbol<Get> = self.lib.get(b"nvrtcGetProgramLog")?;
            let ptx_size: libloading::Symbol<GetSize> = self.lib.get(b"nvrtcGetPTXSize")?;
            let ptx: libloading::Symbol<Get> = self.lib.get(b"nvrtcGetPTX")?;
            let destroy: libloading::Symbol<Destroy> = self.lib.get(b"nvrtcDestroyProgram")?;
            let mut program = std::ptr::null_mut();
            status(
                create(
                    &mut program,
                    source.as_ptr(),
                    name.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
                "nvrtcCreateProgram",
            )?;
            let compiled = compile(program, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let read = |size: &GetSize, get: &Get| -> anyhow::Result<String> {
                let mut n = 0usize;
                status(size(program, &mut n), "size")?;
                let mut buf = vec![0 as c_char; n.max(1)];
                status(get(program, buf.as_mut_ptr()), "get")?;
                Ok(CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned())
            };
            let result = if compiled != 0 {
                let text = read(&log_size, &log).unwrap_or_default();
                Err(anyhow::anyhow!("NVRTC error {compiled}:\n{text}"))
            } else {
                read(&ptx_size, &ptx)
            };
            destroy(&mut program);
            result
        }
    }
}

fn status(code: c_int, what: &str) -> anyhow::Result<()> {
    if code != 0 {
        bail!("{what} failed with NVRTC status {code}");
    }
    Ok(())
}

/// Fetches the wheel (once) and unpacks its two libraries; returns their directory.
fn unpack(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("target/nvrtc-12.4.127");
    if dir.join("libnvrtc.so.12").exists() && dir.join("libnvrtc-builtins.so.12.4").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    let wheel = dir.join(WHEEL_FILE);
    if !wheel.exists() {
        eprintln!("fetching {WHEEL} with pip (24.6 MB)");
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                "manylinux2014_x86_64",
                "--python-version",
                "3.11",
                "-d",
            ])
            .arg(&dir)
            .arg(WHEEL)
            .status()
            .context("running python3 -m pip download (pip fetches the NVRTC wheel)")?;
        ensure!(status.success(), "pip download {WHEEL} failed: {status}");
    }
    let bytes = std::fs::read(&wheel).with_context(|| format!("reading {}", wheel.display()))?;
    let got = data::sha256_hex(&bytes);
    ensure!(
        got == WHEEL_SHA256,
        "{} has sha256 {got}, expected {WHEEL_SHA256}: delete it and run again",
        wheel.display()
    );
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
    for (member, file) in [
        (LIB, "libnvrtc.so.12"),
        (BUILTINS, "libnvrtc-builtins.so.12.4"),
    ] {
        let mut entry = archive
            .by_name(member)
            .with_context(|| format!("{WHEEL_FILE} has no {member}"))?;
        let tmp = dir.join(format!("{file}.tmp"));
        let mut out = std::fs::File::create(&tmp)?;
        std::io::copy(&mut entry, &mut out)?;
        std::fs::rename(&tmp, dir.join(file))?;
    }
    Ok(dir)
}
