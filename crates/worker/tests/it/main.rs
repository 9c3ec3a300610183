//! The worker's HTTP transport against real servers: what it refuses to read.

mod downloads;
