//! Every environment variable hivetrain reads, in one place.

/// Directory for caches (tokenized corpora). Default: the platform cache dir.
pub(crate) const CACHE_DIR: &str = "HIVETRAIN_CACHE_DIR";
/// Default compute device (`cpu`, `cpu:N`).
pub(crate) const DEVICE: &str = "HIVETRAIN_DEVICE";
