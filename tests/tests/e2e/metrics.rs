//! The sidecar's `/metrics` against the README's table of them, as a user
//! checks one against the other: after a call through the mesh, every
//! family a scrape shows is in the table, every one in the table is in the
//! scrape (but those the README says appear at their first count), and
//! their help says what they count.

use std::collections::BTreeSet;

use trellis_tests::Mesh;
use trellis_tests::policy::{self, PolicyDoc};

use crate::Pair;

/// The families the README says are absent until their first count.
const FIRST_COUNT: [&str; 2] = [
    "trellis_handshake_failures_total",
    "trellis_rate_limited_total",
];

/// The metric names of the README's table of the sidecar's metrics.
fn readme_table() -> anyhow::Result<BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path)?;
    let table = readme
        .split_once("| Metric | Labels |")
        .map(|(_, after)| after)
        .ok_or_else(|| anyhow::anyhow!("no table of metrics in {path}"))?;
    Ok(table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| line.split('`').nth(1))
        .map(str::to_string)
        .collect())
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
            let name = match kind {
                "counter" => format!("{name}_total"),
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
    let documented = readme_table()?;
    let names: BTreeSet<String> = scraped.iter().map(|(name, _)| name.clone()).collect();
    let undocumented: Vec<_> = names.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in the README: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .iter()
        .filter(|name| !names.contains(*name) && !FIRST_COUNT.contains(&name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "in the README, not scraped: {missing:?}"
    );

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
