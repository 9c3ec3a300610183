//! Matrix products through cuBLASLt, column-major as cuBLAS counts.
//!
//! hivetrain's buffers are row-major; a row-major `[rows, cols]` matrix is a column-major
//! `[cols, rows]` one, so each product below is written for the column-major views (the
//! call sites in `gpt2.rs` say which). One handle, one caller-owned workspace and one
//! stream: what cuBLAS asks for repeatable bits on one machine class. The algorithm is
//! the heuristic's first choice for the shapes, which is the same for the same shapes,
//! library and GPU; it is asked once per shape and kept (a model has a few dozen), so a
//! step does not pay the heuristic's host time on every product.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result, sys};
use cudarc::driver::CudaStream;

use super::{CudaError, DeviceMem, Gpu};

/// Bytes of the workspace (NVIDIA's recommendation for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;
/// Product shapes whose algorithm is kept; past it the cache starts over (a model uses
/// a few dozen shapes, so only a stream of odd batch shapes reaches it).
const ALGO_CACHE_MAX: usize = 256;

/// Element types of a product's operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    Bf16,
}

impl Elem {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Elem::F32 => sys::cudaDataType::CUDA_R_32F,
            Elem::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }
}

/// One product `D = alpha * op(A) op(B) + beta * C (+ bias per row of D)`, with C = D.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gemm {
    pub(crate) transa: bool,
    pub(crate) transb: bool,
    pub(crate) m: u64,
    pub(crate) n: u64,
    pub(crate) k: u64,
    pub(crate) lda: i64,
    pub(crate) ldb: i64,
    pub(crate) ldd: i64,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
    /// `(count, stride_a, stride_b, stride_d)` for a strided batch.
    pub(crate) batch: Option<(i32, i64, i64, i64)>,
}

pub(crate) struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceMem,
    stream: Arc<CudaStream>,
    /// The inputs' type (the activations' precision) and the compute type.
    input: Elem,
    /// The heuristic's algorithm per product shape.
    algos: Mutex<HashMap<AlgoKey, sys::cublasLtMatmulAlgo_t>>,
}

/// What the heuristic's choice depends on: the shapes, strides, transposes, whether C
/// is read, D's type and the epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct AlgoKey {
    ops: (bool, bool),
    mnk: (u64, u64, u64),
    lds: (i64, i64, i64),
    batch: Option<(i32, i64, i64, i64)>,
    reads_c: bool,
    d_f32: bool,
    bias: bool,
}

// SAFETY: the handle is used from one thread at a time (the backend is `Send`, not
// shared), as cuBLASLt allows.
unsafe impl Send for Blas {}

impl Blas {
    pub(crate) fn new(gpu: &Gpu, input: Elem) -> Result<Blas, CudaError> {
        gpu.ctx.bind_to_thread()?;
        let handle = result::create_handle()?;
        Ok(Blas {
            handle,
            workspace: gpu.alloc(WORKSPACE_BYTES)?,
            stream: gpu.stream.clone(),
            input,
            algos: Mutex::new(HashMap::new()),
        })
    }

    /// Runs `g` on device pointers; `d_elem` is D's type (the inputs' type, or f32 for
    /// weight gradients), `bias` a vector of D's type with `m` entries.
    pub(crate) fn gemm(
        &self,
        g: Gemm,
        a: u64,
        b: u64,
        d: u64,
        d_elem: Elem,
        bias: Option<u64>,
    ) -> Result<(), CudaError> {
        // f32 accumulation always; with f32 inputs true f32 products (no TF32), for
        // checks against the CPU.
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let (a_rows, a_cols) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (b_rows, b_cols) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let layouts = Layouts::new([
            (
                self.input,
                a_rows,
                a_cols,
                g.lda,
                g.batch.map(|(c, s, _, _)| (c, s)),
            ),
            (
                self.input,
                b_rows,
                b_cols,
                g.ldb,
                g.batch.map(|(c, _, s, _)| (c, s)),
            ),
            (d_elem, g.m, g.n, g.ldd, g.batch.map(|(c, _, _, s)| (c, s))),
        ])?;
        let desc = Desc(result::create_matmul_desc(
            compute,
            sys::cudaDataType::CUDA_R_32F,
        )?);
        // cublasOperation_t as an int32: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
        let op = |t: bool| -> i32 { i32::from(t) };
        use sys::cublasLtMatmulDescAttributes_t as D;
        // SAFETY: each attribute is written with a value of the type cuBLASLt documents
        // for it, and the descriptors live until the product is enqueued.
        unsafe {
            set_desc(desc.0, D::CUBLASLT_MATMUL_DESC_TRANSA, &op(g.transa))?;
            set_desc(desc.0, D::CUBLASLT_MATMUL_DESC_TRANSB, &op(g.transb))?;
            if let Some(bias) = bias {
                set_desc(
                    desc.0,
                    D::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                )?;
                set_desc(desc.0, D::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias)?;
            }
            let key = AlgoKey {
                ops: (g.transa, g.transb),
                mnk: (g.m, g.n, g.k),
                lds: (g.lda, g.ldb, g.ldd),
                batch: g.batch,
                reads_c: g.beta != 0.0,
                d_f32: d_elem == Elem::F32,
                bias: bias.is_some(),
            };
            let mut algos = self.algos.lock().unwrap_or_else(|e| e.into_inner());
            let algo = match algos.get(&key) {
                Some(algo) => *algo,
                None => {
                    let pref = Pref(result::create_matmul_pref()?);
                    result::set_matmul_pref_attribute(
                        pref.0,
                        sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                        (&WORKSPACE_BYTES) as *const usize as *const c_void,
                        size_of::<usize>(),
                    )?;
                    let heuristic = result::get_matmul_algo_heuristic(
                        self.handle,
                        desc.0,
                        layouts.0[0],
                        layouts.0[1],
                        layouts.0[2],
                        layouts.0[2],
                        pref.0,
                    )?;
                    if algos.len() >= ALGO_CACHE_MAX {
                        algos.clear();
                    }
                    algos.insert(key, heuristic.algo);
                    heuristic.algo
                }
            };
            drop(algos);
            let (alpha, beta) = (g.alpha, g.beta);
            result::matmul(
                self.handle,
                desc.0,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                a as *const c_void,
                layouts.0[0],
                b as *const c_void,
                layouts.0[1],
                d as *const c_void,
                layouts.0[2],
                d as *mut c_void,
                layouts.0[2],
                &algo,
                self.workspace.ptr as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )?;
        }
        Ok(())
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `new` and is destroyed once.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

/// # Safety
/// `T` must be the type cuBLASLt documents for `attr`.
unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), CudaError> {
    // SAFETY: the caller's contract; `value` is read during the call only.
    unsafe {
        result::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            size_of::<T>(),
        )
    }?;
    Ok(())
}

struct Desc(sys::cublasLtMatmulDesc_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc, destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref, destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}

/// The A, B and D layouts of one product.
struct Layouts([sys::cublasLtMatrixLayout_t; 3]);

type LayoutSpec = (Elem, u64, u64, i64, Option<(i32, i64)>);

impl Layouts {
    fn new(specs: [LayoutSpec; 3]) -> Result<Layouts, CudaError> {
        let mut out = Layouts([std::ptr::null_mut(); 3]);
        for (i, (elem, rows, cols, ld, batch)) in specs.into_iter().enumerate() {
            out.0[i] = result::create_matrix_layout(elem.cuda(), rows, cols, ld)?;
            if let Some((count, stride)) = batch {
                use sys::cublasLtMatrixLayoutAttribute_t as L;
                // SAFETY: BATCH_COUNT is an i32, STRIDED_BATCH_OFFSET an i64.
                unsafe {
                    result::set_matrix_layout_attribute(
                        out.0[i],
                        L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        (&count) as *const i32 as *const c_void,
                        size_of::<i32>(),
                    )?;
                    result::set_matrix_layout_attribute(
                        out.0[i],
                        L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride) as *const i64 as *const c_void,
                        size_of::<i64>(),
                    )?;
                }
            }
        }
        Ok(out)
    }
}

impl Drop for Layouts {
    fn drop(&mut self) {
        for &l in &self.0 {
            if !l.is_null() {
                // SAFETY: created by create_matrix_layout, destroyed once.
                let _ = unsafe { result::destroy_matrix_layout(l) };
            }
        }
    }
}
