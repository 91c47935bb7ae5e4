//! Free loopback ports. A port is found by binding 127.0.0.1:0 and released
//! before a child binds it, so another process may take it in between: the
//! callers that start children retry with fresh ports when that happens.

use std::net::{SocketAddr, TcpListener};

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot bind any loopback port")
}

/// `n` distinct free loopback addresses (all reserved at once, so they
/// differ from each other).
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind any loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound listener has an address"))
        .collect()
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
