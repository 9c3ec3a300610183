//! Which accepted units to re-run, BOINC-style adaptive replication: a worker's units
//! are all checked until it has `trusted_after` consecutive verified units, then each
//! with probability 1 / (that count), so checking costs less the longer a worker has been
//! honest; a failed check resets the count to zero, and only units issued after the
//! failed one count again (re-checks of its older units, queued by the failure, can only
//! lower trust). Randomness is passed in: the same draws give the same choices.

use serde::{Deserialize, Serialize};

/// What the coordinator remembers of a worker's record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// Consecutive units whose replay matched.
    pub verified: u64,
    /// The latest unit (by id, the order units are issued in) whose replay did not match.
    pub failed_unit: Option<u64>,
}

/// The policy's one knob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpotCheckPolicy {
    /// Verified units after which checks thin out.
    pub trusted_after: u64,
}

impl Default for SpotCheckPolicy {
    fn default() -> Self {
        SpotCheckPolicy { trusted_after: 10 }
    }
}

impl SpotCheckPolicy {
    /// The probability that a unit of a worker with `trust` is checked.
    pub fn probability(&self, trust: Trust) -> f64 {
        if trust.verified < self.trusted_after.max(1) {
            1.0
        } else {
            1.0 / trust.verified as f64
        }
    }

    /// Whether to check, given a uniform random `draw` over all of `u64`.
    pub fn should_check(&self, trust: Trust, draw: u64) -> bool {
        let p = self.probability(trust);
        p >= 1.0 || (draw as f64) < p * u64::MAX as f64
    }

    /// The record after the check of `unit`: back to zero on a mismatch; one more
    /// verified unit on a match, unless `unit` was issued before the latest failure (its
    /// match says nothing of the worker since).
    pub fn after(&self, trust: Trust, unit: u64, matched: bool) -> Trust {
        if !matched {
            Trust {
                verified: 0,
                failed_unit: Some(trust.failed_unit.map_or(unit, |f| f.max(unit))),
            }
        } else if trust.failed_unit.is_some_and(|f| unit < f) {
            trust
        } else {
            Trust {
                verified: trust.verified + 1,
                ..trust
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A splitmix64 stream: the draws the tests pass in (the generator's state advances
    /// by the constant `splitmix64` adds).
    fn draws(seed: u64) -> impl Iterator<Item = u64> {
        (0u64..).map(move |i| {
            protocol::splitmix64(seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        })
    }

    /// Runs `units` honest units (every check matches); returns the share checked.
    fn honest_overhead(policy: SpotCheckPolicy, units: usize, seed: u64) -> f64 {
        let mut trust = Trust::default();
        let mut checked = 0;
        for (unit, draw) in draws(seed).take(units).enumerate() {
            if policy.should_check(trust, draw) {
                checked += 1;
                trust = policy.after(trust, unit as u64, true);
            }
        }
        checked as f64 / units as f64
    }

    #[test]
    fn new_workers_are_always_checked_then_less_and_less() {
        let p = SpotCheckPolicy::default();
        let got: Vec<String> = [0, 9, 10, 20, 100]
            .iter()
            .map(|&verified| {
                let trust = Trust {
                    verified,
                    failed_unit: None,
                };
                format!("{:.3}", p.probability(trust))
            })
            .collect();
        expect_test::expect!["1.000 1.000 0.100 0.050 0.010"].assert_eq(&got.join(" "));
    }

    fn check(trust: Trust, steps: &[(u64, bool)], want: (u64, Option<u64>)) {
        let p = SpotCheckPolicy::default();
        let got = steps
            .iter()
            .fold(trust, |t, &(unit, matched)| p.after(t, unit, matched));
        assert_eq!((got.verified, got.failed_unit), want, "{steps:?}");
    }

    /// A match counts one more; a mismatch resets; after a failure, matches of older
    /// units (the re-checks the failure queues) leave the count where it is.
    #[test]
    fn trust_counts_matches_since_the_latest_failure() {
        let trusted = Trust {
            verified: 40,
            failed_unit: None,
        };
        /// (unit checked, matched) in order; (verified, failed_unit) after them.
        type Case<'a> = (Trust, &'a [(u64, bool)], (u64, Option<u64>));
        let cases: &[Case] = &[
            (trusted, &[(50, true)], (41, None)),
            (trusted, &[(50, false)], (0, Some(50))),
            (
                trusted,
                &[(50, false), (45, true), (47, true)],
                (0, Some(50)),
            ),
            (
                trusted,
                &[(50, false), (45, true), (51, true)],
                (1, Some(50)),
            ),
            (trusted, &[(50, false), (45, false)], (0, Some(50))),
            (
                trusted,
                &[(50, false), (52, true), (45, false), (53, true)],
                (1, Some(50)),
            ),
        ];
        for (trust, steps, want) in cases {
            check(*trust, steps, *want);
        }
    }

    /// The share of an honest-then-lying worker's lies caught by re-runs alone (lies that
    /// pass scoring), over `units` units: honest for 10, then lying with probability 0.3.
    /// A caught lie queues the worker's unchecked units again (so every earlier lie is
    /// caught with it) and resets its trust.
    fn subtle_liar_caught(policy: SpotCheckPolicy, units: usize, seeds: u64) -> f64 {
        let (mut lies, mut caught) = (0u64, 0u64);
        for seed in 0..seeds {
            let mut trust = Trust::default();
            let mut pending = 0u64;
            let mut draw = draws(seed);
            for i in 0..units {
                let lie = i >= 10 && draw.next().unwrap_or(0) % 10 < 3;
                lies += u64::from(lie);
                if policy.should_check(trust, draw.next().unwrap_or(0)) {
                    trust = policy.after(trust, i as u64, !lie);
                    if lie {
                        caught += 1 + pending;
                        pending = 0;
                    }
                } else if lie {
                    pending += 1;
                }
            }
        }
        caught as f64 / lies as f64
    }

    /// How long a subtle liar lasts: re-runs alone catch most of its lies within a few
    /// hundred units, all of them eventually (BENCHMARKS.md).
    #[test]
    fn a_subtle_liar_is_caught_in_the_long_run() {
        let p = SpotCheckPolicy::default();
        let got: Vec<String> = [50, 100, 200, 400]
            .iter()
            .map(|&n| format!("{n}: {:.2}", subtle_liar_caught(p, n, 2_000)))
            .collect();
        expect_test::expect!["50: 0.68 100: 0.86 200: 0.94 400: 0.97"].assert_eq(&got.join(" "));
    }

    /// The share of an honest, trusted worker's units that get re-run (the budget
    /// is 15%): over 1,000 units, averaged over seeds.
    #[test]
    fn checking_an_honest_worker_costs_little() {
        let p = SpotCheckPolicy::default();
        let runs: Vec<f64> = (0..20).map(|s| honest_overhead(p, 1_000, s)).collect();
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        // The first 10 units are all checked; afterwards the checks thin out as 1/count.
        assert!(mean < 0.06, "{mean}");
        let after_trust: Vec<f64> = (0..20)
            .map(|s| {
                let mut trust = Trust {
                    verified: 10,
                    failed_unit: None,
                };
                let mut checked = 0;
                for (unit, draw) in draws(1000 + s).take(1_000).enumerate() {
                    if p.should_check(trust, draw) {
                        checked += 1;
                        trust = p.after(trust, unit as u64, true);
                    }
                }
                checked as f64 / 1_000.0
            })
            .collect();
        let trusted = after_trust.iter().sum::<f64>() / after_trust.len() as f64;
        assert!(trusted < 0.15, "{trusted}");
    }
}
