//! One D-Bus method call without arguments on the system bus, spoken by
//! hand: `networkctl reload` cost about a second in a fresh clone under TCG
//! (a process start, with libsystemd-shared's relocations and all its code
//! translated anew), the call itself a few milliseconds. Only what that
//! needs: EXTERNAL authentication, little-endian messages, header fields of
//! the types `o`, `s`, `g` and `u`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const SOCKET: &str = "/run/dbus/system_bus_socket";
const METHOD_CALL: u8 = 1;
const METHOD_RETURN: u8 = 2;
const ERROR: u8 = 3;
const FIELD_ERROR_NAME: u8 = 4;
const FIELD_REPLY_SERIAL: u8 = 5;

fn pad(buf: &mut Vec<u8>, to: usize) {
    while !buf.len().is_multiple_of(to) {
        buf.push(0);
    }
}

fn field(buf: &mut Vec<u8>, code: u8, sig: u8, value: &str) {
    pad(buf, 8);
    buf.extend_from_slice(&[code, 1, sig, 0]);
    // At 8k+4: the string's length is 4-aligned already.
    buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
    buf.extend_from_slice(value.as_bytes());
    buf.push(0);
}

/// A method call message without a body.
fn message(serial: u32, dest: &str, path: &str, iface: &str, member: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    field(&mut fields, 1, b'o', path);
    field(&mut fields, 2, b's', iface);
    field(&mut fields, 3, b's', member);
    field(&mut fields, 6, b's', dest);
    let mut m = vec![b'l', METHOD_CALL, 0, 1];
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&serial.to_le_bytes());
    m.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    // The fields start at 16: their alignment is the message's.
    m.extend_from_slice(&fields);
    pad(&mut m, 8);
    m
}

/// (reply serial, error name) from a message's header fields.
fn parse_fields(f: &[u8]) -> Result<(Option<u32>, Option<String>), String> {
    let bad = || "malformed D-Bus header".to_owned();
    let u32_at = |p: usize| -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            f.get(p..p + 4).ok_or_else(bad)?.try_into().unwrap(),
        ))
    };
    let (mut reply, mut error) = (None, None);
    let mut p = 0;
    while p < f.len() {
        p = p.div_ceil(8) * 8;
        if p >= f.len() {
            break;
        }
        let code = f[p];
        let siglen = *f.get(p + 1).ok_or_else(bad)? as usize;
        let sig = f.get(p + 2..p + 2 + siglen).ok_or_else(bad)?.to_vec();
        p += 2 + siglen + 1;
        match sig.as_slice() {
            b"u" => {
                p = p.div_ceil(4) * 4;
                if code == FIELD_REPLY_SERIAL {
                    reply = Some(u32_at(p)?);
                }
                p += 4;
            }
            b"s" | b"o" => {
                p = p.div_ceil(4) * 4;
                let len = u32_at(p)? as usize;
                let s = f.get(p + 4..p + 4 + len).ok_or_else(bad)?;
                if code == FIELD_ERROR_NAME {
                    error = Some(String::from_utf8_lossy(s).into_owned());
                }
                p += 4 + len + 1;
            }
            b"g" => {
                let len = *f.get(p).ok_or_else(bad)? as usize;
                p += 1 + len + 1;
            }
            _ => {
                return Err(format!(
                    "D-Bus header field of type {:?}",
                    String::from_utf8_lossy(&sig)
                ));
            }
        }
    }
    Ok((reply, error))
}

/// Calls `member` (no arguments) and waits for its answer.
pub fn call(dest: &str, path: &str, iface: &str, member: &str) -> Result<(), String> {
    let io = |e: std::io::Error| format!("D-Bus {member}: {e}");
    let mut s = UnixStream::connect(SOCKET).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(15))).map_err(io)?;
    let uid = nix::unistd::getuid().as_raw().to_string();
    s.write_all(format!("\0AUTH EXTERNAL {}\r\n", hex::encode(uid)).as_bytes())
        .map_err(io)?;
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(io)?;
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "D-Bus authentication: {}",
            String::from_utf8_lossy(&line).trim()
        ));
    }
    let mut out = b"BEGIN\r\n".to_vec();
    out.extend(message(
        1,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "Hello",
    ));
    out.extend(message(2, dest, path, iface, member));
    s.write_all(&out).map_err(io)?;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head).map_err(io)?;
        if head[0] != b'l' {
            return Err("D-Bus: a big-endian message".into());
        }
        let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap()) as usize;
        let (body_len, fields_len) = (word(4), word(12));
        let rest = (16 + fields_len).div_ceil(8) * 8 - 16 + body_len;
        let mut buf = vec![0u8; rest];
        s.read_exact(&mut buf).map_err(io)?;
        let (reply, error) = parse_fields(&buf[..fields_len])?;
        if reply != Some(2) {
            continue; // Hello's answer, NameAcquired
        }
        return match head[1] {
            METHOD_RETURN => Ok(()),
            ERROR => Err(format!("D-Bus {member}: {}", error.unwrap_or_default())),
            t => Err(format!("D-Bus {member}: a reply of type {t}")),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_is_aligned_and_its_fields_read_back() {
        let m = message(
            7,
            "org.freedesktop.network1",
            "/org/freedesktop/network1",
            "x.y",
            "Reload",
        );
        assert_eq!(m.len() % 8, 0);
        assert_eq!(&m[..4], &[b'l', METHOD_CALL, 0, 1]);
        assert_eq!(u32::from_le_bytes(m[8..12].try_into().unwrap()), 7);
        let fields_len = u32::from_le_bytes(m[12..16].try_into().unwrap()) as usize;
        assert!(m.windows(6).any(|w| w == b"Reload"));
        // Our own fields have no reply serial or error name.
        assert_eq!(parse_fields(&m[16..16 + fields_len]).unwrap(), (None, None));
        // A reply's: REPLY_SERIAL (u) and ERROR_NAME (s), then a signature (g).
        let mut f = vec![FIELD_REPLY_SERIAL, 1, b'u', 0, 2, 0, 0, 0];
        f.extend_from_slice(&[FIELD_ERROR_NAME, 1, b's', 0, 3, 0, 0, 0, b'e', b'r', b'r', 0]);
        pad(&mut f, 8);
        f.extend_from_slice(&[8, 1, b'g', 0, 1, b's', 0]);
        assert_eq!(parse_fields(&f).unwrap(), (Some(2), Some("err".into())));
    }
}
