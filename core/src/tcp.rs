//! The sidecar's TCP timers on connections beyond the pod: keepalive
//! probes, and `TCP_USER_TIMEOUT` with the range it may be set to; and the
//! ports its `--opaque-ports` lists. Shared because the sidecar's
//! `--tcp-user-timeout` and `--opaque-ports` and the injector's
//! `trellis.io/tcp-user-timeout` and `trellis.io/opaque-ports` annotations
//! take the same values.
//!
//! On Linux the two are tied: once `TCP_USER_TIMEOUT` is set, keepalive no
//! longer gives up after [`KEEPALIVE_PROBES`] unanswered probes, but on its
//! first probe after the user timeout has passed with a probe unanswered
//! (tcp(7)). So the user timeout also decides when a silent, idle peer is
//! given up on: a longer one keeps probing it longer, and one of
//! [`KEEPALIVE_IDLE`] plus one [`KEEPALIVE_INTERVAL`] or less would reset a
//! healthy idle connection whose one probe was lost. Hence
//! [`MIN_USER_TIMEOUT`].

use std::time::Duration;

/// How long a connection may carry nothing before the kernel probes its
/// peer with TCP keepalives. A peer whose node vanished sends no FIN or
/// RST: without probes its connection, with its task, TLS state, buffers
/// and app connection, would stay open for ever. A minute of silence costs
/// an idle connection one probe a minute.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// How long the kernel waits between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How many probes may go unanswered before the kernel resets the
/// connection (without a user timeout): a vanished peer is found two
/// minutes after it fell silent.
pub const KEEPALIVE_PROBES: u32 = 6;

/// The default `TCP_USER_TIMEOUT`: how long data a mesh connection sent
/// may go unacknowledged before the kernel resets it, as long as keepalive
/// takes to give up on a silent peer, two minutes.
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(
    KEEPALIVE_IDLE.as_secs() + KEEPALIVE_INTERVAL.as_secs() * KEEPALIVE_PROBES as u64,
);
/// The shortest user timeout accepted (80 s): keepalive's first probe and
/// two intervals, so an idle connection survives one lost probe (see the
/// module docs).
pub const MIN_USER_TIMEOUT: Duration =
    Duration::from_secs(KEEPALIVE_IDLE.as_secs() + 2 * KEEPALIVE_INTERVAL.as_secs());
/// The longest user timeout accepted (one hour). A vanished peer, idle or
/// not, holds its connection that long; a workload whose peers stall for
/// longer is better served with the user timeout off.
pub const MAX_USER_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reads a user timeout as the sidecar's `--tcp-user-timeout`, the
/// injector's `trellis.io/tcp-user-timeout` annotation and its settings
/// take it: a duration ([`crate::duration::parse`]) such as `120s`, `5m`
/// or `1h` from [`MIN_USER_TIMEOUT`] to [`MAX_USER_TIMEOUT`], or `0` for
/// none (`None`).
/// The error quotes the value and says what is wrong with it, to follow
/// the name of the flag or annotation it was given as.
pub fn parse_user_timeout(value: &str) -> Result<Option<Duration>, String> {
    let value = value.trim();
    let timeout = crate::duration::parse(value)?;
    check_user_timeout(timeout).map_err(|e| format!("{value:?} {e}"))
}

/// Reads one port of a comma-separated list as the sidecar's
/// `--opaque-ports` and the injector's `trellis.io/opaque-ports` annotation
/// take it: a number from 1 to 65535, spaces around it ignored. A range
/// (`3306-3310`) is not one: each port is listed. The error quotes the
/// item and says what is wrong with it, to follow the name of the flag or
/// annotation it was given as.
pub fn parse_port(item: &str) -> Result<u16, String> {
    let item = item.trim();
    item.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
        let range = item
            .split_once('-')
            .is_some_and(|(low, high)| low.parse::<u16>().is_ok() && high.parse::<u16>().is_ok());
        if range {
            format!("{item:?} is not a port (1-65535): ranges are not taken, list each port")
        } else {
            format!("{item:?} is not a port (1-65535)")
        }
    })
}

/// Checks a user timeout: from [`MIN_USER_TIMEOUT`] to
/// [`MAX_USER_TIMEOUT`], or zero for none (`None`); the error says what is
/// wrong, to follow the value.
fn check_user_timeout(timeout: Duration) -> Result<Option<Duration>, &'static str> {
    if timeout.is_zero() {
        return Ok(None);
    }
    if !(MIN_USER_TIMEOUT..=MAX_USER_TIMEOUT).contains(&timeout) {
        return Err(
            "is out of range: 0 (off) or 80s to 1h (below 80s keepalive would reset an idle \
             connection on one lost probe)",
        );
    }
    Ok(Some(timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_keepalives_give_up_time() {
        assert_eq!(DEFAULT_USER_TIMEOUT, Duration::from_secs(120));
        assert_eq!(MIN_USER_TIMEOUT, Duration::from_secs(80));
        assert_eq!(MAX_USER_TIMEOUT, Duration::from_secs(3600));
        assert_eq!(
            check_user_timeout(DEFAULT_USER_TIMEOUT),
            Ok(Some(DEFAULT_USER_TIMEOUT))
        );
    }

    #[test]
    fn a_port_is_1_to_65535() {
        assert_eq!(parse_port("5432"), Ok(5432));
        assert_eq!(parse_port(" 65535 "), Ok(65535));
        assert_eq!(parse_port("1"), Ok(1));
        for (bad, says) in [
            ("0", "\"0\" is not a port (1-65535)"),
            ("65536", "\"65536\" is not a port (1-65535)"),
            ("", "\"\" is not a port (1-65535)"),
            ("mysql", "\"mysql\" is not a port (1-65535)"),
            (
                "3306-3310",
                "\"3306-3310\" is not a port (1-65535): ranges are not taken, list each port",
            ),
        ] {
            assert_eq!(parse_port(bad).unwrap_err(), says, "{bad:?}");
        }
    }

    #[test]
    fn zero_is_none_and_the_range_is_inclusive() {
        assert_eq!(check_user_timeout(Duration::ZERO), Ok(None));
        for ok in [MIN_USER_TIMEOUT, MAX_USER_TIMEOUT] {
            assert_eq!(check_user_timeout(ok), Ok(Some(ok)));
        }
        for bad in [
            Duration::from_millis(1),
            MIN_USER_TIMEOUT - Duration::from_millis(1),
            MAX_USER_TIMEOUT + Duration::from_millis(1),
        ] {
            let e = check_user_timeout(bad).unwrap_err();
            assert!(
                e.starts_with("is out of range: 0 (off) or 80s to 1h"),
                "{bad:?}: {e}"
            );
        }
    }
}
