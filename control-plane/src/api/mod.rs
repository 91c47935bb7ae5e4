//! The tonic services (Identity, Discovery, Admin) and what they share: the
//! caller as the TLS layer saw it ([`PeerInfo`], carried as tonic's
//! `ConnectInfo`), and the one check that guards the Admin service.
//!
//! The services never look at TLS themselves: the peer SPIFFE ID was verified
//! against the bundle during the handshake (see `server`).

pub mod admin;
mod admin_calls;
pub mod discovery;
pub mod discovery_server;
pub mod identity;
pub mod policy;
pub mod replica;
mod unary;
pub mod unknown_method;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Request, Status};
use trellis_core::logging::keyed::Keyed;
use trellis_core::warn_throttled_by_key;
use trellis_core::{SpiffeId, TrustDomain};

use crate::ca::CertificateAuthority;
use crate::discovery::{Discovery, PresentedCert};
use crate::inject::UninjectedPods;
use crate::metrics::Metrics;
use crate::store::Store;

pub(crate) use admin_calls::AdminCalls;
pub(crate) use unary::UnaryRequests;

/// What a client is told of a request of `call` larger than the `limit`
/// bytes it is read up to: RESOURCE_EXHAUSTED naming both, in place of
/// the OUT_OF_RANGE tonic's decoder ends the call with ("decoded message
/// length too large"), which names neither the call nor what to change.
pub(crate) fn request_too_large(call: &str, limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "{} {call} request may be at most {limit} bytes; this one is larger",
        article(call)
    ))
}

/// The article before `call` (a Certify, an Explain request).
pub(crate) fn article(call: &str) -> &'static str {
    match call.chars().next() {
        Some('A' | 'E' | 'I' | 'O' | 'U') => "an",
        _ => "a",
    }
}

/// `status`, from reading a request of `call` up to `limit` bytes, as the
/// client is told it: tonic's OUT_OF_RANGE for a request past the limit
/// becomes [`request_too_large`]; any other status is kept.
pub(crate) fn request_refused(call: &str, limit: usize, status: Status) -> Status {
    if status.code() == Code::OutOfRange {
        request_too_large(call, limit)
    } else {
        status
    }
}

/// Whether `status`, from reading a request stream, is the request's own
/// fault: bytes tonic's decoder could not read as a message (one cut short
/// by the end of the stream, a compressed flag set though no encoding was
/// negotiated, bytes that do not decode). tonic says INTERNAL for these,
/// made from its own words alone; a broken connection (a stream reset, an
/// I/O error) may say INTERNAL too, but that status is made from the
/// HTTP/2 or I/O error, which it keeps as its source. Nobody is left to
/// tell of the latter, while the former is told to its client.
pub(crate) fn unreadable_request(status: &Status) -> bool {
    status.code() == Code::Internal && std::error::Error::source(status).is_none()
}

/// What the client is told of `which` request (or message of a stream)
/// tonic's decoder could not read (see [`unreadable_request`]):
/// INVALID_ARGUMENT naming it and tonic's reason (at most
/// [`discovery::DECODE_REASON_CHARS`] of it), in place of tonic's INTERNAL,
/// which says the control plane failed.
pub(crate) fn unreadable(which: &str, status: &Status) -> Status {
    Status::invalid_argument(format!(
        "{which} could not be read: {}",
        discovery::shown_up_to(status.message(), discovery::DECODE_REASON_CHARS)
    ))
}

/// Who is on the other end of a gRPC connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: SocketAddr,
    /// The SPIFFE ID of a verified client certificate; `None` without one.
    pub spiffe_id: Option<SpiffeId>,
    /// When that certificate was issued, Unix seconds, as this control
    /// plane's CA signs: its notBefore, backdated by [`crate::ca::BACKDATE`],
    /// moved forward again. `None` without one.
    pub cert_issued_at_unix: Option<i64>,
    /// That certificate, when it was presented in a full handshake (not
    /// for a resumed session); `None` without one.
    pub presented: Option<PresentedCert>,
    /// The requests the connection has in flight, for its idle timeout.
    pub activity: crate::server::Activity,
}

/// Everything the services work with.
#[derive(Clone)]
pub struct Mesh {
    pub trust_domain: TrustDomain,
    pub ca: Arc<CertificateAuthority>,
    pub store: Arc<dyn Store>,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    pub cert_ttl: Duration,
    /// Flips to true when the control plane shuts down; open streams end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// The pods this replica's warning-only admission webhooks admitted
    /// without a sidecar lately (none without `--webhook`).
    pub uninjected: Arc<UninjectedPods>,
}

#[cfg(test)]
impl Mesh {
    /// The mesh of trust domain `cluster.local` on `store`, with a CA of its
    /// own and certificates of an hour, for the services' tests; with the
    /// sender that stops it.
    pub fn for_tests(
        store: Arc<dyn Store>,
        discovery: Arc<Discovery>,
    ) -> (Self, tokio::sync::watch::Sender<bool>) {
        let trust_domain = TrustDomain::new("cluster.local").expect("a valid trust domain");
        let (ca, _, _) = CertificateAuthority::generate(&trust_domain).expect("a CA");
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let mesh = Mesh {
            trust_domain,
            ca: Arc::new(ca),
            store,
            discovery,
            metrics: Arc::new(Metrics::default()),
            cert_ttl: Duration::from_secs(3600),
            shutdown,
            uninjected: Arc::default(),
        };
        (mesh, stop)
    }
}

/// The peer of a request, as the TLS layer recorded it.
pub fn peer_of<T>(request: &Request<T>) -> Option<&PeerInfo> {
    request.extensions().get::<PeerInfo>()
}

/// The caller's SPIFFE ID, or UNAUTHENTICATED naming what is missing.
pub fn require_svid<T>(request: &Request<T>, what: &str) -> Result<SpiffeId, Status> {
    peer_of(request)
        .and_then(|p| p.spiffe_id.clone())
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "{what} requires an SVID presented as the TLS client certificate"
            ))
        })
}

/// The largest answer `trellisctl` and peer replicas read from a listing
/// (`ListWorkloads`, `ListStreams`, `ListIssuedCertificates`), far above
/// gRPC's usual 4 MiB: tens of thousands of workloads with several
/// addresses each pass 4 MiB.
pub const MAX_LISTING_BYTES: usize = 64 * 1024 * 1024;

/// At most this many characters of a caller's bad input are quoted in a
/// status or a log line, so a huge field costs neither a huge answer nor a
/// huge log.
pub const QUOTED_CHARS: usize = 48;

/// `raw` quoted and escaped as `{:?}` does, cut after [`QUOTED_CHARS`]
/// escaped characters (marked with `...` and the full length in bytes).
pub fn quoted(raw: &str) -> String {
    quoted_up_to(raw, QUOTED_CHARS)
}

/// [`quoted`], cut after `max` escaped characters.
pub fn quoted_up_to(raw: &str, max: usize) -> String {
    quoted_chars(raw.chars(), raw.len(), max)
}

/// The text `chars` (`len` bytes in all) quoted as [`quoted_up_to`] does,
/// reading only the characters the quote shows: a caller can quote text it
/// never builds whole.
pub fn quoted_chars(chars: impl Iterator<Item = char>, len: usize, max: usize) -> String {
    let mut out = String::from("\"");
    for c in chars {
        let escaped: String = c.escape_debug().collect();
        if out.len() - 1 + escaped.len() > max {
            out.push_str(&format!("\"... ({len} bytes)"));
            return out;
        }
        out.push_str(&escaped);
    }
    out.push('"');
    out
}

/// `p` as a port number: `None` for 0 or past 65535.
pub fn port(p: u32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

/// The port number `p` of `field`; INVALID_ARGUMENT naming the field when
/// it is not a port (0, or past 65535).
pub fn port_arg(field: &str, p: u32) -> Result<u16, Status> {
    port(p).ok_or_else(|| Status::invalid_argument(format!("{field}: {p} is not in 1-65535")))
}

/// The port numbers of `field`, a caller's list of ports, sorted and each
/// once; INVALID_ARGUMENT naming the field and the first number that is not
/// a port ([`port_arg`]).
pub fn port_list(field: &str, ports: &[u32]) -> Result<Vec<u16>, Status> {
    let mut valid = ports
        .iter()
        .map(|&p| port_arg(field, p))
        .collect::<Result<Vec<u16>, Status>>()?;
    valid.sort_unstable();
    valid.dedup();
    Ok(valid)
}

/// A time as status messages give it: RFC 3339, in whole seconds, UTC;
/// the number itself when it has none
/// ([`trellis_core::clock::rfc3339_checked`]).
pub fn rfc3339(unix: i64) -> String {
    trellis_core::clock::rfc3339_checked(unix).unwrap_or_else(|| unix.to_string())
}

/// How many refused callers keep a log window of their own; past that
/// they share one.
const REFUSED_CALLERS_KEPT: usize = 64;

/// The guard of a service only one identity may call: the Admin service's
/// (`spiffe://TD/trellis/admin`) and the Replica service's (the control
/// plane's own ID, which its peer replicas present).
#[derive(Clone)]
pub struct OnlyCaller {
    allowed: SpiffeId,
    api: &'static str,
    /// Where a caller refused is logged from, at most once per caller per
    /// [`REFUSAL_LOG_PAUSE`](crate::server::REFUSAL_LOG_PAUSE): any
    /// workload of the trust domain can call as often as it likes. `None`
    /// for the Admin API, whose refusals are logged with the others of its
    /// calls (`AdminCalls`).
    lines: Option<Arc<Keyed<SpiffeId>>>,
}

impl OnlyCaller {
    /// The Admin API: operators only.
    pub fn admin(trust_domain: &TrustDomain) -> Self {
        Self {
            allowed: SpiffeId::admin(trust_domain),
            api: "the Admin API",
            lines: None,
        }
    }

    /// The Replica API: the control plane's peer replicas only.
    pub fn control_plane(trust_domain: &TrustDomain) -> Self {
        Self {
            allowed: SpiffeId::control_plane(trust_domain),
            api: "the Replica API",
            lines: Some(Arc::new(Keyed::new(
                crate::server::REFUSAL_LOG_PAUSE,
                REFUSED_CALLERS_KEPT,
            ))),
        }
    }
}

impl std::fmt::Debug for OnlyCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlyCaller")
            .field("allowed", &self.allowed)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

impl tonic::service::Interceptor for OnlyCaller {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let caller = require_svid(&request, self.api)?;
        if caller != self.allowed {
            if let Some(lines) = &self.lines {
                warn_throttled_by_key!(
                    lines,
                    &caller,
                    { caller = %caller, api = self.api },
                    "refused a call from an identity the API does not allow"
                );
            }
            return Err(Status::permission_denied(format!(
                "{caller} may not call {}; only {} may",
                self.api, self.allowed
            )));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_bad_input_is_bounded() {
        assert_eq!(quoted("web:15006"), "\"web:15006\"");
        let huge = "\u{7}".repeat(4 << 20);
        let shown = quoted(&huge);
        assert!(shown.len() < 80, "{shown}");
        assert!(
            shown.ends_with(&format!("... ({} bytes)", huge.len())),
            "{shown}"
        );
    }

    #[test]
    fn times_without_an_rfc3339_form_are_shown_as_numbers() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        for unix in [-1, 253_402_300_800, i64::MAX] {
            assert_eq!(rfc3339(unix), unix.to_string());
        }
    }
}
