//! `trellis.identity.v1.Identity/Certify`: CSR in, X.509-SVID out.
//!
//! Order matters: the CSR is validated first (no state touched), then the
//! proof is checked (a join token by reading the store), then the leaf is
//! signed, and only then the token is consumed and the issuance recorded,
//! in one store transaction that checks the token again. A refused Certify
//! therefore issues nothing and records nothing, and a caller that goes
//! away before that transaction leaves its token unused for its retry. A
//! caller only ever obtains its own identity. Tokens never reach a log.
//!
//! Proofs: a join token (consumed with the issuance), a Kubernetes
//! ServiceAccount token when the service has a [`TokenReviewer`] (the CSR
//! must name exactly the `spiffe://TD/ns/NS/sa/SA` the review derived; a
//! token the API server does not vouch for is UNAUTHENTICATED, an API
//! server that cannot be asked is UNAVAILABLE; without a reviewer such a
//! proof is UNIMPLEMENTED), or none: a renewal with the current SVID. A
//! service that [needs the token for renewals](IdentityService::renewals_needing_token)
//! (`--renewal-proof token`) refuses that last one (UNAUTHENTICATED,
//! reason `renewal_needs_token`): a sidecar renews with its token, still
//! presenting its certificate, so a stolen key and certificate renew
//! nothing and a deleted pod's identity is not renewed.
//!
//! The inbound addresses a Certify reports become the identity's mesh
//! endpoints with the embedded store, so they are not taken on the
//! sidecar's word. A sidecar reports its own addresses and connects from
//! one of them, so an address is recorded only if its IP is the IP the
//! Certify came from (verified), or, for a dual-stack sidecar, is of the
//! other IP family in a report that holds the connection's IP (unverified:
//! the control plane cannot see the sidecar at it). A loopback address
//! means "this host": it is taken as reported only from a Certify that
//! came over loopback (a sidecar on the control plane's own host), and
//! refused (reason `loopback`) from anywhere else, where it names no
//! address another host could reach and could only steer traffic on the
//! control plane's host. With `--trust-reported-addresses` (a control
//! plane that sees sidecars through NAT or a proxy) every address is taken
//! as reported, unverified. The store then owns addresses by IP: an
//! unverified address at an IP another live workload holds is refused
//! (see the store's issuance module); a loopback address has no owner. A
//! refused address is logged (the identity, the address, the connection's
//! IP), counted (`trellis_inbound_addresses_refused_total`) and not
//! recorded; the certificate is still issued, with the addresses that
//! were accepted: the proof is what grants the certificate, and a sidecar
//! that could not renew over an address would lose its identity. The
//! Kubernetes store takes endpoints from Pods and ignores reports, so
//! nothing is checked there.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use trellis_core::grpc::{CertifyRefusal, REFUSAL_KEY};
use trellis_proto::identity::v1::certify_request::Proof;
use trellis_proto::identity::v1::identity_server::Identity;
use trellis_proto::identity::v1::{CertifyRequest, CertifyResponse, RefusedInboundAddress};

use super::{Mesh, PeerInfo, peer_of, quoted, rfc3339};
use crate::authn::hash_token;
use crate::authn::tokenreview::TokenReviewer;
use crate::ca::csr;
use crate::discovery::Discovery;
use crate::server::REFUSAL_LOG_PAUSE;
use crate::store::{
    EndpointChange, IssuanceProof, IssuedCertRecord, StoreError, TokenClaim, TokenRefusal,
    WorkloadRecord,
};
use crate::unix_now;
use trellis_core::logging::throttle::Throttle;
use trellis_core::warn_throttled;

pub struct IdentityService {
    mesh: Mesh,
    /// The refusals logged, by reason: any caller can have Certify refused
    /// as often as it calls.
    refusal_lines: Throttle,
    reviewer: Option<Arc<TokenReviewer>>,
    trust_reported_addresses: bool,
    renewals_need_token: bool,
}

impl IdentityService {
    pub fn new(mesh: Mesh) -> Self {
        Self {
            mesh,
            refusal_lines: Throttle::new(REFUSAL_LOG_PAUSE),
            reviewer: None,
            trust_reported_addresses: false,
            renewals_need_token: false,
        }
    }

    /// Refuses a renewal proved by the current SVID alone when `needed`:
    /// it must prove a ServiceAccount token too (`--renewal-proof token`).
    pub fn renewals_needing_token(mut self, needed: bool) -> Self {
        self.renewals_need_token = needed;
        self
    }

    /// Takes the inbound addresses a Certify reports as reported, without
    /// checking them against the connection's address: for a control plane
    /// that sees sidecars through NAT or a proxy.
    pub fn trusting_reported_addresses(mut self, trust: bool) -> Self {
        self.trust_reported_addresses = trust;
        self
    }

    /// Accepts ServiceAccount token proofs, checked by `reviewer`.
    pub fn with_token_reviewer(mut self, reviewer: Option<Arc<TokenReviewer>>) -> Self {
        self.reviewer = reviewer;
        self
    }

    /// Counts and logs a refusal, and names `reason` in the status's
    /// metadata ([`REFUSAL_KEY`]) for the sidecar to act on. Any caller can
    /// be refused as often as it calls, so a reason is logged at most once
    /// per [`REFUSAL_LOG_PAUSE`], the next line saying how many were not
    /// (`suppressed`); each is counted.
    pub(crate) fn refuse(&self, reason: CertifyRefusal, mut status: Status) -> Status {
        // `detail`, not `message`: that is the event's own message field.
        let token = reason.token();
        warn_throttled!(
            self.refusal_lines,
            token,
            { reason = token, code = ?status.code(), detail = status.message() },
            "certify refused"
        );
        self.mesh.metrics.certify_failed(reason);
        status
            .metadata_mut()
            .insert(REFUSAL_KEY, MetadataValue::from_static(token));
        status
    }

    /// [`refuse`](Self::refuse) for a join token that proves nothing for
    /// `id`.
    fn refuse_token(&self, refusal: TokenRefusal, id: &trellis_core::SpiffeId) -> Status {
        let (reason, status) = match refusal {
            TokenRefusal::Unknown => (
                CertifyRefusal::TokenUnknown,
                Status::unauthenticated("join token is unknown"),
            ),
            TokenRefusal::Expired => (
                CertifyRefusal::TokenExpired,
                Status::unauthenticated("join token has expired"),
            ),
            TokenRefusal::Used => (
                CertifyRefusal::TokenUsed,
                Status::unauthenticated("join token was already used"),
            ),
            TokenRefusal::Disabled => (
                CertifyRefusal::JoinTokensDisabled,
                Status::failed_precondition(TokenRefusal::Disabled.to_string()),
            ),
            TokenRefusal::OtherIdentity { .. } => (
                CertifyRefusal::OtherIdentity,
                Status::permission_denied(format!(
                    "the join token does not grant {id}; a token proves only the identity it was made for"
                )),
            ),
        };
        self.refuse(reason, status)
    }

    /// Refuses a renewal by `peer`'s certificate for `id` when a revocation
    /// of `id` covers that certificate: it was issued at or before the
    /// revocation (or when, is not known).
    fn refuse_revoked(
        &self,
        id: &trellis_core::SpiffeId,
        peer: Option<&PeerInfo>,
    ) -> Result<(), Status> {
        let revocation = match self.mesh.store.revocation(id.as_str()) {
            Ok(Some(revocation)) => revocation,
            Ok(None) => return Ok(()),
            Err(e) => {
                return Err(self.refuse(CertifyRefusal::StoreError, e.into_status()));
            }
        };
        let issued_at = peer.and_then(|p| p.cert_issued_at_unix);
        if issued_at.is_some_and(|at| !revocation.covers(at)) {
            return Ok(());
        }
        Err(self.refuse_revoked_at(id, revocation.revoked_at_unix))
    }

    /// [`refuse`](Self::refuse) for a renewal by a certificate of `id`
    /// that its revocation at `at` covers.
    fn refuse_revoked_at(&self, id: &trellis_core::SpiffeId, at: i64) -> Status {
        self.refuse(
            CertifyRefusal::Revoked,
            Status::permission_denied(format!(
                "{id} was revoked at {} ({at}): a certificate issued then or before no longer \
                 renews; obtain a new one with a join token",
                rfc3339(at)
            )),
        )
    }
}

/// The most inbound addresses one workload may report: a pod has one per
/// IP family, a host a few more; anything near this is a mistake.
pub const MAX_INBOUND_ADDRESSES: usize = 16;

/// The longest inbound address accepted, in bytes: the longest `ip:port`
/// there is (an IPv6 address with a scope, `[...%4294967295]:65535`) fits.
pub const MAX_ADDRESS_LEN: usize = 64;

/// The largest Certify request read, in bytes: a CSR is under 1 KiB, a
/// ServiceAccount token at most [`MAX_TOKEN_LEN`] (16 KiB) and the
/// addresses at most [`MAX_INBOUND_ADDRESSES`] of [`MAX_ADDRESS_LEN`]
/// bytes. Certify needs no client certificate, so this bounds what anyone
/// who can reach the port makes the control plane buffer per stream, far
/// below gRPC's usual 4 MiB; a larger request is refused as its length
/// prefix arrives, with RESOURCE_EXHAUSTED naming the call and this limit.
///
/// [`MAX_TOKEN_LEN`]: crate::authn::tokenreview::MAX_TOKEN_LEN
pub const MAX_CERTIFY_REQUEST_BYTES: usize = 64 * 1024;

/// The inbound addresses of a Certify, canonical (`[fd00::1]:15006`, not
/// `[fd00:0::1]:15006`) and without repeats: `inbound_addresses`, or the
/// single `inbound_address` of a sidecar older than that field. The error
/// names the field and the address that is wrong, quoting at most a short
/// prefix of it.
fn inbound_addresses(req: &CertifyRequest) -> Result<Vec<String>, String> {
    if req.inbound_addresses.is_empty() {
        if req.inbound_address.is_empty() {
            return Ok(Vec::new());
        }
        return inbound_address("inbound_address", &req.inbound_address).map(|a| vec![a]);
    }
    if req.inbound_addresses.len() > MAX_INBOUND_ADDRESSES {
        return Err(format!(
            "inbound_addresses holds {} addresses; at most {MAX_INBOUND_ADDRESSES} are accepted",
            req.inbound_addresses.len()
        ));
    }
    let mut addresses = Vec::with_capacity(req.inbound_addresses.len());
    for (index, raw) in req.inbound_addresses.iter().enumerate() {
        let addr = inbound_address(&format!("inbound_addresses[{index}]"), raw)?;
        if !addresses.contains(&addr) {
            addresses.push(addr);
        }
    }
    Ok(addresses)
}

/// One inbound address, canonical; the error names `field`.
fn inbound_address(field: &str, raw: &str) -> Result<String, String> {
    if raw.len() > MAX_ADDRESS_LEN {
        return Err(format!(
            "{field} is {} bytes long; an ip:port address is at most {MAX_ADDRESS_LEN}",
            raw.len()
        ));
    }
    let Ok(addr) = raw.parse::<SocketAddr>() else {
        return Err(format!("{field} {} is not an ip:port address", quoted(raw)));
    };
    // An IPv4-mapped IPv6 address is the IPv4 address it maps: one IP, one
    // form, so it has one owner.
    let addr = match addr.ip().to_canonical() {
        IpAddr::V4(v4) if addr.is_ipv6() => SocketAddr::new(v4.into(), addr.port()),
        _ => addr,
    };
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(format!(
            "{field} {} is not an address peers can dial",
            quoted(raw)
        ));
    }
    Ok(addr.to_string())
}

/// Why [`check_sources`] refused an address: the Certify did not come
/// from its IP (nor, for a dual-stack sidecar, from a reported address of
/// the other family).
const UNVERIFIED: &str = "unverified";

/// Why [`check_sources`] refused an address: it is a loopback address and
/// the Certify did not come over loopback.
const LOOPBACK: &str = "loopback";

/// What [`check_sources`] decided: the addresses accepted, each with
/// whether the connection verified it, and those refused, each with why.
type Checked = (Vec<(String, bool)>, Vec<(String, &'static str)>);

/// The addresses of a Certify checked against the IP it came from
/// (`connected_from`, canonical; `None` when unknown): those recorded, each
/// with whether the connection verified it (its IP is the connection's),
/// and those refused, each with why ([`UNVERIFIED`], [`LOOPBACK`]). With
/// `trust` every address is accepted, unverified where the connection does
/// not show it. A loopback address means "this host", so it is accepted
/// (unverified if at another loopback IP) only from a Certify that came
/// over loopback: a sidecar on the control plane's own host; from anywhere
/// else it names nothing another host could reach, and could only steer
/// traffic on the control plane's host. Otherwise an address at another IP
/// is accepted, unverified, only if it is of the other family and the
/// report holds the connection's IP too (a dual-stack sidecar connects
/// over one family; a loopback connection shows no address): anything
/// else the sidecar could not be at.
fn check_sources(addresses: Vec<String>, connected_from: Option<IpAddr>, trust: bool) -> Checked {
    let ip = |address: &str| address.parse::<SocketAddr>().ok().map(|a| a.ip());
    // A sidecar on the control plane's own machine (over loopback) shows
    // no address of its own.
    let over_loopback = connected_from.is_some_and(|from| from.is_loopback());
    let anchored = connected_from.is_some_and(|from| !from.is_loopback())
        && addresses.iter().any(|a| ip(a) == connected_from);
    let mut accepted = Vec::with_capacity(addresses.len());
    let mut refused = Vec::new();
    for address in addresses {
        let at = ip(&address);
        let other_family = at
            .zip(connected_from)
            .is_some_and(|(at, from)| at.is_ipv4() != from.is_ipv4());
        if connected_from.is_some() && at == connected_from {
            accepted.push((address, true));
        } else if trust {
            accepted.push((address, false));
        } else if at.is_some_and(|at| at.is_loopback()) {
            if over_loopback {
                accepted.push((address, false));
            } else {
                refused.push((address, LOOPBACK));
            }
        } else if anchored && other_family {
            accepted.push((address, false));
        } else {
            refused.push((address, UNVERIFIED));
        }
    }
    (accepted, refused)
}

/// An issuance queued with the store, until its answer is in hand. Dropped
/// unanswered (its Certify was dropped), it tells the store its caller is
/// gone, so one that would use a join token and is still waiting is not
/// applied (the caller's retry brings the same token), and hands the
/// answer to a task, so an endpoint a commit adds still reaches discovery.
struct PendingIssuance {
    reply: Option<oneshot::Receiver<Result<EndpointChange, StoreError>>>,
    discovery: Arc<Discovery>,
    abandoned: Arc<AtomicBool>,
}

impl PendingIssuance {
    /// The store's answer, once discovery holds what it changed; `None` if
    /// the store stopped first.
    async fn recorded(mut self) -> Option<Result<EndpointChange, StoreError>> {
        let reply = self.reply.as_mut()?;
        let recorded = reply.await.ok();
        self.reply = None;
        if matches!(recorded, Some(Ok(EndpointChange::Changed))) {
            // Runs to its end even if this future is dropped meanwhile.
            let _ = refresh(self.discovery.clone()).await;
        }
        recorded
    }
}

impl Drop for PendingIssuance {
    fn drop(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        self.abandoned.store(true, Ordering::Release);
        let discovery = self.discovery.clone();
        // The task holds the receiver, not a `PendingIssuance`: a runtime
        // shutting down drops what it is handed, and a guard that spawned
        // itself again from its own drop would never end.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(EndpointChange::Changed)) = reply.await {
                    let _ = refresh(discovery).await;
                }
            });
        }
    }
}

/// Loads the snapshot version a commit wrote (a new endpoint is a new
/// version for every sidecar), on a thread that may block: it reads the
/// store. The refresh runs to its end whether or not it is awaited.
fn refresh(discovery: Arc<Discovery>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = discovery.refresh() {
            tracing::error!(error = %e, "could not record a new snapshot version");
        }
    })
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let peer = peer_of(&request).cloned();
        let req = request.into_inner();
        let valid = csr::validate(&req.csr, &self.mesh.trust_domain)
            .map_err(|e| self.refuse(e.reason(), Status::invalid_argument(e.to_string())))?;
        let id = valid.spiffe_id.clone();
        let addresses = inbound_addresses(&req).map_err(|e| {
            self.refuse(
                CertifyRefusal::BadInboundAddress,
                Status::invalid_argument(e),
            )
        })?;

        let token_hash = match &req.proof {
            Some(Proof::JoinToken(token)) => Some(hash_token(token)),
            Some(Proof::ServiceAccountToken(token)) => {
                let Some(reviewer) = &self.reviewer else {
                    return Err(self.refuse(
                        CertifyRefusal::UnimplementedProof,
                        Status::unimplemented(
                            "service_account_token proofs need Kubernetes: this control plane \
                             was not started with --identity-provider kubernetes; use a join token",
                        ),
                    ));
                };
                let client = peer.as_ref().map(|p| p.remote.ip());
                let account = reviewer.review(token, client).await.map_err(|e| {
                    let status = if e.is_callers_fault() {
                        Status::unauthenticated(e.to_string())
                    } else {
                        Status::unavailable(e.to_string())
                    };
                    self.refuse(e.reason(), status)
                })?;
                if account.spiffe_id != id {
                    return Err(self.refuse(
                        CertifyRefusal::OtherIdentity,
                        Status::permission_denied(format!(
                            "the service account token proves {}, not {id}; a pod can only obtain its own identity",
                            account.spiffe_id
                        )),
                    ));
                }
                None
            }
            None => {
                let caller = peer.as_ref().and_then(|p| p.spiffe_id.clone());
                match caller {
                    None => {
                        return Err(self.refuse(
                            CertifyRefusal::NoProof,
                            Status::unauthenticated(
                                "no proof: send a join token, or renew with the current SVID as the TLS client certificate",
                            ),
                        ));
                    }
                    Some(caller) if caller != id => {
                        return Err(self.refuse(
                            CertifyRefusal::OtherIdentity,
                            Status::permission_denied(format!(
                                "{caller} may only renew its own identity, not {id}"
                            )),
                        ));
                    }
                    Some(_) if self.renewals_need_token => {
                        return Err(self.refuse(
                            CertifyRefusal::RenewalNeedsToken,
                            Status::unauthenticated(
                                "renewal needs the ServiceAccount token: this control plane runs \
                                 with --renewal-proof token, so the certificate alone renews \
                                 nothing; a sidecar that renews without its token needs \
                                 --renewal-proof certificate until it is upgraded",
                            ),
                        ));
                    }
                    Some(_) => {
                        self.refuse_revoked(&id, peer.as_ref())?;
                        None
                    }
                }
            }
        };

        // A join token is used only with the issuance, in the store's
        // transaction; a made-up or spent one is refused before anything is
        // signed or queued for it.
        if let Some(hash) = &token_hash {
            let claim = TokenClaim {
                hash,
                spiffe_id: &id,
                now_unix: unix_now(),
            };
            match self.mesh.store.check_join_token(claim) {
                Ok(()) => {}
                Err(StoreError::Token(refusal)) => return Err(self.refuse_token(refusal, &id)),
                Err(e) => {
                    return Err(self.refuse(CertifyRefusal::StoreError, e.into_status()));
                }
            }
        }
        // Checked once the caller has shown a proof, so only such a caller
        // is logged and counted.
        let connected_from = peer.as_ref().map(|p| p.remote.ip().to_canonical());
        let from = || connected_from.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        // What the sidecar is told was not recorded, and why.
        let mut not_recorded = Vec::new();
        let addresses = if self.mesh.store.takes_reported_addresses() {
            let (accepted, refused) =
                check_sources(addresses, connected_from, self.trust_reported_addresses);
            for (address, reason) in refused {
                self.mesh.metrics.inbound_address_refused(reason);
                not_recorded.push(RefusedInboundAddress {
                    address: address.clone(),
                    reason: reason.into(),
                });
                if reason == LOOPBACK {
                    tracing::warn!(
                        spiffe_id = %id,
                        address,
                        reason,
                        connected_from = %from(),
                        "inbound address not recorded: a loopback address is recorded only \
                         from a sidecar on the control plane's own host, whose Certify comes \
                         over loopback; a sidecar elsewhere advertises an address its peers \
                         can reach"
                    );
                } else {
                    tracing::warn!(
                        spiffe_id = %id,
                        address,
                        reason,
                        connected_from = %from(),
                        "inbound address not recorded: the Certify did not come from its IP \
                         (nor from a reported address of the other IP family); where the \
                         control plane sees sidecars through NAT or a proxy, start it with \
                         --trust-reported-addresses"
                    );
                }
            }
            accepted
        } else {
            addresses.into_iter().map(|a| (a, false)).collect()
        };
        let issued = self
            .mesh
            .ca
            .sign_csr(&valid, self.mesh.cert_ttl)
            .map_err(|e| {
                self.refuse(
                    CertifyRefusal::SigningFailed,
                    Status::internal(e.to_string()),
                )
            })?;
        let now = unix_now();
        let record = IssuedCertRecord {
            serial_hex: issued.serial_hex.clone(),
            spiffe_id: id.to_string(),
            not_after_unix: issued.not_after_unix,
            issued_at_unix: issued.issued_at_unix,
        };
        let mut workload = WorkloadRecord::new(
            id.to_string(),
            addresses.iter().map(|(address, _)| address.clone()),
            issued.not_after_unix,
            now,
        );
        workload.cert_issued_at_unix = issued.issued_at_unix;
        for (stored, (_, verified)) in workload.addresses.iter_mut().zip(&addresses) {
            stored.verified = *verified;
        }
        // A renewal by certificate is checked against the revocation again
        // in the issuance's transaction: one stored since the check above
        // still stops it.
        let renewed_by =
            (req.proof.is_none()).then(|| peer.as_ref().and_then(|p| p.cert_issued_at_unix));
        let recorded = loop {
            let proof = match &token_hash {
                Some(hash) => Some(IssuanceProof::Token(TokenClaim {
                    hash,
                    spiffe_id: &id,
                    now_unix: now,
                })),
                None => {
                    renewed_by.map(|issued_at_unix| IssuanceProof::Certificate { issued_at_unix })
                }
            };
            // The store's writer answers once the record is durable, and a
            // commit that changed the endpoints must reach discovery. A
            // caller that goes away first (a reset stream, a deadline) drops
            // this future, yet the writer still commits: the pending answer
            // then passes to a task of its own, which refreshes discovery if
            // it must.
            let abandoned = Arc::new(AtomicBool::new(false));
            let pending = PendingIssuance {
                reply: Some(
                    self.mesh
                        .store
                        .queue_issuance(proof, &record, &workload, &abandoned),
                ),
                discovery: self.mesh.discovery.clone(),
                abandoned,
            };
            let Some(recorded) = pending.recorded().await else {
                return Err(self.refuse(
                    CertifyRefusal::StoreError,
                    Status::unavailable("the store stopped before recording the certificate"),
                ));
            };
            // A held address changed nothing stored, the token included:
            // the issuance goes again without it (at most once an address).
            let (address, holder) = match recorded {
                Err(StoreError::AddressHeld { address, holder }) => (address, holder),
                recorded => break recorded,
            };
            let before = workload.addresses.len();
            workload.addresses.retain(|a| a.address != address);
            if workload.addresses.len() == before {
                return Err(self.refuse(
                    CertifyRefusal::StoreError,
                    Status::internal(format!(
                        "the store refused inbound address {address}, which was not reported"
                    )),
                ));
            }
            self.mesh.metrics.inbound_address_refused("held");
            not_recorded.push(RefusedInboundAddress {
                address: address.clone(),
                reason: "held".into(),
            });
            tracing::warn!(
                spiffe_id = %id,
                address,
                holder,
                connected_from = %from(),
                "inbound address not recorded: another workload whose certificate is still \
                 valid holds its IP, shared only by workloads each seen connecting from it, or \
                 holds the address itself"
            );
        };
        match recorded {
            Ok(_) => {}
            Err(StoreError::Token(refusal)) => return Err(self.refuse_token(refusal, &id)),
            Err(StoreError::Revoked(revocation)) => {
                return Err(self.refuse_revoked_at(&id, revocation.revoked_at_unix));
            }
            Err(e) => {
                return Err(self.refuse(CertifyRefusal::StoreError, e.into_status()));
            }
        }
        self.mesh.metrics.certificate_issued();
        tracing::info!(
            spiffe_id = %id,
            serial = %issued.serial_hex,
            not_after = issued.not_after_unix,
            proof = match req.proof {
                Some(Proof::JoinToken(_)) => "join_token",
                Some(Proof::ServiceAccountToken(_)) => "service_account_token",
                None => "renewal",
            },
            "issued SVID"
        );
        Ok(Response::new(CertifyResponse {
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: self.mesh.ca.bundle().iter().map(|c| c.to_vec()).collect(),
            expires_at_unix: issued.not_after_unix,
            spiffe_id: id.to_string(),
            refused_inbound_addresses: not_recorded,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;
    use std::time::Duration;

    use trellis_core::SpiffeId;
    use trellis_proto::discovery::v1::MeshConfig;

    use super::*;
    use crate::api::PeerInfo;
    use crate::discovery::Discovery;
    use crate::store::embedded::{DB_FILE, EmbeddedStore};
    use crate::store::{JoinToken, Store};

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
    const TOKEN: &str = "a-join-token";

    /// The Identity service on an embedded store in `tmp`, holding a join
    /// token ([`TOKEN`]) for [`WEB`].
    struct Setup {
        service: IdentityService,
        store: Arc<EmbeddedStore>,
        discovery: Arc<Discovery>,
        _stop: tokio::sync::watch::Sender<bool>,
    }

    fn setup(tmp: &tempfile::TempDir) -> Setup {
        let store = Arc::new(EmbeddedStore::open(&tmp.path().join(DB_FILE)).unwrap());
        let discovery =
            Arc::new(Discovery::new(store.clone(), Vec::new(), MeshConfig::default()).unwrap());
        let (mesh, stop) = Mesh::for_tests(store.clone(), discovery.clone());
        let service = IdentityService::new(mesh);
        let grant = JoinToken {
            spiffe_id: WEB.into(),
            expires_at_unix: unix_now() + 600,
            used: false,
        };
        store
            .add_join_token(&hash_token(TOKEN), &grant, unix_now())
            .unwrap();
        Setup {
            service,
            store,
            discovery,
            _stop: stop,
        }
    }

    /// A Certify for [`WEB`] at `address`, with `proof`.
    fn certify_request(proof: Option<Proof>, address: &str) -> Request<CertifyRequest> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(WEB.try_into().unwrap())];
        Request::new(CertifyRequest {
            csr: params.serialize_request(&key).unwrap().der().to_vec(),
            proof,
            inbound_address: String::new(),
            inbound_addresses: vec![address.into()],
        })
    }

    fn join_token() -> Option<Proof> {
        Some(Proof::JoinToken(TOKEN.into()))
    }

    /// Certify calls with ServiceAccount tokens from one client address
    /// hold at most its share of the TokenReview turns: with
    /// [`MAX_REVIEWS_PER_CLIENT`] of its reviews in progress, one more from
    /// it is refused at once, UNAVAILABLE naming the limit, and counted by
    /// that reason, while the same address's share is never taken by a
    /// caller elsewhere. The API server stand-in accepts connections and
    /// never answers, so each review asked holds its turn.
    ///
    /// [`MAX_REVIEWS_PER_CLIENT`]: crate::authn::tokenreview::MAX_REVIEWS_PER_CLIENT
    #[tokio::test]
    async fn certify_holds_a_client_address_to_its_share_of_token_reviews() {
        use crate::authn::tokenreview::{KubeApi, MAX_REVIEWS_PER_CLIENT};
        use base64::Engine as _;
        use futures::FutureExt as _;
        use std::sync::atomic::AtomicUsize;

        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, .. } = setup(&tmp);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counting = accepted.clone();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((connection, _)) = listener.accept().await {
                open.push(connection);
                counting.fetch_add(1, Ordering::SeqCst);
            }
        });
        let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let api = KubeApi {
            url: format!("https://127.0.0.1:{port}").parse().unwrap(),
            ca: tmp.path().join("ca.pem"),
            token_file: tmp.path().join("token"),
        };
        std::fs::write(&api.ca, ca.cert.pem()).unwrap();
        std::fs::write(&api.token_file, "control-plane-token\n").unwrap();
        // Reviews asked stay asked for the whole test.
        let reviewer = TokenReviewer::new(&api, service.mesh.trust_domain.clone())
            .unwrap()
            .with_timeout(Duration::from_secs(3600));
        let service = Arc::new(service.with_token_reviewer(Some(Arc::new(reviewer))));

        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let certify_from = |client: &str, subject: &str| {
            let payload = format!(r#"{{"aud":["trellis"],"exp":4102444800,"sub":"{subject}"}}"#);
            let token = format!("{}.{}.c2ln", b64(r#"{"alg":"RS256"}"#), b64(&payload));
            let mut request =
                certify_request(Some(Proof::ServiceAccountToken(token)), "10.0.0.1:15006");
            request.extensions_mut().insert(PeerInfo {
                activity: Default::default(),
                remote: format!("{client}:40000").parse().unwrap(),
                spiffe_id: None,
                cert_issued_at_unix: None,
                presented: None,
            });
            let service = service.clone();
            async move { service.certify(request).await }
        };
        let mut held = tokio::task::JoinSet::new();
        for i in 0..MAX_REVIEWS_PER_CLIENT {
            held.spawn(certify_from("10.0.0.1", &format!("made-up-{i}")));
        }
        // The first connection is the fetch of the issuer keys, never
        // answered either.
        let opened = async {
            while accepted.load(Ordering::SeqCst) < MAX_REVIEWS_PER_CLIENT + 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), opened)
            .await
            .expect("each review's connection opened within a minute");
        let refused = certify_from("10.0.0.1", "one-more")
            .now_or_never()
            .expect("refused at once, not waiting for a turn")
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(
            refused.message(),
            format!(
                "this client address already has {MAX_REVIEWS_PER_CLIENT} service account token \
                 reviews in progress, the most one address may have at once; try again once \
                 they are answered"
            )
        );
        assert_eq!(
            refused.metadata().get(REFUSAL_KEY).unwrap(),
            "token_reviews_per_client"
        );
        let metrics = service.mesh.metrics.render();
        assert!(
            metrics.contains(
                "trellis_certify_failures_total{reason=\"token_reviews_per_client\"} 1\n"
            ),
            "{metrics}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), MAX_REVIEWS_PER_CLIENT + 1);

        // Another address's review is asked.
        held.spawn(certify_from("10.0.0.2", "a-new-pod"));
        while accepted.load(Ordering::SeqCst) < MAX_REVIEWS_PER_CLIENT + 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        held.abort_all();
    }

    /// A caller that goes away while its issuance waits for the commit
    /// (a reset stream, a deadline) drops the Certify future; the writer
    /// still commits a renewal, and discovery must still publish the
    /// endpoint it added.
    #[tokio::test]
    async fn a_renewal_dropped_before_its_commit_still_reaches_discovery() {
        let tmp = tempfile::tempdir().unwrap();
        let Setup {
            service,
            store,
            discovery,
            ..
        } = setup(&tmp);
        let web = SpiffeId::parse(WEB).unwrap();
        let before = discovery.current_version();
        let mut versions = discovery.subscribe();

        // Commits wait until the held transaction ends, so the issuance is
        // queued and unanswered when the caller goes away.
        let held = store.hold_writes();
        let mut request = certify_request(None, "10.0.0.1:15006");
        request.extensions_mut().insert(PeerInfo {
            activity: Default::default(),
            remote: "10.0.0.1:40000".parse().unwrap(),
            spiffe_id: Some(web.clone()),
            cert_issued_at_unix: None,
            presented: None,
        });
        let mut certify = Box::pin(service.certify(request));
        assert!(
            matches!(futures::poll!(certify.as_mut()), Poll::Pending),
            "the issuance waits for its commit"
        );
        drop(certify);
        held.abort().unwrap();

        tokio::time::timeout(Duration::from_secs(10), versions.changed())
            .await
            .expect("discovery announces the committed issuance")
            .unwrap();
        let view = discovery.view();
        assert!(view.version > before);
        assert_eq!(view.version, store.snapshot_version().unwrap());
        let listed: Vec<(&str, &str)> = view
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.spiffe_id.as_str()))
            .collect();
        assert_eq!(listed, [("10.0.0.1:15006", web.as_str())]);
    }

    /// A first Certify that goes away before its commit (its deadline
    /// passed while the store was slow) leaves its join token unused, so
    /// its retry with the same token gets the certificate.
    #[tokio::test]
    async fn a_join_token_whose_caller_went_away_is_left_for_its_retry() {
        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, store, .. } = setup(&tmp);
        let held = store.hold_writes();
        let mut certify =
            Box::pin(service.certify(certify_request(join_token(), "10.0.0.1:15006")));
        assert!(matches!(futures::poll!(certify.as_mut()), Poll::Pending));
        drop(certify);
        held.abort().unwrap();

        let retry = tokio::time::timeout(
            Duration::from_secs(10),
            service.certify(certify_request(join_token(), "10.0.0.1:15006")),
        )
        .await
        .expect("the retry is answered");
        let issued = retry
            .expect("the token was left for the retry")
            .into_inner();
        assert_eq!(issued.spiffe_id, WEB);
        assert!(!issued.chain.is_empty());
        let again = service
            .certify(certify_request(join_token(), "10.0.0.1:15006"))
            .await
            .unwrap_err();
        assert_eq!(again.message(), "join token was already used");
    }

    /// A refusal is logged as `certify refused` with the status text as
    /// its detail, in JSON as in text, on one line even when the caller's
    /// input holds a newline.
    #[tokio::test]
    async fn a_refusal_is_logged_under_its_own_message() {
        for json in [true, false] {
            // A service of its own: a reason is logged once per pause.
            let tmp = tempfile::tempdir().unwrap();
            let Setup { service, .. } = setup(&tmp);
            let (logs, guard) = crate::test_logs::capture(json);
            let refused = service
                .certify(certify_request(join_token(), "10.0.0.1:1\nforged"))
                .await
                .unwrap_err();
            drop(guard);
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
            let text = logs.text();
            let line = text
                .lines()
                .find(|l| l.contains("certify refused"))
                .unwrap_or_else(|| panic!("no `certify refused` line in {text:?}"));
            assert!(!text.contains("\nforged"), "{text:?}");
            if json {
                let line: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(line["fields"]["message"], "certify refused", "{line}");
                let detail = line["fields"]["detail"].as_str().unwrap();
                assert!(detail.contains("inbound_addresses[0]"), "{line}");
            } else {
                assert!(line.contains("detail="), "{line}");
            }
        }
    }

    /// Refusals for one reason (a caller repeating a bad request) are
    /// each counted but logged once per [`REFUSAL_LOG_PAUSE`]; the next
    /// line after it says how many were not. Another reason has a line of
    /// its own.
    #[tokio::test]
    async fn refusals_are_logged_once_per_reason_per_pause() {
        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, .. } = setup(&tmp);
        let (logs, _guard) = crate::test_logs::capture(false);
        for _ in 0..5 {
            let refused = service
                .certify(certify_request(join_token(), "not an address"))
                .await
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        }
        let reason_lines = |reason: &str| {
            let text = logs.text();
            let reason = format!("reason=\"{reason}\"");
            text.lines()
                .filter(|l| l.contains("certify refused") && l.contains(&reason))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let lines = reason_lines("bad_inbound_address");
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(!lines[0].contains("suppressed"), "{}", lines[0]);
        assert!(
            service
                .mesh
                .metrics
                .render()
                .contains("trellis_certify_failures_total{reason=\"bad_inbound_address\"} 5\n"),
            "each refusal counted"
        );

        tokio::time::pause();
        tokio::time::advance(REFUSAL_LOG_PAUSE).await;
        tokio::time::resume();
        service
            .certify(certify_request(join_token(), "not an address"))
            .await
            .unwrap_err();
        let lines = reason_lines("bad_inbound_address");
        assert_eq!(lines.len(), 2, "{lines:#?}");
        assert!(lines[1].contains("suppressed=4"), "{}", lines[1]);
    }

    /// Which reported addresses the connection's IP verifies, which are
    /// taken unverified and which are refused.
    #[test]
    fn reported_addresses_are_checked_against_the_connection() {
        let check = |reported: &[&str], from: Option<&str>, trust: bool| {
            let reported = reported.iter().map(|a| a.to_string()).collect();
            let from = from.map(|ip| ip.parse::<IpAddr>().unwrap());
            check_sources(reported, from, trust)
        };
        let owned = |pairs: &[(&str, bool)]| -> Vec<(String, bool)> {
            pairs.iter().map(|(a, v)| (a.to_string(), *v)).collect()
        };
        let refused = |pairs: &[(&str, &'static str)]| -> Vec<(String, &'static str)> {
            pairs.iter().map(|(a, r)| (a.to_string(), *r)).collect()
        };
        // Its own address, with the other family's beside it.
        assert_eq!(
            check(
                &["10.0.0.1:15006", "[fd00::1]:15006"],
                Some("10.0.0.1"),
                false
            ),
            (
                owned(&[("10.0.0.1:15006", true), ("[fd00::1]:15006", false)]),
                vec![]
            )
        );
        assert_eq!(
            check(
                &["10.0.0.1:15006", "[fd00::1]:15006"],
                Some("fd00::1"),
                false
            ),
            (
                owned(&[("10.0.0.1:15006", false), ("[fd00::1]:15006", true)]),
                vec![]
            )
        );
        // Another IP of the family it came over, or only addresses it did
        // not come from: refused.
        assert_eq!(
            check(
                &["10.0.0.1:15006", "10.0.0.2:15006"],
                Some("10.0.0.1"),
                false
            ),
            (
                owned(&[("10.0.0.1:15006", true)]),
                refused(&[("10.0.0.2:15006", UNVERIFIED)])
            )
        );
        assert_eq!(
            check(
                &["10.0.0.2:15006", "[fd00::2]:15006"],
                Some("10.0.0.1"),
                false
            ),
            (
                vec![],
                refused(&[
                    ("10.0.0.2:15006", UNVERIFIED),
                    ("[fd00::2]:15006", UNVERIFIED)
                ])
            )
        );
        assert_eq!(
            check(&["10.0.0.1:15006"], None, false),
            (vec![], refused(&[("10.0.0.1:15006", UNVERIFIED)]))
        );
        // Loopback means "this host": taken from a sidecar on the control
        // plane's own host, which connects over loopback (any loopback IP,
        // either family)...
        assert_eq!(
            check(
                &[
                    "127.0.0.1:7001",
                    "[::1]:7001",
                    "127.0.0.2:7001",
                    "[fd00::1]:1"
                ],
                Some("127.0.0.1"),
                false
            ),
            (
                owned(&[
                    ("127.0.0.1:7001", true),
                    ("[::1]:7001", false),
                    ("127.0.0.2:7001", false)
                ]),
                refused(&[("[fd00::1]:1", UNVERIFIED)])
            )
        );
        // ...and from nowhere else, not even beside the connection's own IP
        // as the other family's address, nor from an unknown source.
        assert_eq!(
            check(
                &["10.0.0.9:7001", "127.0.0.1:7001", "[::1]:7001"],
                Some("10.0.0.9"),
                false
            ),
            (
                owned(&[("10.0.0.9:7001", true)]),
                refused(&[("127.0.0.1:7001", LOOPBACK), ("[::1]:7001", LOOPBACK)])
            )
        );
        assert_eq!(
            check(&["127.0.0.1:7001"], None, false),
            (vec![], refused(&[("127.0.0.1:7001", LOOPBACK)]))
        );
        // Trusted: everything as reported, verified only where it is.
        assert_eq!(
            check(
                &["10.0.0.2:15006", "10.0.0.1:1", "127.0.0.1:15006"],
                Some("10.0.0.1"),
                true
            ),
            (
                owned(&[
                    ("10.0.0.2:15006", false),
                    ("10.0.0.1:1", true),
                    ("127.0.0.1:15006", false)
                ]),
                vec![]
            )
        );
    }

    /// A Certify from `remote` for [`WEB`] with `proof` (a renewal when
    /// `None`), reporting `addresses`: the addresses the answer says were
    /// not recorded, each with its reason.
    async fn certify_from(
        service: &IdentityService,
        remote: &str,
        proof: Option<Proof>,
        addresses: &[&str],
    ) -> Vec<(String, String)> {
        let renewal = proof.is_none();
        let mut request = certify_request(proof, "");
        request.get_mut().inbound_addresses = addresses.iter().map(|a| a.to_string()).collect();
        request.extensions_mut().insert(PeerInfo {
            activity: Default::default(),
            remote: remote.parse().unwrap(),
            spiffe_id: renewal.then(|| SpiffeId::parse(WEB).unwrap()),
            cert_issued_at_unix: None,
            presented: None,
        });
        let answer = service.certify(request).await.expect("a certificate");
        answer
            .into_inner()
            .refused_inbound_addresses
            .into_iter()
            .map(|r| (r.address, r.reason))
            .collect()
    }

    /// A loopback address means "this host". A sidecar on another host
    /// (here a Certify whose connection came from 10.0.0.9) that reports
    /// one is refused it, with the reason `loopback`, logged and counted,
    /// and nothing is recorded at it; its own address is, and so is a
    /// loopback address reported over loopback (a sidecar on the control
    /// plane's own host, as in the single-machine demo).
    #[tokio::test]
    async fn a_loopback_address_is_recorded_only_from_a_certify_over_loopback() {
        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, store, .. } = setup(&tmp);
        let (logs, guard) = crate::test_logs::capture(false);
        let not_recorded = certify_from(
            &service,
            "10.0.0.9:40000",
            join_token(),
            &["10.0.0.9:15006", "127.0.0.1:15006", "[::1]:15006"],
        )
        .await;
        drop(guard);
        let loopback = |a: &str| (a.to_owned(), "loopback".to_owned());
        assert_eq!(
            not_recorded,
            [loopback("127.0.0.1:15006"), loopback("[::1]:15006")]
        );
        let stored = |store: &EmbeddedStore| -> Vec<String> {
            let workloads = store.workloads().unwrap();
            assert_eq!(workloads.len(), 1);
            workloads[0]
                .addresses
                .iter()
                .map(|a| a.address.clone())
                .collect()
        };
        assert_eq!(stored(&store), ["10.0.0.9:15006"]);
        assert!(
            service
                .mesh
                .metrics
                .render()
                .contains("trellis_inbound_addresses_refused_total{reason=\"loopback\"} 2\n"),
            "{}",
            service.mesh.metrics.render()
        );
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains("inbound address not recorded") && l.contains("[::1]:15006"))
            .unwrap_or_else(|| panic!("no refusal logged in {text:?}"));
        assert!(
            line.contains("reason=\"loopback\"") && line.contains("connected_from=10.0.0.9"),
            "{line}"
        );

        let from_this_host = certify_from(
            &service,
            "127.0.0.1:40001",
            None,
            &["127.0.0.1:15006", "[::1]:15006"],
        )
        .await;
        assert_eq!(from_this_host, []);
        let mut addresses = stored(&store);
        addresses.sort();
        assert_eq!(
            addresses,
            ["10.0.0.9:15006", "127.0.0.1:15006", "[::1]:15006"]
        );
    }

    /// An IPv4-mapped address is stored as the IPv4 address it is, so it
    /// cannot stand beside that address as another owner's.
    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_address() {
        assert_eq!(
            inbound_address("f", "[::ffff:10.0.0.1]:15006").unwrap(),
            "10.0.0.1:15006"
        );
        assert_eq!(
            inbound_address("f", "[fd00:0::1]:15006").unwrap(),
            "[fd00::1]:15006"
        );
        assert!(inbound_address("f", "[::ffff:0.0.0.0]:15006").is_err());
    }

    /// A made-up token is refused before anything is signed or queued: the
    /// answer does not wait for the store's writer.
    #[tokio::test]
    async fn an_unknown_join_token_is_refused_without_waiting_for_a_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, store, .. } = setup(&tmp);
        let _held = store.hold_writes();
        let proof = Some(Proof::JoinToken("made-up".into()));
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            service.certify(certify_request(proof, "10.0.0.1:15006")),
        )
        .await
        .expect("answered while the writer is busy")
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert_eq!(refused.message(), "join token is unknown");
    }

    /// A revoke whose commit waits for the store past the second it was
    /// asked in, and a renewal by the stolen certificate in that wait: the
    /// renewal read no revocation, yet gets no certificate the revocation
    /// does not cover. It is refused in the issuance's transaction as a
    /// revoked caller is, or (recorded before the revocation) gets one
    /// issued before it.
    #[tokio::test]
    async fn a_renewal_racing_a_revoke_gets_no_certificate_the_revocation_misses() {
        use trellis_proto::admin::v1::RevokeIdentityRequest;
        use trellis_proto::admin::v1::admin_server::Admin;

        use crate::api::admin::AdminService;
        use crate::api::replica::Replicas;
        use crate::server::{ServingCert, peer_client_config};

        let tmp = tempfile::tempdir().unwrap();
        let Setup { service, store, .. } = setup(&tmp);
        let mesh = service.mesh.clone();
        let serving = ServingCert::new(mesh.ca.clone(), &[], [127, 0, 0, 1].into()).unwrap();
        let tls = peer_client_config(&mesh.ca, serving).unwrap();
        let replicas = Replicas::new(None, "127.0.0.1:15012".into(), vec![], tls);
        let admin = AdminService::new(mesh, Arc::new(replicas));

        let held = store.hold_writes();
        let revoke = tokio::spawn(async move {
            let request = RevokeIdentityRequest {
                spiffe_id: WEB.into(),
                reason: "key copied".into(),
            };
            admin.revoke_identity(Request::new(request)).await
        });
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let mut request = certify_request(None, "10.0.0.1:15006");
        request.extensions_mut().insert(PeerInfo {
            activity: Default::default(),
            remote: "10.0.0.1:40000".parse().unwrap(),
            spiffe_id: Some(SpiffeId::parse(WEB).unwrap()),
            cert_issued_at_unix: Some(unix_now() - 600),
            presented: None,
        });
        let renewal = tokio::spawn(async move { service.certify(request).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let released_at = unix_now();
        held.abort().unwrap();

        let wait = Duration::from_secs(10);
        let revoked = tokio::time::timeout(wait, revoke).await.unwrap().unwrap();
        let revocation = revoked.unwrap().into_inner().revocation.unwrap();
        assert!(
            revocation.revoked_at_unix >= released_at,
            "stamped when stored, not when asked: {} < {released_at}",
            revocation.revoked_at_unix
        );
        let renewed = tokio::time::timeout(wait, renewal).await.unwrap().unwrap();
        let logged = store.newest_issued(1, &|_| true).unwrap();
        match renewed {
            Err(refused) => {
                assert_eq!(refused.code(), tonic::Code::PermissionDenied);
                let expected = format!("{WEB} was revoked at ");
                assert!(refused.message().starts_with(&expected), "{refused:?}");
                assert!(
                    refused
                        .message()
                        .contains(&revocation.revoked_at_unix.to_string()),
                    "{refused:?}"
                );
                assert_eq!(
                    refused.metadata().get(REFUSAL_KEY).unwrap(),
                    trellis_core::grpc::REFUSAL_REVOKED
                );
                assert!(logged.is_empty(), "recorded nothing: {logged:?}");
            }
            Ok(_) => {
                let issued_at = logged[0].issued_at_unix;
                assert!(
                    issued_at <= revocation.revoked_at_unix,
                    "renewed with a certificate issued at {issued_at}, after the revocation \
                     at {}",
                    revocation.revoked_at_unix
                );
            }
        }
    }
}
