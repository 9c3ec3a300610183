//! What a run's units train on, as one value: a token stream (text, where a window of
//! `seq + 1` tokens may start anywhere and its targets are its inputs shifted by one), or
//! fixed windows with their own targets (chat data, packed whole conversations, whose
//! targets outside the assistant's answers are the engine's ignore value).
//!
//! Both are addressed the same way ([`crate::address`]): the train split is cut into
//! `n_shards` equal shards (of tokens, or of windows) and a step's starts are drawn by
//! SplitMix64 from the unit's shard, so a unit reads the same batches on every machine.

use std::path::Path;

use protocol::WorkAddress;

use crate::DataError;
use crate::address::{TokenBatch, batch_at, shard_range, starts};
use crate::split::{Dataset, HOLDOUT_EVERY};

/// Fixed windows of `seq` inputs, each with `seq` targets, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windows {
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Windows {
    pub fn n_windows(&self) -> usize {
        self.inputs.len() / self.seq.max(1)
    }

    /// Window `i`'s inputs and targets.
    fn window(&self, i: usize) -> (&[u32], &[u32]) {
        let range = i * self.seq..(i + 1) * self.seq;
        (&self.inputs[range.clone()], &self.targets[range])
    }

    /// Splits the windows into train and holdout: every [`HOLDOUT_EVERY`]-th window is
    /// holdout (the last of each group), or the last window when there are fewer groups
    /// than one. Fails below 2 windows; `path` names the source in that error.
    pub fn split(self, path: &Path) -> Result<(Windows, Windows), DataError> {
        let n = self.n_windows();
        if n < 2 {
            return Err(DataError::TooFewWindows {
                path: path.to_owned(),
                windows: n,
                seq: self.seq,
            });
        }
        let held = |i: usize| {
            if n < HOLDOUT_EVERY {
                i == n - 1
            } else {
                i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            }
        };
        let empty = || Windows {
            seq: self.seq,
            inputs: Vec::new(),
            targets: Vec::new(),
        };
        let (mut train, mut holdout) = (empty(), empty());
        for i in 0..n {
            let (inputs, targets) = self.window(i);
            let side = if held(i) { &mut holdout } else { &mut train };
            side.inputs.extend_from_slice(inputs);
            side.targets.extend_from_slice(targets);
        }
        Ok((train, holdout))
    }
}

/// The train (or holdout) side of a run's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Examples {
    /// A token stream.
    Stream(Vec<u32>),
    /// Fixed windows with their own targets.
    Windows(Windows),
}

impl Examples {
    /// The train and holdout sides of a token stream, split as [`Dataset::split`] does.
    pub fn split_stream(
        path: &Path,
        tokens: &[u32],
        seq: usize,
    ) -> Result<(Examples, Examples), DataError> {
        let dataset = Dataset::split(path, tokens, seq)?;
        Ok((
            Examples::Stream(dataset.train),
            Examples::Stream(dataset.holdout),
        ))
    }

    /// The train and holdout sides of fixed windows (see [`Windows::split`]).
    pub fn split_windows(path: &Path, windows: Windows) -> Result<(Examples, Examples), DataError> {
        let (train, holdout) = windows.split(path)?;
        Ok((Examples::Windows(train), Examples::Windows(holdout)))
    }

    /// What shards cut: tokens of a stream, windows of fixed windows.
    pub fn len(&self) -> usize {
        match self {
            Examples::Stream(tokens) => tokens.len(),
            Examples::Windows(w) => w.n_windows(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many items a window of `seq` needs from a shard: `seq + 1` tokens, or 1 window.
    fn need(&self, seq: usize) -> Result<usize, DataError> {
        match self {
            Examples::Stream(_) => Ok(seq + 1),
            Examples::Windows(w) if w.seq == seq => Ok(1),
            Examples::Windows(w) => Err(DataError::WindowSeq {
                have: w.seq,
                want: seq,
            }),
        }
    }

    /// How many distinct windows of `seq` there are to start from (at least 1).
    pub fn span(&self, seq: usize) -> usize {
        match self {
            Examples::Stream(tokens) => tokens.len().saturating_sub(seq + 1).max(1),
            Examples::Windows(w) => w.n_windows().max(1),
        }
    }

    /// The batch of step `step` of `address` (see [`crate::address`]).
    pub fn batch(
        &self,
        address: &WorkAddress,
        n_shards: u32,
        step: u32,
        batch: usize,
        seq: usize,
    ) -> Result<TokenBatch, DataError> {
        let need = self.need(seq)?;
        let range = shard_range(self.len(), n_shards, address.shard)?;
        let starts = starts(address, step, range, batch, need)?;
        self.batch_at(&starts, seq)
    }

    /// The batch whose windows start at `starts` (token positions of a stream, window
    /// indices of fixed windows; each below [`Examples::span`]).
    pub fn batch_at(&self, starts: &[usize], seq: usize) -> Result<TokenBatch, DataError> {
        self.need(seq)?;
        Ok(match self {
            Examples::Stream(tokens) => batch_at(tokens, starts, seq),
            Examples::Windows(w) => {
                let mut inputs = Vec::with_capacity(starts.len() * seq);
                let mut targets = Vec::with_capacity(starts.len() * seq);
                for &i in starts {
                    let (x, y) = w.window(i);
                    inputs.extend_from_slice(x);
                    targets.extend_from_slice(y);
                }
                TokenBatch {
                    inputs,
                    targets,
                    starts: starts.to_vec(),
                    batch: starts.len(),
                    seq,
                }
            }
        })
    }

    /// The fixed holdout batches: `n` windows of `seq` in batches of `batch` (fewer if the
    /// holdout is short): at stride `seq` from the start of a stream, or the first `n`
    /// windows.
    pub fn holdout_batches(
        &self,
        seq: usize,
        n: usize,
        batch: usize,
    ) -> Result<Vec<TokenBatch>, DataError> {
        let starts: Vec<usize> = match self {
            Examples::Stream(tokens) => {
                let usable = tokens.len().saturating_sub(seq + 1);
                (0..n).map(|i| i * seq).filter(|&s| s <= usable).collect()
            }
            Examples::Windows(w) => (0..n.min(w.n_windows())).collect(),
        };
        starts
            .chunks(batch.max(1))
            .map(|s| self.batch_at(s, seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten windows of 3 tokens: window `i` holds `10 i, 10 i + 1, 10 i + 2`, its targets
    /// the inputs plus 100.
    fn ten() -> Windows {
        let inputs: Vec<u32> = (0..10)
            .flat_map(|i| [10 * i, 10 * i + 1, 10 * i + 2])
            .collect();
        let targets = inputs.iter().map(|t| t + 100).collect();
        Windows {
            seq: 3,
            inputs,
            targets,
        }
    }

    /// Prints the first inputs of each window of each step of `address` over the train
    /// side of [`ten`], or the error.
    #[track_caller]
    fn check(address: WorkAddress, seq: usize, expect: expect_test::Expect) {
        let (train, _) = Examples::split_windows(Path::new("d"), ten()).expect("split");
        let got = (0..address.steps)
            .map(|step| match train.batch(&address, 3, step, 2, seq) {
                Ok(b) => format!("{:?}/{:?}", b.inputs, b.targets),
                Err(e) => e.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        expect.assert_eq(&got);
    }

    #[test]
    fn fixed_windows_are_addressed_whole() {
        let a = WorkAddress {
            shard: 2,
            offset: 0,
            steps: 2,
            seed: 7,
        };
        // Nine train windows (the last is holdout), three a shard: shard 2 is windows 6-8.
        check(
            a,
            3,
            expect_test::expect![
                "[60, 61, 62, 70, 71, 72]/[160, 161, 162, 170, 171, 172] [70, 71, 72, 60, 61, 62]/[170, 171, 172, 160, 161, 162]"
            ],
        );
        check(
            a,
            4,
            expect_test::expect![
                "the data is in windows of 3 tokens; a batch of 4 was asked for (the run's seq must be the windows') the data is in windows of 3 tokens; a batch of 4 was asked for (the run's seq must be the windows')"
            ],
        );
        check(
            WorkAddress { shard: 3, ..a },
            3,
            expect_test::expect![
                "shard 3 does not exist: the train split has 3 shards shard 3 does not exist: the train split has 3 shards"
            ],
        );
    }

    #[test]
    fn the_holdout_is_every_twentieth_window_or_the_last() {
        let (train, holdout) = ten().split(Path::new("d")).expect("split");
        assert_eq!(
            (train.n_windows(), holdout.inputs.as_slice()),
            (9, &[90, 91, 92][..])
        );
        let many = Windows {
            seq: 1,
            inputs: (0..45).collect(),
            targets: (0..45).collect(),
        };
        let (train, holdout) = many.split(Path::new("d")).expect("split");
        assert_eq!(
            (train.n_windows(), holdout.inputs.as_slice()),
            (43, &[19, 39][..])
        );
        let one = Windows {
            seq: 3,
            inputs: vec![1, 2, 3],
            targets: vec![2, 3, 4],
        };
        expect_test::expect!["d.jsonl packs into 1 windows of 3 tokens; at least 2 are needed (one to train on, one for the holdout)"]
            .assert_eq(&one.split(Path::new("d.jsonl")).expect_err("one").to_string());
    }

    #[test]
    fn a_stream_reads_as_before() {
        let tokens: Vec<u32> = (0..10_000).collect();
        let address = WorkAddress {
            shard: 1,
            offset: 0,
            steps: 1,
            seed: 7,
        };
        let stream = Examples::Stream(tokens.clone());
        let ours = stream.batch(&address, 4, 0, 3, 16).expect("batch");
        let before = crate::address::batch(&address, &tokens, 4, 0, 3, 16).expect("batch");
        assert_eq!(ours, before);
        let held = stream.holdout_batches(16, 5, 2).expect("holdout");
        assert_eq!(held.iter().map(|b| b.batch).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(held[1].starts, [32, 48]);
    }
}
