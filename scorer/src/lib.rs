//! The Millrace scorer: one binary for every job a scorer pod does. `serve` answers
//! predictions (memory → Redis → real-time ONNX → default); `batch` precomputes a shard of
//! them into Redis; `warm` caches the most active entities; `fetch-model` is the init
//! container that puts the model where the scorer loads it.

pub mod batch;
pub mod cli;
pub mod fetch;
pub mod job;
pub mod model;
pub mod serve;
pub mod warm;
