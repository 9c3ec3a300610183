//! Llama's own kernels: RMSNorm, rotary embeddings, grouped-query causal attention and
//! SwiGLU, forward and backward.
//!
//! Determinism as in [`crate::ops`]: work is split into pieces fixed by the shapes (row
//! blocks, (batch, head) pairs, column blocks), never by the thread count, and each
//! output element is written by one piece in a fixed order, so results are bit-identical
//! for any number of threads.

use rayon::prelude::*;

use crate::matmul::{Par, View, ViewMut, matmul};
use crate::ops::{dot, exp_fast, sum};

/// Rows handled by one parallel task in row-wise kernels.
const ROWS_PER_TASK: usize = 16;
/// Columns handled by one parallel task in column reductions (norm gain gradients).
const COLS_PER_TASK: usize = 64;
/// Elements per task in flat element-wise kernels.
const ELEMS_PER_TASK: usize = 1 << 15;

/// `out[n, :] = inp[n, :] / rms(inp[n, :]) * w`, saving each row's reciprocal RMS.
/// As HF's `LlamaRMSNorm`: the input is normalized first, then scaled by the gain.
pub(crate) fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], inp: &[f32], w: &[f32], eps: f32) {
    let c = w.len();
    out.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(inp.par_chunks(c * ROWS_PER_TASK))
        .for_each(|((out, rstd), inp)| {
            for (r, (o, x)) in out.chunks_exact_mut(c).zip(inp.chunks_exact(c)).enumerate() {
                rstd[r] = rmsnorm_row(o, x, w, eps);
            }
        });
}

/// RMSNorm of one row; returns the reciprocal RMS.
#[inline]
pub(crate) fn rmsnorm_row(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let s = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    for j in 0..x.len() {
        out[j] = x[j] * s * w[j];
    }
    s
}

/// RMSNorm backward: `dinp += ...`, `dw += ...`.
pub(crate) fn rmsnorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    rstd: &[f32],
) {
    let c = w.len();
    dinp.par_chunks_mut(c * ROWS_PER_TASK)
        .zip(dout.par_chunks(c * ROWS_PER_TASK))
        .zip(inp.par_chunks(c * ROWS_PER_TASK))
        .zip(rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dinp, dout), inp), rstd)| {
            let mut g = vec![0.0f32; c];
            for (r, &s) in rstd.iter().enumerate() {
                let row = r * c..(r + 1) * c;
                let (di, go, x) = (&mut dinp[row.clone()], &dout[row.clone()], &inp[row]);
                for j in 0..c {
                    g[j] = go[j] * w[j];
                }
                // d/dx_j of x_j * s with s = (mean(x^2) + eps)^-1/2.
                let k = s * s * s * dot(&g, x) / c as f32;
                for j in 0..c {
                    di[j] += s * g[j] - k * x[j];
                }
            }
        });
    let n = rstd.len();
    dw.par_chunks_mut(COLS_PER_TASK)
        .enumerate()
        .for_each(|(block, dw)| {
            let c0 = block * COLS_PER_TASK;
            let width = dw.len();
            for (r, &s) in rstd.iter().enumerate().take(n) {
                let go = &dout[r * c + c0..r * c + c0 + width];
                let x = &inp[r * c + c0..r * c + c0 + width];
                for j in 0..width {
                    dw[j] += go[j] * (x[j] * s);
                }
            }
        });
}

/// Cosines and sines of the rotary angles `pos * theta^(-2i / head_dim)`, for every
/// position below `max_seq` and `i < head_dim / 2`, computed in f64 and rounded once.
pub(crate) struct RopeTables {
    pub(crate) half: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
}

impl RopeTables {
    pub(crate) fn new(head_dim: usize, max_seq: usize, theta: f64) -> RopeTables {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq * half);
        let mut sin = Vec::with_capacity(max_seq * half);
        for pos in 0..max_seq {
            for i in 0..half {
                let inv_freq = theta.powf(-((2 * i) as f64) / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTables { half, cos, sin }
    }

    /// Rotates every head of `row` (a whole number of heads) to position `pos`, in HF's
    /// `rotate_half` layout: element `i` pairs with element `i + head_dim / 2`. With
    /// `inverse`, rotates back (the transpose, which is what the backward pass applies).
    #[inline]
    pub(crate) fn rotate(&self, row: &mut [f32], pos: usize, inverse: bool) {
        let half = self.half;
        let cos = &self.cos[pos * half..(pos + 1) * half];
        let sin = &self.sin[pos * half..(pos + 1) * half];
        let sign = if inverse { -1.0 } else { 1.0 };
        for head in row.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x, y) = (a[i], b[i]);
                let s = sign * sin[i];
                a[i] = x * cos[i] - y * s;
                b[i] = y * cos[i] + x * s;
            }
        }
    }

    /// Rotates the first `width` elements of each row of `rows` (`[b * t, stride]`),
    /// row `r` to position `r % t`.
    pub(crate) fn rotate_rows(
        &self,
        rows: &mut [f32],
        stride: usize,
        width: usize,
        t: usize,
        inverse: bool,
    ) {
        rows.par_chunks_mut(stride * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(block, chunk)| {
                for (r, row) in chunk.chunks_exact_mut(stride).enumerate() {
                    let pos = (block * ROWS_PER_TASK + r) % t;
                    self.rotate(&mut row[..width], pos, inverse);
                }
            });
    }
}

/// Shape of a grouped-query attention call (the batch is the buffers' length).
#[derive(Clone, Copy, Debug)]
pub(crate) struct GqaShape {
    pub(crate) t: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

impl GqaShape {
    /// Width of one token's q, k and v.
    fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// Column of query head `h`, key head `g` and value head `g` in a qkv row.
    fn q_col(&self, h: usize) -> usize {
        h * self.head_dim
    }
    fn k_col(&self, g: usize) -> usize {
        (self.heads + g) * self.head_dim
    }
    fn v_col(&self, g: usize) -> usize {
        (self.heads + self.kv_heads + g) * self.head_dim
    }
}

/// Causal softmax of a `t x t` score matrix in place, scaled by `scale`; zeroes above
/// the diagonal.
fn causal_softmax(p: &mut [f32], t: usize, scale: f32) {
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
}

/// Query rows per block of the causal attention products. A block of rows attends to
/// the keys up to its last row only, so the products skip the blocks above the diagonal
/// (whose probabilities are zero): at 256 positions, 37% of the attention's products.
/// Leaving out a term that is exactly zero does not change a sum.
const CAUSAL_ROWS: usize = 64;

/// The blocks of `t` rows that the causal products go by: `(first, end)` of each.
fn causal_blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(CAUSAL_ROWS)
        .map(move |i0| (i0, (i0 + CAUSAL_ROWS).min(t)))
}

/// Grouped-query causal attention. `qkv` is `[b, t, width]` (query heads, then key
/// heads, then value heads, rotary already applied); query head `h` attends with key and
/// value head `h / group`, as HF's `repeat_kv` arranges. Writes the probabilities to
/// `att` (`[b, heads, t, t]`) and each head's output to `out_heads` (`[b, heads, t,
/// head_dim]`, head-major so that each (batch, head) task owns a contiguous piece).
pub(crate) fn attention_forward(out_heads: &mut [f32], att: &mut [f32], qkv: &[f32], s: GqaShape) {
    let (t, hd, w) = (s.t, s.head_dim, s.width());
    let scale = 1.0 / (hd as f32).sqrt();
    out_heads
        .par_chunks_mut(t * hd)
        .zip(att.par_chunks_mut(t * t))
        .enumerate()
        .for_each(|(task, (out, p))| {
            let (bi, h) = (task / s.heads, task % s.heads);
            let g = h / s.group();
            let rows = &qkv[bi * t * w..(bi + 1) * t * w];
            // Rows i0..i1 of the scores, against keys 0..i1 (the softmax zeroes the rest).
            for (i0, i1) in causal_blocks(t) {
                let q = View::strided(&rows[i0 * w + s.q_col(h)..], i1 - i0, hd, w, 1);
                let k = View::strided(&rows[s.k_col(g)..], i1, hd, w, 1);
                let scores = ViewMut::strided(&mut p[i0 * t..], i1 - i0, i1, t, 1);
                matmul(scores, q, k.t(), false, Par::Single);
            }
            causal_softmax(p, t, scale);
            for (i0, i1) in causal_blocks(t) {
                let v = View::strided(&rows[s.v_col(g)..], i1, hd, w, 1);
                matmul(
                    ViewMut::rows(&mut out[i0 * hd..i1 * hd], i1 - i0, hd),
                    View::strided(&p[i0 * t..], i1 - i0, i1, t, 1),
                    v,
                    false,
                    Par::Single,
                );
            }
        });
}

/// Backward of [`attention_forward`]. `dout` is `[b, t, heads * head_dim]` (token-major,
/// as the output projection sees it). Writes (overwrites) the gradients of q (`dq_heads`,
/// `[b, heads, t, head_dim]`), k and v (`dk_heads`, `dv_heads`, `[b, kv_heads, t,
/// head_dim]`) with respect to the rotated q and k. One task per (batch, key/value head)
/// sums its group's query heads in head order, so the shared k and v gradients have a
/// fixed summation order.
pub(crate) fn attention_backward(
    grads: (&mut [f32], &mut [f32], &mut [f32]),
    dout: &[f32],
    att: &[f32],
    qkv: &[f32],
    s: GqaShape,
) {
    let (dq_heads, dk_heads, dv_heads) = grads;
    let (t, hd, w, group) = (s.t, s.head_dim, s.width(), s.group());
    let dw = s.heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    dq_heads
        .par_chunks_mut(group * t * hd)
        .zip(dk_heads.par_chunks_mut(t * hd))
        .zip(dv_heads.par_chunks_mut(t * hd))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let (bi, g) = (task / s.kv_heads, task % s.kv_heads);
            let rows = &qkv[bi * t * w..(bi + 1) * t * w];
            let drows = &dout[bi * t * dw..(bi + 1) * t * dw];
            // Rows `from..to` of k, v or q (at column `col`) and of query head `h`'s dy:
            // the products below go by the causal blocks, as the forward's do.
            let kv = |col: usize, from: usize, to: usize| {
                View::strided(&rows[from * w + col..], to - from, hd, w, 1)
            };
            let mut ds = vec![0.0f32; t * t];
            for (j, dq) in dq.chunks_exact_mut(t * hd).enumerate() {
                let h = g * group + j;
                let dy = |from: usize, to: usize| {
                    View::strided(&drows[from * dw + h * hd..], to - from, hd, dw, 1)
                };
                let p_data = &att[(bi * s.heads + h) * t * t..(bi * s.heads + h + 1) * t * t];
                // dP = dY V^T, then dS = P * (dP - rowsum(P * dP)) * scale; only the
                // causal blocks of dP are computed, and the loop reads no other entry.
                for (i0, i1) in causal_blocks(t) {
                    matmul(
                        ViewMut::strided(&mut ds[i0 * t..], i1 - i0, i1, t, 1),
                        dy(i0, i1),
                        kv(s.v_col(g), 0, i1).t(),
                        false,
                        Par::Single,
                    );
                }
                for i in 0..t {
                    let pr = &p_data[i * t..i * t + i + 1];
                    let dr = &mut ds[i * t..(i + 1) * t];
                    let inner = dot(pr, &dr[..i + 1]);
                    for jj in 0..=i {
                        dr[jj] = pr[jj] * (dr[jj] - inner) * scale;
                    }
                    dr[i + 1..].fill(0.0);
                }
                let first = j == 0;
                // dV = P^T dY and dK = dS^T Q: key rows j0..j1 get the query rows j0..
                // (P and dS are zero above the diagonal).
                for (j0, j1) in causal_blocks(t) {
                    let dv = ViewMut::rows(&mut dv[j0 * hd..j1 * hd], j1 - j0, hd);
                    let p = View::strided(&p_data[j0 * t + j0..], t - j0, j1 - j0, t, 1);
                    matmul(dv, p.t(), dy(j0, t), !first, Par::Single);
                    let dk = ViewMut::rows(&mut dk[j0 * hd..j1 * hd], j1 - j0, hd);
                    let q = kv(s.q_col(h), j0, t);
                    let dsv = View::strided(&ds[j0 * t + j0..], t - j0, j1 - j0, t, 1);
                    matmul(dk, dsv.t(), q, !first, Par::Single);
                }
                // dQ = dS K: query rows i0..i1 get the keys 0..i1.
                for (i0, i1) in causal_blocks(t) {
                    let dq = ViewMut::rows(&mut dq[i0 * hd..i1 * hd], i1 - i0, hd);
                    let dsv = View::strided(&ds[i0 * t..], i1 - i0, i1, t, 1);
                    matmul(dq, dsv, kv(s.k_col(g), 0, i1), false, Par::Single);
                }
            }
        });
}

/// Copies head-major `src` (`[b, n_heads, t, head_dim]`) into columns `col..col + n_heads
/// * head_dim` of token-major `dst` (`[b * t, stride]`).
pub(crate) fn heads_to_tokens(
    dst: &mut [f32],
    stride: usize,
    col: usize,
    src: &[f32],
    (t, n_heads, hd): (usize, usize, usize),
) {
    dst.par_chunks_mut(stride * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(block, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(stride).enumerate() {
                let i = block * ROWS_PER_TASK + r;
                let (bi, pos) = (i / t, i % t);
                for h in 0..n_heads {
                    let from = ((bi * n_heads + h) * t + pos) * hd;
                    row[col + h * hd..col + (h + 1) * hd].copy_from_slice(&src[from..from + hd]);
                }
            }
        });
}

/// x * sigmoid(x) and sigmoid(x).
#[inline(always)]
fn silu_and_sigmoid(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp_fast(-x));
    (x * s, s)
}

/// `act[n, :] = silu(gate[n, :]) * up[n, :]`, where `gate_up` is `[n, 2 * f]` (gate
/// then up in each row, as their stacked weights produce).
pub(crate) fn swiglu_forward(act: &mut [f32], gate_up: &[f32], f: usize) {
    act.par_chunks_mut(f * ROWS_PER_TASK)
        .zip(gate_up.par_chunks(2 * f * ROWS_PER_TASK))
        .for_each(|(act, gu)| {
            for (a, gu) in act.chunks_exact_mut(f).zip(gu.chunks_exact(2 * f)) {
                swiglu_row(a, gu);
            }
        });
}

/// SwiGLU of one row (`gu` is gate then up).
#[inline]
pub(crate) fn swiglu_row(act: &mut [f32], gu: &[f32]) {
    let (gate, up) = gu.split_at(act.len());
    for j in 0..act.len() {
        act[j] = silu_and_sigmoid(gate[j]).0 * up[j];
    }
}

/// Backward of [`swiglu_forward`]: writes (overwrites) `dgate_up` (`[n, 2 * f]`).
pub(crate) fn swiglu_backward(dgate_up: &mut [f32], gate_up: &[f32], dact: &[f32], f: usize) {
    let rows = (ELEMS_PER_TASK / (2 * f)).max(1);
    dgate_up
        .par_chunks_mut(2 * f * rows)
        .zip(gate_up.par_chunks(2 * f * rows))
        .zip(dact.par_chunks(f * rows))
        .for_each(|((d, gu), da)| {
            for ((d, gu), da) in d
                .chunks_exact_mut(2 * f)
                .zip(gu.chunks_exact(2 * f))
                .zip(da.chunks_exact(f))
            {
                let (dgate, dup) = d.split_at_mut(f);
                let (gate, up) = gu.split_at(f);
                for j in 0..f {
                    let (silu, s) = silu_and_sigmoid(gate[j]);
                    dup[j] = da[j] * silu;
                    dgate[j] = da[j] * up[j] * (s * (1.0 + gate[j] * (1.0 - s)));
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random values in [-scale, scale), fixed by `salt`.
    fn values(n: usize, salt: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = ((i + 1) * 2_654_435_761 + salt * 40_503) % 1_000_003;
                (h as f32 / 1_000_003.0 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// sum(out * weights) in f64: a scalar whose gradient with respect to `out` is `weights`.
    fn weighted(out: &[f32], weights: &[f32]) -> f64 {
        out.iter()
            .zip(weights)
            .map(|(&o, &w)| o as f64 * w as f64)
            .sum()
    }

    /// Checks `grad` (the analytic gradient of `loss` at `x`) against central finite
    /// differences on 48 coordinates, as the GPT-2 kernels' tests do on 40.
    #[track_caller]
    fn check(name: &str, x: &[f32], grad: &[f32], loss: &mut dyn FnMut(&[f32]) -> f64) {
        crate::ops::tests::check_grad_at(48, name, x, grad, loss);
    }

    #[test]
    fn rmsnorm_backward_matches_finite_differences() {
        let (n, c) = (5, 24);
        let inp = values(n * c, 1, 2.0);
        let w: Vec<f32> = values(c, 2, 0.5).iter().map(|x| 1.0 + x).collect();
        let weights = values(n * c, 4, 1.0);
        let forward = |inp: &[f32], w: &[f32]| {
            let (mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
            rmsnorm_forward(&mut out, &mut rstd, inp, w, 1e-5);
            (weighted(&out, &weights), rstd)
        };
        let (_, rstd) = forward(&inp, &w);
        let (mut dinp, mut dw) = (vec![0.0; n * c], vec![0.0; c]);
        rmsnorm_backward(&mut dinp, &mut dw, &weights, &inp, &w, &rstd);
        check("inp", &inp, &dinp, &mut |x| forward(x, &w).0);
        check("w", &w, &dw, &mut |x| forward(&inp, x).0);
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() {
        let (n, f) = (3, 10);
        let gu = values(n * 2 * f, 5, 4.0);
        let weights = values(n * f, 6, 1.0);
        let loss = |x: &[f32]| {
            let mut act = vec![0.0; n * f];
            swiglu_forward(&mut act, x, f);
            weighted(&act, &weights)
        };
        let mut dgu = vec![0.0; gu.len()];
        swiglu_backward(&mut dgu, &gu, &weights, f);
        check("gate_up", &gu, &dgu, &mut |x| loss(x));
    }

    #[test]
    fn rotation_is_orthogonal_and_inverse_undoes_it() {
        let tables = RopeTables::new(8, 6, 10_000.0);
        let x = values(3 * 8, 7, 1.0);
        let mut y = x.clone();
        tables.rotate(&mut y, 5, false);
        let norm = |v: &[f32]| dot(v, v);
        assert!((norm(&x) - norm(&y)).abs() < 1e-5);
        assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3));
        tables.rotate(&mut y, 5, true);
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6));
        // Position 0 is the identity.
        let mut z = x.clone();
        tables.rotate(&mut z, 0, false);
        assert_eq!(z, x);
    }

    #[test]
    fn grouped_attention_backward_matches_finite_differences() {
        let s = GqaShape {
            t: 5,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
        };
        check_attention(s, 2);
        // Longer than one block of the causal products: the blocks above the diagonal
        // are left out, the blocks on it and below are not.
        let s = GqaShape {
            t: 2 * CAUSAL_ROWS + 3,
            heads: 2,
            kv_heads: 1,
            head_dim: 2,
        };
        check_attention(s, 1);
    }

    fn check_attention(s: GqaShape, b: usize) {
        let (w, d) = (s.width(), s.heads * s.head_dim);
        let qkv = values(b * s.t * w, 8, 1.5);
        let weights = values(b * s.t * d, 9, 1.0);
        let forward = |qkv: &[f32]| {
            let mut heads = vec![0.0; b * s.heads * s.t * s.head_dim];
            let mut att = vec![0.0; b * s.heads * s.t * s.t];
            attention_forward(&mut heads, &mut att, qkv, s);
            let mut out = vec![0.0; b * s.t * d];
            heads_to_tokens(&mut out, d, 0, &heads, (s.t, s.heads, s.head_dim));
            (weighted(&out, &weights), att)
        };
        let (_, att) = forward(&qkv);
        let mut dq = vec![0.0; b * s.heads * s.t * s.head_dim];
        let mut dk = vec![0.0; b * s.kv_heads * s.t * s.head_dim];
        let mut dv = dk.clone();
        attention_backward((&mut dq, &mut dk, &mut dv), &weights, &att, &qkv, s);
        let mut dqkv = vec![0.0; qkv.len()];
        let dims = |n| (s.t, n, s.head_dim);
        heads_to_tokens(&mut dqkv, w, 0, &dq, dims(s.heads));
        heads_to_tokens(&mut dqkv, w, s.k_col(0), &dk, dims(s.kv_heads));
        heads_to_tokens(&mut dqkv, w, s.v_col(0), &dv, dims(s.kv_heads));
        check("qkv", &qkv, &dqkv, &mut |x| forward(x).0);
    }
}
