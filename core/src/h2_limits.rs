//! How many HTTP/2 connections the sidecar's inbound port serves at once,
//! from one peer and from all together: the defaults and the range either
//! limit may be set to. Shared because the sidecar's
//! `--max-h2-connections-per-peer` and `--max-h2-connections` and the
//! injector's `trellis.io/max-h2-connections-per-peer` and
//! `trellis.io/max-h2-connections` annotations and settings take the same
//! values.
//!
//! Each connection may hold about 13 MiB of answers its caller does not
//! read. The maxima only keep a slip of the keyboard (`80000` for `8000`)
//! from lifting a limit altogether: a sidecar near them needs far more
//! memory than its default 256 MiB limit.

/// The default of `--max-h2-connections-per-peer`: about 100 MiB of unread
/// answers from one peer at most, and more than a client's HTTP/2 pool
/// usually opens to one server.
pub const DEFAULT_PER_PEER: usize = 8;
/// The default of `--max-h2-connections`: a connection from each pod of a
/// large client workload, with room to spare.
pub const DEFAULT_TOTAL: usize = 1024;
/// The most `--max-h2-connections-per-peer` may be: a pool of a thousand
/// channels to one pod.
pub const MAX_PER_PEER: usize = 1024;
/// The most `--max-h2-connections` may be.
pub const MAX_TOTAL: usize = 65536;

/// Reads a per-peer limit as the sidecar's `--max-h2-connections-per-peer`,
/// the injector's annotation and its settings take it: a whole number from
/// 1 to [`MAX_PER_PEER`]. The error quotes the value and says what is
/// wrong with it, to follow the name of the flag or annotation.
pub fn parse_per_peer(value: &str) -> Result<usize, String> {
    parse(value, MAX_PER_PEER)
}

/// Reads a total limit as the sidecar's `--max-h2-connections`, the
/// injector's annotation and its settings take it: a whole number from 1
/// to [`MAX_TOTAL`]. The error is as [`parse_per_peer`]'s.
pub fn parse_total(value: &str) -> Result<usize, String> {
    parse(value, MAX_TOTAL)
}

fn parse(value: &str, max: usize) -> Result<usize, String> {
    let parsed = value.trim().parse::<i64>().ok();
    parsed
        .and_then(|limit| check(limit, max).ok())
        .ok_or_else(|| format!("{value:?} {}", not_a_limit(max)))
}

/// Checks a limit already read as a number (the injector's settings):
/// from 1 to `max`; the error says what is wrong, to follow the field.
pub fn check(limit: i64, max: usize) -> Result<usize, String> {
    usize::try_from(limit)
        .ok()
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| format!("{limit} {}", not_a_limit(max)))
}

/// What a value outside 1..=`max` is told, after the value.
fn not_a_limit(max: usize) -> String {
    format!("is not a number of connections from 1 to {max}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_a_whole_number_from_1_to_its_maximum() {
        assert_eq!(parse_per_peer("8"), Ok(DEFAULT_PER_PEER));
        assert_eq!(parse_per_peer(" 1024 "), Ok(MAX_PER_PEER));
        assert_eq!(parse_total("1"), Ok(1));
        assert_eq!(parse_total("65536"), Ok(MAX_TOTAL));
        for (bad, max) in [
            ("0", 1024),
            ("1025", 1024),
            ("-1", 1024),
            ("many", 1024),
            ("", 1024),
        ] {
            assert_eq!(
                parse_per_peer(bad),
                Err(format!(
                    "{bad:?} is not a number of connections from 1 to {max}"
                ))
            );
        }
        for bad in ["0", "65537", "1e3", "8.5"] {
            assert_eq!(
                parse_total(bad),
                Err(format!(
                    "{bad:?} is not a number of connections from 1 to 65536"
                ))
            );
        }
        assert_eq!(check(32, MAX_PER_PEER), Ok(32));
        assert_eq!(
            check(0, MAX_TOTAL),
            Err("0 is not a number of connections from 1 to 65536".to_owned())
        );
    }
}
