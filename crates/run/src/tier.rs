//! A worker's tier: how the run's work unit fits the speed the worker measured when it
//! started (`protocol::api::Machine::tokens_per_s`), against the lease a unit is given.
//! What the dashboard shows beside each contributor; what unit sizing will read.

/// Where a worker stands against the run's unit and lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// A unit takes at most a quarter of its lease.
    Fast,
    /// A unit fits in its lease.
    Steady,
    /// A unit outlasts its lease: it lives on heartbeats (up to the longest lease).
    Slow,
}

impl Tier {
    /// The tier of a worker training `tokens_per_s` on units of `unit_tokens` tokens
    /// leased for `lease_ms`.
    pub fn of(tokens_per_s: f64, unit_tokens: u64, lease_ms: u64) -> Tier {
        let unit_ms = unit_ms_f64(tokens_per_s, unit_tokens);
        // A NaN (no speed) compares false everywhere and lands in Slow.
        if unit_ms <= lease_ms as f64 / 4.0 {
            Tier::Fast
        } else if unit_ms <= lease_ms as f64 {
            Tier::Steady
        } else {
            Tier::Slow
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Fast => "fast",
            Tier::Steady => "steady",
            Tier::Slow => "slow",
        }
    }
}

/// How long a unit of `unit_tokens` tokens should take a worker that trains
/// `tokens_per_s`, in whole ms (rounded up); `None` when the speed is no positive finite
/// number. What the driver hands the scheduler ([`crate::Input::Lease`]) to size a
/// lease's hard deadline before the worker's arrivals are measured. It counts training
/// alone (no download, no upload): the run's `schedule.slack` covers the rest.
pub fn unit_ms(tokens_per_s: f64, unit_tokens: u64) -> Option<u64> {
    if !(tokens_per_s.is_finite() && tokens_per_s > 0.0) {
        return None;
    }
    // An f64 past u64::MAX converts to u64::MAX (`as` saturates).
    Some(unit_ms_f64(tokens_per_s, unit_tokens).ceil() as u64)
}

fn unit_ms_f64(tokens_per_s: f64, unit_tokens: u64) -> f64 {
    1000.0 * unit_tokens as f64 / tokens_per_s
}

#[cfg(test)]
mod tests {
    use super::{Tier, unit_ms};

    #[track_caller]
    fn check(tokens_per_s: f64, unit_tokens: u64, lease_ms: u64, want: Tier) {
        assert_eq!(Tier::of(tokens_per_s, unit_tokens, lease_ms), want);
    }

    #[test]
    fn a_unit_against_its_lease() {
        // 10,000 tokens a unit, leased for 60 s.
        check(1_000.0, 10_000, 60_000, Tier::Fast); // 10 s
        check(10_000.0 / 15.0, 10_000, 60_000, Tier::Fast); // 15 s: a quarter
        check(500.0, 10_000, 60_000, Tier::Steady); // 20 s
        check(10_000.0 / 60.0, 10_000, 60_000, Tier::Steady); // 60 s: the whole lease
        check(100.0, 10_000, 60_000, Tier::Slow); // 100 s
        check(f64::NAN, 10_000, 60_000, Tier::Slow);
        check(0.0, 10_000, 60_000, Tier::Slow);
    }

    #[track_caller]
    fn check_unit_ms(tokens_per_s: f64, unit_tokens: u64, want: Option<u64>) {
        assert_eq!(unit_ms(tokens_per_s, unit_tokens), want);
    }

    #[test]
    fn a_unit_in_ms() {
        check_unit_ms(1_000.0, 10_000, Some(10_000));
        check_unit_ms(3.0, 1, Some(334));
        check_unit_ms(1e-300, 10_000, Some(u64::MAX));
        check_unit_ms(1e9, 0, Some(0));
        check_unit_ms(0.0, 10_000, None);
        check_unit_ms(-5.0, 10_000, None);
        check_unit_ms(f64::NAN, 10_000, None);
        check_unit_ms(f64::INFINITY, 10_000, None);
    }
}
