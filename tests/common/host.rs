//! Host helpers for tests: unique names, free ports, cleanup guards.
