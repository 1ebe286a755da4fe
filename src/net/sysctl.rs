//! IPv4 sysctls under `/proc/sys/net/ipv4` (and the one IPv6 switch the
//! namespace needs). They are per network namespace, resolved for the
//! namespace of the thread that opens the file, so calling these from a
//! thread inside our namespace sets the namespace's values.

use std::fs;

use super::NetError;

fn path(key: &str) -> String {
    format!("/proc/sys/net/ipv4/{key}")
}

pub fn read(key: &str) -> Result<String, NetError> {
    fs::read_to_string(path(key))
        .map(|s| s.trim().to_string())
        .map_err(NetError::io(format!("read sysctl net.ipv4.{key}")))
}

pub fn write(key: &str, value: &str) -> Result<(), NetError> {
    fs::write(path(key), value).map_err(NetError::io(format!("set sysctl net.ipv4.{key}={value}")))
}

/// `net.ipv4.conf.<iface>.<key>`.
pub fn conf(iface: &str, key: &str) -> String {
    format!("conf/{iface}/{key}")
}

/// Turn IPv6 off in the calling thread's namespace, for every interface
/// there now (`all`) and later (`default`): the VM network is IPv4 only, so
/// nothing there may learn a route or a neighbour from an IPv6 packet.
pub fn disable_ipv6() -> Result<(), NetError> {
    for scope in ["all", "default"] {
        let key = format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6");
        fs::write(&key, "1").map_err(NetError::io(format!("set {key}=1")))?;
    }
    Ok(())
}
