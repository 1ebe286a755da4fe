//! vmm: the VM engine (being written). Owns qemu-system processes, their QMP
//! sockets and the per-VM directories; never touches netlink, nginx or SQL.

pub mod cli;
pub mod state;

pub use state::{InvalidTransition, VmState};
