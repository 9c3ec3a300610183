//! What the run's tests share: keys, worker ids and signed updates made by hand.

use ed25519_dalek::SigningKey;
use protocol::{Codec, Limits, UpdateHeader, WorkerId};
use validation::Inspected;

/// Worker `n`'s signing key.
pub(crate) fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Worker `n`'s id.
pub(crate) fn worker(n: u8) -> WorkerId {
    WorkerId::of(&key(n))
}

/// Worker `worker`'s update of `n_params` values, every one `value`, for `unit` on
/// `base`, inspected.
pub(crate) fn update(n_params: usize, worker: u8, unit: u64, base: u64, value: f32) -> Inspected {
    let key = key(worker);
    let header = UpdateHeader {
        work_unit: unit,
        base_version: base,
        worker: WorkerId::of(&key),
        nonce: unit,
        codec: Codec::Fp32,
        n_params: n_params as u32,
    };
    let bytes = protocol::encode_update(&header, &vec![value; n_params], &key);
    validation::inspect(&bytes, &Limits::default()).expect("a well-formed update")
}
