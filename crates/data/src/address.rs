//! Naming training data exactly: a [`WorkAddress`] (shard, offset, steps, seed) gives the
//! same batches on every machine. The address itself is `protocol`'s, so that the pure
//! crates name units without this crate's tokenizer; reading its batches is here.
//!
//! The train stream is cut into `n_shards` contiguous, equal shards. Step `i` of an
//! address reads `batch` windows of `seq + 1` tokens whose starts are drawn from the
//! shard by SplitMix64 keyed by (seed, shard, offset + i). Consecutive units of one
//! shard (offset, offset + steps, ...) continue one stream; nothing depends on a
//! library's RNG version.

use protocol::{WorkAddress, splitmix64};

use crate::DataError;

/// A batch of `batch` windows of `seq` tokens, row-major; targets are shifted by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    /// Start of each window in the train stream.
    pub starts: Vec<usize>,
    pub batch: usize,
    pub seq: usize,
}

/// The token range of `shard` of `n_shards` equal parts of a stream of `len` tokens.
pub fn shard_range(
    len: usize,
    n_shards: u32,
    shard: u32,
) -> Result<std::ops::Range<usize>, DataError> {
    if shard >= n_shards {
        return Err(DataError::NoSuchShard { shard, n_shards });
    }
    let per = len / n_shards as usize;
    let start = per * shard as usize;
    Ok(start..start + per)
}

/// Window starts of step `step` (0-based within the unit `address` names): positions in
/// `shard` from which `need` items fit (tokens of a stream: `seq + 1`; fixed windows: 1).
pub fn starts(
    address: &WorkAddress,
    step: u32,
    shard: std::ops::Range<usize>,
    batch: usize,
    need: usize,
) -> Result<Vec<usize>, DataError> {
    if shard.len() < need {
        return Err(DataError::ShardTooShort {
            shard: address.shard,
            tokens: shard.len(),
            need,
        });
    }
    let span = (shard.len() - need + 1) as u64;
    let key = splitmix64(
        address.seed ^ splitmix64(address.shard as u64 ^ splitmix64(address.offset + step as u64)),
    );
    Ok((0..batch as u64)
        .map(|row| shard.start + (splitmix64(key.wrapping_add(row)) % span) as usize)
        .collect())
}

/// The batch of step `step` of `address` read from the `train` stream.
pub fn batch(
    address: &WorkAddress,
    train: &[u32],
    n_shards: u32,
    step: u32,
    batch: usize,
    seq: usize,
) -> Result<TokenBatch, DataError> {
    let range = shard_range(train.len(), n_shards, address.shard)?;
    let starts = starts(address, step, range, batch, seq + 1)?;
    Ok(batch_at(train, &starts, seq))
}

/// The batch whose windows start at `starts`.
pub fn batch_at(tokens: &[u32], starts: &[usize], seq: usize) -> TokenBatch {
    let mut inputs = Vec::with_capacity(starts.len() * seq);
    let mut targets = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        inputs.extend_from_slice(&tokens[s..s + seq]);
        targets.extend_from_slice(&tokens[s + 1..s + seq + 1]);
    }
    TokenBatch {
        inputs,
        targets,
        starts: starts.to_vec(),
        batch: starts.len(),
        seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(address: WorkAddress, expect: expect_test::Expect) {
        let train: Vec<u32> = (0..10_000).collect();
        let steps: Vec<Vec<usize>> = (0..address.steps)
            .map(|i| batch(&address, &train, 4, i, 3, 16).expect("batch").starts)
            .collect();
        expect.assert_eq(&format!("{steps:?}"));
    }

    #[test]
    fn addresses_name_exact_windows() {
        let a = WorkAddress {
            shard: 1,
            offset: 0,
            steps: 2,
            seed: 7,
        };
        check(
            a,
            expect_test::expect!["[[4820, 3847, 3433], [3106, 4500, 4907]]"],
        );
        // The second step of one unit is the first step of a unit one step later.
        check(
            WorkAddress {
                offset: 1,
                steps: 1,
                ..a
            },
            expect_test::expect!["[[3106, 4500, 4907]]"],
        );
        check(
            WorkAddress { seed: 8, ..a },
            expect_test::expect!["[[3023, 3911, 3905], [3677, 3366, 4528]]"],
        );
    }

    #[test]
    fn windows_stay_inside_the_shard() {
        let train: Vec<u32> = (0..1000).collect();
        for step in 0..200 {
            let address = WorkAddress {
                shard: 3,
                offset: 0,
                steps: 200,
                seed: 1,
            };
            let b = batch(&address, &train, 4, step, 8, 16).expect("batch");
            for (&s, row) in b.starts.iter().zip(b.targets.chunks(16)) {
                assert!((750..1000 - 16).contains(&s));
                assert_eq!(row[15] as usize, s + 16);
            }
        }
        let missing = WorkAddress {
            shard: 4,
            offset: 0,
            steps: 1,
            seed: 1,
        };
        let err = batch(&missing, &train, 4, 0, 1, 16).expect_err("no shard");
        assert_eq!(
            err.to_string(),
            "shard 4 does not exist: the train split has 4 shards"
        );
    }
}
