//! The free-port search's tests (see `ports`, which other crates' tests
//! include by path).

use std::net::{SocketAddr, TcpListener};

use crate::ports::*;

#[test]
fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
    let ephemeral = ephemeral_start();
    let addrs = free_addrs(5);
    let mut ports: Vec<u16> = addrs.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 5, "{addrs:?}");
    for addr in &addrs {
        assert!(addr.ip().is_loopback(), "{addr}");
        assert!(
            (LOWEST..ephemeral.max(LOWEST + 1_000)).contains(&addr.port()),
            "{addr} is not between {LOWEST} and the ephemeral range ({ephemeral})"
        );
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    }
    // The next search looks further along, not at the same ports.
    let next = free_addr();
    assert!(!addrs.contains(&next), "{next} handed out twice");
}

#[test]
fn a_port_in_use_is_passed_over() {
    let taken = free_addr();
    let _holder = TcpListener::bind(taken).unwrap();
    assert_ne!(preferred_or_free(taken), taken);
    let free = free_addr();
    assert_eq!(preferred_or_free(free), free);
}
