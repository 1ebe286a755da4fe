//! Shared support for the integration tests: each area keeps its helpers in its
//! own file. Not every test binary uses every helper.
#![allow(dead_code)]

pub mod browser;
pub mod control;
pub mod deploy;
pub mod fakes;
pub mod guest;
pub mod host;
pub mod https;
pub mod tap_guest;
pub mod vmm_stub;
pub mod walls;
