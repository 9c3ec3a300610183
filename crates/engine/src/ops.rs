//! Fused element-wise and row-wise kernels of the GPT forward and backward passes.
//!
//! Determinism: every kernel splits its work into pieces fixed by the shapes (rows,
//! column blocks, batch items), never by the number of threads, and each output is
//! written by exactly one piece in a fixed order. So results are bit-identical for any
//! thread count. The loops are written to auto-vectorize (explicit 8-lane accumulators
//! where a reduction is involved, since float addition is not reassociated for us).

use rayon::prelude::*;

use crate::matmul::{Par, View, ViewMut, matmul};

/// LayerNorm epsilon of GPT-2.
pub(crate) const LN_EPS: f32 = 1e-5;
/// Rows handled by one parallel task in row-wise kernels.
const ROWS_PER_TASK: usize = 16;
/// Columns handled by one parallel task in column reductions (bias and gain gradients).
const COLS_PER_TASK: usize = 64;
/// Elements per task in flat element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 15;
const LANES: usize = 8;

/// exp(x) for f32 with about 2 ulp of error, branch-free so loops over it vectorize.
///
/// Rounding x / ln2 to an integer k uses the 1.5 * 2^23 trick: after adding it, the float's
/// low mantissa bits hold k, so 2^k is built with integer operations only (no float to
/// int conversion, which Rust's saturating `as` makes costly inside vector loops).
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23
    let tiny = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    // Cephes' minimax polynomial for e^r on [-ln2/2, ln2/2].
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(k_bits.wrapping_add(127) << 23);
    // Below e^-87 the result would be subnormal: flush it to zero (see `crate::ftz`).
    if tiny { 0.0 } else { e * scale }
}

/// tanh(x) through `exp_fast`; saturates cleanly to +-1.
#[inline(always)]
pub(crate) fn tanh_fast(x: f32) -> f32 {
    1.0 - 2.0 / (exp_fast(2.0 * x) + 1.0)
}

/// Sum with a fixed 8-lane order.
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for r in rest {
        s += r;
    }
    s
}

/// Dot product with a fixed 8-lane order.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0.0;
    for a in acc {
        s += a;
    }
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Output rows of one task in [`matvec`]: fixed, so the split (and every result bit)
/// is the same for any thread count.
const MATVEC_ROWS_PER_TASK: usize = 128;

/// `y = w @ x` (or `y += w @ x` when `accumulate`) for one input row `x` and a weight
/// `w` stored `[y.len(), x.len()]`: decoding's products, which gemm would run on one
/// thread (one row has nothing to split), so the weight's rows are split over the pool's
/// tasks instead. Decoding reads every weight once per token, so its speed is memory
/// bandwidth, and that needs every core reading.
pub(crate) fn matvec(y: &mut [f32], w: &[f32], x: &[f32], accumulate: bool) {
    let inp = x.len();
    assert_eq!(w.len(), y.len() * inp, "matvec: w is not [out, in]");
    y.par_chunks_mut(MATVEC_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, out)| {
            let rows = out.len();
            let start = i * MATVEC_ROWS_PER_TASK * inp;
            matmul(
                ViewMut::rows(out, rows, 1),
                View::rows(&w[start..start + rows * inp], rows, inp),
                View::rows(x, inp, 1),
                accumulate,
                Par::Single,
            );
        });
}

/// One query head's causal attention over a KV cache: `y = softmax(scale q K^T) V` over
/// the first `scores.len()` cached positions, where position `t`'s key is
/// `k[t * stride + col..][..q.len()]` (and its value likewise in `v`). One token's
/// decode step and a prompt's prefill both attend through this, so a row's attention is
/// the same arithmetic either way.
pub(crate) fn attend_cached(
    y: &mut [f32],
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    (stride, col): (usize, usize),
    scale: f32,
    scores: &mut [f32],
) {
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (t, sc) in scores.iter_mut().enumerate() {
        *sc = dot(q, &k[t * stride + col..t * stride + col + hd]) * scale;
        max = max.max(*sc);
    }
    for sc in scores.iter_mut() {
        *sc = exp_fast(*sc - max);
    }
    let inv = 1.0 / sum(scores);
    y.fill(0.0);
    for (t, sc) in scores.iter().enumerate() {
        let vrow = &v[t * stride + col..t * stride + col + hd];
        let weight = sc * inv;
        for (yy, vv) in y.iter_mut().zip(vrow) {
            *yy += weight * vv;
        }
    }
}

/// Sum of squares in f64, split into fixed blocks, for gradient norms.
pub(crate) fn sum_squares(x: &[f32]) -> f64 {
    let partials: Vec<f64> = x
        .par_chunks(ELEMS_PER_TASK)
        .map(|c| {
            let mut acc = [0.0f64; LANES];
            let chunks = c.chunks_exact(LANES);
            let rest = chunks.remainder();
            for ch in chunks {
                for l in 0..LANES {
                    acc[l] += (ch[l] as f64) * (ch[l] as f64);
                }
            }
            acc.iter().sum::<f64>() + rest.iter().map(|&r| (r as f64) * (r as f64)).sum::<f64>()
        })
        .collect();
    partials.iter().sum()
}

/// AdamW's state beside a training backend's parameters: the two moments and the
/// number of updates taken. Empty for an evaluation backend.
pub(crate) struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    step: u32,
}

impl Moments {
    /// Zero moments for `n` parameters.
    pub(crate) fn new(n: usize) -> Moments {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
            step: 0,
        }
    }

    /// Back to no update taken (a unit starts a fresh optimizer).
    pub(crate) fn reset(&mut self) {
        self.m.fill(0.0);
        self.v.fill(0.0);
        self.step = 0;
    }

    /// One AdamW update of `params` by `grads` ([`adamw`]). Returns the pre-clip norm.
    pub(crate) fn update(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        tensors: &[crate::TensorSpec],
        opt: &crate::OptimizerConfig,
        lr: f32,
    ) -> f32 {
        self.step += 1;
        adamw(
            AdamState {
                params,
                grads,
                m: &mut self.m,
                v: &mut self.v,
                step: self.step,
            },
            tensors,
            opt,
            lr,
        )
    }
}

/// What one AdamW update reads and writes: the parameters, their gradient, the two
/// moments (all the same length) and the number of this step (from 1).
pub(crate) struct AdamState<'a> {
    pub(crate) params: &'a mut [f32],
    pub(crate) grads: &'a [f32],
    pub(crate) m: &'a mut [f32],
    pub(crate) v: &'a mut [f32],
    pub(crate) step: u32,
}

/// Clips the gradient to `opt.grad_clip` (global L2 norm) and applies one AdamW update,
/// decaying the tensors whose kind decays. Returns the pre-clip norm. Shared by every
/// architecture, so one optimizer serves all of them.
pub(crate) fn adamw(
    state: AdamState<'_>,
    tensors: &[crate::TensorSpec],
    opt: &crate::OptimizerConfig,
    lr: f32,
) -> f32 {
    let AdamState {
        params,
        grads,
        m: adam_m,
        v: adam_v,
        step,
    } = state;
    let norm = sum_squares(grads).sqrt() as f32;
    let clip = if opt.grad_clip > 0.0 && norm > opt.grad_clip {
        opt.grad_clip / (norm + 1e-6)
    } else {
        1.0
    };
    let step = step as i32;
    let bc1 = 1.0 - opt.beta1.powi(step);
    let bc2_sqrt = (1.0 - opt.beta2.powi(step)).sqrt();
    let step_size = lr / bc1;
    let (b1, b2, eps) = (opt.beta1, opt.beta2, opt.eps);
    for spec in tensors {
        let decay = if spec.kind.decays() {
            1.0 - lr * opt.weight_decay
        } else {
            1.0
        };
        let r = spec.range();
        params[r.clone()]
            .par_chunks_mut(1 << 14)
            .zip(grads[r.clone()].par_chunks(1 << 14))
            .zip(adam_m[r.clone()].par_chunks_mut(1 << 14))
            .zip(adam_v[r].par_chunks_mut(1 << 14))
            .for_each(|(((p, g), m), v)| {
                for i in 0..p.len() {
                    let g = g[i] * clip;
                    m[i] = b1 * m[i] + (1.0 - b1) * g;
                    v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                    let denom = v[i].sqrt() / bc2_sqrt + eps;
                    p[i] = p[i] * decay - step_size * m[i] / denom;
                }
            });
    }
    norm
}

/// `out[n, :] = LN(inp[n, :]) * w + b`, saving each row's mean and reciprocal std.
pub(crate) fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
) {
    let c = w.len();
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(mean.par_chunks_mut(ROWS_PER_TASK))
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(inp.par_chunks(c * ROWS_PER_TASK))
        .for_each(|(((out, mean), rstd), inp)| {
            for (r, (o, x)) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)).enumerate() {
                let m = sum(x) / c as f32;
                let mut acc = [0.0f32; LANES];
                let chunks = x.chunks_exact(LANES);
                let rest = chunks.remainder();
                for ch in chunks {
                    for l in 0..LANES {
                        let d = ch[l] - m;
                        acc[l] += d * d;
                    }
                }
                let mut var = acc.iter().sum::<f32>();
                for &v in rest {
                    var += (v - m) * (v - m);
                }
                let s = 1.0 / (var / c as f32 + LN_EPS).sqrt();
                for j in 0..c {
                    o[j] = (x[j] - m) * s * w[j] + b[j];
                }
                mean[r] = m;
                rstd[r] = s;
            }
        });
}

/// LayerNorm backward: `dinp += ...`, `dw += ...`, `db += ...`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    dinp.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(dout.par_chunks(c * ROWS_PER_TASK))
        .zip(inp.par_chunks(c * ROWS_PER_TASK))
        .zip(
            mean.par_chunks(ROWS_PER_TASK)
                .zip(rstd.par_chunks(ROWS_PER_TASK)),
        )
        .for_each(|(((dinp, dout), inp), (mean, rstd))| {
            let mut dnorm = vec![0.0f32; c];
            let mut xhat = vec![0.0f32; c];
            for r in 0..mean.len() {
                let (m, s) = (mean[r], rstd[r]);
                let row = r * c..(r + 1) * c;
                let (di, go, x) = (&mut dinp[row.clone()], &dout[row.clone()], &inp[row]);
                for j in 0..c {
                    xhat[j] = (x[j] - m) * s;
                    dnorm[j] = go[j] * w[j];
                }
                let dnorm_mean = sum(&dnorm) / c as f32;
                let dnorm_xhat_mean = dot(&dnorm, &xhat) / c as f32;
                for j in 0..c {
                    di[j] += s * (dnorm[j] - dnorm_mean - xhat[j] * dnorm_xhat_mean);
                }
            }
        });
    let n = mean.len();
    dw.par_chunks_mut(COLS_PER_TASK)
        .zip(db.par_chunks_mut(COLS_PER_TASK))
        .enumerate()
        .for_each(|(block, (dw, db))| {
            let c0 = block * COLS_PER_TASK;
            let width = dw.len();
            for r in 0..n {
                let (m, s) = (mean[r], rstd[r]);
                let go = &dout[r * c + c0..r * c + c0 + width];
                let x = &inp[r * c + c0..r * c + c0 + width];
                for j in 0..width {
                    dw[j] += go[j] * ((x[j] - m) * s);
                    db[j] += go[j];
                }
            }
        });
}

/// `db[j] += sum_n dout[n, j]`.
pub(crate) fn bias_backward(db: &mut [f32], dout: &[f32]) {
    let c = db.len();
    let n = dout.len() / c;
    db.par_chunks_mut(COLS_PER_TASK)
        .enumerate()
        .for_each(|(block, db)| {
            let c0 = block * COLS_PER_TASK;
            let width = db.len();
            for r in 0..n {
                let go = &dout[r * c + c0..r * c + c0 + width];
                for j in 0..width {
                    db[j] += go[j];
                }
            }
        });
}

/// `out[n, :] = bias`, the starting value of a product that then accumulates into it.
pub(crate) fn fill_rows(out: &mut [f32], bias: &[f32]) {
    let c = bias.len();
    out.par_chunks_mut(c * ROWS_PER_TASK).for_each(|out| {
        for row in out.chunks_exact_mut(c) {
            row.copy_from_slice(bias);
        }
    });
}

/// `out[n, :] = residual[n, :] + bias`.
pub(crate) fn fill_rows_residual(out: &mut [f32], residual: &[f32], bias: &[f32]) {
    let c = bias.len();
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(residual.par_chunks(c * ROWS_PER_TASK))
        .for_each(|(out, res)| {
            for (o, r) in out.chunks_exact_mut(c).zip(res.chunks_exact(c)) {
                for j in 0..c {
                    o[j] = r[j] + bias[j];
                }
            }
        });
}

const GELU_SCALE: f32 = 0.797_884_6; // sqrt(2 / pi)
const GELU_CUBIC: f32 = 0.044_715;

/// tanh-approximated GELU (GPT-2's `gelu_new`).
pub(crate) fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK))
        .for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                let u = GELU_SCALE * (x + GELU_CUBIC * x * x * x);
                *o = 0.5 * x * (1.0 + tanh_fast(u));
            }
        });
}

/// `dinp = gelu'(inp) * dout` (overwrites).
pub(crate) fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(ELEMS_PER_TASK)
        .zip(inp.par_chunks(ELEMS_PER_TASK))
        .zip(dout.par_chunks(ELEMS_PER_TASK))
        .for_each(|((d, x), g)| {
            for ((d, &x), &g) in d.iter_mut().zip(x).zip(g) {
                let x2 = x * x;
                let u = GELU_SCALE * (x + GELU_CUBIC * x2 * x);
                let t = tanh_fast(u);
                let du = GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x2);
                *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
            }
        });
}

/// Shape of an attention call: sequence, width, heads (the batch is the buffers' length).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnShape {
    pub(crate) t: usize,
    pub(crate) c: usize,
    pub(crate) nh: usize,
}

/// Causal self-attention. `qkv` is `[b, t, 3c]` (q, k, v, each split into heads);
/// writes the softmax probabilities to `att` (`[b, nh, t, t]`, zero above the diagonal)
/// and the head outputs to `out` (`[b, t, c]`).
pub(crate) fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], s: AttnShape) {
    let AttnShape { t, c, nh, .. } = s;
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    out.par_chunks_mut(t * c)
        .zip(att.par_chunks_mut(nh * t * t))
        .zip(qkv.par_chunks(t * 3 * c))
        .for_each(|((out, att), qkv)| {
            for h in 0..nh {
                let q = View::strided(&qkv[h * hs..], t, hs, 3 * c, 1);
                let k = View::strided(&qkv[c + h * hs..], t, hs, 3 * c, 1);
                let v = View::strided(&qkv[2 * c + h * hs..], t, hs, 3 * c, 1);
                let p = &mut att[h * t * t..(h + 1) * t * t];
                matmul(ViewMut::rows(p, t, t), q, k.t(), false, Par::Single);
                for i in 0..t {
                    let row = &mut p[i * t..(i + 1) * t];
                    let (live, masked) = row.split_at_mut(i + 1);
                    let mut max = f32::NEG_INFINITY;
                    for x in live.iter_mut() {
                        *x *= scale;
                        max = max.max(*x);
                    }
                    for x in live.iter_mut() {
                        *x = exp_fast(*x - max);
                    }
                    let inv = 1.0 / sum(live);
                    for x in live.iter_mut() {
                        *x *= inv;
                    }
                    masked.fill(0.0);
                }
                let p = View::rows(p, t, t);
                matmul(
                    ViewMut::strided(&mut out[h * hs..], t, hs, c, 1),
                    p,
                    v,
                    false,
                    Par::Single,
                );
            }
        });
}

/// Backward of [`attention_forward`]: writes (overwrites) `dqkv` from `dout`.
pub(crate) fn attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    att: &[f32],
    qkv: &[f32],
    s: AttnShape,
) {
    let AttnShape { t, c, nh, .. } = s;
    let hs = c / nh;
    let scale = 1.0 / (hs as f32).sqrt();
    dqkv.par_chunks_mut(t * 3 * c)
        .zip(dout.par_chunks(t * c))
        .zip(att.par_chunks(nh * t * t))
        .zip(qkv.par_chunks(t * 3 * c))
        .for_each(|(((dqkv, dout), att), qkv)| {
            let mut ds = vec![0.0f32; t * t];
            for h in 0..nh {
                let q = View::strided(&qkv[h * hs..], t, hs, 3 * c, 1);
                let k = View::strided(&qkv[c + h * hs..], t, hs, 3 * c, 1);
                let v = View::strided(&qkv[2 * c + h * hs..], t, hs, 3 * c, 1);
                let dy = View::strided(&dout[h * hs..], t, hs, c, 1);
                let p_data = &att[h * t * t..(h + 1) * t * t];
                let p = View::rows(p_data, t, t);
                // dP = dY V^T, then dS = P * (dP - rowsum(P * dP)) * scale.
                matmul(ViewMut::rows(&mut ds, t, t), dy, v.t(), false, Par::Single);
                for i in 0..t {
                    let pr = &p_data[i * t..i * t + i + 1];
                    let dr = &mut ds[i * t..(i + 1) * t];
                    let inner = dot(pr, &dr[..i + 1]);
                    for j in 0..=i {
                        dr[j] = pr[j] * (dr[j] - inner) * scale;
                    }
                    dr[i + 1..].fill(0.0);
                }
                let dsv = View::rows(&ds, t, t);
                matmul(
                    ViewMut::strided(&mut dqkv[2 * c + h * hs..], t, hs, 3 * c, 1),
                    p.t(),
                    dy,
                    false,
                    Par::Single,
                );
                matmul(
                    ViewMut::strided(&mut dqkv[h * hs..], t, hs, 3 * c, 1),
                    dsv,
                    k,
                    false,
                    Par::Single,
                );
                matmul(
                    ViewMut::strided(&mut dqkv[c + h * hs..], t, hs, 3 * c, 1),
                    dsv.t(),
                    q,
                    false,
                    Par::Single,
                );
            }
        });
}

/// How many of `targets` count in the loss (are not [`crate::IGNORE_TARGET`]).
pub(crate) fn counted(targets: &[u32]) -> usize {
    targets
        .iter()
        .filter(|&&t| t != crate::IGNORE_TARGET)
        .count()
}

/// The mean of the row losses over `counted` rows (the ignored rows' losses are 0); 0
/// when no row counts.
pub(crate) fn mean_loss(losses: &[f32], counted: usize) -> f32 {
    if counted == 0 {
        return 0.0;
    }
    let total: f64 = losses.iter().map(|&x| x as f64).sum();
    (total / counted as f64) as f32
}

/// Fused softmax and cross-entropy over rows of `logits` (`[n, v]`).
///
/// Writes each row's loss to `losses`; when `grad_scale` is given, replaces the logits
/// with the gradient of `grad_scale * sum(losses)`, otherwise with the probabilities. A
/// row whose target is [`crate::IGNORE_TARGET`] has loss 0 and a zero gradient.
pub(crate) fn softmax_cross_entropy(
    logits: &mut [f32],
    losses: &mut [f32],
    targets: &[u32],
    v: usize,
    grad_scale: Option<f32>,
) {
    logits
        .par_chunks_mut(v * ROWS_PER_TASK)
        .zip(losses.par_chunks_mut(ROWS_PER_TASK))
        .zip(targets.par_chunks(ROWS_PER_TASK))
        .for_each(|((logits, losses), targets)| {
            for ((row, loss), &target) in logits.chunks_exact_mut(v).zip(losses).zip(targets) {
                if target == crate::IGNORE_TARGET {
                    *loss = 0.0;
                    if grad_scale.is_some() {
                        row.fill(0.0);
                    }
                    continue;
                }
                let target = target as usize;
                let mut max8 = [f32::NEG_INFINITY; LANES];
                let chunks = row.chunks_exact(LANES);
                let rest = chunks.remainder();
                for ch in chunks {
                    for l in 0..LANES {
                        max8[l] = max8[l].max(ch[l]);
                    }
                }
                let mut max = max8.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for &r in rest {
                    max = max.max(r);
                }
                let picked = row[target];
                for x in row.iter_mut() {
                    *x = exp_fast(*x - max);
                }
                let total = sum(row);
                *loss = total.ln() + max - picked;
                let scale = grad_scale.unwrap_or(1.0) / total;
                for x in row.iter_mut() {
                    *x *= scale;
                }
                if let Some(g) = grad_scale {
                    row[target] -= g;
                }
            }
        });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn exp_and_tanh_are_accurate() {
        let mut worst_exp = 0.0f64;
        let mut worst_tanh = 0.0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-3;
            let e = exp_fast(x) as f64;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max((e - want).abs() / want);
            let t = tanh_fast(x / 8.0) as f64;
            worst_tanh = worst_tanh.max((t - (x as f64 / 8.0).tanh()).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh}");
        assert!(exp_fast(-1000.0) < 1e-37);
        assert!(exp_fast(1000.0).is_finite());
    }

    /// Pseudo-random values in [-scale, scale), fixed by `salt`.
    fn values(n: usize, salt: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = ((i + 1) * 2_654_435_761 + salt * 40_503) % 1_000_003;
                (h as f32 / 1_000_003.0 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// Checks `grad` (the analytic gradient of `loss` at `x`) against central finite
    /// differences on a spread of coordinates.
    #[track_caller]
    fn check_grad(name: &str, x: &[f32], grad: &[f32], loss: &mut dyn FnMut(&[f32]) -> f64) {
        check_grad_at(40, name, x, grad, loss);
    }

    /// [`check_grad`] on at most `coords` coordinates (the Llama kernels' tests use it
    /// too). The step and tolerance suit f32 kernels of values of order one: the f32
    /// rounding of a difference quotient at h = 1e-2 is about 1e-4, the truncation error
    /// of the central difference about h^2.
    #[track_caller]
    pub(crate) fn check_grad_at(
        coords: usize,
        name: &str,
        x: &[f32],
        grad: &[f32],
        loss: &mut dyn FnMut(&[f32]) -> f64,
    ) {
        assert_eq!(x.len(), grad.len());
        let h = 1e-2f32;
        let mut failures = Vec::new();
        for k in 0..x.len().min(coords) {
            let i = (k * 7919 + 3) % x.len();
            let mut shifted = x.to_vec();
            shifted[i] = x[i] + h;
            let up = loss(&shifted);
            shifted[i] = x[i] - h;
            let down = loss(&shifted);
            let numeric = (up - down) / (2.0 * h as f64);
            let analytic = grad[i] as f64;
            if (numeric - analytic).abs() > 2e-3 + 1e-2 * numeric.abs() {
                failures.push(format!(
                    "{name}[{i}]: analytic {analytic:.6} numeric {numeric:.6}"
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// sum(out * weights) in f64: a scalar whose gradient with respect to `out` is `weights`.
    fn weighted(out: &[f32], weights: &[f32]) -> f64 {
        out.iter()
            .zip(weights)
            .map(|(&o, &w)| o as f64 * w as f64)
            .sum()
    }

    #[test]
    fn layernorm_backward_matches_finite_differences() {
        let (n, c) = (5, 24);
        let inp = values(n * c, 1, 2.0);
        let w: Vec<f32> = values(c, 2, 0.5).iter().map(|x| 1.0 + x).collect();
        let b = values(c, 3, 0.5);
        let weights = values(n * c, 4, 1.0);
        let forward = |inp: &[f32], w: &[f32], b: &[f32]| {
            let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
            layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b);
            (weighted(&out, &weights), mean, rstd)
        };
        let (_, mean, rstd) = forward(&inp, &w, &b);
        let (mut dinp, mut dw, mut db) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        layernorm_backward(
            &mut dinp, &mut dw, &mut db, &weights, &inp, &w, &mean, &rstd,
        );
        check_grad("inp", &inp, &dinp, &mut |x| forward(x, &w, &b).0);
        check_grad("w", &w, &dw, &mut |x| forward(&inp, x, &b).0);
        check_grad("b", &b, &db, &mut |x| forward(&inp, &w, x).0);
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let inp = values(200, 5, 5.0);
        let weights = values(200, 6, 1.0);
        let loss = |x: &[f32]| {
            let mut out = vec![0.0; x.len()];
            gelu_forward(&mut out, x);
            weighted(&out, &weights)
        };
        let mut dinp = vec![0.0; 200];
        gelu_backward(&mut dinp, &inp, &weights);
        check_grad("gelu", &inp, &dinp, &mut |x| loss(x));
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let shape = AttnShape { t: 6, c: 8, nh: 2 };
        let b = 2;
        let qkv = values(b * 6 * 24, 7, 1.5);
        let weights = values(b * 6 * 8, 8, 1.0);
        let forward = |qkv: &[f32]| {
            let (mut out, mut att) = (vec![0.0; b * 6 * 8], vec![0.0; b * 2 * 6 * 6]);
            attention_forward(&mut out, &mut att, qkv, shape);
            (weighted(&out, &weights), att)
        };
        let (_, att) = forward(&qkv);
        // Causal: nothing above the diagonal, rows sum to one.
        for row in att.chunks(6).enumerate() {
            let i = row.0 % 6;
            assert!(row.1[i + 1..].iter().all(|&p| p == 0.0));
            assert!((sum(row.1) - 1.0).abs() < 1e-6);
        }
        let mut dqkv = vec![0.0; qkv.len()];
        attention_backward(&mut dqkv, &weights, &att, &qkv, shape);
        check_grad("qkv", &qkv, &dqkv, &mut |x| forward(x).0);
    }

    #[test]
    fn softmax_cross_entropy_backward_matches_finite_differences() {
        let (n, v) = (4, 13);
        let logits = values(n * v, 9, 3.0);
        let targets = [0u32, 12, 5, 5];
        let loss = |x: &[f32]| {
            let (mut work, mut losses) = (x.to_vec(), vec![0.0; n]);
            softmax_cross_entropy(&mut work, &mut losses, &targets, v, None);
            losses.iter().map(|&l| l as f64).sum::<f64>() / n as f64
        };
        let (mut grad, mut losses) = (logits.clone(), vec![0.0; n]);
        softmax_cross_entropy(&mut grad, &mut losses, &targets, v, Some(1.0 / n as f32));
        check_grad("logits", &logits, &grad, &mut |x| loss(x));
        // The loss itself against a direct log-sum-exp in f64.
        for (r, &t) in targets.iter().enumerate() {
            let row = &logits[r * v..(r + 1) * v];
            let lse = row.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            assert!((losses[r] as f64 - (lse - row[t as usize] as f64)).abs() < 1e-5);
        }
    }

    #[test]
    fn bias_backward_sums_rows() {
        let dout = values(7 * 70, 10, 1.0);
        let mut db = vec![1.0; 70];
        bias_backward(&mut db, &dout);
        for j in 0..70 {
            let want: f32 = 1.0 + (0..7).map(|r| dout[r * 70 + j]).sum::<f32>();
            assert!((db[j] - want).abs() < 1e-5);
        }
    }
}
