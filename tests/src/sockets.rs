//! The TCP connections a child process holds, as the kernel sees them:
//! each one's addresses from `/proc/<pid>/net/tcp`, and the socket itself,
//! a copy of the process's descriptor taken with `pidfd_getfd`, so a test
//! reads the options a running sidecar set on its connections, including
//! those `ss` does not show (`TCP_USER_TIMEOUT`). It only reads: nothing
//! is set on, or sent through, a socket it copies.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::Context;
use rustix::net::sockopt;
use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};

/// One established IPv4 TCP connection of a process.
#[derive(Debug)]
pub struct HeldSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The process's socket, shared: the same kernel object, not a new
    /// connection.
    socket: OwnedFd,
}

impl HeldSocket {
    /// `TCP_USER_TIMEOUT`: how long data may go unacknowledged before the
    /// kernel resets the connection; `None` when unset (the kernel's
    /// retransmission gives up instead, after about 15 minutes).
    pub fn user_timeout(&self) -> rustix::io::Result<Option<Duration>> {
        let millis = sockopt::tcp_user_timeout(&self.socket)?;
        Ok((millis > 0).then(|| Duration::from_millis(millis.into())))
    }

    /// Whether the connection sends keepalive probes.
    pub fn keepalive(&self) -> rustix::io::Result<bool> {
        sockopt::socket_keepalive(&self.socket)
    }
}

/// Why this process may not read another's sockets here (a kernel before
/// 5.6, or no right to trace `pid`), for [`crate::machine::skip`]; `None`
/// when it may.
pub fn unreadable(pid: u32) -> Option<String> {
    match open(pid).and_then(|pidfd| pidfd_getfd(&pidfd, 0, PidfdGetfdFlags::empty())) {
        Ok(_) => None,
        Err(rustix::io::Errno::PERM | rustix::io::Errno::ACCESS) => {
            Some("skipped: needs root (or the right to trace the sidecar)".into())
        }
        Err(rustix::io::Errno::NOSYS) => Some("skipped: the kernel has no pidfd_getfd".into()),
        // Its stdin may be closed: the call itself works.
        Err(_) => None,
    }
}

fn open(pid: u32) -> rustix::io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or(rustix::io::Errno::SRCH)?;
    pidfd_open(pid, PidfdFlags::empty())
}

/// The established IPv4 TCP connections process `pid` holds.
pub fn established(pid: u32) -> anyhow::Result<Vec<HeldSocket>> {
    // `01`: TCP_ESTABLISHED.
    let connections = in_state(pid, "01")?;
    let pidfd = open(pid).context("pidfd_open")?;
    let mut held = Vec::new();
    for (fd, (local, remote)) in descriptors(pid, &connections)? {
        let Ok(socket) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        held.push(HeldSocket {
            local,
            remote,
            socket,
        });
    }
    Ok(held)
}

/// The IPv4 addresses process `pid` itself listens on (not another process
/// of its network namespace). Needs no privilege for one's own children:
/// it reads `/proc`, and copies no descriptor.
pub fn listening(pid: u32) -> anyhow::Result<Vec<SocketAddr>> {
    // `0A`: TCP_LISTEN.
    let listeners = in_state(pid, "0A")?;
    Ok(descriptors(pid, &listeners)?
        .into_iter()
        .map(|(_, (local, _))| local)
        .collect())
}

/// Socket inode -> (local, remote) of each IPv4 TCP socket of `pid`'s
/// network namespace in `state` (`/proc/net/tcp`'s hex state).
fn in_state(
    pid: u32,
    state: &str,
) -> anyhow::Result<std::collections::HashMap<String, (SocketAddr, SocketAddr)>> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))?;
    let mut sockets = std::collections::HashMap::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, local, remote, st, _, _, _, _, _, inode, ..] = fields[..] else {
            continue;
        };
        if st == state {
            sockets.insert(inode.to_string(), (address(local)?, address(remote)?));
        }
    }
    Ok(sockets)
}

/// Those of `sockets` that `pid` holds a descriptor of, with the
/// descriptor's number.
fn descriptors(
    pid: u32,
    sockets: &std::collections::HashMap<String, (SocketAddr, SocketAddr)>,
) -> anyhow::Result<Vec<(i32, (SocketAddr, SocketAddr))>> {
    let mut held = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        // A descriptor closed since the listing is no longer there.
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
        else {
            continue;
        };
        let Some(&addrs) = sockets.get(inode) else {
            continue;
        };
        let Ok(fd) = entry.file_name().to_string_lossy().parse() else {
            continue;
        };
        held.push((fd, addrs));
    }
    Ok(held)
}

/// An address of `/proc/net/tcp`: the IPv4 address as a number in the
/// host's byte order, then the port, both in hex (`0100007F:1F90`).
fn address(hex: &str) -> anyhow::Result<SocketAddr> {
    let (ip, port) = hex
        .split_once(':')
        .with_context(|| format!("not an address: {hex}"))?;
    let ip = u32::from_str_radix(ip, 16)?;
    let port = u16::from_str_radix(port, 16)?;
    let ip = Ipv4Addr::from(ip.to_ne_bytes());
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener of this process is found, and is not counted as another
    /// process's (a child's, in the same network namespace).
    #[test]
    fn finds_its_own_listener_and_not_another_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mine = listener.local_addr().unwrap();
        let mut other = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let theirs = listening(other.id());
        let _ = other.kill();
        let _ = other.wait();
        let ours = listening(std::process::id()).unwrap();
        assert!(ours.contains(&mine), "{mine} not in {ours:?}");
        let theirs = theirs.unwrap();
        assert!(!theirs.contains(&mine), "{mine} in {theirs:?}");
    }

    /// This process's own connection is found, with its addresses and the
    /// options set on it.
    #[test]
    fn finds_a_connection_and_reads_its_options() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        sockopt::set_tcp_user_timeout(&client, 42_000).unwrap();
        let pid = std::process::id();
        if let Some(skipped) = unreadable(pid) {
            crate::machine::skip(&skipped);
            return;
        }
        let held = established(pid).unwrap();
        let found = |local| held.iter().find(|s| s.local == local).unwrap();
        let dialled = found(client.local_addr().unwrap());
        assert_eq!(dialled.remote, listener.local_addr().unwrap());
        assert_eq!(
            dialled.user_timeout().unwrap(),
            Some(Duration::from_secs(42))
        );
        assert_eq!(
            found(accepted.local_addr().unwrap())
                .user_timeout()
                .unwrap(),
            None
        );
    }
}
