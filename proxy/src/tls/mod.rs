//! The data path's rustls configs, built from the current SVID and trust
//! bundle and handed out through a `watch` channel.
//!
//! Each rebuild produces a new immutable [`TlsState`]; a connection takes an
//! `Arc` of the state current when it starts, so a rotation never touches an
//! established connection and never takes a lock on the data path. This
//! module never talks to the CA and never sees key bytes (only rustls'
//! `CertifiedKey`).
//!
//! The inbound side has two server configs that differ only in ALPN: one
//! that settles `h2` or `http/1.1` when the client offers it, for ports
//! that may carry HTTP, and one that settles nothing, for opaque ports and
//! clients that offer no HTTP protocol (so a foreign offer is ignored, not
//! refused). Their verifier of callers holds the revocations of the
//! snapshot in force, so a revoked caller's full handshake ends with the
//! alert `certificate_revoked`; a revocation change builds them again,
//! with a new session-ticket key when it covers a certificate the
//! revocations before did not, so a caller revoked since it got its
//! tickets cannot resume past the verifier.
//! The client configs offer nothing by themselves; the outbound
//! dial adds the ALPN of the protocol it detected, and the configs of a
//! peer keep its session tickets ([`tickets`]) so reconnecting resumes.
//!
//! Each expected peer has two client configs ([`PeerClient`]). A full
//! handshake always offers the hybrid X25519MLKEM768 key exchange first,
//! which keeps recorded traffic secret from a future quantum computer. A
//! resumed session's keys come from its ticket's secret, which a chain of
//! sessions begun by such a hybrid handshake carries, and from a fresh
//! exchange, so resuming offers X25519 alone: the 1,184-byte ML-KEM key
//! and its 1,088-byte answer and their computation are about a tenth of a
//! resumed handshake's work on each side. A handshake of the resuming
//! config runs inside [`resuming`], where the certificate verifier (which
//! rustls calls only for a full handshake) refuses, so a session never
//! begins without the hybrid: when the peer no longer accepts the ticket
//! (it restarted, or its trust bundle changed), that attempt ends before any
//! session, ticket or byte of the app exists, and the dial forgets the
//! peer's tickets and starts again with the hybrid.

pub mod failure;
pub mod ticketer;
pub mod tickets;

pub use failure::{HandshakeFailure, INBOUND_REASONS, OUTBOUND_REASONS};

#[cfg(test)]
mod expired_roots;
#[cfg(test)]
mod expiry;
#[cfg(test)]
mod revoked_callers;
#[cfg(test)]
mod svid_shape;
#[cfg(test)]
mod testing;

use std::collections::HashMap;
use std::sync::Arc;

use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::sync::watch;
use trellis_core::revocation::Revocations;
use trellis_core::tls::{ExpectedServer, SpiffeClientVerifier, SpiffeServerVerifier, provider};
use trellis_core::{SpiffeId, TrustDomain};

use crate::http::detect::{ALPN_H2, ALPN_HTTP1};
use crate::identity::{Svid, TrustBundle};
use crate::policy::Snapshot;
use tickets::PeerTickets;

/// Presents one certificate, as a server and as a client.
#[derive(Debug)]
pub struct SvidResolver(pub Arc<CertifiedKey>);

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Presents no certificate: a server config with it ends every handshake
/// with an `access_denied` alert once it has read the ClientHello (rustls'
/// answer when no certificate is resolved).
#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// The inbound config of a sidecar that has no certificate yet: it
/// answers a caller's handshake with an `access_denied` alert rather than
/// a reset, so the caller's sidecar can tell it is not ready from one that
/// crashed (rustls sends no other alert before a server certificate).
pub fn not_ready_server() -> Arc<ServerConfig> {
    static CONFIG: std::sync::OnceLock<Arc<ServerConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let config = ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)
                .expect("the provider supports TLS 1.3")
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(NoCertificate));
            Arc::new(config)
        })
        .clone()
}

/// The TLS configs in force. Empty (every handshake refused) until the
/// sidecar holds a certificate and a trust bundle.
#[derive(Default)]
pub struct TlsState {
    /// The verifier of callers both server configs use, kept to verify a
    /// resumed caller's chain again once a root has expired.
    callers: Option<Arc<SpiffeClientVerifier>>,
    server: Option<Arc<ServerConfig>>,
    /// `server` advertising the HTTP protocols the inbound serves.
    http_server: Option<Arc<ServerConfig>>,
    client: Option<ClientParts>,
    /// Prebuilt client configs for every SPIFFE ID this sidecar expects to
    /// dial (routes and mesh endpoints), so dialling allocates no config.
    clients: HashMap<SpiffeId, Arc<PeerClient>>,
    /// The mesh's revoked identities, from the snapshot in force.
    revocations: Arc<Revocations>,
    /// The revocations of the configs that last sealed tickets with the
    /// server configs' session-ticket key: no ticket of the key is of a
    /// caller they cover. Passed on with the key (`keeping_tickets`).
    sealed_under: Arc<Revocations>,
    /// The session-ticket key was made by [`TlsState::build`] and has
    /// sealed no ticket yet: the first revocations this state is given
    /// are taken as those it seals under, without a new key. False once
    /// the state is given revocations or another state's key, and in a
    /// state made from it (`with_expected`): those may be in force.
    fresh: bool,
    /// When the certificate this sidecar last held expired (Unix
    /// seconds), when that is why this state has none: a refusal then
    /// says so rather than `no certificate yet`.
    expired_at: Option<u64>,
}

#[derive(Clone)]
struct ClientParts {
    roots: trellis_core::tls::Roots,
    resolver: Arc<SvidResolver>,
}

impl TlsState {
    /// Builds the configs for `svid` verified against `bundle`, prebuilding
    /// client configs for each of `expected`.
    pub fn build<'a>(
        svid: Option<&Svid>,
        bundle: &[CertificateDer<'static>],
        trust_domain: &TrustDomain,
        expected: impl IntoIterator<Item = &'a SpiffeId>,
    ) -> Result<Self, rustls::Error> {
        let Some(svid) = svid else {
            return Ok(Self::default());
        };
        if bundle.is_empty() {
            return Ok(Self::default());
        }
        let roots = trellis_core::tls::root_store(bundle)?;
        let resolver = Arc::new(SvidResolver(svid.certified.clone()));
        let verifier = Arc::new(SpiffeClientVerifier::new(
            roots.clone(),
            trust_domain.clone(),
            true,
        )?);
        let callers = Callers {
            verifier: verifier.clone(),
            revocations: Arc::default(),
        };
        // Stateless session tickets: the session, the caller's verified
        // chain with it, sealed with a key of this config ([`ticketer`]),
        // so resumption holds for any number of callers (a server-side
        // cache keeps only the latest sessions). The key is passed on to
        // the next config when only the SVID changes (`keeping_tickets`),
        // or the revocations, given for the first time or covering nothing
        // more (`with_revocations`), and dies with a new bundle.
        let (server, http_server) =
            server_configs(callers, resolver.clone(), ticketer::ticketer()?)?;
        let parts = ClientParts { roots, resolver };
        let mut clients = HashMap::new();
        for id in expected {
            if !clients.contains_key(id) {
                clients.insert(id.clone(), parts.client_config(id)?);
            }
        }
        Ok(TlsState {
            callers: Some(verifier),
            server: Some(server),
            http_server: Some(http_server),
            client: Some(parts),
            clients,
            revocations: Arc::default(),
            sealed_under: Arc::default(),
            fresh: true,
            expired_at: None,
        })
    }

    /// The same certificate and bundle with prebuilt client configs for
    /// `expected`, reusing the configs this state already holds.
    pub fn with_expected<'a>(
        &self,
        expected: impl IntoIterator<Item = &'a SpiffeId>,
    ) -> Result<Self, rustls::Error> {
        let mut clients = HashMap::new();
        if let Some(parts) = &self.client {
            for id in expected {
                if clients.contains_key(id) {
                    continue;
                }
                let config = match self.clients.get(id) {
                    Some(config) => config.clone(),
                    None => parts.client_config(id)?,
                };
                clients.insert(id.clone(), config);
            }
        }
        Ok(TlsState {
            callers: self.callers.clone(),
            server: self.server.clone(),
            http_server: self.http_server.clone(),
            client: self.client.clone(),
            clients,
            revocations: self.revocations.clone(),
            sealed_under: self.sealed_under.clone(),
            // This state may be in force, its key sealing tickets.
            fresh: false,
            expired_at: self.expired_at,
        })
    }

    /// This state refusing the peers `revocations` cover. Its server
    /// configs are built again when they differ from the revocations the
    /// configs refuse: their verifier holds them, so a caller's full
    /// handshake reads them without a lock.
    ///
    /// rustls calls no verifier when a caller resumes a session, so when
    /// `revocations` cover a certificate the ones before did not (a new
    /// revocation, or one moved later), the new configs seal and open
    /// tickets with a new key: every ticket sealed before is refused, and
    /// each caller makes one full handshake, in which a revoked one is
    /// refused with the alert `certificate_revoked`. Revocations are
    /// rare; that full handshake per caller is what one costs. A change
    /// that covers nothing more (a revocation removed) keeps the key,
    /// and so does a state just built ([`build`](Self::build)), whose key
    /// has sealed no ticket yet. The configs keep no server-side session
    /// cache to clear.
    pub fn with_revocations(
        mut self,
        revocations: Arc<Revocations>,
    ) -> Result<Self, rustls::Error> {
        let same = Arc::ptr_eq(&revocations, &self.revocations) || revocations == self.revocations;
        if let (false, Some(verifier), Some(parts), Some(server)) =
            (same, &self.callers, &self.client, &self.server)
        {
            let callers = Callers {
                verifier: verifier.clone(),
                revocations: revocations.clone(),
            };
            let ticketer = if !self.fresh && covers_more(&self.sealed_under, &revocations) {
                ticketer::ticketer()?
            } else {
                server.ticketer.clone()
            };
            let (server, http_server) = server_configs(callers, parts.resolver.clone(), ticketer)?;
            self.server = Some(server);
            self.http_server = Some(http_server);
        }
        self.sealed_under = revocations.clone();
        self.revocations = revocations;
        self.fresh = false;
        Ok(self)
    }

    /// The mesh's revoked identities, as the snapshot in force says. A
    /// caller whose certificate one of them covers is refused by the
    /// server configs' verifier, in a full handshake, with the alert
    /// `certificate_revoked`; a caller's ticket sealed before the
    /// revocation no longer opens ([`with_revocations`](Self::with_revocations)),
    /// and the inbound listener checks a resumed session's caller once the
    /// handshake is over all the same (rustls calls no verifier on
    /// resumption), for a session that began with configs taken before
    /// the revocation. An outbound dial refuses a peer whose
    /// certificate one covers, checked once a full handshake is over; a
    /// resumed session whose certificate one covers is abandoned and the
    /// peer dialled again with a full handshake.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// This state with the session-ticket key of `previous`, so tickets
    /// it sealed still resume: for a new SVID under the same trust
    /// bundle. The callers' identities were verified against that bundle,
    /// and this sidecar's own identity does not change with its
    /// certificate; a new bundle or a restart gets a new key. The
    /// revocations `previous` sealed its tickets under go with the key,
    /// so [`with_revocations`](Self::with_revocations) replaces it only if
    /// the revocations then cover more.
    pub fn keeping_tickets(mut self, previous: &TlsState) -> Self {
        if let Some(config) = &previous.server {
            for mine in [&mut self.server, &mut self.http_server]
                .into_iter()
                .flatten()
            {
                Arc::make_mut(mine).ticketer = config.ticketer.clone();
            }
            self.sealed_under = previous.sealed_under.clone();
            self.fresh = false;
        }
        self
    }

    /// A caller's session that was resumed, verified again if a root of
    /// the bundle or an intermediate of its chain has expired: rustls
    /// restores the chain from the ticket and calls no verifier, so a chain
    /// whose root or intermediate expired after the session began would
    /// otherwise resume its way in until its leaf expires. A full handshake's chain was verified
    /// by the handshake itself.
    pub fn verify_resumed_caller(
        &self,
        conn: &rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        if conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed) {
            return Ok(());
        }
        match (&self.callers, conn.peer_certificates()) {
            (Some(callers), Some(chain)) => callers.verify_resumed(chain, UnixTime::now()),
            // No certificate: the caller's SPIFFE ID check refuses it.
            _ => Ok(()),
        }
    }

    /// The inbound config: client SVID mandatory, TLS 1.3 only, no ALPN.
    pub fn server(&self) -> Option<&Arc<ServerConfig>> {
        self.server.as_ref()
    }

    /// The inbound config for a client that offers HTTP on a port that may
    /// carry it: [`server`](Self::server) settling `h2` or `http/1.1`.
    pub fn http_server(&self) -> Option<&Arc<ServerConfig>> {
        self.http_server.as_ref()
    }

    /// When the certificate this sidecar last held expired unrenewed
    /// (Unix seconds), if that is why it has none now.
    pub fn expired_at(&self) -> Option<u64> {
        self.expired_at
    }

    /// This state, with no certificate because the one last held expired
    /// at `expired_at` (Unix seconds).
    pub fn after_expiry(mut self, expired_at: Option<u64>) -> Self {
        self.expired_at = expired_at;
        self
    }

    /// The client configs presenting our SVID that accept only a server
    /// presenting `expected`. `None` without a certificate.
    pub fn client_for(&self, expected: &SpiffeId) -> Option<Arc<PeerClient>> {
        if let Some(config) = self.clients.get(expected) {
            return Some(config.clone());
        }
        let parts = self.client.as_ref()?;
        match parts.client_config(expected) {
            Ok(config) => Some(config),
            Err(e) => {
                tracing::error!(error = %e, "building a client TLS config");
                None
            }
        }
    }
}

/// The two inbound configs, verifying callers with `callers` and
/// presenting the certificate of `resolver`, sealing session tickets with
/// `ticketer`: the second settles `h2` or `http/1.1` by ALPN.
fn server_configs(
    callers: Callers,
    resolver: Arc<SvidResolver>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), rustls::Error> {
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(Arc::new(callers))
        .with_cert_resolver(resolver);
    server.ticketer = ticketer;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let mut http_server = server.clone();
    // Preference order: h2 first when a client offers both.
    http_server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    Ok((Arc::new(server), Arc::new(http_server)))
}

/// Whether `new` covers a certificate `old` does not: it revokes an
/// identity `old` does not, or revokes one at a later time.
fn covers_more(old: &Revocations, new: &Revocations) -> bool {
    new.iter()
        .any(|(id, at)| old.revoked_at(id).is_none_or(|before| before < at))
}

/// The verifier of callers of both inbound configs: a caller's SVID
/// checked as [`SpiffeClientVerifier`] does, and refused with the alert
/// `certificate_revoked` when a revocation of the snapshot the configs
/// were built for covers it, so the caller's sidecar is told why. The
/// revocations are the `Arc` the policies in force hold, read with no
/// lock. rustls asks it only in a full handshake: configs whose
/// revocations cover more seal with a new ticket key, so a caller's
/// earlier tickets no longer resume, and the inbound listener checks a
/// resumed session's caller again once its handshake is over.
#[derive(Debug)]
struct Callers {
    verifier: Arc<SpiffeClientVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for Callers {
    fn offer_client_auth(&self) -> bool {
        self.verifier.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.verifier.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.verifier.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier.verify_unrevoked_client_cert(
            end_entity,
            intermediates,
            now,
            &self.revocations,
        )
    }

    trellis_core::delegate_signature_checks!(verifier);
}

/// The client configs of one expected peer identity, sharing its tickets.
pub struct PeerClient {
    /// For a full handshake: X25519MLKEM768 offered first.
    pub full: Arc<ClientConfig>,
    /// For resuming a session: X25519 alone. Dial it inside [`resuming`],
    /// which refuses every full handshake with [`NotResumed`].
    pub resume: Arc<ClientConfig>,
    pub tickets: Arc<PeerTickets>,
    verifier: Arc<Verifier>,
}

impl PeerClient {
    /// As [`TlsState::verify_resumed_caller`], for the peer's chain when
    /// this sidecar resumed a session with it.
    pub fn verify_resumed(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        self.verifier.0.verify_resumed(chain, UnixTime::now())
    }
}

/// Why the resuming config ended a handshake: the peer did not accept the
/// ticket, and a session that begins needs the hybrid key exchange.
#[derive(Debug, thiserror::Error)]
#[error("the peer did not resume the session; a full handshake needs the hybrid key exchange")]
pub struct NotResumed;

impl NotResumed {
    fn error() -> rustls::Error {
        rustls::Error::Other(rustls::OtherError(Arc::new(NotResumed)))
    }

    /// Whether a failed handshake was ended by the resuming config.
    pub fn caused(e: &std::io::Error) -> bool {
        matches!(
            trellis_core::tls::rustls_error(e),
            Some(rustls::Error::Other(other)) if other.0.is::<NotResumed>()
        )
    }
}

tokio::task_local! {
    /// Set while a handshake of [`PeerClient::resume`] runs ([`resuming`]).
    static RESUMING: ();
}

/// Runs the handshake `f` of [`PeerClient::resume`]: a full handshake
/// inside it is refused with [`NotResumed`].
pub async fn resuming<F: std::future::Future>(f: F) -> F::Output {
    RESUMING.scope((), f).await
}

/// The server verifier of both configs of a peer (rustls resumes a session
/// only with the verifier that began it): the peer's SPIFFE ID checked,
/// and every full handshake refused inside [`resuming`]. rustls asks it
/// only when the peer did not resume.
#[derive(Debug)]
struct Verifier(SpiffeServerVerifier);

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if RESUMING.try_with(|_| ()).is_ok() {
            return Err(NotResumed::error());
        }
        self.0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    trellis_core::delegate_signature_checks!(0);
}

impl ClientParts {
    fn client_config(&self, expected: &SpiffeId) -> Result<Arc<PeerClient>, rustls::Error> {
        let verifier = Arc::new(Verifier(SpiffeServerVerifier::new(
            self.roots.clone(),
            ExpectedServer::Exact(expected.clone()),
        )));
        let tickets = Arc::new(PeerTickets::default());
        let mut full = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(self.resolver.clone());
        full.resumption = Resumption::store(Arc::new(tickets.collecting_store()));
        let mut resuming = (*provider()).clone();
        resuming.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
        let mut resume = ClientConfig::builder_with_provider(Arc::new(resuming))
            .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(self.resolver.clone());
        resume.resumption = Resumption::store(Arc::new(tickets.store()));
        Ok(Arc::new(PeerClient {
            full: Arc::new(full),
            resume: Arc::new(resume),
            tickets,
            verifier,
        }))
    }
}

/// Rebuilds the [`TlsState`] whenever the SVID, the bundle, the mesh
/// endpoints or the revocations change, until every input's sender is gone.
///
/// A certificate past its notAfter is no certificate: every peer would
/// refuse it, each naming its own reason. From the second it expires
/// unrenewed (the control plane unreachable for longer than its second
/// half of life), the state has no certificate, so new connections are
/// refused here as `no_local_certificate` (a caller's sidecar is answered
/// `access_denied`, reading this one as not ready), logged once as an
/// error naming when it expired; the next certificate Certify brings
/// serves again, with no restart.
pub async fn run(
    trust_domain: TrustDomain,
    routes: Vec<SpiffeId>,
    mut svid: watch::Receiver<Option<Arc<Svid>>>,
    mut bundle: watch::Receiver<TrustBundle>,
    mut snapshot: watch::Receiver<Option<Arc<Snapshot>>>,
    tx: watch::Sender<Arc<TlsState>>,
) {
    // The inputs of the state in force: when only the endpoints change, the
    // server config and the known client configs are kept.
    let mut built: Option<(Option<Arc<Svid>>, TrustBundle, Arc<TlsState>)> = None;
    let mut expired_logged = None;
    loop {
        let latest = svid.borrow_and_update().clone();
        let current_svid = in_force(latest.clone(), &mut expired_logged);
        // Why there is no certificate, for the refusals to say.
        let expired_at = match (&latest, &current_svid) {
            (Some(expired), None) => Some(expired.expires_at_unix()),
            _ => None,
        };
        // When the certificate in force expires, the state is built again
        // without it.
        let expires = current_svid.as_ref().map(|s| s.not_after);
        let current_bundle = bundle.borrow_and_update().clone();
        let current_snapshot = snapshot.borrow_and_update().clone();
        let endpoint_ids = current_snapshot.iter().flat_map(|s| s.endpoints.values());
        let expected = routes.iter().chain(endpoint_ids);
        // The state in force, if the bundle is still the one it was built on.
        let same_bundle = built
            .as_ref()
            .filter(|(_, bundle, _)| Arc::ptr_eq(bundle, &current_bundle));
        let result = match same_bundle {
            Some((svid, _, state)) if same(svid, &current_svid) => state.with_expected(expected),
            _ => TlsState::build(
                current_svid.as_deref(),
                &current_bundle,
                &trust_domain,
                expected,
            )
            // A new certificate under the same bundle: the callers' tickets
            // still resume.
            .map(|new| match same_bundle {
                Some((_, _, state)) => new.keeping_tickets(state),
                None => new,
            }),
        };
        let revocations = current_snapshot
            .as_ref()
            .map(|s| s.policies.revocations.clone())
            .unwrap_or_default();
        let result = result.and_then(|state| state.with_revocations(revocations));
        match result.map(|state| state.after_expiry(expired_at)) {
            Ok(state) => {
                let state = Arc::new(state);
                tx.send_replace(state.clone());
                built = Some((current_svid, current_bundle, state));
            }
            // Keep the configs in force: a bad bundle must not take the
            // sidecar down.
            Err(e) => {
                tracing::error!(error = %e, "rebuilding TLS configs; keeping the current ones")
            }
        }
        let expiry = async {
            match expires {
                Some(at) => trellis_core::clock::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = svid.changed() => if r.is_err() { return },
            r = bundle.changed() => if r.is_err() { return },
            r = snapshot.changed() => if r.is_err() { return },
            () = expiry => {}
        }
    }
}

/// `svid` unless it has expired, which is said once as an error (an
/// expired certificate is read again at each rebuild until a new one
/// comes, and logged only by the first of them to see it expired):
/// `logged` holds the serial of the last one said.
fn in_force(svid: Option<Arc<Svid>>, logged: &mut Option<String>) -> Option<Arc<Svid>> {
    let Some(expired) = svid
        .as_ref()
        .filter(|s| std::time::SystemTime::now() >= s.not_after)
    else {
        return svid;
    };
    if logged.as_deref() != Some(expired.serial.as_str()) {
        tracing::error!(
            serial = %expired.serial,
            expired = %crate::identity::rfc3339(expired.expires_at_unix() as i64),
            "this sidecar's certificate expired without being renewed: new connections, inbound \
             and outbound, are refused (no_local_certificate) until the control plane issues \
             another; why the renewals failed is in the `certify failed` lines before this one"
        );
        *logged = Some(expired.serial.clone());
    }
    None
}

fn same(a: &Option<Arc<Svid>>, b: &Option<Arc<Svid>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}
