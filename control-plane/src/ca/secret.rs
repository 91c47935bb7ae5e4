//! The mesh CA in a Kubernetes Secret (`--store kubernetes --ca-secret`):
//! keys `tls.crt` (the signing CA, then its chain up to the root) and
//! `tls.key`.
//!
//! Every replica loads the same CA from the Secret. The chart does not
//! render it: rendered, its key would be in every Helm release record and
//! every rendered manifest, and an upgrade that replaces objects (`helm
//! upgrade --force`, a GitOps "Replace" sync) would empty it. When the
//! Secret is missing, a replica generates a root and creates the Secret;
//! when it exists without data (as an earlier chart left it, or an operator
//! made it), the root is written with an update on the empty version read.
//! Either write is made once: a `409` (`AlreadyExists` for the create,
//! `Conflict` for the update) means another replica won the race: its CA is
//! read and used, never overwritten. A Secret so created belongs to no Helm
//! release, so no upgrade touches it and an uninstall leaves it (deleting it
//! changes every identity's root of trust). A create the API server refuses
//! with a 403 (RBAC without `create` on Secrets) is an error saying how to
//! restore the Secret. A Secret holding only one of the two keys, or ones
//! that do not parse, is an error naming the Secret and key, and is left as
//! it is. The key never reaches a log or an error.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use trellis_core::TrustDomain;

use super::files::{CaFilesError, load_ca};
use super::{CaError, CertificateAuthority};
use crate::store::kubernetes::{describe, status_code};

pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";

/// How many times a lost race is re-read before giving up.
const ATTEMPTS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("CA Secret {secret}: the Kubernetes API server refused to {action}: {message}")]
    Api {
        secret: String,
        action: &'static str,
        message: String,
    },
    #[error(
        "CA Secret {secret} holds {present} but not {missing}; refusing to overwrite it, restore \
         or empty it"
    )]
    Incomplete {
        secret: String,
        present: &'static str,
        missing: &'static str,
    },
    #[error(transparent)]
    Invalid(#[from] CaFilesError),
    #[error("CA Secret {secret}: cannot generate a root: {source}")]
    Generate {
        secret: String,
        #[source]
        source: CaError,
    },
    #[error("CA Secret {secret} kept changing while it was being written; try again")]
    Contended { secret: String },
    #[error(
        "CA Secret {secret} does not exist, and this control plane may not create it (its Role \
         grants no `create` on Secrets in that namespace): restore it from a backup to keep the \
         mesh's root; or grant that `create` (the chart's Role does), so that a replica \
         generates a new root, then restart every control-plane replica and every meshed pod, \
         whose sidecars trust the old root only"
    )]
    Missing { secret: String },
}

/// Loads the CA from the Secret `namespace/name`, generating and storing a
/// root when the Secret is empty or missing (see the module docs).
pub async fn open_ca_secret(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &TrustDomain,
) -> Result<CertificateAuthority, CaSecretError> {
    let secret_name = format!("{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let refused = |action: &'static str, e: &kube::Error| CaSecretError::Api {
        secret: secret_name.clone(),
        action,
        message: describe(e),
    };
    let params = PostParams {
        field_manager: Some("trellis-control-plane".into()),
        ..PostParams::default()
    };
    for _ in 0..ATTEMPTS {
        let existing = api.get_opt(name).await.map_err(|e| refused("get", &e))?;
        let data = existing
            .as_ref()
            .and_then(|s| s.data.clone())
            .unwrap_or_default();
        match (data.get(CERT_KEY), data.get(KEY_KEY)) {
            (Some(cert), Some(key)) => {
                let ca = load_ca(
                    trust_domain,
                    &cert.0,
                    &secret_path(&secret_name, CERT_KEY),
                    &key.0,
                    &secret_path(&secret_name, KEY_KEY),
                )?;
                tracing::info!(secret = %secret_name, "loaded the mesh CA from its Secret");
                return Ok(ca);
            }
            (Some(_), None) => {
                return Err(CaSecretError::Incomplete {
                    secret: secret_name,
                    present: CERT_KEY,
                    missing: KEY_KEY,
                });
            }
            (None, Some(_)) => {
                return Err(CaSecretError::Incomplete {
                    secret: secret_name,
                    present: KEY_KEY,
                    missing: CERT_KEY,
                });
            }
            (None, None) => {}
        }
        let (ca, cert_pem, key_pem) =
            CertificateAuthority::generate(trust_domain).map_err(|source| {
                CaSecretError::Generate {
                    secret: secret_name.clone(),
                    source,
                }
            })?;
        let data = BTreeMap::from([
            (CERT_KEY.to_owned(), ByteString(cert_pem.into_bytes())),
            (KEY_KEY.to_owned(), ByteString(key_pem.into_bytes())),
        ]);
        let written = match existing {
            // Written only over the empty version read: a replica that got
            // there first makes this a 409.
            Some(mut secret) => {
                secret.data = Some(data);
                secret.string_data = None;
                api.replace(name, &params, &secret)
                    .await
                    .map_err(|e| ("update", e))
            }
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(namespace.to_owned()),
                        labels: Some(created_labels()),
                        ..ObjectMeta::default()
                    },
                    type_: Some("Opaque".into()),
                    data: Some(data),
                    ..Secret::default()
                };
                api.create(&params, &secret)
                    .await
                    .map_err(|e| ("create", e))
            }
        };
        match written {
            Ok(secret) => {
                tracing::info!(
                    secret = %secret_name,
                    resource_version = secret.resource_version().unwrap_or_default(),
                    "generated a new root CA and stored it in its Secret"
                );
                return Ok(ca);
            }
            // RBAC without `create` on Secrets (a Role of an earlier chart,
            // or the operator's own): only the operator can bring it back.
            Err(("create", e)) if status_code(&e) == Some(403) => {
                return Err(CaSecretError::Missing {
                    secret: secret_name,
                });
            }
            Err((_, e)) if status_code(&e) == Some(409) => {
                tracing::info!(secret = %secret_name, "another replica wrote the CA first; reading theirs");
            }
            Err((action, e)) => return Err(refused(action, &e)),
        }
    }
    Err(CaSecretError::Contended {
        secret: secret_name,
    })
}

/// The labels of a Secret this control plane creates. No
/// `app.kubernetes.io/instance`: Argo CD's label tracking would take the
/// Secret for one of its application's resources and prune it, as it is in
/// no rendered manifest.
fn created_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "trellis".to_owned()),
        ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "trellis-control-plane".to_owned(),
        ),
    ])
}

/// How errors about a Secret's key name it (they read like file errors).
fn secret_path(secret: &str, key: &str) -> std::path::PathBuf {
    Path::new(&format!("Secret {secret} key {key}")).to_path_buf()
}
