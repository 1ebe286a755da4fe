//! webhoster: one API call turns into a running, isolated, web-serving VM.
//!
//! One module per external system (see `ARCHITECTURE.md`): `vmm` owns
//! qemu-system, `net` the kernel network, `proxy` nginx, `store` the
//! database, `seed` cloud-init documents, `image` the guest image. `hosting`
//! is the policy that drives them through ports; `app` is the one place that
//! wires the real parts behind those ports; `api` is the only module that
//! knows HTTP.

pub mod account;
pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod doctor;
pub mod hosting;
pub mod image;
pub mod install;
pub mod logfile;
pub mod net;
pub mod proxy;
pub mod seed;
pub mod store;
pub mod sys;
pub mod usage;
pub mod vmm;
