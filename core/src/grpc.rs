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

/// The ALPN protocol gRPC runs over.
pub const ALPN_H2: &[u8] = b"h2";

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

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
type Dial = std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsIo, io::Error>> + Send>>;

fn connector(
    tls: Arc<ClientConfig>,
) -> impl tower::Service<Uri, Response = TlsIo, Error = io::Error, Future = Dial> + Clone + Send + 'static
{
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in URI"))?
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The name is not verified (peers are verified by SPIFFE ID); it
            // only fills SNI.
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(stream))
        }) as Dial
    })
}
