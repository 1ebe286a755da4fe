//! The only place with `unsafe`: ioctls, `setns` and friends, each with a
//! `// SAFETY:` note. Everything else goes through these safe wrappers or nix.
