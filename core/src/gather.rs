//! Writes gathered over a few turns of a connection's task, so that what h2
//! writes for one gRPC call leaves in one TLS record and one segment.
//!
//! h2 writes a DATA frame of more than a few hundred bytes straight from
//! the message and flushes it before it takes the next frame; the frames
//! around it then leave in writes of their own. A unary answer of the
//! control plane (HEADERS, DATA, trailers) took two writes and woke its
//! caller twice; a request from a client (HEADERS, DATA, then an empty DATA
//! frame that ends the stream) took up to three. Both ends of the control
//! plane's gRPC connections wrap their TLS stream in [`GatheredWrites`], and
//! so do both HTTP/2 connections a sidecar serves a request on: the
//! caller's TLS stream and the app port's connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A connection that gathers its writes until its task has been polled
/// twice without adding to them, then sends them together.
///
/// A write only adds to a buffer. A flush that finds something gathered
/// sends nothing but asks for the task to be polled again, until two
/// flushes in a row find nothing new (h2 flushes on every poll of its
/// connection); that one sends everything. So what h2 writes after a flush
/// it makes in the middle of a turn, and what other tasks queue meanwhile,
/// leave together. A client's request needs the second quiet turn: hyper
/// sends its body from a task of its own, which may only run after the
/// connection's task has had a turn with the HEADERS. The waits are bounded: a
/// write that would take the buffer past [`GATHERED_AT_MOST`] sends what
/// is gathered first, and the flush after [`TURNS_AT_MOST`] that sent
/// nothing sends. Each wait costs one poll of the task, not a timer.
pub struct GatheredWrites<S> {
    inner: S,
    gathered: Vec<u8>,
    /// How much was gathered at the last flush that sent nothing.
    seen: usize,
    /// Flushes in a row that found nothing new.
    quiet: usize,
    /// Flushes in a row that sent nothing.
    waits: usize,
}

/// The most a connection gathers before it sends: one TLS record.
pub const GATHERED_AT_MOST: usize = 16 * 1024;

/// The most flushes in a row that wait for another turn instead of sending.
pub const TURNS_AT_MOST: usize = 8;

/// Flushes in a row that must find nothing new before one sends.
const QUIET_TURNS: usize = 2;

impl<S> GatheredWrites<S> {
    pub fn new(inner: S) -> Self {
        GatheredWrites {
            inner,
            gathered: Vec::new(),
            seen: 0,
            quiet: 0,
            waits: 0,
        }
    }
}

impl<S: AsyncWrite + Unpin> GatheredWrites<S> {
    /// Writes what is gathered; the buffer is freed once sent, so an idle
    /// connection holds none.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent = 0;
        while sent < self.gathered.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.gathered[sent..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // What is left has had its turns: the next flush sends.
                    self.gathered.drain(..sent);
                    self.seen = self.gathered.len();
                    return Poll::Pending;
                }
            }
        }
        self.gathered = Vec::new();
        self.seen = 0;
        self.quiet = 0;
        self.waits = 0;
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes: sends what is gathered if they
    /// would not fit.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.gathered.len() + len > GATHERED_AT_MOST {
            ready!(self.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GatheredWrites<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GatheredWrites<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        ready!(this.poll_room(cx, len))?;
        if len > GATHERED_AT_MOST {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        }
        for buf in bufs {
            this.gathered.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.gathered.is_empty() {
            if this.gathered.len() != this.seen {
                this.seen = this.gathered.len();
                this.quiet = 0;
            } else {
                this.quiet += 1;
            }
            if this.quiet < QUIET_TURNS && this.waits < TURNS_AT_MOST {
                // Something was added since the last flush: more may come
                // in this turn, or from tasks already woken (h2's stream
                // tasks queue frames for the connection's task). The task
                // is polled again, and flushes again, after they have run.
                this.waits += 1;
                cx.waker().wake_by_ref();
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_send(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::Wake;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use trellis_proto::identity::v1::identity_client::IdentityClient;
    use trellis_proto::identity::v1::identity_server::{Identity, IdentityServer};
    use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse};

    use super::*;

    /// A stream that records the length of every write that reaches it.
    struct Recording {
        inner: DuplexStream,
        writes: Arc<Mutex<Vec<usize>>>,
    }

    impl AsyncWrite for Recording {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let written = Pin::new(&mut this.inner).poll_write(cx, buf);
            if let Poll::Ready(Ok(n)) = written {
                this.writes.lock().unwrap().push(n);
            }
            written
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    impl AsyncRead for Recording {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl tonic::transport::server::Connected for GatheredWrites<Recording> {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    fn recording(inner: DuplexStream) -> (Recording, Arc<Mutex<Vec<usize>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let stream = Recording {
            inner,
            writes: writes.clone(),
        };
        (stream, writes)
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn flush(conn: Pin<&mut GatheredWrites<Recording>>, cx: &mut Context<'_>) {
        assert!(matches!(conn.poll_flush(cx), Poll::Ready(Ok(()))));
    }

    fn write(conn: Pin<&mut GatheredWrites<Recording>>, cx: &mut Context<'_>, bytes: &[u8]) {
        assert!(matches!(conn.poll_write(cx, bytes), Poll::Ready(Ok(n)) if n == bytes.len()));
    }

    #[tokio::test]
    async fn writes_leave_together_once_two_flushes_find_nothing_new() {
        let (near, mut far) = tokio::io::duplex(64 * 1024);
        let (stream, writes) = recording(near);
        let mut gathered = GatheredWrites::new(stream);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut conn = Pin::new(&mut gathered);

        // A turn writes and flushes: nothing is sent, the task is woken.
        write(conn.as_mut(), &mut cx, b"headers");
        flush(conn.as_mut(), &mut cx);
        assert!(writes.lock().unwrap().is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // The next turn adds more (another task queued it meanwhile).
        write(conn.as_mut(), &mut cx, b"+data");
        flush(conn.as_mut(), &mut cx);
        // A turn that adds nothing still waits once more...
        flush(conn.as_mut(), &mut cx);
        assert!(writes.lock().unwrap().is_empty());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
        // ...and the second in a row sends everything, in one write.
        flush(conn.as_mut(), &mut cx);
        assert_eq!(*writes.lock().unwrap(), [12]);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
        let mut got = [0; 12];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"headers+data");
        // Nothing gathered: a flush is a flush, and wakes nothing.
        flush(conn.as_mut(), &mut cx);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 3);
        assert_eq!(gathered.gathered.capacity(), 0, "a sent buffer is freed");
    }

    #[tokio::test]
    async fn a_connection_that_keeps_writing_still_sends() {
        let (near, _far) = tokio::io::duplex(64 * 1024);
        let (stream, writes) = recording(near);
        let mut gathered = GatheredWrites::new(stream);
        let waker = std::task::Waker::from(Arc::new(Wakes::default()));
        let mut cx = Context::from_waker(&waker);
        let mut conn = Pin::new(&mut gathered);
        for turn in 0..TURNS_AT_MOST {
            write(conn.as_mut(), &mut cx, b"x");
            flush(conn.as_mut(), &mut cx);
            assert!(writes.lock().unwrap().is_empty(), "turn {turn}");
        }
        write(conn.as_mut(), &mut cx, b"x");
        flush(conn.as_mut(), &mut cx);
        assert_eq!(*writes.lock().unwrap(), [TURNS_AT_MOST + 1]);
    }

    #[tokio::test]
    async fn shutdown_and_a_full_buffer_send_what_is_gathered() {
        let (near, mut far) = tokio::io::duplex(256 * 1024);
        let (stream, writes) = recording(near);
        let mut gathered = GatheredWrites::new(stream);
        let near_limit = vec![1u8; GATHERED_AT_MOST - 10];
        gathered.write_all(&near_limit).await.unwrap();
        assert!(writes.lock().unwrap().is_empty());
        // Eleven more bytes would pass the bound: what is gathered goes first.
        gathered.write_all(&[2u8; 11]).await.unwrap();
        assert_eq!(*writes.lock().unwrap(), [GATHERED_AT_MOST - 10]);
        // A write larger than the bound goes straight through.
        let large = vec![3u8; GATHERED_AT_MOST + 1];
        gathered.write_all(&large).await.unwrap();
        assert_eq!(
            *writes.lock().unwrap(),
            [GATHERED_AT_MOST - 10, 11, GATHERED_AT_MOST + 1]
        );
        gathered.write_all(b"last").await.unwrap();
        gathered.shutdown().await.unwrap();
        assert_eq!(writes.lock().unwrap().last(), Some(&4));
        let mut all = Vec::new();
        far.read_to_end(&mut all).await.unwrap();
        assert_eq!(
            all.len(),
            GATHERED_AT_MOST - 10 + 11 + GATHERED_AT_MOST + 1 + 4
        );
        assert!(all.ends_with(b"last"));
    }

    /// Answers every Certify with a chain of a kilobyte, as a real one is.
    struct KilobyteChain;

    #[tonic::async_trait]
    impl Identity for KilobyteChain {
        async fn certify(
            &self,
            _: tonic::Request<CertifyRequest>,
        ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
            Ok(tonic::Response::new(CertifyResponse {
                chain: vec![vec![7; 1024]],
                ..Default::default()
            }))
        }
    }

    /// A real tonic server and client over an in-memory stream, each end
    /// gathering its writes as the control plane and its clients do: a
    /// unary request (HEADERS, DATA, and an empty DATA frame that ends the
    /// stream) and its answer (HEADERS, a DATA frame too large for h2 to
    /// copy, trailers) each cross in one write. Without the gathering the
    /// answer takes two writes and the request up to three.
    ///
    /// On one thread the order of the tasks is fixed, so this holds every
    /// time. With more threads (the control plane's and the sidecar's
    /// runtimes) it holds for nearly every call, not all: a request's body
    /// task that another thread runs late can miss the two turns the
    /// connection waits, and that request then leaves in two writes (the
    /// benchmark's clients: 1.04 writes a request, where it was 2.7-2.9).
    #[tokio::test]
    async fn a_unary_call_crosses_in_one_write_each_way() {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let (stream, answers) = recording(server_end);
        let incoming =
            tonic::codegen::tokio_stream::iter([Ok::<_, io::Error>(GatheredWrites::new(stream))]);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(KilobyteChain))
                .serve_with_incoming(incoming),
        );
        let (stream, requests) = recording(client_end);
        let mut client_end = Some(GatheredWrites::new(stream));
        let channel = tonic::transport::Endpoint::from_static("http://in-memory")
            .connect_with_connector(tower::service_fn(move |_| {
                let io = client_end.take();
                async move {
                    io.map(hyper_util::rt::TokioIo::new)
                        .ok_or_else(|| io::Error::other("one connection only"))
                }
            }))
            .await
            .unwrap();
        let mut client = IdentityClient::new(channel);
        let request = || CertifyRequest {
            csr: vec![9; 512],
            ..Default::default()
        };
        // The first call also settles the connection (SETTINGS and their
        // acknowledgements); the ones after it are what a caller pays.
        client.certify(request()).await.unwrap();
        for _ in 0..5 {
            let before = (
                requests.lock().unwrap().len(),
                answers.lock().unwrap().len(),
            );
            let answer = client.certify(request()).await.unwrap();
            assert_eq!(answer.into_inner().chain[0].len(), 1024);
            let sent: Vec<usize> = requests.lock().unwrap()[before.0..].to_vec();
            let answered: Vec<usize> = answers.lock().unwrap()[before.1..].to_vec();
            assert_eq!(sent.len(), 1, "writes for one request: {sent:?}");
            assert_eq!(answered.len(), 1, "writes for one answer: {answered:?}");
        }
    }
}
