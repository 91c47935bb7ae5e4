//! A plain HTTP/1.1 client for tests: one request per new connection
//! ([`get`]), or many requests over one kept-alive connection
//! ([`HttpConnection`]), e.g. to prove that an open connection survives.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

pub use ::http::{Method, StatusCode};
use tokio::net::TcpStream;

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of an answer's body [`HttpConnection::get`] reads: far more
/// than any test app or the demo's apps answer, so a peer that sends more
/// is an error, not memory without end.
pub const RESPONSE_BODY_MOST: usize = 1024 * 1024;

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
            let body = Limited::new(body, RESPONSE_BODY_MOST)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the answer's body: {e}"))?
                .to_bytes();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server whose answer's body is larger than any test app's is told
    /// as an error naming the body, not read into memory without end.
    #[tokio::test]
    async fn an_answer_over_the_body_bound_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0; 1024];
            let _ = tcp.read(&mut head).await.unwrap();
            let length = RESPONSE_BODY_MOST + 1;
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {length}\r\n\r\n");
            tcp.write_all(head.as_bytes()).await.unwrap();
            let _ = tcp.write_all(&vec![b'x'; length]).await;
        });
        let mut connection = HttpConnection::open(addr).await.unwrap();
        let error = connection.get("/").await.unwrap_err();
        assert!(
            format!("{error:#}").contains("reading the answer's body"),
            "{error:#}"
        );
        server.abort();
    }
}
