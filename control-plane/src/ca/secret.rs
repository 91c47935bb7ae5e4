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
//!
//! Only on a first install, though: a Secret deleted (by mistake, a GitOps
//! prune, a namespace clean-up) or emptied while the mesh runs is a lost
//! root, and a new one would split the mesh (replicas running keep the
//! old root, and every running sidecar trusts it only). Before generating,
//! a replica lists the cluster's unfinished pods, metadata only, 500 a
//! page and at most 40 pages (the `list` on pods the store's watch has);
//! one carrying the injector's annotation `trellis.io/injected` or
//! `trellis.io/trust-bundle` makes it refuse, naming the Secret, the pod
//! and the ways out: restore the Secret from a backup, or start a new root
//! on purpose with [`NewRoot::Deliberate`] (`--ca-secret-new-root`), which
//! skips the check and logs a warning saying to restart every meshed pod.
//! A list the API server refuses, or one past the pages read, is an error
//! too, and generates nothing: not knowing is no first install. Pods of
//! another Trellis mesh in the cluster count as well.
//!
//! Either write is made once: a `409` (`AlreadyExists` for the create,
//! `Conflict` for the update) means another replica won the race: its CA is
//! read and used, never overwritten. A Secret so created belongs to no Helm
//! release, so no upgrade touches it and an uninstall leaves it (deleting it
//! loses the mesh's root, as above). A create the API server refuses
//! with a 403 (RBAC without `create` on Secrets) is an error saying how to
//! restore the Secret. A Secret holding only one of the two keys, or ones
//! that do not parse, is an error naming the Secret and key, and is left as
//! it is. The key never reaches a log or an error.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use trellis_core::TrustDomain;

use super::files::{CaFilesError, load_ca};
use super::{CaError, CertificateAuthority};
use crate::inject::{INJECTED_ANNOTATION, TRUST_BUNDLE_ANNOTATION};
use crate::store::kubernetes::{describe, status_code};

pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";

/// How many times a lost race is re-read before giving up.
const ATTEMPTS: usize = 4;

/// Pods read per page when looking for a sidecar of the mesh.
const PODS_PAGE: u32 = 500;
/// Pages read at most: a cluster with more unfinished pods, none of them
/// meshed in the pages read, is not taken for a first install.
const PODS_PAGES: u32 = 40;
/// Pods that still run or may run: a finished pod's sidecar trusts nothing.
const UNFINISHED_PODS: &str = "status.phase!=Succeeded,status.phase!=Failed";

/// When a replica may generate a root for a Secret that holds none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewRoot {
    /// Only on a first install: when no unfinished pod in the cluster
    /// carries a Trellis sidecar (the injector's annotation).
    FirstInstall,
    /// Whatever pods run (`--ca-secret-new-root`): the operator starts a
    /// new root on purpose, and restarts every meshed pod.
    Deliberate,
}

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
         mesh's root; or grant that `create` (the chart's Role does unless \
         `rbac.createCASecret` is false), so that a replica generates a new root, then restart \
         every control-plane replica and every meshed pod, whose sidecars trust the old root \
         only"
    )]
    Missing { secret: String },
    #[error(
        "CA Secret {secret} {state}, but the mesh whose root it held exists: pod {pod} carries \
         a Trellis sidecar (annotation {marker}), and running sidecars trust that root only; \
         refusing to generate a new one. Restore the Secret from its backup (`kubectl create \
         -f` the saved manifest, its metadata.resourceVersion and uid removed; replicas that \
         stopped start again on their own); or, to start a new root on purpose, start the \
         control plane with --ca-secret-new-root (TRELLIS_CA_SECRET_NEW_ROOT=true) once, \
         restart every control-plane replica, then every meshed pod"
    )]
    MeshExists {
        secret: String,
        state: &'static str,
        pod: String,
        marker: &'static str,
    },
    #[error(
        "CA Secret {secret} {state}, and whether pods already carry Trellis sidecars could not \
         be checked ({reason}); refusing to generate a new root they would not trust. Restore \
         the Secret from its backup; or, on a first install or to start a new root on purpose, \
         start the control plane with --ca-secret-new-root (TRELLIS_CA_SECRET_NEW_ROOT=true) \
         once, then restart every meshed pod"
    )]
    Unchecked {
        secret: String,
        state: &'static str,
        reason: String,
    },
}

/// Loads the CA from the Secret `namespace/name`, generating and storing a
/// root when the Secret is empty or missing, as `new_root` allows (see the
/// module docs).
pub async fn open_ca_secret(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &TrustDomain,
    new_root: NewRoot,
) -> Result<CertificateAuthority, CaSecretError> {
    let secret_name = format!("{namespace}/{name}");
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut checked = new_root == NewRoot::Deliberate;
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
                if new_root == NewRoot::Deliberate {
                    tracing::warn!(
                        secret = %secret_name,
                        "--ca-secret-new-root has no effect: the Secret holds a CA; remove the \
                         flag, which would let a lost Secret become a new root"
                    );
                }
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
        if !checked {
            let state = if existing.is_some() {
                "holds no CA"
            } else {
                "does not exist"
            };
            match meshed_pod(client.clone()).await {
                Ok(None) => checked = true,
                Ok(Some((pod, marker))) => {
                    return Err(CaSecretError::MeshExists {
                        secret: secret_name,
                        state,
                        pod,
                        marker,
                    });
                }
                Err(reason) => {
                    return Err(CaSecretError::Unchecked {
                        secret: secret_name,
                        state,
                        reason,
                    });
                }
            }
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
            Ok(secret) if new_root == NewRoot::Deliberate => {
                tracing::warn!(
                    secret = %secret_name,
                    resource_version = secret.resource_version().unwrap_or_default(),
                    "generated a new root CA on --ca-secret-new-root and stored it in its \
                     Secret: sidecars started before trust the old root only; restart every \
                     control-plane replica and every meshed pod, and remove the flag"
                );
                return Ok(ca);
            }
            Ok(secret) => {
                tracing::info!(
                    secret = %secret_name,
                    resource_version = secret.resource_version().unwrap_or_default(),
                    "no pod carries a Trellis sidecar (a first install): generated a new root \
                     CA and stored it in its Secret"
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

/// The first unfinished pod in the cluster that carries a Trellis sidecar,
/// as `namespace/name` and the injector's annotation it carries: evidence
/// that a mesh runs on the root of a Secret now lost. Pods' metadata only,
/// [`PODS_PAGE`] at a time, at most [`PODS_PAGES`] pages (the `list` on
/// pods the store's watch has already). An error when the API server
/// refuses a page or there are more pages: not knowing is no first install.
async fn meshed_pod(client: Client) -> Result<Option<(String, &'static str)>, String> {
    let api: Api<Pod> = Api::all(client);
    let mut params = ListParams::default()
        .fields(UNFINISHED_PODS)
        .limit(PODS_PAGE);
    for _ in 0..PODS_PAGES {
        let page = api
            .list_metadata(&params)
            .await
            .map_err(|e| format!("listing pods: {}", describe(&e)))?;
        for pod in &page.items {
            let annotations = pod.metadata.annotations.as_ref();
            let marker = [INJECTED_ANNOTATION, TRUST_BUNDLE_ANNOTATION]
                .into_iter()
                .find(|key| annotations.is_some_and(|a| a.contains_key(*key)));
            if let Some(marker) = marker {
                let meta = &pod.metadata;
                let pod = format!(
                    "{}/{}",
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref().unwrap_or_default()
                );
                return Ok(Some((pod, marker)));
            }
        }
        match page.metadata.continue_.filter(|token| !token.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(None),
        }
    }
    Err(format!(
        "more than {} unfinished pods, none of the first ones meshed",
        PODS_PAGE * PODS_PAGES
    ))
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
