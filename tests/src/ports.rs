//! Free loopback ports, for children that must be told their addresses
//! before they start.
//!
//! A port is checked by binding it and released before the child binds
//! it, so in between another socket may take it. Ports are therefore taken
//! from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`):
//! a port of that range can go to any outgoing connection or `:0` listener
//! of a parallel test meanwhile, while one below it goes only to an
//! explicit bind. The callers that start children still retry with fresh
//! ports when a child cannot bind its own.
//!
//! The proxy's and the control plane's tests include this file by path
//! (they cannot depend on this crate, which depends on both): it uses
//! nothing but std, and its tests are in `ports_tests`, so that they run
//! once.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out: clear of the well-known and most
/// registered ones.
pub const LOWEST: u16 = 10_000;

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    free_addrs(1)[0]
}

/// `n` distinct loopback addresses whose ports were free a moment ago (all
/// held until all are found, so they differ from each other), below the
/// ephemeral range.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let (low, high) = (LOWEST, ephemeral_start().max(LOWEST + 1_000));
    let span = u32::from(high - low);
    // Each port looked at is taken from one count of the process, so that
    // no two searches of a process (its threads' tests) look at the same
    // port, however they interleave; each process counts from its own
    // point, so that test binaries seldom do.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let mut held = Vec::with_capacity(n);
    for _ in 0..span {
        let at = NEXT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(process_seed());
        let port = low + (at % span) as u16;
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push(listener);
            if held.len() == n {
                return held
                    .iter()
                    .map(|l| l.local_addr().expect("a bound listener has an address"))
                    .collect();
            }
        }
    }
    panic!("fewer than {n} free loopback ports between {low} and {high}");
}

/// `preferred` if it can be bound now, otherwise a free port.
pub fn preferred_or_free(preferred: SocketAddr) -> SocketAddr {
    match TcpListener::bind(preferred) {
        Ok(listener) => listener.local_addr().unwrap_or(preferred),
        Err(_) => free_addr(),
    }
}

/// Whether a child's log says it could not bind an address.
pub fn log_says_address_in_use(log: &str) -> bool {
    let log = log.to_ascii_lowercase();
    log.contains("address already in use")
        || log.contains("addrinuse")
        || log.contains("os error 98")
}

/// The first port of the kernel's ephemeral range (32768 where it cannot
/// be read).
pub fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A number of this process's own, the same for each of its searches.
fn process_seed() -> u32 {
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        // Spread, so that processes started close together differ by more
        // than the few ports each takes.
        (std::process::id() ^ nanos).wrapping_mul(2_654_435_761)
    })
}
