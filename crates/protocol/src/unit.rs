//! The work unit: one record that the scheduler issues, the store keeps, the wire carries
//! and the worker trains, so no layer converts it by hand.
//!
//! Its serde form is the scheduler's stored state (the address nested); the lease reply
//! carries it flat through [`FlatUnit`], the shape workers have always received. Both
//! shapes are pinned by tests (here, and the scheduler's state stored by earlier code), so
//! a stored run resumes and a worker of any version reads a lease.

use serde::{Deserialize, Serialize};

/// Where one unit of work reads its data: `steps` steps of shard `shard`'s stream from
/// step `offset`, the windows drawn by SplitMix64 keyed by `seed` (`data::address`
/// turns it into token batches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkAddress {
    pub shard: u32,
    /// Index of the first step within the shard's stream.
    pub offset: u64,
    /// Local steps (H).
    pub steps: u32,
    pub seed: u64,
}

/// One unit of work: train version `base_version` for `address.steps` steps on the data
/// `address` names, at inner learning rate `lr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkUnit {
    pub id: u64,
    pub round: u64,
    /// Train from this model version (`GET /v1/models/{base_version}`).
    pub base_version: u64,
    pub address: WorkAddress,
    /// Inner learning rate.
    pub lr: f32,
}

/// SplitMix64's output function: the one seeded mixing hivetrain's pure cores use, so
/// that their choices do not depend on an RNG crate's version.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The wire form of a [`WorkUnit`], for `#[serde(with = "crate::unit::FlatUnit")]`: the
/// address's fields beside the others in one object, the shape workers have always read.
/// serde checks this mirror field for field against [`WorkUnit`].
#[derive(Serialize, Deserialize)]
#[serde(remote = "WorkUnit")]
pub struct FlatUnit {
    pub id: u64,
    pub round: u64,
    pub base_version: u64,
    #[serde(flatten)]
    pub address: WorkAddress,
    pub lr: f32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LeaseReply;

    const UNIT: WorkUnit = WorkUnit {
        id: 7,
        round: 2,
        base_version: 1,
        address: WorkAddress {
            shard: 3,
            offset: 100,
            steps: 50,
            seed: 18_446_744_073_709_551_557,
        },
        lr: 0.002,
    };

    /// `json` is what `value` serializes to, and reads back as `value`.
    #[track_caller]
    fn check<T>(value: &T, json: expect_test::Expect)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(value).expect("serialize");
        json.assert_eq(&text);
        let back: T = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(&back, value);
    }

    #[test]
    fn the_wire_carries_a_unit_flat() {
        check(
            &LeaseReply::Lease {
                unit: UNIT,
                model_blake3: "ab".into(),
                lease_ms: 300_000,
                heartbeat_ms: 60_000,
            },
            expect_test::expect![[
                r#"{"kind":"lease","unit":{"id":7,"round":2,"base_version":1,"shard":3,"offset":100,"steps":50,"seed":18446744073709551557,"lr":0.002},"model_blake3":"ab","lease_ms":300000,"heartbeat_ms":60000}"#
            ]],
        );
    }

    #[test]
    fn the_stored_form_nests_the_address() {
        check(
            &UNIT,
            expect_test::expect![[
                r#"{"id":7,"round":2,"base_version":1,"address":{"shard":3,"offset":100,"steps":50,"seed":18446744073709551557},"lr":0.002}"#
            ]],
        );
    }

    #[test]
    fn splitmix64_is_the_reference_stream() {
        // The first outputs of the reference generator seeded 0 (Vigna's splitmix64.c),
        // whose state advances by the constant this function adds.
        let stream: Vec<u64> = (0..3u64)
            .map(|i| splitmix64(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect();
        expect_test::expect!["[16294208416658607535, 7960286522194355700, 487617019471545679]"]
            .assert_eq(&format!("{stream:?}"));
    }
}
