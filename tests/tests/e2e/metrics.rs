//! The sidecar's and the control plane's `/metrics` against the README's
//! lists of them, as a user checks one against the other: every family a
//! scrape shows is listed, every one listed is in the scrape, on the first
//! scrape as after a call, with each series whose labels are known in
//! advance at 0 before its first count, and their help says what they
//! count.

use std::collections::BTreeSet;

use trellis_proxy::metrics::{
    Directions, HandshakeFailure, INBOUND_REASONS, OUTBOUND_REASONS, Outcome,
};
use trellis_tests::policy::{self, PolicyDoc};
use trellis_tests::{HttpApp, Mesh};

use crate::Pair;
use crate::http::curl;

fn readme() -> anyhow::Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    Ok(std::fs::read_to_string(path)?)
}

/// The lines of the README's table of the sidecar's metrics.
fn readme_table(readme: &str) -> anyhow::Result<Vec<&str>> {
    let table = readme
        .split_once("| Metric | Labels |")
        .map(|(_, after)| after)
        .ok_or_else(|| anyhow::anyhow!("no table of metrics in the README"))?;
    Ok(table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .collect())
}

/// The metric names of the README's table of the sidecar's metrics.
fn readme_sidecar_families(readme: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(readme_table(readme)?
        .into_iter()
        .filter_map(|line| line.split('`').nth(1))
        .map(str::to_string)
        .collect())
}

/// The values the README's table lists for `label` of `metric`: each first
/// word of the list after the label's name, what is in parentheses within
/// it left out.
fn readme_label_values(readme: &str, metric: &str, label: &str) -> anyhow::Result<Vec<String>> {
    let row = readme_table(readme)?
        .into_iter()
        .find(|line| line.starts_with(&format!("| `{metric}`")))
        .ok_or_else(|| anyhow::anyhow!("no {metric} in the table"))?;
    let list = row
        .split_once(&format!("`{label}` ("))
        .map(|(_, after)| after)
        .ok_or_else(|| anyhow::anyhow!("no {label} values in {row}"))?;
    let (mut depth, mut item, mut values) = (0, String::new(), Vec::new());
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => break,
            ')' => depth -= 1,
            ',' if depth == 0 => values.push(std::mem::take(&mut item)),
            _ if depth == 0 => item.push(c),
            _ => {}
        }
    }
    values.push(item);
    Ok(values.iter().map(|v| v.trim().to_string()).collect())
}

/// The README's list of `label` of `metric` is the sidecar's, value for
/// value, both ways, and names each once: nothing listed that is never
/// counted, nothing counted that is not listed.
fn readme_lists_exactly(
    readme: &str,
    metric: &str,
    label: &str,
    values: &[&str],
) -> anyhow::Result<()> {
    let listed = readme_label_values(readme, metric, label)?;
    let unique: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "{metric}: listed twice in {listed:?}"
    );
    let counted: BTreeSet<&str> = values.iter().copied().collect();
    let unlisted: Vec<_> = counted.difference(&unique).collect();
    let unknown: Vec<_> = unique.difference(&counted).collect();
    assert!(
        unlisted.is_empty() && unknown.is_empty(),
        "{metric} {label}: counted but not in the README: {unlisted:?}; \
         in the README but never counted: {unknown:?}"
    );
    Ok(())
}

/// The series of `metric` of `direction` and `label="value"` in a scrape,
/// as a line without its count, and the lines of that series.
fn series_lines<'a>(
    page: &'a str,
    metric: &str,
    direction: &str,
    label: &str,
    value: &str,
) -> (String, Vec<&'a str>) {
    let series = format!("{metric}{{direction=\"{direction}\",{label}=\"{value}\"}}");
    let lines = page
        .lines()
        .filter(|line| {
            line.strip_prefix(series.as_str())
                .is_some_and(|count| count.starts_with(' '))
        })
        .collect();
    (series, lines)
}

/// The families the README's paragraph on the control plane's metrics
/// names, but those it serves only with `--webhook` or `--store
/// kubernetes`, as a control plane started without them serves.
fn readme_control_plane_families(readme: &str) -> anyhow::Result<BTreeSet<String>> {
    let start = "The control plane's admin port serves";
    let paragraph = readme
        .split_once(start)
        .and_then(|(_, after)| after.split_once("with `--store kubernetes`"))
        .map(|(paragraph, _)| paragraph)
        .ok_or_else(|| anyhow::anyhow!("no list of the control plane's metrics in the README"))?;
    let mut names = BTreeSet::new();
    let mut pieces = paragraph.split('`');
    while let (Some(_), Some(code)) = (pieces.next(), pieces.next()) {
        let name = code.split('{').next().unwrap_or(code);
        let after = paragraph
            .split_once(&format!("`{code}`"))
            .map_or("", |(_, after)| after);
        if name.starts_with("trellis_") && !after.starts_with(" (with `--webhook`") {
            names.insert(name.to_string());
        }
    }
    Ok(names)
}

/// Compares the families of a scrape with those `documented`, both ways:
/// an error naming those only one of them has.
fn same_families(
    scraped: &[(String, String)],
    documented: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let names: BTreeSet<String> = scraped.iter().map(|(name, _)| name.clone()).collect();
    let undocumented: Vec<_> = names.difference(documented).collect();
    anyhow::ensure!(
        undocumented.is_empty(),
        "not in the README: {undocumented:?}"
    );
    let missing: Vec<_> = documented.difference(&names).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "in the README, not scraped: {missing:?}"
    );
    Ok(())
}

/// Each family of an OpenMetrics scrape by the name a Prometheus query uses
/// (a counter's with `_total`), with its help.
fn families(page: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut help = String::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map_or("", |(_, h)| h).to_string();
        } else if let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            // The sidecar's OpenMetrics names a counter's family without
            // `_total`, the control plane's Prometheus text with it.
            let name = match kind {
                "counter" if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_string(),
            };
            found.push((name, help.clone()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_call_shows_the_metrics_the_readme_lists() -> anyhow::Result<()> {
    let pair = Pair::start(Mesh::start().await?).await?;
    let allow = PolicyDoc::allow("web-to-api", pair.server.identity()).from(pair.client.identity());
    policy::apply_and_wait(&pair.mesh, pair.server.identity(), &allow.to_yaml()).await?;
    let answer = trellis_tests::http::get(pair.route(), "/").await?;
    assert!(answer.status.is_success(), "{answer:?}");

    let page = trellis_tests::http::get(pair.server.admin().addr(), "/metrics")
        .await?
        .success()?
        .body;
    let scraped = families(&page);
    same_families(&scraped, &readme_sidecar_families(&readme()?)?)?;

    // An HTTP request is a decision of its own, and the help says so.
    let (_, help) = scraped
        .iter()
        .find(|(name, _)| name == "trellis_decisions_total")
        .expect("decisions are scraped");
    assert!(help.contains("HTTP requests"), "{help}");
    let decisions = pair.server.metrics().await?.counter(
        "trellis_decisions_total",
        &[("action", "allow"), ("policy", "default/web-to-api")],
    );
    assert!(decisions >= 1.0, "{page}");
    Ok(())
}

/// A fresh sidecar's first scrape, before any call, has every family the
/// README lists, `# HELP` and `# TYPE` included, and each handshake
/// failure reason and connection outcome the README lists at 0 in each
/// direction it can be counted in, so alerts and `rate()` work from the
/// first scrape; the README lists exactly those the sidecar counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_sidecars_first_scrape_shows_every_metric_the_readme_lists() -> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let api = HttpApp::start("api").await?;
    let sidecar = mesh.sidecar("api").app(api.addr()).start().await?;
    let url = format!("http://{}/metrics", sidecar.admin().addr());
    let page = curl(&[&url]).await?;

    let readme = readme()?;
    same_families(&families(&page), &readme_sidecar_families(&readme)?)?;
    // Every reason and outcome the sidecar can count is listed, and made
    // at 0 in each direction it can be counted in (in no other).
    let failures: Vec<_> = HandshakeFailure::ALL
        .iter()
        .filter_map(|f| {
            let directions = match (INBOUND_REASONS.contains(f), OUTBOUND_REASONS.contains(f)) {
                (true, true) => Directions::Both,
                (true, false) => Directions::Inbound,
                (false, true) => Directions::Outbound,
                (false, false) => return None,
            };
            Some((f.token(), directions))
        })
        .collect();
    let outcomes = Outcome::ALL.map(|o| (o.token(), o.directions()));
    for (metric, label, values) in [
        ("trellis_handshake_failures_total", "reason", &failures[..]),
        ("trellis_connections_total", "outcome", &outcomes[..]),
    ] {
        let tokens: Vec<&str> = values.iter().map(|(token, _)| *token).collect();
        readme_lists_exactly(&readme, metric, label, &tokens)?;
        let made: usize = values
            .iter()
            .map(|(_, d)| {
                ["inbound", "outbound"]
                    .iter()
                    .filter(|&&x| d.include(x))
                    .count()
            })
            .sum();
        assert!(
            readme.contains(&format!(" {made} series;")),
            "the README does not say {metric} has {made} series"
        );
        for (value, directions) in values {
            for direction in ["inbound", "outbound"] {
                let (series, found) = series_lines(&page, metric, direction, label, value);
                let at_zero = format!("{series} 0");
                let expected: Vec<&str> = match directions.include(direction) {
                    true => vec![&at_zero],
                    false => vec![],
                };
                assert_eq!(found, expected, "{series} in\n{page}");
            }
        }
    }
    for series in [
        "trellis_handshake_failures_total{direction=\"inbound\",reason=\"not_tls\"} 0",
        "trellis_handshake_failures_total{direction=\"outbound\",reason=\"not_tls\"} 0",
        "trellis_certificate_renewals_total{outcome=\"error\",reason=\"unreachable\"} 0",
        "# TYPE trellis_rate_limited counter",
    ] {
        assert!(
            page.lines().any(|line| line == series),
            "{series} missing from\n{page}"
        );
    }
    Ok(())
}

/// A fresh control plane's first scrape has every family the README lists
/// for one started without `--webhook` or `--store kubernetes`, and each
/// series whose reason is known in advance at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_control_planes_first_scrape_shows_every_metric_the_readme_lists()
-> anyhow::Result<()> {
    let mesh = Mesh::start().await?;
    let url = format!("http://{}/metrics", mesh.control_plane_admin().addr());
    let page = curl(&[&url]).await?;

    same_families(
        &families(&page),
        &readme_control_plane_families(&readme()?)?,
    )?;
    for (family, reasons) in [
        (
            "trellis_inbound_addresses_refused_total",
            &["unverified", "loopback", "held"][..],
        ),
        (
            "trellis_grpc_connections_refused_total",
            &["per_client", "total"],
        ),
        ("trellis_grpc_connections_closed_total", &["idle"]),
        (
            "trellis_webhook_connections_refused_total",
            &["per_client", "total"],
        ),
        (
            "trellis_admin_connections_refused_total",
            &["per_client", "total"],
        ),
        (
            "trellis_webhook_malformed_requests_total",
            &["malformed", "head_too_large", "target_too_long"],
        ),
        (
            "trellis_admin_malformed_requests_total",
            &["malformed", "head_too_large", "target_too_long"],
        ),
        (
            "trellis_inject_unknown_values_total",
            &["pod_label", "pod_annotation", "namespace_label"],
        ),
        (
            "trellis_watch_streams_refused_total",
            &["per_sidecar", "total"],
        ),
    ] {
        for reason in reasons {
            let series = format!("{family}{{reason=\"{reason}\"}} 0");
            assert!(
                page.lines().any(|line| line == series),
                "{series} missing from\n{page}"
            );
        }
    }
    Ok(())
}
