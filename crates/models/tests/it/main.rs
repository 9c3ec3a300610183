//! The `models` crate's integration tests: tiny synthetic GGUF files and HF directories,
//! written here, read back through the public API.

mod chat_data;
mod export;
mod gguf_files;
mod hf_dirs;
mod smollm2;
mod writer;
