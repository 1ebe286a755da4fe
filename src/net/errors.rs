//! The net module's error type. `SubnetFull` and `PortsFull` map to 503 upstream.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network namespace name {name:?}: {why}")]
    BadNetnsName { name: String, why: &'static str },
    #[error("invalid VM subnet {subnet}: {why}")]
    BadSubnet { subnet: Ipv4Net, why: &'static str },
    #[error("VM subnet {subnet} overlaps {what} on the host")]
    SubnetOverlap { subnet: Ipv4Net, what: String },
    #[error("SSH port range {lo}-{hi} is unusable: {why}")]
    BadPortRange { lo: u16, hi: u16, why: String },
    #[error("egress uplink {0:?} is not a usable interface name")]
    BadEgress(String),
    #[error("egress exception {net} is unusable: {why}")]
    BadEgressAllow { net: Ipv4Net, why: &'static str },
    #[error("{0:?} is not a unicast MAC address")]
    BadMac(String),
    #[error("host interface {name:?} exists and is not webhoster's veth")]
    ForeignInterface { name: String },
    #[error("no free guest address left in {0}")]
    SubnetFull(Ipv4Net),
    #[error("no free SSH port left in {lo}-{hi}")]
    PortsFull { lo: u16, hi: u16 },
    #[error("SSH port {port} is outside the configured range {lo}-{hi}")]
    PortOutOfRange { port: u16, lo: u16, hi: u16 },
    #[error("SSH port {port} is already in use{by}")]
    PortInUse { port: u16, by: String },
    #[error("guest address {ip} is not a guest address of {subnet}")]
    NotAGuestAddress { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("network namespace {0:?} does not exist (run `webhoster net up`)")]
    NoNamespace(String),
    #[error("{op}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft {op} failed: {stderr}")]
    Nft { op: String, stderr: String },
}

impl NetError {
    pub(crate) fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
        let op = op.into();
        move |source| NetError::Io { op, source }
    }

    pub(crate) fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
        let op = op.into();
        move |source| NetError::Netlink { op, source }
    }

    /// True for errors that mean "the service is out of capacity" (HTTP 503).
    pub fn is_exhausted(&self) -> bool {
        matches!(self, NetError::SubnetFull(_) | NetError::PortsFull { .. })
    }
}
