//! The inbound listener: every connection from another sidecar is accepted,
//! authenticated (TLS 1.3, client SVID mandatory), authorized and forwarded
//! to the local application. [`serve`] is the whole path of one connection.
//!
//! This module never trusts a peer it has not verified and never forwards
//! for one policy has not allowed: before the first certificate, for any
//! handshake failure, before the first policy snapshot and for a denied
//! peer, the application is never dialled (a denied peer that settled HTTP
//! by ALPN is served as HTTP all the same, every request refused with 403
//! naming the policy; any other denied connection is dropped). Before the
//! first certificate a caller's handshake is answered with an
//! `access_denied` alert, which its sidecar reads as "not ready".
//! A forwarded connection keeps watching the policies in force and is
//! closed as soon as they deny it (unless `close_denied` is off), or as
//! soon as the snapshot's revocations cover its caller's certificate; a
//! caller they cover is refused once its handshake is over, before the app
//! is dialled, for a full handshake and a resumed session alike.
//!
//! An allowed connection is forwarded by what it carries: HTTP settled by
//! ALPN in the handshake, or else found by detection, is handed to
//! [`crate::http`], which decides every request again; on a port declared
//! opaque (where the handshake never settles HTTP), or when detection
//! finds no HTTP, bytes are copied. HTTP/2 is served once its client
//! preface is in (a caller that sends none in time is closed; one that
//! sends other bytes in its place is told why), and only
//! while its peer and the port have room for another HTTP/2 connection
//! (`inbound/h2.rs`): one more is refused with GOAWAY.
//!
//! The app is dialled where the caller meant to reach it: a connection
//! iptables redirected here goes to its original destination, an address
//! and port of this pod (`inbound/target.rs`), never to loopback, so a listener the
//! app keeps on loopback stays private; one that came straight to the port
//! (no interception, as in the local demo) goes to `--app`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::server::Acceptor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

use trellis_core::SpiffeId;
use trellis_core::duration::Words;
use trellis_core::logging::keyed::Keyed;
use trellis_core::logging::throttle::Throttle;
use trellis_core::policy::{Decision, RuleRef};
use trellis_core::refusal::{refuse_plaintext_briefly, token};

use crate::drain::{Drain, Tracker};
use crate::http;
use crate::metrics::{INBOUND, Metrics, Outcome};
use crate::net;
use crate::policy::{self, Policies};
use crate::tls::HandshakeFailure;
use crate::tls::TlsState;
use trellis_core::slots::{ClientSlot, ClientSlots, NoSlot};
use trellis_core::{warn_throttled, warn_throttled_by_key};

mod h2;
mod target;

pub use h2::{H2Connections, H2Refused};
pub use target::Loop;

/// Inbound connections in their handshake phase at once, from accept to
/// the end of the TLS handshake: the phase where a peer is not yet
/// authenticated and holds the TLS state of its handshake, up to 64 KiB of
/// a ClientHello rustls buffers among it, for up to
/// [`HANDSHAKE_TIMEOUT`](net::HANDSHAKE_TIMEOUT). While this many are, the
/// listener accepts no more: new connections wait in the listen backlog.
/// A connection waiting for a slot of its address
/// ([`MAX_WAITING_PER_CLIENT`]) does not count here.
pub const MAX_HANDSHAKES: usize = 1024;

/// Inbound connections from one client address in their handshake phase at
/// once, so one address cannot take all of [`MAX_HANDSHAKES`]. A caller's
/// sidecar dials from one address however many of its app's connections
/// it carries, so a burst of new connections from it takes several of
/// these; one over them waits for a slot ([`HANDSHAKE_SLOT_WAIT`]).
pub const MAX_HANDSHAKES_PER_CLIENT: usize = 64;

/// Inbound connections from one client address that may wait for one of
/// its [`MAX_HANDSHAKES_PER_CLIENT`] slots; one more is refused at once.
/// A caller's pool of a few hundred connections opened at once waits and
/// is served. Under half of [`MAX_WAITING`], so that two addresses
/// cannot take every wait.
pub const MAX_WAITING_PER_CLIENT: usize = 448;

/// Inbound connections of every address together that may wait for a
/// slot of their address; one more that would wait is refused at once. A
/// waiting connection holds none of [`MAX_HANDSHAKES`] (else a few
/// addresses, by making their connections wait, would hold them all and
/// leave every other caller in the listen backlog), only its task and
/// socket, no TLS state: this bounds them. A caller whose address holds
/// fewer than its slots never waits, so is never refused by it.
pub const MAX_WAITING: usize = 1024;

/// How long a connection waits for a handshake slot of its client address,
/// and then for one of [`MAX_HANDSHAKES`], before it is refused (counted
/// as the handshake failure `overloaded`): long enough for a sidecar short
/// of CPU to get through a burst's handshakes, well within the caller's
/// own handshake timeout.
pub const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_secs(5);

/// How often connections refused before they were authenticated are
/// logged, at most, for each reason: the first at once, the next after
/// the pause with how many were not logged meanwhile. The admin port's
/// connections past its limits are logged so too, for each limit.
pub const REFUSAL_LOG_PAUSE: Duration = Duration::from_secs(10);

/// Peers whose refusals for a revoked identity are logged each in a
/// window of their own ([`REFUSAL_LOG_PAUSE`]); past them, the others
/// share one. Bounds what the throttle of those lines remembers.
pub const REVOKED_PEERS_LOGGED: usize = 64;

/// What most refusals of [`Shared::refuse`] log.
const HANDSHAKE_FAILED: &str = "inbound handshake failed";

/// What a caller refused for a revocation of its identity is logged with.
const REVOKED_REFUSED: &str = "inbound connection refused: the caller's identity is revoked";

/// The limits on inbound connections in their handshake phase, and on the
/// lines their refusals log, shared by every inbound address of a
/// sidecar.
pub struct Handshakes {
    /// One permit for each connection in its handshake, from its accept
    /// (or the end of its wait for a slot of its address) to the end of
    /// its handshake.
    permits: Arc<Semaphore>,
    /// One permit for each connection waiting for a slot of its address.
    waiting: Arc<Semaphore>,
    max_waiting: usize,
    /// The handshake slots of each client address.
    clients: Arc<ClientSlots>,
    waiting_per_client: usize,
    slot_wait: Duration,
    /// The lines of refusals written, by reason.
    refusals: Throttle,
    /// The lines of refusals of revoked callers written, by identity.
    revoked: Keyed<SpiffeId>,
}

/// What a connection holds in its handshake: one of
/// [`Handshakes::permits`] and a slot of its address, given back once its
/// handshake is over.
struct Handshaking {
    _permit: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

/// Why a connection was refused before its handshake (the handshake
/// failure `overloaded`).
#[derive(Debug, thiserror::Error)]
enum Overloaded {
    #[error(transparent)]
    Address(#[from] NoSlot),
    #[error(
        "the address holds all of its slots and {0} connections of all addresses wait for one already"
    )]
    Waiting(usize),
    #[error("the address's slot came, but no handshake came free within {}", Words(*.0))]
    Handshakes(Duration),
}

impl Handshakes {
    /// At most `total` connections in their handshake phase at once,
    /// `per_client` of them from one address, with `waiting_per_client`
    /// more from that address, and `waiting` from all addresses together,
    /// waiting up to `slot_wait` for one of its slots.
    pub fn new(
        total: usize,
        waiting: usize,
        per_client: usize,
        waiting_per_client: usize,
        slot_wait: Duration,
    ) -> Self {
        Handshakes {
            permits: Arc::new(Semaphore::new(total)),
            waiting: Arc::new(Semaphore::new(waiting)),
            max_waiting: waiting,
            clients: ClientSlots::new(per_client),
            waiting_per_client,
            slot_wait,
            refusals: Throttle::new(REFUSAL_LOG_PAUSE),
            revoked: Keyed::new(REFUSAL_LOG_PAUSE, REVOKED_PEERS_LOGGED),
        }
    }

    /// The permits a connection takes before it is accepted.
    pub fn permits(&self) -> &Arc<Semaphore> {
        &self.permits
    }

    /// Lets a connection from `client`, accepted with `permit`, into its
    /// handshake: at once if its address has a slot free. Else it gives
    /// `permit` back, so that connections waiting for their addresses
    /// never hold the handshakes of others, waits for a slot of its
    /// address among at most [`MAX_WAITING`] waiting, then for a permit
    /// again.
    async fn admit(
        &self,
        client: IpAddr,
        permit: OwnedSemaphorePermit,
    ) -> Result<Handshaking, Overloaded> {
        if let Some(slot) = self.clients.try_take(client) {
            return Ok(Handshaking {
                _permit: permit,
                _slot: slot,
            });
        }
        drop(permit);
        let started = Instant::now();
        let Ok(_waiting) = self.waiting.clone().try_acquire_owned() else {
            return Err(Overloaded::Waiting(self.max_waiting));
        };
        let slot = self
            .clients
            .take_within(client, self.slot_wait, self.waiting_per_client)
            .await?;
        let left = self.slot_wait.saturating_sub(started.elapsed());
        let permit = tokio::time::timeout(left, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Overloaded::Handshakes(self.slot_wait))?
            .expect("the handshake permits are never closed");
        Ok(Handshaking {
            _permit: permit,
            _slot: slot,
        })
    }
}

impl Default for Handshakes {
    fn default() -> Self {
        Self::new(
            MAX_HANDSHAKES,
            MAX_WAITING,
            MAX_HANDSHAKES_PER_CLIENT,
            MAX_WAITING_PER_CLIENT,
            HANDSHAKE_SLOT_WAIT,
        )
    }
}

/// One bound inbound address; [`Inbound::run`] accepts on it. A sidecar
/// has one per `--inbound` address (IPv4 and IPv6), sharing one [`Shared`].
pub struct Inbound {
    listener: TcpListener,
    shared: Arc<Shared>,
    drain: Drain,
}

/// What every inbound connection reads.
pub struct Shared {
    /// Where a connection nothing redirected goes (`--app`); a redirected
    /// one goes where its caller dialled (`target::redirected_to`).
    pub app: SocketAddr,
    /// Ports of the proxy's other listeners (outbound, admin, routes).
    pub own_ports: Vec<u16>,
    /// This pod's addresses: those the sidecar advertises (in Kubernetes,
    /// the pod's IPs), without loopback or unspecified ones.
    pub pod_ips: Vec<IpAddr>,
    pub tls: watch::Receiver<Arc<TlsState>>,
    /// The policies in force; `None` until the first snapshot (deny all).
    pub policies: watch::Receiver<Option<Arc<Policies>>>,
    /// Whether an open connection that new policies deny is closed.
    pub close_denied: bool,
    /// Ports whose traffic is never inspected as HTTP (`--opaque-ports`).
    pub opaque_ports: Vec<u16>,
    /// `TCP_USER_TIMEOUT` of the connections accepted
    /// (`--tcp-user-timeout`; [`net::bind_mesh`]).
    pub user_timeout: Option<Duration>,
    /// The connections to the app for HTTP: parked HTTP/1 ones and one
    /// HTTP/2 connection to each port.
    pub http: Arc<crate::http::Http>,
    pub metrics: Arc<Metrics>,
    /// The limits on connections in their handshake phase.
    pub handshakes: Handshakes,
    /// The limits on HTTP/2 connections served at once.
    pub h2: H2Connections,
}

impl Shared {
    /// Counts a connection from `client` refused before it was
    /// authenticated, as the handshake failure `reason`, and logs it as
    /// `message` with `error` (when there is one) - unless a refusal for
    /// the same reason was logged within the last
    /// [`REFUSAL_LOG_PAUSE`]: a flood of connections that fail theirs
    /// (plaintext, foreign certificates, stalled) writes one line per
    /// reason per pause, the next one saying how many were not logged
    /// since (`suppressed`). The metric counts every one.
    fn refuse(
        &self,
        client: SocketAddr,
        reason: HandshakeFailure,
        error: Option<&dyn std::fmt::Display>,
        message: &str,
    ) {
        self.metrics.handshake_failure(INBOUND, reason);
        self.metrics.connection(INBOUND, Outcome::Refused);
        let error = error.map(tracing::field::display);
        warn_throttled!(
            self.handshakes.refusals,
            reason.token(),
            { %client, reason = %reason, error },
            "{message}"
        );
    }

    /// [`Shared::refuse`] for a handshake that failed with `error`, with
    /// what the client certificate claims when the verifier refused one
    /// (`claimed`): the SPIFFE ID of its URI SAN (`claimed_peer`), and its
    /// `not_after` when it has expired, its `not_before` when it is not
    /// valid yet, or its `issuer` when no root of the bundle leads to it.
    /// Unverified, so only ever logged.
    fn refuse_certificate(
        &self,
        client: SocketAddr,
        reason: HandshakeFailure,
        error: &dyn std::fmt::Display,
        claimed: Option<&trellis_core::tls::Claimed>,
    ) {
        self.metrics.handshake_failure(INBOUND, reason);
        self.metrics.connection(INBOUND, Outcome::Refused);
        let claimed_peer = claimed.and_then(|c| c.peer.as_ref());
        let not_after = claimed.and_then(|c| c.not_after.as_deref());
        let not_before = claimed.and_then(|c| c.not_before.as_deref());
        let issuer = claimed.and_then(|c| c.issuer.as_ref());
        warn_throttled!(
            self.handshakes.refusals,
            reason.token(),
            {
                %client,
                reason = %reason,
                %error,
                claimed_peer = claimed_peer.map(tracing::field::display),
                not_after = not_after.map(tracing::field::display),
                not_before = not_before.map(tracing::field::display),
                issuer = issuer.map(tracing::field::display)
            },
            "{HANDSHAKE_FAILED}"
        );
    }

    /// Counts a caller `peer` from `client` refused, by the verifier or
    /// once its handshake was over, because a revocation of its identity
    /// covers its certificate,
    /// as the handshake failure `revoked` (as the outbound dial and the
    /// control plane count theirs; no policy decided it, so it is no
    /// decision), and logs it naming the peer, unless a refusal of the
    /// same peer was logged within the last [`REFUSAL_LOG_PAUSE`]: one
    /// revoked caller's retries write one line per pause, and another
    /// revoked caller's first refusal is logged all the same.
    fn refuse_revoked(
        &self,
        client: SocketAddr,
        peer: &SpiffeId,
        error: &trellis_core::revocation::Revoked,
    ) {
        let reason = HandshakeFailure::Revoked;
        self.metrics.handshake_failure(INBOUND, reason);
        self.metrics.connection(INBOUND, Outcome::Refused);
        warn_throttled_by_key!(
            self.handshakes.revoked,
            peer,
            { %peer, %client, reason = %reason, %error },
            "{REVOKED_REFUSED}"
        );
    }

    /// Whether `port` is opaque: declared so on this sidecar, or mesh-wide
    /// (in the snapshot in force).
    fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
            || self
                .policies
                .borrow()
                .as_ref()
                .is_some_and(|p| p.is_opaque(port))
    }
}

impl Inbound {
    pub async fn new(addr: SocketAddr, shared: Arc<Shared>, drain: Drain) -> io::Result<Self> {
        let listener = net::bind_mesh(addr, shared.user_timeout)?;
        Ok(Inbound {
            listener,
            shared,
            drain,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until shutdown, one task per connection, while fewer than
    /// the limit of connections are in their handshake phase.
    pub async fn run(self) {
        let Inbound {
            listener,
            shared,
            drain,
        } = self;
        drain
            .accept_with_permits(
                listener,
                "inbound",
                shared.handshakes.permits(),
                |tcp, client, tracker, handshake| {
                    tokio::spawn(serve(shared.clone(), tcp, client, tracker, handshake));
                },
            )
            .await;
    }
}

/// Answers a caller's handshake with an `access_denied` alert while this
/// sidecar has no certificate ([`crate::tls::not_ready_server`]), within
/// [`net::HANDSHAKE_TIMEOUT`], holding the connection's handshake slot.
async fn answer_not_ready(tcp: TcpStream, _handshaking: Handshaking) {
    let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::not_ready_server());
    let _ = tokio::time::timeout(net::HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
}

/// What a client that sends plaintext to the inbound port is told (a caller
/// outside the mesh whose connection to the app was redirected here, or
/// curl pointed at the port).
const PLAINTEXT_ANSWER: &str = "this is a Trellis sidecar's inbound port: it accepts only mutual \
     TLS from another sidecar of the mesh; call the app from a workload that has a Trellis sidecar";

/// The `trellis-proxy-error` of the answer to plaintext
/// ([`PLAINTEXT_ANSWER`]), as its handshake failure is counted.
const PLAINTEXT_REASON: HandshakeFailure = HandshakeFailure::NotTls;

/// One inbound connection, from accept to close. `handshake` is its permit
/// of [`Handshakes::permits`], held until its handshake is over (given
/// back while it waits for a slot of its address).
pub async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    tracker: Tracker,
    handshake: OwnedSemaphorePermit,
) {
    let metrics = &shared.metrics;
    let _open = metrics.open(INBOUND);

    // Where the caller meant to go: its original destination when
    // iptables redirected it here, else the configured app.
    let target = match net::original_dst(&tcp) {
        None => shared.app,
        Some(dst) => {
            let arrived_on = tcp.local_addr().ok().map(|a| a.ip());
            match target::redirected_to(dst, arrived_on, &shared.own_ports, &shared.pod_ips) {
                Ok(target) => target,
                Err(e) => {
                    tracing::warn!(%client, %dst, error = %e, "inbound connection refused");
                    metrics.connection(INBOUND, e.outcome());
                    return;
                }
            }
        }
    };

    // One of the address's handshake slots, waited for a while (without
    // the permit) when it holds them all: a burst from a caller's sidecar
    // is served in turn.
    let handshaking = match shared.handshakes.admit(client.ip(), handshake).await {
        Ok(handshaking) => handshaking,
        Err(e) => {
            let refused = "inbound handshake refused";
            return shared.refuse(client, HandshakeFailure::Overloaded, Some(&e), refused);
        }
    };

    // Authenticate: the configs current now serve this connection for its
    // whole life; a rotation only affects later connections.
    let tls = shared.tls.borrow().clone();
    let (Some(server), Some(http_server)) = (tls.server(), tls.http_server()) else {
        let refused = match tls.expired_at() {
            Some(_) => {
                "inbound connection refused: this sidecar's certificate expired, not renewed"
            }
            None => "inbound connection refused: no certificate yet",
        };
        shared.refuse(client, HandshakeFailure::NoLocalCertificate, None, refused);
        // Told with an alert, not a reset: the caller's sidecar says this
        // one is not ready, where a reset reads as a crash.
        // Boxed, as the handshake below is, with what it holds: not
        // sizing this task. The handshake's slot is held until it ends.
        let answer = Box::pin(answer_not_ready(tcp, handshaking));
        drop(tls);
        return answer.await;
    };
    let opaque = shared.is_opaque(target.port());
    // Plaintext is counted and logged once seen, before its answer: the
    // answer lingers (`trellis_core::refusal::answer`), and a client that
    // reads the metrics or the log once answered finds its refusal there.
    let mut plaintext = false;
    let found_plaintext = || {
        plaintext = true;
        let error = net::PlaintextAnswered;
        shared.refuse(client, PLAINTEXT_REASON, Some(&error), HANDSHAKE_FAILED);
    };
    // Boxed, so its state (the TLS acceptor, about 2 KiB) is freed once
    // the handshake is over instead of sizing this task for the life of
    // the connection. What a client certificate the verifier refuses
    // claims comes out with it, for the refusal's line.
    let handshake = Box::pin(trellis_core::tls::noting_refused(async {
        let mut tcp = tcp;
        let patience = net::HANDSHAKE_TIMEOUT;
        let (answer, reason) = (PLAINTEXT_ANSWER, Some(PLAINTEXT_REASON.token()));
        if refuse_plaintext_briefly(&mut tcp, answer, reason, patience, found_plaintext).await {
            // Counted and logged in `found_plaintext`: only ends the attempt.
            return Err(io::ErrorKind::InvalidData.into());
        }
        // The session tickets, written after the handshake flight, wait
        // for the first answer and leave in its segment.
        let mut tcp = net::ReadAhead::new(tcp);
        tcp.hold_after_first_flush();
        let hello = LazyConfigAcceptor::new(Acceptor::default(), tcp).await?;
        let resuming = offers_x25519_alone(&hello.client_hello());
        // HTTP is settled by ALPN only where it may be served; any other
        // offer (or none) gets the config that settles nothing, so the
        // handshake goes on and detection decides.
        let offers_http = hello
            .client_hello()
            .alpn()
            .is_some_and(|mut ids| ids.any(|id| http::Protocol::from_alpn(id).is_some()));
        let config = if offers_http && !opaque {
            http_server
        } else {
            server
        };
        match hello.into_stream(config.clone()).into_fallible().await {
            Ok(mut stream) => {
                stream.get_mut().0.release();
                stream.get_mut().0.read_ahead();
                Ok(stream)
            }
            Err((e, io)) => {
                let e = io.fail_handshake(e).await;
                Err(if resuming && ended_by_the_caller(&e) {
                    io::Error::other(net::ResumptionRefused)
                } else {
                    e
                })
            }
        }
    }));
    // Matched as it comes: a named result would keep its slot, the size of
    // a TLS stream, in this future for the life of the connection.
    let stream = match tokio::time::timeout(net::HANDSHAKE_TIMEOUT, handshake).await {
        Ok((Ok(stream), _)) => Box::new(stream),
        // Counted when it was seen, its answer sent or cut short since.
        _ if plaintext => return,
        Ok((Err(e), claimed)) => {
            let reason = crate::tls::failure::of_io(&e);
            let error = trellis_core::tls::Described(&e);
            if reason == HandshakeFailure::NotResumed {
                // Expected once per caller holding tickets
                // (`net::ResumptionRefused`): not a warning.
                tracing::debug!(%client, reason = %reason, %error, "inbound handshake ended");
                metrics.handshake_failure(INBOUND, reason);
                metrics.connection(INBOUND, Outcome::Refused);
                return;
            }
            // Refused by the verifier with the alert `certificate_revoked`:
            // logged and counted as the check below does for a resumed
            // session, naming the peer (its chain was verified).
            if let Some(revoked) = claimed.as_ref().and_then(|c| c.revoked.as_ref())
                && reason == HandshakeFailure::Revoked
            {
                return shared.refuse_revoked(client, &revoked.spiffe_id, revoked);
            }
            return shared.refuse_certificate(client, reason, &error, claimed.as_ref());
        }
        Err(_) => return shared.refuse(client, HandshakeFailure::Timeout, None, HANDSHAKE_FAILED),
    };
    // The handshake is over: its slots go to the next connections.
    drop(handshaking);
    // A resumed session's chain, which no verifier saw, is verified again
    // once a root of the bundle has expired: it may lead to that one.
    if let Err(e) = tls.verify_resumed_caller(stream.get_ref().1) {
        let reason = HandshakeFailure::of_rustls(&e);
        let error = trellis_core::tls::Described(&e);
        return shared.refuse(client, reason, Some(&error), HANDSHAKE_FAILED);
    }
    drop(tls);
    metrics.established(INBOUND, stream.get_ref().1);
    let (peer, not_before) =
        match trellis_core::tls::peer_svid(stream.get_ref().1.peer_certificates()) {
            Ok(peer) => peer,
            Err(e) => {
                // A full handshake's verifier has checked the SVID already; a
                // resumed session's certificate is checked only here, and one
                // that has expired since the session began is refused.
                let reason = e.reason();
                return shared.refuse(client, reason, Some(&e), HANDSHAKE_FAILED);
            }
        };

    // Authorize on the peer's identity and the port it meant to reach,
    // against the policies in force now (an `Arc`, so deciding never holds
    // the channel's lock). Denied: closed before the app is dialled.
    let port = target.port();
    let mut policies = shared.policies.clone();
    let current = policies.borrow_and_update().clone();
    // A caller whose certificate a revocation of its identity covers is
    // refused like a failed handshake, whatever the policies say. The
    // verifier refused it already in a full handshake (with the alert
    // `certificate_revoked`) if the configs held the revocation, and
    // configs that hold a new one no longer open the tickets sealed before
    // it (`TlsState::with_revocations`). rustls calls no verifier for a
    // resumed session, and a revocation may have come since the configs
    // were taken (a ticket sealed by configs taken before it), so it is
    // checked here too (with nothing revoked, one comparison). rustls
    // sends no alert once the handshake is over: this one only closes the
    // connection.
    if let Err(e) = policy::check_revoked(current.as_deref(), &peer, not_before) {
        return shared.refuse_revoked(client, &peer, &e);
    }
    // A connection only L7 rules may allow is served as HTTP or not at all;
    // its requests are decided (and counted) one by one.
    let decision = policy::authorize(current.as_deref(), &peer, port);
    let admitted = !decision.is_allowed()
        && policy::admits_requests(current.as_deref(), &decision, &peer, port);
    // A denied caller that settled HTTP by ALPN (a Trellis sidecar calling)
    // is served as HTTP all the same, without the app: every request it
    // sends is refused by the request layer with 403 naming the deciding
    // policy, the answer an L7 refusal gets, instead of a closed connection
    // its app cannot tell from a network failure.
    let refused_http = !decision.is_allowed() && !admitted && settled_by_alpn(&stream).is_some();
    let http_only = admitted || refused_http;
    if admitted {
        tracing::info!(%peer, port, app = %target, "inbound connection allowed for HTTP requests only (L7 rules)");
    } else {
        // A denied connection counts now. An allowed one counts once it is
        // known not to be HTTP: an HTTP connection's requests are counted
        // one by one, as a refused HTTP connection's are.
        if !decision.is_allowed() && !refused_http {
            policy::count(current.as_deref(), &decision, metrics);
        }
        log_decision((&peer, client), target, &decision, current.is_some());
    }
    let count_bytes_stream = |not_http: &[RuleRef]| {
        policy::count(current.as_deref(), &decision, metrics);
        // A policy the decision names reported the connection already.
        let named = |audit: &RuleRef| decision.audits.iter().any(|a| a.policy == audit.policy);
        for audit in not_http.iter().filter(|audit| !named(audit)) {
            tracing::warn!(
                %peer,
                port,
                app = %target,
                decision = %"audit",
                policy = %audit.policy,
                rule = audit.rule,
                "inbound connection is not HTTP: would deny (AUDIT, not enforced)"
            );
            policy::count_audit(current.as_deref(), audit, metrics);
        }
    };
    let bytes_stream: Option<&BytesStream<'_>> = match http_only {
        true => None,
        false => Some(&count_bytes_stream),
    };
    if !decision.is_allowed() && !http_only {
        metrics.connection(INBOUND, Outcome::Denied);
        return;
    }

    // Forward, until either side is done, new policies deny the peer or
    // new revocations cover it (those close it even with `close_denied`
    // off: a revoked identity is no longer trusted at all).
    let per_request = policies.clone();
    let is_http = AtomicBool::new(false);
    let close_denied = shared.close_denied;
    let closed_later = closed_later(
        &mut policies,
        (&peer, not_before),
        port,
        &is_http,
        close_denied,
    );
    let result = tokio::select! {
        result = Box::pin(forward(&shared, stream, (&peer, client, target), per_request, bytes_stream, &is_http, &tracker)) => result,
        // Returning drops the copy, whose sockets are reset
        // (`net::ResetIfCut`): the peer and the app both see the connection
        // cut, not ended.
        closed = closed_later => match closed {
        Closed::Revoked(e) => {
            tracing::warn!(%peer, port, app = %target, reason = %trellis_core::grpc::REFUSAL_REVOKED, error = %e, "open inbound connection closed: the caller's identity is revoked");
            metrics.handshake_failure(INBOUND, HandshakeFailure::Revoked);
            metrics.connection(INBOUND, Outcome::ClosedByPolicy);
            return;
        }
        Closed::Denied(decision, now) => {
            policy::count(now.as_deref(), &decision, metrics);
            tracing::info!(
                %peer,
                port,
                app = %target,
                decision = %"deny",
                policy = %decision.policy_label(),
                rule = decision.rule(),
                version = now.as_ref().map(|p| p.version),
                "open inbound connection closed: new policies deny it"
            );
            metrics.connection(INBOUND, Outcome::ClosedByPolicy);
            return;
        }
        },
    };
    match result {
        Ok(Forwarded::Tcp {
            from_peer,
            to_peer,
            error,
        }) => {
            metrics.bytes(INBOUND, from_peer + to_peer);
            match error {
                None => {
                    metrics.connection(INBOUND, Outcome::Forwarded);
                    tracing::debug!(%peer, from_peer, to_peer, "inbound connection closed");
                }
                Some(e) => {
                    metrics.connection(INBOUND, Outcome::Error);
                    tracing::debug!(%peer, from_peer, to_peer, error = %e, "inbound connection ended with an error");
                }
            }
        }
        Ok(Forwarded::Http) if refused_http => metrics.connection(INBOUND, Outcome::Denied),
        Ok(Forwarded::Http) => {
            metrics.connection(INBOUND, Outcome::Forwarded);
            tracing::debug!(%peer, "inbound HTTP connection closed");
        }
        Err(ForwardError::NotHttp) => {
            let current = shared.policies.borrow().clone();
            policy::count(current.as_deref(), &decision, metrics);
            tracing::info!(
                %peer, port, app = %target, decision = %"deny",
                policy = %decision.policy_label(), rule = decision.rule(),
                "inbound connection denied: only L7 rules allow it and it is not HTTP"
            );
            metrics.connection(INBOUND, Outcome::Denied);
        }
        Err(ForwardError::DeniedNotHttp(decision)) => {
            let current = shared.policies.borrow().clone();
            policy::count(current.as_deref(), &decision, metrics);
            tracing::info!(
                %peer, port, app = %target, decision = %"deny",
                policy = %decision.policy_label(), rule = decision.rule(),
                "inbound connection denied: the rule has HTTP conditions on this port and the connection is not HTTP"
            );
            metrics.connection(INBOUND, Outcome::Denied);
        }
        Err(ForwardError::NoPreface) => {
            metrics.connection(INBOUND, Outcome::NoPreface);
            warn_throttled!(
                shared.handshakes.refusals,
                Outcome::NoPreface.token(),
                { %peer, %client },
                "inbound HTTP/2 connection closed: no client preface within {}",
                Words(http::detect::DETECT_TIMEOUT)
            );
        }
        // Counted and logged before its answer, in `forward`.
        Err(ForwardError::NotH2(_)) => {}
        Err(ForwardError::H2Refused(refused)) => {
            metrics.h2_connection_refused(refused);
            metrics.connection(INBOUND, Outcome::Refused);
            let throttled = match refused {
                H2Refused::PerPeer { .. } => "h2_per_peer",
                H2Refused::Total { .. } => "h2_total",
            };
            warn_throttled!(
                shared.handshakes.refusals,
                throttled,
                { %peer, %client, limit = %refused.reason() },
                "inbound HTTP/2 connection refused: {refused}"
            );
        }
        Err(ForwardError::AppUnreachable(e)) => {
            tracing::warn!(%peer, app = %target, error = %e, "inbound connection failed: app unreachable");
            metrics.connection(INBOUND, Outcome::AppUnreachable);
        }
        Err(e) => {
            metrics.connection(INBOUND, Outcome::Error);
            tracing::debug!(%peer, error = %e, "inbound connection ended with an error");
        }
    }
}

/// How an allowed connection was forwarded.
enum Forwarded {
    /// Bytes copied, and the error that ended the copy if one did.
    Tcp {
        from_peer: u64,
        to_peer: u64,
        error: Option<io::Error>,
    },
    /// Served request by request.
    Http,
}

#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("not HTTP, and only L7 rules allow the connection")]
    NotHttp,
    #[error("not HTTP, and a DENY rule has HTTP conditions on its port")]
    DeniedNotHttp(Decision),
    #[error("app unreachable: {0}")]
    AppUnreachable(io::Error),
    #[error("no HTTP/2 client preface in time")]
    NoPreface,
    #[error("HTTP/2 settled by ALPN, and {} came in place of its client preface", .0.as_str())]
    NotH2(NotPreface),
    #[error("HTTP/2 connection refused: {0}")]
    H2Refused(H2Refused),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] http::ServeError),
}

/// An authenticated connection from a peer. Boxed once after the
/// handshake: the futures that pass it along (detection, the HTTP server,
/// the byte copy) each keep the space of their arguments for as long as
/// they live, so holding the 1.2 KiB stream inline would cost every held
/// connection that much again for each of them.
type PeerStream = Box<TlsStream<net::ReadAhead<TcpStream>>>;

/// The HTTP protocol the handshake settled by ALPN, if it settled one.
fn settled_by_alpn(stream: &PeerStream) -> Option<http::Protocol> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .and_then(http::Protocol::from_alpn)
}

/// Called once a connection is known to pass as a byte stream, with the
/// AUDIT rules that would deny it for not being HTTP: counts its decision
/// and logs and counts those.
type BytesStream<'a> = dyn Fn(&[RuleRef]) + Sync + 'a;

/// Forwards an allowed connection to the app at `target`: ports declared
/// opaque (here or mesh-wide) and streams that are not HTTP as bytes
/// (unless `bytes_stream` is `None`: HTTP only), HTTP request by request.
/// The protocol ALPN settled is served without looking at the bytes;
/// without one, detection decides. Sets `is_http` once it knows, and calls
/// `bytes_stream` once a byte stream is known to pass, with the AUDIT
/// rules that would deny it for not being HTTP (its connection's decision
/// and those count then; an HTTP connection's requests count one by one).
async fn forward(
    shared: &Shared,
    stream: PeerStream,
    (peer, client, target): (&SpiffeId, SocketAddr, SocketAddr),
    policies: watch::Receiver<Option<Arc<Policies>>>,
    bytes_stream: Option<&BytesStream<'_>>,
    is_http: &AtomicBool,
    tracker: &Tracker,
) -> Result<Forwarded, ForwardError> {
    let http_only = bytes_stream.is_none();
    let settled = settled_by_alpn(&stream);
    // The app connection dialled while a silent caller waited, if one was.
    let mut app = None;
    let (protocol, stream) = match settled {
        Some(protocol) => (protocol, http::Rewind::new(stream)),
        // The handshake never settles HTTP on an opaque port.
        None if shared.is_opaque(target.port()) => {
            (http::Protocol::Opaque, http::Rewind::new(stream))
        }
        None => match http::detect(stream).await? {
            (http::Protocol::Opaque, stream) if stream.said_nothing() && !http_only => {
                after_silence(stream, target, &mut app).await?
            }
            detected => detected,
        },
    };
    tracing::debug!(
        %peer,
        protocol = protocol.as_str(),
        via = if settled.is_some() { "alpn" } else { "detection" },
        "inbound protocol"
    );
    if protocol == http::Protocol::Opaque {
        let Some(count_bytes_stream) = bytes_stream else {
            return Err(ForwardError::NotHttp);
        };
        // A DENY rule's HTTP conditions cannot be checked on bytes that are
        // not HTTP: such a rule denies the whole connection. A port
        // declared opaque carries no HTTP conditions: the mesh's are
        // refused them, and on the sidecar's own the L4 decision already
        // applied them failing closed.
        if !shared.is_opaque(target.port()) {
            let current = policies.borrow().clone();
            if let Some(decision) =
                policy::denies_unless_http(current.as_deref(), peer, target.port())
            {
                return Err(ForwardError::DeniedNotHttp(decision));
            }
            // The dry run of the same: an AUDIT rule with HTTP conditions
            // here would deny this connection once it is a DENY. Logged and
            // counted with the connection's decision.
            let audits = policy::audits_unless_http(current.as_deref(), peer, target.port());
            count_bytes_stream(&audits);
        } else {
            count_bytes_stream(&[]);
        }
        let (prefix, stream) = stream.into_parts();
        return copy_to_app(stream, prefix, target, app).await;
    }
    is_http.store(true, Ordering::Relaxed);
    // HTTP/2 is served once its preface is in, and while the peer and the
    // port have room for another connection.
    let (stream, _slot) = match protocol {
        http::Protocol::Http2 => {
            let Some(stream) = http::h2_preface(stream).await? else {
                return Err(ForwardError::NoPreface);
            };
            if let Some(sent) = instead_of_preface(&stream) {
                // Counted and logged before the answer, which lingers: a
                // caller that looks once answered finds it on record.
                shared.metrics.connection(INBOUND, Outcome::NoPreface);
                warn_throttled!(
                    shared.handshakes.refusals,
                    "not_h2",
                    { %peer, %client, sent = %sent.as_str() },
                    "inbound HTTP/2 connection refused: it settled HTTP/2 by ALPN, and its first \
                     bytes are not the HTTP/2 client preface"
                );
                Box::pin(refuse_not_h2(stream, sent)).await;
                return Err(ForwardError::NotH2(sent));
            }
            match shared.h2.admit(peer, client.ip()) {
                Ok(slot) => (stream, Some(slot)),
                Err(refused) => {
                    Box::pin(refuse_h2(stream, refused)).await;
                    return Err(ForwardError::H2Refused(refused));
                }
            }
        }
        _ => (stream, None),
    };
    let conn = http::Connection::new(shared.http.clone(), peer.clone(), target, policies);
    http::serve(conn, protocol, stream, tracker.draining()).await?;
    Ok(Forwarded::Http)
}

/// Refuses an HTTP/2 connection whose preface is in: the server preface
/// and a GOAWAY naming the limit (no stream processed, so the caller may
/// send its requests again, to another replica), its debug data beginning
/// as every answer the sidecar writes itself does
/// ([`trellis_core::refusal::SIDECAR_PREFIX`]), the TLS session closed,
/// then what the caller still sends read and dropped until it closes its
/// end, for at most [`http::h1::LINGER`]: closed with its requests unread,
/// the connection would be reset and the GOAWAY perhaps lost with it.
async fn refuse_h2(stream: http::Rewind<PeerStream>, refused: H2Refused) {
    let message = format!("{}{refused}", trellis_core::refusal::SIDECAR_PREFIX);
    goaway_and_close(stream, refused.goaway_code(), &message).await;
}

/// Writes a GOAWAY with `code` and `message` after the server preface,
/// closes the TLS session, then reads and drops what the caller still
/// sends, as [`refuse_h2`] tells it.
async fn goaway_and_close(stream: http::Rewind<PeerStream>, code: u32, message: &str) {
    let (_, mut io) = stream.into_parts();
    let frames = trellis_core::refusal::goaway(code, message);
    let refuse = async {
        io.write_all(&frames).await?;
        io.shutdown().await?;
        let mut discard = [0; 4096];
        while io.read(&mut discard).await? > 0 {}
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(http::h1::LINGER, refuse).await;
}

/// What a caller that settled HTTP/2 by ALPN sent in place of the HTTP/2
/// client preface.
#[derive(Clone, Copy, Debug)]
enum NotPreface {
    /// An HTTP/1 request: a client that offers `h2` and speaks HTTP/1.1
    /// (`openssl s_client -alpn h2` and a request typed in).
    Http1,
    /// Anything else.
    Other,
}

impl NotPreface {
    fn as_str(self) -> &'static str {
        match self {
            NotPreface::Http1 => "http1",
            NotPreface::Other => "other",
        }
    }
}

/// The HTTP/2 error code PROTOCOL_ERROR (RFC 9113, section 7): what a
/// connection that does not begin with the client preface is (section
/// 3.4).
const H2_PROTOCOL_ERROR: u32 = 0x1;

/// What a caller that settled HTTP/2 by ALPN and sent no preface is told.
const NOT_H2_ANSWER: &str = "this connection settled HTTP/2 by ALPN (h2), and its first bytes are \
     not the HTTP/2 client preface; a client that speaks HTTP/1.1 offers http/1.1";

/// What `stream`, whose HTTP/2 start [`http::h2_preface`] has read, holds
/// in place of the client preface; `None` when it holds the preface, or
/// as much of it as came before the caller closed its end (which hyper's
/// server ends quietly).
fn instead_of_preface(stream: &http::Rewind<PeerStream>) -> Option<NotPreface> {
    use trellis_core::refusal::H2_PREFACE;
    let prefix = stream.prefix();
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        return None;
    }
    Some(match http::detect::classify(prefix) {
        Some(http::Protocol::Http1) => NotPreface::Http1,
        _ => NotPreface::Other,
    })
}

/// Refuses a caller that settled HTTP/2 by ALPN and sent `sent` in place
/// of the client preface (hyper's server would close it without a word):
/// an HTTP/1 request is answered `400` in HTTP/1.1, saying so, as
/// plaintext is on this port (one that sends no whole head in time, or
/// ends first, is reset: [`trellis_core::refusal::Answered::Nothing`]); anything else
/// gets the server preface and a GOAWAY with PROTOCOL_ERROR saying the
/// same.
async fn refuse_not_h2(mut stream: http::Rewind<PeerStream>, sent: NotPreface) {
    use trellis_core::refusal::{self, Refusal};
    match sent {
        NotPreface::Http1 => {
            let refusal = Refusal {
                status: ::http::StatusCode::BAD_REQUEST,
                grpc_code: refusal::GRPC_INVALID_ARGUMENT,
                message: NOT_H2_ANSWER,
                proxy_error: Some(token::INVALID_REQUEST),
                request_may_have_gone: false,
            };
            let version = refusal::Version::Http1;
            let patience = net::HANDSHAKE_TIMEOUT;
            if refusal::answer(&mut stream, version, &refusal, patience).await
                == refusal::Answered::Nothing
            {
                // No whole request head in time: reset, as a plaintext
                // caller left unanswered is, not ended as if answered.
                net::reset_on_close(stream.get_ref().get_ref().0.get_ref());
            }
        }
        NotPreface::Other => {
            let message = format!("{}{NOT_H2_ANSWER}", refusal::SIDECAR_PREFIX);
            goaway_and_close(stream, H2_PROTOCOL_ERROR, &message).await;
        }
    }
}

/// Detection goes on for a caller that said nothing before its timeout.
/// A server-first protocol (SMTP, MySQL) waits for its app to speak, so
/// the app is dialled (into `app`), and whichever side speaks first
/// decides: the app, and the connection is bytes; the caller, and
/// detection starts again from what it sent. Copying bytes after the
/// timeout alone would let a caller wait it out and then send HTTP that the
/// app reads past the per-request rules, with an identity header of its
/// own. A caller that sends only empty lines is still silent.
async fn after_silence(
    mut stream: http::Rewind<PeerStream>,
    target: SocketAddr,
    app: &mut Option<TcpStream>,
) -> Result<(http::Protocol, http::Rewind<PeerStream>), ForwardError> {
    loop {
        let dialled = match app {
            Some(dialled) => dialled,
            None => app.insert(
                net::connect(target)
                    .await
                    .map_err(ForwardError::AppUnreachable)?,
            ),
        };
        let (mut prefix, mut io) = stream.into_parts();
        let mut first = [0; 1];
        let caller_spoke = tokio::select! {
            read = io.read_buf(&mut prefix) => read? > 0,
            // The app's first bytes, or its end, stay for the copy.
            _ = dialled.peek(&mut first) => false,
        };
        if !caller_spoke {
            return Ok((
                http::Protocol::Opaque,
                http::Rewind::with_prefix(prefix, io),
            ));
        }
        stream = match http::detect_after(prefix, io).await? {
            (http::Protocol::Opaque, stream) if stream.said_nothing() => stream,
            (protocol, stream) => {
                if protocol != http::Protocol::Opaque {
                    // HTTP goes to the app on connections of its own.
                    *app = None;
                }
                return Ok((protocol, stream));
            }
        };
    }
}

/// Writes `prefix` (what detection read) to the app, on `app` if it was
/// dialled already, then copies bytes between the TLS stream and the app
/// until both are done.
async fn copy_to_app(
    stream: PeerStream,
    prefix: BytesMut,
    target: SocketAddr,
    app: Option<TcpStream>,
) -> Result<Forwarded, ForwardError> {
    // A reset (or a failure) on one side is a reset on the other, never a
    // FIN that would pass for the end of the bytes, and so is a connection
    // this copy is dropped from (closed by policy): the caller's sidecar
    // resets its app in turn. An app that cannot be reached is no such
    // cut: the caller's connection is closed as before.
    let app = match app {
        Some(app) => app,
        None => net::connect(target)
            .await
            .map_err(ForwardError::AppUnreachable)?,
    };
    let mut stream = net::ResetIfCut::new(stream, peer_tcp);
    let mut app = net::ResetIfCut::tcp(app);
    app.write_all(&prefix).await?;
    // Not held for the life of the connection.
    let prefix_len = prefix.len() as u64;
    drop(prefix);
    let copied = net::copy(&mut *stream, &mut *app).await;
    if copied.error.is_none() {
        stream.ended();
        app.ended();
    } else if copied.wrote_after_cut == Some(net::Side::A) {
        // The app answered and reset (closed with the upload unread): its
        // answer, copied on, may still wait in the send queue toward a
        // caller whose window is full, which a reset would throw away. A
        // FIN after it, without `close_notify`, still reads as a cut at
        // the caller's sidecar. Boxed: only a cut connection holds the
        // lingering's state.
        Box::pin(stream.end_after_cut()).await;
    }
    // `app` is reset whenever the copy was cut, even after bytes the copy
    // wrote to it: nothing tells a plain TCP app a cut from an end but a
    // reset, and waiting for its send queue to empty first would take an
    // ioctl (`SIOCOUTQ`) that std, tokio and socket2 do not offer without
    // `unsafe`.
    Ok(Forwarded::Tcp {
        from_peer: copied.there + prefix_len,
        to_peer: copied.back,
        error: copied.error,
    })
}

/// The TCP socket of a caller's connection.
fn peer_tcp(stream: &PeerStream) -> &TcpStream {
    stream.get_ref().0.get_ref()
}

/// Logs one decision on a new connection: allowed or denied, naming the
/// deciding policy and rule (no `rule` for the mesh default) and the
/// caller's socket address (`client`, which the caller's sidecar logs as
/// its connection's `remote`), then one
/// "would deny" warning per AUDIT policy that matched, naming it and its
/// rule: only ever on an allowed decision (a denied one names none), so
/// it carries no verdict, as the request's "would deny" does not; the
/// line before it names what allowed the connection. Text values are
/// recorded with `Display`, so the text format shows `policy=ns/name`
/// unquoted and JSON gets plain strings.
fn log_decision(
    (peer, client): (&SpiffeId, SocketAddr),
    app: SocketAddr,
    decision: &Decision,
    have_policies: bool,
) {
    let port = app.port();
    let policy = decision.policy_label();
    let rule = decision.rule();
    if decision.is_allowed() {
        tracing::info!(%peer, port, %app, decision = %"allow", %policy, rule, %client, "inbound connection allowed");
    } else if have_policies {
        tracing::info!(%peer, port, %app, decision = %"deny", %policy, rule, %client, "inbound connection denied");
    } else {
        tracing::info!(
            %peer, port, %app, decision = %"deny", %policy, rule, %client,
            "inbound connection denied: no policy snapshot yet"
        );
    }
    for audit in &decision.audits {
        tracing::warn!(
            %peer,
            port,
            %app,
            decision = %"audit",
            policy = %audit.policy,
            rule = audit.rule,
            "inbound connection: would deny (AUDIT, not enforced)"
        );
    }
}

/// Why an open connection is closed when new policies arrive.
enum Closed {
    /// They deny the peer: the decision and the policies that made it.
    Denied(Decision, Option<Arc<Policies>>),
    /// Their revocations cover the peer's certificate.
    Revoked(trellis_core::revocation::Revoked),
}

/// Waits until the policies in force deny `peer` on `port`, or their
/// revocations cover its certificate (whose notBefore is given with it).
/// Pends forever if the policies can no longer change. A connection
/// serving HTTP (`is_http`) stays open while L7 rules may still allow its
/// requests; with `close_denied` off, only a revocation closes it.
async fn closed_later(
    policies: &mut watch::Receiver<Option<Arc<Policies>>>,
    (peer, not_before): (&SpiffeId, i64),
    port: u16,
    is_http: &AtomicBool,
    close_denied: bool,
) -> Closed {
    policy::closes_when(policies, |now| {
        if let Err(e) = policy::check_revoked(now.as_deref(), peer, not_before) {
            return Some(Closed::Revoked(e));
        }
        if !close_denied {
            return None;
        }
        let decision = policy::authorize(now.as_deref(), peer, port);
        let admitted = is_http.load(Ordering::Relaxed)
            && policy::admits_requests(now.as_deref(), &decision, peer, port);
        (!decision.is_allowed() && !admitted).then(|| Closed::Denied(decision, now))
    })
    .await
}

/// Whether a ClientHello offers X25519 alone, as a sidecar's resuming
/// config does (`tls::PeerClient::resume`); its full handshakes offer the
/// hybrid first.
fn offers_x25519_alone(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello.named_groups() == Some(&[rustls::NamedGroup::X25519][..])
}

/// Whether the caller ended the handshake with the alert a sidecar sends
/// when a session it meant to resume would begin instead.
fn ended_by_the_caller(e: &io::Error) -> bool {
    matches!(
        trellis_core::tls::rustls_error(e),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::HandshakeFailure
        ))
    )
}
