//! Outbound: connections from the local application to the mesh.
//!
//! Two kinds of listener: an explicit [`Route`] listener (plaintext on a
//! local port, mTLS to one remote whose SPIFFE ID is fixed by the route) and
//! the [`Transparent`] listener (connections redirected by iptables, whose
//! original destination is looked up in the snapshot's mesh endpoints).
//! A mesh destination is only ever reached over mTLS with its expected
//! SPIFFE ID verified; this module never sends application bytes to a peer
//! before that check, and never dials its own listeners: a route to one by
//! address is refused with the flags, and a route by host name, whose name
//! is resolved for each connection, refuses the connection when the name
//! stands for one (`loop`), before anything is dialled.
//!
//! Where a transparent connection goes is decided by `target::resolve`
//! from the snapshot alone. An original destination that is a service's
//! virtual address (a Kubernetes Service's cluster IP and port, which
//! kube-proxy has not translated yet) is first replaced by one of the
//! service's backends: under outbound `deny` only its mesh backends are
//! candidates, under `passthrough` all; they are taken in turn, or always
//! the same one for a service with client affinity. A service without a
//! ready backend is refused (`no_backend`), and one whose ready backends
//! are all outside the mesh under `deny` is refused too
//! (`no_mesh_backend`), unless one of them is this pod itself. The backend,
//! or the original destination when no service has it, is then: one of
//! the proxy's own listeners (refused, a loop); a mesh endpoint (mTLS to
//! that address, expecting its SPIFFE ID); an address of this pod that is
//! no endpoint's inbound (plain TCP, which stays inside the pod as the
//! app's own call to it would); or outside the mesh (refused or plain TCP
//! to it, as the outbound policy says). The virtual address itself is
//! never dialled. Log lines of a call to a service name it (`service`,
//! `dst` the virtual address, `backend`).
//!
//! A pod that died stays among its service's backends until its
//! EndpointSlice is updated. A call to a service whose backend cannot be
//! connected to (refused, unreachable, reset, or no answer within two
//! seconds, `BACKEND_ATTEMPT_TIMEOUT`) goes on to another candidate it has
//! not tried (`target::retry`; with client affinity too, the affinity
//! choosing only the first), up to three backends in all (`MAX_BACKENDS`),
//! the last given the full [`net::CONNECT_TIMEOUT`], and is refused as
//! before when none could be connected to, the log naming the backends
//! `tried`.
//! Nothing of the app's has left while no connection exists; once one
//! does, nothing is retried: a handshake that fails (a peer that is not
//! who the mesh says) is a refusal, never a reason to look elsewhere. A
//! direct destination and a route are never retried. Each backend given
//! up is logged at debug level and counted in
//! `trellis_service_connect_retries_total{reason}`; a call counts once in
//! `trellis_connections_total`, by its last attempt.
//!
//! A call refused before anything of the app's left the pod (a loop, a
//! service without a backend, a destination denied, a dial that failed) is
//! answered, when the app speaks HTTP, with `403` (denied), `503` (no
//! backend, no certificate or no snapshot yet) or `502` (anything else) and a text body
//! naming the address the app called and why (`answer_refused`): an app's
//! log then says what the sidecar's does, where a closed connection said
//! nothing. The answer carries `trellis-proxy-error` with a fixed token
//! (`denied`, `not_ready`, `no_backend`, `connect_failed`, `handshake_failed`, ...), as
//! the inbound side's own answers do, so the app tells it from a peer
//! app's. HTTP/1 is answered at once; HTTP/2 on its first request, a
//! gRPC call with `grpc-status` (`PERMISSION_DENIED` for a denial,
//! `UNAVAILABLE` otherwise) and those words as its message
//! ([`trellis_core::refusal::answer`]). The detector reads the app's first
//! bytes for it when no mesh dial did already; opaque TCP and any call to a
//! port declared opaque, which have no answer to be told why in, are
//! reset: a FIN would pass for the server's orderly close.
//!
//! The peer's sidecar may refuse a connection once this one's handshake is
//! over (TLS 1.3 has it verify this sidecar's certificate then): with a TLS
//! alert, or by closing without one (a revoked caller). Met before any byte
//! of an answer, either is logged naming the peer and the alert, counted,
//! and answered to an HTTP app with `502` (`PeerRefusal`); any other app
//! is reset, as it is when the connection fails later. A peer whose
//! sidecar has no certificate yet answers the handshake with
//! `access_denied`, which the app is told as `503`, not ready.
//!
//! A mesh peer whose identity a revocation of the snapshot names is
//! checked once its handshake is over, before the app's first bytes leave
//! (`dial_mesh`): one the revocation covers is refused, one certified
//! again since is dialled as any other, resuming too. A connection open to
//! a peer that a later revocation covers is closed when the policies that
//! carry it arrive (`relay`).
//!
//! A connection ends as it would without the mesh: each side's FIN is
//! passed on after its last byte, and a reset or a failure of one side
//! resets the other (`net::reset_on_close`), the peer's sidecar resetting
//! its app in turn, so no app takes a cut connection for a finished one.
//! A write to one side that fails (its peer answered and reset the
//! connection while the app was still sending) does not throw away the
//! answer: the other way is read to its end first ([`net::copy`]).
//!
//! Before dialling a mesh peer it runs the HTTP detector on the app's
//! first bytes and offers the matching ALPN (`h2`, `http/1.1`, or none for
//! opaque TCP); it never parses or changes the bytes themselves. A port
//! the mesh declares opaque skips detection: the backend's, or, for a
//! call to a service, the service's port the app dialled.

mod target;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ::http::StatusCode;
use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use trellis_core::SpiffeId;
use trellis_core::duration::Words;
use trellis_core::logging::throttle::Throttle;
use trellis_core::refusal::{self, token};
use trellis_core::revocation::{self, Revoked};
use trellis_core::tls::{Claimed, SvidError};
use trellis_core::warn_throttled;

use crate::config::Route;
use crate::drain::{Drain, Tracker};
use crate::http::{self, Protocol};
use crate::metrics::{Metrics, OUTBOUND, Outcome};
use crate::net;
use crate::policy::{self, OutboundPolicy, Policies, Snapshot};
use crate::tls::{self, HandshakeFailure, NotResumed, TlsState};
use target::{Resolved, Target, resolve};

/// The TLS server name sent as SNI to a peer dialled by host name; peers
/// are verified by SPIFFE ID, so its value carries no meaning.
const SNI: &str = "trellis.mesh";

/// What decided an outbound connection denied for its destination being
/// outside the mesh, as its log line names it (`policy=`): the mesh's
/// outbound policy `deny`, named as `policy=default:deny` names the mesh
/// default inbound. Not an authorization policy, so not counted in
/// `trellis_decisions_total`, only in `trellis_connections_total`.
pub const OUTBOUND_DENY: &str = "outbound:deny";

/// The TLS server name a peer at `addr` is dialled with: its address and
/// port under [`SNI`] (`10-0-0-7-15006.trellis.mesh`). It names nothing to
/// the peer, but the sidecar's session tickets are kept by name, and each
/// replica of a workload (one SPIFFE ID, many addresses) seals its tickets
/// with a key of its own: a ticket offered to another replica would fail
/// to resume, and the dial would begin again.
fn peer_name(addr: SocketAddr) -> ServerName<'static> {
    use std::fmt::Write;
    // One allocation a dial: written in place.
    let mut name = String::with_capacity(64);
    match addr.ip() {
        std::net::IpAddr::V4(ip) => {
            for octet in ip.octets() {
                let _ = write!(name, "{octet}-");
            }
        }
        std::net::IpAddr::V6(ip) => {
            for segment in ip.segments() {
                let _ = write!(name, "{segment:x}-");
            }
        }
    }
    let _ = write!(name, "{}.{SNI}", addr.port());
    ServerName::try_from(name).expect("digits, letters and dashes make a DNS name")
}

/// The name a route's `remote` is dialled with: [`peer_name`] of an
/// address, [`SNI`] for a host name (which may stand for several).
fn remote_name(remote: &str) -> ServerName<'static> {
    match remote.parse::<SocketAddr>() {
        Ok(addr) => peer_name(addr),
        Err(_) => ServerName::DnsName(SNI.try_into().expect("valid name")),
    }
}

/// What every outbound connection reads.
pub struct Shared {
    pub tls: watch::Receiver<Arc<TlsState>>,
    pub snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    /// The policies in force, which an open connection watches for
    /// revocations of its peer's identity (they change only when what
    /// they enforce does, not with the endpoints).
    pub policies: watch::Receiver<Option<Arc<Policies>>>,
    pub metrics: Arc<Metrics>,
    /// Every address the proxy listens on: a destination among them is a loop.
    pub own_addrs: Vec<SocketAddr>,
    /// The plaintext listeners of the proxy (the routes' and the outbound
    /// ones, as configured): a route's remote that resolves to one of them
    /// would dial itself ([`crate::net::reaches`]).
    pub plaintext_listeners: Vec<SocketAddr>,
    /// `TCP_USER_TIMEOUT` of the dials beyond the pod
    /// (`--tcp-user-timeout`; [`net::connect_within`]).
    pub user_timeout: Option<Duration>,
    /// The lines of connections the peer's sidecar refused after the
    /// handshake, by reason: one a reason every
    /// [`REFUSAL_LOG_PAUSE`](crate::inbound::REFUSAL_LOG_PAUSE).
    pub peer_refusals: Throttle,
}

/// Why a mesh dial failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    /// With when the certificate it held expired, if it did.
    #[error("{}", NoCertificate(*.0))]
    NoCertificate(Option<u64>),
    #[error("connect: {0}")]
    Connect(io::Error),
    /// With what the server's certificate claims when this sidecar
    /// refused it (read unverified, for the refusal's line only).
    #[error("handshake: {}", trellis_core::tls::Described(.0))]
    Handshake(io::Error, Option<Box<Claimed>>),
    #[error("handshake: no answer within {}", Words(net::HANDSHAKE_TIMEOUT))]
    Timeout,
    /// The peer answered the handshake with `access_denied` before its
    /// certificate: a sidecar that has none yet
    /// ([`crate::tls::not_ready_server`]).
    #[error("its sidecar has no certificate yet (not ready)")]
    PeerNotReady,
    #[error("sending the app's first bytes: {0}")]
    FirstBytes(io::Error),
    #[error("{0}")]
    Revoked(Revoked),
}

impl DialError {
    /// The handshake failure it counts as, if it is one.
    fn failure(&self) -> Option<HandshakeFailure> {
        match self {
            DialError::NoCertificate(_) => Some(HandshakeFailure::NoLocalCertificate),
            DialError::Handshake(e, _) => Some(tls::failure::of_io(e)),
            DialError::Timeout => Some(HandshakeFailure::Timeout),
            DialError::PeerNotReady => Some(HandshakeFailure::PeerNotReady),
            DialError::Revoked(_) => Some(HandshakeFailure::Revoked),
            DialError::Connect(_) | DialError::FirstBytes(_) => None,
        }
    }

    /// The label it is logged with: its handshake failure's, or what
    /// failed instead.
    fn reason(&self) -> &'static str {
        match (self, self.failure()) {
            (_, Some(failure)) => failure.token(),
            (DialError::Connect(_), None) => token::CONNECT_FAILED,
            (_, None) => token::WRITE_FAILED,
        }
    }

    /// The `trellis-proxy-error` an HTTP app is answered with
    /// ([`answer_refused`]): the label [`reason`](Self::reason) counts it
    /// under, but one token for every handshake failure and another for a
    /// handshake timeout. The answer's text ends with the label in
    /// parentheses ([`answer_dial_refused`]), so the token, the text, the
    /// log line and `trellis_handshake_failures_total` meet on it.
    fn answer_reason(&self) -> &'static str {
        match self {
            DialError::NoCertificate(_) => token::NO_LOCAL_CERTIFICATE,
            DialError::Connect(_) => token::CONNECT_FAILED,
            DialError::Handshake(..) => token::HANDSHAKE_FAILED,
            DialError::Timeout => token::HANDSHAKE_TIMEOUT,
            DialError::PeerNotReady => token::PEER_NOT_READY,
            DialError::FirstBytes(_) => token::WRITE_FAILED,
            DialError::Revoked(_) => token::REVOKED,
        }
    }

    /// The status an HTTP app is answered with ([`answer_refused`]):
    /// `503` while this sidecar or the peer's has no certificate, `502`
    /// when the peer could not be reached or was not who the mesh says.
    fn status(&self) -> StatusCode {
        match self {
            DialError::NoCertificate(_) | DialError::PeerNotReady => SERVICE_UNAVAILABLE,
            _ => BAD_GATEWAY,
        }
    }
}

/// Why this sidecar has no certificate: none yet, or the one it held
/// expired at a time (Unix seconds) without a renewal, which the log's
/// `certify failed` lines explain.
struct NoCertificate(Option<u64>);

impl std::fmt::Display for NoCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            None => f.write_str("no certificate yet"),
            Some(at) => write!(
                f,
                "this sidecar's certificate expired at {}, not renewed (see its log)",
                crate::identity::rfc3339(at as i64)
            ),
        }
    }
}

const BAD_GATEWAY: StatusCode = StatusCode::BAD_GATEWAY;
const SERVICE_UNAVAILABLE: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;

/// A mesh peer dialled: the stream, and the time of the revocation of the
/// peer's identity its certificate was checked against, if one named it.
/// The stream is boxed once, as it is made: moved by value from the dial
/// to the relay it would take a slot of its size (over 1 KiB) in each
/// future it passes through, for the whole life of the connection.
type Dialled = (Box<PeerStream>, Option<i64>);

/// The TLS stream to a mesh peer.
type PeerStream = TlsStream<net::ReadAhead<TcpStream>>;

/// Dials `remote` with mTLS, accepting only a server presenting `expected`
/// and offering `protocol`'s ALPN (nothing for opaque TCP).
///
/// While a ticket of the peer is held the dial resumes with X25519 alone;
/// if the peer does not accept the ticket, that attempt ends before a
/// session begins, the peer's tickets are forgotten and the dial starts
/// again with the hybrid key exchange (see [`crate::tls`]).
///
/// `first` (the app's bytes read by detection, at most
/// [`http::detect::MAX_PEEK`]) is handed to a full handshake's TLS session
/// before the handshake: rustls holds it until the server has been
/// verified and then sends it in the same write as the client's
/// `Finished`, so the peer gets the handshake's end and the first request
/// in one segment. A resumed session verifies no certificate, so there
/// the sidecar first checks that the certificate the session brought back
/// is still valid and then writes `first` itself. It is never sent as
/// 0-RTT early data.
///
/// A peer whose identity a revocation names is checked against it once
/// its handshake is over, before `first` leaves: a resumed session's
/// certificate with the others (one the revocation covers makes the dial
/// forget the peer's tickets and begin again, as an expired one does), a
/// full handshake's before `first` is written, which it is then not
/// handed beforehand. A covered peer is refused and sent nothing of the
/// app's; one whose certificate was issued after the revocation (issued
/// again, after a compromise) is dialled as any other, resuming too. The
/// revocation is looked up once a dial, and not at all while nothing is
/// revoked.
async fn dial_mesh<R>(
    shared: &Shared,
    remote: R,
    connect_timeout: Duration,
    expected: &SpiffeId,
    protocol: Protocol,
    first: &[u8],
    name: ServerName<'static>,
) -> Result<Dialled, DialError>
where
    R: tokio::net::ToSocketAddrs + Copy,
{
    let (peer, revoked_at) = {
        let tls = shared.tls.borrow();
        let peer = tls
            .client_for(expected)
            .ok_or_else(|| DialError::NoCertificate(tls.expired_at()))?;
        (peer, tls.revocations().revoked_at(expected))
    };
    // A full handshake with the hybrid key exchange, `first` leaving with
    // the client's Finished; for a peer a revocation names, only once its
    // certificate was checked.
    let (peer, name) = (&peer, &name);
    let full = move || async move {
        let early = if revoked_at.is_some() { &[][..] } else { first };
        let connect = net::connect_within(remote, connect_timeout, shared.user_timeout);
        let mut stream = handshake(&peer.full, connect, name, protocol, early, None).await?;
        if let Some(at) = revoked_at {
            check_peer(&stream, expected, at).map_err(DialError::Revoked)?;
            send_first(&mut stream, first).await?;
        }
        Ok((Box::new(stream), revoked_at))
    };
    let Some(reserved) = peer.tickets.reserve(name) else {
        return full().await;
    };
    // The app's first bytes wait until the resumed session's certificate
    // is checked (below), and leave with the client's Finished, held until
    // then (`ReadAhead::hold_after_first_flush`).
    match tls::resuming(handshake(
        &peer.resume,
        net::connect_within(remote, connect_timeout, shared.user_timeout),
        name,
        protocol,
        &[],
        Some(reserved),
    ))
    .await
    {
        // The peer no longer accepts the ticket (it restarted, or took a
        // new trust bundle): an abandoned resumption, not a handshake
        // failure, as below; the dial counts one only if the full
        // handshake fails.
        Err(DialError::Handshake(e, _)) if NotResumed::caused(&e) => {
            tracing::debug!(peer = %expected, "session not resumed; dialling again with the hybrid key exchange");
            shared
                .metrics
                .resumption_abandoned(HandshakeFailure::NotResumed);
            peer.tickets.forget(name);
            full().await
        }
        // A resumed session brings back the peer's certificate as it was
        // verified when the session began, and no verifier looks at it
        // again: one that has expired since, or that a revocation made
        // since covers, is not trusted, and the peer is dialled again with
        // a full handshake, which verifies its current one. The dropped
        // session is no handshake failure: the dial counts as one only if
        // the full handshake fails, once.
        Ok(mut stream) => {
            let chain = stream.get_ref().1.peer_certificates();
            let leaf = chain.and_then(|c| c.first());
            let valid = leaf
                .map_or(Err(SvidError::NoCertificate), |leaf| {
                    peer.tickets.still_valid(leaf)
                })
                .map_err(|e| (e.to_string(), HandshakeFailure::ExpiredCertificate))
                // A root of the bundle that expired since the session
                // began: the chain is verified again, as a full handshake
                // would.
                .and_then(|not_before| {
                    peer.verify_resumed(chain.unwrap_or_default())
                        .map(|()| not_before)
                        .map_err(|e| {
                            let error = trellis_core::tls::Described(&e).to_string();
                            (error, HandshakeFailure::of_rustls(&e))
                        })
                })
                // Against the notBefore `still_valid` read: not parsed again.
                .and_then(|not_before| match revoked_at {
                    Some(at) => revocation::check_against(expected, at, not_before)
                        .map_err(|e| (e.to_string(), HandshakeFailure::Revoked)),
                    None => Ok(()),
                });
            match valid {
                Ok(()) => {
                    stream.get_mut().0.release();
                    send_first(&mut stream, first).await?;
                    Ok((Box::new(stream), revoked_at))
                }
                // The held Finished never leaves: the peer sees the
                // handshake end unfinished.
                Err((e, reason)) => {
                    tracing::debug!(peer = %expected, error = %e, reason = %reason, "resumed session's certificate no longer valid; dialling again with a full handshake");
                    shared.metrics.resumption_abandoned(reason);
                    peer.tickets.forget(name);
                    drop(stream);
                    full().await
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// Refuses the peer `expected` of `stream` when the revocation of its
/// identity made at `revoked_at` covers the certificate it presented (as
/// verified, or as a resumed session brought it back); one that presented
/// none is covered.
fn check_peer(stream: &PeerStream, expected: &SpiffeId, revoked_at: i64) -> Result<(), Revoked> {
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first());
    revocation::check_leaf(expected, revoked_at, leaf)
}

/// Sends the app's `first` bytes, held while the peer's certificate was
/// checked, and flushes the handshake's last flight with them.
async fn send_first(
    stream: &mut TlsStream<net::ReadAhead<TcpStream>>,
    first: &[u8],
) -> Result<(), DialError> {
    if !first.is_empty() {
        stream
            .write_all(first)
            .await
            .map_err(DialError::FirstBytes)?;
    }
    stream.flush().await.map_err(DialError::FirstBytes)
}

/// One connection and handshake of [`dial_mesh`] with `config`: `connect`
/// dials the peer ([`net::connect_within`], not begun until awaited here).
///
/// A resuming dial's `reserved` ticket is released as soon as the TLS
/// session has taken it (rustls does so when it writes the ClientHello,
/// as the session is made): held until the handshake ended, it would
/// count as reserved beside the ticket already gone, and dials whose
/// handshakes overlap would find half the tickets held for them. Its
/// last flight, the Finished, is held on the socket until the caller
/// releases it ([`net::ReadAhead::release`]).
async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    connect: impl Future<Output = io::Result<TcpStream>>,
    name: &ServerName<'static>,
    protocol: Protocol,
    first: &[u8],
    reserved: Option<tls::tickets::Reserved>,
) -> Result<TlsStream<net::ReadAhead<TcpStream>>, DialError> {
    let tcp = connect.await.map_err(DialError::Connect)?;
    let mut tcp = net::ReadAhead::new(tcp);
    if reserved.is_some() {
        tcp.hold_after_first_flush();
    }
    let connector = TlsConnector::from(config.clone());
    // rustls buffers up to 64 KiB of plaintext before the handshake ends
    // (`first` is at most 8 KiB); whatever it did not take is written
    // after the handshake.
    let queued = std::cell::Cell::new(0);
    let queue = |conn: &mut rustls::ClientConnection| {
        queued.set(std::io::Write::write(&mut conn.writer(), first).unwrap_or(0));
    };
    let connect = match protocol.alpn() {
        Some(id) => connector
            .with_alpn(vec![id.to_vec()])
            .connect_with(name.clone(), tcp, queue),
        None => connector.connect_with(name.clone(), tcp, queue),
    };
    drop(reserved);
    // A failed handshake's alert (a resuming dial refusing a full
    // handshake, say) was held with the rest: it still tells the peer why.
    let connect = async {
        match connect.into_fallible().await {
            Ok(stream) => Ok(stream),
            Err((e, io)) => Err(io.fail_handshake(e).await),
        }
    };
    // What a server certificate the verifier refuses claims comes out with
    // the failure, for the refusal's line.
    let handshaken =
        trellis_core::tls::noting_refused(tokio::time::timeout(net::HANDSHAKE_TIMEOUT, connect));
    match handshaken.await {
        (Ok(Ok(mut stream)), _) => {
            stream.get_mut().0.read_ahead();
            let rest = &first[queued.get()..];
            if !rest.is_empty() {
                stream
                    .write_all(rest)
                    .await
                    .map_err(DialError::FirstBytes)?;
            }
            Ok(stream)
        }
        (Ok(Err(e)), claimed) => match trellis_core::tls::rustls_error(&e) {
            Some(rustls::Error::AlertReceived(rustls::AlertDescription::AccessDenied)) => {
                Err(DialError::PeerNotReady)
            }
            _ => Err(DialError::Handshake(e, claimed.map(Box::new))),
        },
        (Err(_), _) => Err(DialError::Timeout),
    }
}

/// The mesh peer a connection is dialled to, and how it was chosen: what
/// the log lines of the connection name.
#[derive(Clone, Copy)]
struct Upstream<'a, R> {
    remote: R,
    expected: &'a SpiffeId,
    /// `route`, `transparent` or `service`.
    via: &'static str,
    /// The service the app called, when `remote` is its backend.
    service: Option<ServiceCall<'a>>,
}

/// Runs the HTTP detector on the app's first bytes, which (or whose
/// silence, for a server-first protocol) choose the ALPN offered to `to`
/// so the peer can serve HTTP without looking at the bytes; returns the
/// protocol and the bytes read. `None` (logged and
/// counted) when the app ended the connection first.
async fn detect<R: std::fmt::Display>(
    metrics: &Metrics,
    local: &mut TcpStream,
    to: &Upstream<'_, R>,
) -> Option<(Protocol, BytesMut)> {
    match http::detect(local).await {
        Ok((protocol, local)) => Some((protocol, local.into_parts().0)),
        Err(e) => {
            tracing::debug!(remote = %to.remote, service = to.service.map(|s| s.name), error = %e, "outbound connection ended before its protocol was known");
            metrics.connection(OUTBOUND, Outcome::Error);
            None
        }
    }
}

/// Copies bytes between the app and the mesh peer dialled for it until
/// both sides close, or until new revocations cover the peer's
/// certificate: the connection is then closed, logged naming the peer and
/// counted (`closed_by_policy`, and the handshake failure `revoked`).
/// `sent` bytes of the app's, read by detection, went out with the
/// handshake; `checked` is the revocation time the dial checked the
/// peer's certificate against. A call to a service that reached its peer
/// after others could not be connected to names them all (`tried`).
///
/// The peer's sidecar may still refuse the connection once this one's
/// handshake is over: TLS 1.3 has the server verify the caller's
/// certificate after the caller has sent its last flight, so a refusal
/// (a certificate it does not trust, or has expired) arrives as a TLS
/// alert, the first thing read; one refused after its handshake (a
/// revoked caller) is closed without a word. Either, before any byte of
/// an answer came back, is logged naming the peer and why, counted, and
/// an HTTP app is answered `502` saying so ([`PeerRefusal`]), for which
/// `first`, the bytes detection read (none for opaque TCP), is kept until
/// the first byte of an answer comes; an opaque TCP app is reset.
///
/// While the peer's identity is not revoked the connection only waits
/// among the policies' waiters, which wake when the policies change
/// ([`policy::closes_when`], as the inbound listener's connections do); a
/// new revocation of its identity has its certificate read, once.
async fn relay<R: std::fmt::Display>(
    shared: &Shared,
    local: TcpStream,
    (mut upstream, mut checked): Dialled,
    (sent, mut first): (u64, Option<BytesMut>),
    protocol: Protocol,
    to: &Upstream<'_, R>,
    tried: Option<&Tried>,
) {
    let metrics = &shared.metrics;
    if protocol == Protocol::Opaque {
        first = None;
    }
    metrics.established(OUTBOUND, upstream.get_ref().1);
    let alpn = upstream.get_ref().1.alpn_protocol();
    tracing::info!(
        peer = %to.expected,
        remote = %to.remote,
        via = %to.via,
        service = to.service.map(|s| s.name),
        dst = to.service.map(|s| tracing::field::display(s.dst)),
        tried = Tried::detour(tried),
        protocol = protocol.as_str(),
        alpn = alpn.map(String::from_utf8_lossy).as_deref().unwrap_or("none"),
        "outbound connection"
    );
    let mut policies = shared.policies.clone();
    // The dial read the revocations of the TLS state, which follows the
    // policies: the policies in force now are read once too.
    policies.mark_changed();
    // Reset unless the copy ends cleanly, also when the relay is dropped
    // mid-copy (the drain timeout): the app must not take a cut connection
    // for a finished one. The peer's sidecar, its connection dropped
    // without `close_notify`, resets its app in turn.
    let mut local = net::ResetIfCut::tcp(local);
    let mut copying = net::Copying::default();
    // How the connection ends: its copying done, with the error that ended
    // it if one did, or a new revocation covering the peer's certificate.
    let ended: Result<Option<io::Error>, Revoked> = loop {
        let revoked_at = {
            let named = policy::closes_when(&mut policies, |now| {
                let at = now?.revocations.revoked_at(to.expected)?;
                (checked != Some(at)).then_some(at)
            });
            let mut named = std::pin::pin!(named);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(copied) = copying.poll(cx, &mut *local, &mut upstream) {
                    return Poll::Ready(Err(copied.err()));
                }
                // Answered: the peer's sidecar let the connection through.
                if first.is_some() && copying.copied(None).back > 0 {
                    first = None;
                }
                named.as_mut().poll(cx).map(Ok)
            })
            .await
        };
        let at = match revoked_at {
            Ok(at) => at,
            Err(error) => break Ok(error),
        };
        checked = Some(at);
        if let Err(e) = check_peer(&upstream, to.expected, at) {
            break Err(e);
        }
    };
    let copied = copying.copied(None);
    metrics.bytes(OUTBOUND, sent + copied.there + copied.back);
    match ended {
        Ok(None) => {
            local.ended();
            metrics.connection(OUTBOUND, Outcome::Forwarded);
        }
        Ok(Some(e)) => match PeerRefusal::of(&e).filter(|_| copied.back == 0) {
            Some(refusal) => {
                refusal.report(shared, to, tried);
                drop(upstream);
                // An HTTP app is answered: answered, not cut, so the answer
                // must not be lost to a reset. Any other app has no answer
                // to be told why in, and is reset (`local`, not ended):
                // the peer's close was no end of its bytes.
                if let Some(first) = first {
                    let mut app = App {
                        tcp: local.into_inner(),
                        detected: Some((protocol, first)),
                    };
                    let message = refusal.message(to);
                    // Boxed: the answer's state would otherwise size every
                    // connection's task for its whole life.
                    let refused = (BAD_GATEWAY, token::PEER_REFUSED);
                    let gone = refusal.request_may_have_gone();
                    Box::pin(answer_app(&mut app, refused, &message, gone)).await;
                }
            }
            None => {
                metrics.connection(OUTBOUND, Outcome::Error);
                tracing::debug!(remote = %to.remote, service = to.service.map(|s| s.name), error = %e, "outbound connection ended with an error");
                // A reset (or a failure) on one side is a reset on the
                // other (`local`, not ended), never a FIN that would pass
                // for the end of the bytes: the peer's sidecar resets its
                // app in turn.
                net::reset_on_close(upstream.get_ref().0.get_ref());
            }
        },
        Err(e) => {
            tracing::warn!(
                peer = %to.expected,
                remote = %to.remote,
                via = %to.via,
                service = to.service.map(|s| s.name),
                reason = %trellis_core::grpc::REFUSAL_REVOKED,
                error = %e,
                "open outbound connection closed: the server's identity is revoked"
            );
            metrics.handshake_failure(OUTBOUND, HandshakeFailure::Revoked);
            metrics.connection(OUTBOUND, Outcome::ClosedByPolicy);
            // Cut, not ended: the app (`local`, not ended) and the peer
            // both see a reset, never a FIN that would pass for the end of
            // the bytes.
            net::reset_on_close(upstream.get_ref().0.get_ref());
        }
    }
}

/// Logs and counts a connection refused because its mesh dial to `to`
/// failed; `tried` names a service's backends tried, this one last. A
/// server certificate this sidecar refused is logged with what it claims
/// (`claimed_peer`, and `not_after`, `not_before` or `issuer`), unverified.
fn refused<R: std::fmt::Display>(
    metrics: &Metrics,
    e: &DialError,
    to: &Upstream<'_, R>,
    tried: Option<&Tried>,
) {
    let reason = e.reason();
    // What a server certificate this sidecar refused claims: logged only,
    // never trusted (read unverified), as the inbound side logs a refused
    // client's.
    let claimed = match e {
        DialError::Handshake(_, claimed) => claimed.as_deref(),
        _ => None,
    };
    let claimed_peer = claimed.and_then(|c| c.peer.as_ref());
    let not_after = claimed.and_then(|c| c.not_after.as_deref());
    let not_before = claimed.and_then(|c| c.not_before.as_deref());
    let issuer = claimed.and_then(|c| c.issuer.as_ref());
    tracing::warn!(
        remote = %to.remote,
        expected = %to.expected,
        via = %to.via,
        service = to.service.map(|s| s.name),
        dst = to.service.map(|s| tracing::field::display(s.dst)),
        tried = tried.map(tracing::field::display),
        reason = %reason,
        error = %e,
        claimed_peer = claimed_peer.map(tracing::field::display),
        not_after = not_after.map(tracing::field::display),
        not_before = not_before.map(tracing::field::display),
        issuer = issuer.map(tracing::field::display),
        "outbound connection refused"
    );
    if let Some(failure) = e.failure() {
        metrics.handshake_failure(OUTBOUND, failure);
    }
    metrics.connection(OUTBOUND, Outcome::Refused);
}

/// Why the peer's sidecar ended a connection after the handshake before
/// any byte of an answer came back (see [`relay`]): the TLS alert it sent,
/// or its closing the connection without one (no `close_notify`: a
/// sidecar ends a connection its app ended with one). `reason` is a
/// bounded label: `alert_` and the alert's name, or `closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerRefusal {
    alert: Option<rustls::AlertDescription>,
    reason: &'static str,
    /// What the alert says, in words.
    words: &'static str,
}

impl PeerRefusal {
    /// The refusal an error of the connection to the peer is, if it is
    /// one: a TLS alert received, or the end of the connection without
    /// `close_notify` (which only the peer's side can be).
    fn of(e: &io::Error) -> Option<Self> {
        let alert = match trellis_core::tls::rustls_error(e) {
            Some(rustls::Error::AlertReceived(alert)) => *alert,
            _ if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Some(PeerRefusal {
                    alert: None,
                    reason: "closed",
                    words: "it closed the connection after the handshake without a TLS alert \
                            (a refusal its log names, such as a denial by policy, whose \
                            answer only a connection settled as HTTP gets, a revoked caller's \
                            resumed session, or a failure)",
                });
            }
            _ => return None,
        };
        let failure = HandshakeFailure::of_alert(alert);
        let words = match failure {
            HandshakeFailure::AlertCertificateRevoked => {
                "it holds this sidecar's certificate as revoked"
            }
            HandshakeFailure::AlertCertificateExpired => {
                "this sidecar's certificate has expired, or is not valid yet, by its clock"
            }
            HandshakeFailure::AlertUnknownCa => {
                "this sidecar's certificate is not signed by a root it trusts \
                 (another trust domain, or a root it no longer or not yet holds)"
            }
            HandshakeFailure::AlertCertificateRequired => "it got no certificate from this sidecar",
            HandshakeFailure::AlertBadCertificate => {
                "it found this sidecar's certificate malformed or unsupported"
            }
            HandshakeFailure::AlertCertificateUnknown => {
                "it refused this sidecar's certificate (not an SVID it accepts)"
            }
            HandshakeFailure::AlertAccessDenied => "it denied access",
            HandshakeFailure::AlertHandshakeFailure => "the handshake failed",
            HandshakeFailure::AlertInternalError => "it failed internally",
            _ => "it sent a TLS alert",
        };
        let reason = failure.token();
        Some(PeerRefusal {
            alert: Some(alert),
            reason,
            words,
        })
    }

    /// Whether the app's request may have reached the peer's app: its
    /// sidecar ended without an alert (a denial by policy does, but so
    /// does a sidecar killed after passing the request on) or with
    /// `internal_error`. A certificate or access alert is sent before any
    /// byte is passed on.
    fn request_may_have_gone(&self) -> bool {
        match self.alert {
            None | Some(rustls::AlertDescription::InternalError) => true,
            Some(_) => false,
        }
    }

    /// Logs (one line a reason every
    /// [`REFUSAL_LOG_PAUSE`](crate::inbound::REFUSAL_LOG_PAUSE), the next
    /// saying how many were not) and counts the refusal of the connection
    /// to `to`: `trellis_connections_total{outcome="refused_by_peer"}`
    /// and the handshake failure `reason` for an alert,
    /// `outcome="closed_by_peer"` for a close.
    fn report<R: std::fmt::Display>(
        &self,
        shared: &Shared,
        to: &Upstream<'_, R>,
        tried: Option<&Tried>,
    ) {
        let metrics = &shared.metrics;
        let service = to.service.map(|s| s.name);
        let dst = to.service.map(|s| tracing::field::display(s.dst));
        let tried = Tried::detour(tried);
        match self.alert {
            Some(alert) => {
                metrics.handshake_failure(OUTBOUND, HandshakeFailure::of_alert(alert));
                metrics.connection(OUTBOUND, Outcome::RefusedByPeer);
                warn_throttled!(
                    shared.peer_refusals,
                    self.reason,
                    {
                        peer = %to.expected, remote = %to.remote, via = %to.via, service, dst,
                        tried, alert = ?alert, reason = %self.reason, error = %self.words
                    },
                    "outbound connection refused by the server's sidecar"
                );
            }
            None => {
                metrics.connection(OUTBOUND, Outcome::ClosedByPeer);
                warn_throttled!(
                    shared.peer_refusals,
                    self.reason,
                    {
                        peer = %to.expected, remote = %to.remote, via = %to.via, service, dst,
                        tried, reason = %self.reason, error = %self.words
                    },
                    "outbound connection closed by the server's sidecar before any answer"
                );
            }
        }
    }

    /// What an HTTP app whose call to `to` this ended is told: the
    /// address it called, and why.
    fn message<R: std::fmt::Display>(&self, to: &Upstream<'_, R>) -> String {
        let what = match self.alert {
            Some(_) => "refused by its sidecar",
            None => "ended by its sidecar before any answer",
        };
        let (words, reason) = (self.words, self.reason);
        match to.service {
            Some(call) => {
                let dst = call.dst;
                format!("outbound call to {dst} {what}: {words} ({reason})")
            }
            None => {
                let dst = &to.remote;
                format!("outbound call to {dst} {what}: {words} ({reason})")
            }
        }
    }
}

/// How long answering a refused app takes at most, from the app's first
/// bytes (read already, or for at most [`http::detect::DETECT_TIMEOUT`])
/// to the answer sent; the connection is then read from a little longer
/// ([`refusal::answer`]).
const ANSWER_PATIENCE: Duration = Duration::from_secs(1);

/// [`answer_refused`] for a mesh dial to `remote` (the backend, the
/// route's remote) that failed with `e`.
async fn answer_dial_refused(
    app: &mut App,
    opaque: bool,
    e: &DialError,
    dst: impl std::fmt::Display,
    remote: impl std::fmt::Display,
) {
    let why = format!("dialling {remote}: {e} ({})", e.reason());
    let refused = (e.status(), e.answer_reason());
    answer_refused(app, opaque, refused, dst, why).await;
}

/// Tells an HTTP app why its call was refused, before anything of it left
/// the pod, and closes the connection ([`refusal::answer`]): HTTP/1 gets
/// `status` with a text body naming `dst` and `why`, HTTP/2 the same for
/// its first request, or for a gRPC call `grpc-status` (`PERMISSION_DENIED`
/// for `403`, `UNAVAILABLE` otherwise) with that text as `grpc-message`;
/// each with `trellis-proxy-error: reason`, a fixed token
/// ([`refusal::PROXY_ERROR`]).
/// The app's first bytes are read first (the detector's, at most
/// [`http::detect::DETECT_TIMEOUT`]) unless an attempt already did; an app
/// speaking anything else (opaque TCP), or calling a port declared
/// `opaque`, which is never looked at, has no answer to be told why in
/// and is reset ([`net::reset_on_close`]): a FIN would pass for its
/// server's orderly close.
async fn answer_refused(
    app: &mut App,
    opaque: bool,
    refused: (StatusCode, &'static str),
    dst: impl std::fmt::Display,
    why: impl std::fmt::Display,
) {
    if opaque {
        net::reset_on_close(&app.tcp);
        return;
    }
    let message = format!("outbound call to {dst} refused: {why}");
    answer_app(app, refused, &message, false).await;
}

/// Answers the first request of an HTTP app with `status`, `message` and
/// `trellis-proxy-error: reason` ([`answer_refused`]); an app that does
/// not speak HTTP, or whose bytes could not be read, is reset when its
/// connection is dropped, never ended with a FIN that would pass for its
/// server's orderly close. So is one taken for HTTP that sent no whole
/// request head in time, or ended first (detection takes a text protocol
/// paused mid-line, `ping`, for the start of one): nothing of an answer
/// was written to it, and its write side is left open until the reset.
/// An HTTP/2 app that sent no request in time has had the server preface,
/// and gets a GOAWAY saying why, then a FIN ([`refusal::answer`]): one
/// that says no stream was processed, unless `request_may_have_gone` (its
/// request was passed to a peer that ended without saying it refused it),
/// when it names every stream as possibly processed, so that the app does
/// not send a request that is not idempotent again on its own.
async fn answer_app(
    app: &mut App,
    (status, reason): (StatusCode, &'static str),
    message: &str,
    request_may_have_gone: bool,
) {
    let (protocol, first) = match app.detected.take() {
        Some(detected) => detected,
        None => match http::detect(&mut app.tcp).await {
            Ok((protocol, read)) => (protocol, read.into_parts().0),
            Err(_) => return net::reset_on_close(&app.tcp),
        },
    };
    let version = match protocol {
        Protocol::Http1 => refusal::Version::Http1,
        Protocol::Http2 => refusal::Version::Http2,
        Protocol::Opaque => return net::reset_on_close(&app.tcp),
    };
    let refused = refusal::Refusal {
        status,
        grpc_code: if status == FORBIDDEN {
            refusal::GRPC_PERMISSION_DENIED
        } else {
            refusal::GRPC_UNAVAILABLE
        },
        message,
        proxy_error: Some(reason),
        request_may_have_gone,
    };
    // What detection read is the start of the app's request.
    let mut io = http::Rewind::with_prefix(first, &mut app.tcp);
    let answered = refusal::answer(&mut io, version, &refused, ANSWER_PATIENCE).await;
    drop(io);
    if answered == refusal::Answered::Nothing {
        net::reset_on_close(&app.tcp);
    }
}

/// A `--route` listener: plaintext on `route.local`, mTLS to `route.remote`.
pub struct RouteListener {
    listener: TcpListener,
    route: Arc<Route>,
    shared: Arc<Shared>,
    drain: Drain,
}

impl RouteListener {
    pub async fn new(route: Route, shared: Arc<Shared>, drain: Drain) -> io::Result<Self> {
        let listener = net::bind(route.local)?;
        Ok(RouteListener {
            listener,
            route: Arc::new(route),
            shared,
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let RouteListener {
            listener,
            route,
            shared,
            drain,
        } = self;
        // An address was checked with the flags; a host name is resolved
        // and checked for each connection.
        let named = route.remote.parse::<SocketAddr>().is_err();
        drain
            .accept(listener, "route", |tcp, client, tracker| {
                let (route, shared) = (route.clone(), shared.clone());
                tokio::spawn(async move {
                    let _tracker = tracker;
                    let _open = shared.metrics.open(OUTBOUND);
                    if !named {
                        return serve_route(&route, &shared, tcp, route.remote.as_str()).await;
                    }
                    match resolve_route(&route, &shared, client).await {
                        Ok(addrs) => serve_route(&route, &shared, tcp, addrs.as_slice()).await,
                        Err((reason, why)) => {
                            let mut app = App {
                                tcp,
                                detected: None,
                            };
                            let refused = (BAD_GATEWAY, reason);
                            Box::pin(answer_refused(&mut app, false, refused, &route.remote, why))
                                .await;
                        }
                    }
                });
            })
            .await;
    }
}

/// The addresses a route's host name stands for now, for a connection from
/// `client`. An error saying why (with the `trellis-proxy-error` of its
/// answer), the connection refused (logged and counted), when the name cannot be resolved within
/// [`net::CONNECT_TIMEOUT`], or when it stands for one of the sidecar's
/// own plaintext listeners: dialled, the
/// connection would come back to the route (or the outbound listener),
/// each connection making another until file descriptors run out.
async fn resolve_route(
    route: &Route,
    shared: &Shared,
    client: SocketAddr,
) -> Result<Vec<SocketAddr>, (&'static str, String)> {
    let metrics = &shared.metrics;
    let resolved = tokio::time::timeout(
        net::CONNECT_TIMEOUT,
        tokio::net::lookup_host(&*route.remote),
    )
    .await;
    let addrs: Vec<SocketAddr> = match resolved {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return unresolved(metrics, route, &e),
        Err(_) => {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {}", Words(net::CONNECT_TIMEOUT)),
            );
            return unresolved(metrics, route, &e);
        }
    };
    let own = addrs.iter().find(|addr| {
        shared
            .plaintext_listeners
            .iter()
            .any(|listener| net::reaches(*listener, **addr))
    });
    if let Some(own) = own {
        tracing::warn!(%client, %route, address = %own, "outbound connection refused: the route's remote resolves to this sidecar's own listener (loop)");
        metrics.connection(OUTBOUND, Outcome::Loop);
        let why = format!("it resolves to {own}, this sidecar (loop)");
        return Err((token::LOOP, why));
    }
    Ok(addrs)
}

/// Logs and counts a connection refused because its route's host name
/// could not be resolved (`e`); returns why, for the app.
fn unresolved(
    metrics: &Metrics,
    route: &Route,
    e: &io::Error,
) -> Result<Vec<SocketAddr>, (&'static str, String)> {
    let e = DialError::Connect(io::Error::new(
        e.kind(),
        format!("resolving {}: {e}", route.remote),
    ));
    let to = Upstream {
        remote: route.remote.as_str(),
        expected: &route.spiffe_id,
        via: "route",
        service: None,
    };
    refused(metrics, &e, &to, None);
    Err((e.answer_reason(), format!("{e} ({})", e.reason())))
}

/// One connection on a route: straight to the route's remote over mTLS
/// (`remote`: its address, or those its host name stands for), never
/// retried elsewhere. The remote app's port is the peer's business:
/// detection decides.
async fn serve_route<R>(route: &Route, shared: &Shared, tcp: TcpStream, remote: R)
where
    R: tokio::net::ToSocketAddrs + Copy,
{
    let metrics = &shared.metrics;
    let to = Upstream {
        remote: route.remote.as_str(),
        expected: &route.spiffe_id,
        via: "route",
        service: None,
    };
    let mut local = tcp;
    let Some((protocol, first)) = detect(metrics, &mut local, &to).await else {
        return;
    };
    // Boxed, so the handshake's state is freed once it is over instead of
    // sizing this connection's task for as long as it is open.
    let dialled = Box::pin(dial_mesh(
        shared,
        remote,
        net::CONNECT_TIMEOUT,
        to.expected,
        protocol,
        &first,
        remote_name(to.remote),
    ))
    .await;
    match dialled {
        Ok(upstream) => {
            // The first bytes went out with the handshake's end; kept
            // only until an answer comes (see `relay`).
            let sent = (first.len() as u64, Some(first));
            relay(shared, local, upstream, sent, protocol, &to, None).await;
        }
        Err(e) => {
            refused(metrics, &e, &to, None);
            let mut app = App {
                tcp: local,
                detected: Some((protocol, first)),
            };
            // Boxed, as a transparent connection's answers are: a refusal's
            // state would otherwise size every connection's future.
            Box::pin(answer_dial_refused(
                &mut app,
                false,
                &e,
                &route.remote,
                &route.remote,
            ))
            .await;
        }
    }
}

/// One transparent `--outbound` listener (a sidecar has one per address:
/// 127.0.0.1 and ::1 by default).
pub struct Transparent {
    listener: TcpListener,
    shared: Arc<Shared>,
    drain: Drain,
}

impl Transparent {
    pub async fn new(addr: SocketAddr, shared: Arc<Shared>, drain: Drain) -> io::Result<Self> {
        let listener = net::bind(addr)?;
        Ok(Transparent {
            listener,
            shared,
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let Transparent {
            listener,
            shared,
            drain,
        } = self;
        drain
            .accept(listener, "outbound", |tcp, client, tracker| {
                tokio::spawn(serve_transparent(shared.clone(), tcp, client, tracker));
            })
            .await;
    }
}

/// The service a transparent connection was addressed to: its name and the
/// virtual address the app dialled.
#[derive(Debug, Clone, Copy)]
struct ServiceCall<'a> {
    name: &'a str,
    dst: SocketAddr,
    /// How many backends it may go to, when it was resolved.
    candidates: usize,
}

/// The most backends one call to a service tries: the one picked and,
/// while connecting fails, others ([`target::retry`]). A pod that died is
/// listed until its EndpointSlice is updated, seconds later, and a call
/// picked for it meanwhile should not fail while others answer; the bound
/// keeps a call whose backends are all gone from trying each in turn.
const MAX_BACKENDS: usize = 3;

/// How long a backend of a service may take to answer a connection while
/// another could be tried after it. A pod on a node that went down answers
/// nothing (its packets are dropped, not refused) until its EndpointSlice
/// is updated; the full [`net::CONNECT_TIMEOUT`] for it would hold each
/// call picked for it 10 s before trying a live backend. Two seconds leave
/// room for one lost SYN, which Linux sends again after one second. The
/// last backend a call may try is given the full timeout.
const BACKEND_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the attempt that is the `attempt`th (from 1) of a call to a
/// service with `candidates` backends may wait for the backend to answer:
/// [`BACKEND_ATTEMPT_TIMEOUT`] while the call could go on to another,
/// [`net::CONNECT_TIMEOUT`] for the last it may try.
fn attempt_timeout(attempt: usize, candidates: usize) -> Duration {
    if attempt < candidates.min(MAX_BACKENDS) {
        BACKEND_ATTEMPT_TIMEOUT
    } else {
        net::CONNECT_TIMEOUT
    }
}

/// The backends a call to a service went to, in order, held inline: a
/// retry allocates nothing.
struct Tried {
    addrs: [SocketAddr; MAX_BACKENDS],
    len: usize,
}

impl Tried {
    fn new() -> Self {
        Tried {
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_BACKENDS],
            len: 0,
        }
    }

    /// Records an attempt at `addr`; no call makes more than
    /// [`MAX_BACKENDS`].
    fn push(&mut self, addr: SocketAddr) {
        if let Some(slot) = self.addrs.get_mut(self.len) {
            *slot = addr;
            self.len += 1;
        }
    }

    fn as_slice(&self) -> &[SocketAddr] {
        &self.addrs[..self.len]
    }

    /// `tried` as a log field when the call went to more than one backend.
    fn detour(tried: Option<&Tried>) -> Option<tracing::field::DisplayValue<&Tried>> {
        tried.filter(|t| t.len > 1).map(tracing::field::display)
    }
}

/// `a, b, c`, in the order tried.
impl std::fmt::Display for Tried {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, addr) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// A call to a service, whose backends are tried one after another while
/// connecting to them fails.
struct Retry<'a> {
    shared: &'a Shared,
    call: ServiceCall<'a>,
    tried: Tried,
}

impl Retry<'_> {
    /// The backend to try now that connecting to the last one tried failed
    /// with `error` (logged at debug level and counted), or `None` once
    /// [`MAX_BACKENDS`] were tried or no other candidate is left. Reads
    /// the snapshot in force now.
    fn next(&mut self, error: &io::Error) -> Option<Target> {
        let tried = self.tried.as_slice();
        if tried.len() >= MAX_BACKENDS {
            return None;
        }
        let next = {
            let snapshot = self.shared.snapshot.borrow();
            target::retry(
                &self.shared.own_addrs,
                snapshot.as_deref(),
                self.call.dst,
                tried,
            )
        }?;
        let reason = net::ConnectFailure::of(error);
        tracing::debug!(
            dst = %self.call.dst,
            service = self.call.name,
            backend = tried.last().map(tracing::field::display),
            next = next.dialled().map(tracing::field::display),
            reason = %reason,
            error = %error,
            "outbound connection to a service backend failed; trying another backend"
        );
        self.shared.metrics.service_retry(reason);
        Some(next)
    }
}

/// The app's side of a transparent connection and, once a mesh dial
/// needed them, the protocol detected and the bytes detection read: an
/// attempt at another backend after it uses them, never reading the app
/// again.
struct App {
    tcp: TcpStream,
    detected: Option<(Protocol, BytesMut)>,
}

/// What an HTTP app that called the transparent outbound port itself is
/// told: where its calls should go instead.
const NOT_REDIRECTED: &str = "this is the sidecar's transparent outbound port: it serves \
    connections iptables redirected to it (`trellis-proxy init`), which name their destination, \
    and this one was not redirected; without interception, call the local address of a --route";

/// Why a transparent connection is refused before the sidecar's first
/// snapshot, which says what is in the mesh.
const NO_SNAPSHOT: &str = "this sidecar has no snapshot yet, so it knows no destination in the \
    mesh (its log says why: the control plane not reached, or a Watch it refused)";

/// One redirected connection (see [`forward_transparent`]).
async fn serve_transparent(
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    _tracker: Tracker,
) {
    let metrics = &shared.metrics;
    let _open = metrics.open(OUTBOUND);

    let Some(dst) = net::original_dst(&tcp) else {
        tracing::warn!(%client, "outbound connection refused: no original destination (not redirected)");
        metrics.connection(OUTBOUND, Outcome::Refused);
        // An app (or a user with curl) that calls this port itself, as
        // if it were a proxy, is told what the port is for rather than
        // left with an empty reply.
        let mut app = App {
            tcp,
            detected: None,
        };
        answer_app(
            &mut app,
            (StatusCode::MISDIRECTED_REQUEST, token::NOT_REDIRECTED),
            NOT_REDIRECTED,
            false,
        )
        .await;
        return;
    };
    forward_transparent(&shared, tcp, client, dst).await;
}

/// A connection from `client` that the app made to `dst`: mesh
/// destinations over mTLS, others per the mesh's outbound policy, a
/// service's virtual address by one of its backends (see [`resolve`]). A
/// call to a service whose backend cannot be connected to goes on to
/// another ([`Retry`]); nothing else is ever tried twice.
async fn forward_transparent(shared: &Shared, tcp: TcpStream, client: SocketAddr, dst: SocketAddr) {
    let metrics = &shared.metrics;
    let (
        Resolved {
            service,
            candidates,
            opaque: dst_opaque,
            mut target,
        },
        known,
    ) = {
        let snapshot = shared.snapshot.borrow();
        let resolved = resolve(&shared.own_addrs, snapshot.as_deref(), dst);
        (resolved, snapshot.is_some())
    };
    let call = service.as_deref().map(|name| ServiceCall {
        name,
        dst,
        candidates,
    });
    let name = call.map(|c| c.name);
    let via = if call.is_some() {
        "service"
    } else {
        "transparent"
    };
    // The backend picked is logged only when there was a service to pick
    // it: otherwise it is `dst`.
    let backend = |addr: SocketAddr| call.map(|_| tracing::field::display(addr));
    let mut app = App {
        tcp,
        detected: None,
    };
    // A direct destination has no other to try.
    let mut retry = call.map(|call| Retry {
        shared,
        call,
        tried: Tried::new(),
    });
    loop {
        if let (Some(retry), Some(addr)) = (&mut retry, target.dialled()) {
            retry.tried.push(addr);
        }
        let connect_timeout = retry.as_ref().map_or(net::CONNECT_TIMEOUT, |r| {
            attempt_timeout(r.tried.len, r.call.candidates)
        });
        // Every arm ends the connection but for a failed connect, after
        // which nothing of the app's has left and another backend of a
        // service may be tried. A refusal's answer is boxed: its state,
        // larger than a relay's, would otherwise size every connection's
        // future for as long as it is open.
        let next = match &target {
            Target::Loop(addr) => {
                tracing::warn!(%client, %dst, service = name, backend = backend(*addr), "outbound connection refused: destination is this proxy (loop)");
                metrics.connection(OUTBOUND, Outcome::Loop);
                let why = format!("{addr} is this sidecar (loop)");
                Box::pin(answer_refused(
                    &mut app,
                    dst_opaque,
                    (BAD_GATEWAY, token::LOOP),
                    dst,
                    why,
                ))
                .await;
                return;
            }
            Target::NoBackend => {
                tracing::info!(%client, %dst, service = name, "outbound connection refused: no ready backend");
                metrics.connection(OUTBOUND, Outcome::NoBackend);
                let why = format!("service {} has no ready backend", name.unwrap_or(""));
                let refused = (SERVICE_UNAVAILABLE, token::NO_BACKEND);
                Box::pin(answer_refused(&mut app, dst_opaque, refused, dst, why)).await;
                return;
            }
            Target::NoMeshBackend { backends } => {
                tracing::info!(%client, %dst, service = name, backends, decision = %"deny", policy = %OUTBOUND_DENY, "outbound connection refused: no ready backend is in the mesh and the outbound policy is deny");
                metrics.connection(OUTBOUND, Outcome::NoMeshBackend);
                let why = format!(
                    "no ready backend of service {} is in the mesh, and the outbound policy is deny",
                    name.unwrap_or("")
                );
                let refused = (SERVICE_UNAVAILABLE, token::NO_MESH_BACKEND);
                Box::pin(answer_refused(&mut app, dst_opaque, refused, dst, why)).await;
                return;
            }
            // Before the first snapshot no destination is known to be in
            // the mesh: refused, but not for being outside it, which may
            // be false (a sidecar restarted beside a running app).
            Target::Outside {
                policy: OutboundPolicy::Deny,
                ..
            } if !known => {
                // Named as the inbound side names its denials before the
                // first snapshot: whatever the outbound policy will be.
                tracing::info!(
                    %client,
                    %dst,
                    decision = %"deny",
                    policy = %trellis_core::policy::NO_SNAPSHOT,
                    "outbound connection refused: {NO_SNAPSHOT}"
                );
                metrics.connection(OUTBOUND, Outcome::Denied);
                let refused = (SERVICE_UNAVAILABLE, token::NOT_READY);
                Box::pin(answer_refused(
                    &mut app,
                    dst_opaque,
                    refused,
                    dst,
                    NO_SNAPSHOT,
                ))
                .await;
                return;
            }
            Target::Outside {
                addr,
                policy: OutboundPolicy::Deny,
                ..
            } => {
                tracing::info!(
                    %client,
                    %dst,
                    service = name,
                    backend = backend(*addr),
                    decision = %"deny",
                    policy = %OUTBOUND_DENY,
                    "outbound connection denied: destination outside the mesh, and the outbound \
                     policy is deny (let it out with the pod annotation \
                     trellis.io/exclude-outbound-cidrs or -ports, or the mesh's outbound policy \
                     passthrough)"
                );
                metrics.connection(OUTBOUND, Outcome::Denied);
                let why = format!("{addr} is outside the mesh, and the outbound policy is deny");
                Box::pin(answer_refused(
                    &mut app,
                    dst_opaque,
                    (FORBIDDEN, token::DENIED),
                    dst,
                    why,
                ))
                .await;
                return;
            }
            Target::Mesh { addr, id, opaque } => {
                let to = Upstream {
                    remote: *addr,
                    expected: id,
                    via,
                    service: call,
                };
                // An `opaque` connection (see [`Target::Mesh`]) is never
                // looked at, so a server-first protocol there (MySQL,
                // SMTP) does not wait for detection; it offers no ALPN.
                if app.detected.is_none() && !opaque {
                    match detect(metrics, &mut app.tcp, &to).await {
                        Some(detected) => app.detected = Some(detected),
                        None => return,
                    }
                }
                let (protocol, first) = match &app.detected {
                    Some((protocol, first)) if !opaque => (*protocol, &first[..]),
                    Some((_, first)) => (Protocol::Opaque, &first[..]),
                    None => (Protocol::Opaque, &[][..]),
                };
                // Boxed, so the handshake's state is freed once it is over
                // instead of sizing this connection's task for as long as
                // it is open.
                let dialled = Box::pin(dial_mesh(
                    shared,
                    *addr,
                    connect_timeout,
                    id,
                    protocol,
                    first,
                    peer_name(*addr),
                ))
                .await;
                match dialled {
                    Ok(upstream) => {
                        // The first bytes went out with the handshake's
                        // end; kept only until an answer comes, and not
                        // at all for opaque TCP (see `relay`).
                        let App { tcp, detected } = app;
                        let first = detected.map(|(_, first)| first);
                        let sent = first.as_ref().map_or(0, |first| first.len() as u64);
                        let sent = (sent, first);
                        let tried = retry.as_ref().map(|r| &r.tried);
                        relay(shared, tcp, upstream, sent, protocol, &to, tried).await;
                        return;
                    }
                    Err(DialError::Connect(e)) => match retry.as_mut().and_then(|r| r.next(&e)) {
                        Some(next) => next,
                        None => {
                            let tried = retry.as_ref().map(|r| &r.tried);
                            let e = DialError::Connect(e);
                            refused(metrics, &e, &to, tried);
                            Box::pin(answer_dial_refused(&mut app, *opaque, &e, dst, *addr)).await;
                            return;
                        }
                    },
                    // Once the connection is made nothing is retried: a
                    // peer that is not who the mesh says is a refusal.
                    Err(e) => {
                        refused(metrics, &e, &to, retry.as_ref().map(|r| &r.tried));
                        Box::pin(answer_dial_refused(&mut app, *opaque, &e, dst, *addr)).await;
                        return;
                    }
                }
            }
            Target::SamePod { addr, opaque }
            | Target::Outside {
                addr,
                policy: OutboundPolicy::Passthrough,
                opaque,
            } => {
                let same_pod = matches!(target, Target::SamePod { .. });
                // A connection within the pod gets no user timeout: its
                // peer does not vanish.
                let dialled = if same_pod {
                    net::connect_in_pod_within(*addr, connect_timeout).await
                } else {
                    net::connect_within(*addr, connect_timeout, shared.user_timeout).await
                };
                match dialled {
                    Ok(upstream) => {
                        let tried = Tried::detour(retry.as_ref().map(|r| &r.tried));
                        let outcome = if same_pod {
                            tracing::info!(%client, %dst, service = name, backend = backend(*addr), tried, "outbound connection within the pod: plain TCP to this pod's own address");
                            Outcome::SamePod
                        } else {
                            tracing::info!(%client, %dst, service = name, backend = backend(*addr), tried, "outbound connection passthrough: destination outside the mesh");
                            Outcome::Passthrough
                        };
                        copy_plain(metrics, app, upstream, outcome).await;
                        return;
                    }
                    Err(e) => match retry.as_mut().and_then(|r| r.next(&e)) {
                        Some(next) => next,
                        None => {
                            // Logged, counted, answered and ended in the
                            // text with one reason, as a failed mesh dial
                            // is; the error says how the connect failed.
                            const CONNECT_FAILED: &str = token::CONNECT_FAILED;
                            let tried = retry.as_ref().map(|r| tracing::field::display(&r.tried));
                            if same_pod {
                                tracing::warn!(%dst, service = name, backend = backend(*addr), tried, reason = %CONNECT_FAILED, error = %e, "outbound connection within the pod failed");
                            } else {
                                tracing::warn!(%dst, service = name, backend = backend(*addr), tried, reason = %CONNECT_FAILED, error = %e, "outbound passthrough failed");
                            }
                            metrics.connection(OUTBOUND, Outcome::ConnectFailed);
                            let why = format!("connecting to {addr}: {e} ({CONNECT_FAILED})");
                            let refused = (BAD_GATEWAY, CONNECT_FAILED);
                            Box::pin(answer_refused(&mut app, *opaque, refused, dst, why)).await;
                            return;
                        }
                    },
                }
            }
        };
        target = next;
    }
}

/// Copies a plain connection both ways until both sides close, after the
/// bytes detection read from the app, if it ran; counted as `outcome`
/// when it ends well.
async fn copy_plain(metrics: &Metrics, app: App, upstream: TcpStream, outcome: Outcome) {
    let App {
        tcp: local,
        detected,
    } = app;
    // A reset on one side is a reset on the other, and so is a copy
    // dropped mid-way (see `relay`): both are reset unless it ends cleanly.
    let mut local = net::ResetIfCut::tcp(local);
    let mut upstream = net::ResetIfCut::tcp(upstream);
    let mut sent = 0;
    if let Some((_, first)) = detected
        && !first.is_empty()
    {
        if upstream.write_all(&first).await.is_err() {
            metrics.connection(OUTBOUND, Outcome::Error);
            return;
        }
        sent = first.len() as u64;
    }
    let copied = net::copy(&mut *local, &mut *upstream).await;
    metrics.bytes(OUTBOUND, sent + copied.there + copied.back);
    match copied.error {
        None => {
            local.ended();
            upstream.ended();
            metrics.connection(OUTBOUND, outcome);
        }
        Some(_) => metrics.connection(OUTBOUND, Outcome::Error),
    }
}

#[cfg(test)]
mod tests;
