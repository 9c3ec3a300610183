//! A safe, bounds-checked front to the `gemm` crate's strided matrix product.
//!
//! This is the only module of `engine` with `unsafe` code. `gemm::gemm` takes raw
//! pointers and strides; the wrapper checks that every element a view can address lies
//! inside its slice, and Rust's borrow rules keep the destination from aliasing the
//! inputs, which together are exactly gemm's safety contract.
#![allow(unsafe_code)]

/// How many threads one product may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Par {
    /// On the calling thread (used inside already-parallel loops).
    Single,
    /// Split over this many tasks of the current rayon pool.
    Threads(usize),
}

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// A writable strided matrix.
#[derive(Debug)]
pub(crate) struct ViewMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

fn footprint(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

impl<'a> View<'a> {
    /// A dense row-major `rows x cols` matrix at the start of `data`.
    pub(crate) fn rows(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View::strided(data, rows, cols, cols, 1)
    }

    pub(crate) fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            footprint(rows, cols, rs, cs) <= data.len(),
            "view {rows}x{cols} (strides {rs},{cs}) exceeds a slice of {}",
            data.len()
        );
        View {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transpose, without moving data.
    pub(crate) fn t(self) -> View<'a> {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl<'a> ViewMut<'a> {
    pub(crate) fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> ViewMut<'a> {
        ViewMut::strided(data, rows, cols, cols, 1)
    }

    /// The transpose of a dense row-major `rows x cols` matrix: a `cols x rows` view.
    pub(crate) fn transposed(data: &'a mut [f32], rows: usize, cols: usize) -> ViewMut<'a> {
        ViewMut::strided(data, cols, rows, 1, cols)
    }

    pub(crate) fn strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> ViewMut<'a> {
        assert!(
            footprint(rows, cols, rs, cs) <= data.len(),
            "view {rows}x{cols} (strides {rs},{cs}) exceeds a slice of {}",
            data.len()
        );
        // Distinct (i, j) must not share an element, or the product would race with itself.
        assert!(rows <= 1 || cols <= 1 || (rs >= cols * cs || cs >= rows * rs) && rs != cs);
        ViewMut {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

/// `dst = a @ b`, or `dst += a @ b` when `accumulate`.
///
/// Each element of `dst` sums over `k` in an order fixed by the shapes and gemm's cache
/// blocking, never by the thread count, so results are bit-identical for any `par`.
pub(crate) fn matmul(dst: ViewMut<'_>, a: View<'_>, b: View<'_>, accumulate: bool, par: Par) {
    assert_eq!(a.rows, dst.rows, "matmul: rows of a and dst differ");
    assert_eq!(b.cols, dst.cols, "matmul: cols of b and dst differ");
    assert_eq!(a.cols, b.rows, "matmul: inner sizes differ");
    let parallelism = match par {
        Par::Single => gemm::Parallelism::None,
        Par::Threads(n) if n <= 1 => gemm::Parallelism::None,
        Par::Threads(n) => gemm::Parallelism::Rayon(n),
    };
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst.data[i * dst.rs + j * dst.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the constructors checked that every (i, j) of each view lies inside its
    // slice; `dst` is a unique borrow, so it cannot alias `a` or `b`; its strides map
    // distinct elements to distinct addresses; all strides fit in isize because the
    // slices do.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out = x @ x^T` for a dense row-major `rows x cols` matrix `x` (`out` is `rows x rows`,
/// row-major), on the calling thread: the Gram matrix of the rows, as robust aggregation
/// needs for pairwise distances.
pub fn gram(x: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    assert_eq!(x.len(), rows * cols, "gram: x is not rows x cols");
    assert_eq!(out.len(), rows * rows, "gram: out is not rows x rows");
    let a = View::rows(x, rows, cols);
    matmul(ViewMut::rows(out, rows, rows), a, a.t(), false, Par::Single);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for p in 0..k {
                    acc += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    #[track_caller]
    fn check(m: usize, k: usize, n: usize) {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 8.0)
            .collect();
        let want = naive(&a, &b, m, k, n);
        let mut got = vec![1.0f32; m * n];
        matmul(
            ViewMut::rows(&mut got, m, n),
            View::rows(&a, m, k),
            View::rows(&b, k, n),
            false,
            Par::Threads(2),
        );
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{m}x{k}x{n}: {g} vs {w}"
            );
        }
        // Transposed views of transposed storage give the same product.
        let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
        let mut got_t = vec![0.0f32; m * n];
        matmul(
            ViewMut::rows(&mut got_t, m, n),
            View::rows(&at, k, m).t(),
            View::rows(&b, k, n),
            false,
            Par::Single,
        );
        for (g, w) in got_t.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()));
        }
        // Accumulating adds.
        matmul(
            ViewMut::rows(&mut got, m, n),
            View::rows(&a, m, k),
            View::rows(&b, k, n),
            true,
            Par::Single,
        );
        for (g, w) in got.iter().zip(&want) {
            assert!((g - 2.0 * w).abs() <= 2e-4 * (1.0 + w.abs()));
        }
    }

    #[test]
    fn matches_naive_product() {
        for (m, k, n) in [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (64, 128, 96),
            (130, 257, 65),
            (1, 300, 40),
            (40, 300, 1),
        ] {
            check(m, k, n);
        }
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let (m, k, n) = (512, 1024, 384);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919 % 1000) as f32) * 1e-3 - 0.5)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729 % 1000) as f32) * 1e-3 - 0.5)
            .collect();
        let run = |par| {
            let mut out = vec![0.0f32; m * n];
            matmul(
                ViewMut::rows(&mut out, m, n),
                View::rows(&a, m, k).t().t(),
                View::rows(&b, k, n),
                false,
                par,
            );
            out
        };
        let one = run(Par::Single);
        for threads in [2, 3, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let many = pool.install(|| run(Par::Threads(threads)));
            assert!(
                one.iter()
                    .zip(&many)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{threads} threads"
            );
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn rejects_views_past_the_slice() {
        let data = vec![0.0f32; 10];
        let _ = View::rows(&data, 3, 4);
    }
}
