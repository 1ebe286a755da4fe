//! auth: (to be written)
