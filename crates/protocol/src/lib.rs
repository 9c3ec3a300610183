//! hivetrain's wire format: the signed update a worker sends after a unit of work.
//!
//! An update carries the pseudo-gradient of a work unit (the base model's flat parameters
//! minus the worker's after H local steps, in `engine::params` order), compressed by a
//! [`Codec`], hashed with blake3 and signed with the worker's ed25519 key. Parsing checks
//! every size against [`Limits`] before it allocates; nothing in a received update is
//! trusted until [`SignedUpdate::verify`] has passed.
//!
//! The work unit itself, [`WorkUnit`], is one record here, shared by the scheduler, the
//! store, the wire and the worker.
//!
//! This crate does no IO, has no async and reads no clock.

pub mod api;
pub mod auth;
pub mod codec;
pub mod limits;
pub mod unit;
pub mod update;

pub use codec::{Codec, Summary, summarize_values};
pub use limits::Limits;
pub use unit::{WorkAddress, WorkUnit, splitmix64};
pub use update::{
    DecodeError, ID_MAX, SignedUpdate, UpdateHeader, WorkerId, encode_update,
    encode_update_payload, update_len,
};

/// Version of the update format; bumped with any change to its bytes.
pub const UPDATE_FORMAT_VERSION: u16 = 1;
