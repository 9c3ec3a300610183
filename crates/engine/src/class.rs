//! The CPU determinism class: what decides the bits of CPU training on this machine.
//!
//! The engine's own kernels split work by shape and sum in a fixed order (ARCHITECTURE.md,
//! Determinism), so the thread count does not matter. What does: the `gemm` crate's
//! choices, made at run time, and the compiler's target for the element-wise kernels.
//! Two machines with the same class string, running the same hivetrain build, run the
//! same instructions on the same blocking and so compute the same bits; machines of
//! different classes may differ in the last bits.

/// The CPU determinism class, e.g.
/// `cpu/gemm-x86-v4/l1-49152B-12w-64B/l2-2097152B-16w-64B/l3-…/build-x86-64-v3`:
///
/// - `gemm-…`: the micro-kernel `gemm` runs, decided as gemm decides it (its
///   `init_gemm_fn`): `x86-v4` (AVX-512F) when this build has gemm's AVX-512 kernels (the
///   `avx512` feature) and the CPU has AVX-512F, else `x86-v3` (FMA), else `scalar`
///   (`neon` on aarch64). Their tiles differ (for f32, 64 x 6 against 16 x 6), and with
///   them gemm's K blocking; its horizontal kernels reduce 16 lanes or 8.
/// - `l1-…/l2-…/l3-…`: size, associativity and line size of each cache level as gemm
///   reads them (`gemm_common::cache::CACHE_INFO`); its K, M and N blocking is a function
///   of them.
/// - `build-…`: the target the element-wise kernels were compiled for (`x86-64-v3` from
///   `.cargo/config.toml`).
///
/// Stable for the life of the process (gemm detects once).
pub fn cpu_class() -> String {
    let caches = gemm_common::cache::CACHE_INFO
        .iter()
        .enumerate()
        .map(|(level, c)| {
            format!(
                "l{}-{}B-{}w-{}B",
                level + 1,
                c.cache_bytes,
                c.associativity,
                c.cache_line_bytes
            )
        })
        .collect::<Vec<_>>()
        .join("/");
    format!(
        "cpu/gemm-{}/{caches}/build-{}",
        gemm_kernel(),
        build_target()
    )
}

/// The largest relative L2 distance a replay spot-check should admit between an update
/// and its re-run by a CPU of another class, for units of up to 50 steps (the default
/// `steps_per_unit`). Same units as `spot_check.tolerance`: the distance between the two
/// int8-decoded payloads over the norm of the re-run's. Within one class the distance is
/// 0, and re-running on a checker of the worker's class stays the better check.
///
/// Calibrated with `cargo xtask unit-delta` (BENCHMARKS.md, "Re-runs across machines").
/// Across classes, the one measured pair (`small`, 20 steps, gemm's AVX-512 kernels on two
/// Xeons against its AVX2 kernels on an EPYC) sent the same int8 payload: distance 0. How
/// far a last-bit difference grows once there is one was measured with `--perturb` (every
/// starting parameter one float step away): an int8 distance of 1.7e-4 after 20 steps of
/// `small` but 5.2e-2 after 50 (some elements end with the opposite sign). This is about 3
/// times the 50-step figure; an update of zeros is at distance 1, a sign-flipped one at 2.
pub const CROSS_CLASS_REPLAY_TOLERANCE: f32 = 0.15;

/// The replay tolerance for a GPU's unit re-run on a CPU (bf16 activations and tensor-core
/// products against f32), in the same units. Measured (BENCHMARKS.md, "A GPU's unit
/// against a CPU's re-run of it"): 2% after 10 steps and 9.2% after 50 of `small` from
/// its initial weights, but 18% and 25% for two 50-step units of a run at lr 2e-3 from
/// trained versions (`scripts/mixed_run.sh` on the H200), which the cross-class 15%
/// clawed back. This is twice the largest measured, still below an update of zeros (1)
/// or a sign-flipped one (2); a checker of the GPU's own class (replication) judges bit
/// for bit and is preferred wherever one exists.
pub const GPU_CPU_REPLAY_TOLERANCE: f32 = 0.5;

/// The gemm micro-kernel that runs, named by the x86-64 level it needs.
fn gemm_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            "x86-v4"
        } else if std::arch::is_x86_feature_detected!("fma") {
            "x86-v3"
        } else {
            "scalar"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            "neon"
        } else {
            "scalar"
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

/// The instruction set the compiler was allowed for this crate (its `target_feature`s,
/// named by the x86-64 level they make up).
fn build_target() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        if cfg!(all(
            target_feature = "avx512f",
            target_feature = "avx512bw",
            target_feature = "avx512cd",
            target_feature = "avx512dq",
            target_feature = "avx512vl"
        )) {
            "x86-64-v4"
        } else if cfg!(all(
            target_feature = "avx2",
            target_feature = "fma",
            target_feature = "bmi2"
        )) {
            "x86-64-v3"
        } else if cfg!(all(target_feature = "sse4.2", target_feature = "popcnt")) {
            "x86-64-v2"
        } else {
            "x86-64"
        }
    } else {
        std::env::consts::ARCH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The class's path segments on this machine, checked against the build and the CPU.
    #[track_caller]
    fn check(class: &str, want_kernel: &str, want_build: &str) {
        let parts: Vec<&str> = class.split('/').collect();
        assert_eq!(parts.len(), 6, "{class}");
        assert_eq!(parts[0], "cpu", "{class}");
        assert_eq!(parts[1], format!("gemm-{want_kernel}"), "{class}");
        for (level, part) in parts[2..5].iter().enumerate() {
            let fields: Vec<&str> = part.split('-').collect();
            assert_eq!(fields.len(), 4, "{class}");
            assert_eq!(fields[0], format!("l{}", level + 1), "{class}");
            for (field, unit) in fields[1..].iter().zip(["B", "w", "B"]) {
                let n = field
                    .strip_suffix(unit)
                    .unwrap_or_else(|| panic!("{class}"));
                assert!(n.parse::<usize>().is_ok(), "{class}");
            }
        }
        assert_eq!(parts[5], format!("build-{want_build}"), "{class}");
    }

    #[test]
    fn the_class_names_the_kernel_gemm_runs_and_is_stable() {
        let class = cpu_class();
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = match (
                cfg!(feature = "avx512"),
                std::arch::is_x86_feature_detected!("avx512f"),
            ) {
                (true, true) => "x86-v4",
                // Built for x86-64-v3 (.cargo/config.toml), so FMA is there.
                _ => "x86-v3",
            };
            check(&class, kernel, "x86-64-v3");
        }
        assert_eq!(cpu_class(), class);
        assert_eq!(std::thread::spawn(cpu_class).join().ok(), Some(class));
    }
}
