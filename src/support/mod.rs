//! The bottom layer: small helpers every other module may use. Nothing in
//! here imports from the rest of the crate.

pub mod bus;
mod shutdown;

pub use shutdown::Shutdown;
