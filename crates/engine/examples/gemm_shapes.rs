//! GFLOP/s of the `gemm` crate at the matrix products of a LoRA step of SmolLM2-135M's
//! shape (1,024 rows: a 4 x 256 batch), called as the engine calls it (row-major
//! output, the weight `[out, in]` read transposed in the forward and as stored in the
//! backward): `cargo run --release -p engine --example gemm_shapes -- [threads]`. With
//! `COLUMN_MAJOR=1` the output is written column-major instead (the layout gemm does not
//! transpose). BENCHMARKS.md compares these rates with the step's.

// `gemm::gemm` takes raw pointers; the engine's safe front to it is crate-private.
#![allow(unsafe_code)]

use std::time::Instant;

/// One product `dst = a @ w`, `a` `[m, k]` row-major, `w` `[k, n]` given by its strides.
struct Product<'a> {
    m: usize,
    n: usize,
    k: usize,
    a: &'a [f32],
    w: &'a [f32],
    /// (row, column) strides of `w` as a `[k, n]` matrix.
    w_strides: (isize, isize),
}

fn run(p: &Product<'_>, dst: &mut [f32], column_major: bool, par: gemm::Parallelism) {
    assert!(p.a.len() >= p.m * p.k && p.w.len() >= p.k * p.n && dst.len() >= p.m * p.n);
    let (dst_cs, dst_rs) = if column_major {
        (p.m as isize, 1)
    } else {
        (1, p.n as isize)
    };
    // SAFETY: the assert above keeps every element the strides address inside its slice
    // (`w`'s strides are (1, k) or (n, 1) for a `[n, k]` or `[k, n]` buffer); `dst` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            p.m,
            p.n,
            p.k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            false,
            p.a.as_ptr(),
            1,
            p.k as isize,
            p.w.as_ptr(),
            p.w_strides.1,
            p.w_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 2,
    };
    let column_major = std::env::var("COLUMN_MAJOR").is_ok();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let rows = 1024;
    // (name, out columns n, inner k, forward: `x W^T` with W `[n, k]`; else `dy W` with
    // W `[k, n]`).
    let shapes: [(&str, usize, usize, bool); 12] = [
        ("forward q/k/v", 960, 576, true),
        ("forward o", 576, 576, true),
        ("forward gate/up", 3072, 576, true),
        ("forward down", 576, 1536, true),
        ("forward head", 49152, 576, true),
        ("backward q/k/v", 576, 960, false),
        ("backward o", 576, 576, false),
        ("backward gate/up", 576, 3072, false),
        ("backward down", 1536, 576, false),
        ("backward head", 576, 49152, false),
        ("adapter x A^T", 48, 576, true),
        ("adapter u B^T", 960, 16, true),
    ];
    pool.install(|| {
        let (mut seconds, mut flops) = (0.0, 0.0);
        for (name, n, k, forward) in shapes {
            let a: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) / 64.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) / 64.0)
                .collect();
            let mut dst = vec![0.0f32; rows * n];
            let w_strides = if forward {
                (1, k as isize)
            } else {
                (n as isize, 1)
            };
            let p = Product {
                m: rows,
                n,
                k,
                a: &a,
                w: &w,
                w_strides,
            };
            let product_flops = 2.0 * (rows * n * k) as f64;
            let repeats = ((2e10 / product_flops) as usize).clamp(2, 200);
            run(&p, &mut dst, column_major, par);
            let start = Instant::now();
            for _ in 0..repeats {
                run(&p, &mut dst, column_major, par);
            }
            let s = start.elapsed().as_secs_f64() / repeats as f64;
            seconds += s;
            flops += product_flops;
            println!(
                "{name:17} {rows}x{n}x{k}: {:8.3} ms, {:6.1} GFLOP/s",
                s * 1e3,
                product_flops / s / 1e9
            );
        }
        println!("all: {:.1} GFLOP/s", flops / seconds / 1e9);
    });
    Ok(())
}
