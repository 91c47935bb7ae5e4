//! A transparent connection to a service's virtual address, from the
//! resolved destination on, with real sockets on loopback: the original
//! destination a redirected connection carries needs iptables (and root),
//! so these tests hand it to [`forward_transparent`] themselves.
//!
//! Whether a destination is outside the mesh, or this pod, is read from the
//! snapshot and the sidecar's own addresses, never from the host's: a
//! documentation address standing for one outside (`192.0.2.7`) is outside
//! whatever the host has, and under `deny` it is never dialled.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use trellis_core::revocation::Revocations;
use trellis_core::{SpiffeId, TrustDomain};
use trellis_proto::discovery::v1 as pb;

use super::*;
use crate::identity::Svid;

const VIP: &str = "10.96.0.10:80";
/// Bytes no HTTP starts with: detection settles on opaque TCP at once.
const MESSAGE: &[u8] = b"\x01\x02 to a backend";

fn id(name: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://td.test/ns/shop/sa/{name}")).unwrap()
}

/// A throwaway CA and the TLS state of sidecars it certifies.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl Ca {
    /// A CA named apart from every other one made here, as two meshes'
    /// CAs are: a certificate of one is of an unknown issuer to the other.
    fn new() -> Self {
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("test CA {n}"));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let root = params.self_signed(&key).unwrap().der().clone();
        Ca {
            issuer: Issuer::new(params, key),
            root,
        }
    }

    /// A root as the control plane generates one for `td.test`: every
    /// such root has the same trust domain, as two meshes' roots of the
    /// default trust domain do.
    fn generated() -> Self {
        let td = TrustDomain::new("td.test").unwrap();
        let (_, cert_pem, key_pem) =
            trellis_control_plane::ca::CertificateAuthority::generate(&td).unwrap();
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
        Ca {
            issuer,
            root: CertificateDer::from(pem.contents),
        }
    }

    /// What a sidecar holding an SVID of `me` has, dialling `expected`.
    fn tls(&self, me: &SpiffeId, expected: &[SpiffeId]) -> Arc<TlsState> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(me.as_str().try_into().unwrap())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let svid = Svid::new(me, vec![cert.der().clone()], der).unwrap();
        let root = self.root.clone();
        let td = TrustDomain::new("td.test").unwrap();
        Arc::new(TlsState::build(Some(&svid), &[root], &td, expected).unwrap())
    }
}

/// A backend on loopback that echoes every byte and closes at EOF: over
/// mTLS with `tls` (a stand-in for a sidecar's inbound), or plain TCP.
/// Counts the connections that reached its app.
async fn backend(tls: Option<Arc<TlsState>>) -> (SocketAddr, watch::Receiver<usize>) {
    backend_on(Ipv4Addr::LOCALHOST.into(), tls).await
}

/// [`backend`], listening on `ip`.
async fn backend_on(
    ip: IpAddr,
    tls: Option<Arc<TlsState>>,
) -> (SocketAddr, watch::Receiver<usize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (served_tx, served) = watch::channel(0);
    let acceptor = tls.map(|tls| tokio_rustls::TlsAcceptor::from(tls.server().unwrap().clone()));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, served_tx) = (acceptor.clone(), served_tx.clone());
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        served_tx.send_modify(|n| *n += 1);
                        echo(tls).await;
                    }
                    None => {
                        served_tx.send_modify(|n| *n += 1);
                        echo(tcp).await;
                    }
                }
            });
        }
    });
    (addr, served)
}

async fn echo(io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite) {
    let (mut r, mut w) = tokio::io::split(io);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// A port on loopback that refuses connections: bound, so no other test
/// takes it, and never listening. Held until dropped.
struct Refusing {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

fn refusing() -> Refusing {
    refusing_on(Ipv4Addr::LOCALHOST.into())
}

/// [`refusing`], on `ip`.
fn refusing_on(ip: IpAddr) -> Refusing {
    let any = SocketAddr::new(ip, 0);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(any),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.bind(&any.into()).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    Refusing {
        addr,
        _socket: socket,
    }
}

/// A port on loopback that answers no connection, as a pod on a node that
/// went down: a listener whose accept queue is full, so the kernel drops
/// every SYN for it without a reply. Held until dropped.
struct Silent {
    addr: SocketAddr,
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
}

fn silent() -> Silent {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    // A backlog of 0 queues one connection; the next SYN finds it full.
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(300)) {
            Ok(tcp) => queued.push(tcp),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Silent {
                    addr,
                    _listener: listener,
                    _queued: queued,
                };
            }
            Err(e) => panic!("filling the accept queue of {addr}: {e}"),
        }
    }
    panic!(
        "{addr} still answers after {} queued connections",
        queued.len()
    );
}

/// A sidecar of `shop/web` whose snapshot has the service `shop/api` at
/// [`VIP`] with `backends`, those of `mesh` being endpoints of `shop/api`;
/// port 5432 is opaque.
fn sidecar(
    ca: &Ca,
    outbound_policy: &str,
    backends: &[SocketAddr],
    mesh: &[SocketAddr],
) -> Arc<Shared> {
    let metrics = Arc::new(Metrics::new());
    let raw = pb::Snapshot {
        version: 1,
        endpoints: mesh
            .iter()
            .map(|a| pb::Endpoint {
                address: a.to_string(),
                spiffe_id: id("api").as_str().into(),
            })
            .collect(),
        services: vec![pb::Service {
            address: VIP.into(),
            name: "shop/api".into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..Default::default()
        }],
        mesh: Some(pb::MeshConfig {
            outbound_policy: outbound_policy.into(),
            opaque_ports: vec![5432],
            ..Default::default()
        }),
        ..Default::default()
    };
    let snapshot = Snapshot::compile(raw, &id("web"), &metrics).unwrap();
    let (_, tls) = watch::channel(ca.tls(&id("web"), &[id("api")]));
    let (_, policies) = watch::channel(Some(snapshot.policies.clone()));
    let (_, snapshot) = watch::channel(Some(Arc::new(snapshot)));
    Arc::new(Shared {
        tls,
        snapshot,
        policies,
        metrics,
        own_addrs: Vec::new(),
        plaintext_listeners: Vec::new(),
        user_timeout: Some(trellis_core::tcp::DEFAULT_USER_TIMEOUT),
        peer_refusals: Throttle::new(crate::inbound::REFUSAL_LOG_PAUSE),
    })
}

/// The app's connection to `dst`, as the sidecar's transparent listener
/// would take it over; the task ends when the sidecar is done with it.
async fn call(shared: &Arc<Shared>, dst: &str) -> (TcpStream, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (tcp, client) = listener.accept().await.unwrap();
    let (shared, dst) = (shared.clone(), dst.parse().unwrap());
    let task = tokio::spawn(async move { forward_transparent(&shared, tcp, client, dst).await });
    (app, task)
}

/// Sends [`MESSAGE`] on a call to `dst` and returns what came back; the
/// sidecar is done with the call (and has counted it) on return.
async fn round_trip(shared: &Arc<Shared>, dst: &str) -> Vec<u8> {
    let (mut app, task) = call(shared, dst).await;
    app.write_all(MESSAGE).await.unwrap();
    app.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = app.read_to_end(&mut answer).await;
    task.await.unwrap();
    answer
}

/// The value of the series `series` (name and labels, as exposed).
fn counted(shared: &Shared, series: &str) -> u64 {
    let text = shared.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn outcome(shared: &Shared, outcome: &str) -> u64 {
    counted(
        shared,
        &format!("trellis_connections_total{{direction=\"outbound\",outcome=\"{outcome}\"}}"),
    )
}

/// The text lines logged on this thread while the guard [`Logged::capture`]
/// returns lives: a test on the current-thread runtime runs the sidecar's
/// tasks there too.
#[derive(Clone, Default)]
struct Logged(Arc<Mutex<Vec<u8>>>);

impl io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Logged {
    fn capture() -> (Logged, tracing::subscriber::DefaultGuard) {
        let logged = Logged::default();
        let writer = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    /// The one line holding `message`; fails showing every line if there
    /// is none or more than one.
    fn line(&self, message: &str) -> String {
        let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(message)).collect();
        assert_eq!(lines.len(), 1, "one line with {message:?} in:\n{text}");
        lines[0].to_owned()
    }
}

fn retried(shared: &Shared, reason: &str) -> u64 {
    counted(
        shared,
        &format!("trellis_service_connect_retries_total{{reason=\"{reason}\"}}"),
    )
}

/// A backend whose pod is gone (its port refuses) while the service still
/// lists it: every call gets through, those picked for it by the other
/// backend, and each detour is counted.
#[tokio::test]
async fn a_call_picked_for_a_backend_that_refuses_goes_to_another() {
    let ca = Ca::new();
    let (alive, served) = backend(Some(ca.tls(&id("api"), &[]))).await;
    let gone = refusing();
    let shared = sidecar(&ca, "deny", &[gone.addr, alive], &[gone.addr, alive]);
    for _ in 0..4 {
        assert_eq!(round_trip(&shared, VIP).await, MESSAGE);
    }
    assert_eq!(*served.borrow(), 4);
    assert_eq!(outcome(&shared, "forwarded"), 4);
    assert_eq!(
        retried(&shared, "refused"),
        2,
        "the calls picked for the gone backend, in turn"
    );
    assert_eq!(outcome(&shared, "refused"), 0);
}

/// A backend that answers nothing (a pod on a node that went down) while
/// the service still lists it: a call picked for it goes on to the other
/// backend after two seconds, not the ten a connection may otherwise take,
/// and the detour is counted as a timeout.
#[tokio::test]
async fn a_backend_that_answers_nothing_is_given_up_early_for_another() {
    let ca = Ca::new();
    let (alive, served) = backend(Some(ca.tls(&id("api"), &[]))).await;
    let gone = silent();
    let shared = sidecar(&ca, "deny", &[gone.addr, alive], &[gone.addr, alive]);
    // Each of the two calls is picked for one backend in turn. Well under
    // the full connect timeout, so a call that waited it fails here.
    let both = async {
        for _ in 0..2 {
            assert_eq!(round_trip(&shared, VIP).await, MESSAGE);
        }
    };
    tokio::time::timeout(net::CONNECT_TIMEOUT - Duration::from_secs(2), both)
        .await
        .expect("the call picked for the silent backend waited the full connect timeout");
    assert_eq!(*served.borrow(), 2);
    assert_eq!(retried(&shared, "timeout"), 1);
    assert_eq!(outcome(&shared, "forwarded"), 2);
}

/// The last backend a call may try is given the full connect timeout: a
/// slow answer there is the call's last chance.
#[test]
fn only_attempts_with_another_backend_after_them_are_cut_short() {
    assert_eq!(
        attempt_timeout(1, 1),
        net::CONNECT_TIMEOUT,
        "the only backend"
    );
    assert_eq!(attempt_timeout(1, 2), BACKEND_ATTEMPT_TIMEOUT);
    assert_eq!(attempt_timeout(2, 2), net::CONNECT_TIMEOUT);
    assert_eq!(attempt_timeout(2, 10), BACKEND_ATTEMPT_TIMEOUT);
    assert_eq!(
        attempt_timeout(MAX_BACKENDS, 10),
        net::CONNECT_TIMEOUT,
        "the last of the {MAX_BACKENDS} a call tries"
    );
    assert!(BACKEND_ATTEMPT_TIMEOUT < net::CONNECT_TIMEOUT);
}

/// Once a connection to a backend exists, nothing is retried: a backend
/// presenting another identity than the mesh says refuses the call,
/// whatever other backend would have answered.
#[tokio::test]
async fn a_backend_presenting_another_identity_is_refused_never_retried() {
    let ca = Ca::new();
    let (alive, served) = backend(Some(ca.tls(&id("api"), &[]))).await;
    let (impostor, fooled) = backend(Some(ca.tls(&id("impostor"), &[]))).await;
    let shared = sidecar(&ca, "deny", &[impostor, alive], &[impostor, alive]);
    let answers = [
        round_trip(&shared, VIP).await,
        round_trip(&shared, VIP).await,
    ];
    assert_eq!(
        answers.iter().filter(|a| a.as_slice() == MESSAGE).count(),
        1,
        "one call in two is picked for the impostor and refused: {answers:?}"
    );
    assert_eq!(
        *served.borrow(),
        1,
        "the refused call went on to another backend"
    );
    assert_eq!(*fooled.borrow(), 0);
    assert_eq!(outcome(&shared, "refused"), 1);
    assert_eq!(
        counted(
            &shared,
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"unexpected_identity\"}"
        ),
        1
    );
    assert_eq!(retried(&shared, "refused"), 0);
}

/// A call whose backends all refuse tries [`MAX_BACKENDS`] of them, then
/// is refused as a failed dial.
#[tokio::test]
async fn a_call_tries_at_most_three_backends() {
    let ca = Ca::new();
    let held: Vec<Refusing> = (0..5).map(|_| refusing()).collect();
    let gone: Vec<SocketAddr> = held.iter().map(|r| r.addr).collect();
    let shared = sidecar(&ca, "deny", &gone, &gone);
    assert_eq!(round_trip(&shared, VIP).await, b"");
    assert_eq!(retried(&shared, "refused"), MAX_BACKENDS as u64 - 1);
    assert_eq!(outcome(&shared, "refused"), 1);
}

/// Under outbound `passthrough` a backend outside the mesh is plain TCP,
/// retried the same way; a call whose mesh backend refused goes on to one
/// outside with the bytes detection read from the app first. A direct
/// destination is never retried.
#[tokio::test]
async fn passthrough_retries_on_plain_tcp_and_after_a_mesh_backend() {
    let ca = Ca::new();
    let (outside, served) = backend(None).await;
    let gone = refusing();
    let shared = sidecar(&ca, "passthrough", &[gone.addr, outside], &[]);
    for _ in 0..4 {
        assert_eq!(round_trip(&shared, VIP).await, MESSAGE);
    }
    assert_eq!(*served.borrow(), 4);
    assert_eq!(outcome(&shared, "passthrough"), 4);
    assert_eq!(retried(&shared, "refused"), 2);

    let gone_mesh = refusing();
    let shared = sidecar(
        &ca,
        "passthrough",
        &[gone_mesh.addr, outside],
        &[gone_mesh.addr],
    );
    for _ in 0..2 {
        assert_eq!(round_trip(&shared, VIP).await, MESSAGE);
    }
    assert_eq!(*served.borrow(), 6);
    assert_eq!(outcome(&shared, "passthrough"), 2);
    assert_eq!(retried(&shared, "refused"), 1);

    assert_eq!(round_trip(&shared, &gone.addr.to_string()).await, b"");
    assert_eq!(outcome(&shared, "connect_failed"), 1);
    assert_eq!(retried(&shared, "refused"), 1, "a direct call was retried");
}

/// Sends [`MESSAGE`] on a call to `dst`, keeping its own side open as an
/// app awaiting an answer does, and says how the call ended for the app:
/// `fin` or `reset`, after the bytes that came back.
async fn how_it_ends(shared: &Arc<Shared>, dst: &str) -> (&'static str, Vec<u8>) {
    how_it_ends_after(shared, dst, &[MESSAGE], false).await
}

/// [`how_it_ends`] for an app that sends `segments` one after another,
/// each in a write of its own, and half-closes after them if `half_close`.
async fn how_it_ends_after(
    shared: &Arc<Shared>,
    dst: &str,
    segments: &[&[u8]],
    half_close: bool,
) -> (&'static str, Vec<u8>) {
    let (mut app, task) = call(shared, dst).await;
    app.set_nodelay(true).unwrap();
    for (i, segment) in segments.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.write_all(segment).await.unwrap();
    }
    if half_close {
        app.shutdown().await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let read = tokio::time::timeout(Duration::from_secs(5), app.read(&mut buf))
            .await
            .expect("the call neither ended nor was reset within 5 s");
        match read {
            Ok(0) => break "fin",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("reading: {e}"),
        }
    };
    task.await.unwrap();
    (end, got)
}

/// An opaque TCP call that fails before anything came back is reset at
/// the app, never ended with a FIN it could take for the server's orderly
/// close: a mesh backend that refuses the connection (a single one, or
/// every one tried), a passthrough destination that refuses, and a call the sidecar refuses
/// itself, to a port declared opaque too.
#[tokio::test]
async fn an_opaque_call_that_fails_before_an_answer_is_reset_at_the_app() {
    let ca = Ca::new();
    let gone = refusing();
    let shared = sidecar(&ca, "deny", &[gone.addr], &[gone.addr]);
    assert_eq!(how_it_ends(&shared, VIP).await, ("reset", Vec::new()));
    assert_eq!(outcome(&shared, "refused"), 1, "a failed mesh dial");
    let direct = gone.addr.to_string();
    assert_eq!(how_it_ends(&shared, &direct).await, ("reset", Vec::new()));
    assert_eq!(outcome(&shared, "refused"), 2, "a failed direct mesh dial");

    let held: Vec<Refusing> = (0..3).map(|_| refusing()).collect();
    let all_gone: Vec<SocketAddr> = held.iter().map(|r| r.addr).collect();
    let shared = sidecar(&ca, "deny", &all_gone, &all_gone);
    assert_eq!(how_it_ends(&shared, VIP).await, ("reset", Vec::new()));
    assert_eq!(retried(&shared, "refused"), 2);
    assert_eq!(outcome(&shared, "refused"), 1);

    let shared = sidecar(&ca, "passthrough", &[], &[]);
    assert_eq!(how_it_ends(&shared, &direct).await, ("reset", Vec::new()));
    assert_eq!(outcome(&shared, "connect_failed"), 1);

    let shared = sidecar(&ca, "deny", &[], &[]);
    assert_eq!(how_it_ends(&shared, VIP).await, ("reset", Vec::new()));
    assert_eq!(outcome(&shared, "no_backend"), 1);
    let outside = "192.0.2.7:80";
    assert_eq!(how_it_ends(&shared, outside).await, ("reset", Vec::new()));
    assert_eq!(outcome(&shared, "denied"), 1);
    let outside_opaque = "192.0.2.7:5432";
    assert_eq!(
        how_it_ends(&shared, outside_opaque).await,
        ("reset", Vec::new())
    );
    assert_eq!(outcome(&shared, "denied"), 2);
}

/// An app whose first bytes only may begin an HTTP request, which
/// detection takes for HTTP (a text protocol pausing mid-line, `ping`; or
/// the start of a method and the end of its stream, `GE`), but that sends
/// no whole request head, cannot be answered when its call is refused: it
/// is reset, never ended with a FIN it could take for its server's
/// orderly close. An HTTP/1.0 request that comes in pieces and is
/// half-closed after it is still answered.
#[tokio::test]
async fn an_app_taken_for_http_that_sends_no_request_head_is_reset_when_refused() {
    let ca = Ca::new();
    let shared = sidecar(&ca, "deny", &[], &[]);
    let outside = "192.0.2.7:80";
    let paused = how_it_ends_after(&shared, outside, &[b"ping"], false).await;
    assert_eq!(paused, ("reset", Vec::new()), "an app paused mid-line");
    assert_eq!(outcome(&shared, "denied"), 1);
    let ended = how_it_ends_after(&shared, outside, &[b"GE"], true).await;
    assert_eq!(ended, ("reset", Vec::new()), "an app that half-closed");
    assert_eq!(outcome(&shared, "denied"), 2);

    let pieces: [&[u8]; 3] = [b"GET /orders HT", b"TP/1.0\r\nhost: api", b".shop\r\n\r\n"];
    let (end, answer) = how_it_ends_after(&shared, outside, &pieces, true).await;
    let answer = String::from_utf8(answer).unwrap();
    assert_eq!(end, "fin", "{answer}");
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert_eq!(proxy_error(&answer), Some("denied"), "{answer}");
    assert_eq!(outcome(&shared, "denied"), 3);
}

/// Sends an HTTP/1 request on a call to `dst` and returns what came back,
/// the sidecar done with the call.
async fn http_round_trip(shared: &Arc<Shared>, dst: &str) -> String {
    let (mut app, task) = call(shared, dst).await;
    app.write_all(b"GET /orders HTTP/1.1\r\nhost: api.shop\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = app.read_to_end(&mut answer).await;
    drop(app);
    task.await.unwrap();
    String::from_utf8(answer).unwrap()
}

/// The `trellis-proxy-error` of an HTTP/1 answer as it came, if its head
/// has one.
fn proxy_error(answer: &str) -> Option<&str> {
    let (head, _) = answer.split_once("\r\n\r\n")?;
    head.split("\r\n")
        .find_map(|line| line.strip_prefix("trellis-proxy-error: "))
}

/// An HTTP/1 app whose call is refused before anything of it left the pod
/// is told so in an answer naming the address it called and why, marked
/// as the sidecar's (`trellis-proxy-error`), not left with a closed
/// connection; other protocols, and any call to an opaque port, are
/// reset ([`an_opaque_call_that_fails_before_an_answer_is_reset_at_the_app`]).
#[tokio::test]
async fn an_http1_call_refused_is_answered_with_why() {
    let ca = Ca::new();
    let held: Vec<Refusing> = (0..2).map(|_| refusing()).collect();
    let gone: Vec<SocketAddr> = held.iter().map(|r| r.addr).collect();
    let shared = sidecar(&ca, "deny", &gone, &gone);
    let answer = http_round_trip(&shared, VIP).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(
            "\r\n\r\ntrellis: outbound call to {VIP} refused: dialling 127.0.0.1:"
        )),
        "{answer}"
    );
    assert!(answer.contains("(connect_failed)\n"), "{answer}");
    assert_eq!(proxy_error(&answer), Some("connect_failed"), "{answer}");
    assert_eq!(outcome(&shared, "refused"), 1);

    let answer = http_round_trip(&shared, "192.0.2.7:80").await;
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(
        answer.ends_with(
            "trellis: outbound call to 192.0.2.7:80 refused: 192.0.2.7:80 is outside the \
             mesh, and the outbound policy is deny\n"
        ),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("denied"), "{answer}");
    assert_eq!(outcome(&shared, "denied"), 1);
    assert_eq!(round_trip(&shared, "192.0.2.7:80").await, b"", "not HTTP");
    assert_eq!(
        http_round_trip(&shared, "192.0.2.7:5432").await,
        "",
        "an opaque port is never looked at"
    );
    assert_eq!(outcome(&shared, "denied"), 3);

    let (impostor, fooled) = backend(Some(ca.tls(&id("impostor"), &[]))).await;
    let shared = sidecar(&ca, "deny", &[impostor], &[impostor]);
    let answer = http_round_trip(&shared, VIP).await;
    assert!(
        answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
        "{answer}"
    );
    assert!(answer.contains("(unexpected_identity)\n"), "{answer}");
    assert_eq!(proxy_error(&answer), Some("handshake_failed"), "{answer}");
    assert_eq!(*fooled.borrow(), 0);

    let shared = sidecar(&ca, "deny", &[], &[]);
    let answer = http_round_trip(&shared, VIP).await;
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{answer}"
    );
    assert!(
        answer.ends_with("refused: service shop/api has no ready backend\n"),
        "{answer}"
    );
    assert_eq!(proxy_error(&answer), Some("no_backend"), "{answer}");
}

/// A passthrough call to a port that refuses is answered `connect_failed`,
/// its text ending with that same reason in parentheses, as a failed mesh
/// dial's does, and counted and logged under it.
#[tokio::test]
async fn a_passthrough_call_that_cannot_connect_ends_its_text_with_its_token() {
    let (logs, _guard) = Logged::capture();
    let ca = Ca::new();
    let gone = refusing();
    let shared = sidecar(&ca, "passthrough", &[], &[]);
    let answer = http_round_trip(&shared, &gone.addr.to_string()).await;
    let addr = gone.addr;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("connect_failed"),
            format!(
                "trellis: outbound call to {addr} refused: connecting to {addr}: Connection \
                 refused (os error 111) (connect_failed)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    assert_eq!(outcome(&shared, "connect_failed"), 1);
    let line = logs.line("outbound passthrough failed");
    assert!(line.contains(" reason=connect_failed "), "{line}");
}

/// A non-loopback address of this host, standing for the pod's own (which
/// is never loopback): the source a socket bound to no address takes
/// toward an address off the host (nothing is sent). `None` on a host with
/// no route off itself.
fn pod_address() -> Option<IpAddr> {
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    udp.connect("203.0.113.1:9").ok()?;
    let ip = udp.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A service whose backend is this pod's own address is plain TCP that
/// never leaves the pod, under `deny` too, counted as `same_pod`; a port
/// there that refuses is answered, counted and logged `connect_failed`, as
/// a passthrough call is.
///
/// Runs without root, where the host has an address other than loopback;
/// `tests/outbound_same_pod.rs` checks the same with a whole sidecar behind
/// `init`'s interception, in a network namespace of its own with an
/// address on `eth0`, wherever it runs as root.
#[tokio::test]
async fn a_call_to_this_pods_own_address_is_plain_tcp_within_the_pod() {
    let Some(pod) = pod_address() else {
        crate::machine::note(
            "skipped: the host has no address but loopback (tests/outbound_same_pod.rs checks this \
             in a network namespace)",
        );
        return;
    };
    let (logs, _guard) = Logged::capture();
    let ca = Ca::new();
    let inbound = SocketAddr::new(pod, 15006);
    let own = |s: &mut Shared| s.own_addrs = vec![inbound];

    let (app, served) = backend_on(pod, None).await;
    let shared = changed(sidecar(&ca, "deny", &[app], &[]), own);
    assert_eq!(round_trip(&shared, VIP).await, MESSAGE, "plain TCP echoed");
    assert_eq!(*served.borrow(), 1);
    assert_eq!(outcome(&shared, "same_pod"), 1);
    assert_eq!(outcome(&shared, "passthrough"), 0);

    let gone = refusing_on(pod);
    let shared = changed(sidecar(&ca, "deny", &[gone.addr], &[]), own);
    let answer = http_round_trip(&shared, VIP).await;
    let addr = gone.addr;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("connect_failed"),
            format!(
                "trellis: outbound call to 10.96.0.10:80 refused: connecting to {addr}: \
                 Connection refused (os error 111) (connect_failed)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    assert_eq!(outcome(&shared, "connect_failed"), 1);
    let line = logs.line("outbound connection within the pod failed");
    assert!(line.contains(" reason=connect_failed "), "{line}");
}

/// Each address of a peer identity is its own TLS name (its tickets are
/// kept apart), IPv4 and IPv6 alike; a host name keeps the shared one.
#[test]
fn a_peer_is_named_by_its_address() {
    let named = |addr: &str| peer_name(addr.parse().unwrap());
    let dns = |name: &str| ServerName::try_from(name.to_owned()).unwrap();
    assert_eq!(named("10.0.0.7:15006"), dns("10-0-0-7-15006.trellis.mesh"));
    assert_eq!(
        named("[fd00::1]:15006"),
        dns("fd00-0-0-0-0-0-0-1-15006.trellis.mesh")
    );
    assert_ne!(named("10.0.0.7:15006"), named("10.0.0.8:15006"));
    assert_eq!(remote_name("10.0.0.7:15006"), named("10.0.0.7:15006"));
    assert_eq!(remote_name("api.shop.svc:15006"), dns("trellis.mesh"));
}

/// A port standing for the transparent listener: each connection to it is
/// taken over as a call to `dst`.
async fn redirecting_to(shared: &Arc<Shared>, dst: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shared, dst): (_, SocketAddr) = (shared.clone(), dst.parse().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, client)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move { forward_transparent(&shared, tcp, client, dst).await });
        }
    });
    addr
}

/// `curl --http2-prior-knowledge url`: the status and the body; `None`
/// when curl is not installed.
async fn curl_h2(url: &str) -> Option<(String, String)> {
    let mut curl = tokio::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--http2-prior-knowledge"])
        .args(["--write-out", "\n%{http_version} %{http_code}", url]);
    let out = match curl.output().await {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            crate::machine::skip("skipped: curl not installed");
            return None;
        }
        Err(e) => panic!("curl: {e}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl {url}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (body, status) = stdout.rsplit_once('\n').unwrap();
    Some((status.to_owned(), body.to_owned()))
}

/// A gRPC call (a health check) through a port of [`redirecting_to`]: the
/// status it failed with.
async fn grpc_call(port: SocketAddr) -> tonic::Status {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect_err("a refused call was answered")
}

/// An HTTP/2 app (curl with prior knowledge, a gRPC client) whose call is
/// refused is answered on its first request, as an HTTP/1 app is: a
/// status with a text body, or for gRPC a `grpc-status` with the same
/// words as its message, naming the address it called and why, and
/// `trellis-proxy-error` naming it in a token.
#[tokio::test]
async fn an_http2_or_grpc_call_refused_is_answered_with_why() {
    let ca = Ca::new();
    let shared = sidecar(&ca, "deny", &[], &[]);
    let outside = "192.0.2.7:80";
    let denied = format!(
        "trellis: outbound call to {outside} refused: {outside} is outside the mesh, and the \
         outbound policy is deny"
    );
    let no_backend =
        format!("trellis: outbound call to {VIP} refused: service shop/api has no ready backend");

    let to_outside = redirecting_to(&shared, outside).await;
    let to_service = redirecting_to(&shared, VIP).await;
    if let Some((status, body)) = curl_h2(&format!("http://{to_outside}/orders")).await {
        assert_eq!(status, "2 403", "{body}");
        assert_eq!(body, format!("{denied}\n"));
        let (status, body) = curl_h2(&format!("http://{to_service}/orders"))
            .await
            .unwrap();
        assert_eq!(status, "2 503", "{body}");
        assert_eq!(body, format!("{no_backend}\n"));
    }

    let marked = |refused: &tonic::Status| {
        let value = refused.metadata().get("trellis-proxy-error");
        value.map(|v| v.to_str().unwrap().to_owned())
    };
    let refused = grpc_call(to_outside).await;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(refused.message(), denied);
    assert_eq!(marked(&refused).as_deref(), Some("denied"), "{refused:?}");
    let refused = grpc_call(to_service).await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.message(), no_backend);
    assert_eq!(
        marked(&refused).as_deref(),
        Some("no_backend"),
        "{refused:?}"
    );
}

/// [`sidecar`], then changed by `change` before any call.
fn changed(shared: Arc<Shared>, change: impl FnOnce(&mut Shared)) -> Arc<Shared> {
    let mut shared = Arc::into_inner(shared).expect("no call made yet");
    change(&mut shared);
    Arc::new(shared)
}

/// An HTTP/1 answer's status line, `trellis-proxy-error` and body.
fn refusal(answer: &str) -> (&str, Option<&str>, &str) {
    let status = answer.split("\r\n").next().unwrap_or_default();
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, proxy_error(answer), body)
}

/// A call to a service whose ready backends are all outside the mesh,
/// under outbound `deny`, is told no backend of it is in the mesh, not
/// that it has none.
#[tokio::test]
async fn a_service_without_a_mesh_backend_is_answered_no_mesh_backend() {
    let ca = Ca::new();
    let outside: SocketAddr = "192.0.2.9:8080".parse().unwrap();
    let shared = sidecar(&ca, "deny", &[outside], &[]);
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 503 Service Unavailable",
            Some("no_mesh_backend"),
            "trellis: outbound call to 10.96.0.10:80 refused: no ready backend of service \
             shop/api is in the mesh, and the outbound policy is deny\n"
        ),
        "{answer}"
    );
    assert_eq!(outcome(&shared, "no_mesh_backend"), 1);
}

/// A call denied for its destination being outside the mesh under
/// outbound `deny` (itself, or every ready backend of its service) is
/// logged naming what decided, `policy=outbound:deny`, as an inbound
/// denial names its policy; it is counted as a denied connection, not as
/// a decision of an authorization policy.
#[tokio::test]
async fn an_outbound_denial_names_the_outbound_policy_in_its_log() {
    let (logs, _guard) = Logged::capture();
    let ca = Ca::new();
    let outside: SocketAddr = "192.0.2.9:8080".parse().unwrap();
    let shared = sidecar(&ca, "deny", &[outside], &[]);
    let answer = http_round_trip(&shared, "192.0.2.7:80").await;
    assert_eq!(proxy_error(&answer), Some("denied"), "{answer}");
    let line = logs.line("outbound connection denied: destination outside the mesh");
    assert!(
        line.contains(" decision=deny policy=outbound:deny"),
        "{line}"
    );
    assert_eq!(outcome(&shared, "denied"), 1);
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(proxy_error(&answer), Some("no_mesh_backend"), "{answer}");
    let line = logs.line("no ready backend is in the mesh");
    assert!(
        line.contains(" decision=deny policy=outbound:deny"),
        "{line}"
    );
    let metrics = shared.metrics.encode();
    let decisions = metrics
        .lines()
        .filter(|l| l.starts_with("trellis_decisions_total{"));
    for series in decisions {
        assert!(
            series.ends_with(" 0"),
            "an outbound denial counted as a policy's decision: {series}"
        );
    }
}

/// A transparent call to one of the sidecar's own listeners, directly or
/// as a service's backend, is a loop: refused, and the app told so.
#[tokio::test]
async fn a_call_to_the_sidecar_itself_is_answered_loop() {
    let ca = Ca::new();
    let own: SocketAddr = "10.0.0.5:15001".parse().unwrap();
    let shared = changed(sidecar(&ca, "deny", &[own], &[own]), |s| {
        s.own_addrs = vec![own];
    });
    let answer = http_round_trip(&shared, "10.0.0.5:15001").await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("loop"),
            "trellis: outbound call to 10.0.0.5:15001 refused: 10.0.0.5:15001 is this sidecar \
             (loop)\n"
        ),
        "{answer}"
    );
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("loop"),
            "trellis: outbound call to 10.96.0.10:80 refused: 10.0.0.5:15001 is this sidecar \
             (loop)\n"
        ),
        "{answer}"
    );
    assert_eq!(outcome(&shared, "loop"), 2);
}

/// A sidecar that has no certificate yet cannot dial a mesh peer: the app
/// is told so with `503`, and nothing is dialled.
#[tokio::test]
async fn a_sidecar_without_a_certificate_answers_no_local_certificate() {
    let ca = Ca::new();
    let (api, served) = backend(Some(ca.tls(&id("api"), &[]))).await;
    let shared = changed(sidecar(&ca, "deny", &[api], &[api]), |s| {
        s.tls = watch::channel(Arc::new(TlsState::default())).1;
    });
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 503 Service Unavailable",
            Some("no_local_certificate"),
            format!(
                "trellis: outbound call to 10.96.0.10:80 refused: dialling {api}: no certificate \
                 yet (no_local_certificate)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    assert_eq!(*served.borrow(), 0, "a peer was dialled");
    assert_eq!(outcome(&shared, "refused"), 1);
    assert_eq!(
        counted(
            &shared,
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"no_local_certificate\"}"
        ),
        1
    );
}

/// A sidecar whose certificate expired unrenewed says so to the app, with
/// when, rather than `no certificate yet`: the operator reading the
/// answer looks for why renewals failed, not for a start-up problem.
#[tokio::test]
async fn a_sidecar_whose_certificate_expired_says_when_in_its_503() {
    let ca = Ca::new();
    let (api, served) = backend(Some(ca.tls(&id("api"), &[]))).await;
    let shared = changed(sidecar(&ca, "deny", &[api], &[api]), |s| {
        let expired = TlsState::default().after_expiry(Some(1_700_000_000));
        s.tls = watch::channel(Arc::new(expired)).1;
    });
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 503 Service Unavailable",
            Some("no_local_certificate"),
            format!(
                "trellis: outbound call to 10.96.0.10:80 refused: dialling {api}: this sidecar's \
                 certificate expired at 2023-11-14T22:13:20Z, not renewed (see its log) \
                 (no_local_certificate)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    assert_eq!(*served.borrow(), 0, "a peer was dialled");
}

/// A backend whose identity this sidecar holds as revoked, presenting a
/// certificate issued before the revocation, is refused once its
/// handshake is over: the app is told it is revoked, and nothing of the
/// app's reaches it.
#[tokio::test]
async fn a_backend_whose_identity_is_revoked_is_answered_revoked() {
    let ca = Ca::new();
    let (received_tx, mut received) = tokio::sync::mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let acceptor =
        tokio_rustls::TlsAcceptor::from(ca.tls(&id("api"), &[]).server().unwrap().clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, received_tx) = (acceptor.clone(), received_tx.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut read = Vec::new();
                let _ = tls.read_to_end(&mut read).await;
                let _ = received_tx.send(read);
            });
        }
    });
    // Now: after the backend's certificate was issued.
    let revoked_at = time::OffsetDateTime::now_utc().unix_timestamp();
    let revocations = Arc::new(Revocations::new([(id("api"), revoked_at)]));
    let shared = changed(sidecar(&ca, "deny", &[api], &[api]), |s| {
        let tls = Arc::into_inner(ca.tls(&id("web"), &[id("api")])).unwrap();
        let tls = tls.with_revocations(revocations).unwrap();
        s.tls = watch::channel(Arc::new(tls)).1;
    });
    let answer = http_round_trip(&shared, VIP).await;
    let (status, token, body) = refusal(&answer);
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{answer}");
    assert_eq!(token, Some("revoked"), "{answer}");
    let called = format!(
        "trellis: outbound call to 10.96.0.10:80 refused: dialling {api}: peer \
         spiffe://td.test/ns/shop/sa/api is revoked: its certificate was issued at "
    );
    assert!(body.starts_with(&called), "{answer}");
    assert!(body.ends_with(" (revoked)\n"), "{answer}");
    assert_eq!(
        received.recv().await.unwrap(),
        b"",
        "the app's request reached a revoked peer"
    );
    assert_eq!(outcome(&shared, "refused"), 1);
    assert_eq!(
        counted(
            &shared,
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"revoked\"}"
        ),
        1
    );
}

/// A backend that takes the connection and never answers the handshake
/// (a hung sidecar, a port that is not a sidecar's): the call is refused
/// after [`net::HANDSHAKE_TIMEOUT`], the app told so in words naming the
/// wait, and the timeout counted as a handshake failure. The clock is
/// paused, so the ten seconds pass as soon as nothing else is left to do.
#[tokio::test(start_paused = true)]
async fn a_backend_that_never_answers_the_handshake_is_answered_handshake_timeout() {
    let ca = Ca::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = listener.local_addr().unwrap();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            // Held open, never read from or written to.
            let _ = accepted_tx.send(tcp);
        }
    });
    let shared = sidecar(&ca, "deny", &[hung], &[hung]);
    let answer = http_round_trip(&shared, VIP).await;
    assert_eq!(
        refusal(&answer),
        (
            "HTTP/1.1 502 Bad Gateway",
            Some("handshake_timeout"),
            format!(
                "trellis: outbound call to 10.96.0.10:80 refused: dialling {hung}: handshake: no \
                 answer within 10 seconds (timeout)\n"
            )
            .as_str()
        ),
        "{answer}"
    );
    assert!(
        accepted.recv().await.is_some(),
        "the backend was not dialled"
    );
    assert_eq!(outcome(&shared, "refused"), 1);
    assert_eq!(
        counted(
            &shared,
            "trellis_handshake_failures_total{direction=\"outbound\",reason=\"timeout\"}"
        ),
        1
    );
}

/// The reason an outbound refusal's text ends with, in parentheses.
fn reason_in(body: &str) -> Option<&str> {
    let (_, reason) = body.trim_end().rsplit_once(" (")?;
    reason.strip_suffix(')')
}

/// Every handshake failure is answered with one coarse token,
/// `handshake_failed`, and a text ending with the reason it is counted
/// under in `trellis_handshake_failures_total` and logged with, so one
/// grep of the answer's reason finds both: a server presenting another
/// identity, one certified by a CA outside the trust bundle.
#[tokio::test]
async fn a_handshake_failure_s_answer_names_the_reason_it_is_counted_under() {
    let ca = Ca::new();
    let (impostor, _) = backend(Some(ca.tls(&id("impostor"), &[]))).await;
    let (foreign, _) = backend(Some(Ca::new().tls(&id("api"), &[]))).await;
    for (server, expected) in [
        (impostor, "unexpected_identity"),
        (foreign, "unknown_issuer"),
    ] {
        let shared = sidecar(&ca, "deny", &[server], &[server]);
        let answer = http_round_trip(&shared, VIP).await;
        let (status, token, body) = refusal(&answer);
        assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{answer}");
        assert_eq!(token, Some("handshake_failed"), "{answer}");
        assert_eq!(reason_in(body), Some(expected), "{answer}");
        let series = format!(
            "trellis_handshake_failures_total{{direction=\"outbound\",reason=\"{expected}\"}}"
        );
        assert_eq!(counted(&shared, &series), 1, "{series}");
    }
}

/// A server certified by another mesh's root of the same trust domain,
/// both generated as the control plane generates them, is refused as of an
/// unknown issuer: the roots are named apart, so the verifier does not
/// take the other root for its own and report a bad signature.
#[tokio::test]
async fn a_server_of_another_generated_root_of_the_trust_domain_is_an_unknown_issuer() {
    let ours = Ca::generated();
    let theirs = Ca::generated();
    let (server, served) = backend(Some(theirs.tls(&id("api"), &[]))).await;
    let shared = sidecar(&ours, "deny", &[server], &[server]);
    let answer = http_round_trip(&shared, VIP).await;
    let (status, token, body) = refusal(&answer);
    assert_eq!(status, "HTTP/1.1 502 Bad Gateway", "{answer}");
    assert_eq!(token, Some("handshake_failed"), "{answer}");
    assert_eq!(reason_in(body), Some("unknown_issuer"), "{answer}");
    let series =
        "trellis_handshake_failures_total{direction=\"outbound\",reason=\"unknown_issuer\"}";
    assert_eq!(counted(&shared, series), 1, "{series}");
    assert_eq!(*served.borrow(), 0);
}

/// The future of an outbound connection, held for as long as the
/// connection is open, stays small: the handshake's state and a refusal's
/// answer are boxed and freed once over, and the TLS stream to the peer is
/// boxed once as it is made (moved by value it took a slot of its size in
/// each future it passed through). What is left is the app's socket, the
/// relay's copy and the connection's few facts: about 1.8 KiB for a
/// transparent connection and 1.2 KiB for a route's, besides the stream's
/// box; they were 5.3 KiB and 4.7 KiB with a stream and an answer inline.
#[tokio::test]
async fn an_outbound_connection_future_stays_small() {
    let ca = Ca::new();
    let shared = sidecar(&ca, "deny", &[], &[]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _app = TcpStream::connect(addr).await.unwrap();
    let (tcp, client) = listener.accept().await.unwrap();
    let transparent = forward_transparent(&shared, tcp, client, addr);
    let transparent = std::mem::size_of_val(&transparent);
    let _app = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = listener.accept().await.unwrap();
    let route = Route {
        local: addr,
        spiffe_id: id("api"),
        remote: addr.to_string(),
    };
    let route = serve_route(&route, &shared, tcp, addr);
    let route = std::mem::size_of_val(&route);
    assert!(
        transparent <= 2048,
        "a transparent connection's future is {transparent} bytes"
    );
    assert!(
        route <= 1536,
        "a route connection's future is {route} bytes"
    );
}
