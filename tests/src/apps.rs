//! The applications behind the sidecars, run in-process on loopback: an
//! HTTP server (HTTP/1.1 and HTTP/2 with prior knowledge) that reads each
//! request's body to its end, then greets and records what it was asked, and a raw TCP echo. Both count the connections they accept, so a test can show that a
//! refused client never reached the app.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the app saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: http::Method,
    pub path: String,
    pub version: http::Version,
    pub headers: http::HeaderMap,
    /// The whole body, read before the request is answered.
    pub body: Bytes,
}

/// What an app answers: a status and a text body.
pub type Answer = Pin<Box<dyn Future<Output = (http::StatusCode, String)> + Send>>;

/// Computes the answer to a request.
pub type Handler = Arc<dyn Fn(RecordedRequest) -> Answer + Send + Sync>;

#[derive(Default)]
struct Record {
    requests: Mutex<Vec<RecordedRequest>>,
    connections: AtomicU64,
}

/// An HTTP/1.1 and HTTP/2 app. Dropping it stops it.
pub struct HttpApp {
    name: String,
    addr: SocketAddr,
    record: Arc<Record>,
    task: JoinHandle<()>,
}

impl HttpApp {
    /// Answers every request with `hello from <name>` on a free port.
    pub async fn start(name: &str) -> anyhow::Result<HttpApp> {
        let greeting = greeting(name);
        let handler: Handler = Arc::new(move |_| {
            let greeting = greeting.clone();
            Box::pin(async move { (http::StatusCode::OK, greeting) })
        });
        HttpApp::start_with(name, "127.0.0.1:0".parse()?, handler).await
    }

    /// Serves on `addr` (port 0 for a free one) with a custom handler.
    pub async fn start_with(
        name: &str,
        addr: SocketAddr,
        handler: Handler,
    ) -> anyhow::Result<HttpApp> {
        HttpApp::serve(name, TcpListener::bind(addr).await?, handler)
    }

    /// [`HttpApp::start_with`] on `preferred` if it can be bound, on a free
    /// port of the same host otherwise. Binding is the check: a port looked
    /// at first could be taken before the bind (by another mesh on the host
    /// starting at the same time).
    pub async fn start_preferring(
        name: &str,
        preferred: SocketAddr,
        handler: Handler,
    ) -> anyhow::Result<HttpApp> {
        let listener = match TcpListener::bind(preferred).await {
            Ok(listener) => listener,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                TcpListener::bind(SocketAddr::new(preferred.ip(), 0)).await?
            }
            Err(e) => return Err(e.into()),
        };
        HttpApp::serve(name, listener, handler)
    }

    fn serve(name: &str, listener: TcpListener, handler: Handler) -> anyhow::Result<HttpApp> {
        let addr = listener.local_addr()?;
        let record = Arc::new(Record::default());
        let task = tokio::spawn(serve_http(listener, handler, record.clone()));
        Ok(HttpApp {
            name: name.to_string(),
            addr,
            record,
            task,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The body of a default answer: `hello from <name>`.
    pub fn greeting(&self) -> String {
        greeting(&self.name)
    }

    /// The requests received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.record
            .requests
            .lock()
            .expect("request log poisoned")
            .clone()
    }

    /// How many TCP connections the app has accepted.
    pub fn connections(&self) -> u64 {
        self.record.connections.load(Ordering::SeqCst)
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The default answer of an app called `name`.
pub fn greeting(name: &str) -> String {
    format!("hello from {name}")
}

async fn serve_http(listener: TcpListener, handler: Handler, record: Arc<Record>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        record.connections.fetch_add(1, Ordering::SeqCst);
        let handler = handler.clone();
        let record = record.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: http::Request<Incoming>| {
                let handler = handler.clone();
                let record = record.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    // Read to its end before the answer, as an app that
                    // takes a body does: hyper keeps the connection open
                    // after it.
                    let body = match body.collect().await {
                        Ok(body) => body.to_bytes(),
                        Err(e) => {
                            let mut response = http::Response::new(Full::new(Bytes::from(
                                format!("the request body could not be read: {e}\n"),
                            )));
                            *response.status_mut() = http::StatusCode::BAD_REQUEST;
                            return Ok::<_, Infallible>(response);
                        }
                    };
                    let seen = RecordedRequest {
                        method: parts.method,
                        path: parts.uri.path().to_string(),
                        version: parts.version,
                        headers: parts.headers,
                        body,
                    };
                    record
                        .requests
                        .lock()
                        .expect("request log poisoned")
                        .push(seen.clone());
                    let (status, body) = handler(seen).await;
                    let mut response = http::Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
        // Reap finished connections so the set does not grow forever.
        while connections.try_join_next().is_some() {}
    }
}

/// A raw TCP echo server. Dropping it stops it.
pub struct EchoApp {
    addr: SocketAddr,
    record: Arc<Record>,
    task: JoinHandle<()>,
}

impl EchoApp {
    /// Echoes every byte back, on a free port.
    pub async fn start() -> anyhow::Result<EchoApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let record = Arc::new(Record::default());
        let counter = record.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                counter.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if tcp.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        Ok(EchoApp { addr, record, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many TCP connections the echo server has accepted.
    pub fn connections(&self) -> u64 {
        self.record.connections.load(Ordering::SeqCst)
    }
}

impl Drop for EchoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
