//! Continuous HTTP traffic through an address, to show that something
//! (certificate rotation, a control-plane outage) drops no request: one loop
//! opens a new connection per request, another keeps one connection open for
//! the whole run. Every unexpected answer and every failure is recorded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::http::{self, HttpConnection};

/// The pause between two requests of one loop.
const PACE: Duration = Duration::from_millis(25);

/// What the traffic saw.
#[derive(Clone, Debug, Default)]
pub struct TrafficReport {
    /// Requests answered as expected on new connections.
    pub ok_new_connections: u64,
    /// Requests answered as expected on the one kept-alive connection.
    pub ok_kept_connection: u64,
    /// Every failure, in order, with what went wrong.
    pub errors: Vec<String>,
}

impl TrafficReport {
    pub fn ok(&self) -> u64 {
        self.ok_new_connections + self.ok_kept_connection
    }
}

/// Running traffic; [`Traffic::stop`] ends it and reports.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    new_connections: JoinHandle<(u64, Vec<String>)>,
    kept_connection: JoinHandle<(u64, Vec<String>)>,
}

impl Traffic {
    /// Sends `GET path` to `addr` continuously; an answer counts as OK when
    /// its status is 2xx and its body is `expected_body`.
    pub fn start(addr: SocketAddr, path: &str, expected_body: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let new_connections = tokio::spawn(new_connection_loop(
            addr,
            path.to_string(),
            expected_body.to_string(),
            stop.clone(),
        ));
        let kept_connection = tokio::spawn(kept_connection_loop(
            addr,
            path.to_string(),
            expected_body.to_string(),
            stop.clone(),
        ));
        Traffic {
            stop,
            new_connections,
            kept_connection,
        }
    }

    /// Stops both loops after their current request and reports.
    pub async fn stop(self) -> TrafficReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut report = TrafficReport::default();
        for (handle, kept) in [(self.new_connections, false), (self.kept_connection, true)] {
            match handle.await {
                Ok((ok, errors)) => {
                    if kept {
                        report.ok_kept_connection = ok;
                    } else {
                        report.ok_new_connections = ok;
                    }
                    report.errors.extend(errors);
                }
                Err(e) => report.errors.push(format!("a traffic loop panicked: {e}")),
            }
        }
        report
    }
}

fn check(answer: anyhow::Result<http::Response>, expected: &str) -> Result<(), String> {
    match answer {
        Ok(r) if r.status.is_success() && r.body == expected => Ok(()),
        Ok(r) => Err(format!("status {} body {:?}", r.status, r.body)),
        Err(e) => Err(format!("{e:#}")),
    }
}

async fn new_connection_loop(
    addr: SocketAddr,
    path: String,
    expected: String,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<String>) {
    let (mut ok, mut errors) = (0, Vec::new());
    while !stop.load(Ordering::SeqCst) {
        match check(http::get(addr, &path).await, &expected) {
            Ok(()) => ok += 1,
            Err(e) => errors.push(format!("new connection, request {}: {e}", ok + 1)),
        }
        tokio::time::sleep(PACE).await;
    }
    (ok, errors)
}

async fn kept_connection_loop(
    addr: SocketAddr,
    path: String,
    expected: String,
    stop: Arc<AtomicBool>,
) -> (u64, Vec<String>) {
    let (mut ok, mut errors) = (0, Vec::new());
    let mut connection: Option<HttpConnection> = None;
    while !stop.load(Ordering::SeqCst) {
        let answer = match connection.as_mut() {
            Some(c) => c.get(&path).await,
            None => match HttpConnection::open(addr).await {
                Ok(c) => connection.insert(c).get(&path).await,
                Err(e) => Err(e),
            },
        };
        match check(answer, &expected) {
            Ok(()) => ok += 1,
            Err(e) => {
                errors.push(format!("kept connection, request {}: {e}", ok + 1));
                // Reconnect, so one failure does not hide later ones.
                connection = None;
            }
        }
        tokio::time::sleep(PACE).await;
    }
    (ok, errors)
}
