//! Byzantine-robust ways to combine a round's deltas into the one pseudo-gradient the
//! outer optimizer steps on, in place of the weighted mean:
//!
//! - [`Combine::Median`]: coordinate-wise weighted median (Yin et al. 2018).
//! - [`Combine::TrimmedMean`]: coordinate-wise mean after dropping a share of the weight
//!   at each end (Yin et al. 2018).
//! - [`Combine::MultiKrum`]: the weighted mean of the `m` deltas closest to their
//!   `n - f - 2` nearest neighbours (Blanchard et al. 2017; El Mhamdi et al. 2018).
//! - [`Combine::CenteredClip`]: a few steps from the last round's aggregate towards the
//!   deltas, each clipped to a radius (Karimireddy, He and Jaggi 2021); the last
//!   aggregate is state, kept with the model version.
//! - [`Combine::NormClip`]: every delta clipped to a multiple of the round's median norm,
//!   then the weighted mean.
//!
//! Weights (the tokens the coordinator assigned) are honoured by each rule: a weighted
//! median and trimming by weight, weighted means of what survives. Work is split over
//! rayon's threads by coordinate ranges, and every sum is reduced in a fixed order, so the
//! result does not depend on the thread count.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{AggregationError, OuterOptimizer, WeightedDelta, load_into};

/// Coordinates each task works on.
const CHUNK: usize = 4096;

/// How deltas are combined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum Combine {
    /// The weighted mean (not robust).
    #[default]
    Mean,
    Median,
    /// `trim`: the share of the total weight dropped at each end, in [0, 0.5).
    TrimmedMean {
        trim: f32,
    },
    /// `f`: the attackers assumed; `m`: deltas averaged (0: n - f).
    MultiKrum {
        f: u32,
        m: u32,
    },
    /// `radius`: the clipping radius as a multiple of the median distance from the center;
    /// `iters`: clipping steps per round.
    CenteredClip {
        radius: f32,
        iters: u32,
    },
    /// `multiple`: the largest norm kept, as a multiple of the round's median norm.
    NormClip {
        multiple: f32,
    },
}

/// Checks a round: updates present, lengths `n`, weights summing above zero.
pub(crate) fn check(n: usize, updates: &[WeightedDelta<'_>]) -> Result<u128, AggregationError> {
    if updates.is_empty() {
        return Err(AggregationError::NoUpdates);
    }
    for (index, u) in updates.iter().enumerate() {
        if u.delta.len() != n {
            return Err(AggregationError::Length {
                index,
                got: u.delta.len(),
                want: n,
            });
        }
    }
    let total: u128 = updates.iter().map(|u| u.weight as u128).sum();
    if total == 0 {
        return Err(AggregationError::ZeroWeight);
    }
    Ok(total)
}

/// `base + sum_i coef_i * (update_i - base)` per coordinate (`base` zero when `None`),
/// summed in f64 in update order whatever the threads.
pub(crate) fn combination(
    n: usize,
    updates: &[WeightedDelta<'_>],
    coefs: &[f64],
    base: Option<&[f32]>,
) -> Vec<f32> {
    let pull: f64 = coefs.iter().sum();
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * CHUNK;
            let mut sum = [0.0f64; CHUNK];
            let sum = &mut sum[..chunk.len()];
            for (u, &w) in updates.iter().zip(coefs) {
                for (s, &d) in sum.iter_mut().zip(&u.delta[start..start + chunk.len()]) {
                    *s += w * d as f64;
                }
            }
            match base {
                None => chunk
                    .iter_mut()
                    .zip(sum.iter())
                    .for_each(|(o, s)| *o = *s as f32),
                Some(base) => {
                    let base = &base[start..start + chunk.len()];
                    for ((o, s), &b) in chunk.iter_mut().zip(sum.iter()).zip(base) {
                        *o = (b as f64 * (1.0 - pull) + s) as f32;
                    }
                }
            }
        });
    out
}

/// The squared L2 distance of `a` and `b` (`b` zero when `None`), summed in 8 f64 lanes
/// per chunk and the chunks in order.
fn squared_distance(a: &[f32], b: Option<&[f32]>) -> f64 {
    chunked_sum(a.len(), |r| {
        let mut lanes = [0.0f64; 8];
        let x = &a[r.clone()];
        match b {
            None => {
                for (i, &v) in x.iter().enumerate() {
                    lanes[i % 8] += (v as f64) * (v as f64);
                }
            }
            Some(b) => {
                for (i, (&v, &w)) in x.iter().zip(&b[r]).enumerate() {
                    let d = (v - w) as f64;
                    lanes[i % 8] += d * d;
                }
            }
        }
        lanes.iter().sum::<f64>()
    })
    .into_iter()
    .sum()
}

impl Combine {
    /// Combines `updates` (each of `n` values). `center` is the state of centered
    /// clipping (the last aggregate, `n` values; zeros at first) and is updated; the
    /// other rules leave it alone (it may be empty for them).
    pub fn apply(
        self,
        n: usize,
        updates: &[WeightedDelta<'_>],
        center: &mut [f32],
    ) -> Result<Vec<f32>, AggregationError> {
        check(n, updates)?;
        Ok(match self {
            Combine::Mean => crate::weighted_mean(n, updates)?,
            Combine::Median => {
                per_coordinate(n, updates, |values, weights| trimmed(values, weights, 0.5))
            }
            Combine::TrimmedMean { trim } => {
                let trim = trim.clamp(0.0, 0.499);
                per_coordinate(n, updates, |values, weights| trimmed(values, weights, trim))
            }
            Combine::MultiKrum { f, m } => multi_krum(n, updates, f as usize, m as usize),
            Combine::CenteredClip { radius, iters } => {
                let v = centered_clip(n, updates, center, radius, iters.max(1));
                center.copy_from_slice(&v);
                v
            }
            Combine::NormClip { multiple } => norm_clip(n, updates, multiple),
        })
    }

    /// Parses a rule as the CLI writes it: `mean`, `median`, `trimmed-mean:TRIM`,
    /// `multi-krum:F[:M]`, `centered-clip:RADIUS[:ITERS]`, `norm-clip:MULTIPLE`.
    pub fn from_spec(spec: &str) -> Option<Combine> {
        let mut parts = spec.split(':');
        let name = parts.next()?;
        let args: Vec<&str> = parts.collect();
        let num = |i: usize| args.get(i).and_then(|a| a.parse::<f32>().ok());
        let int = |i: usize| args.get(i).and_then(|a| a.parse::<u32>().ok());
        let rule = match (name, args.len()) {
            ("mean", 0) => Combine::Mean,
            ("median", 0) => Combine::Median,
            ("trimmed-mean", 1) => Combine::TrimmedMean { trim: num(0)? },
            ("multi-krum", 1) => Combine::MultiKrum { f: int(0)?, m: 0 },
            ("multi-krum", 2) => Combine::MultiKrum {
                f: int(0)?,
                m: int(1)?,
            },
            ("centered-clip", 1) => Combine::CenteredClip {
                radius: num(0)?,
                iters: 3,
            },
            ("centered-clip", 2) => Combine::CenteredClip {
                radius: num(0)?,
                iters: int(1)?,
            },
            ("norm-clip", 1) => Combine::NormClip { multiple: num(0)? },
            _ => return None,
        };
        Some(rule)
    }

    /// The forms [`Combine::from_spec`] reads.
    pub const SPECS: &'static str = "mean, median, trimmed-mean:TRIM, multi-krum:F[:M], centered-clip:RADIUS[:ITERS] or norm-clip:MULTIPLE";

    pub fn name(self) -> &'static str {
        match self {
            Combine::Mean => "mean",
            Combine::Median => "median",
            Combine::TrimmedMean { .. } => "trimmed-mean",
            Combine::MultiKrum { .. } => "multi-krum",
            Combine::CenteredClip { .. } => "centered-clip",
            Combine::NormClip { .. } => "norm-clip",
        }
    }
}

/// Runs `f` on every coordinate's values (in update order) and weights.
fn per_coordinate(
    n: usize,
    updates: &[WeightedDelta<'_>],
    f: impl Fn(&mut [(f32, u64)], u128) -> f32 + Sync,
) -> Vec<f32> {
    let total: u128 = updates.iter().map(|u| u.weight as u128).sum();
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let start = c * CHUNK;
            let mut column: Vec<(f32, u64)> = Vec::with_capacity(updates.len());
            for (j, slot) in chunk.iter_mut().enumerate() {
                column.clear();
                column.extend(updates.iter().map(|u| (u.delta[start + j], u.weight)));
                *slot = f(&mut column, total);
            }
        });
    out
}

/// The weighted mean of the values left after dropping `trim` of the total weight at
/// each end (0.5: the weighted median; at an exact tie of the halves, the mean of the two
/// middle values). Values are ordered by `total_cmp`.
fn trimmed(values: &mut [(f32, u64)], total: u128, trim: f32) -> f32 {
    values.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let total = total as f64;
    if trim >= 0.5 {
        let half = total / 2.0;
        let mut below = 0.0f64;
        for (i, &(v, w)) in values.iter().enumerate() {
            let w = w as f64;
            if below + w > half {
                return v;
            }
            below += w;
            if below == half {
                // The halves meet between this value and the next with weight.
                let next = values[i + 1..]
                    .iter()
                    .find(|(_, w)| *w > 0)
                    .map_or(v, |&(x, _)| x);
                return ((v as f64 + next as f64) / 2.0) as f32;
            }
        }
        return values.last().map_or(0.0, |&(v, _)| v);
    }
    // Keep the weight between trim * total and (1 - trim) * total.
    let (lo, hi) = (trim as f64 * total, (1.0 - trim as f64) * total);
    let (mut at, mut sum, mut kept) = (0.0f64, 0.0f64, 0.0f64);
    for &(v, w) in values.iter() {
        let w = w as f64;
        let from = at.max(lo);
        let to = (at + w).min(hi);
        if to > from {
            sum += (to - from) * v as f64;
            kept += to - from;
        }
        at += w;
    }
    if kept > 0.0 { (sum / kept) as f32 } else { 0.0 }
}

/// Sums `f(chunk index, range)` over coordinate chunks, in chunk order.
fn chunked_sum<T: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| f(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect()
}

/// Pairwise squared distances of the deltas, through their Gram matrix: per chunk of
/// coordinates, the rows are gathered into one block and multiplied by its transpose
/// (`engine::gram`, gemm), and the chunks' products are summed in f64 in chunk order.
fn squared_distances(updates: &[WeightedDelta<'_>]) -> Vec<Vec<f64>> {
    let k = updates.len();
    let n = updates[0].delta.len();
    let partials = chunked_sum(n, |range| {
        let width = range.len();
        let mut block = Vec::with_capacity(k * width);
        for u in updates {
            block.extend_from_slice(&u.delta[range.clone()]);
        }
        let mut g = vec![0.0f32; k * k];
        engine::gram(&block, k, width, &mut g);
        g
    });
    let mut gram = vec![0.0f64; k * k];
    for p in partials {
        for (g, x) in gram.iter_mut().zip(p) {
            *g += x as f64;
        }
    }
    (0..k)
        .map(|i| {
            (0..k)
                .map(|j| (gram[i * k + i] + gram[j * k + j] - 2.0 * gram[i * k + j]).max(0.0))
                .collect()
        })
        .collect()
}

/// The weighted mean of the chosen updates.
fn mean_of(n: usize, updates: &[WeightedDelta<'_>], chosen: &[usize]) -> Vec<f32> {
    let picked: Vec<WeightedDelta<'_>> = chosen.iter().map(|&i| updates[i]).collect();
    let total: u128 = picked.iter().map(|u| u.weight as u128).sum();
    if total == 0 {
        // Every chosen update has weight 0: count them equally.
        let equal: Vec<WeightedDelta<'_>> = picked
            .iter()
            .map(|u| WeightedDelta {
                delta: u.delta,
                weight: 1,
            })
            .collect();
        return crate::weighted_mean(n, &equal).unwrap_or_else(|_| vec![0.0; n]);
    }
    crate::weighted_mean(n, &picked).unwrap_or_else(|_| vec![0.0; n])
}

fn multi_krum(n: usize, updates: &[WeightedDelta<'_>], f: usize, m: usize) -> Vec<f32> {
    let k = updates.len();
    if k <= 2 {
        return mean_of(n, updates, &(0..k).collect::<Vec<_>>());
    }
    let d = squared_distances(updates);
    // Each update's score: its distances to its n - f - 2 nearest others.
    let neighbours = k.saturating_sub(f + 2).max(1);
    let mut scored: Vec<(f64, usize)> = (0..k)
        .map(|i| {
            let mut row: Vec<f64> = (0..k).filter(|&j| j != i).map(|j| d[i][j]).collect();
            row.sort_unstable_by(f64::total_cmp);
            (row[..neighbours.min(row.len())].iter().sum(), i)
        })
        .collect();
    scored.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let m = if m == 0 { k.saturating_sub(f) } else { m }.clamp(1, k);
    let mut chosen: Vec<usize> = scored[..m].iter().map(|&(_, i)| i).collect();
    chosen.sort_unstable();
    mean_of(n, updates, &chosen)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_unstable_by(f64::total_cmp);
    let k = xs.len();
    if k == 0 {
        0.0
    } else if k % 2 == 1 {
        xs[k / 2]
    } else {
        (xs[k / 2 - 1] + xs[k / 2]) / 2.0
    }
}

fn centered_clip(
    n: usize,
    updates: &[WeightedDelta<'_>],
    center: &[f32],
    radius: f32,
    iters: u32,
) -> Vec<f32> {
    let total: u128 = updates.iter().map(|u| u.weight as u128).sum();
    let mut v = center.to_vec();
    for _ in 0..iters {
        let distances: Vec<f64> = updates
            .iter()
            .map(|u| squared_distance(u.delta, Some(&v)).sqrt())
            .collect();
        let tau = radius as f64 * median(distances.clone());
        let coefs: Vec<f64> = updates
            .iter()
            .zip(&distances)
            .map(|(u, &dist)| {
                let clip = if dist > tau && dist > 0.0 {
                    tau / dist
                } else {
                    1.0
                };
                clip * u.weight as f64 / total as f64
            })
            .collect();
        v = combination(n, updates, &coefs, Some(&v));
    }
    v
}

fn norm_clip(n: usize, updates: &[WeightedDelta<'_>], multiple: f32) -> Vec<f32> {
    let norms: Vec<f64> = updates
        .iter()
        .map(|u| squared_distance(u.delta, None).sqrt())
        .collect();
    let bound = multiple as f64 * median(norms.clone());
    let total: u128 = updates.iter().map(|u| u.weight as u128).sum();
    let coefs: Vec<f64> = updates
        .iter()
        .zip(&norms)
        .map(|(u, &nm)| {
            let clip = if nm > bound && nm > 0.0 {
                bound / nm
            } else {
                1.0
            };
            clip * u.weight as f64 / total as f64
        })
        .collect();
    combination(n, updates, &coefs, None)
}

/// An outer optimizer that steps on a robust combination of the deltas instead of their
/// weighted mean. Its state is the inner optimizer's, then the clipping center.
pub struct Robust {
    pub combine: Combine,
    pub inner: Box<dyn OuterOptimizer>,
    center: Vec<f32>,
}

impl Robust {
    pub fn new(combine: Combine, inner: Box<dyn OuterOptimizer>, n: usize) -> Robust {
        let center = match combine {
            Combine::CenteredClip { .. } => vec![0.0; n],
            _ => Vec::new(),
        };
        Robust {
            combine,
            inner,
            center,
        }
    }
}

impl OuterOptimizer for Robust {
    fn name(&self) -> &'static str {
        self.combine.name()
    }

    fn step(
        &mut self,
        params: &mut [f32],
        updates: &[WeightedDelta<'_>],
    ) -> Result<(), AggregationError> {
        // Only centered clipping has (and uses) a center; the others get an empty one.
        let g = self
            .combine
            .apply(params.len(), updates, &mut self.center)?;
        self.inner.step(
            params,
            &[WeightedDelta {
                delta: &g,
                weight: 1,
            }],
        )
    }

    fn state(&self) -> Vec<f32> {
        [self.inner.state().as_slice(), &self.center].concat()
    }

    fn load_state(&mut self, state: &[f32]) -> Result<(), AggregationError> {
        let inner_len = self.inner.state().len();
        if state.len() != inner_len + self.center.len() {
            return Err(AggregationError::State {
                got: state.len(),
                want: inner_len + self.center.len(),
            });
        }
        self.inner.load_state(&state[..inner_len])?;
        load_into(&state[inner_len..], &mut [&mut self.center])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn combine(rule: Combine, deltas: &[Vec<f32>], weights: &[u64]) -> Vec<f32> {
        let ups: Vec<WeightedDelta<'_>> = deltas
            .iter()
            .zip(weights)
            .map(|(d, &weight)| WeightedDelta { delta: d, weight })
            .collect();
        let mut center = vec![0.0; deltas[0].len()];
        rule.apply(deltas[0].len(), &ups, &mut center)
            .expect("combine")
    }

    /// Each rule's result on one coordinate's values and weights.
    #[track_caller]
    fn check(rule: Combine, values: &[f32], weights: &[u64], expect: expect_test::Expect) {
        let deltas: Vec<Vec<f32>> = values.iter().map(|&v| vec![v]).collect();
        expect.assert_eq(&format!("{:.4}", combine(rule, &deltas, weights)[0]));
    }

    #[test]
    fn coordinate_rules_by_hand() {
        let med = Combine::Median;
        check(
            med,
            &[3.0, 1.0, 2.0],
            &[1, 1, 1],
            expect_test::expect!["2.0000"],
        );
        check(
            med,
            &[4.0, 1.0, 2.0, 3.0],
            &[1, 1, 1, 1],
            expect_test::expect!["2.5000"],
        );
        check(
            med,
            &[1.0, 2.0, 3.0],
            &[1, 1, 5],
            expect_test::expect!["3.0000"],
        );
        check(
            med,
            &[1.0, 2.0, 1e9],
            &[1, 1, 1],
            expect_test::expect!["2.0000"],
        );
        let trim = Combine::TrimmedMean { trim: 0.25 };
        // Four equal weights: the lowest and highest quarter go, the middle two stay.
        check(
            trim,
            &[1.0, 2.0, 3.0, 100.0],
            &[1, 1, 1, 1],
            expect_test::expect!["2.5000"],
        );
        // Weights 2, 1, 1, 2: a quarter of 6 is 1.5, so half of the weight of 1.0 and of
        // 100.0 goes: (0.5 * 1 + 2 + 3 + 0.5 * 100) / 3.
        check(
            trim,
            &[1.0, 2.0, 3.0, 100.0],
            &[2, 1, 1, 2],
            expect_test::expect!["18.5000"],
        );
        let none = Combine::TrimmedMean { trim: 0.0 };
        check(
            none,
            &[1.0, 2.0, 6.0],
            &[1, 1, 2],
            expect_test::expect!["3.7500"],
        );
    }

    /// Five honest deltas around one direction and one attacker far away: every robust
    /// rule stays near the honest mean; the plain mean does not.
    #[test]
    fn an_outlier_does_not_move_the_robust_rules() {
        let n = 10_000;
        let honest = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| 1.0 + 0.1 * (((i * 31 + k * 17) % 13) as f32 / 13.0 - 0.5))
                .collect()
        };
        let mut deltas: Vec<Vec<f32>> = (0..5).map(honest).collect();
        deltas.push(vec![-100.0; n]);
        let weights = [1u64; 6];
        let truth: Vec<f32> = (0..n)
            .map(|i| deltas[..5].iter().map(|d| d[i]).sum::<f32>() / 5.0)
            .collect();
        let error = |g: &[f32]| {
            (g.iter()
                .zip(&truth)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / truth.iter().map(|&b| (b as f64).powi(2)).sum::<f64>())
            .sqrt()
        };
        let mut got = Vec::new();
        for rule in [
            Combine::Mean,
            Combine::Median,
            Combine::TrimmedMean { trim: 0.2 },
            Combine::MultiKrum { f: 1, m: 0 },
            Combine::CenteredClip {
                radius: 1.0,
                iters: 3,
            },
            Combine::NormClip { multiple: 1.5 },
        ] {
            got.push(format!(
                "{} {:.3}",
                rule.name(),
                error(&combine(rule, &deltas, &weights))
            ));
        }
        expect_test::expect![[r#"
            mean 16.897
            median 0.011
            trimmed-mean 0.010
            multi-krum 0.000
            centered-clip 0.038
            norm-clip 0.417"#]]
        .assert_eq(&got.join("\n"));
    }

    #[test]
    fn specs_parse() {
        let got: Vec<String> = [
            "mean",
            "median",
            "trimmed-mean:0.2",
            "multi-krum:2",
            "multi-krum:2:5",
            "centered-clip:1.5",
            "norm-clip:3",
            "krum",
            "median:1",
            "trimmed-mean:x",
        ]
        .iter()
        .map(|s| format!("{:?}", Combine::from_spec(s)))
        .collect();
        expect_test::expect![[r#"
            Some(Mean)
            Some(Median)
            Some(TrimmedMean { trim: 0.2 })
            Some(MultiKrum { f: 2, m: 0 })
            Some(MultiKrum { f: 2, m: 5 })
            Some(CenteredClip { radius: 1.5, iters: 3 })
            Some(NormClip { multiple: 3.0 })
            None
            None
            None"#]]
        .assert_eq(&got.join("\n"));
    }

    /// The thread count does not change a bit of any rule's result.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let n = 3 * CHUNK + 17;
        let deltas: Vec<Vec<f32>> = (0..7)
            .map(|k| {
                (0..n)
                    .map(|i| (((i * 7 + k * 13) % 101) as f32 - 50.0) * 1e-3)
                    .collect()
            })
            .collect();
        let weights = [1, 2, 3, 1, 2, 3, 1];
        for rule in [
            Combine::Median,
            Combine::TrimmedMean { trim: 0.1 },
            Combine::MultiKrum { f: 2, m: 3 },
            Combine::CenteredClip {
                radius: 0.5,
                iters: 2,
            },
            Combine::NormClip { multiple: 1.0 },
        ] {
            let run = |threads: usize| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool")
                    .install(|| combine(rule, &deltas, &weights))
            };
            let (one, three) = (run(1), run(3));
            assert!(
                one.iter()
                    .zip(&three)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{rule:?}"
            );
        }
    }
}
