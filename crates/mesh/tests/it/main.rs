//! The transports through one conformance suite, and peers that certify versions of the
//! tiny model over each, in one process.

mod peers;
mod transport;
