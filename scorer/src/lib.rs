//! The Millrace scorer: one binary for every job a scorer pod does. So far: `fetch-model`,
//! the init container that puts the model where the scorer loads it.

pub mod cli;
pub mod fetch;
pub mod model;
