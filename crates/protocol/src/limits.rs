//! Named limits on what a peer may send, checked before any allocation.

use serde::{Deserialize, Serialize};

/// Upper bounds on a received update. A value over a limit is an error, never a clamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest whole update (header and payload), in bytes.
    pub update_bytes_max: u64,
    /// Largest parameter count an update may claim.
    pub params_max: u32,
    /// Largest chunk of the per-chunk int8 codec.
    pub int8_chunk_max: u32,
}

impl Default for Limits {
    /// Room for the `base` preset (92M parameters) in fp32, and no more.
    fn default() -> Self {
        Limits {
            update_bytes_max: 400 << 20,
            params_max: 100_000_000,
            int8_chunk_max: 1 << 20,
        }
    }
}
