//! The plain-HTTP admin port: `/live`, `/ready` (200 once the gRPC port is
//! serving; with the Kubernetes store, when the watch of a policy kind has
//! been failing for longer than its grace, 503 naming it if a peer replica
//! answers as healthy, else 200 saying that the policies served may be
//! stale: see [`crate::readiness`]) and `/metrics` (Prometheus text).
//!
//! It exposes nothing secret and accepts nothing that changes state. It is
//! reachable from every pod of the cluster (the kubelet probes it, a
//! Prometheus scrapes it), so its connections are limited as the sidecar's
//! admin port's are: in number, per client address and in time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_core::connections::{ConnectionLimits, serve_http1_for};

use crate::discovery::Discovery;
use crate::metrics::{
    Metrics, render_sidecar_sync, render_store_serving_stale, render_store_watches,
};
use crate::readiness::{Check, Readiness};

/// How long a client of the admin port has to send a request's head, and
/// how long an idle connection is kept waiting for the next one: the
/// kubelet and Prometheus send theirs at once.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Admin connections served at once; more are closed as they are accepted,
/// so a client that opens connections and sends nothing cannot take the
/// control plane's file descriptors or grow its memory without bound.
pub const MAX_CONNECTIONS: usize = 128;

/// Admin connections one client address may hold at once. The kubelet
/// (from the node's address) and a Prometheus need a few; one pod of the
/// cluster must not take every slot and leave the kubelet's probes refused.
pub const MAX_CONNECTIONS_PER_CLIENT: usize = 16;

/// How long one admin connection is served: then it closes after the
/// answer in progress, or [`HEAD_TIMEOUT`] later if that answer cannot be
/// written. A scraper simply reconnects.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

pub struct AdminHttp {
    listener: TcpListener,
}

impl AdminHttp {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            listener: crate::net::bind(addr)?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` turns true. `readiness` is the Kubernetes
    /// store's (none with the embedded store).
    pub async fn run(
        self,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        discovery: Arc<Discovery>,
        readiness: Option<Arc<Readiness>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let limits = ConnectionLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_CLIENT);
        loop {
            let (tcp, client) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::run::stopping(&mut shutdown) => return,
            };
            let admitted = match limits.admit(client.ip()) {
                Ok(admitted) => admitted,
                Err(refused) => {
                    tracing::debug!(%client, %refused, "admin connection refused");
                    continue;
                }
            };
            let ready = ready.clone();
            let metrics = metrics.clone();
            let discovery = discovery.clone();
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let admitted = admitted;
                let service = hyper::service::service_fn(move |req| {
                    let response =
                        respond(&req, &ready, &metrics, &discovery, readiness.as_deref());
                    async move { Ok::<_, Infallible>(response) }
                });
                serve_http1_for(
                    tcp,
                    service,
                    HEAD_TIMEOUT,
                    CONNECTION_LIFETIME,
                    admitted.evicted(),
                )
                .await;
            });
        }
    }
}

fn respond(
    req: &Request<Incoming>,
    ready: &AtomicBool,
    metrics: &Metrics,
    discovery: &Discovery,
    readiness: Option<&Readiness>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if !ready.load(Ordering::Acquire) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
        }
        // Sidecars moved here (a rollout) would get policies that may be
        // stale: a Service sends them to a healthy peer meanwhile. With no
        // healthy peer, staying ready keeps the mesh served.
        "/ready" => match readiness.map(Readiness::check) {
            Some(Check::Unready(reason)) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
            Some(Check::ServingStale(reason)) => {
                text(StatusCode::OK, format!("ready, serving stale: {reason}\n"))
            }
            Some(Check::Current) | None => text(StatusCode::OK, "ready\n".into()),
        },
        "/metrics" => {
            let mut body = metrics.render();
            render_sidecar_sync(&mut body, &discovery.sync_counts());
            if let Some(readiness) = readiness {
                let stale = matches!(readiness.check(), Check::ServingStale(_));
                render_store_serving_stale(&mut body, stale);
                let failing: Vec<_> = readiness
                    .watches()
                    .failing()
                    .into_iter()
                    .map(|(kind, failing)| (kind.as_str(), failing.is_some()))
                    .collect();
                render_store_watches(&mut body, &failing);
            }
            text(StatusCode::OK, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
