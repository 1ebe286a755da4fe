//! proxy: (to be written)
