//! Validation of one received update against the state of its round.
//!
//! Every update gets a [`Verdict`]: accepted (with its norm), or
//! rejected with a stable machine code and a sentence the worker can act on. A rejection
//! is an expected outcome, not an error. The checks that need only the bytes
//! ([`inspect`]: structure and limits, payload hash, signature, and one pass over the
//! payload for the delta's norm and finiteness) run before, and apart from, those that
//! need the round ([`judge`]), so a server can run the first without holding its state.
//! The reasons are reported in this order: structure and limits, payload hash,
//! signature, staleness, lease (exists, is the signer's, not
//! already submitted), base version, shape, finiteness, the absolute norm bound, and
//! the bound relative to the round's median norm.
//!
//! No IO, no clock: the caller passes what it knows of the round and the lease.

pub mod score;
pub mod spot_check;

use protocol::{Limits, SignedUpdate, Summary, UpdateHeader, WorkerId};
use serde::{Deserialize, Serialize};

/// What the coordinator knows of the round the update is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundState {
    /// The newest model version.
    pub current_version: u64,
    /// Largest accepted `current_version - base_version`.
    pub max_staleness: u64,
    /// Parameter count of the model.
    pub n_params: u32,
    /// Largest accepted L2 norm of a delta.
    pub delta_norm_max: f32,
    /// Median norm of the updates accepted so far this round, if any.
    pub median_norm: Option<f32>,
    /// Largest accepted multiple of the median norm.
    pub median_multiple_max: f32,
    /// The update's unit's steps over the run's steps per unit (1 unless units are sized
    /// per worker). Both norm bounds apply to the norm divided by it, the norm a unit of
    /// the run's steps would have at the same pace, and the median is of such norms:
    /// under Adam a delta's norm grows about linearly with its steps (2.0, 4.1, 8.3 and
    /// 16.3 after 5, 10, 20 and 40 steps of `tiny`), so a GPU's long unit is neither an
    /// outlier beside a laptop's short one nor a cover for an oversized delta.
    pub unit_scale: f32,
    /// Check the update's values: finite, within `delta_norm_max` and the median bar.
    /// Off only in the simulator's plain-mean baseline, which shows what an attack does
    /// to a mean that takes every well-formed update.
    pub check_values: bool,
}

/// What the coordinator knows of the work unit the update names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseState {
    pub work_unit: u64,
    pub worker: WorkerId,
    pub base_version: u64,
    /// An update for this unit was already accepted.
    pub submitted: bool,
}

/// Stable reasons for a rejection (serialized as snake_case codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// Truncated, oversized, unknown codec, wrong payload length...: see the sentence.
    Malformed,
    HashMismatch,
    BadSignature,
    NotLeased,
    NotYourLease,
    Duplicate,
    WrongBase,
    Stale,
    WrongShape,
    NonFinite,
    NormTooLarge,
    NormOutlier,
    /// Scored: the update does not lower the loss on its own unit's data.
    NoProgress,
    /// Scored: the update raises the loss on random data.
    Harmful,
    /// Scored: the update lowers the loss on random data as much as on its own unit's.
    NotOwnData,
    /// Its payload is one already accepted (another unit's, or an old one).
    Copied,
    /// It names a unit or version above `protocol::ID_MAX`, which no store can hold.
    OutOfRange,
}

impl Reject {
    /// The update is refused as not being the unit's work (scored, or a copy): the unit
    /// goes to another worker. Refusals of form, size or timing keep the lease, so that
    /// the worker may send a corrected update for it.
    pub fn releases_unit(self) -> bool {
        matches!(
            self,
            Reject::NoProgress | Reject::Harmful | Reject::NotOwnData | Reject::Copied
        )
    }

    pub fn code(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::HashMismatch => "hash_mismatch",
            Reject::BadSignature => "bad_signature",
            Reject::NotLeased => "not_leased",
            Reject::NotYourLease => "not_your_lease",
            Reject::Duplicate => "duplicate",
            Reject::WrongBase => "wrong_base",
            Reject::Stale => "stale",
            Reject::WrongShape => "wrong_shape",
            Reject::NonFinite => "non_finite",
            Reject::NormTooLarge => "norm_too_large",
            Reject::NormOutlier => "norm_outlier",
            Reject::NoProgress => "no_progress",
            Reject::Harmful => "harmful",
            Reject::NotOwnData => "not_own_data",
            Reject::Copied => "copied",
            Reject::OutOfRange => "out_of_range",
        }
    }
}

/// The outcome of validating one update.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Accepted {
        work_unit: u64,
        worker: WorkerId,
        norm: f32,
    },
    Rejected {
        reason: Reject,
        sentence: String,
    },
}

impl Verdict {
    pub fn reject(reason: Reject, sentence: impl Into<String>) -> Verdict {
        Verdict::Rejected {
            reason,
            sentence: sentence.into(),
        }
    }
}

/// What the bytes of a well-formed, correctly signed update say, found without any round
/// state: its header, and its delta's norm or first non-finite value (or why the payload
/// does not decode). Computing it is most of validation's cost, so a server runs it
/// before it takes the lock on its round state.
#[derive(Clone, Debug, PartialEq)]
pub struct Inspected {
    pub header: UpdateHeader,
    /// The blake3 hash of the payload (verified).
    pub payload_hash: [u8; 32],
    /// The name the update is stored under (`protocol::update::stored_address`).
    pub address: [u8; 32],
    content: Result<Summary, String>,
}

/// Checks structure, limits, payload hash and signature, and summarizes the delta.
/// `Err` is the verdict for bytes that are malformed or not signed by the key they name.
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<Inspected, Verdict> {
    let update = match SignedUpdate::parse(bytes, limits) {
        Ok(u) => u,
        Err(e @ protocol::DecodeError::OutOfRange { .. }) => {
            return Err(Verdict::reject(Reject::OutOfRange, e.to_string()));
        }
        Err(e) => {
            return Err(Verdict::reject(
                Reject::Malformed,
                format!("{e} ({})", e.code()),
            ));
        }
    };
    if let Err(e) = update.verify() {
        let reason = match e {
            protocol::DecodeError::HashMismatch => Reject::HashMismatch,
            _ => Reject::BadSignature,
        };
        return Err(Verdict::reject(reason, e.to_string()));
    }
    Ok(Inspected {
        header: update.header,
        payload_hash: update.payload_hash(),
        address: update.address(),
        content: update
            .summarize()
            .map_err(|e| format!("{e} ({})", e.code())),
    })
}

/// Judges an inspected update against its round and lease (`None`: the unit is unknown
/// or not leased). Cheap: no pass over the delta.
pub fn judge(update: &Inspected, round: &RoundState, lease: Option<&LeaseState>) -> Verdict {
    let h = update.header;
    // Staleness first: an update that old is refused whatever became of its lease.
    let staleness = round.current_version.saturating_sub(h.base_version);
    if staleness > round.max_staleness {
        return Verdict::reject(
            Reject::Stale,
            format!(
                "the update is based on version {}, {staleness} versions behind the current {} (at most {} allowed)",
                h.base_version, round.current_version, round.max_staleness
            ),
        );
    }
    let Some(lease) = lease.filter(|l| l.work_unit == h.work_unit) else {
        return Verdict::reject(
            Reject::NotLeased,
            format!(
                "work unit {} is not leased; ask for a new lease",
                h.work_unit
            ),
        );
    };
    if lease.worker != h.worker {
        return Verdict::reject(
            Reject::NotYourLease,
            format!("work unit {} is leased to another worker", h.work_unit),
        );
    }
    if lease.submitted {
        return Verdict::reject(
            Reject::Duplicate,
            format!(
                "an update for work unit {} was already accepted",
                h.work_unit
            ),
        );
    }
    if h.base_version != lease.base_version {
        return Verdict::reject(
            Reject::WrongBase,
            format!(
                "the update is based on version {} but the unit was leased on version {}",
                h.base_version, lease.base_version
            ),
        );
    }
    if h.n_params != round.n_params {
        return Verdict::reject(
            Reject::WrongShape,
            format!(
                "the update has {} values, the model has {}",
                h.n_params, round.n_params
            ),
        );
    }
    let norm = match &update.content {
        Err(sentence) => return Verdict::reject(Reject::Malformed, sentence.clone()),
        // Unchecked, a NaN or an infinity makes the norm infinite.
        Ok(Summary::NonFinite { .. }) if !round.check_values => f32::INFINITY,
        Ok(Summary::NonFinite { index, value }) => {
            return Verdict::reject(
                Reject::NonFinite,
                format!("value {index} of the update is {value}"),
            );
        }
        Ok(Summary::Finite { norm }) => *norm,
    };
    if round.check_values {
        // A scale that is no positive number counts as 1.
        let scale = if round.unit_scale > 0.0 && round.unit_scale.is_finite() {
            round.unit_scale
        } else {
            1.0
        };
        let scaled = norm / scale;
        let per = if scale == 1.0 {
            String::new()
        } else {
            format!(" (scaled to the run's unit: its unit has {scale} times its steps)")
        };
        if scaled > round.delta_norm_max {
            return Verdict::reject(
                Reject::NormTooLarge,
                format!(
                    "the update's L2 norm {scaled:.4}{per} exceeds the bound {}",
                    round.delta_norm_max
                ),
            );
        }
        if let Some(median) = round.median_norm
            && median > 0.0
            && scaled > round.median_multiple_max * median
        {
            return Verdict::reject(
                Reject::NormOutlier,
                format!(
                    "the update's L2 norm {scaled:.4}{per} is over {} times the round's median {median:.4}",
                    round.median_multiple_max
                ),
            );
        }
    }
    Verdict::Accepted {
        work_unit: h.work_unit,
        worker: h.worker,
        norm,
    }
}

/// Validates `bytes` as the update for the unit `lease` describes (`None`: the unit is
/// unknown or not leased), within `round`: [`inspect`], then [`judge`].
pub fn validate(
    bytes: &[u8],
    limits: &Limits,
    round: &RoundState,
    lease: Option<&LeaseState>,
) -> Verdict {
    match inspect(bytes, limits) {
        Ok(update) => judge(&update, round, lease),
        Err(verdict) => verdict,
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use protocol::{Codec, UpdateHeader, encode_update};

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    const ROUND: RoundState = RoundState {
        current_version: 5,
        max_staleness: 1,
        n_params: 4,
        delta_norm_max: 10.0,
        median_norm: Some(1.0),
        median_multiple_max: 5.0,
        unit_scale: 1.0,
        check_values: true,
    };

    fn lease() -> LeaseState {
        LeaseState {
            work_unit: 11,
            worker: protocol::WorkerId::of(&key(1)),
            base_version: 5,
            submitted: false,
        }
    }

    fn update(signer: u8, work_unit: u64, base_version: u64, delta: &[f32]) -> Vec<u8> {
        let header = UpdateHeader {
            work_unit,
            base_version,
            worker: protocol::WorkerId::of(&key(signer)),
            nonce: 1,
            codec: Codec::Fp32,
            n_params: delta.len() as u32,
        };
        encode_update(&header, delta, &key(signer))
    }

    #[track_caller]
    fn check(
        bytes: &[u8],
        round: RoundState,
        lease: Option<LeaseState>,
        expect: expect_test::Expect,
    ) {
        let got = match validate(bytes, &protocol::Limits::default(), &round, lease.as_ref()) {
            Verdict::Accepted {
                work_unit, norm, ..
            } => format!("accepted unit {work_unit} norm {norm:.3}"),
            Verdict::Rejected { reason, sentence } => format!("{}: {sentence}", reason.code()),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn verdicts() {
        let good = update(1, 11, 5, &[0.5, -0.5, 0.5, -0.5]);
        check(
            &good,
            ROUND,
            Some(lease()),
            expect_test::expect!["accepted unit 11 norm 1.000"],
        );
        check(
            &good[..50],
            ROUND,
            Some(lease()),
            expect_test::expect![
                "malformed: the update is 50 bytes, shorter than its 176-byte header and payload (truncated)"
            ],
        );
        let mut tampered = good.clone();
        tampered[180] ^= 4;
        check(
            &tampered,
            ROUND,
            Some(lease()),
            expect_test::expect!["hash_mismatch: the payload does not match its blake3 hash"],
        );
        check(
            &good,
            ROUND,
            None,
            expect_test::expect!["not_leased: work unit 11 is not leased; ask for a new lease"],
        );
        check(
            &update(2, 11, 5, &[0.5; 4]),
            ROUND,
            Some(lease()),
            expect_test::expect!["not_your_lease: work unit 11 is leased to another worker"],
        );
        check(
            &good,
            ROUND,
            Some(LeaseState {
                submitted: true,
                ..lease()
            }),
            expect_test::expect!["duplicate: an update for work unit 11 was already accepted"],
        );
        check(
            &update(1, 11, 4, &[0.5; 4]),
            ROUND,
            Some(lease()),
            expect_test::expect![
                "wrong_base: the update is based on version 4 but the unit was leased on version 5"
            ],
        );
        let later = RoundState {
            current_version: 8,
            ..ROUND
        };
        check(
            &good,
            later,
            Some(lease()),
            expect_test::expect![
                "stale: the update is based on version 5, 3 versions behind the current 8 (at most 1 allowed)"
            ],
        );
        check(
            &good,
            later,
            None,
            expect_test::expect![
                "stale: the update is based on version 5, 3 versions behind the current 8 (at most 1 allowed)"
            ],
        );
        check(
            &update(1, 11, 5, &[0.5; 3]),
            ROUND,
            Some(lease()),
            expect_test::expect!["wrong_shape: the update has 3 values, the model has 4"],
        );
        check(
            &update(1, 11, 5, &[0.5, f32::NAN, 0.0, 0.0]),
            ROUND,
            Some(lease()),
            expect_test::expect!["non_finite: value 1 of the update is NaN"],
        );
        check(
            &update(1, 11, 5, &[0.5, f32::INFINITY, 0.0, 0.0]),
            ROUND,
            Some(lease()),
            expect_test::expect!["non_finite: value 1 of the update is inf"],
        );
        check(
            &update(1, 11, 5, &[20.0, 0.0, 0.0, 0.0]),
            ROUND,
            Some(lease()),
            expect_test::expect![
                "norm_too_large: the update's L2 norm 20.0000 exceeds the bound 10"
            ],
        );
        check(
            &update(1, 11, 5, &[6.0, 0.0, 0.0, 0.0]),
            ROUND,
            Some(lease()),
            expect_test::expect![
                "norm_outlier: the update's L2 norm 6.0000 is over 5 times the round's median 1.0000"
            ],
        );
        check(
            &update(1, 11, 5, &[6.0, 0.0, 0.0, 0.0]),
            RoundState {
                median_norm: None,
                ..ROUND
            },
            Some(lease()),
            expect_test::expect!["accepted unit 11 norm 6.000"],
        );
        // A unit of 4 times the run's steps (sized for a fast worker): its norm is
        // judged as a quarter of itself, against both bounds.
        let long = RoundState {
            unit_scale: 4.0,
            ..ROUND
        };
        check(
            &update(1, 11, 5, &[16.0, 0.0, 0.0, 0.0]),
            long,
            Some(lease()),
            expect_test::expect!["accepted unit 11 norm 16.000"],
        );
        check(
            &update(1, 11, 5, &[24.0, 0.0, 0.0, 0.0]),
            long,
            Some(lease()),
            expect_test::expect![
                "norm_outlier: the update's L2 norm 6.0000 (scaled to the run's unit: its unit has 4 times its steps) is over 5 times the round's median 1.0000"
            ],
        );
        check(
            &update(1, 11, 5, &[44.0, 0.0, 0.0, 0.0]),
            long,
            Some(lease()),
            expect_test::expect![
                "norm_too_large: the update's L2 norm 11.0000 (scaled to the run's unit: its unit has 4 times its steps) exceeds the bound 10"
            ],
        );
        // A unit of a quarter of the steps: a norm of 2 is 8 for the run's unit.
        check(
            &update(1, 11, 5, &[2.0, 0.0, 0.0, 0.0]),
            RoundState {
                unit_scale: 0.25,
                ..ROUND
            },
            Some(lease()),
            expect_test::expect![
                "norm_outlier: the update's L2 norm 8.0000 (scaled to the run's unit: its unit has 0.25 times its steps) is over 5 times the round's median 1.0000"
            ],
        );
        // A scale that is no positive number counts as 1.
        for unit_scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            check(
                &update(1, 11, 5, &[6.0, 0.0, 0.0, 0.0]),
                RoundState {
                    unit_scale,
                    ..ROUND
                },
                Some(lease()),
                expect_test::expect![
                    "norm_outlier: the update's L2 norm 6.0000 is over 5 times the round's median 1.0000"
                ],
            );
        }
        // Unchecked (the simulator's plain baseline), values pass as they are.
        let unchecked = RoundState {
            check_values: false,
            ..ROUND
        };
        check(
            &update(1, 11, 5, &[0.5, f32::NAN, 0.0, 0.0]),
            unchecked,
            Some(lease()),
            expect_test::expect!["accepted unit 11 norm inf"],
        );
        check(
            &update(1, 11, 5, &[20.0, 0.0, 0.0, 0.0]),
            unchecked,
            Some(lease()),
            expect_test::expect!["accepted unit 11 norm 20.000"],
        );
        check(
            &update(1, 11, 5, &[0.5; 3]),
            unchecked,
            Some(lease()),
            expect_test::expect!["wrong_shape: the update has 3 values, the model has 4"],
        );
    }
}
