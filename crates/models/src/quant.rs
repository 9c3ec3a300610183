//! ggml's tensor types and their dequantization to `f32`.
//!
//! A quantized tensor is a run of blocks along its first GGUF dimension (`ne0`, the
//! row); each block holds [`GgmlType::block_size`] values in [`GgmlType::block_bytes`]
//! bytes, little-endian:
//!
//! ```text
//! Q4_0  18 bytes: f16 d, 16 bytes qs      x[j] = ((qs[j] & 0xF) - 8) * d, x[j+16] = ((qs[j] >> 4) - 8) * d
//! Q4_1  20 bytes: f16 d, f16 m, 16 bytes  x[j] = (qs[j] & 0xF) * d + m,   x[j+16] = (qs[j] >> 4) * d + m
//! Q8_0  34 bytes: f16 d, 32 x i8 q        x[j] = q[j] * d
//! ```

use half::{bf16, f16};

/// The tensor types this reader dequantizes (ggml's ids in the comments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 0
    F32,
    /// 1
    F16,
    /// 2
    Q4_0,
    /// 3
    Q4_1,
    /// 8
    Q8_0,
    /// 30
    Bf16,
}

impl GgmlType {
    /// The type of ggml id `id`, if this reader knows it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Bf16 => 30,
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
        }
    }

    /// Bytes of `n` values, `None` if `n` is not a whole number of blocks (or overflows).
    pub fn bytes_of(self, n: u64) -> Option<u64> {
        let block = self.block_size() as u64;
        if !n.is_multiple_of(block) {
            return None;
        }
        (n / block).checked_mul(self.block_bytes() as u64)
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantizes `bytes` of type `ty` into `out`. The caller has checked that `bytes`
/// holds exactly `out.len()` values ([`GgmlType::bytes_of`]); this panics otherwise.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        Some(bytes.len() as u64),
        ty.bytes_of(out.len() as u64),
        "dequantize: {} bytes for {} values of {ty:?}",
        bytes.len(),
        out.len()
    );
    let (bs, bb) = (ty.block_size(), ty.block_bytes());
    for (block, x) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::F32 => {
                x[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            }
            GgmlType::F16 => x[0] = f16_at(block, 0),
            GgmlType::Bf16 => x[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            GgmlType::Q4_0 => {
                let d = f16_at(block, 0);
                for (j, &q) in block[2..18].iter().enumerate() {
                    x[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    x[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                for (j, &q) in block[4..20].iter().enumerate() {
                    x[j] = (q & 0xF) as f32 * d + m;
                    x[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(block, 0);
                for (j, &q) in block[2..34].iter().enumerate() {
                    x[j] = q as i8 as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    /// One block of `ty` from its bytes, dequantized, against the values expected.
    #[track_caller]
    fn check(ty: GgmlType, bytes: Vec<u8>, expect: &[f32]) {
        let mut out = vec![f32::NAN; expect.len()];
        dequantize(ty, &bytes, &mut out);
        assert_eq!(out, expect, "{ty:?}");
    }

    #[test]
    fn hand_built_blocks() {
        check(
            GgmlType::F32,
            [1.5f32, -2.0]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            &[1.5, -2.0],
        );
        check(GgmlType::F16, [h(0.5), h(-3.0)].concat(), &[0.5, -3.0]);
        check(
            GgmlType::Bf16,
            [
                bf16::from_f32(-0.25).to_le_bytes(),
                bf16::from_f32(8.0).to_le_bytes(),
            ]
            .concat(),
            &[-0.25, 8.0],
        );

        // qs[j] = j | (15 - j) << 4: low nibbles 0..15 fill x[0..16], high 15..0 x[16..32].
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let nibble = |i: usize| if i < 16 { i as f32 } else { (31 - i) as f32 };

        let q4_1 = [h(0.5).as_slice(), &h(-1.0), &qs].concat();
        let want: Vec<f32> = (0..32).map(|i| nibble(i) * 0.5 - 1.0).collect();
        check(GgmlType::Q4_1, q4_1, &want);

        let q4_0 = [h(2.0).as_slice(), &qs].concat();
        let want: Vec<f32> = (0..32).map(|i| (nibble(i) - 8.0) * 2.0).collect();
        check(GgmlType::Q4_0, q4_0, &want);

        let q: Vec<u8> = (0..32i8).map(|j| (j - 16) as u8).collect();
        let q8_0 = [h(0.25).as_slice(), &q].concat();
        let want: Vec<f32> = (0..32).map(|j| (j - 16) as f32 * 0.25).collect();
        check(GgmlType::Q8_0, q8_0, &want);

        // Two blocks: each uses its own scale.
        let two = [h(1.0).as_slice(), &[1u8; 32], &h(-1.0), &[2u8; 32]].concat();
        let want: Vec<f32> = [[1.0f32; 32], [-2.0; 32]].concat();
        check(GgmlType::Q8_0, two, &want);
    }

    #[test]
    fn sizes_are_whole_blocks() {
        assert_eq!(GgmlType::Q4_1.bytes_of(64), Some(40));
        assert_eq!(GgmlType::Q8_0.bytes_of(33), None);
        assert_eq!(GgmlType::F32.bytes_of(u64::MAX), None);
        for id in [0, 1, 2, 3, 8, 30] {
            assert_eq!(GgmlType::from_id(id).map(GgmlType::id), Some(id));
        }
        assert_eq!(GgmlType::from_id(12), None);
    }
}
