//! The CUDA backend: NVIDIA GPUs through the driver API (cudarc, loaded at run time),
//! matrix products through cuBLASLt, everything else through hivetrain's own kernels
//! (`crates/engine/kernels/*.cu`, compiled to committed PTX by `cargo xtask ptx`).
//!
//! Nothing here is linked at build time: this module builds, and every caller runs on
//! the CPU, on a machine with no CUDA toolkit and no driver. Asking for a GPU there is a
//! [`CudaError`] that says what is missing, never a panic: the driver and cuBLASLt are
//! looked for before cudarc first touches them (cudarc panics when a library it needs
//! is absent).
//!
//! What a volunteer needs: the NVIDIA driver (R550 or newer, for PTX ISA 8.4) and
//! cuBLASLt 12 or 13 (`libcublasLt.so.12` / `.13`, from a CUDA install or the
//! `nvidia-cublas-cu12` wheel with its folder on `LD_LIBRARY_PATH`). No toolkit.
//!
//! Unsafe code is confined to this module: device memory is raw driver allocations
//! owned by [`DeviceMem`], kernels are launched with arguments whose types match the
//! kernel signatures in `models.cu` (each launch site says so).
#![allow(unsafe_code)]

mod blas;
pub mod gpt2;
mod kernels;
pub mod llama;
mod profile;

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};

pub use gpt2::{Attention, Gpt2Cuda};
pub use kernels::{FLASH_HEAD_SIZE, Precision};
pub use llama::LlamaCuda;

/// The oldest driver the committed PTX loads on: CUDA 12.4 (R550), for PTX ISA 8.4.
pub const MIN_DRIVER_VERSION: i32 = 12040;
/// The oldest GPUs the kernels are built for: compute capability 8.0 (Ampere), the
/// first with bf16 matrix units.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Why a GPU cannot be used. Every variant says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no NVIDIA driver found (libcuda.so.1 could not be loaded): install the NVIDIA driver (R550 or newer), or use --device cpu"
    )]
    NoDriver,
    #[error("the NVIDIA driver found no GPU ({0}): use --device cpu")]
    NoGpu(String),
    #[error("cuda:{ordinal} does not exist: this machine has {count} GPU(s) (cuda:0 .. cuda:{last})", last = count.saturating_sub(1))]
    NoSuchGpu { ordinal: usize, count: usize },
    #[error(
        "the NVIDIA driver supports CUDA {}.{}; hivetrain's kernels need CUDA 12.4 (driver R550) or newer: update the driver, or use --device cpu",
        .0 / 1000, (.0 % 1000) / 10
    )]
    DriverTooOld(i32),
    #[error(
        "cuda:{ordinal} ({name}) has compute capability {}.{}; hivetrain's kernels need 8.0 (Ampere) or newer: use --device cpu",
        capability.0, capability.1
    )]
    TooOld {
        ordinal: usize,
        name: String,
        capability: (i32, i32),
    },
    #[error(
        "cuBLASLt could not be loaded (libcublasLt.so.13, .so.12 or libcublasLt.so): install CUDA's math libraries (or `pip install nvidia-cublas-cu12` and add its lib folder to LD_LIBRARY_PATH), or use --device cpu"
    )]
    NoCublasLt,
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLASLt call failed: {0:?}")]
    Cublas(#[from] cudarc::cublaslt::result::CublasError),
    #[error("{what} is not built for the CUDA backend yet: use --device cpu")]
    Unsupported { what: &'static str },
}

/// What a GPU is: the facts that name its determinism class (see ARCHITECTURE.md) and
/// what `--device` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub capability: (i32, i32),
    pub sm_count: i32,
    pub memory_bytes: usize,
    /// `cuDriverGetVersion`: 1000 * major + 10 * minor.
    pub driver_version: i32,
    /// `cublasLtGetVersion`: 10000 * major + 100 * minor + patch.
    pub cublaslt_version: usize,
}

impl GpuInfo {
    /// The determinism class: GPUs of one class compute the same bits for the same
    /// unit (same kernels, same compute capability and SM count, same cuBLASLt).
    pub fn class(&self) -> String {
        format!(
            "cuda/sm{}{}/{}sm/cublaslt{}/kernels-{}",
            self.capability.0,
            self.capability.1,
            self.sm_count,
            self.cublaslt_version,
            kernels_hash()
        )
    }
}

/// The first 16 hex digits of the blake3 of the committed PTX: part of a GPU's class.
pub fn kernels_hash() -> String {
    let mut h = blake3::Hasher::new();
    h.update(kernels::PTX_F32.as_bytes());
    h.update(kernels::PTX_BF16.as_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// Whether the driver library can be loaded at all (no call into it).
fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

fn cublaslt_present() -> bool {
    // SAFETY: as above, for libcublasLt.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// The number of GPUs the driver sees (0 with no driver or no GPU).
pub fn device_count() -> usize {
    if !driver_present() || result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// Checks that GPU `ordinal` can run hivetrain's kernels and describes it; opens
/// nothing that lasts.
pub fn probe(ordinal: usize) -> Result<GpuInfo, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    result::init().map_err(|e| CudaError::NoGpu(e.to_string()))?;
    let mut driver_version = 0;
    // SAFETY: cuDriverGetVersion writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result()?;
    if driver_version < MIN_DRIVER_VERSION {
        return Err(CudaError::DriverTooOld(driver_version));
    }
    let count = result::device::get_count().map_err(|e| CudaError::NoGpu(e.to_string()))?;
    let count = count.max(0) as usize;
    if count == 0 {
        return Err(CudaError::NoGpu("it reports 0 devices".into()));
    }
    if ordinal >= count {
        return Err(CudaError::NoSuchGpu { ordinal, count });
    }
    let dev = result::device::get(ordinal as i32)?;
    let attr = |a| {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { result::device::get_attribute(dev, a) }
    };
    use sys::CUdevice_attribute as A;
    let capability = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let name = result::device::get_name(dev)?;
    if capability < MIN_COMPUTE_CAPABILITY {
        return Err(CudaError::TooOld {
            ordinal,
            name,
            capability,
        });
    }
    if !cublaslt_present() {
        return Err(CudaError::NoCublasLt);
    }
    Ok(GpuInfo {
        ordinal,
        name,
        capability,
        sm_count: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        // SAFETY: as above.
        memory_bytes: unsafe { result::device::total_mem(dev) }?,
        driver_version,
        // SAFETY: cublasLtGetVersion takes nothing; the library is present (checked).
        cublaslt_version: unsafe { cudarc::cublaslt::sys::cublasLtGetVersion() },
    })
}

/// A GPU opened for work: its context and the one stream everything runs on (one
/// stream, so the order of every kernel and product is the program's order).
pub(crate) struct Gpu {
    pub(crate) info: GpuInfo,
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
}

impl Gpu {
    pub(crate) fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let info = probe(ordinal)?;
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        Ok(Gpu { info, ctx, stream })
    }

    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceMem, CudaError> {
        DeviceMem::new(&self.ctx, bytes)
    }

    pub(crate) fn sync(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }

    /// Copies `src` to `dst + offset bytes` (asynchronous; `src` must outlive the copy,
    /// so callers synchronize before dropping it).
    pub(crate) fn upload<T: bytemuck::Pod>(
        &self,
        dst: &DeviceMem,
        offset: usize,
        src: &[T],
    ) -> Result<(), CudaError> {
        let bytes: &[u8] = bytemuck::cast_slice(src);
        assert!(offset + bytes.len() <= dst.bytes, "upload past the end");
        self.ctx.bind_to_thread()?;
        // SAFETY: the range lies inside the allocation (asserted); the copy is
        // synchronous with respect to the host buffer because we synchronize below.
        unsafe {
            result::memcpy_htod_async(dst.ptr + offset as u64, bytes, self.stream.cu_stream())?;
        }
        self.sync()
    }

    /// Copies `dst.len()` elements from `src + offset bytes`, waiting for the stream.
    pub(crate) fn download<T: bytemuck::Pod>(
        &self,
        dst: &mut [T],
        src: &DeviceMem,
        offset: usize,
    ) -> Result<(), CudaError> {
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(dst);
        assert!(offset + bytes.len() <= src.bytes, "download past the end");
        self.ctx.bind_to_thread()?;
        // SAFETY: the range lies inside the allocation (asserted); we wait for the copy
        // before `dst` is used.
        unsafe {
            result::memcpy_dtoh_async(bytes, src.ptr + offset as u64, self.stream.cu_stream())?;
        }
        self.sync()
    }

    pub(crate) fn zero(&self, mem: &DeviceMem) -> Result<(), CudaError> {
        // A backend may move between threads: every entry point makes its context current.
        self.ctx.bind_to_thread()?;
        // SAFETY: writes exactly the allocation.
        unsafe { result::memset_d8_async(mem.ptr, 0, mem.bytes, self.stream.cu_stream()) }?;
        Ok(())
    }

    /// Zeros `bytes` bytes at `ptr` (a range inside one of the caller's allocations).
    pub(crate) fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<(), CudaError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: callers pass a range inside their allocations.
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }

    pub(crate) fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: callers pass ranges inside their allocations.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }?;
        Ok(())
    }
}

/// One device allocation, freed on drop.
pub(crate) struct DeviceMem {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceMem {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<DeviceMem, CudaError> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain allocation of `bytes.max(1)` bytes, owned by the result.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }?;
        Ok(DeviceMem {
            ptr,
            bytes,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from malloc_sync and is freed once; the stream's work
            // that used it has been waited for by the owner (it synchronizes on drop).
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// The committed PTX is what `cargo xtask ptx` wrote from the committed sources: a
    /// source edited without regenerating (or PTX edited by hand) fails here, in CI,
    /// which has no NVRTC; `cargo xtask ptx --check` compiles again and compares bytes.
    #[test]
    fn committed_ptx_matches_its_sources() {
        let manifest: serde_json::Value =
            serde_json::from_str(include_str!("../../kernels/manifest.json")).expect("manifest");
        let hash = |text: &str| blake3::hash(text.as_bytes()).to_hex().to_string();
        let files = [
            ("models.cu", include_str!("../../kernels/models.cu")),
            ("models.f32.ptx", super::kernels::PTX_F32),
            ("models.bf16.ptx", super::kernels::PTX_BF16),
        ];
        for (name, text) in files {
            let want = if name.ends_with(".ptx") {
                &manifest["ptx"][name]["blake3"]
            } else {
                &manifest["sources"][name]
            };
            assert_eq!(
                want.as_str(),
                Some(hash(text).as_str()),
                "{name} differs from crates/engine/kernels/manifest.json: run `cargo xtask ptx` and commit what it writes"
            );
        }
    }
}
