// hivetrain's kernels for the CUDA backend (crates/engine/src/cuda): GPT-2's, Llama's
// (RMSNorm, rotary embeddings, SwiGLU), and the fused attention both use.
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
// split into heads (a Llama's k and v have fewer heads than q). Parameters are read from a
// floatX copy of the f32 master weights.

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
// Two floats as a bf16 pair, `lo` in the low half (round to nearest even).
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Eight consecutive values (16 bytes, aligned) as floats, and back.
__device__ __forceinline__ void load8(float* out, const floatX* p) {
    uint4 u = *(const uint4*)p;
    unsigned w[4] = {u.x, u.y, u.z, u.w};
    for (int k = 0; k < 4; k++) {
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ void store8(floatX* p, const float* in) {
    uint4 u;
    u.x = pack2(in[0], in[1]);
    u.y = pack2(in[2], in[3]);
    u.z = pack2(in[4], in[5]);
    u.w = pack2(in[6], in[7]);
    *(uint4*)p = u;
}
#else
typedef float floatX;
__device__ __forceinline__ float tof(floatX x) { return x; }
__device__ __forceinline__ floatX fromf(float x) { return x; }
// Eight consecutive values (32 bytes, aligned to 16), and back.
__device__ __forceinline__ void load8(float* out, const floatX* p) {
    float4 a = *(const float4*)p, b = *(const float4*)(p + 4);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}
__device__ __forceinline__ void store8(floatX* p, const float* in) {
    float4 a, b;
    a.x = in[0], a.y = in[1], a.z = in[2], a.w = in[3];
    b.x = in[4], b.y = in[5], b.z = in[6], b.w = in[7];
    *(float4*)p = a;
    *(float4*)(p + 4) = b;
}
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

// One warp a row: out = (x - mean) * rstd * w + b. Each lane takes eight columns at a
// time (c a multiple of 8; the host checks).
extern "C" __global__ void layernorm_forward(floatX* __restrict__ out, float* __restrict__ mean,
                                             float* __restrict__ rstd,
                                             const floatX* __restrict__ inp,
                                             const floatX* __restrict__ w,
                                             const floatX* __restrict__ b, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* x = inp + (long)row * c;
    float s = 0.0f;
    for (int i = lane * 8; i < c; i += 256) {
        float xv[8];
        load8(xv, x + i);
        for (int k = 0; k < 8; k++) s += xv[k];
    }
    float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane * 8; i < c; i += 256) {
        float xv[8];
        load8(xv, x + i);
        for (int k = 0; k < 8; k++) {
            float d = xv[k] - m;
            v += d * d;
        }
    }
    float r = 1.0f / sqrtf(warp_sum(v) / c + LN_EPS);
    floatX* o = out + (long)row * c;
    for (int i = lane * 8; i < c; i += 256) {
        float xv[8], wv[8], bv[8];
        load8(xv, x + i);
        load8(wv, w + i);
        load8(bv, b + i);
        for (int k = 0; k < 8; k++) xv[k] = (xv[k] - m) * r * wv[k] + bv[k];
        store8(o + i, xv);
    }
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

__device__ __forceinline__ float gelu(float x) {
    float u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

// Eight elements a thread (one by one past the last whole eight).
extern "C" __global__ void gelu_forward(floatX* __restrict__ out, const floatX* __restrict__ inp,
                                        long n) {
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 <= n) {
        float v[8];
        load8(v, inp + i);
        for (int k = 0; k < 8; k++) v[k] = gelu(v[k]);
        store8(out + i, v);
    } else {
        for (; i < n; i++) out[i] = fromf(gelu(tof(inp[i])));
    }
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
    // Eight logits a thread at a time where the row allows (v a multiple of 8).
    int step = v % 8 == 0 ? 8 : 1;
    float m = NEG_INF;
    for (int j = threadIdx.x * step; j < v; j += blockDim.x * step) {
        if (step == 8) {
            float xv[8];
            load8(xv, x + j);
            for (int k = 0; k < 8; k++) m = fmaxf(m, xv[k]);
        } else {
            m = fmaxf(m, tof(x[j]));
        }
    }
    m = block_max(m, shared);
    float s = 0.0f;
    for (int j = threadIdx.x * step; j < v; j += blockDim.x * step) {
        if (step == 8) {
            float xv[8];
            load8(xv, x + j);
            for (int k = 0; k < 8; k++) s += expf(xv[k] - m);
        } else {
            s += expf(tof(x[j]) - m);
        }
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0)
        losses[row] = target == IGNORE_TARGET ? 0.0f : logf(s) + m - tof(x[target]);
    __syncthreads();  // every thread has read x[target] before it is overwritten
    if (grad_scale > 0.0f) {
        float inv = 1.0f / s;
        for (int j = threadIdx.x * step; j < v; j += blockDim.x * step) {
            float xv[8];
            if (step == 8) load8(xv, x + j);
            else xv[0] = tof(x[j]);
            for (int k = 0; k < step; k++) {
                float g = target == IGNORE_TARGET ? 0.0f
                                                  : (expf(xv[k] - m) * inv -
                                                     (j + k == target ? 1.0f : 0.0f)) *
                                                        grad_scale;
                xv[k] = g;
            }
            if (step == 8) store8(x + j, xv);
            else x[j] = fromf(xv[0]);
        }
    }
}

// ---- backward -------------------------------------------------------------------

__device__ __forceinline__ float gelu_grad(float x, float d) {
    float x2 = x * x;
    float u = GELU_SCALE * (x + GELU_CUBIC * x2 * x);
    float th = tanhf(u);
    float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x2);
    return d * (0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du);
}

// Eight elements a thread, as gelu_forward.
extern "C" __global__ void gelu_backward(floatX* __restrict__ dinp, const floatX* __restrict__ inp,
                                         const floatX* __restrict__ dout, long n) {
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i + 8 <= n) {
        float xs[8], ds[8];
        load8(xs, inp + i);
        load8(ds, dout + i);
        for (int k = 0; k < 8; k++) ds[k] = gelu_grad(xs[k], ds[k]);
        store8(dinp + i, ds);
    } else {
        for (; i < n; i++) dinp[i] = fromf(gelu_grad(tof(inp[i]), tof(dout[i])));
    }
}

// Column sums, in two passes with a fixed order and enough blocks to fill the GPU.
// Pass one, grid (ceil(c / 64), ceil(n / SUM_ROWS)), 256 threads: block (x, r) sums rows
// r * SUM_ROWS .. of 64 columns; warp w takes rows w, w + 8, ... (each lane two columns,
// 32 apart, so a warp reads whole lines), then the eight warp sums are added in order
// into partial[r, j]. Pass two (column_sum_final) adds the partials.
#define SUM_ROWS 64

extern "C" __global__ void column_sum_partial(float* partial, const floatX* x, int n, int c) {
    __shared__ float sums[8][64];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j0 = blockIdx.x * 64 + lane, j1 = j0 + 32;
    int r0 = blockIdx.y * SUM_ROWS, end = min(n, r0 + SUM_ROWS);
    float a0 = 0.0f, a1 = 0.0f;
    for (int i = r0 + warp; i < end; i += 8) {
        const floatX* row = x + (long)i * c;
        if (j0 < c) a0 += tof(row[j0]);
        if (j1 < c) a1 += tof(row[j1]);
    }
    sums[warp][lane] = a0;
    sums[warp][lane + 32] = a1;
    __syncthreads();
    int j = blockIdx.x * 64 + threadIdx.x;
    if (threadIdx.x < 64 && j < c) {
        float t = 0.0f;
        for (int w = 0; w < 8; w++) t += sums[w][threadIdx.x];
        partial[(long)blockIdx.y * c + j] = t;
    }
}

// Grid ceil(c / 32), 256 threads: out[j] (+)= the sum over r of partial[r, j]; thread
// (lane, warp) sums r = warp, warp + 8, ..., then the eight are added in warp order.
extern "C" __global__ void column_sum_final(float* out, const float* partial, int chunks, int c,
                                            int accumulate) {
    __shared__ float sums[8][32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j = blockIdx.x * 32 + lane;
    float a = 0.0f;
    if (j < c)
        for (int r = warp; r < chunks; r += 8) a += partial[(long)r * c + j];
    sums[warp][lane] = a;
    __syncthreads();
    if (warp == 0 && j < c) {
        float t = 0.0f;
        for (int w = 0; w < 8; w++) t += sums[w][lane];
        out[j] = accumulate ? out[j] + t : t;
    }
}

// LayerNorm's parameter gradients, partial sums as column_sum_partial: pw[r, j] sums
// dout * xhat, pb[r, j] sums dout.
extern "C" __global__ void layernorm_param_partial(float* pw, float* pb, const floatX* dout,
                                                   const floatX* inp, const float* mean,
                                                   const float* rstd, int n, int c) {
    __shared__ float sums[2][8][64];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j0 = blockIdx.x * 64 + lane, j1 = j0 + 32;
    int r0 = blockIdx.y * SUM_ROWS, end = min(n, r0 + SUM_ROWS);
    float w0 = 0.0f, w1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
    for (int i = r0 + warp; i < end; i += 8) {
        const floatX* g = dout + (long)i * c;
        const floatX* x = inp + (long)i * c;
        float m = mean[i], r = rstd[i];
        if (j0 < c) {
            float d = tof(g[j0]);
            w0 += d * ((tof(x[j0]) - m) * r);
            b0 += d;
        }
        if (j1 < c) {
            float d = tof(g[j1]);
            w1 += d * ((tof(x[j1]) - m) * r);
            b1 += d;
        }
    }
    sums[0][warp][lane] = w0;
    sums[0][warp][lane + 32] = w1;
    sums[1][warp][lane] = b0;
    sums[1][warp][lane + 32] = b1;
    __syncthreads();
    int j = blockIdx.x * 64 + threadIdx.x % 64, which = threadIdx.x / 64;
    if (threadIdx.x < 128 && j < c) {
        float t = 0.0f;
        for (int w = 0; w < 8; w++) t += sums[which][w][threadIdx.x % 64];
        (which == 0 ? pw : pb)[(long)blockIdx.y * c + j] = t;
    }
}

// One warp a row: dinp += LayerNorm's input gradient. Each lane takes eight columns at a
// time (c a multiple of 8; the host checks).
extern "C" __global__ void layernorm_backward_input(floatX* __restrict__ dinp,
                                                    const floatX* __restrict__ dout,
                                                    const floatX* __restrict__ inp,
                                                    const floatX* __restrict__ w,
                                                    const float* __restrict__ mean,
                                                    const float* __restrict__ rstd, int n,
                                                    int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* g = dout + (long)row * c;
    const floatX* x = inp + (long)row * c;
    float m = mean[row], r = rstd[row];
    float a = 0.0f, bsum = 0.0f;
    for (int i = lane * 8; i < c; i += 256) {
        float gv[8], xv[8], wv[8];
        load8(gv, g + i);
        load8(xv, x + i);
        load8(wv, w + i);
        for (int k = 0; k < 8; k++) {
            float dn = gv[k] * wv[k];
            a += dn;
            bsum += dn * (xv[k] - m) * r;
        }
    }
    a = warp_sum(a) / c;
    bsum = warp_sum(bsum) / c;
    floatX* d = dinp + (long)row * c;
    for (int i = lane * 8; i < c; i += 256) {
        float gv[8], xv[8], wv[8], dv[8];
        load8(gv, g + i);
        load8(xv, x + i);
        load8(wv, w + i);
        load8(dv, d + i);
        for (int k = 0; k < 8; k++) {
            float xhat = (xv[k] - m) * r;
            dv[k] = dv[k] + (gv[k] * wv[k] - a - xhat * bsum) * r;
        }
        store8(d + i, dv);
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


// ---- Llama ------------------------------------------------------------------------
//
// The CPU engine's llama/ops.rs, kernel for kernel. Widths (hidden, intermediate) are
// multiples of 8 (the host checks): each thread takes eight values at a time.

// out[n, :] = embed[inp[n], :]; eight values a thread.
extern "C" __global__ void embed_forward(floatX* out, const int* inp, const floatX* embed, int n,
                                         int c) {
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (long)n * c) return;
    int row = (int)(i / c), col = (int)(i % c);
    float v[8];
    load8(v, embed + (long)inp[row] * c + col);
    store8(out + i, v);
}

// One warp a row: out = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps), as HF's
// LlamaRMSNorm (normalize, then scale by the gain); saves rstd.
extern "C" __global__ void rmsnorm_forward(floatX* __restrict__ out, float* __restrict__ rstd,
                                           const floatX* __restrict__ inp,
                                           const floatX* __restrict__ w, int n, int c,
                                           float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* x = inp + (long)row * c;
    float s = 0.0f;
    for (int i = lane * 8; i < c; i += 256) {
        float xv[8];
        load8(xv, x + i);
        for (int k = 0; k < 8; k++) s += xv[k] * xv[k];
    }
    float r = 1.0f / sqrtf(warp_sum(s) / c + eps);
    floatX* o = out + (long)row * c;
    for (int i = lane * 8; i < c; i += 256) {
        float xv[8], wv[8];
        load8(xv, x + i);
        load8(wv, w + i);
        for (int k = 0; k < 8; k++) xv[k] = xv[k] * r * wv[k];
        store8(o + i, xv);
    }
    if (lane == 0) rstd[row] = r;
}

// One warp a row: dinp += RMSNorm's input gradient, r g - r^3 (g . x / c) x with
// g = dout * w.
extern "C" __global__ void rmsnorm_backward_input(floatX* __restrict__ dinp,
                                                  const floatX* __restrict__ dout,
                                                  const floatX* __restrict__ inp,
                                                  const floatX* __restrict__ w,
                                                  const float* __restrict__ rstd, int n, int c) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n) return;
    const floatX* g = dout + (long)row * c;
    const floatX* x = inp + (long)row * c;
    float r = rstd[row];
    float a = 0.0f;
    for (int i = lane * 8; i < c; i += 256) {
        float gv[8], xv[8], wv[8];
        load8(gv, g + i);
        load8(xv, x + i);
        load8(wv, w + i);
        for (int k = 0; k < 8; k++) a += gv[k] * wv[k] * xv[k];
    }
    float kx = r * r * r * warp_sum(a) / c;
    floatX* d = dinp + (long)row * c;
    for (int i = lane * 8; i < c; i += 256) {
        float gv[8], xv[8], wv[8], dv[8];
        load8(gv, g + i);
        load8(xv, x + i);
        load8(wv, w + i);
        load8(dv, d + i);
        for (int k = 0; k < 8; k++) dv[k] = dv[k] + (r * (gv[k] * wv[k]) - kx * xv[k]);
        store8(d + i, dv);
    }
}

// RMSNorm's gain gradient, partial sums as column_sum_partial: pw[r, j] sums
// dout * x * rstd.
extern "C" __global__ void rmsnorm_param_partial(float* pw, const floatX* dout, const floatX* inp,
                                                 const float* rstd, int n, int c) {
    __shared__ float sums[8][64];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int j0 = blockIdx.x * 64 + lane, j1 = j0 + 32;
    int r0 = blockIdx.y * SUM_ROWS, end = min(n, r0 + SUM_ROWS);
    float w0 = 0.0f, w1 = 0.0f;
    for (int i = r0 + warp; i < end; i += 8) {
        const floatX* g = dout + (long)i * c;
        const floatX* x = inp + (long)i * c;
        float r = rstd[i];
        if (j0 < c) w0 += tof(g[j0]) * (tof(x[j0]) * r);
        if (j1 < c) w1 += tof(g[j1]) * (tof(x[j1]) * r);
    }
    sums[warp][lane] = w0;
    sums[warp][lane + 32] = w1;
    __syncthreads();
    int j = blockIdx.x * 64 + threadIdx.x;
    if (threadIdx.x < 64 && j < c) {
        float t = 0.0f;
        for (int w = 0; w < 8; w++) t += sums[w][threadIdx.x];
        pw[(long)blockIdx.y * c + j] = t;
    }
}

// Rotary embeddings in place, HF's rotate_half layout: in each of the first `heads` heads
// of a row (`half` * 2 wide), element i pairs with i + half, turned by the angle of the
// row's position (pos0 + row % t) from the f32 tables [positions, half]; `inverse` turns
// back (the backward pass). One thread a pair.
extern "C" __global__ void rope(floatX* x, const float* cos_t, const float* sin_t, int n, int t,
                                int pos0, int stride, int heads, int half, int inverse) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)n * heads * half) return;
    int k = (int)(i % half);
    long rest = i / half;
    int h = (int)(rest % heads), row = (int)(rest / heads);
    floatX* p = x + (long)row * stride + h * 2 * half;
    long at = (long)(pos0 + row % t) * half + k;
    float cs = cos_t[at], sn = inverse ? -sin_t[at] : sin_t[at];
    float a = tof(p[k]), b = tof(p[k + half]);
    p[k] = fromf(a * cs - b * sn);
    p[k + half] = fromf(b * cs + a * sn);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// act[n, f] = silu(gate) * up, gate_up [n, 2f] holding gate then up in each row; eight
// values a thread.
extern "C" __global__ void swiglu_forward(floatX* __restrict__ act,
                                          const floatX* __restrict__ gate_up, int n, int f) {
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (long)n * f) return;
    long row = i / f, col = i % f;
    const floatX* gu = gate_up + row * 2 * f + col;
    float g[8], u[8];
    load8(g, gu);
    load8(u, gu + f);
    for (int k = 0; k < 8; k++) g[k] = g[k] * sigmoid(g[k]) * u[k];
    store8(act + i, g);
}

// The backward of swiglu_forward: writes dgate_up [n, 2f].
extern "C" __global__ void swiglu_backward(floatX* __restrict__ dgate_up,
                                           const floatX* __restrict__ gate_up,
                                           const floatX* __restrict__ dact, int n, int f) {
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (long)n * f) return;
    long row = i / f, col = i % f;
    const floatX* gu = gate_up + row * 2 * f + col;
    floatX* dgu = dgate_up + row * 2 * f + col;
    float g[8], u[8], d[8], dg[8], du[8];
    load8(g, gu);
    load8(u, gu + f);
    load8(d, dact + i);
    for (int k = 0; k < 8; k++) {
        float s = sigmoid(g[k]);
        du[k] = d[k] * (g[k] * s);
        dg[k] = d[k] * u[k] * (s * (1.0f + g[k] * (1.0f - s)));
    }
    store8(dgu, dg);
    store8(dgu + f, du);
}

// ---- decoding ---------------------------------------------------------------------

// Attention of new rows over a KV cache, heads of hs <= 64. Grid (m, nh, batch), 128
// threads: row i (at position pos0 + i) of head h attends to the cache's keys
// 0 ..= pos0 + i of head h / group. Row j of q, k and v starts at j * stride (q counted
// from the first new row, k and v from position 0), batch element bb's rows t * bb rows
// on (decoding: one element; an f32 forward pass: pos0 0, each batch row its own cache).
// Each warp takes keys warp, warp + 4, ... with an online softmax (lane l the columns 2l
// and 2l + 1 that are under hs, zeros past it), then the four are merged in warp order: a
// fixed order, so the same bits every time.
extern "C" __global__ void decode_attention(floatX* out, const floatX* q, const floatX* k,
                                            const floatX* v, int pos0, int t, int group,
                                            int stride, int out_stride, float scale,
                                            int hs) {
    __shared__ float wm[4], wl[4], wo[4][64];
    int i = blockIdx.x, h = blockIdx.y, kvh = h / group;
    long skip = (long)blockIdx.z * t;
    q += skip * stride;
    k += skip * stride;
    v += skip * stride;
    out += skip * out_stride;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int d0 = 2 * lane, d1 = 2 * lane + 1;
    bool in0 = d0 < hs, in1 = d1 < hs;
    const floatX* qr = q + (long)i * stride + h * hs;
    float q0 = in0 ? tof(qr[d0]) : 0.0f, q1 = in1 ? tof(qr[d1]) : 0.0f;
    float m = NEG_INF, l = 0.0f, o0 = 0.0f, o1 = 0.0f;
    for (int j = warp; j <= pos0 + i; j += 4) {
        const floatX* kr = k + (long)j * stride + kvh * hs;
        const floatX* vr = v + (long)j * stride + kvh * hs;
        float k0 = in0 ? tof(kr[d0]) : 0.0f, k1 = in1 ? tof(kr[d1]) : 0.0f;
        float v0 = in0 ? tof(vr[d0]) : 0.0f, v1 = in1 ? tof(vr[d1]) : 0.0f;
        float s = warp_sum(q0 * k0 + q1 * k1) * scale;
        float next = fmaxf(m, s);
        float corr = m == NEG_INF ? 0.0f : expf(m - next);
        float e = expf(s - next);
        l = l * corr + e;
        o0 = o0 * corr + e * v0;
        o1 = o1 * corr + e * v1;
        m = next;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
    wo[warp][d0] = o0;
    wo[warp][d1] = o1;
    __syncthreads();
    if (warp == 0) {
        float mx = NEG_INF;
        for (int w = 0; w < 4; w++) mx = fmaxf(mx, wm[w]);
        float lt = 0.0f, a0 = 0.0f, a1 = 0.0f;
        for (int w = 0; w < 4; w++) {
            float c = wm[w] == NEG_INF ? 0.0f : expf(wm[w] - mx);
            lt += wl[w] * c;
            a0 += wo[w][d0] * c;
            a1 += wo[w][d1] * c;
        }
        floatX* o = out + (long)i * out_stride + h * hs;
        if (in0) o[d0] = fromf(a0 / lt);
        if (in1) o[d1] = fromf(a1 / lt);
    }
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

// AdamW on every parameter in one launch: the f32 master weights, their floatX copy, the
// moments. Tensor k ends (exclusive) at ends[k], ascending, and decays its weights by
// `decay` when decays[k] (else by 1).
// (p and px are one buffer in the f32 build, so neither is __restrict__.)
extern "C" __global__ void adamw(float* p, floatX* px,
                                 const float* __restrict__ g, float* __restrict__ m,
                                 float* __restrict__ v, const long* __restrict__ ends,
                                 const int* __restrict__ decays, int tensors, long n, float b1,
                                 float b2, float eps, float decay_factor, float step_size,
                                 float bc2_sqrt, float clip) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (i < ends[mid]) hi = mid;
        else lo = mid + 1;
    }
    float decay = decays[lo] ? decay_factor : 1.0f;
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

#ifdef HT_BF16
// ---- fused causal attention (bf16, head size 64) ----------------------------------
//
// FlashAttention-2's tiling (Dao, 2023): a block takes 64 query rows of one head, four
// warps of 16 rows, and walks the 64-key tiles at or before them with an online softmax,
// so the [t, t] scores never reach memory. Products run on the tensor cores
// (mma.m16n8k16, bf16 in, f32 accumulate); probabilities enter P V in bf16 as in the
// paper. The backward pass is deterministic: one kernel sums dK and dV over a key tile's
// query tiles in order, another dQ over a query tile's key tiles, each recomputing P from
// the saved log-sum-exp, so no two blocks write one value and no atomics are used.
// Exponentials are base 2 (ex2.approx, what libdevice's expf uses inside) of scores
// premultiplied by log2(e); the saved log-sum-exp is in base 2 too.
//
// q, k, v, out, dq, dk, dv: the row of token tt of batch row bb, head h, starts at
// base + (bb * t + tt) * stride + h * 64 (keys and values of head h / group, for grouped
// queries). lse (base 2) and dsum: [b, nh, t] f32.

#define FA_D 64
#define FA_TILE 64
#define FA_LD 72
#define FA_THREADS 128
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ float exp2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8 and receives, of matrix i in r[i], row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 (with `trans`, column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1).
__device__ __forceinline__ void ldsm_x4(unsigned* r, const floatX* p) {
    unsigned a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                 : "=r"(a)
                 : "l"(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned* r, const floatX* p) {
    unsigned a;
    asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                 : "=r"(a)
                 : "l"(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// d[16x8] += a[16x16] b[16x8] on the tensor cores, f32 accumulation.
__device__ __forceinline__ void mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Rows [row0, row0 + 64) of a head (64 columns at src, rows `stride` apart) into a
// shared tile; zeros past row t, so no stale value meets a zero probability.
__device__ __forceinline__ void fa_load(floatX* tile, const floatX* src, int stride, int row0,
                                        int t) {
    for (int i = threadIdx.x; i < FA_TILE * FA_D / 8; i += FA_THREADS) {
        int r = i / (FA_D / 8), c = (i % (FA_D / 8)) * 8;
        uint4 v;
        v.x = v.y = v.z = v.w = 0u;
        if (row0 + r < t) v = *(const uint4*)(src + (long)(row0 + r) * stride + c);
        *(uint4*)(tile + r * FA_LD + c) = v;
    }
}

// fa_load without waiting: each thread starts copies of 16 bytes (cp.async, zeros past
// row t) that land after cp_async_wait; loading the next tile while this one computes.
__device__ __forceinline__ void fa_load_async(floatX* tile, const floatX* src, int stride,
                                              int row0, int t) {
    for (int i = threadIdx.x; i < FA_TILE * FA_D / 8; i += FA_THREADS) {
        int r = i / (FA_D / 8), c = (i % (FA_D / 8)) * 8;
        bool in = row0 + r < t;
        const floatX* from = src + (long)(in ? row0 + r : 0) * stride + c;
        unsigned dst;
        asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                     : "=r"(dst)
                     : "l"(tile + r * FA_LD + c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(from),
                     "r"(in ? 16 : 0)
                     : "memory");
    }
}

// `count` floats from src into shared dst (zeros past `valid`), as fa_load_async.
__device__ __forceinline__ void fa_load_floats_async(float* dst, const float* src, int count,
                                                     int valid) {
    for (int i = threadIdx.x; i < count; i += FA_THREADS) {
        bool in = i < valid;
        unsigned d;
        asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
                     : "=r"(d)
                     : "l"(dst + i));
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(d),
                     "l"(src + (in ? i : 0)), "r"(in ? 4 : 0)
                     : "memory");
    }
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}

// Waits until at most `pending` (0 or 1) of this thread's copy groups are in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
    if (pending == 0) asm volatile("cp.async.wait_group 0;" ::: "memory");
    else asm volatile("cp.async.wait_group 1;" ::: "memory");
}

// The mma A fragment of the tile's rows [r0, r0 + 16), columns [c0, c0 + 16).
__device__ __forceinline__ void fa_frag_a(unsigned* a, const floatX* tile, int r0, int c0) {
    int l = threadIdx.x % 32, m = l / 8;
    ldsm_x4(a, tile + (r0 + (m & 1) * 8 + l % 8) * FA_LD + c0 + (m >> 1) * 8);
}

// B fragments of two n-tiles, B[k][n] = tile[n0 + n][k0 + k] for n in [0, 16) (a
// product with the tile transposed): b[0..2] for columns n0.., b[2..4] for n0 + 8...
__device__ __forceinline__ void fa_frag_bt2(unsigned* b, const floatX* tile, int n0, int k0) {
    int l = threadIdx.x % 32, m = l / 8;
    ldsm_x4(b, tile + (n0 + (m >> 1) * 8 + l % 8) * FA_LD + k0 + (m & 1) * 8);
}

// B fragments of two n-tiles, B[k][n] = tile[k0 + k][n0 + n] (the tile as it is).
__device__ __forceinline__ void fa_frag_b2(unsigned* b, const floatX* tile, int k0, int n0) {
    int l = threadIdx.x % 32, m = l / 8;
    ldsm_x4_trans(b, tile + (k0 + (m & 1) * 8 + l % 8) * FA_LD + n0 + (m >> 1) * 8);
}

// Columns [16 j, 16 j + 16) of a warp's 16x64 accumulator as an A fragment in bf16 (the
// accumulator layout of two adjacent n-tiles is the A layout).
__device__ __forceinline__ void fa_acc_to_a(unsigned* a, float (*s)[4], int j) {
    a[0] = pack2(s[2 * j][0], s[2 * j][1]);
    a[1] = pack2(s[2 * j][2], s[2 * j][3]);
    a[2] = pack2(s[2 * j + 1][0], s[2 * j + 1][1]);
    a[3] = pack2(s[2 * j + 1][2], s[2 * j + 1][3]);
}

// acc[16x64] (+)= a[16x64] tile^T, the tile's 64 rows as columns.
__device__ __forceinline__ void fa_mul_t(float (*acc)[4], unsigned (*a)[4], const floatX* tile) {
    for (int nt = 0; nt < 8; nt++)
        for (int e = 0; e < 4; e++) acc[nt][e] = 0.0f;
    for (int np = 0; np < 4; np++)
        for (int kk = 0; kk < 4; kk++) {
            unsigned b[4];
            fa_frag_bt2(b, tile, np * 16, kk * 16);
            mma_bf16(acc[2 * np], a[kk], b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a[kk], b[2], b[3]);
        }
}

// acc[16x64] += s[16x64] (as bf16) tile.
__device__ __forceinline__ void fa_mul_add(float (*acc)[4], float (*s)[4], const floatX* tile) {
    for (int j = 0; j < 4; j++) {
        unsigned a[4];
        fa_acc_to_a(a, s, j);
        for (int np = 0; np < 4; np++) {
            unsigned b[4];
            fa_frag_b2(b, tile, j * 16, np * 16);
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Writes a warp's 16x64 accumulator (rows row0 and row0 + 8 of this thread) times
// `mul0`/`mul1` as bf16 rows of `dst`.
__device__ __forceinline__ void fa_store(floatX* dst, int stride, float (*acc)[4], int row0,
                                         int t, float mul0, float mul1) {
    int quad = threadIdx.x % 4;
    for (int nt = 0; nt < 8; nt++) {
        int col = nt * 8 + 2 * quad;
        if (row0 < t)
            *(unsigned*)(dst + (long)row0 * stride + col) =
                pack2(acc[nt][0] * mul0, acc[nt][1] * mul0);
        if (row0 + 8 < t)
            *(unsigned*)(dst + (long)(row0 + 8) * stride + col) =
                pack2(acc[nt][2] * mul1, acc[nt][3] * mul1);
    }
}

// Grid (ceil(t / 64), nh, b): out = softmax(scale q k^T, causal) v; lse per row.
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_forward(floatX* out, float* lse, const floatX* q, const floatX* k, const floatX* v,
                  int t, int nh, int group, int q_stride, int kv_stride, int out_stride,
                  float scale) {
    __shared__ __align__(16) floatX qs[FA_TILE * FA_LD];
    __shared__ __align__(16) floatX ks[2][FA_TILE * FA_LD];
    __shared__ __align__(16) floatX vs[2][FA_TILE * FA_LD];
    int qt = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    int h = blockIdx.y, bb = blockIdx.z, kvh = h / group;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, quad = threadIdx.x % 4;
    const floatX* kb = k + (long)bb * t * kv_stride + kvh * FA_D;
    const floatX* vb = v + (long)bb * t * kv_stride + kvh * FA_D;
    fa_load_async(qs, q + (long)bb * t * q_stride + h * FA_D, q_stride, qt * FA_TILE, t);
    fa_load_async(ks[0], kb, kv_stride, 0, t);
    fa_load_async(vs[0], vb, kv_stride, 0, t);
    cp_async_commit();
    unsigned qa[4][4];
    float o[8][4];
    for (int nt = 0; nt < 8; nt++)
        for (int e = 0; e < 4; e++) o[nt][e] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    float scale2 = scale * LOG2E;
    int row0 = qt * FA_TILE + warp * 16 + g;
    for (int kt = 0; kt <= qt; kt++) {
        // Tile kt + 1 loads while tile kt computes.
        if (kt < qt) {
            fa_load_async(ks[(kt + 1) & 1], kb, kv_stride, (kt + 1) * FA_TILE, t);
            fa_load_async(vs[(kt + 1) & 1], vb, kv_stride, (kt + 1) * FA_TILE, t);
            cp_async_commit();
        }
        cp_async_wait(kt < qt ? 1 : 0);
        __syncthreads();
        if (kt == 0)
            for (int kk = 0; kk < 4; kk++) fa_frag_a(qa[kk], qs, warp * 16, kk * 16);
        const floatX* kst = ks[kt & 1];
        const floatX* vst = vs[kt & 1];
        float s[8][4];
        fa_mul_t(s, qa, kst);
        float mx[2] = {NEG_INF, NEG_INF};
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                int col = kt * FA_TILE + nt * 8 + 2 * quad + (e & 1), row = row0 + (e >> 1) * 8;
                float x = col <= row && col < t ? s[nt][e] * scale2 : NEG_INF;
                s[nt][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        float corr[2];
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float next = fmaxf(m[i], mx[i]);
            corr[i] = m[i] == NEG_INF ? 0.0f : exp2_approx(m[i] - next);
            m[i] = next;
            l[i] *= corr[i];
        }
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                o[nt][e] *= corr[e >> 1];
                float p = s[nt][e] == NEG_INF ? 0.0f : exp2_approx(s[nt][e] - m[e >> 1]);
                s[nt][e] = p;
                l[e >> 1] += p;
            }
        fa_mul_add(o, s, vst);
        __syncthreads();  // every warp is done with tile kt before kt + 2 overwrites it
    }
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
    fa_store(out + (long)bb * t * out_stride + h * FA_D, out_stride, o, row0, t, 1.0f / l[0],
             1.0f / l[1]);
    if (quad == 0)
        for (int i = 0; i < 2; i++)
            if (row0 + 8 * i < t) lse[((long)bb * nh + h) * t + row0 + 8 * i] = m[i] + log2f(l[i]);
}

// One warp a row of one head (rows = b * t, heads nh): dsum = sum of dout * out over the
// head's 64 columns (the softmax backward's row term).
extern "C" __global__ void flash_backward_sum(float* dsum, const floatX* dout, const floatX* out,
                                              int rows, int nh, int t, int stride) {
    long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (w >= (long)rows * nh) return;
    int h = (int)(w % nh);
    long r = w / nh;
    const floatX* a = dout + r * stride + h * FA_D + 2 * lane;
    const floatX* o = out + r * stride + h * FA_D + 2 * lane;
    float s = warp_sum(tof(a[0]) * tof(o[0]) + tof(a[1]) * tof(o[1]));
    if (lane == 0) dsum[((r / t) * nh + h) * t + r % t] = s;
}

// Starts loading query tile `qt` of head `h` for flash_backward_kv: q and dout into
// shared tiles, lse and dsum into shared rows.
__device__ __forceinline__ void fa_issue_q_tile(floatX* qs, floatX* ds, float* ls, float* dd,
                                                const floatX* q, const floatX* dout,
                                                const float* lse, const float* dsum, int bb,
                                                int h, int qt, int t, int nh, int q_stride,
                                                int out_stride) {
    fa_load_async(qs, q + (long)bb * t * q_stride + h * FA_D, q_stride, qt * FA_TILE, t);
    fa_load_async(ds, dout + (long)bb * t * out_stride + h * FA_D, out_stride, qt * FA_TILE, t);
    long at = ((long)bb * nh + h) * t + qt * FA_TILE;
    fa_load_floats_async(ls, lse + at, FA_TILE, t - qt * FA_TILE);
    fa_load_floats_async(dd, dsum + at, FA_TILE, t - qt * FA_TILE);
    cp_async_commit();
}

// Grid (ceil(t / 64), nh / group, b): dk and dv of one key tile, summed over the group's
// query heads and the query tiles at or after the key tile, in order.
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_backward_kv(floatX* dk, floatX* dv, const floatX* q, const floatX* k, const floatX* v,
                      const floatX* dout, const float* lse, const float* dsum, int t, int nh,
                      int group, int q_stride, int kv_stride, int out_stride, float scale) {
    __shared__ __align__(16) floatX qs[2][FA_TILE * FA_LD];
    __shared__ __align__(16) floatX ds[2][FA_TILE * FA_LD];
    __shared__ __align__(16) float ls[2][FA_TILE];
    __shared__ __align__(16) float dd[2][FA_TILE];
    int kt = gridDim.x - 1 - blockIdx.x;  // the most query tiles first
    int kvh = blockIdx.y, bb = blockIdx.z;
    float scale2 = scale * LOG2E;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, quad = threadIdx.x % 4;
    long kv_base = (long)bb * t * kv_stride + kvh * FA_D;
    fa_load(qs[0], k + kv_base, kv_stride, kt * FA_TILE, t);
    fa_load(ds[0], v + kv_base, kv_stride, kt * FA_TILE, t);
    __syncthreads();
    unsigned ka[4][4], va[4][4];
    for (int kk = 0; kk < 4; kk++) {
        fa_frag_a(ka[kk], qs[0], warp * 16, kk * 16);
        fa_frag_a(va[kk], ds[0], warp * 16, kk * 16);
    }
    __syncthreads();  // the fragments are read before the first query tile lands there
    float dka[8][4], dva[8][4];
    for (int nt = 0; nt < 8; nt++)
        for (int e = 0; e < 4; e++) dka[nt][e] = dva[nt][e] = 0.0f;
    int key0 = kt * FA_TILE + warp * 16 + g;
    int tiles = (t + FA_TILE - 1) / FA_TILE;
    // The (query head, query tile) pairs in order; pair it + 1 loads while it computes.
    int per = tiles - kt, pairs = group * per;
    fa_issue_q_tile(qs[0], ds[0], ls[0], dd[0], q, dout, lse, dsum, bb, kvh * group, kt, t, nh,
                    q_stride, out_stride);
    for (int it = 0; it < pairs; it++) {
        int buf = it & 1;
        if (it + 1 < pairs)
            fa_issue_q_tile(qs[buf ^ 1], ds[buf ^ 1], ls[buf ^ 1], dd[buf ^ 1], q, dout, lse,
                            dsum, bb, kvh * group + (it + 1) / per, kt + (it + 1) % per, t, nh,
                            q_stride, out_stride);
        cp_async_wait(it + 1 < pairs ? 1 : 0);
        __syncthreads();
        int qt = kt + it % per;
        const floatX* qst = qs[buf];
        const floatX* dst = ds[buf];
        // p^T [keys, queries]
        float p[8][4], dp[8][4];
        fa_mul_t(p, ka, qst);
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                int c = nt * 8 + 2 * quad + (e & 1), col = qt * FA_TILE + c;
                int key = key0 + (e >> 1) * 8;
                p[nt][e] = col >= key && col < t && key < t
                               ? exp2_approx(p[nt][e] * scale2 - ls[buf][c])
                               : 0.0f;
            }
        fa_mul_add(dva, p, dst);  // dv += p^T dout
        fa_mul_t(dp, va, dst);    // dp^T = v dout^T
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++)
                p[nt][e] = p[nt][e] * (dp[nt][e] - dd[buf][nt * 8 + 2 * quad + (e & 1)]) * scale;
        fa_mul_add(dka, p, qst);  // dk += ds^T q
        __syncthreads();  // every warp is done with this pair before pair it + 2 lands
    }
    fa_store(dk + kv_base, kv_stride, dka, key0, t, 1.0f, 1.0f);
    fa_store(dv + kv_base, kv_stride, dva, key0, t, 1.0f, 1.0f);
}

// Grid (ceil(t / 64), nh, b): dq of one query tile, summed over the key tiles at or
// before it, in order.
extern "C" __global__ void __launch_bounds__(FA_THREADS)
    flash_backward_q(floatX* dq, const floatX* q, const floatX* k, const floatX* v,
                     const floatX* dout, const float* lse, const float* dsum, int t, int nh,
                     int group, int q_stride, int kv_stride, int out_stride, float scale) {
    __shared__ __align__(16) floatX ks[2][FA_TILE * FA_LD];
    __shared__ __align__(16) floatX vs[2][FA_TILE * FA_LD];
    int qt = gridDim.x - 1 - blockIdx.x;
    int h = blockIdx.y, bb = blockIdx.z, kvh = h / group;
    int warp = threadIdx.x / 32, g = (threadIdx.x % 32) / 4, quad = threadIdx.x % 4;
    float scale2 = scale * LOG2E;
    long q_base = (long)bb * t * q_stride + h * FA_D;
    long kv_base = (long)bb * t * kv_stride + kvh * FA_D;
    fa_load(ks[0], q + q_base, q_stride, qt * FA_TILE, t);
    fa_load(vs[0], dout + (long)bb * t * out_stride + h * FA_D, out_stride, qt * FA_TILE, t);
    __syncthreads();
    unsigned qa[4][4], oa[4][4];
    for (int kk = 0; kk < 4; kk++) {
        fa_frag_a(qa[kk], ks[0], warp * 16, kk * 16);
        fa_frag_a(oa[kk], vs[0], warp * 16, kk * 16);
    }
    __syncthreads();  // the fragments are read before the first key tile lands there
    int row0 = qt * FA_TILE + warp * 16 + g;
    float lr[2], dr[2];
    for (int i = 0; i < 2; i++) {
        int r = row0 + 8 * i;
        long at = ((long)bb * nh + h) * t + r;
        lr[i] = r < t ? lse[at] : 0.0f;
        dr[i] = r < t ? dsum[at] : 0.0f;
    }
    float dqa[8][4];
    for (int nt = 0; nt < 8; nt++)
        for (int e = 0; e < 4; e++) dqa[nt][e] = 0.0f;
    fa_load_async(ks[0], k + kv_base, kv_stride, 0, t);
    fa_load_async(vs[0], v + kv_base, kv_stride, 0, t);
    cp_async_commit();
    for (int kt = 0; kt <= qt; kt++) {
        int buf = kt & 1;
        if (kt < qt) {
            fa_load_async(ks[buf ^ 1], k + kv_base, kv_stride, (kt + 1) * FA_TILE, t);
            fa_load_async(vs[buf ^ 1], v + kv_base, kv_stride, (kt + 1) * FA_TILE, t);
            cp_async_commit();
        }
        cp_async_wait(kt < qt ? 1 : 0);
        __syncthreads();
        float p[8][4], dp[8][4];
        fa_mul_t(p, qa, ks[buf]);  // q k^T
        fa_mul_t(dp, oa, vs[buf]); // dout v^T
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                int col = kt * FA_TILE + nt * 8 + 2 * quad + (e & 1), row = row0 + (e >> 1) * 8;
                float pr = col <= row && col < t && row < t
                               ? exp2_approx(p[nt][e] * scale2 - lr[e >> 1])
                               : 0.0f;
                p[nt][e] = pr * (dp[nt][e] - dr[e >> 1]) * scale;
            }
        fa_mul_add(dqa, p, ks[buf]);  // dq += ds k
        __syncthreads();  // every warp is done with tile kt before kt + 2 lands
    }
    fa_store(dq + q_base, q_stride, dqa, row0, t, 1.0f, 1.0f);
}
#endif
