//! api: (to be written)
