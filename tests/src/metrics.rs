//! A reader for the Prometheus text format the admin endpoints serve, just
//! enough to look values up by name and labels.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scraped `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the Prometheus (or OpenMetrics) text format; lines that do not
    /// parse are skipped.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics { samples }
    }

    /// The value of the sample called `name` whose labels include all of
    /// `labels`; the sum if several match; `None` if none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && has_labels(s, labels))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`Metrics::get`] but 0 when absent (a counter not yet incremented
    /// may not be exported at all).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum of every sample whose name contains all of `fragments`, e.g.
    /// `["handshake", "fail"]`.
    pub fn sum_where_name_contains(&self, fragments: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|s| fragments.iter().all(|f| s.name.contains(f)))
            .map(|s| s.value)
            .sum()
    }

    /// The distinct sample names, for error messages.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.samples.iter().map(|s| s.name.as_str()).collect();
        names.dedup();
        names
    }
}

fn has_labels(sample: &Sample, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, rest) = if let Some(inner) = rest.strip_prefix('{') {
        let end = closing_brace(inner)?;
        (parse_labels(&inner[..end])?, &inner[end + 1..])
    } else {
        (BTreeMap::new(), rest)
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The index of the `}` that closes a label set, skipping quoted values.
fn closing_brace(s: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key, value);
        rest = after[end? + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let text = "# HELP x help\n# TYPE x counter\n\
                    trellis_handshake_failures_total{side=\"inbound\",reason=\"no_client_certificate\"} 3\n\
                    trellis_handshake_failures_total{side=\"inbound\",reason=\"a,b}\\\"c\"} 2\n\
                    trellis_cert_expiry_seconds 1.7e9\n";
        let m = Metrics::parse(text);
        assert_eq!(m.get("trellis_handshake_failures_total", &[]), Some(5.0));
        assert_eq!(
            m.get(
                "trellis_handshake_failures_total",
                &[("reason", "no_client_certificate")]
            ),
            Some(3.0)
        );
        assert_eq!(
            m.get("trellis_handshake_failures_total", &[("reason", "a,b}\"c")]),
            Some(2.0)
        );
        assert_eq!(m.get("trellis_cert_expiry_seconds", &[]), Some(1.7e9));
        assert_eq!(m.sum_where_name_contains(&["handshake", "fail"]), 5.0);
        assert_eq!(m.counter("absent_total", &[]), 0.0);
    }
}
