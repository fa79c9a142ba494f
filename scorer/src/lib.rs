//! The Millrace scorer: one binary for every job a scorer pod does. `serve` answers
//! predictions (memory → Redis → real-time ONNX → default); `fetch-model` is the init
//! container that puts the model where the scorer loads it.

pub mod cli;
pub mod fetch;
pub mod model;
pub mod serve;
