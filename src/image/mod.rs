//! image: (being written)

pub mod cli;
