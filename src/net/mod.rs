//! net: (being written)

pub mod cli;
