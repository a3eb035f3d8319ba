//! semshare: label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021).

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod defaults;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod inference;
pub mod io;
pub mod model;
pub mod nn;
pub mod rng;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use inference::Model;
