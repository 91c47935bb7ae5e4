//! The load generators, all in this process and all against loopback
//! addresses: bulk streams, HTTP/1.1 at a fixed rate (open loop), HTTP/1.1
//! as fast as possible on kept-alive connections (closed loop), HTTP/2
//! streams as fast as possible on a few connections (closed loop, with
//! h2load), new connections per second, and many connections held open.
//!
//! Every loop is bounded twice: by a deadline and by a maximum count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::app::{RESPONSE_BODY, content_length, find_head_end};

/// The body of every request: 1 KiB.
pub const REQUEST_BODY: usize = 1024;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection with Nagle off, given up after [`REQUEST_TIMEOUT`].
async fn connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))??;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The bytes of one request (`POST /` with a 1 KiB body).
fn request_bytes(close: bool) -> Vec<u8> {
    let connection = if close { "close" } else { "keep-alive" };
    let mut out = format!(
        "POST / HTTP/1.1\r\nHost: bench\r\nConnection: {connection}\r\nContent-Length: {REQUEST_BODY}\r\n\r\n"
    )
    .into_bytes();
    out.extend(std::iter::repeat_n(b'r', REQUEST_BODY));
    out
}

/// An HTTP/1.1 connection that sends the benchmark request and reads the
/// 1 KiB answer.
pub struct HttpConn {
    tcp: TcpStream,
    buf: Vec<u8>,
    filled: usize,
    request: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(addr: SocketAddr, close: bool) -> anyhow::Result<HttpConn> {
        let tcp = connect(addr).await?;
        Ok(HttpConn {
            tcp,
            buf: vec![0u8; 8 * 1024],
            filled: 0,
            request: request_bytes(close),
        })
    }

    /// One request and its whole answer.
    pub async fn exchange(&mut self) -> anyhow::Result<()> {
        self.tcp.write_all(&self.request).await?;
        loop {
            if let Some(head_end) = find_head_end(&self.buf[..self.filled]) {
                let body = content_length(&self.buf[..head_end]).unwrap_or(0);
                anyhow::ensure!(
                    self.buf.starts_with(b"HTTP/1.1 200"),
                    "unexpected answer: {:?}",
                    String::from_utf8_lossy(&self.buf[..head_end.min(80)])
                );
                anyhow::ensure!(
                    body == RESPONSE_BODY,
                    "answer body is {body} bytes, expected {RESPONSE_BODY}"
                );
                let total = head_end + body;
                if self.filled >= total {
                    self.buf.copy_within(total..self.filled, 0);
                    self.filled -= total;
                    return Ok(());
                }
            }
            if self.filled == self.buf.len() {
                anyhow::bail!("answer larger than {} bytes", self.buf.len());
            }
            let n = self.tcp.read(&mut self.buf[self.filled..]).await?;
            anyhow::ensure!(n > 0, "connection closed before the answer was complete");
            self.filled += n;
        }
    }
}

/// One request on a new connection (readiness checks).
pub async fn one_request(addr: SocketAddr) -> anyhow::Result<()> {
    let mut conn = HttpConn::connect(addr, true).await?;
    conn.exchange().await
}

/// Bulk throughput: bytes delivered per second.
#[derive(Clone, Debug)]
pub struct Bulk {
    pub bytes: u64,
    pub seconds: f64,
}

impl Bulk {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

/// `streams` connections each write 64 KiB chunks for `duration` (at most
/// `max_bytes` each), half-close, and wait for the app's count of what
/// arrived. The time runs until the last count is back.
pub async fn bulk(
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
    max_bytes: u64,
) -> anyhow::Result<Bulk> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        tasks.spawn(async move {
            let mut tcp = connect(addr).await?;
            // Not an HTTP method: the app treats the stream as bulk. Lines
            // of 1 KiB, so that a proxy sniffing for HTTP reads a first
            // line and finds it is not HTTP. (Envoy's `http_inspector`
            // cannot tell a stream with no line break from HTTP, and drops
            // it once its buffer is full.)
            let mut chunk = vec![0x5au8; 64 * 1024];
            for line in chunk.chunks_mut(1024) {
                line[1022..].copy_from_slice(b"\r\n");
            }
            let mut sent = 0u64;
            while Instant::now() < deadline && sent < max_bytes {
                tcp.write_all(&chunk).await?;
                sent += chunk.len() as u64;
            }
            tcp.shutdown().await?;
            let mut count = [0u8; 8];
            tokio::time::timeout(REQUEST_TIMEOUT, tcp.read_exact(&mut count))
                .await
                .context("the app did not confirm the bytes")??;
            let received = u64::from_be_bytes(count);
            anyhow::ensure!(
                received == sent,
                "sent {sent} bytes, the app got {received}"
            );
            anyhow::Ok(sent)
        });
    }
    let mut bytes = 0;
    while let Some(result) = tasks.join_next().await {
        bytes += result??;
    }
    Ok(Bulk {
        bytes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Latency at a fixed request rate: every answered request's time, in
/// microseconds, and the requests that failed.
#[derive(Clone, Debug)]
pub struct Latency {
    pub histogram: Histogram<u64>,
    pub errors: u64,
    /// Requests that fell due while the one before them on their
    /// connection was still unanswered: the pair was behind the rate, and
    /// each is timed from when it fell due. More than a few, and the
    /// tail is the queue's, not the pair's.
    pub queued: u64,
}

impl Latency {
    /// An empty record, to merge rounds into.
    pub fn new() -> anyhow::Result<Latency> {
        Ok(Latency {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: 0,
            queued: 0,
        })
    }

    /// Adds another run's requests to this one.
    pub fn merge(&mut self, other: &Latency) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.errors += other.errors;
        self.queued += other.queued;
        Ok(())
    }

    /// The time under which a share `q` of the answered requests came back.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64
    }
}

/// HTTP/1.1 at `rate` requests per second in total, spread over
/// `connections` kept-alive connections, for `duration`: open loop. Each
/// connection has a fixed schedule, released by a thread of its own to
/// within tens of microseconds; a request whose predecessor answered
/// late is timed from when it should have been sent (the correction for
/// coordinated omission, as wrk2 does), one sent late only by this
/// process (the pacer's wake-up, the runtime's) from when it was sent.
///
/// Every connection is opened and answers one request before the schedule
/// starts, so the figures are those of requests on established
/// connections: through a pair, a connection's first request also waits
/// for the mTLS handshake and the server side's first connection to the
/// app, which the new-connection scenario measures (wrk2 likewise leaves
/// its warm-up out).
pub async fn fixed_rate(
    addr: SocketAddr,
    connections: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Latency> {
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    let per_connection = (duration.as_secs_f64() / interval.as_secs_f64()).ceil() as u64;
    let mut warm = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut conn = HttpConn::connect(addr, false).await?;
        tokio::time::timeout(REQUEST_TIMEOUT, conn.exchange())
            .await
            .context("the warm-up request timed out")?
            .context("the warm-up request")?;
        warm.push(conn);
    }
    let start = Instant::now() + Duration::from_millis(50);
    // Each connection's schedule, staggered over one interval.
    let offsets: Vec<Duration> = (0..connections)
        .map(|c| interval.mul_f64(c as f64 / connections as f64))
        .collect();
    let mut releases = Vec::with_capacity(connections);
    let mut tasks = tokio::task::JoinSet::new();
    for mut conn in warm {
        let (release, mut released) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        releases.push(release);
        tasks.spawn(async move {
            let mut record = Latency::new()?;
            let mut previous_done = start;
            // Each request's intended send time, released at that time.
            while let Some(intended) = released.recv().await {
                let sent = Instant::now();
                let began = if previous_done > intended {
                    record.queued += 1;
                    intended
                } else {
                    sent
                };
                match tokio::time::timeout(REQUEST_TIMEOUT, conn.exchange()).await {
                    Ok(Ok(())) => {
                        let done = Instant::now();
                        record
                            .histogram
                            .saturating_record(done.duration_since(began).as_micros() as u64);
                        previous_done = done;
                    }
                    _ => {
                        record.errors += 1;
                        previous_done = Instant::now();
                        conn = HttpConn::connect(addr, false).await?;
                    }
                }
            }
            anyhow::Ok(record)
        });
    }
    // A thread of its own releases the requests: the runtime's timer
    // fires on whole milliseconds, so at 2,000 requests a second (one
    // every 0.5 ms) it would send them two at a time; a thread's sleep
    // wakes within tens of microseconds of the schedule.
    let pacer = std::thread::Builder::new()
        .name("fixed-rate pacer".into())
        .spawn(move || {
            for i in 0..per_connection {
                for (release, offset) in releases.iter().zip(&offsets) {
                    let intended = start + *offset + interval.mul_f64(i as f64);
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    if release.send(intended).is_err() {
                        return; // the run was dropped
                    }
                }
            }
        })?;
    let mut total = Latency::new()?;
    while let Some(result) = tasks.join_next().await {
        total.merge(&result??)?;
    }
    let _ = pacer.join();
    Ok(total)
}

/// What a closed loop measured: its request rate, and the time each
/// request took from being written to its whole answer read. In a closed
/// loop every connection waits for its answer before the next request, so
/// these are the latencies "under wrk -c16" of issue 7, not corrected for
/// coordinated omission (the fixed-rate scenario is).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClosedLoop {
    /// Requests answered.
    pub requests: u64,
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Requests per second on `connections` kept-alive connections, each
/// sending its next request as soon as the previous one is answered (closed
/// loop, like wrk), for `duration` and at most `max_requests` per
/// connection.
pub async fn keepalive_rate(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    max_requests: u64,
) -> anyhow::Result<ClosedLoop> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(async move {
            let mut conn = HttpConn::connect(addr, false).await?;
            let mut latency = Latency::new()?;
            while Instant::now() < deadline && latency.histogram.len() < max_requests {
                let sent = Instant::now();
                tokio::time::timeout(REQUEST_TIMEOUT, conn.exchange())
                    .await
                    .context("a request timed out")??;
                latency
                    .histogram
                    .saturating_record(sent.elapsed().as_micros() as u64);
            }
            anyhow::Ok(latency)
        });
    }
    let mut total = Latency::new()?;
    while let Some(result) = tasks.join_next().await {
        total.merge(&result??)?;
    }
    Ok(ClosedLoop {
        requests: total.histogram.len(),
        requests_per_s: total.histogram.len() as f64 / start.elapsed().as_secs_f64(),
        p50_us: total.quantile_us(0.50),
        p99_us: total.quantile_us(0.99),
    })
}

/// The line the wrk script's `done` writes, before the p50 and p99 in
/// microseconds and the number of requests answered.
const WRK_LATENCY: &str = "trellis-bench latency_us";

/// The same closed loop measured by `wrk` (one thread, `connections`
/// connections, a 1 KiB POST body via a Lua script that also prints wrk's
/// own p50 and p99), when wrk is installed.
pub async fn keepalive_rate_wrk(
    wrk: &std::path::Path,
    dir: &std::path::Path,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<ClosedLoop> {
    let script = dir.join("post-1k.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = string.rep(\"r\", {REQUEST_BODY})\n\
             done = function(summary, latency, requests)\n  \
             io.write(string.format(\"{WRK_LATENCY} %d %d %d\\n\", \
             latency:percentile(50), latency:percentile(99), summary.requests))\n\
             end\n"
        ),
    )?;
    let seconds = duration.as_secs().max(1);
    let run = tokio::process::Command::new(wrk)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{addr}/"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(duration + Duration::from_secs(30), run)
        .await
        .context("wrk did not finish")??;
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// The rate and latencies in wrk's output (with the script's line).
fn parse_wrk(text: &str) -> anyhow::Result<ClosedLoop> {
    anyhow::ensure!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "wrk saw errors:\n{text}"
    );
    let requests_per_s = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let latency: Vec<f64> = text
        .lines()
        .find_map(|l| l.strip_prefix(WRK_LATENCY))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let [p50_us, p99_us, requests] = latency[..] else {
        anyhow::bail!("no latencies from the script in wrk's output:\n{text}");
    };
    Ok(ClosedLoop {
        requests: requests as u64,
        requests_per_s,
        p50_us,
        p99_us,
    })
}

/// Requests per second over HTTP/2 with prior knowledge, as a gRPC client
/// makes them: h2load (one thread) keeps `streams` requests (`POST /`, a
/// 1 KiB body) in flight on each of `connections` connections, starting
/// the next on a connection as soon as one is answered (closed loop), for
/// `duration`. The latencies are from h2load's log of every request
/// (written in `dir`): the time from the request's start to its whole
/// answer.
pub async fn http2_rate_h2load(
    h2load: &std::path::Path,
    dir: &std::path::Path,
    addr: SocketAddr,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> anyhow::Result<ClosedLoop> {
    let body = dir.join("post-1k.bin");
    std::fs::write(&body, vec![b'r'; REQUEST_BODY])?;
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let millis = duration.as_millis().max(100);
    let run = tokio::process::Command::new(h2load)
        .args([
            "-t1".to_string(),
            format!("-c{connections}"),
            format!("-m{streams}"),
            format!("--duration={millis}ms"),
        ])
        .arg(format!("--data={}", body.display()))
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{addr}/"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(duration + Duration::from_secs(30), run)
        .await
        .context("h2load did not finish")??;
    let text = String::from_utf8_lossy(&out.stdout);
    let (requests, requests_per_s) = parse_h2load(&text)?;
    let log = std::fs::read_to_string(&log).context("h2load wrote no log of its requests")?;
    let mut latency = Latency::new()?;
    for line in log.lines() {
        let us: u64 = line
            .split('\t')
            .nth(2)
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("a line of h2load's log without a duration: {line:?}"))?;
        latency.histogram.saturating_record(us);
    }
    anyhow::ensure!(
        !latency.histogram.is_empty(),
        "h2load logged no request:\n{text}"
    );
    Ok(ClosedLoop {
        requests,
        requests_per_s,
        p50_us: latency.quantile_us(0.50),
        p99_us: latency.quantile_us(0.99),
    })
}

/// The requests h2load finished and its rate, from its summary; a run in
/// which any request failed, or was answered with other than 2xx, is an
/// error that quotes the summary. (A timed run counts the status of a
/// few answers that arrive after its end, which are not `done`: the 2xx
/// count may exceed it.)
fn parse_h2load(text: &str) -> anyhow::Result<(u64, f64)> {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(name))
            .and_then(|n| n.trim().parse().ok())
    };
    let counts = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("requests:"))
        .with_context(|| format!("no request counts in h2load's output:\n{text}"))?;
    let done = field(counts, "done").context("h2load's request counts lack `done`")?;
    let succeeded = field(counts, "succeeded").unwrap_or(0);
    let failed = field(counts, "failed").unwrap_or(0);
    let errored = field(counts, "errored").unwrap_or(0);
    let statuses = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("status codes:"))
        .unwrap_or_default();
    let ok = field(statuses, "2xx").unwrap_or(0);
    let other: u64 = ["3xx", "4xx", "5xx"]
        .iter()
        .map(|class| field(statuses, class).unwrap_or(0))
        .sum();
    anyhow::ensure!(
        done > 0 && failed == 0 && errored == 0 && succeeded == done && ok >= done && other == 0,
        "h2load saw failed requests or answers other than 2xx:\n{text}"
    );
    let requests_per_s = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("finished in"))
        .and_then(|l| l.split(',').nth(1))
        .and_then(|v| v.trim().strip_suffix("req/s"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no req/s in h2load's output:\n{text}"))?;
    Ok((done, requests_per_s))
}

/// What a run of [`connection_rate`] made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Connections {
    /// Connections that answered their request.
    pub ok: u64,
    /// Connections that failed or timed out.
    pub errors: u64,
    /// `ok` over the run's length.
    pub per_second: f64,
}

/// New connections per second: `concurrency` loops each open a connection,
/// make one request with `Connection: close`, and close it, for `duration`
/// and at most `max_per_loop` times each. Through a pair every connection
/// is a new mTLS handshake between the proxies.
pub async fn connection_rate(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
    max_per_loop: u64,
) -> anyhow::Result<Connections> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        tasks.spawn(async move {
            let (mut ok, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline && ok + errors < max_per_loop {
                match tokio::time::timeout(REQUEST_TIMEOUT, one_request(addr)).await {
                    Ok(Ok(())) => ok += 1,
                    _ => errors += 1,
                }
            }
            (ok, errors)
        });
    }
    let (mut ok, mut errors) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (o, e) = result?;
        ok += o;
        errors += e;
    }
    Ok(Connections {
        ok,
        errors,
        per_second: ok as f64 / start.elapsed().as_secs_f64(),
    })
}

/// Opens `n` connections (at most `concurrency` being set up at once), each
/// proven end to end by one request, and returns them open. Gives up after
/// `patience`.
pub async fn hold_connections(
    addr: SocketAddr,
    n: usize,
    concurrency: usize,
    patience: Duration,
) -> anyhow::Result<Vec<HttpConn>> {
    let deadline = Instant::now() + patience;
    let mut held = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    let mut started = 0;
    while held.len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} connections were open after {patience:?}",
            held.len()
        );
        while started < n && tasks.len() < concurrency {
            started += 1;
            tasks.spawn(async move {
                let mut conn = HttpConn::connect(addr, false).await?;
                tokio::time::timeout(REQUEST_TIMEOUT, conn.exchange())
                    .await
                    .context("the first request timed out")??;
                anyhow::Ok(conn)
            });
        }
        match tasks.join_next().await {
            Some(result) => {
                held.push(result?.with_context(|| {
                    format!("a connection failed with {} of {n} open", held.len())
                })?)
            }
            None => break,
        }
    }
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::app::BenchApp;

    /// Every request of the schedule is released once, sent, answered and
    /// counted once, whatever the pacer's timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fixed_rate_run_sends_every_scheduled_request_once() {
        let app = BenchApp::start().await.unwrap();
        // 4 connections at 256 requests a second in all: one request on
        // each every 15.625 ms, 16 each in 250 ms.
        let l = fixed_rate(app.addr(), 4, 256.0, Duration::from_millis(250))
            .await
            .unwrap();
        assert_eq!(l.histogram.len(), 64);
        assert_eq!(l.errors, 0);
    }

    /// An app slower than the schedule: every request after a
    /// connection's first falls due while the one before is unanswered,
    /// and is counted as queued.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_due_before_the_one_before_is_answered_are_counted_as_queued() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut buf = [0u8; 4096];
                    let answer = crate::bench::app::response_bytes();
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        read.extend_from_slice(&buf[..n]);
                        // Each whole request, its body too, answered late.
                        while let Some(end) = find_head_end(&read) {
                            let whole = end + content_length(&read[..end]).unwrap_or(0);
                            if read.len() < whole {
                                break;
                            }
                            read.drain(..whole);
                            tokio::time::sleep(Duration::from_millis(40)).await;
                            if tcp.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        // 2 connections at 200 requests a second: one due on each every
        // 10 ms, each answered after 40 ms at the earliest.
        let l = fixed_rate(addr, 2, 200.0, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(l.histogram.len(), 20);
        assert_eq!(l.queued, 18, "all but each connection's first");
        assert!(
            l.quantile_us(0.99) > 200_000.0,
            "timed from when they fell due"
        );
    }

    /// The built-in closed loop counts every request it makes and times
    /// each one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_loop_reports_its_rate_and_latencies() {
        let app = BenchApp::start().await.unwrap();
        let start = Instant::now();
        let closed = keepalive_rate(app.addr(), 2, Duration::from_secs(30), 50)
            .await
            .unwrap();
        // Bounded by the count, not the 30 s: 100 requests.
        let seconds = start.elapsed().as_secs_f64();
        assert!(seconds < 30.0);
        assert_eq!(closed.requests, 100);
        // The rate is of the loop's own time, within this test's: at least
        // 100 requests over all of it (a rate over the 30 s allowed, or
        // over nothing, would not be).
        assert!(
            closed.requests_per_s >= 100.0 / seconds && closed.requests_per_s.is_finite(),
            "{closed:?}"
        );
        assert!(
            closed.p50_us > 0.0 && closed.p50_us <= closed.p99_us,
            "{closed:?}"
        );
    }

    /// wrk runs the script, and its rate and percentiles are read from its
    /// output: real wrk against the benchmark's app.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrk_reports_its_rate_and_latencies() {
        let Some(wrk) = crate::bench::system::find_program("wrk") else {
            crate::machine::skip("skipped: needs wrk");
            return;
        };
        let app = BenchApp::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let closed = keepalive_rate_wrk(&wrk, dir.path(), app.addr(), 2, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(closed.requests_per_s > 0.0, "{closed:?}");
        // wrk's count of the requests over its rate: the seconds its run
        // of one second lasted, no less (a loaded machine may make it last
        // longer, which is the benchmark's to report, not a test's).
        let seconds = closed.requests as f64 / closed.requests_per_s;
        assert!(seconds >= 0.9 && seconds.is_finite(), "{closed:?}");
        assert!(
            closed.p50_us > 0.0 && closed.p50_us <= closed.p99_us,
            "{closed:?}"
        );
    }

    /// h2load against the app, when it is installed: a rate, latencies in
    /// order, and at least about a second's worth of requests.
    #[tokio::test]
    async fn h2load_reports_its_rate_and_latencies() {
        let Some(h2load) = crate::bench::system::find_program("h2load") else {
            crate::machine::skip("skipped: needs h2load");
            return;
        };
        let app = BenchApp::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let closed = http2_rate_h2load(
            &h2load,
            dir.path(),
            app.addr(),
            2,
            4,
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert!(closed.requests > 0, "{closed:?}");
        // The seconds its run of one second lasted, no less.
        let seconds = closed.requests as f64 / closed.requests_per_s;
        assert!(seconds >= 0.9 && seconds.is_finite(), "{closed:?}");
        assert!(
            closed.p50_us > 0.0 && closed.p50_us <= closed.p99_us,
            "{closed:?}"
        );
    }

    /// h2load's summary gives the rate and the count; any failed request
    /// or answer other than 2xx is an error that says so.
    #[test]
    fn h2load_output_with_failures_is_refused() {
        let good = "finished in 1.00s, 41234.50 req/s, 43.10MB/s\n\
                    requests: 41235 total, 41251 started, 41235 done, 41235 succeeded, 0 failed, 0 errored, 0 timeout\n\
                    status codes: 41235 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        assert_eq!(parse_h2load(good).unwrap(), (41235, 41234.5));
        // Answers that came in after the timed run's end have a status but
        // are not done.
        let late = good.replace("41235 2xx", "41238 2xx");
        assert_eq!(parse_h2load(&late).unwrap(), (41235, 41234.5));
        let failed = good.replace("41235 succeeded, 0 failed", "41200 succeeded, 35 failed");
        let e = parse_h2load(&failed).unwrap_err().to_string();
        assert!(
            e.contains("failed requests or answers other than 2xx"),
            "{e}"
        );
        let refused = good.replace("41235 2xx, 0 3xx, 0 4xx", "0 2xx, 0 3xx, 41235 4xx");
        assert!(parse_h2load(&refused).is_err());
        let e = parse_h2load("connect: Connection refused\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no request counts"), "{e}");
    }

    /// wrk's output without the script's line is an error that says so,
    /// as is one with failed requests.
    #[test]
    fn wrk_output_without_latencies_or_with_errors_is_refused() {
        let plain = "Running 1s test @ http://127.0.0.1:1/\n  1 threads and 2 connections\n\
                     Requests/sec:  21000.50\nTransfer/sec:      23.00MB\n";
        let e = parse_wrk(plain).unwrap_err().to_string();
        assert!(e.contains("no latencies from the script"), "{e}");
        let with = format!("{plain}{WRK_LATENCY} 75 240 21000\n");
        assert_eq!(
            parse_wrk(&with).unwrap(),
            ClosedLoop {
                requests: 21000,
                requests_per_s: 21000.5,
                p50_us: 75.0,
                p99_us: 240.0
            }
        );
        let failed = format!("{with}  Non-2xx or 3xx responses: 12\n");
        assert!(
            parse_wrk(&failed)
                .unwrap_err()
                .to_string()
                .contains("wrk saw errors")
        );
    }
}
