//! A plain HTTP/1.1 client for tests: one request per new connection
//! ([`get`]), or many requests over one kept-alive connection
//! ([`HttpConnection`]), e.g. to prove that an open connection survives.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

pub use ::http::{Method, StatusCode};
use tokio::net::TcpStream;

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A received response with its body read to the end.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Response {
    /// Fails unless the status is 2xx.
    pub fn success(self) -> anyhow::Result<Response> {
        anyhow::ensure!(
            self.status.is_success(),
            "status {}, body {:?}",
            self.status,
            self.body
        );
        Ok(self)
    }
}

/// One kept-alive HTTP/1.1 connection.
pub struct HttpConnection {
    addr: SocketAddr,
    sender: http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl HttpConnection {
    /// Connects to `addr` (plaintext) and performs the HTTP/1.1 handshake.
    pub async fn open(addr: SocketAddr) -> anyhow::Result<HttpConnection> {
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
            .await
            .with_context(|| format!("connecting to {addr} timed out"))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .with_context(|| format!("HTTP handshake with {addr} failed"))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(HttpConnection {
            addr,
            sender,
            driver,
        })
    }

    /// Sends `GET path` on this connection and reads the whole response.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Response> {
        let addr = self.addr;
        let request = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .context("the connection is closed")?;
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            anyhow::Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("GET {path} from {addr} timed out"))?
            .with_context(|| format!("GET {path} from {addr} failed"))
    }
}

impl Drop for HttpConnection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `GET path` on a new connection to `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Response> {
    HttpConnection::open(addr).await?.get(path).await
}
