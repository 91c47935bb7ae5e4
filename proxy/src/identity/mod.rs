//! The sidecar's identity: a P-256 key made in memory, a CSR for
//! `--identity`, `Identity.Certify`, and renewal at half-life (with the
//! token again when the control plane refuses the current certificate, or
//! its identity was revoked).
//! A ServiceAccount token proves every Certify, renewals too, beside the
//! current certificate (a renewal whose token file cannot be read is made
//! with the certificate alone, which a control plane with
//! `--renewal-proof certificate` takes); a join token (single-use) only a
//! Certify made without a valid certificate.
//!
//! This module owns the current [`Svid`] and publishes it on a
//! `watch` channel; the trust bundle Certify returns goes on the bundle
//! channel. It must never write the private key anywhere or log it (the key
//! only exists inside a rustls `CertifiedKey`), and never builds the data
//! path's TLS configs (that is `tls`).

pub mod outage;
pub mod schedule;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use trellis_core::SpiffeId;
use trellis_core::duration::Words;
use trellis_core::tls::{ExpectedServer, SpiffeServerVerifier};
use trellis_proto::identity::v1::{
    CertifyRequest, RefusedInboundAddress, certify_request::Proof, identity_client::IdentityClient,
};

use crate::config::{Credential, read_token};
use crate::metrics::Metrics;
use crate::tls::SvidResolver;

/// The DER roots of the trust domain, shared by every reader.
pub type TrustBundle = Arc<Vec<CertificateDer<'static>>>;

/// Puts `roots` in force on `tx` and logs the change with each root's
/// subject and expiry (public parts only), so an operator rotating the
/// root sees when a sidecar took the new bundle. `from` says what brought
/// it (`certify` or `snapshot`).
pub fn publish_bundle(
    tx: &watch::Sender<TrustBundle>,
    roots: Vec<CertificateDer<'static>>,
    from: &'static str,
) {
    tracing::info!(
        from,
        roots = roots.len(),
        bundle = %describe_roots(&roots),
        "trust bundle updated"
    );
    tx.send_replace(Arc::new(roots));
}

/// `subject (until YYYY-MM-DD); ...` for each root, for logs.
fn describe_roots(roots: &[CertificateDer<'static>]) -> String {
    roots
        .iter()
        .map(
            |der| match x509_parser::parse_x509_certificate(der.as_ref()) {
                Ok((_, cert)) => {
                    let until = cert.validity().not_after.to_datetime().date();
                    format!("{} (until {until})", cert.subject())
                }
                Err(_) => "unparsable certificate".to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("; ")
}

/// A certificate this sidecar holds with its key.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, with the signing key. The key never leaves this value.
    pub certified: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number of the leaf.
    pub serial: String,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a certificate and key do not make a usable SVID.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSvid {
    #[error("the chain is empty")]
    EmptyChain,
    #[error("the leaf does not parse: {0}")]
    Leaf(String),
    #[error("the leaf carries {found}, expected {expected}")]
    WrongId { found: SpiffeId, expected: SpiffeId },
    #[error(transparent)]
    Svid(#[from] trellis_core::tls::SvidError),
    /// The leaf is not shaped as an X.509-SVID leaf, in the words with
    /// which every peer would refuse it.
    #[error("every peer would refuse the leaf: {0}")]
    Shape(trellis_core::tls::SvidError),
    #[error("the key is unusable: {0}")]
    Key(rustls::Error),
    #[error(
        "the leaf's public key is not that of this sidecar's private key (the certificate was \
         not issued for the CSR this sidecar sent)"
    )]
    KeyMismatch,
}

impl InvalidSvid {
    /// Why, as the `reason` of a failed renewal's count.
    fn reason(&self) -> RenewalFailure {
        match self {
            InvalidSvid::KeyMismatch => RenewalFailure::KeyMismatch,
            InvalidSvid::Svid(trellis_core::tls::SvidError::OutsideValidity { .. }) => {
                RenewalFailure::OutsideValidity
            }
            InvalidSvid::Shape(_) => RenewalFailure::PeersWouldRefuse,
            InvalidSvid::EmptyChain
            | InvalidSvid::Leaf(_)
            | InvalidSvid::WrongId { .. }
            | InvalidSvid::Svid(_)
            | InvalidSvid::Key(_) => RenewalFailure::InvalidCertificate,
        }
    }
}

impl Svid {
    /// Checks that `chain` is an SVID for `expected`, shaped as peers check
    /// a leaf ([`trellis_core::tls::leaf_spiffe_id`]), valid now, whose leaf
    /// holds the public half of `key`, and pairs it with `key`.
    pub fn new(
        expected: &SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, InvalidSvid> {
        let leaf = chain.first().ok_or(InvalidSvid::EmptyChain)?;
        let id = trellis_core::tls::spiffe_id_of(leaf)?;
        if &id != expected {
            return Err(InvalidSvid::WrongId {
                found: id,
                expected: expected.clone(),
            });
        }
        // A leaf peers refuse (without basicConstraints, or with a CA's
        // keyUsage, as a faulty or foreign CA may issue it) would be
        // presented in every handshake and refused by every peer, while
        // this sidecar reads as ready.
        trellis_core::tls::leaf_spiffe_id(leaf).map_err(InvalidSvid::Shape)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| InvalidSvid::Leaf(e.to_string()))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
        };
        let not_before = to_time(parsed.validity().not_before);
        let not_after = to_time(parsed.validity().not_after);
        let serial = parsed
            .tbs_certificate
            .raw_serial_as_string()
            .replace(':', "");
        trellis_core::tls::within_validity(
            parsed.validity().not_before.timestamp(),
            parsed.validity().not_after.timestamp(),
        )?;
        let signing = trellis_core::tls::provider()
            .key_provider
            .load_private_key(key)
            .map_err(InvalidSvid::Key)?;
        let certified = CertifiedKey::new(chain, signing);
        // A leaf for another key would be presented in every handshake and
        // fail each one at its signature, while this sidecar reads as ready.
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            certified.keys_match()
        {
            return Err(InvalidSvid::KeyMismatch);
        }
        Ok(Svid {
            id,
            certified: Arc::new(certified),
            not_before,
            not_after,
            serial,
        })
    }

    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    pub fn expires_at_unix(&self) -> u64 {
        unix(self.not_after)
    }

    pub fn not_before_unix(&self) -> u64 {
        unix(self.not_before)
    }
}

/// `unix` (seconds) in RFC 3339, as `2026-01-02T03:04:05Z`; `-` for a time
/// before 1970 or too far ahead to write.
pub fn rfc3339(unix: i64) -> String {
    trellis_core::clock::rfc3339_checked(unix).unwrap_or_else(|| "-".into())
}

/// `at` in Unix seconds; 0 before 1970.
fn unix(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh P-256 key and a DER CSR whose only SAN is the URI `id`.
pub fn key_and_csr(id: &SpiffeId) -> Result<(PrivateKeyDer<'static>, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((der, csr.der().to_vec()))
}

/// How long one Certify call may take, connecting included.
pub const CERTIFY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a Certify call failed.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("no valid certificate to renew with and no --token-file")]
    NoProof,
    #[error("making the key and CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("no trust bundle to verify the control plane with (set --trust-bundle)")]
    NoBundle,
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error(
        "connecting to the control plane at {addr}: {}",
        trellis_core::grpc::why_unreachable(source, "a CA of --trust-bundle")
    )]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error(
        "Certify refused: {}",
        trellis_core::grpc::refusal_words(*code, message)
    )]
    Refused {
        code: tonic::Code,
        message: String,
        /// Why, as the control plane names it in the refusal's metadata
        /// ([`trellis_core::grpc::REFUSAL_KEY`]): `revoked`, `token_used`,
        /// ...; empty from a control plane that names none.
        reason: String,
    },
    #[error(
        "Certify refused: the join token was already used: write a new one to --token-file \
         (`trellisctl token create`); it is read again at every retry"
    )]
    JoinTokenUsed,
    #[error("{source} (after the control plane refused to renew certificate {serial}: {refusal})")]
    AfterRevocation {
        /// The serial of the certificate that no longer renews.
        serial: String,
        /// The control plane's message for that refusal.
        refusal: String,
        source: Box<CertifyError>,
    },
    #[error("Certify got no answer within {}", Words(CERTIFY_TIMEOUT))]
    Timeout,
    #[error("Certify answered an unusable certificate: {0}")]
    Response(#[from] InvalidSvid),
    #[error("{0}")]
    TokenFile(#[from] crate::config::InvalidFlag),
    #[error(
        "Certify refused: the control plane renews only with the ServiceAccount token \
         (--renewal-proof token), and --token-file could not be read: {}",
        unread.reason
    )]
    RenewalTokenUnread {
        /// Why the token file could not be read (its path and the error).
        unread: crate::config::InvalidFlag,
    },
}

trellis_core::tokens! {
    /// Why a Certify call failed: the `reason` label of
    /// `trellis_certificate_renewals_total{outcome="error"}`, each made at 0
    /// from the start. A fixed set, so that the series stay few whatever the
    /// errors say.
    pub enum RenewalFailure {
        /// The control plane not reached, its TLS handshake failed, or it
        /// did not answer in time.
        Unreachable = "unreachable",
        /// The control plane answered with an error.
        Refused = "refused",
        /// The certificate answered is not for this sidecar's key.
        KeyMismatch = "key_mismatch",
        /// The certificate answered is outside its validity period.
        OutsideValidity = "outside_validity",
        /// The leaf answered is not shaped as an X.509-SVID leaf.
        PeersWouldRefuse = "peers_would_refuse",
        /// Any other fault of the certificate answered.
        InvalidCertificate = "invalid_certificate",
        /// This sidecar could not ask.
        Local = "local",
    }
}

impl CertifyError {
    /// Why the call failed, as the `reason` of its count: the control
    /// plane not reached or not answering in time, its refusal, what is
    /// wrong with the certificate it answered, or what kept this sidecar
    /// from asking.
    pub fn reason(&self) -> RenewalFailure {
        match self {
            CertifyError::Connect { .. } | CertifyError::Timeout => RenewalFailure::Unreachable,
            CertifyError::Refused { .. }
            | CertifyError::JoinTokenUsed
            | CertifyError::RenewalTokenUnread { .. } => RenewalFailure::Refused,
            CertifyError::Response(invalid) => invalid.reason(),
            CertifyError::AfterRevocation { source, .. } => source.reason(),
            CertifyError::NoProof
            | CertifyError::Csr(_)
            | CertifyError::NoBundle
            | CertifyError::Tls(_)
            | CertifyError::TokenFile(_) => RenewalFailure::Local,
        }
    }
}

/// What a Certify call needs to know about this sidecar.
#[derive(Clone)]
pub struct CertifyParams {
    pub control_plane: String,
    pub identity: SpiffeId,
    pub token: Option<Credential>,
    /// Every inbound address reported; never empty.
    pub advertise_addresses: Vec<SocketAddr>,
}

/// The advertised inbound addresses as Certify and Subscribe carry them:
/// the first alone, for control planes older than the list, then all.
pub fn advertised(addresses: &[SocketAddr]) -> (String, Vec<String>) {
    let first = addresses
        .first()
        .map(SocketAddr::to_string)
        .unwrap_or_default();
    (first, addresses.iter().map(SocketAddr::to_string).collect())
}

/// Builds the TLS client config to reach the control plane, verified as
/// `spiffe://TD/trellis/control-plane`, presenting `svid` when given.
pub fn control_plane_tls(
    identity: &SpiffeId,
    bundle: &[CertificateDer<'static>],
    svid: Option<&Svid>,
) -> Result<Arc<rustls::ClientConfig>, CertifyError> {
    if bundle.is_empty() {
        return Err(CertifyError::NoBundle);
    }
    let roots = trellis_core::tls::root_store(bundle)?;
    let expected = ExpectedServer::Exact(SpiffeId::control_plane(&identity.trust_domain()));
    let builder = rustls::ClientConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(trellis_core::tls::PROTOCOL_VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(roots, expected)));
    let config = match svid {
        Some(svid) => {
            builder.with_client_cert_resolver(Arc::new(SvidResolver(svid.certified.clone())))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(trellis_core::grpc::with_h2_alpn(config)))
}

/// One Certify call: a renewal over mTLS when `current` is valid, else the
/// first certificate proved by the token. A ServiceAccount token proves a
/// renewal too (a control plane with `--renewal-proof token` refuses the
/// certificate alone); a join token, single-use, does not. A renewal whose
/// ServiceAccount token file cannot be read is made with the certificate
/// alone; if the control plane refuses it for want of the token, the error
/// is [`CertifyError::RenewalTokenUnread`], saying why the file could not
/// be read. Returns the new SVID and the bundle the control plane sent.
///
/// A renewal the control plane refuses for the certificate itself (it no
/// longer trusts the root that signed it, which happens when a sidecar
/// missed the window of a root rotation), or because the identity was
/// revoked (`trellisctl identity revoke`), is made again at once with the
/// token, when there is one: the certificate, though within its dates,
/// proves nothing any more, and retrying it until it expires would leave
/// the sidecar without a renewed identity for that long. When that token
/// proof fails too after a revocation, the error is
/// [`CertifyError::AfterRevocation`], naming the certificate, which the
/// caller then no longer offers (see [`run`]).
pub async fn certify(
    params: &CertifyParams,
    bundle: &[CertificateDer<'static>],
    current: Option<&Svid>,
) -> Result<(Svid, Vec<CertificateDer<'static>>), CertifyError> {
    let current = current.filter(|s| s.is_valid_at(SystemTime::now()));
    let Some(svid) = current else {
        return certify_with(params, bundle, None).await;
    };
    let e = match certify_with(params, bundle, Some(svid)).await {
        Err(CertifyError::Refused {
            code: tonic::Code::PermissionDenied,
            message,
            reason,
        }) if reason == trellis_core::grpc::REFUSAL_REVOKED && params.token.is_some() => {
            tracing::warn!(
                serial = %svid.serial,
                refusal = %message,
                "the control plane no longer renews the current certificate: its identity was \
                 revoked; proving the token instead (with join tokens, write a new one to \
                 --token-file)"
            );
            return certify_with(params, bundle, None).await.map_err(|source| {
                CertifyError::AfterRevocation {
                    serial: svid.serial.clone(),
                    refusal: message,
                    source: Box::new(source),
                }
            });
        }
        // How a refused client certificate reaches the call.
        Err(
            e @ (CertifyError::Connect { .. }
            | CertifyError::Refused {
                code: tonic::Code::Unknown | tonic::Code::Unavailable,
                ..
            }),
        ) if params.token.is_some() => e,
        result => return result,
    };
    let tls = control_plane_tls(&params.identity, bundle, Some(svid))?;
    let Some(alert) = certificate_refused(&params.control_plane, tls).await else {
        return Err(e);
    };
    tracing::warn!(
        serial = %svid.serial,
        alert = ?alert,
        "the control plane refused the current certificate for a renewal: it no longer trusts \
         the root that signed it, or by its clock the certificate has expired; proving the \
         token instead"
    );
    certify_with(params, bundle, None).await
}

/// The TLS alert with which the control plane at `addr` refuses the
/// client certificate of `tls`, if it does. In TLS 1.3 the server checks
/// that certificate after the client has finished its handshake, so a
/// refusal reaches a call only as a broken connection (tonic keeps the
/// alert as text alone); one more handshake, reading the server's first
/// bytes, gets the alert itself.
async fn certificate_refused(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    const PATIENCE: Duration = Duration::from_secs(5);
    let dial = trellis_core::grpc::dial(addr, tls);
    let mut stream = tokio::time::timeout(PATIENCE, dial).await.ok()?.ok()?;
    let mut first = [0u8; 1];
    let read = tokio::io::AsyncReadExt::read(&mut stream, &mut first);
    let read = tokio::time::timeout(PATIENCE, read).await.ok()?;
    match read
        .err()
        .as_ref()
        .and_then(|e| trellis_core::tls::rustls_error(e))
    {
        Some(rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::DecryptError),
        )) => Some(*alert),
        _ => None,
    }
}

/// One Certify call, proved by `current` as the TLS client certificate,
/// or without one by the token; a ServiceAccount token is sent with the
/// certificate too, as fresh as its file, or, when the file cannot be
/// read, left out with a warning: the certificate alone renews with a
/// control plane that does not need the token.
async fn certify_with(
    params: &CertifyParams,
    bundle: &[CertificateDer<'static>],
    current: Option<&Svid>,
) -> Result<(Svid, Vec<CertificateDer<'static>>), CertifyError> {
    // Why the ServiceAccount token is not sent with this renewal.
    let mut unread = None;
    let proof = match (current, &params.token) {
        (_, Some(Credential::ServiceAccountToken(path))) => match (read_token(path), current) {
            (Ok(token), _) => Some(Proof::ServiceAccountToken(token)),
            (Err(e), None) => return Err(e.into()),
            (Err(e), Some(svid)) => {
                tracing::warn!(
                    serial = %svid.serial,
                    error = %e,
                    "the ServiceAccount token file could not be read: renewing with the current \
                     certificate alone, which a control plane with --renewal-proof token refuses"
                );
                unread = Some(e);
                None
            }
        },
        (Some(_), _) => None,
        (None, Some(Credential::JoinToken { path, at_start })) => Some(Proof::JoinToken(
            read_token(path).unwrap_or_else(|_| at_start.0.clone()),
        )),
        (None, None) => return Err(CertifyError::NoProof),
    };
    let tls = control_plane_tls(&params.identity, bundle, current)?;
    let channel = trellis_core::grpc::connect(&params.control_plane, tls)
        .await
        .map_err(|source| CertifyError::Connect {
            addr: params.control_plane.clone(),
            source,
        })?;
    let (key, csr) = key_and_csr(&params.identity)?;
    let (inbound_address, inbound_addresses) = advertised(&params.advertise_addresses);
    let request = CertifyRequest {
        csr,
        proof,
        inbound_address,
        inbound_addresses,
    };
    let mut client = IdentityClient::new(channel);
    let call = client.certify(request);
    let response = tokio::time::timeout(CERTIFY_TIMEOUT, call)
        .await
        .map_err(|_| CertifyError::Timeout)?
        .map_err(|s| {
            let join_token =
                current.is_none() && matches!(params.token, Some(Credential::JoinToken { .. }));
            refused(&s, join_token, unread)
        })?
        .into_inner();
    for refused in &response.refused_inbound_addresses {
        log_not_recorded(&params.identity, refused);
    }
    let chain = response
        .chain
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let svid = Svid::new(&params.identity, chain, key)?;
    let bundle = response
        .trust_bundle
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    Ok((svid, bundle))
}

/// The error for the refusal `status`; `join_token` when the call was
/// proved by a join token, whose refusal as used says what to do; `unread`
/// why the ServiceAccount token was left out, which a refusal for want of
/// it names.
fn refused(
    status: &tonic::Status,
    join_token: bool,
    unread: Option<crate::config::InvalidFlag>,
) -> CertifyError {
    let reason = status
        .metadata()
        .get(trellis_core::grpc::REFUSAL_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if join_token && reason == trellis_core::grpc::REFUSAL_TOKEN_USED {
        return CertifyError::JoinTokenUsed;
    }
    if reason == trellis_core::grpc::REFUSAL_RENEWAL_NEEDS_TOKEN
        && let Some(unread) = unread
    {
        return CertifyError::RenewalTokenUnread { unread };
    }
    CertifyError::Refused {
        code: status.code(),
        message: status.message().to_string(),
        reason: reason.to_string(),
    }
}

/// Logs an inbound address the control plane did not record (so no other
/// sidecar learns to reach this one there), saying what to check for
/// `reason`.
fn log_not_recorded(identity: &SpiffeId, refused: &RefusedInboundAddress) {
    let why = match refused.reason.as_str() {
        "unverified" => {
            "this sidecar's Certify did not come from that IP, so the control plane could not \
             tell it is this sidecar's: check --advertise-address, or, where the control \
             plane sees sidecars through NAT or a proxy, start it with \
             --trust-reported-addresses"
        }
        "loopback" => {
            "a loopback address names each host's own, and the control plane records one \
             only from a sidecar on its own host, which reaches it over loopback; this \
             sidecar's Certify did not: set --advertise-address to an address other sidecars \
             can reach (this host's or pod's IP)"
        }
        "held" => {
            "another workload whose certificate is still valid holds that IP (the control \
             plane's log names it)"
        }
        _ => "the control plane gave a reason this sidecar does not know",
    };
    tracing::warn!(
        %identity,
        address = %refused.address,
        reason = %refused.reason,
        "the control plane did not record an inbound address of this sidecar as a mesh \
         endpoint; the certificate was issued, and the address is reported again at the next \
         renewal: {why}"
    );
}

/// Keeps this sidecar certified: the first Certify, then renewals at
/// half-life with jitter; after a failure it retries with capped backoff
/// and the current certificate stays published until it expires. A
/// failure is warned of once as it begins or changes, and again every
/// five minutes while it repeats unchanged ([`outage`]). A
/// certificate the control plane refused to renew because its identity was
/// revoked is not offered again: every retry proves the token, read again
/// from its file, so a new join token written there is taken at the next.
/// `failure_tx` holds why the last Certify failed, until one succeeds, for
/// `/ready` to say why the sidecar has no certificate.
pub async fn run(
    params: CertifyParams,
    svid_tx: watch::Sender<Option<Arc<Svid>>>,
    bundle_tx: watch::Sender<TrustBundle>,
    failure_tx: watch::Sender<Option<Arc<str>>>,
    metrics: Arc<Metrics>,
) {
    let mut attempt = 0u32;
    // The serial of the current certificate when it no longer renews.
    let mut revoked: Option<String> = None;
    // The failures since the last success: the same one again is said at
    // debug, so a control plane away for minutes costs one warning per
    // sidecar rather than one per retry, and again every five minutes
    // while it lasts; another failure, or the next after a success, is
    // warned of again.
    let mut outage = outage::Outage::default();
    loop {
        let current = svid_tx.borrow().clone();
        let bundle = bundle_tx.borrow().clone();
        let proof = current
            .as_deref()
            .filter(|s| revoked.as_deref() != Some(s.serial.as_str()));
        // When the next attempt is due, by the wall clock: a renewal must
        // not wait out a suspension of the host on top of its schedule.
        let due = match certify(&params, &bundle, proof).await {
            Ok((svid, new_bundle)) => {
                attempt = 0;
                outage.ended();
                metrics.renewed();
                metrics
                    .certificate_expiry
                    .set(svid.expires_at_unix() as i64);
                // The CA may backdate notBefore against clock skew: count
                // the lifetime from when we got the certificate.
                let start = svid.not_before.max(SystemTime::now());
                let renew = schedule::renew_at(start, svid.not_after, schedule::random_jitter());
                tracing::info!(
                    identity = %svid.id,
                    serial = %svid.serial,
                    expires_at = svid.expires_at_unix(),
                    expires = %rfc3339(svid.expires_at_unix() as i64),
                    renewal = current.is_some(),
                    "certificate issued"
                );
                if !new_bundle.is_empty() && new_bundle != **bundle {
                    // Every later call to the control plane trusts this
                    // bundle: one that cannot make a root store would cut
                    // the sidecar off until a restart. Keep the current
                    // one, as a snapshot carrying such a bundle is refused.
                    match trellis_core::tls::root_store(&new_bundle) {
                        Ok(_) => publish_bundle(&bundle_tx, new_bundle, "certify"),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "the trust bundle the control plane sent with the certificate is not usable; keeping the current one"
                        ),
                    }
                }
                svid_tx.send_replace(Some(Arc::new(svid)));
                failure_tx.send_replace(None);
                renew.max(SystemTime::now() + schedule::MIN_RENEWAL_INTERVAL)
            }
            Err(e) => {
                if let CertifyError::AfterRevocation { serial, .. } = &e {
                    revoked = Some(serial.clone());
                }
                metrics.renewal_failed(e.reason());
                let delay = schedule::retry_delay(attempt);
                attempt = attempt.saturating_add(1);
                let error = e.to_string();
                failure_tx.send_replace(Some(Arc::from(error.as_str())));
                match outage.failed(error, std::time::Instant::now()) {
                    outage::Say::Warn => {
                        tracing::warn!(error = %e, retry_in = ?delay, "certify failed")
                    }
                    outage::Say::Remind {
                        failing_for,
                        attempts,
                    } => tracing::warn!(
                        error = %e,
                        failing_for = %Words(Duration::from_secs(failing_for.as_secs())),
                        attempts,
                        retry_in = ?delay,
                        "certify still failing"
                    ),
                    outage::Say::Debug => {
                        tracing::debug!(error = %e, retry_in = ?delay, attempt, "certify failed")
                    }
                }
                SystemTime::now() + delay
            }
        };
        trellis_core::clock::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_has_exactly_the_identity_as_uri_san() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let (_key, csr) = key_and_csr(&id).unwrap();
        let params = rcgen::CertificateSigningRequestParams::from_der(&csr.into()).unwrap();
        let sans = &params.params.subject_alt_names;
        assert_eq!(sans.len(), 1);
        match &sans[0] {
            SanType::URI(uri) => assert_eq!(uri.as_str(), id.as_str()),
            other => panic!("unexpected SAN {other:?}"),
        }
    }

    /// A leaf for `id` signed by a throwaway CA, for the key of `csr_key`,
    /// valid from `not_before` to `not_after` (minutes from now).
    fn leaf(
        id: &SpiffeId,
        csr_key: &KeyPair,
        not_before: i64,
        not_after: i64,
    ) -> CertificateDer<'static> {
        leaf_shaped(id, csr_key, |params| {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::minutes(not_before);
            params.not_after = now + time::Duration::minutes(not_after);
        })
    }

    /// As [`leaf`] makes one valid for the hour, its fields changed by
    /// `shape` first.
    fn leaf_shaped(
        id: &SpiffeId,
        csr_key: &KeyPair,
        shape: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::Issuer::new(ca, ca_key);
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        shape(&mut params);
        params.signed_by(csr_key, &ca).unwrap().der().clone()
    }

    /// `ALL` lists each reason once, at its own index, so a count by
    /// `reason as usize` lands on its series; the tokens are the labels
    /// dashboards and alerts already use.
    #[test]
    fn renewal_failures_are_listed_at_their_index_with_their_tokens() {
        for (i, reason) in RenewalFailure::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "{reason:?}");
            assert_eq!(reason.to_string(), reason.token());
        }
        assert_eq!(
            RenewalFailure::ALL.map(RenewalFailure::token),
            [
                "unreachable",
                "refused",
                "key_mismatch",
                "outside_validity",
                "peers_would_refuse",
                "invalid_certificate",
                "local",
            ]
        );
    }

    fn pkcs8(key: &KeyPair) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
    }

    /// A Certify answer the sidecar could not present is refused, naming
    /// why, so the current certificate stays: a leaf for another key, or
    /// one outside its dates.
    #[test]
    fn a_certificate_for_another_key_or_outside_its_dates_is_refused() {
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let (mine, other) = (
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        assert!(Svid::new(&id, vec![leaf(&id, &mine, -1, 60)], pkcs8(&mine)).is_ok());

        let refused = Svid::new(&id, vec![leaf(&id, &other, -1, 60)], pkcs8(&mine)).unwrap_err();
        let refused = CertifyError::from(refused);
        assert_eq!(refused.reason().token(), "key_mismatch");
        assert_eq!(
            refused.to_string(),
            "Certify answered an unusable certificate: the leaf's public key is not that of \
             this sidecar's private key (the certificate was not issued for the CSR this \
             sidecar sent)"
        );
        for (not_before, not_after) in [(-120, -60), (60, 120)] {
            let refused = Svid::new(
                &id,
                vec![leaf(&id, &mine, not_before, not_after)],
                pkcs8(&mine),
            )
            .unwrap_err();
            let refused = CertifyError::from(refused);
            assert_eq!(refused.reason().token(), "outside_validity");
            let refused = refused.to_string();
            assert!(
                refused.starts_with(
                    "Certify answered an unusable certificate: the certificate is outside its \
                     validity period (not before "
                ),
                "{refused}"
            );
        }
    }

    /// A Certify answer whose leaf peers would refuse, as a faulty or
    /// foreign CA may issue it, is refused in the words peers use: taken,
    /// it would read as ready and fail every handshake.
    #[test]
    fn a_certificate_peers_would_refuse_is_refused_naming_what_is_wrong() {
        use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose as Usage};
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let mine = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let key_usage = "an X.509-SVID leaf's keyUsage holds digitalSignature and neither \
                         keyCertSign nor cRLSign";
        let leaves = [
            (
                leaf_shaped(&id, &mine, |p| p.is_ca = IsCa::NoCa),
                "the certificate has no basicConstraints; an X.509-SVID leaf carries \
                 basicConstraints with cA false"
                    .to_owned(),
            ),
            (
                leaf_shaped(&id, &mine, |p| {
                    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
                }),
                "a CA certificate was presented as the leaf; an X.509-SVID leaf is not a CA"
                    .to_owned(),
            ),
            (
                leaf_shaped(&id, &mine, |p| p.key_usages = vec![Usage::KeyCertSign]),
                format!("the certificate has a keyUsage without digitalSignature; {key_usage}"),
            ),
            (
                leaf_shaped(&id, &mine, |p| {
                    p.key_usages = vec![Usage::DigitalSignature, Usage::KeyCertSign]
                }),
                format!(
                    "the certificate has a keyUsage with keyCertSign or cRLSign, a CA's; \
                     {key_usage}"
                ),
            ),
            (
                leaf_shaped(&id, &mine, |p| p.key_usages = vec![]),
                format!("the certificate has no keyUsage; {key_usage}"),
            ),
        ];
        for (leaf, why) in leaves {
            let refused = CertifyError::from(Svid::new(&id, vec![leaf], pkcs8(&mine)).unwrap_err());
            assert_eq!(refused.reason().token(), "peers_would_refuse");
            assert_eq!(
                refused.to_string(),
                format!(
                    "Certify answered an unusable certificate: every peer would refuse the \
                     leaf: {why}"
                )
            );
        }
    }
}
