//! The listener addresses of `--inbound` and `--outbound` (both IP
//! families by default) and the addresses `--advertise-address` reports.
//!
//! Parsing only: nothing here binds a socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use trellis_core::policy::{SIDECAR_INBOUND_PORT, SIDECAR_OUTBOUND_PORT};

use super::{InvalidFlag, addr, invalid};

/// One address a listener binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// The IPv6 half of a default pair: where the namespace has no IPv6 it
    /// is left out (and logged) instead of failing start-up. Addresses
    /// named by a flag are never optional.
    pub optional: bool,
}

/// The inbound listeners when `--inbound` is not given.
pub const DEFAULT_INBOUND: [Listen; 2] = [
    Listen {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), SIDECAR_INBOUND_PORT),
        optional: false,
    },
    Listen {
        addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), SIDECAR_INBOUND_PORT),
        optional: true,
    },
];

/// The transparent outbound listeners when `--outbound` is not given:
/// iptables redirects an app's IPv4 connections to 127.0.0.1 and its IPv6
/// ones to ::1.
pub const DEFAULT_OUTBOUND: [Listen; 2] = [
    Listen {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), SIDECAR_OUTBOUND_PORT),
        optional: false,
    },
    Listen {
        addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), SIDECAR_OUTBOUND_PORT),
        optional: true,
    },
];

/// The addresses a repeatable listener flag names, or `default` when it is
/// not given. Each address is bound once.
pub(super) fn listens(
    flag: &'static str,
    given: &[String],
    default: &[Listen],
) -> Result<Vec<Listen>, InvalidFlag> {
    if given.is_empty() {
        return Ok(default.to_vec());
    }
    let mut out: Vec<Listen> = Vec::with_capacity(given.len());
    for s in given {
        let addr = addr(flag, s.trim())?;
        if out.iter().any(|l| l.addr == addr) {
            return Err(invalid(flag, format_args!("{addr} is given twice")));
        }
        out.push(Listen {
            addr,
            optional: false,
        });
    }
    Ok(out)
}

/// The addresses to report to the control plane: those of
/// `--advertise-address` (a bare IP gets the port of the first inbound
/// address), or by default the inbound ones.
pub(super) fn advertise(
    given: &[String],
    inbound: &[Listen],
) -> Result<Vec<SocketAddr>, InvalidFlag> {
    if given.is_empty() {
        return Ok(default_advertise(inbound));
    }
    let mut out = Vec::with_capacity(given.len());
    for a in given {
        let a = a.trim();
        // A bare IP, as Kubernetes gives the pod's (status.podIPs).
        let a = match a.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, inbound[0].addr.port()),
            Err(_) => addr("advertise-address", a)?,
        };
        if a.ip().is_unspecified() || a.port() == 0 {
            return Err(invalid(
                "advertise-address",
                format_args!("{a} is not an address peers can dial"),
            ));
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// The inbound addresses that are always bound, an unspecified one as the
/// loopback address of its family. The optional IPv6 default is left out:
/// it may not exist.
fn default_advertise(inbound: &[Listen]) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(inbound.len());
    for listen in inbound.iter().filter(|l| !l.optional) {
        let addr = match listen.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.addr.port())
            }
            _ => listen.addr,
        };
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::args;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn advertises_loopback_for_unspecified_inbound() {
        let c = args(&[]).unwrap();
        assert_eq!(c.advertise_addresses, addrs(&["127.0.0.1:15006"]));
        let c = args(&["--inbound", "10.1.2.3:7000"]).unwrap();
        assert_eq!(c.advertise_addresses, addrs(&["10.1.2.3:7000"]));
        let c = args(&["--inbound", "0.0.0.0:7000", "--inbound", "[::]:7000"]).unwrap();
        assert_eq!(
            c.advertise_addresses,
            addrs(&["127.0.0.1:7000", "[::1]:7000"])
        );
    }

    #[test]
    fn listens_on_both_families_by_default_ipv6_where_available() {
        let c = args(&[]).unwrap();
        assert_eq!(c.inbound, DEFAULT_INBOUND);
        assert_eq!(c.outbound, DEFAULT_OUTBOUND);
        let optional: Vec<bool> = c.outbound.iter().map(|l| l.optional).collect();
        assert_eq!(optional, [false, true]);
        assert!(c.outbound[1].addr.is_ipv6());
    }

    #[test]
    fn listener_flags_bind_exactly_what_they_name() {
        let c = args(&["--inbound", "0.0.0.0:7000", "--outbound", "[::1]:7001"]).unwrap();
        let bound = |l: &[Listen]| -> Vec<(SocketAddr, bool)> {
            l.iter().map(|l| (l.addr, l.optional)).collect()
        };
        assert_eq!(
            bound(&c.inbound),
            [("0.0.0.0:7000".parse().unwrap(), false)]
        );
        assert_eq!(bound(&c.outbound), [("[::1]:7001".parse().unwrap(), false)]);
        // A list, as the environment twin gives it.
        let c = args(&["--outbound", "127.0.0.1:7001,[::1]:7001"]).unwrap();
        assert_eq!(
            bound(&c.outbound),
            [
                ("127.0.0.1:7001".parse().unwrap(), false),
                ("[::1]:7001".parse().unwrap(), false)
            ]
        );
        let c = args(&[
            "--advertise-address",
            "10.0.0.1:15006",
            "--advertise-address",
            "[fd00::1]:15006",
        ])
        .unwrap();
        assert_eq!(
            c.advertise_addresses,
            addrs(&["10.0.0.1:15006", "[fd00::1]:15006"])
        );
        // Bare IPs, as Kubernetes lists a pod's: the inbound port is added.
        let c = args(&[
            "--inbound",
            "0.0.0.0:7000",
            "--advertise-address",
            "10.0.0.1,fd00::1",
        ])
        .unwrap();
        assert_eq!(
            c.advertise_addresses,
            addrs(&["10.0.0.1:7000", "[fd00::1]:7000"])
        );
    }

    #[test]
    fn names_the_bad_listener_flag() {
        let twice = args(&["--inbound", "0.0.0.0:1,0.0.0.0:1"]).unwrap_err();
        assert_eq!(twice.flag, "inbound");
        assert!(twice.reason.contains("twice"), "{twice}");
        let bad = args(&["--outbound", "127.0.0.1:1,nope"]).unwrap_err();
        assert_eq!(bad.flag, "outbound");
        assert!(bad.reason.contains("\"nope\""), "{bad}");
        let unspecified = args(&["--advertise-address", "[::]:15006"]).unwrap_err();
        assert_eq!(unspecified.flag, "advertise-address");
    }
}
