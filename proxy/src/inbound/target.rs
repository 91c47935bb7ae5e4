//! Where a connection to the inbound port goes, decided from its original
//! destination and the proxy's own ports and addresses alone: no socket, no
//! I/O, so every case is a unit test (the listener that acts on it needs
//! iptables).
//!
//! A connection iptables redirected here goes to the address and port its
//! caller dialled, so the app is reached exactly where it would be without
//! the mesh: a listener the app bound to loopback only stays out of reach,
//! as it is for every other pod, and one bound to the pod's address or to
//! every address is reached over the family the caller used. The sidecar
//! is exempt from interception, so this never dials anything but an
//! address of this pod; a destination that is not one (loopback, another
//! host: only a forged packet carries one) is refused, as is one of the
//! proxy's own ports (a loop).

use std::net::{IpAddr, SocketAddr};

/// A redirected connection whose original port is one of the proxy's own.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("inbound connection must not target the proxy's own port {0}")]
pub struct Loop(pub u16);

/// Why a redirected connection is refused before its handshake: where it
/// was going is no app of this pod's.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum Misdirected {
    #[error(transparent)]
    Loop(#[from] Loop),
    /// Loopback, or an address that is not this pod's: nothing a caller
    /// outside the pod reaches without the mesh.
    #[error("inbound connection must target an address of this pod, not {0}")]
    NotThisPod(IpAddr),
}

impl Misdirected {
    /// The outcome it is counted as in `trellis_connections_total`.
    pub(super) fn outcome(&self) -> crate::metrics::Outcome {
        match self {
            Misdirected::Loop(_) => crate::metrics::Outcome::Loop,
            Misdirected::NotThisPod(_) => crate::metrics::Outcome::Misdirected,
        }
    }
}

/// Where a connection iptables redirected here from `dst` goes: `dst`
/// itself, when it is an address of this pod (one it advertises,
/// `pod_ips`, or the one the connection arrived on, `arrived_on`, where the
/// redirect delivered it) and not one of the proxy's `own_ports`.
pub(super) fn redirected_to(
    dst: SocketAddr,
    arrived_on: Option<IpAddr>,
    own_ports: &[u16],
    pod_ips: &[IpAddr],
) -> Result<SocketAddr, Misdirected> {
    if own_ports.contains(&dst.port()) {
        return Err(Loop(dst.port()).into());
    }
    let ip = dst.ip().to_canonical();
    let of_this_pod = !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && (pod_ips.contains(&ip) || arrived_on.is_some_and(|a| a.to_canonical() == ip));
    if !of_this_pod {
        return Err(Misdirected::NotThisPod(ip));
    }
    // Built anew: the caller's IPv6 scope and flow label are not kept.
    Ok(SocketAddr::new(ip, dst.port()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

    use super::*;

    const POD_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    const POD_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 3));
    const OWN_PORTS: [u16; 2] = [15001, 15020];

    fn addr(ip: IpAddr, port: u16) -> SocketAddr {
        SocketAddr::new(ip, port)
    }

    fn to(dst: SocketAddr, arrived_on: IpAddr) -> Result<SocketAddr, Misdirected> {
        redirected_to(dst, Some(arrived_on), &OWN_PORTS, &[POD_V4, POD_V6])
    }

    #[test]
    fn a_redirected_connection_goes_to_the_pod_address_and_port_it_was_for() {
        assert_eq!(to(addr(POD_V4, 5432), POD_V4), Ok(addr(POD_V4, 5432)));
        assert_eq!(to(addr(POD_V6, 8080), POD_V6), Ok(addr(POD_V6, 8080)));
    }

    #[test]
    fn a_connection_over_ipv6_stays_on_ipv6() {
        // The redirect may deliver it on another address of the interface
        // (a link-local one): the app is dialled where the caller meant.
        let link_local: IpAddr = "fe80::1".parse().unwrap();
        assert_eq!(to(addr(POD_V6, 8080), link_local), Ok(addr(POD_V6, 8080)));
    }

    #[test]
    fn the_address_it_arrived_on_is_this_pods_without_advertised_ones() {
        let dst = addr(POD_V4, 8080);
        assert_eq!(
            redirected_to(dst, Some(POD_V4), &OWN_PORTS, &[]),
            Ok(dst),
            "an address of the pod that the sidecar does not advertise"
        );
        let other: IpAddr = Ipv4Addr::new(10, 1, 2, 4).into();
        assert_eq!(
            redirected_to(dst, Some(other), &OWN_PORTS, &[]),
            Err(Misdirected::NotThisPod(POD_V4))
        );
    }

    #[test]
    fn loopback_is_never_dialled_for_a_caller() {
        for lo in [
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
        ] {
            let refused = to(addr(lo, 8200), lo);
            assert_eq!(
                refused,
                Err(Misdirected::NotThisPod(lo.to_canonical())),
                "{lo}"
            );
            assert_eq!(refused.unwrap_err().outcome().token(), "misdirected");
        }
    }

    #[test]
    fn an_address_of_another_host_is_refused() {
        let elsewhere: IpAddr = Ipv4Addr::new(10, 9, 9, 9).into();
        assert_eq!(
            to(addr(elsewhere, 443), POD_V4),
            Err(Misdirected::NotThisPod(elsewhere))
        );
        let unspecified: IpAddr = Ipv6Addr::UNSPECIFIED.into();
        assert_eq!(
            to(addr(unspecified, 80), unspecified),
            Err(Misdirected::NotThisPod(unspecified))
        );
    }

    #[test]
    fn the_proxys_own_ports_are_a_loop() {
        let refused = to(addr(POD_V4, 15001), POD_V4).unwrap_err();
        assert_eq!(refused, Misdirected::Loop(Loop(15001)));
        assert_eq!(refused.outcome().token(), "loop");
        assert!(refused.to_string().contains("own port 15001"), "{refused}");
    }

    #[test]
    fn an_ipv4_mapped_destination_is_dialled_as_ipv4() {
        let mapped = match POD_V4 {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            IpAddr::V6(_) => unreachable!(),
        };
        assert_eq!(to(addr(mapped, 8080), mapped), Ok(addr(POD_V4, 8080)));
    }

    #[test]
    fn the_callers_ipv6_scope_is_not_kept() {
        let dst = SocketAddr::V6(SocketAddrV6::new("fd00::3".parse().unwrap(), 80, 7, 3));
        let SocketAddr::V6(dialled) = to(dst, POD_V6).unwrap() else {
            panic!("not IPv6");
        };
        assert_eq!((dialled.flowinfo(), dialled.scope_id()), (0, 0));
    }
}
