//! The volunteer worker. So far: its identity.

pub mod identity;
