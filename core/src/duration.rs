//! Durations as every Trellis binary reads and says them.
//!
//! Every duration flag of the control plane, the sidecar and `trellisctl`,
//! and every duration annotation and setting of the injector, is read by
//! [`parse`]: `30s`, `10m`, `1h30m`, `24h`, `30d`, `500ms`, or `0`, so a bad
//! one is refused in the same words, naming what was given. Every duration
//! a person reads in a message is said by [`words`] (`1 hour 30 minutes`),
//! or by [`Words`], which writes the same words straight into the message,
//! and every duration one binary writes for another to read (the injector
//! into the sidecar's environment) or a script to read back as a flag
//! value (the sidecar's `/config`) is written by [`flag_value`] (`1h30m`),
//! which [`parse`] reads back exactly.

use std::fmt::{self, Write as _};
use std::time::Duration;

/// A unit [`words`] says, with its length in seconds: the lengths
/// [`parse`] reads (a year of 365.25 days, a month of 30.44), so a
/// duration given in years or months is said back as it was given.
const WORD_UNITS: [(u64, &str); 6] = [
    (31_557_600, "year"),
    (2_630_016, "month"),
    (86_400, "day"),
    (3_600, "hour"),
    (60, "minute"),
    (1, "second"),
];

/// The units below a second [`words`] says, with their length in
/// nanoseconds.
const WORD_SUBSECOND: [(u32, &str); 3] = [
    (1_000_000, "millisecond"),
    (1_000, "microsecond"),
    (1, "nanosecond"),
];

/// Reads a duration as every duration flag, annotation and setting takes
/// it: whole numbers each followed by a unit (`ns`, `us`, `ms`, `s`, `m`,
/// `h`, `d`, `w`, `M` for months, `y`, or their names: `30s`, `10m`,
/// `1h30m`, `2days`), or `0`. The error quotes the value and gives
/// examples, to follow the name of the flag or annotation it was given as.
pub fn parse(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|_| format!("{value:?} is not a duration (such as 30s, 10m, 24h)"))
}

/// A duration in words, as every message says one: `20 years`, `30 days`,
/// `1 hour 30 minutes`, `500 milliseconds`, `0 seconds`. A unit is one
/// [`parse`] reads, so a duration given is said back as it was given.
pub fn words(d: Duration) -> String {
    Words(d).to_string()
}

/// A duration said in words as [`words`] says it, by its `Display`, which
/// writes straight into the message it is part of: for a message built
/// often, such as an answer to a request, or an error's text
/// (`format!("no answer within {}", Words(TIMEOUT))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Words(pub Duration);

impl fmt::Display for Words {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = false;
        for (n, unit) in parts(self.0, &WORD_UNITS, &WORD_SUBSECOND) {
            let space = if said { " " } else { "" };
            let plural = if n == 1 { "" } else { "s" };
            said = true;
            write!(f, "{space}{n} {unit}{plural}")?;
        }
        if !said {
            f.write_str("0 seconds")?;
        }
        Ok(())
    }
}

/// A duration as a flag takes it, for a program or a script to read back
/// with [`parse`], exactly: `2m`, `1h30m`, `90s`, `1s500ms`, `0s`. Hours
/// are the largest unit, as days, months and years are not all of one
/// length everywhere; no spaces, so it is one shell word.
pub fn flag_value(d: Duration) -> String {
    const UNITS: [(u64, &str); 3] = [(3_600, "h"), (60, "m"), (1, "s")];
    const SUBSECOND: [(u32, &str); 3] = [(1_000_000, "ms"), (1_000, "us"), (1, "ns")];
    let mut out = String::new();
    for (n, unit) in parts(d, &UNITS, &SUBSECOND) {
        let _ = write!(out, "{n}{unit}");
    }
    if out.is_empty() {
        out.push_str("0s");
    }
    out
}

/// The parts of `d` that are not zero, each a count and its unit, largest
/// first: whole seconds in `units` (lengths in seconds), then the rest in
/// `subsecond` (lengths in nanoseconds), each unit taking what the larger
/// ones left.
fn parts<'a>(
    d: Duration,
    units: &'a [(u64, &'a str)],
    subsecond: &'a [(u32, &'a str)],
) -> impl Iterator<Item = (u64, &'a str)> + 'a {
    let mut secs = d.as_secs();
    let whole = units.iter().map(move |&(size, unit)| {
        let n = secs / size;
        secs %= size;
        (n, unit)
    });
    let mut nanos = d.subsec_nanos();
    let fraction = subsecond.iter().map(move |&(size, unit)| {
        let n = nanos / size;
        nanos %= size;
        (u64::from(n), unit)
    });
    whole.chain(fraction).filter(|&(n, _)| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_flags_annotations_and_chart_take() {
        for (given, secs) in [
            ("0", 0),
            ("0s", 0),
            ("300s", 300),
            ("5m", 300),
            ("1h30m", 5_400),
            ("1h 30m", 5_400),
            ("24h", 86_400),
            ("720h", 30 * 86_400),
            ("30d", 30 * 86_400),
            ("2days", 2 * 86_400),
            ("1y", 31_557_600),
        ] {
            assert_eq!(parse(given), Ok(Duration::from_secs(secs)), "{given}");
        }
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "abc", "20", "5 minutes ago", "-1s", "1.5"] {
            assert_eq!(
                parse(bad),
                Err(format!("{bad:?} is not a duration (such as 30s, 10m, 24h)")),
                "{bad}"
            );
        }
    }

    #[test]
    fn says_a_duration_in_words_as_it_was_given() {
        for (given, said) in [
            ("20y", "20 years"),
            ("30d", "30 days"),
            ("1month 2d", "1 month 2 days"),
            ("90m", "1 hour 30 minutes"),
            ("1s", "1 second"),
            ("1500ms", "1 second 500 milliseconds"),
            ("0s", "0 seconds"),
        ] {
            let d = parse(given).unwrap();
            assert_eq!(words(d), said, "{given}");
            assert_eq!(format!("within {}", Words(d)), format!("within {said}"));
        }
    }

    #[test]
    fn writes_a_flag_value_that_reads_back_exactly() {
        for (d, written) in [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(5_400), "1h30m"),
            (Duration::from_secs(3_600), "1h"),
            (Duration::from_secs(30 * 86_400), "720h"),
            (Duration::from_millis(1_500), "1s500ms"),
            (Duration::new(1, 1_001), "1s1us1ns"),
        ] {
            assert_eq!(flag_value(d), written, "{d:?}");
            assert_eq!(parse(written), Ok(d), "{written}");
        }
        let longest = Duration::new(u64::MAX, 999_999_999);
        assert_eq!(parse(&flag_value(longest)), Ok(longest));
    }
}
