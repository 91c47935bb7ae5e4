//! A peer replica's credentials, for calling the `Replica` service as only
//! another control-plane replica may.
//!
//! Replicas of one mesh share their CA: the same `--ca-cert` and
//! `--ca-key` files, or, with the Kubernetes store, the CA Secret. Each
//! issues its own SVID, `spiffe://TD/trellis/control-plane`, from that CA
//! at start. [`SharedCa`] is such a CA, made by the test and given to the
//! control plane under test as its operator CA; [`SharedCa::replica_tls`]
//! issues from it the SVID another replica would hold, with the control
//! plane's own code.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use tonic::transport::Channel;
use trellis_control_plane::ca::CertificateAuthority;
use trellis_control_plane::server::{ServingCert, peer_client_config};
use trellis_core::TrustDomain;
use trellis_proto::admin::v1::replica_client::ReplicaClient;

use super::ControlPlane;

/// A root CA of `cluster.local`, its certificate and key written to files
/// of a temp dir of its own.
pub struct SharedCa {
    ca: Arc<CertificateAuthority>,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl SharedCa {
    pub fn generate() -> Self {
        let td = TrustDomain::new("cluster.local").unwrap();
        let (ca, cert_pem, key_pem) = CertificateAuthority::generate(&td).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        Self {
            ca: Arc::new(ca),
            cert,
            key,
            _dir: dir,
        }
    }

    /// The flags that make a control plane sign with this CA.
    pub fn flags(&self) -> [&str; 4] {
        [
            "--ca-cert",
            self.cert.to_str().unwrap(),
            "--ca-key",
            self.key.to_str().unwrap(),
        ]
    }

    /// A control plane signing with this CA, with `extra` flags.
    pub fn start(&self, extra: &[&str]) -> ControlPlane {
        ControlPlane::start(&[&self.flags()[..], extra].concat())
    }

    /// The TLS a replica asks its peers with: a control-plane SVID of its
    /// own from this CA, presented as its client certificate, and only a
    /// server with that same ID accepted.
    pub fn replica_tls(&self) -> Arc<ClientConfig> {
        let serving = ServingCert::new(self.ca.clone(), &[], Ipv4Addr::LOCALHOST.into()).unwrap();
        peer_client_config(&self.ca, serving).unwrap()
    }

    /// A `Replica` client of `cp`, calling as a peer replica.
    pub async fn replica_client(&self, cp: &ControlPlane) -> ReplicaClient<Channel> {
        let channel = trellis_core::grpc::connect(&cp.grpc, self.replica_tls())
            .await
            .expect("connects to the control plane as a replica");
        ReplicaClient::new(channel)
    }
}
