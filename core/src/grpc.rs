//! gRPC channels over Trellis mTLS: the TLS is ours (rustls, SPIFFE peer
//! verification), tonic only speaks HTTP/2 over the established stream.
//!
//! Used by the sidecar (Certify, Discovery.Watch) and `trellisctl` to reach
//! the control plane. The caller builds the `ClientConfig` (with or without a
//! client certificate); this module only dials.

use std::io;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::gather::GatheredWrites;

/// The ALPN protocol gRPC runs over.
pub const ALPN_H2: &[u8] = b"h2";

/// The metadata key with which the control plane names why it refused a
/// call (a [`CertifyRefusal`]'s token: `revoked`, `token_used`, ...; the
/// `reason` label of `trellis_certify_failures_total`), so a client tells
/// refusals apart without parsing their message, which is for people.
pub const REFUSAL_KEY: &str = "trellis-refusal";
/// The [`REFUSAL_KEY`] of a renewal refused because its identity was
/// revoked.
pub const REFUSAL_REVOKED: &str = CertifyRefusal::Revoked.token();
/// The [`REFUSAL_KEY`] of a join token that was already used.
pub const REFUSAL_TOKEN_USED: &str = CertifyRefusal::TokenUsed.token();
/// The [`REFUSAL_KEY`] of a renewal proved by the certificate alone, refused
/// by a control plane whose renewals need the ServiceAccount token too.
pub const REFUSAL_RENEWAL_NEEDS_TOKEN: &str = CertifyRefusal::RenewalNeedsToken.token();

crate::tokens! {
    /// Why the control plane refused a Certify call: the one list of them.
    /// Its [`token`](Self::token) goes on the wire (the [`REFUSAL_KEY`]
    /// metadata) and labels `trellis_certify_failures_total`, so a refusal
    /// can only be one of these, and each is a series from the first
    /// scrape.
    #[derive(PartialOrd, Ord)]
    pub enum CertifyRefusal {
        /// No proof: no token, and no client certificate to renew with.
        NoProof = "no_proof",
        /// A ServiceAccount token, to a control plane without Kubernetes.
        UnimplementedProof = "unimplemented_proof",
        /// A renewal by certificate alone where the token is needed too.
        RenewalNeedsToken = "renewal_needs_token",
        /// The proof is for another identity than the CSR asks for.
        OtherIdentity = "other_identity",
        /// A renewal by a certificate of a revoked identity.
        Revoked = "revoked",
        /// A join token the store does not know.
        TokenUnknown = "token_unknown",
        /// A join token past its expiry.
        TokenExpired = "token_expired",
        /// A join token already used.
        TokenUsed = "token_used",
        /// A join token, to a store that takes none.
        JoinTokensDisabled = "join_tokens_disabled",
        /// A ServiceAccount token that is no JWT.
        SaTokenMalformed = "sa_token_malformed",
        /// A ServiceAccount token the API server did not authenticate.
        SaTokenNotAuthenticated = "sa_token_not_authenticated",
        /// A ServiceAccount token for another audience.
        SaTokenWrongAudience = "sa_token_wrong_audience",
        /// A token of a user that is not a ServiceAccount.
        SaTokenNotServiceAccount = "sa_token_not_service_account",
        /// A ServiceAccount token whose signature does not verify.
        SaTokenBadSignature = "sa_token_bad_signature",
        /// The TokenReview could not reach the API server.
        KubeApiUnreachable = "kube_api_unreachable",
        /// The API server refused the TokenReview.
        KubeApiRefused = "kube_api_refused",
        /// The API server's TokenReview answer did not parse.
        KubeApiBadResponse = "kube_api_bad_response",
        /// Too many TokenReviews in flight.
        TokenReviewsBusy = "token_reviews_busy",
        /// Too many TokenReviews in flight for one client.
        TokenReviewsPerClient = "token_reviews_per_client",
        /// A CSR that does not parse.
        CsrMalformed = "csr_malformed",
        /// A CSR whose signature does not verify.
        CsrBadSignature = "csr_bad_signature",
        /// A CSR for a key other than ECDSA P-256.
        CsrKeyType = "csr_key_type",
        /// A CSR without exactly one URI SAN.
        CsrSan = "csr_san",
        /// A CSR whose URI SAN is no workload SPIFFE ID.
        CsrInvalidId = "csr_invalid_id",
        /// A CSR for another trust domain.
        CsrForeignTrustDomain = "csr_foreign_trust_domain",
        /// A CSR for an identity the control plane keeps for itself.
        CsrReservedId = "csr_reserved_id",
        /// An inbound address reported that is no address.
        BadInboundAddress = "bad_inbound_address",
        /// A request past the size limit.
        RequestTooLarge = "request_too_large",
        /// A request whose bytes are no CertifyRequest.
        RequestUnreadable = "request_unreadable",
        /// The store failed.
        StoreError = "store_error",
        /// The CA failed to sign.
        SigningFailed = "signing_failed",
    }
}

/// A gRPC status code in words, as the mesh's tools say it to people
/// (`invalid argument`, `not found`, `permission denied`, ...) rather than
/// as its name ([`code_name`]).
pub fn code_words(code: tonic::Code) -> &'static str {
    spellings(code).words
}

/// A gRPC status code's name, as gRPC's own libraries print codes
/// (`PermissionDenied`): how metrics and logs name it.
pub fn code_name(code: tonic::Code) -> &'static str {
    spellings(code).name
}

/// How one gRPC status code is spelt.
struct Spellings {
    name: &'static str,
    words: &'static str,
}

/// The one table of every code's [`code_name`] and [`code_words`], so the
/// two never disagree on which codes there are.
fn spellings(code: tonic::Code) -> Spellings {
    use tonic::Code;
    let (name, words) = match code {
        Code::Ok => ("OK", "ok"),
        Code::Cancelled => ("Canceled", "cancelled"),
        Code::Unknown => ("Unknown", "unknown error"),
        Code::InvalidArgument => ("InvalidArgument", "invalid argument"),
        Code::DeadlineExceeded => ("DeadlineExceeded", "deadline exceeded"),
        Code::NotFound => ("NotFound", "not found"),
        Code::AlreadyExists => ("AlreadyExists", "already exists"),
        Code::PermissionDenied => ("PermissionDenied", "permission denied"),
        Code::ResourceExhausted => ("ResourceExhausted", "resource exhausted"),
        Code::FailedPrecondition => ("FailedPrecondition", "failed precondition"),
        Code::Aborted => ("Aborted", "aborted"),
        Code::OutOfRange => ("OutOfRange", "out of range"),
        Code::Unimplemented => ("Unimplemented", "unimplemented"),
        Code::Internal => ("Internal", "internal error"),
        Code::Unavailable => ("Unavailable", "unavailable"),
        Code::DataLoss => ("DataLoss", "data loss"),
        Code::Unauthenticated => ("Unauthenticated", "unauthenticated"),
    };
    Spellings { name, words }
}

/// A refused call as people read it: its code in words ([`code_words`]),
/// then its message, when it has one.
pub fn status_words(status: &tonic::Status) -> String {
    refusal_words(status.code(), status.message())
}

/// As [`status_words`], for a refusal kept as its code and message.
pub fn refusal_words(code: tonic::Code, message: &str) -> String {
    let words = code_words(code);
    match message {
        "" => words.to_owned(),
        message => format!("{words}: {message}"),
    }
}

/// A lazily connecting channel to `addr` ("host:port"). Every new HTTP/2
/// connection dials TCP and runs the TLS handshake with `tls` (which must
/// offer ALPN "h2", see [`with_h2_alpn`]). Nothing is dialled until the first
/// call, and a broken connection is re-dialled on the next call.
pub fn lazy_channel(
    addr: &str,
    tls: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    Ok(endpoint.connect_with_connector_lazy(connector(tls)))
}

/// Like [`lazy_channel`] but dials now, so an unreachable control plane or a
/// failed handshake is reported to the caller.
pub async fn connect(
    addr: &str,
    tls: Arc<ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint.connect_with_connector(connector(tls)).await
}

/// Sets ALPN to "h2" on a client config meant for gRPC.
pub fn with_h2_alpn(mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config
}

type TlsIo = TokioIo<GatheredWrites<tokio_rustls::client::TlsStream<TcpStream>>>;
type Dial = std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsIo, io::Error>> + Send>>;

fn connector(
    tls: Arc<ClientConfig>,
) -> impl tower::Service<Uri, Response = TlsIo, Error = io::Error, Future = Dial> + Clone + Send + 'static
{
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        Box::pin(async move {
            let tls = dial_uri(&uri, tls).await?;
            Ok(TokioIo::new(GatheredWrites::new(tls)))
        }) as Dial
    })
}

/// The connection a channel to `addr` ("host:port", as [`connect`] takes it)
/// makes: TCP, then the TLS handshake with `tls`. For a caller that needs
/// the TLS stream itself (what the server says in the handshake).
pub async fn dial(
    addr: &str,
    tls: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let uri = Uri::try_from(format!("http://{addr}"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    dial_uri(&uri, tls).await
}

/// TCP to the URI's host and port (a name, an IPv4 address, or a bracketed
/// IPv6 address), then the TLS handshake with `tls`.
async fn dial_uri(
    uri: &Uri,
    tls: Arc<ClientConfig>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in URI"))?
        .trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| {
            let kind = source.kind();
            let host = host.to_owned();
            io::Error::new(kind, Unresolved { host, source })
        })?
        .collect();
    let tcp = TcpStream::connect(&addrs[..]).await?;
    tcp.set_nodelay(true)?;
    // The name is not verified (peers are verified by SPIFFE ID); it only
    // fills SNI.
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
}

/// A host name the resolver found no address for, carried in the I/O error
/// of the dial so [`why_unreachable`] can name it; said as the resolver's
/// own text (`failed to lookup address information: Name or service not
/// known`), which does not say which name it looked up.
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
struct Unresolved {
    host: String,
    source: io::Error,
}

/// Why dialling a gRPC server failed, in words an operator can act on: the
/// error's chain with each cause said once (tonic's transport error shows
/// only "transport error" on its own, and I/O errors repeat the text of
/// the TLS error they carry), led by what to check when the cause is a known
/// one. `trusted` names where the CAs that verify the server come from, for
/// a server certificate they did not issue (e.g. "the CA in bundle.pem").
pub fn why_unreachable(e: &(dyn std::error::Error + 'static), trusted: &str) -> String {
    use rustls::CertificateError as Cert;
    let chain = error_chain(e);
    let hint = causes(e).find_map(|cause| {
        if let Some(tls) = crate::tls::rustls_error(cause) {
            return match tls {
                rustls::Error::InvalidCertificate(Cert::BadSignature | Cert::UnknownIssuer) => {
                    Some(format!(
                        "its certificate was not issued by {trusted}: is that the trust \
                         bundle of this control plane?"
                    ))
                }
                rustls::Error::InvalidCertificate(Cert::Expired | Cert::ExpiredContext { .. }) => {
                    Some("its certificate has expired, or this machine's clock is ahead".into())
                }
                rustls::Error::InvalidMessage(_) => Some(
                    "it does not answer in TLS: give --control-plane the control plane's gRPC \
                     address (its --listen), not its admin or webhook port"
                        .into(),
                ),
                rustls::Error::InvalidCertificate(Cert::Other(other)) => {
                    match other.0.downcast_ref::<crate::tls::SvidError>() {
                        // The control plane of another trust domain under the
                        // same CA: the address is right, the identity is not.
                        Some(crate::tls::SvidError::UnexpectedId { found, expected })
                            if found.trust_domain_str() != expected.trust_domain_str()
                                && found.path() == expected.path() =>
                        {
                            Some(format!(
                                "it is the control plane of trust domain {:?}, not of {:?}: \
                                 the identity given is in another trust domain than the mesh's",
                                found.trust_domain_str(),
                                expected.trust_domain_str()
                            ))
                        }
                        // A server of the mesh, from the same CA, that is not
                        // the control plane: a sidecar's inbound port.
                        Some(crate::tls::SvidError::UnexpectedId { .. }) => Some(
                            "it is not the control plane: give --control-plane the control \
                             plane's gRPC address (its --listen), not a sidecar's"
                                .into(),
                        ),
                        _ => None,
                    }
                }
                // The webhook port speaks TLS, but HTTP/1.1 only.
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => {
                    Some(
                        "it does not speak gRPC (HTTP/2): give --control-plane the control \
                         plane's gRPC address (its --listen), not its webhook port"
                            .into(),
                    )
                }
                _ => None,
            };
        }
        if let Some(unresolved) = (cause.downcast_ref::<io::Error>())
            .and_then(io::Error::get_ref)
            .and_then(|inner| inner.downcast_ref::<Unresolved>())
        {
            return Some(format!("the name {} does not resolve", unresolved.host));
        }
        is_refusal(cause).then(|| {
            "nothing listens there: is the control plane running, and is --control-plane its \
             gRPC address?"
                .into()
        })
    });
    match hint {
        Some(hint) => format!("{hint} ({chain})"),
        None => chain,
    }
}

/// Whether `e`, or an error it carries, is a refused connection: nothing
/// listens at the address dialled.
pub fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(is_refusal)
}

fn is_refusal(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause
        .downcast_ref::<io::Error>()
        .is_some_and(|io| io.kind() == io::ErrorKind::ConnectionRefused)
}

/// `e` and its sources, outermost first.
fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// `e`'s message and its sources', each said once: a layer whose text ends
/// with its source's is not followed by that text again.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = String::new();
    for cause in causes(e) {
        // A layer that only shows its source's text (tonic's connect
        // error around the I/O error of a refused handshake) is said by
        // that source, in its described form: the layer's own text of a
        // refused SVID is rustls' debug form of the verifier's error.
        if let Some(source) = cause.source()
            && cause.to_string() == source.to_string()
        {
            continue;
        }
        let text = crate::tls::Described(cause).to_string();
        if message.ends_with(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// `s` must be what the dialer turns into `http://HOST:PORT/`: a host
/// (an IPv6 address in brackets) and a port, with no scheme or path.
pub fn check_host_port(s: &str) -> Result<(), String> {
    if s.contains("://") {
        return Err(format!(
            "{s:?} has a scheme: give host:port (the connection is always mTLS)"
        ));
    }
    let (host, port) = s.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() {
        return Err("empty host".into());
    }
    port.parse::<u16>()
        .map_err(|_| format!("bad port {port:?}"))?;
    let dialled = http::Uri::try_from(format!("http://{s}")).ok();
    let authority = dialled.as_ref().and_then(http::Uri::authority);
    if authority.is_none_or(|a| a.as_str() != s) || dialled.is_some_and(|u| u.path() != "/") {
        return Err(format!(
            "{s:?} is not host:port (an IPv6 address goes in brackets: [::1]:15012)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certify_refusal_tokens_are_distinct_metric_labels() {
        let mut seen = std::collections::BTreeSet::new();
        for refusal in CertifyRefusal::ALL {
            let token = refusal.token();
            assert!(
                !token.is_empty() && token.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{token}"
            );
            assert!(seen.insert(token), "{token} twice");
        }
        // The sidecar acts on these: their bytes never change.
        assert_eq!(REFUSAL_REVOKED, "revoked");
        assert_eq!(REFUSAL_TOKEN_USED, "token_used");
        assert_eq!(REFUSAL_RENEWAL_NEEDS_TOKEN, "renewal_needs_token");
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<dyn std::error::Error + 'static>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref()
        }
    }

    #[test]
    fn a_chain_says_each_cause_once_and_leads_with_what_to_check() {
        // As hyper-util wraps a refused handshake: an I/O error carrying the
        // rustls error, whose text it repeats.
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = io::Error::new(io::ErrorKind::InvalidData, tls);
        let e = Layer(
            "transport error",
            Some(Box::new(Layer("connect", Some(Box::new(io))))),
        );
        assert_eq!(
            why_unreachable(&e, "the CA in b.pem"),
            "its certificate was not issued by the CA in b.pem: is that the trust bundle of \
             this control plane? (transport error: connect: invalid peer certificate: \
             UnknownIssuer)"
        );

        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let e = Layer("transport error", Some(Box::new(refused)));
        assert!(why_unreachable(&e, "-").starts_with("nothing listens there"));

        let e = Layer("transport error", Some(Box::new(Layer("timed out", None))));
        assert_eq!(why_unreachable(&e, "-"), "transport error: timed out");
    }

    /// A sidecar whose `--identity` names another trust domain than the
    /// mesh's reaches the right control plane, which presents the control
    /// plane's ID of its own domain: said as the trust domain given, not as
    /// a wrong address; a sidecar's ID at that address still is.
    #[test]
    fn a_control_plane_of_another_trust_domain_is_named_so() {
        let unexpected = |found: &str, expected: &str| {
            let svid = crate::tls::SvidError::UnexpectedId {
                found: crate::spiffe::SpiffeId::parse(found).unwrap(),
                expected: crate::spiffe::SpiffeId::parse(expected).unwrap(),
            };
            let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                rustls::OtherError(std::sync::Arc::new(svid)),
            ));
            Layer("transport error", Some(Box::new(io::Error::other(tls))))
        };
        let e = unexpected(
            "spiffe://cluster.local/trellis/control-plane",
            "spiffe://wrong.td/trellis/control-plane",
        );
        let said = why_unreachable(&e, "-");
        assert!(
            said.starts_with(
                "it is the control plane of trust domain \"cluster.local\", not of \"wrong.td\": \
                 the identity given is in another trust domain than the mesh's ("
            ),
            "{said}"
        );
        let e = unexpected(
            "spiffe://cluster.local/ns/demo/sa/web",
            "spiffe://cluster.local/trellis/control-plane",
        );
        let said = why_unreachable(&e, "-");
        assert!(said.starts_with("it is not the control plane: "), "{said}");
    }

    #[test]
    fn a_status_is_said_in_words() {
        let words: std::collections::BTreeSet<_> = (0..=16)
            .map(|i| code_words(tonic::Code::from_i32(i)))
            .collect();
        assert_eq!(words.len(), 17, "{words:?}");
        assert!(
            words
                .iter()
                .all(|w| w.chars().all(|c| c == ' ' || c.is_ascii_lowercase()))
        );
        assert_eq!(
            status_words(&tonic::Status::invalid_argument("spiffe_id \"web\": bad")),
            "invalid argument: spiffe_id \"web\": bad"
        );
        assert_eq!(status_words(&tonic::Status::not_found("")), "not found");
        assert_eq!(
            refusal_words(tonic::Code::Unauthenticated, "join token is unknown"),
            "unauthenticated: join token is unknown"
        );
    }

    /// Every code has a name of its own, spelt as gRPC's libraries print
    /// it (Go's `Canceled` among them), as metrics and logs name codes.
    #[test]
    fn a_status_code_is_named_as_grpc_prints_it() {
        let names: std::collections::BTreeSet<_> = (0..=16)
            .map(|i| code_name(tonic::Code::from_i32(i)))
            .collect();
        assert_eq!(names.len(), 17, "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_alphabetic()))
        );
        assert_eq!(code_name(tonic::Code::PermissionDenied), "PermissionDenied");
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }

    /// A real dial: refused where nothing listens, not where a listener
    /// takes the connection and closes it before the TLS handshake.
    #[tokio::test]
    async fn a_refused_dial_is_told_from_one_that_failed_later() {
        let tls = Arc::new(
            ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let gone = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let e = connect(&gone.to_string(), tls.clone()).await.unwrap_err();
        assert!(refused(&e), "{}", error_chain(&e));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                drop(tcp);
            }
        });
        let e = connect(&addr.to_string(), tls).await.unwrap_err();
        assert!(!refused(&e), "{}", error_chain(&e));
    }
}
