//! The signed update: header, payload hash, ed25519 signature, compressed payload.
//!
//! Layout (little-endian), 176 header bytes then the payload:
//!
//! ```text
//! offset size field
//!      0    4 magic "HVUP"
//!      4    2 format version (UPDATE_FORMAT_VERSION)
//!      6    1 codec tag
//!      7    1 reserved, 0
//!      8    8 work unit id
//!     16    8 base model version
//!     24   32 worker public key (ed25519), the worker's id and wallet
//!     56    8 nonce
//!     64    4 parameter count
//!     68    4 codec parameter (int8 chunk size; 0 for the others)
//!     72    8 payload length in bytes
//!     80   32 blake3 of the payload
//!    112   64 ed25519 signature of bytes 0..112 (header and payload hash)
//!    176    - payload
//! ```

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::CodecError;
use crate::{Codec, Limits, UPDATE_FORMAT_VERSION};

const MAGIC: &[u8; 4] = b"HVUP";
/// Bytes before the payload.
pub const HEADER_BYTES: usize = 176;
/// Bytes covered by the signature: the header fields and the payload hash.
const SIGNED_BYTES: usize = 112;

/// A worker's ed25519 public key: its id on the network and its wallet.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub [u8; 32]);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WorkerId({self})")
    }
}

impl WorkerId {
    /// The id of a signing key.
    pub fn of(key: &SigningKey) -> WorkerId {
        WorkerId(key.verifying_key().to_bytes())
    }

    /// Parses 64 hex digits (as `Display` writes them).
    pub fn parse(hex: &str) -> Option<WorkerId> {
        let mut id = [0u8; 32];
        hex::decode_to_slice(hex, &mut id).ok()?;
        Some(WorkerId(id))
    }

    /// Whether the id is an ed25519 public key that can sign: a point on the curve, not
    /// of small order. Credit sent to anything else could never be spent.
    pub fn is_public_key(&self) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|key| !key.is_weak())
    }
}

/// The largest unit id or version a peer may name: stores keep them as signed 64-bit
/// integers, so anything above is refused as `out_of_range` before it reaches one.
pub const ID_MAX: u64 = i64::MAX as u64;

/// What a worker states about its update; all of it is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateHeader {
    pub work_unit: u64,
    pub base_version: u64,
    pub worker: WorkerId,
    pub nonce: u64,
    pub codec: Codec,
    pub n_params: u32,
}

/// Why received bytes are not a valid update. Each variant has a stable `code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the update is {got} bytes, shorter than its {want}-byte header and payload")]
    Truncated { got: u64, want: u64 },
    #[error("the update is {got} bytes, longer than its header says ({want})")]
    TrailingBytes { got: u64, want: u64 },
    #[error("the update does not start with the magic bytes HVUP")]
    BadMagic,
    #[error(
        "update format version {0} is not supported (this build reads {UPDATE_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("the update claims {n_params} parameters, over the limit of {max}")]
    TooManyParams { n_params: u32, max: u32 },
    #[error("the update's payload is {bytes} bytes, over the limit of {max}")]
    TooLarge { bytes: u64, max: u64 },
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("the payload does not match its blake3 hash")]
    HashMismatch,
    #[error("the worker key is not a valid ed25519 public key")]
    BadKey,
    #[error("the signature does not verify against the worker key")]
    BadSignature,
    #[error("the update's {field} is {value}, above the largest id {ID_MAX}")]
    OutOfRange { field: &'static str, value: u64 },
}

impl DecodeError {
    /// A stable machine code for the HTTP edge and the verdict table.
    pub fn code(&self) -> &'static str {
        match self {
            DecodeError::Truncated { .. } => "truncated",
            DecodeError::TrailingBytes { .. } => "trailing_bytes",
            DecodeError::BadMagic => "bad_magic",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::TooManyParams { .. } => "too_many_params",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Codec(CodecError::UnknownTag(_)) => "unknown_codec",
            DecodeError::Codec(CodecError::BadChunk { .. }) => "bad_codec_parameter",
            DecodeError::Codec(CodecError::Length { .. }) => "wrong_length",
            DecodeError::HashMismatch => "hash_mismatch",
            DecodeError::BadKey => "bad_key",
            DecodeError::BadSignature => "bad_signature",
            DecodeError::OutOfRange { .. } => "out_of_range",
        }
    }
}

/// The exact size in bytes of an update of `n_params` values packed by `codec`: the
/// header (with the payload hash and the signature) and the payload. What
/// [`encode_update`] writes and [`SignedUpdate::parse`] requires, so a server can bound
/// a body by it before reading one.
pub fn update_len(codec: Codec, n_params: u32) -> u64 {
    HEADER_BYTES as u64 + codec.payload_bytes(n_params)
}

/// Encodes `delta` with `header.codec`, hashes and signs it with `key`. The header's
/// `worker` and `n_params` are taken from `key` and `delta`.
pub fn encode_update(header: &UpdateHeader, delta: &[f32], key: &SigningKey) -> Vec<u8> {
    let payload = header.codec.encode(delta);
    let header = UpdateHeader {
        n_params: delta.len() as u32,
        ..*header
    };
    encode_update_payload(&header, &payload, key)
}

/// As [`encode_update`], for a payload already encoded with `header.codec` for
/// `header.n_params` values (`worker` is still taken from `key`).
pub fn encode_update_payload(header: &UpdateHeader, payload: &[u8], key: &SigningKey) -> Vec<u8> {
    let (tag, param) = header.codec.to_wire();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&UPDATE_FORMAT_VERSION.to_le_bytes());
    out.push(tag);
    out.push(0);
    out.extend_from_slice(&header.work_unit.to_le_bytes());
    out.extend_from_slice(&header.base_version.to_le_bytes());
    out.extend_from_slice(&WorkerId::of(key).0);
    out.extend_from_slice(&header.nonce.to_le_bytes());
    out.extend_from_slice(&header.n_params.to_le_bytes());
    out.extend_from_slice(&param.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(payload).as_bytes());
    debug_assert_eq!(out.len(), SIGNED_BYTES);
    let signature = key.sign(&out);
    out.extend_from_slice(&signature.to_bytes());
    out.extend_from_slice(payload);
    out
}

/// A structurally valid update, borrowed from the received bytes; not yet verified.
#[derive(Debug, Clone, Copy)]
pub struct SignedUpdate<'a> {
    pub header: UpdateHeader,
    signed: &'a [u8],
    hash: [u8; 32],
    signature: [u8; 64],
    payload: &'a [u8],
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

impl<'a> SignedUpdate<'a> {
    /// Parses the header and checks every size against `limits` and against the length
    /// of `bytes`. Allocates nothing.
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<SignedUpdate<'a>, DecodeError> {
        let got = bytes.len() as u64;
        if bytes.len() < HEADER_BYTES {
            return Err(DecodeError::Truncated {
                got,
                want: HEADER_BYTES as u64,
            });
        }
        if &bytes[0..4] != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != UPDATE_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let n_params = le_u32(&bytes[64..68]);
        if n_params > limits.params_max {
            return Err(DecodeError::TooManyParams {
                n_params,
                max: limits.params_max,
            });
        }
        let codec = Codec::from_wire(bytes[6], le_u32(&bytes[68..72]), limits.int8_chunk_max)?;
        let payload_len = le_u64(&bytes[72..80]);
        let max = limits.update_bytes_max.saturating_sub(HEADER_BYTES as u64);
        if payload_len > max {
            return Err(DecodeError::TooLarge {
                bytes: payload_len,
                max,
            });
        }
        let want_payload = codec.payload_bytes(n_params);
        if payload_len != want_payload {
            return Err(CodecError::Length {
                codec,
                n_params,
                want: want_payload,
                got: payload_len,
            }
            .into());
        }
        let want = HEADER_BYTES as u64 + payload_len;
        if got < want {
            return Err(DecodeError::Truncated { got, want });
        }
        if got > want {
            return Err(DecodeError::TrailingBytes { got, want });
        }
        let (work_unit, base_version) = (le_u64(&bytes[8..16]), le_u64(&bytes[16..24]));
        for (field, value) in [("work unit", work_unit), ("base version", base_version)] {
            if value > ID_MAX {
                return Err(DecodeError::OutOfRange { field, value });
            }
        }
        let mut worker = [0u8; 32];
        worker.copy_from_slice(&bytes[24..56]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&bytes[80..112]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&bytes[112..176]);
        Ok(SignedUpdate {
            header: UpdateHeader {
                work_unit,
                base_version,
                worker: WorkerId(worker),
                nonce: le_u64(&bytes[56..64]),
                codec,
                n_params,
            },
            signed: &bytes[..SIGNED_BYTES],
            hash,
            signature,
            payload: &bytes[HEADER_BYTES..],
        })
    }

    /// Checks the payload against its hash and the signature against the worker key.
    pub fn verify(&self) -> Result<(), DecodeError> {
        if blake3::hash(self.payload).as_bytes() != &self.hash {
            return Err(DecodeError::HashMismatch);
        }
        let key =
            VerifyingKey::from_bytes(&self.header.worker.0).map_err(|_| DecodeError::BadKey)?;
        key.verify_strict(self.signed, &Signature::from_bytes(&self.signature))
            .map_err(|_| DecodeError::BadSignature)
    }

    /// The delta's values (call after `verify`).
    pub fn decode(&self) -> Result<Vec<f32>, DecodeError> {
        Ok(self
            .header
            .codec
            .decode(self.payload, self.header.n_params)?)
    }

    /// The delta's norm or first non-finite value, without decoding it (call after
    /// `verify`).
    pub fn summarize(&self) -> Result<crate::Summary, DecodeError> {
        Ok(self
            .header
            .codec
            .summarize(self.payload, self.header.n_params)?)
    }

    /// The encoded delta.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The blake3 hash of the payload, as claimed (verified by `verify`).
    pub fn payload_hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The name the update is stored under: [`stored_address`] of its bytes.
    pub fn address(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(self.signed);
        hasher.update(&self.signature);
        *hasher.finalize().as_bytes()
    }
}

/// The content address of a stored update: the blake3 hash of its first
/// [`HEADER_BYTES`] (header, payload hash and signature). Once the payload is checked
/// against the hash inside them, it names the whole update as surely as a hash of all
/// of it, at the cost of 176 bytes instead of a second pass over the payload. `None`
/// for bytes shorter than a header.
pub fn stored_address(bytes: &[u8]) -> Option<[u8; 32]> {
    (bytes.len() >= HEADER_BYTES).then(|| *blake3::hash(&bytes[..HEADER_BYTES]).as_bytes())
}

/// Whether stored update bytes are what `address` names: [`stored_address`] matches
/// and the payload matches the hash in the header.
pub fn stored_intact(bytes: &[u8], address: &[u8; 32]) -> bool {
    stored_address(bytes).is_some_and(|a| a == *address)
        && blake3::hash(&bytes[HEADER_BYTES..]).as_bytes()[..]
            == bytes[SIGNED_BYTES - 32..SIGNED_BYTES]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn header(codec: Codec) -> UpdateHeader {
        UpdateHeader {
            work_unit: 7,
            base_version: 3,
            worker: WorkerId::of(&key(1)),
            nonce: 99,
            codec,
            n_params: 5,
        }
    }

    const DELTA: [f32; 5] = [0.5, -0.25, 0.0, 1e-3, -2.0];

    fn good(codec: Codec) -> Vec<u8> {
        encode_update(&header(codec), &DELTA, &key(1))
    }

    /// Parses and verifies; returns the decoded delta or the error's code and sentence.
    #[track_caller]
    fn check(bytes: &[u8], limits: Limits, expect: expect_test::Expect) {
        let got = SignedUpdate::parse(bytes, &limits)
            .and_then(|u| u.verify().map(|_| u))
            .and_then(|u| u.decode().map(|d| (u.header, d)));
        let text = match got {
            Ok((h, d)) => format!(
                "ok unit={} base={} nonce={} {:?}",
                h.work_unit, h.base_version, h.nonce, d
            ),
            Err(e) => format!("{}: {e}", e.code()),
        };
        expect.assert_eq(&text);
    }

    #[test]
    fn round_trips() {
        let l = Limits::default();
        check(
            &good(Codec::Fp32),
            l,
            expect_test::expect!["ok unit=7 base=3 nonce=99 [0.5, -0.25, 0.0, 0.001, -2.0]"],
        );
        check(
            &good(Codec::Fp16),
            l,
            expect_test::expect!["ok unit=7 base=3 nonce=99 [0.5, -0.25, 0.0, 0.0010004044, -2.0]"],
        );
        check(
            &good(Codec::Int8Chunk { chunk: 2 }),
            l,
            expect_test::expect!["ok unit=7 base=3 nonce=99 [0.5, -0.2519685, 0.0, 0.001, -2.0]"],
        );
    }

    #[test]
    fn update_len_is_what_the_encoder_writes() {
        let codecs = [
            Codec::Fp32,
            Codec::Fp16,
            Codec::Int8Chunk { chunk: 2 },
            Codec::Int8Chunk { chunk: 4096 },
            Codec::Int8Codebook,
        ];
        for codec in codecs {
            let bytes = good(codec);
            assert_eq!(update_len(codec, DELTA.len() as u32), bytes.len() as u64);
        }
    }

    #[test]
    fn a_stored_update_is_intact_only_under_its_own_address() {
        let bytes = good(Codec::Fp32);
        let address = SignedUpdate::parse(&bytes, &Limits::default())
            .expect("parse")
            .address();
        assert_eq!(stored_address(&bytes), Some(address));
        let flipped = |at: usize| {
            let mut b = bytes.clone();
            b[at] ^= 1;
            b
        };
        // (bytes, whether they are intact under `address`)
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("as sent", bytes.clone(), true),
            ("a payload byte flipped", flipped(bytes.len() - 1), false),
            ("a header byte flipped", flipped(10), false),
            ("a payload-hash byte flipped", flipped(90), false),
            ("a signature byte flipped", flipped(150), false),
            ("shorter than a header", bytes[..100].to_vec(), false),
            ("a byte missing", bytes[..bytes.len() - 1].to_vec(), false),
        ];
        for (what, b, intact) in cases {
            assert_eq!(stored_intact(&b, &address), intact, "{what}");
        }
    }

    #[test]
    fn every_kind_of_bad_bytes_is_a_named_error() {
        let l = Limits::default();
        let bytes = good(Codec::Fp32);
        check(
            &bytes[..100],
            l,
            expect_test::expect![
                "truncated: the update is 100 bytes, shorter than its 176-byte header and payload"
            ],
        );
        check(
            &bytes[..bytes.len() - 1],
            l,
            expect_test::expect![
                "truncated: the update is 195 bytes, shorter than its 196-byte header and payload"
            ],
        );
        let mut longer = bytes.clone();
        longer.push(0);
        check(
            &longer,
            l,
            expect_test::expect![
                "trailing_bytes: the update is 197 bytes, longer than its header says (196)"
            ],
        );
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 2] ^= 1;
        check(
            &flipped,
            l,
            expect_test::expect!["hash_mismatch: the payload does not match its blake3 hash"],
        );
        let mut forged = bytes.clone();
        forged[8] ^= 1; // the work unit, after signing
        check(
            &forged,
            l,
            expect_test::expect![
                "bad_signature: the signature does not verify against the worker key"
            ],
        );
        let mut other = encode_update(&header(Codec::Fp32), &DELTA, &key(2));
        other[24..56].copy_from_slice(&WorkerId::of(&key(1)).0); // claims to be worker 1
        check(
            &other,
            l,
            expect_test::expect![
                "bad_signature: the signature does not verify against the worker key"
            ],
        );
        let mut magic = bytes.clone();
        magic[0] = b'X';
        check(
            &magic,
            l,
            expect_test::expect!["bad_magic: the update does not start with the magic bytes HVUP"],
        );
        let mut version = bytes.clone();
        version[4] = 9;
        check(
            &version,
            l,
            expect_test::expect![
                "unsupported_version: update format version 9 is not supported (this build reads 1)"
            ],
        );
        let mut tag = bytes.clone();
        tag[6] = 77;
        check(
            &tag,
            l,
            expect_test::expect!["unknown_codec: unknown codec tag 77"],
        );
        // A length field claiming 4 GiB is refused before anything is allocated.
        let mut huge = bytes.clone();
        huge[72..80].copy_from_slice(&(4u64 << 30).to_le_bytes());
        check(
            &huge,
            l,
            expect_test::expect![
                "too_large: the update's payload is 4294967296 bytes, over the limit of 419430224"
            ],
        );
        let mut many = bytes.clone();
        many[64..68].copy_from_slice(&u32::MAX.to_le_bytes());
        check(
            &many,
            l,
            expect_test::expect![
                "too_many_params: the update claims 4294967295 parameters, over the limit of 100000000"
            ],
        );
        let mut mismatch = bytes.clone();
        mismatch[64..68].copy_from_slice(&6u32.to_le_bytes());
        check(
            &mismatch,
            l,
            expect_test::expect!["wrong_length: payload is 20 bytes; Fp32 with 6 values needs 24"],
        );
        let tight = Limits {
            update_bytes_max: 190,
            ..l
        };
        check(
            &bytes,
            tight,
            expect_test::expect![
                "too_large: the update's payload is 20 bytes, over the limit of 14"
            ],
        );
    }

    #[test]
    fn worker_id_prints_as_hex() {
        expect_test::expect!["8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"]
            .assert_eq(&WorkerId::of(&key(1)).to_string());
    }
}
