//! The pods the warning-only webhooks admitted without a sidecar lately,
//! for `trellisctl check` (through `ListWorkloads`).
//!
//! `kubectl` prints the warning those webhooks answer with for the pods it
//! creates itself, but a Deployment's pods are created by the ReplicaSet
//! controller, and the warning reaches nobody: the pods run outside the
//! mesh, silently. The server records each such admission here
//! ([`UninjectedPods::record`]): the pods of one owner, with one value of
//! one label, are one entry, with how many were admitted and when the last
//! was. At most [`MAX_ENTRIES`] are kept, the one admitted least lately
//! making way for a new one, in memory: a restart empties it. Entries do
//! not age out otherwise: a pod admitted without a sidecar runs so until
//! it is replaced, however long ago it was admitted.
//!
//! It holds what the pod's metadata says (namespace, owner, the label's
//! value), each cut at [`MAX_TEXT_BYTES`]; never the pod's spec.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use super::UnknownInjectValue;

/// The most entries kept.
pub const MAX_ENTRIES: usize = 64;

/// The longest text an entry keeps, in bytes: a Kubernetes name (a DNS
/// subdomain) is at most this long, a label's value shorter.
const MAX_TEXT_BYTES: usize = 253;

/// Pods admitted without a sidecar because of a `trellis.io/inject` label
/// whose value is neither `enabled` nor `disabled`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UninjectedPod {
    pub namespace: String,
    /// The kind of the pod's controlling owner (`ReplicaSet`), or `Pod`
    /// for a pod without owners.
    pub owner_kind: String,
    /// The owner's name; for a pod without owners its name, or its
    /// `generateName` followed by `*`.
    pub owner_name: String,
    /// Whose label: [`UnknownInjectValue::PodLabel`] or
    /// [`UnknownInjectValue::NamespaceLabel`].
    pub found: UnknownInjectValue,
    /// The pod's label's value; `None` for a namespace's label, which the
    /// webhook cannot read.
    pub value: Option<String>,
}

impl UninjectedPod {
    /// The pod `pod` of a review in `namespace`, admitted because of the
    /// label `found` with `value`.
    pub(super) fn of(
        namespace: &str,
        pod: &Value,
        found: UnknownInjectValue,
        value: Option<String>,
    ) -> Self {
        let metadata = pod.get("metadata");
        let text = |key: &str| {
            metadata
                .and_then(|m| m.get(key))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        };
        // The controller among the owners (a ReplicaSet, a Job), else the
        // first.
        let owners = metadata
            .and_then(|m| m.get("ownerReferences"))
            .and_then(Value::as_array);
        let owner = owners.and_then(|owners| {
            let controller = owners
                .iter()
                .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true));
            let owner = controller.or(owners.first())?;
            let field = |key| owner.get(key).and_then(Value::as_str);
            Some((field("kind")?, field("name")?))
        });
        let (owner_kind, owner_name) = match owner {
            Some((kind, name)) => (kind.to_owned(), name.to_owned()),
            None => match (text("name"), text("generateName")) {
                (Some(name), _) => ("Pod".to_owned(), name.to_owned()),
                (None, Some(prefix)) => ("Pod".to_owned(), format!("{prefix}*")),
                (None, None) => ("Pod".to_owned(), "*".to_owned()),
            },
        };
        let namespace = match namespace {
            "" => text("namespace").unwrap_or_default(),
            namespace => namespace,
        };
        Self {
            namespace: cut(namespace.to_owned()),
            owner_kind: cut(owner_kind),
            owner_name: cut(owner_name),
            found,
            value: value.map(cut),
        }
    }
}

/// `text` cut to at most [`MAX_TEXT_BYTES`], on a character boundary.
fn cut(mut text: String) -> String {
    if text.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// How many pods of an entry were admitted, and when the last was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub count: u64,
    /// Unix seconds.
    pub last_unix: i64,
}

/// The entries, at most [`MAX_ENTRIES`]; shared by the webhook server,
/// which records, and the Admin and Replica services, which list.
#[derive(Debug, Default)]
pub struct UninjectedPods {
    entries: Mutex<HashMap<UninjectedPod, Admitted>>,
}

impl UninjectedPods {
    /// One more pod of `pod`'s entry admitted at `now` (Unix seconds). A
    /// new entry past [`MAX_ENTRIES`] takes the place of the one admitted
    /// least lately.
    pub fn record(&self, pod: UninjectedPod, now: i64) {
        let mut entries = self.entries.lock().expect("not poisoned");
        if let Some(admitted) = entries.get_mut(&pod) {
            admitted.count = admitted.count.saturating_add(1);
            admitted.last_unix = admitted.last_unix.max(now);
            return;
        }
        if entries.len() >= MAX_ENTRIES {
            let oldest = entries
                .iter()
                .min_by_key(|(_, admitted)| admitted.last_unix)
                .map(|(pod, _)| pod.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            pod,
            Admitted {
                count: 1,
                last_unix: now,
            },
        );
    }

    /// Every entry, last admitted first.
    pub fn recent(&self) -> Vec<(UninjectedPod, Admitted)> {
        let entries = self.entries.lock().expect("not poisoned");
        let mut recent: Vec<_> = entries.iter().map(|(p, a)| (p.clone(), *a)).collect();
        drop(entries);
        recent.sort_by(|a, b| b.1.last_unix.cmp(&a.1.last_unix).then(a.0.cmp(&b.0)));
        recent
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod_of(name: &str) -> UninjectedPod {
        UninjectedPod {
            namespace: "shop".into(),
            owner_kind: "ReplicaSet".into(),
            owner_name: name.into(),
            found: UnknownInjectValue::PodLabel,
            value: Some("true".into()),
        }
    }

    /// The pods of one owner are one entry, counted; past the bound, the
    /// entry admitted least lately makes way.
    #[test]
    fn entries_are_counted_and_bounded() {
        let recorded = UninjectedPods::default();
        for i in 0..MAX_ENTRIES {
            recorded.record(pod_of(&format!("web-{i}")), 1000 + i as i64);
        }
        // web-0 admitted again: now web-1 is the least lately admitted.
        recorded.record(pod_of("web-0"), 5000);
        recorded.record(pod_of("new"), 6000);
        let recent = recorded.recent();
        assert_eq!(recent.len(), MAX_ENTRIES);
        assert_eq!(recent[0].0.owner_name, "new");
        assert_eq!(
            recent[1],
            (
                pod_of("web-0"),
                Admitted {
                    count: 2,
                    last_unix: 5000
                }
            )
        );
        assert!(!recent.iter().any(|(p, _)| p.owner_name == "web-1"));
        assert!(recent.iter().any(|(p, _)| p.owner_name == "web-2"));
    }

    /// The controlling owner names the pods; a pod without owners is named
    /// by its name, or its generateName; text is cut at the bound.
    #[test]
    fn the_owner_is_the_controller_else_the_pod() {
        let owned = json!({"metadata": {
            "generateName": "web-7d9f-",
            "ownerReferences": [
                {"kind": "Other", "name": "x"},
                {"kind": "ReplicaSet", "name": "web-7d9f", "controller": true},
            ],
        }});
        let found = UninjectedPod::of("shop", &owned, UnknownInjectValue::PodLabel, None);
        assert_eq!(
            (found.owner_kind.as_str(), found.owner_name.as_str()),
            ("ReplicaSet", "web-7d9f")
        );
        let named = json!({"metadata": {"name": "debug", "namespace": "legacy"}});
        let found = UninjectedPod::of("", &named, UnknownInjectValue::NamespaceLabel, None);
        assert_eq!(
            (
                found.namespace.as_str(),
                found.owner_kind.as_str(),
                found.owner_name.as_str()
            ),
            ("legacy", "Pod", "debug")
        );
        let generated = json!({"metadata": {"generateName": "job-"}});
        let long = "é".repeat(200);
        let found = UninjectedPod::of("shop", &generated, UnknownInjectValue::PodLabel, Some(long));
        assert_eq!(found.owner_name, "job-*");
        assert_eq!(found.value.unwrap(), "é".repeat(MAX_TEXT_BYTES / 2));
    }
}
