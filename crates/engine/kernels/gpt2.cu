// hivetrain's GPT-2 kernels for the CUDA backend (crates/engine/src/cuda).
//
// Compiled to PTX by `cargo xtask ptx` with the pinned NVRTC from PyPI, twice: with
// HT_BF16 (activations and matrix-product inputs in bf16, the fast path) and without
// (everything f32, for checks against the CPU engine). The PTX is committed beside this
// file with a manifest of hashes; a test fails when this file changes without it.
//
// Rules that make these kernels the same bits on any GPU that runs them:
// - every grid and block size depends on the shapes alone, never on the SM count;
// - no float atomics: every sum has a fixed order (warp shuffles in a fixed pattern,
//   then fixed partitions summed in index order);
// - compiled with --fmad=false (no multiply-add contraction left to the driver's JIT),
//   IEEE division and square root, no fast-math intrinsics.
// libdevice's expf and tanhf use ex2.approx and rcp.approx inside (fixed per GPU
// architecture, not specified across them), and cuBLASLt's products differ between GPU
// generations: a GPU's determinism class names both (ARCHITECTURE.md).
//
// Layouts are the CPU engine's: row-major [rows, features]; qkv rows are q | k | v, each
// split into heads. Parameters are read from a floatX copy of the f32 master weights.

#ifdef HT_BF16
// bf16 as its 16 bits (NVRTC 12.4 ships no cuda_bf16.h): widening is a shift, narrowing
// is the hardware's round-to-nearest-even conversion (sm_80+).
typedef unsigned short floatX;
__device__ __forceinline__ float tof(floatX x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ floatX fromf(float x) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
#else
typedef float floatX;
__device__ __forceinline__ float tof(floatX x) { return x; }
__device__ __forceinline__ floatX fromf(float x) { return x; }
#endif

#define IGNORE_TARGET (-1)
#define NEG_INF __int_as_float(0xff800000)
#define LN_EPS 1e-5f

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum (blockDim.x a multiple of 32, at most 1024), the same on every thread.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float r = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(r);
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float r = lane < warps ? shared[lane] : NEG_INF;
    return warp_max(r);
}

// ---- conversions ----------------------------------------------------------------

extern "C" __global__ void cast_to_x(floatX* out, const float* in, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = fromf(in[i]);
}

extern "C" __global__ void cast_from_x(float* out, const floatX* in, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = tof(in[i]);
}

// ---- forward --------------------------------------------------------------------

// out[n, :] = wte[inp[n], :] + wpe[n % t, :]
extern "C" __global__ void encoder_forward(floatX* out, const int* inp, const floatX* wte,
                                           const floatX* wpe, int n, int t, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * c) return;
    int row = (int)(i / c), col = (int)(i % c);
    out[i] = fromf(tof(wte[(long)inp[row] * c + col]) + tof(wpe[(long)(row % t) * c + col]));
}

// One warp a row: out = (x - mean) * rstd * w + b.
extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd,
                                             const floatX* inp, const floatX* w,
                                             const floatX* b, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* x = inp + (long)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += tof(x[i]);
    float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = tof(x[i]) - m;
        v += d * d;
    }
    float r = 1.0f / sqrtf(warp_sum(v) / c + LN_EPS);
    floatX* o = out + (long)row * c;
    for (int i = lane; i < c; i += 32) o[i] = fromf((tof(x[i]) - m) * r * tof(w[i]) + tof(b[i]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// qkv [b, t, 3, nh, hs] -> q, k, v [b, nh, t, hs]
extern "C" __global__ void attn_permute(floatX* q, floatX* k, floatX* v, const floatX* qkv,
                                        int b, int t, int nh, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    long r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    long c = (long)nh * hs;
    long src = ((long)bb * t + tt) * 3 * c + (long)h * hs + d;
    q[i] = qkv[src];
    k[i] = qkv[src + c];
    v[i] = qkv[src + 2 * c];
}

// y [b, nh, t, hs] -> out [b, t, nh, hs]
extern "C" __global__ void attn_unpermute(floatX* out, const floatX* y, int b, int t, int nh,
                                          int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    long r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    out[((long)bb * t + tt) * nh * hs + (long)h * hs + d] = y[i];
}

// One warp a row of [rows = b*nh*t, t]: causal softmax of scale * preatt; zeros above the
// diagonal.
extern "C" __global__ void attn_softmax(floatX* att, const floatX* preatt, float scale,
                                        int rows, int t) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int pos = row % t;
    const floatX* x = preatt + (long)row * t;
    floatX* o = att + (long)row * t;
    float m = NEG_INF;
    for (int j = lane; j <= pos; j += 32) m = fmaxf(m, scale * tof(x[j]));
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j <= pos; j += 32) s += expf(scale * tof(x[j]) - m);
    s = warp_sum(s);
    float inv = 1.0f / s;
    for (int j = lane; j < t; j += 32)
        o[j] = j <= pos ? fromf(expf(scale * tof(x[j]) - m) * inv) : fromf(0.0f);
}

#define GELU_SCALE 0.7978845608f
#define GELU_CUBIC 0.044715f

extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = tof(inp[i]);
    float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    out[i] = fromf(0.5f * x * (1.0f + tanhf(u)));
}

// One block a row of logits [n, v]: the row's loss (0 for an ignored target), and with
// grad_scale > 0 the logits replaced by grad_scale * (softmax - onehot) (zeros for an
// ignored target).
extern "C" __global__ void softmax_xent(floatX* logits, float* losses, const int* targets,
                                        int n, int v, float grad_scale) {
    __shared__ float shared[32];
    int row = blockIdx.x;
    if (row >= n) return;
    floatX* x = logits + (long)row * v;
    int target = targets[row];
    float m = NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, tof(x[j]));
    m = block_max(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(tof(x[j]) - m);
    s = block_sum(s, shared);
    if (threadIdx.x == 0)
        losses[row] = target == IGNORE_TARGET ? 0.0f : logf(s) + m - tof(x[target]);
    __syncthreads();  // every thread has read x[target] before it is overwritten
    if (grad_scale > 0.0f) {
        float inv = 1.0f / s;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            float g = target == IGNORE_TARGET
                          ? 0.0f
                          : (expf(tof(x[j]) - m) * inv - (j == target ? 1.0f : 0.0f)) * grad_scale;
            x[j] = fromf(g);
        }
    }
}

// ---- backward -------------------------------------------------------------------

extern "C" __global__ void gelu_backward(floatX* dinp, const floatX* inp, const floatX* dout,
                                         long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = tof(inp[i]);
    float x2 = x * x;
    float u = GELU_SCALE * (x + GELU_CUBIC * x2 * x);
    float th = tanhf(u);
    float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x2);
    dinp[i] = fromf(tof(dout[i]) * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du));
}

// Partial column sums of x [n, c] over chunks of `chunk` rows: partial[r, j] is the sum
// of rows r*chunk .. (r+1)*chunk in order. Grid (ceil(c / blockDim), ceil(n / chunk)).
extern "C" __global__ void column_sum_partial(float* partial, const floatX* x, int n, int c,
                                              int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (j >= c) return;
    int end = min(n, (r + 1) * chunk);
    float s = 0.0f;
    for (int i = r * chunk; i < end; i++) s += tof(x[(long)i * c + j]);
    partial[(long)r * c + j] = s;
}

// out[j] (+)= sum over r of partial[r, j], in order of r.
extern "C" __global__ void column_sum_final(float* out, const float* partial, int chunks, int c,
                                            int accumulate) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (int r = 0; r < chunks; r++) s += partial[(long)r * c + j];
    out[j] = accumulate ? out[j] + s : s;
}

// LayerNorm's parameter gradients, partial sums as column_sum_partial: pw[r, j] sums
// dout * xhat, pb[r, j] sums dout.
extern "C" __global__ void layernorm_param_partial(float* pw, float* pb, const floatX* dout,
                                                   const floatX* inp, const float* mean,
                                                   const float* rstd, int n, int c, int chunk) {
    int j = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (j >= c) return;
    int end = min(n, (r + 1) * chunk);
    float sw = 0.0f, sb = 0.0f;
    for (int i = r * chunk; i < end; i++) {
        float g = tof(dout[(long)i * c + j]);
        float xhat = (tof(inp[(long)i * c + j]) - mean[i]) * rstd[i];
        sw += g * xhat;
        sb += g;
    }
    pw[(long)r * c + j] = sw;
    pb[(long)r * c + j] = sb;
}

// One warp a row: dinp += LayerNorm's input gradient.
extern "C" __global__ void layernorm_backward_input(floatX* dinp, const floatX* dout,
                                                    const floatX* inp, const floatX* w,
                                                    const float* mean, const float* rstd,
                                                    int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* g = dout + (long)row * c;
    const floatX* x = inp + (long)row * c;
    float m = mean[row], r = rstd[row];
    float a = 0.0f, bsum = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float dn = tof(g[i]) * tof(w[i]);
        a += dn;
        bsum += dn * (tof(x[i]) - m) * r;
    }
    a = warp_sum(a) / c;
    bsum = warp_sum(bsum) / c;
    floatX* d = dinp + (long)row * c;
    for (int i = lane; i < c; i += 32) {
        float dn = tof(g[i]) * tof(w[i]);
        float xhat = (tof(x[i]) - m) * r;
        d[i] = fromf(tof(d[i]) + (dn - a - xhat * bsum) * r);
    }
}

// One warp a row: dpreatt = scale * att * (datt - sum(att * datt)) on and below the
// diagonal, zeros above.
extern "C" __global__ void attn_softmax_backward(floatX* dpreatt, const floatX* datt,
                                                 const floatX* att, float scale, int rows,
                                                 int t) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    int pos = row % t;
    const floatX* a = att + (long)row * t;
    const floatX* da = datt + (long)row * t;
    floatX* o = dpreatt + (long)row * t;
    float s = 0.0f;
    for (int j = lane; j <= pos; j += 32) s += tof(a[j]) * tof(da[j]);
    s = warp_sum(s);
    for (int j = lane; j < t; j += 32)
        o[j] = j <= pos ? fromf(scale * tof(a[j]) * (tof(da[j]) - s)) : fromf(0.0f);
}

// dq, dk, dv [b, nh, t, hs] -> dqkv [b, t, 3, nh, hs]
extern "C" __global__ void attn_permute_backward(floatX* dqkv, const floatX* dq,
                                                 const floatX* dk, const floatX* dv, int b,
                                                 int t, int nh, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    long r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    long c = (long)nh * hs;
    long dst = ((long)bb * t + tt) * 3 * c + (long)h * hs + d;
    dqkv[dst] = dq[i];
    dqkv[dst + c] = dk[i];
    dqkv[dst + 2 * c] = dv[i];
}

// dout [b, t, nh, hs] -> dy [b, nh, t, hs]
extern "C" __global__ void attn_unpermute_backward(floatX* dy, const floatX* dout, int b, int t,
                                                   int nh, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long total = (long)b * nh * t * hs;
    if (i >= total) return;
    int d = (int)(i % hs);
    long r = i / hs;
    int tt = (int)(r % t);
    r /= t;
    int h = (int)(r % nh);
    int bb = (int)(r / nh);
    dy[i] = dout[((long)bb * t + tt) * nh * hs + (long)h * hs + d];
}

// dwpe[p, j] = sum over windows of dres[w * t + p, j], in window order.
extern "C" __global__ void wpe_backward(float* dwpe, const floatX* dres, int b, int t, int c) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)t * c) return;
    float s = 0.0f;
    for (int w = 0; w < b; w++) s += tof(dres[(long)w * t * c + i]);
    dwpe[i] = s;
}

// dwte[token, j] += the sum of dres over the rows that hold `token`, in row order.
// Bucket k holds token tokens[k] at rows rows[starts[k] .. starts[k + 1]] (sorted on the
// host, so no two blocks write one row of dwte). Grid (buckets, ceil(c / blockDim)).
extern "C" __global__ void wte_backward(float* dwte, const floatX* dres, const int* tokens,
                                        const int* starts, const int* rows, int c) {
    int k = blockIdx.x, j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float s = 0.0f;
    for (int i = starts[k]; i < starts[k + 1]; i++) s += tof(dres[(long)rows[i] * c + j]);
    dwte[(long)tokens[k] * c + j] += s;
}

// ---- optimizer ------------------------------------------------------------------

// Sum of squares in f64, one partial per block over a grid-stride loop; the grid is
// fixed by the caller (never the SM count), so the order is too.
extern "C" __global__ void sum_squares_partial(double* partial, const float* x, long n) {
    __shared__ double shared[32];
    double s = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        double v = x[i];
        s += v * v;
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    s = warp_sum_d(s);
    if (lane == 0) shared[warp] = s;
    __syncthreads();
    if (warp == 0) {
        double r = lane < warps ? shared[lane] : 0.0;
        r = warp_sum_d(r);
        if (lane == 0) partial[blockIdx.x] = r;
    }
}

// AdamW on one tensor: the f32 master weights, their floatX copy, the moments.
extern "C" __global__ void adamw(float* p, floatX* px, const float* g, float* m, float* v,
                                 long n, float b1, float b2, float eps, float decay,
                                 float step_size, float bc2_sqrt, float clip) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i] * clip;
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi) / bc2_sqrt + eps;
    float pi = p[i] * decay - step_size * mi / denom;
    p[i] = pi;
    px[i] = fromf(pi);
}
