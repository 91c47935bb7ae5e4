//! The admin HTTP endpoints of the control plane and the sidecar:
//! `/live`, `/ready`, `/metrics` and (sidecar) `/config`.

use std::net::SocketAddr;

use anyhow::Context;

use crate::http;
use crate::metrics::Metrics;

/// A client for one admin address.
#[derive(Clone, Copy, Debug)]
pub struct Admin {
    addr: SocketAddr,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Admin {
        Admin { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether `/live` answers 200.
    pub async fn is_live(&self) -> bool {
        self.status_ok("/live").await
    }

    /// Whether `/ready` answers 200.
    pub async fn is_ready(&self) -> bool {
        self.status_ok("/ready").await
    }

    /// Fails with the status and body of `/ready` unless it answers 200.
    pub async fn ready(&self) -> anyhow::Result<()> {
        http::get(self.addr, "/ready").await?.success().map(|_| ())
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let page = http::get(self.addr, "/metrics").await?.success()?;
        Ok(Metrics::parse(&page.body))
    }

    /// Reads `/config` as JSON.
    pub async fn config(&self) -> anyhow::Result<serde_json::Value> {
        let page = http::get(self.addr, "/config").await?.success()?;
        serde_json::from_str(&page.body)
            .with_context(|| format!("/config on {} is not JSON: {}", self.addr, page.body))
    }

    async fn status_ok(&self, path: &str) -> bool {
        matches!(http::get(self.addr, path).await, Ok(r) if r.status.is_success())
    }
}
