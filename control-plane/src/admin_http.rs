//! The plain-HTTP admin port: `/live`, `/ready` (200 once the gRPC port is
//! serving) and `/metrics` (Prometheus text).
//!
//! It exposes nothing secret and accepts nothing that changes state.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::discovery::Discovery;
use crate::metrics::{Metrics, render_sidecar_sync};

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

    /// Serves until `shutdown` turns true.
    pub async fn run(
        self,
        ready: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        discovery: Arc<Discovery>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let tcp = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = crate::run::stopping(&mut shutdown) => return,
            };
            let ready = ready.clone();
            let metrics = metrics.clone();
            let discovery = discovery.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = respond(&req, &ready, &metrics, &discovery);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
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
        "/ready" if ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let mut body = metrics.render();
            render_sidecar_sync(&mut body, &discovery.sync_counts());
            text(StatusCode::OK, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
