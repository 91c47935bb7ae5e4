//! `trellis.admin.v1.Admin`: the operators' API. Guarded by
//! [`super::OnlyCaller::admin`], so every method here runs for the admin identity
//! only. A token is returned once and never logged; only its hash is stored.
//! The policy methods live in [`super::policy`]. Every call that changes
//! state logs its success naming its `caller`, as a refused call's line
//! does, so the log says who changed what.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};
use trellis_core::SpiffeId;
use trellis_proto::admin::v1::admin_server::Admin;
use trellis_proto::admin::v1::{
    ApplyPolicyRequest, ApplyPolicyResponse, CreateJoinTokenRequest, CreateJoinTokenResponse,
    DeletePolicyRequest, DeletePolicyResponse, ExplainRequest, ExplainResponse, GetPolicyRequest,
    GetPolicyResponse, IssuedCertificate, ListIssuedCertificatesRequest,
    ListIssuedCertificatesResponse, ListPoliciesRequest, ListPoliciesResponse,
    ListRevocationsRequest, ListRevocationsResponse, ListStreamsRequest, ListWorkloadsRequest,
    ListWorkloadsResponse, RevokeIdentityRequest, RevokeIdentityResponse, UnrevokeIdentityRequest,
    UnrevokeIdentityResponse, Workload,
};

use super::admin_calls::Caller;
use super::replica::{Certificate, Replicas};
use super::{Mesh, policy};
use crate::authn::{DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL, new_join_token};
use crate::ca::csr::is_reserved;
use crate::store::{IssuedCertRecord, JoinToken, Revocation, StoreError};
use crate::unix_now;

pub struct AdminService {
    mesh: Mesh,
    replicas: Arc<Replicas>,
}

impl AdminService {
    /// `replicas` is this replica and the peers `ListWorkloads` asks.
    pub fn new(mesh: Mesh, replicas: Arc<Replicas>) -> Self {
        Self { mesh, replicas }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

/// A store error as a status: FAILED_PRECONDITION for what the store does
/// not keep, as [`StoreError::into_status`] otherwise.
fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::RevocationsUnsupported => Status::failed_precondition(e.to_string()),
        other => other.into_status(),
    }
}

/// The longest reason a revocation keeps, in bytes.
pub const MAX_REVOCATION_REASON_BYTES: usize = 1024;

/// The largest Admin request read, in bytes. The largest an operator
/// sends is an ApplyPolicy of many policies at once, each well under a
/// few KiB (a selector of thousands of SPIFFE IDs is a few hundred KiB;
/// no document may hold more than 50,000 YAML nodes); this is gRPC's
/// usual 4 MiB, so every request read before is read still. A larger
/// request is
/// refused as its length prefix arrives, with RESOURCE_EXHAUSTED naming
/// the call and this limit (`an ApplyPolicy request may be at most ...
/// bytes; this one is larger`), and nothing is applied.
pub const MAX_ADMIN_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// Who made `request`: the SPIFFE ID of its client certificate, which
/// its success line names ([`Caller`]).
fn caller_of<T>(request: &Request<T>) -> Option<SpiffeId> {
    super::peer_of(request).and_then(|p| p.spiffe_id.clone())
}

impl AdminService {
    /// `raw` as the SPIFFE ID of a workload of this trust domain, or
    /// INVALID_ARGUMENT naming what is wrong with it.
    fn workload_id(&self, raw: &str) -> Result<SpiffeId, Status> {
        let id = workload_id(raw).map_err(|e| {
            Status::invalid_argument(format!("spiffe_id {}: {e}", super::quoted(raw)))
        })?;
        if !id.is_member_of(&self.mesh.trust_domain) {
            return Err(Status::invalid_argument(format!(
                "spiffe_id {id} is outside trust domain {}",
                self.mesh.trust_domain
            )));
        }
        Ok(id)
    }
}

/// `raw` as the SPIFFE ID of a workload of some trust domain, or why it is
/// not one: the checks of the Admin API's `spiffe_id` fields that need no
/// trust domain, which `trellisctl` makes before any call.
pub fn workload_id(raw: &str) -> Result<SpiffeId, String> {
    let id = SpiffeId::parse(raw).map_err(|e| e.to_string())?;
    if id.path().is_empty() {
        return Err(
            "it names the trust domain itself: a workload's ID has a path (spiffe://TD/ns/NS/sa/SA)"
                .into(),
        );
    }
    if is_reserved(&id) {
        return Err("it is reserved for the control plane".into());
    }
    Ok(id)
}

/// A revocation's reason as given, or why it is refused: at most
/// [`MAX_REVOCATION_REASON_BYTES`], no control characters and no invisible
/// format characters (`is_format`: listings print it as it is, and a
/// bidi override would make it read otherwise than it is).
pub fn revocation_reason(reason: &str) -> Result<&str, String> {
    if reason.len() > MAX_REVOCATION_REASON_BYTES {
        return Err(format!(
            "reason is {} bytes long; at most {MAX_REVOCATION_REASON_BYTES} are kept",
            reason.len()
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err(format!(
            "reason {} holds a control character; give one line of text",
            super::quoted(reason)
        ));
    }
    if let Some(c) = reason.chars().find(|&c| is_format(c)) {
        return Err(format!(
            "reason {} holds the invisible format character U+{:04X}; give plain text",
            super::quoted(reason),
            u32::from(c)
        ));
    }
    Ok(reason)
}

/// Whether `c` is an invisible format character (Unicode category Cf):
/// bidi embeddings, overrides, isolates and marks, zero-width characters,
/// the byte order mark, invisible operators and the like.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{AD}'
            | '\u{600}'..='\u{605}'
            | '\u{61C}'
            | '\u{6DD}'
            | '\u{70F}'
            | '\u{890}'..='\u{891}'
            | '\u{8E2}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{110BD}'
            | '\u{110CD}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

fn revocation_proto(r: Revocation) -> trellis_proto::admin::v1::Revocation {
    trellis_proto::admin::v1::Revocation {
        spiffe_id: r.spiffe_id,
        revoked_at_unix: r.revoked_at_unix,
        reason: r.reason,
    }
}

/// How many issued certificates a listing returns when it names no limit.
pub const ISSUED_DEFAULT_LIMIT: usize = 100;
/// The most issued certificates one listing returns.
pub const ISSUED_MAX_LIMIT: usize = 10_000;

/// A serial number as the issued-certificate log keeps it (lowercase hex,
/// no separators), from hex in any case with or without colons; `None`
/// for an empty one.
pub fn normalize_serial(serial: &str) -> Result<Option<String>, String> {
    let hex: String = serial
        .trim()
        .chars()
        .filter(|&c| c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() {
        return Ok(None);
    }
    if !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "serial {} is not a serial number: hex digits, with or without colons, \
             such as 4A:3B:00:FF (as `openssl x509 -serial` prints it)",
            super::quoted(serial)
        ));
    }
    Ok(Some(hex))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let caller = caller_of(&request);
        let req = request.into_inner();
        let id = self.workload_id(&req.spiffe_id)?;
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds {} exceeds the maximum of {}",
                req.ttl_seconds,
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        let new = new_join_token();
        let now = unix_now();
        let expires_at_unix = now + ttl.as_secs() as i64;
        let record = JoinToken {
            spiffe_id: id.to_string(),
            expires_at_unix,
            used: false,
        };
        let store = self.mesh.store.clone();
        let hash = new.hash;
        tokio::task::spawn_blocking(move || store.add_join_token(&hash, &record, now))
            .await
            .map_err(internal)?
            .map_err(|e| match e {
                StoreError::Token(refusal) => Status::failed_precondition(refusal.to_string()),
                other => other.into_status(),
            })?;
        tracing::info!(
            spiffe_id = %id,
            expires_at = expires_at_unix,
            caller = %Caller(caller.as_ref()),
            "created a join token"
        );
        Ok(Response::new(CreateJoinTokenResponse {
            token: new.token,
            expires_at_unix,
        }))
    }

    async fn list_workloads(
        &self,
        request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let store = self.mesh.store.clone();
        let (records, revocations) = tokio::task::spawn_blocking(move || {
            let records = store.workloads()?;
            Ok::<_, StoreError>((records, revocations_or_none(store.as_ref())?))
        })
        .await
        .map_err(internal)?
        .map_err(internal)?;
        let current = self.mesh.discovery.current();
        let asked = ListStreamsRequest {
            reached_version: request.get_ref().reached_version,
            reached_position: request.get_ref().reached_position,
        };
        let fleet = self.replicas.fleet(&self.mesh, asked).await;
        let now = crate::unix_now();
        let lifetime = i64::try_from(self.mesh.cert_ttl.as_secs()).unwrap_or(i64::MAX);
        let workloads = records
            .into_iter()
            .map(|w| {
                let status = fleet.status(&w.spiffe_id);
                let addresses = w.listed_addresses(now);
                let (mut cert_expiry_unknown, mut no_certificate_since_unix) = (String::new(), 0);
                let mut cert_renewal_unknown = String::new();
                let (cert_issued_at_unix, cert_expires_at_unix) = match fleet.logged {
                    false => (w.cert_issued_at_unix, w.cert_expires_at_unix),
                    true => match fleet.certificate(&w.spiffe_id, now, lifetime) {
                        Certificate::ExpiresAt {
                            issued_at,
                            not_after,
                            maybe_newer,
                        } => {
                            cert_renewal_unknown = maybe_newer.unwrap_or_default();
                            (issued_at, not_after)
                        }
                        Certificate::NoneSince(since) => {
                            no_certificate_since_unix = since;
                            (0, 0)
                        }
                        Certificate::Unknown(why) => {
                            cert_expiry_unknown = why;
                            (0, i64::MAX)
                        }
                    },
                };
                // A certificate of unknown issue time is covered, as a
                // renewal by it would be.
                let revoked = revoked(&revocations, &w.spiffe_id, cert_issued_at_unix);
                Workload {
                    revoked,
                    connected: status.streams > 0,
                    acked_version: status.acked_version,
                    synced_version: status.synced_version,
                    acked_version_epoch: status.acked_epoch,
                    synced_version_epoch: status.synced_epoch,
                    sync: status.sync.into(),
                    last_nack: status.last_nack,
                    ack_warnings: status.ack_warnings,
                    opaque_ports: fleet.declared_opaque_ports(&w.spiffe_id),
                    reached: status.reached,
                    replicas: status.replicas,
                    spiffe_id: w.spiffe_id,
                    address: addresses.first().cloned().unwrap_or_default(),
                    addresses,
                    cert_expires_at_unix,
                    cert_expiry_unknown,
                    no_certificate_since_unix,
                    cert_issued_at_unix,
                    cert_renewal_unknown,
                }
            })
            .collect();
        Ok(Response::new(ListWorkloadsResponse {
            workloads,
            snapshot_version: current.version,
            snapshot_version_epoch: current.epoch,
            uninjected_pods: fleet.uninjected_pods(),
            replicas: fleet.replicas,
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<ApplyPolicyRequest>,
    ) -> Result<Response<ApplyPolicyResponse>, Status> {
        let caller = caller_of(&request);
        policy::apply(&self.mesh, request.into_inner(), caller.as_ref())
            .await
            .map(Response::new)
    }

    async fn get_policy(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        policy::get(&self.mesh, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_policies(
        &self,
        _request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        policy::list(&self.mesh).await.map(Response::new)
    }

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let caller = caller_of(&request);
        policy::delete(&self.mesh, request.into_inner(), caller.as_ref())
            .await
            .map(Response::new)
    }

    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        policy::explain_request(&self.mesh, &self.replicas, request.get_ref())
            .await
            .map(Response::new)
    }

    async fn revoke_identity(
        &self,
        request: Request<RevokeIdentityRequest>,
    ) -> Result<Response<RevokeIdentityResponse>, Status> {
        let caller = caller_of(&request);
        let req = request.into_inner();
        let id = self.workload_id(&req.spiffe_id)?;
        let reason = revocation_reason(&req.reason).map_err(Status::invalid_argument)?;
        let store = self.mesh.store.clone();
        let (key, reason) = (id.to_string(), reason.to_owned());
        // Stamped in the store's transaction: a renewal recorded after it
        // sees it, and of two revokes the one committed last holds the
        // later time.
        let discovery = self.mesh.discovery.clone();
        // The whole view is read again: off the runtime's threads, as a
        // policy write does.
        let (revocation, previous, issued) = tokio::task::spawn_blocking(move || {
            let (revocation, previous) = store.revoke(&key, &reason)?;
            // The sidecars are sent it: they refuse its certificates as peers.
            super::policy::refresh_after_write(&discovery);
            // Only words a warning: the revocation is stored whatever it says.
            let issued = store.issued_to(&key);
            Ok::<_, StoreError>((revocation, previous, issued))
        })
        .await
        .map_err(internal)?
        .map_err(store_status)?;
        // Revoking ahead is allowed, but a misspelt ID revokes nothing that
        // exists: said, not refused.
        let warnings = match issued {
            Ok(true) => Vec::new(),
            Ok(false) => vec![format!(
                "no certificate has been issued to {id} by this control plane: check the \
                 spelling of the SPIFFE ID (the revocation is stored all the same)"
            )],
            Err(e) => {
                tracing::warn!(spiffe_id = %id, error = %e, "revoked, but whether a certificate was ever issued to it could not be read");
                Vec::new()
            }
        };
        tracing::info!(
            spiffe_id = %id,
            revoked_at = revocation.revoked_at_unix,
            reason = %revocation.reason,
            caller = %Caller(caller.as_ref()),
            "revoked an identity: its certificates issued until now no longer renew, and sidecars refuse them as peers"
        );
        // Certificates are issued in whole seconds: one issued later in
        // this second could not be told from one issued before the
        // revocation, and would not renew. Once the second is over, every
        // certificate issued after this answer renews.
        let next_second = UNIX_EPOCH + Duration::from_secs(revocation.revoked_at_unix as u64 + 1);
        if let Ok(left) = next_second.duration_since(SystemTime::now()) {
            tokio::time::sleep(left).await;
        }
        Ok(Response::new(RevokeIdentityResponse {
            previously_revoked_at_unix: previous.map_or(0, |p| p.revoked_at_unix),
            revocation: Some(revocation_proto(revocation)),
            warnings,
        }))
    }

    async fn unrevoke_identity(
        &self,
        request: Request<UnrevokeIdentityRequest>,
    ) -> Result<Response<UnrevokeIdentityResponse>, Status> {
        let caller = caller_of(&request);
        let req = request.into_inner();
        let id = self.workload_id(&req.spiffe_id)?;
        let store = self.mesh.store.clone();
        let key = id.to_string();
        let discovery = self.mesh.discovery.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let removed = store.unrevoke(&key)?;
            if removed.is_some() {
                super::policy::refresh_after_write(&discovery);
            }
            Ok::<_, StoreError>(removed)
        })
        .await
        .map_err(internal)?
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("{id} is not revoked")))?;
        tracing::info!(
            spiffe_id = %id,
            revoked_at = removed.revoked_at_unix,
            caller = %Caller(caller.as_ref()),
            "removed an identity's revocation: its certificates renew again"
        );
        Ok(Response::new(UnrevokeIdentityResponse {
            revocation: Some(revocation_proto(removed)),
        }))
    }

    async fn list_revocations(
        &self,
        _request: Request<ListRevocationsRequest>,
    ) -> Result<Response<ListRevocationsResponse>, Status> {
        let store = self.mesh.store.clone();
        let revocations = tokio::task::spawn_blocking(move || store.revocations())
            .await
            .map_err(internal)?
            .map_err(store_status)?;
        Ok(Response::new(ListRevocationsResponse {
            revocations: revocations.into_iter().map(revocation_proto).collect(),
        }))
    }

    async fn list_issued_certificates(
        &self,
        request: Request<ListIssuedCertificatesRequest>,
    ) -> Result<Response<ListIssuedCertificatesResponse>, Status> {
        let request = request.into_inner();
        let here = issued_here(&self.mesh, &request, &self.replicas.name).await?;
        Ok(Response::new(self.replicas.issued(here, request).await))
    }
}

/// The newest `limit` certificates of this replica's issued-certificate
/// log that `request` selects (`limit` of [`issued_limit`]), each named as
/// issued by `replica`; INVALID_ARGUMENT for a malformed SPIFFE ID or
/// serial.
pub async fn issued_here(
    mesh: &Mesh,
    request: &ListIssuedCertificatesRequest,
    replica: &str,
) -> Result<ListIssuedCertificatesResponse, Status> {
    if !request.spiffe_id.is_empty() {
        SpiffeId::parse(&request.spiffe_id).map_err(|e| {
            Status::invalid_argument(format!(
                "spiffe_id {}: {e}",
                super::quoted(&request.spiffe_id)
            ))
        })?;
    }
    let serial = normalize_serial(&request.serial).map_err(Status::invalid_argument)?;
    let limit = issued_limit(request);
    let store = mesh.store.clone();
    let spiffe_id = request.spiffe_id.clone();
    // One more than the limit tells whether more match.
    let (mut records, revocations) = tokio::task::spawn_blocking(move || {
        let records = store.newest_issued(limit + 1, &|r| {
            (spiffe_id.is_empty() || r.spiffe_id == spiffe_id)
                && serial.as_ref().is_none_or(|s| &r.serial_hex == s)
        })?;
        Ok::<_, StoreError>((records, revocations_or_none(store.as_ref())?))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let truncated = records.len() > limit;
    records.truncate(limit);
    let certificates = records
        .into_iter()
        .map(|r| {
            let revoked = revoked(&revocations, &r.spiffe_id, r.issued_at_unix);
            IssuedCertificate {
                revoked,
                ..issued_certificate(r, replica)
            }
        })
        .collect();
    Ok(ListIssuedCertificatesResponse {
        certificates,
        truncated,
        replicas: Vec::new(),
    })
}

/// Every revocation `store` keeps, by SPIFFE ID; none for a store that
/// keeps none.
fn revocations_or_none(
    store: &dyn crate::store::Store,
) -> Result<HashMap<String, Revocation>, StoreError> {
    let revocations = match store.revocations() {
        Err(StoreError::RevocationsUnsupported) => Vec::new(),
        revocations => revocations?,
    };
    Ok((revocations.into_iter())
        .map(|r| (r.spiffe_id.clone(), r))
        .collect())
}

/// Whether a certificate of `id` issued at `issued_at_unix` is covered by
/// its identity's revocation in `revocations`.
fn revoked(revocations: &HashMap<String, Revocation>, id: &str, issued_at_unix: i64) -> bool {
    (revocations.get(id)).is_some_and(|r| r.covers(issued_at_unix))
}

/// A stored issuance as the Admin API lists it, issued by `replica`
/// (empty: the replica answering).
pub(super) fn issued_certificate(r: IssuedCertRecord, replica: &str) -> IssuedCertificate {
    IssuedCertificate {
        serial: r.serial_hex,
        spiffe_id: r.spiffe_id,
        issued_at_unix: r.issued_at_unix,
        not_after_unix: r.not_after_unix,
        replica: replica.to_owned(),
        revoked: false,
    }
}

/// How many certificates `request` asks for at most.
pub fn issued_limit(request: &ListIssuedCertificatesRequest) -> usize {
    match request.limit {
        0 => ISSUED_DEFAULT_LIMIT,
        n => (n as usize).min(ISSUED_MAX_LIMIT),
    }
}

#[cfg(test)]
mod tests {
    use super::{normalize_serial, revocation_reason};

    /// A reason is printed as it is: one holding a bidi override or a
    /// zero-width character is refused, naming the character's code point.
    #[test]
    fn a_reason_with_an_invisible_format_character_is_refused() {
        for (reason, named) in [
            ("key \u{202E}deipoc", "U+202E"),
            ("\u{2066}copied\u{2069}", "U+2066"),
            ("key\u{200B}copied", "U+200B"),
            ("\u{FEFF}key copied", "U+FEFF"),
            ("key copied\u{200F}", "U+200F"),
        ] {
            let err = revocation_reason(reason).unwrap_err();
            assert!(
                err.ends_with(&format!(
                    "holds the invisible format character {named}; give plain text"
                )),
                "{reason:?}: {err}"
            );
        }
        assert_eq!(
            revocation_reason("clé copiée, ключ 複製").unwrap(),
            "clé copiée, ключ 複製"
        );
    }

    #[test]
    fn serials_read_as_openssl_and_the_log_write_them() {
        assert_eq!(
            normalize_serial(" 4A:3b:00:FF ").unwrap().as_deref(),
            Some("4a3b00ff")
        );
        assert_eq!(normalize_serial("").unwrap(), None);
        let err = normalize_serial("serial=4A3B").unwrap_err();
        assert!(err.contains("serial=4A3B"), "{err}");
        // A huge value is quoted as far as fits in a status message.
        let err = normalize_serial(&"z ".repeat(20_000)).unwrap_err();
        assert!(err.len() < 1_000, "{} bytes", err.len());
        assert!(err.contains("is not a serial number: hex digits"), "{err}");
    }
}
