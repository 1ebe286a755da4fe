//! Guest helpers for tests: the cached image, NoCloud seeds, SSH keys, QEMU guards.
