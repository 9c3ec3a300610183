//! Codecs of a weight delta: fp32, fp16, int8 with a scale per chunk, and int8 indices
//! into a 256-value codebook spanning mean +- 6 standard deviations (INTELLECT-1's
//! scheme). A tag byte names the codec, so top-k sparse codecs can follow.

use serde::{Deserialize, Serialize};

/// How a delta's floats are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Codec {
    /// 4 bytes a value, exact.
    Fp32,
    /// 2 bytes a value (IEEE half, round to nearest even).
    Fp16,
    /// 1 byte a value: for each chunk of `chunk` values an f32 scale (max |x| / 127), then
    /// the values rounded to `scale * q`, q in -127..=127.
    Int8Chunk { chunk: u32 },
    /// 1 byte a value: 256 f32 codebook entries (the mean of the values in each of 256
    /// equal bins over mean +- 6 sigma; out-of-range values fall in the end bins), then
    /// one index a value.
    Int8Codebook,
}

/// Entries of the int8 codebook.
const CODEBOOK_LEN: usize = 256;
/// The codebook spans this many standard deviations either side of the mean.
const CODEBOOK_SIGMAS: f64 = 6.0;

/// Why a payload does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("unknown codec tag {0}")]
    UnknownTag(u8),
    #[error("int8 chunk size {chunk} is outside 1..={max}")]
    BadChunk { chunk: u32, max: u32 },
    #[error("payload is {got} bytes; {codec:?} with {n_params} values needs {want}")]
    Length {
        codec: Codec,
        n_params: u32,
        want: u64,
        got: u64,
    },
}

impl Codec {
    /// The names configs and flags use: fp32, fp16, int8 (a scale per 4,096 values),
    /// int8-codebook.
    pub const NAMES: &'static str = "fp32, fp16, int8 or int8-codebook";

    /// Parses one of [`Codec::NAMES`].
    pub fn from_name(name: &str) -> Option<Codec> {
        Some(match name {
            "fp32" => Codec::Fp32,
            "fp16" => Codec::Fp16,
            "int8" => Codec::Int8Chunk { chunk: 4096 },
            "int8-codebook" => Codec::Int8Codebook,
            _ => return None,
        })
    }

    /// The tag byte and the 32-bit parameter of the wire header.
    pub fn to_wire(self) -> (u8, u32) {
        match self {
            Codec::Fp32 => (0, 0),
            Codec::Fp16 => (1, 0),
            Codec::Int8Chunk { chunk } => (2, chunk),
            Codec::Int8Codebook => (3, 0),
        }
    }

    /// Parses the tag and parameter, checking the chunk size against `chunk_max`.
    pub fn from_wire(tag: u8, param: u32, chunk_max: u32) -> Result<Codec, CodecError> {
        let codec = match tag {
            0 => Codec::Fp32,
            1 => Codec::Fp16,
            2 => Codec::Int8Chunk { chunk: param },
            3 => Codec::Int8Codebook,
            _ => return Err(CodecError::UnknownTag(tag)),
        };
        if let Codec::Int8Chunk { chunk } = codec
            && (chunk == 0 || chunk > chunk_max)
        {
            return Err(CodecError::BadChunk {
                chunk,
                max: chunk_max,
            });
        }
        Ok(codec)
    }

    /// Exact payload size for `n_params` values (computed in u64, no overflow).
    pub fn payload_bytes(self, n_params: u32) -> u64 {
        let n = n_params as u64;
        match self {
            Codec::Fp32 => 4 * n,
            Codec::Fp16 => 2 * n,
            Codec::Int8Chunk { chunk } => n + 4 * n.div_ceil(chunk.max(1) as u64),
            Codec::Int8Codebook => 4 * CODEBOOK_LEN as u64 + n,
        }
    }

    /// Packs `values`.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload_bytes(values.len() as u32) as usize);
        match self {
            Codec::Fp32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Codec::Fp16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            Codec::Int8Chunk { chunk } => {
                let chunks = values.chunks(chunk.max(1) as usize);
                let scales: Vec<f32> = chunks
                    .clone()
                    .map(|c| c.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0)
                    .collect();
                scales
                    .iter()
                    .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
                for (c, &scale) in chunks.zip(&scales) {
                    for &v in c {
                        let q = if scale > 0.0 {
                            (v / scale).round().clamp(-127.0, 127.0)
                        } else {
                            0.0
                        };
                        out.push(q as i8 as u8);
                    }
                }
            }
            Codec::Int8Codebook => {
                let (lo, width) = codebook_range(values);
                let bin = |v: f32| -> usize {
                    if width <= 0.0 || !v.is_finite() {
                        return 0;
                    }
                    (((v as f64 - lo) / width).floor() as i64).clamp(0, CODEBOOK_LEN as i64 - 1)
                        as usize
                };
                let mut sums = [0.0f64; CODEBOOK_LEN];
                let mut counts = [0u64; CODEBOOK_LEN];
                for &v in values {
                    let b = bin(v);
                    sums[b] += v as f64;
                    counts[b] += 1;
                }
                for b in 0..CODEBOOK_LEN {
                    let value = if counts[b] > 0 {
                        sums[b] / counts[b] as f64
                    } else {
                        lo + (b as f64 + 0.5) * width
                    };
                    out.extend_from_slice(&(value as f32).to_le_bytes());
                }
                values.iter().for_each(|&v| out.push(bin(v) as u8));
            }
        }
        out
    }

    /// `payload` must have exactly `payload_bytes(n_params)` bytes.
    fn check_length(self, payload: &[u8], n_params: u32) -> Result<(), CodecError> {
        let want = self.payload_bytes(n_params);
        if payload.len() as u64 != want {
            return Err(CodecError::Length {
                codec: self,
                n_params,
                want,
                got: payload.len() as u64,
            });
        }
        Ok(())
    }

    /// Unpacks `n_params` values. Callers check `n_params` against their limits first, so
    /// the allocation is bounded.
    pub fn decode(self, payload: &[u8], n_params: u32) -> Result<Vec<f32>, CodecError> {
        self.check_length(payload, n_params)?;
        let n = n_params as usize;
        let f32_at = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        Ok(match self {
            Codec::Fp32 => payload.chunks_exact(4).map(f32_at).collect(),
            Codec::Fp16 => payload
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Codec::Int8Chunk { chunk } => {
                let n_chunks = n.div_ceil(chunk as usize);
                let (scales, qs) = payload.split_at(4 * n_chunks);
                let mut out = Vec::with_capacity(n);
                for (q, scale) in qs.chunks(chunk as usize).zip(scales.chunks_exact(4)) {
                    let scale = f32_at(scale);
                    out.extend(q.iter().map(|&q| scale * (q as i8) as f32));
                }
                out
            }
            Codec::Int8Codebook => {
                let (book, idx) = payload.split_at(4 * CODEBOOK_LEN);
                let book: Vec<f32> = book.chunks_exact(4).map(f32_at).collect();
                idx.iter().map(|&i| book[i as usize]).collect()
            }
        })
    }
}

/// What validation needs of a decoded delta, computed from the payload without
/// materializing the delta: the L2 norm, or the first value that is not finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Summary {
    Finite { norm: f32 },
    NonFinite { index: usize, value: f32 },
}

impl Codec {
    /// Summarizes the values `decode` would return (the same non-finite value at the same
    /// index; the norm to within float rounding), without allocating them: int8 chunks
    /// sum their integer codes' squares once and scale the sum, the codebook counts its
    /// indices. Norms are summed in f64.
    pub fn summarize(self, payload: &[u8], n_params: u32) -> Result<Summary, CodecError> {
        self.check_length(payload, n_params)?;
        let f32_at = |b: &[u8]| f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        Ok(match self {
            Codec::Fp32 => summarize_values(payload.chunks_exact(4).map(f32_at)),
            Codec::Fp16 => summarize_values(
                payload
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            ),
            Codec::Int8Chunk { chunk } => {
                let chunk = chunk as usize;
                let n_chunks = (n_params as usize).div_ceil(chunk);
                let (scales, qs) = payload.split_at(4 * n_chunks);
                let mut sum = 0.0f64;
                for (c, (q, scale)) in qs.chunks(chunk).zip(scales.chunks_exact(4)).enumerate() {
                    let scale = f32_at(scale);
                    let (squares, max_abs) = int8_squares(q);
                    if !(scale * max_abs as f32).is_finite() || !scale.is_finite() {
                        // Rare: find the first bad value exactly as `decode` makes it.
                        for (i, &q) in q.iter().enumerate() {
                            let value = scale * (q as i8) as f32;
                            if !value.is_finite() {
                                return Ok(Summary::NonFinite {
                                    index: c * chunk + i,
                                    value,
                                });
                            }
                        }
                    }
                    sum += (scale as f64) * (scale as f64) * squares as f64;
                }
                Summary::Finite {
                    norm: sum.sqrt() as f32,
                }
            }
            Codec::Int8Codebook => {
                let (book, idx) = payload.split_at(4 * CODEBOOK_LEN);
                let book: Vec<f32> = book.chunks_exact(4).map(f32_at).collect();
                if let Some(index) = idx.iter().position(|&i| !book[i as usize].is_finite()) {
                    return Ok(Summary::NonFinite {
                        index,
                        value: book[idx[index] as usize],
                    });
                }
                // Four interleaved histograms, so consecutive equal indices do not wait
                // on one counter.
                let mut counts = [[0u64; CODEBOOK_LEN]; 4];
                let quads = idx.chunks_exact(4);
                for &i in quads.remainder() {
                    counts[0][i as usize] += 1;
                }
                for q in quads {
                    for (h, &i) in counts.iter_mut().zip(q) {
                        h[i as usize] += 1;
                    }
                }
                let sum: f64 = (0..CODEBOOK_LEN)
                    .map(|b| {
                        let n: u64 = counts.iter().map(|h| h[b]).sum();
                        n as f64 * (book[b] as f64) * (book[b] as f64)
                    })
                    .sum();
                Summary::Finite {
                    norm: sum.sqrt() as f32,
                }
            }
        })
    }
}

/// The sum of squares of int8 codes and their largest magnitude.
fn int8_squares(q: &[u8]) -> (u64, u8) {
    let mut total = 0u64;
    let mut max_abs = 0u8;
    // 4,096 squares of at most 127^2 fit a u32; the inner loop vectorizes.
    for block in q.chunks(4096) {
        let mut s = 0u32;
        let mut m = 0u8;
        for &b in block {
            let v = b as i8;
            s += (v as i32 * v as i32) as u32;
            m = m.max(v.unsigned_abs());
        }
        total += s as u64;
        max_abs = max_abs.max(m);
    }
    (total, max_abs)
}

/// The norm of `values` summed in f64 over 8 fixed lanes (so it depends on nothing but
/// the values), or the first value that is not finite.
pub fn summarize_values(values: impl Iterator<Item = f32>) -> Summary {
    let mut lanes = [0.0f64; 8];
    let mut finite = true;
    let mut first_bad = None;
    for (i, x) in values.enumerate() {
        let ok = x.is_finite();
        if !ok && first_bad.is_none() {
            first_bad = Some((i, x));
        }
        finite &= ok;
        lanes[i % 8] += (x as f64) * (x as f64);
    }
    match first_bad {
        Some((index, value)) if !finite => Summary::NonFinite { index, value },
        _ => Summary::Finite {
            norm: lanes.iter().sum::<f64>().sqrt() as f32,
        },
    }
}

/// Lower edge and bin width of the codebook: mean +- 6 sigma over 256 bins.
fn codebook_range(values: &[f32]) -> (f64, f64) {
    let finite = values.iter().filter(|v| v.is_finite());
    let count = finite.clone().count().max(1) as f64;
    let mean = finite.clone().map(|&v| v as f64).sum::<f64>() / count;
    let var = finite.map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
    let sigma = var.sqrt();
    let lo = mean - CODEBOOK_SIGMAS * sigma;
    (lo, 2.0 * CODEBOOK_SIGMAS * sigma / CODEBOOK_LEN as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delta-like vector: mostly small values, a few large ones.
    fn delta(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let u = (((i * 2_654_435_761) % 1_000_003) as f32 / 1_000_003.0) - 0.5;
                if i % 97 == 0 { u * 0.1 } else { u * 1e-3 }
            })
            .collect()
    }

    /// Encodes, decodes, and reports size and relative L2 error.
    #[track_caller]
    fn check(codec: Codec, expect: expect_test::Expect) {
        let values = delta(10_000);
        let bytes = codec.encode(&values);
        assert_eq!(bytes.len() as u64, codec.payload_bytes(10_000));
        let back = codec.decode(&bytes, 10_000).expect("decode");
        let err: f64 = values
            .iter()
            .zip(&back)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = values
            .iter()
            .map(|&a| (a as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        expect.assert_eq(&format!(
            "{} bytes, relative error {:.1e}",
            bytes.len(),
            err / norm
        ));
    }

    #[test]
    fn sizes_and_errors() {
        check(
            Codec::Fp32,
            expect_test::expect!["40000 bytes, relative error 0.0e0"],
        );
        check(
            Codec::Fp16,
            expect_test::expect!["20000 bytes, relative error 2.1e-4"],
        );
        check(
            Codec::Int8Chunk { chunk: 256 },
            expect_test::expect!["10160 bytes, relative error 2.8e-2"],
        );
        check(
            Codec::Int8Codebook,
            expect_test::expect!["11024 bytes, relative error 2.6e-1"],
        );
    }

    #[test]
    fn wire_tags_round_trip_and_reject_bad_ones() {
        for codec in [
            Codec::Fp32,
            Codec::Fp16,
            Codec::Int8Chunk { chunk: 64 },
            Codec::Int8Codebook,
        ] {
            let (tag, param) = codec.to_wire();
            assert_eq!(Codec::from_wire(tag, param, 1 << 20), Ok(codec));
        }
        assert_eq!(Codec::from_wire(9, 0, 10), Err(CodecError::UnknownTag(9)));
        assert_eq!(
            Codec::from_wire(2, 0, 10),
            Err(CodecError::BadChunk { chunk: 0, max: 10 })
        );
        assert_eq!(
            Codec::from_wire(2, 11, 10),
            Err(CodecError::BadChunk { chunk: 11, max: 10 })
        );
        assert!(matches!(
            Codec::Fp32.decode(&[0; 7], 2),
            Err(CodecError::Length {
                want: 8,
                got: 7,
                ..
            })
        ));
    }

    #[test]
    fn zero_and_constant_deltas_survive() {
        for codec in [Codec::Int8Chunk { chunk: 3 }, Codec::Int8Codebook] {
            let zeros = vec![0.0f32; 10];
            assert_eq!(
                codec.decode(&codec.encode(&zeros), 10).expect("decode"),
                zeros
            );
            let same = vec![0.25f32; 10];
            assert_eq!(
                codec.decode(&codec.encode(&same), 10).expect("decode"),
                same
            );
        }
    }

    /// `summarize` agrees with the values `decode` returns, finite or not.
    #[test]
    fn summary_matches_decode() {
        let values = delta(10_000);
        let poke = |bytes: &mut Vec<u8>, at: usize, value: f32| {
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        };
        let mut cases: Vec<(Codec, Vec<u8>)> = Vec::new();
        for codec in [
            Codec::Fp32,
            Codec::Fp16,
            Codec::Int8Chunk { chunk: 256 },
            Codec::Int8Codebook,
        ] {
            cases.push((codec, codec.encode(&values)));
        }
        let mut bad = values.clone();
        bad[777] = f32::NAN;
        bad[900] = f32::INFINITY;
        cases.push((Codec::Fp32, Codec::Fp32.encode(&bad)));
        bad[777] = 0.0;
        cases.push((Codec::Fp16, Codec::Fp16.encode(&bad)));
        let int8 = Codec::Int8Chunk { chunk: 256 };
        let mut nan_scale = int8.encode(&values);
        poke(&mut nan_scale, 4 * 3, f32::NAN);
        cases.push((int8, nan_scale));
        let mut huge_scale = int8.encode(&values);
        poke(&mut huge_scale, 4 * 5, f32::MAX);
        cases.push((int8, huge_scale));
        let mut inf_entry = Codec::Int8Codebook.encode(&values);
        let used = inf_entry[4 * CODEBOOK_LEN + 123] as usize;
        poke(&mut inf_entry, 4 * used, f32::NEG_INFINITY);
        cases.push((Codec::Int8Codebook, inf_entry));

        let mut got = Vec::new();
        for (codec, bytes) in &cases {
            let decoded = codec.decode(bytes, 10_000).expect("decode");
            let want = summarize_values(decoded.iter().copied());
            let summary = codec.summarize(bytes, 10_000).expect("summarize");
            match (summary, want) {
                (Summary::Finite { norm: a }, Summary::Finite { norm: b }) => {
                    assert!((a - b).abs() <= 1e-6 * b, "{codec:?}: {a} against {b}");
                }
                (
                    Summary::NonFinite { index: i, value: a },
                    Summary::NonFinite { index: j, value: b },
                ) => {
                    assert_eq!(i, j, "{codec:?}");
                    assert_eq!(a.to_bits(), b.to_bits(), "{codec:?}");
                }
                (a, b) => panic!("{codec:?}: {a:?} against {b:?}"),
            }
            got.push(match summary {
                Summary::Finite { .. } => "finite".to_owned(),
                Summary::NonFinite { index, value } => format!("{index}={value}"),
            });
        }
        expect_test::expect!["finite finite finite finite 777=NaN 900=inf 768=NaN 1358=inf 6=-inf"]
            .assert_eq(&got.join(" "));
    }
}
