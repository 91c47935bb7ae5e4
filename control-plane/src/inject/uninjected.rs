//! The pods the warning-only webhooks admitted without a sidecar lately,
//! for `trellisctl check` (through `ListWorkloads`).
//!
//! `kubectl` prints the warning those webhooks answer with for the pods it
//! creates itself, but a Deployment's pods are created by the ReplicaSet
//! controller, and the warning reaches nobody: the pods run outside the
//! mesh, silently. The server records each such admission here
//! ([`UninjectedPods::record`]): the pods of one owner ([`Owner`]), with
//! one value of one label, are one entry, with how many were admitted and
//! when the last was. At most [`MAX_ENTRIES`] are kept, the one admitted
//! least lately making way for a new one, in memory: a restart empties it.
//! Entries do not age out: a pod admitted without a sidecar runs so until
//! it is replaced, however long ago it was admitted.
//!
//! Once the label is fixed, the owner's new pods go to `/inject`. The
//! server tells each created pod with the sidecar here, injected then or
//! before ([`UninjectedPods::injected`]): the entries of the pod's owner are
//! dropped, and the owner is remembered as injected then, the
//! [`MAX_INJECTED`] injected least lately making way, since the API server
//! may have sent the earlier pods to another replica: `ListWorkloads`
//! drops an entry of any replica whose owner a replica injected a pod of
//! in the same second or later (`Fleet::uninjected_pods`).
//!
//! It holds what the pod's metadata says (namespace, owner, the label's
//! value), each cut at [`MAX_TEXT_BYTES`]; never the pod's spec.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

use super::UnknownInjectValue;

/// The most entries kept.
pub const MAX_ENTRIES: usize = 64;

/// The most owners remembered as injected: more than any replica's
/// entries, since it does not know which owners its peers hold entries
/// of.
pub const MAX_INJECTED: usize = 1024;

/// The longest text an entry keeps, in bytes: a Kubernetes name (a DNS
/// subdomain) is at most this long, a label's value shorter.
const MAX_TEXT_BYTES: usize = 253;

/// Who a pod's kind are: the owner its entry is kept by, and whose
/// injected pods end it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub namespace: String,
    /// `Deployment` for the pods of a Deployment's ReplicaSet, `CronJob`
    /// for the pods of a CronJob's run, else the kind of the pod's
    /// controlling owner (`StatefulSet`, `Job`), or `Pod` for a pod without
    /// owners.
    pub kind: String,
    /// The owner's name; for a pod without owners its name, or its
    /// `generateName` followed by `*`.
    pub name: String,
}

impl Owner {
    /// The owner of `pod`, of a review in `namespace` at `now` (Unix
    /// seconds). The controlling owner, else the first; but a ReplicaSet
    /// named after a Deployment and the pod's `pod-template-hash` label
    /// (`web-6b7f9c5d8`, as the Deployment controller names it) is its
    /// Deployment (`web`): a fixed label rolls out as a new ReplicaSet of
    /// the same Deployment. Likewise a Job named as the CronJob controller
    /// names a run lately scheduled (`backup-29412345`, see `cronjob_of`)
    /// is its CronJob (`backup`): the next run is a new Job.
    pub fn of(namespace: &str, pod: &Value, now: i64) -> Self {
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
            let group = field("apiVersion")
                .and_then(|v| v.split_once('/'))
                .map(|(g, _)| g);
            Some((group, field("kind")?, field("name")?))
        });
        let label = |key: &str| {
            metadata
                .and_then(|m| m.get("labels"))
                .and_then(|l| l.get(key))
                .and_then(Value::as_str)
                .filter(|v| !v.is_empty())
        };
        let (kind, name) = match owner {
            Some((_, "ReplicaSet", name)) => {
                match label("pod-template-hash").and_then(|h| deployment_of(name, h)) {
                    Some(deployment) => ("Deployment".to_owned(), deployment.to_owned()),
                    None => ("ReplicaSet".to_owned(), name.to_owned()),
                }
            }
            // The Job controller labels its pods with their Job's name.
            Some((Some("batch"), "Job", name))
                if [label("batch.kubernetes.io/job-name"), label("job-name")]
                    .contains(&Some(name)) =>
            {
                match cronjob_of(name, now) {
                    Some(cronjob) => ("CronJob".to_owned(), cronjob.to_owned()),
                    None => ("Job".to_owned(), name.to_owned()),
                }
            }
            Some((_, kind, name)) => (kind.to_owned(), name.to_owned()),
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
            kind: cut(kind),
            name: cut(name),
        }
    }
}

/// The Deployment a ReplicaSet named `replica_set` belongs to, when its
/// name is the Deployment's and the pod template's `hash`.
fn deployment_of<'a>(replica_set: &'a str, hash: &str) -> Option<&'a str> {
    replica_set
        .strip_suffix(hash)?
        .strip_suffix('-')
        .filter(|name| !name.is_empty())
}

/// The longest name of a CronJob: the API server refuses longer ones, so
/// that a run's Job name, 11 characters more, is a valid label value.
const MAX_CRONJOB_NAME: usize = 52;

/// How long after its scheduled minute a CronJob's run may create pods to
/// be told by its name: a run starts at that minute, or as soon after as
/// the controller catches up, and its Job retries failed pods within
/// minutes. A pod created later is its Job's.
const RUN_MINUTES: i64 = 24 * 60;

/// How far the clock of the controllers may run ahead of this one.
const SKEW_MINUTES: i64 = 5;

/// The CronJob whose run a Job named `job` is, at `now` (Unix seconds):
/// the CronJob controller names a run's Job after the CronJob and the
/// scheduled time in minutes since the epoch (`backup-29412345`), with no
/// leading zero. The pod alone does not say whether a CronJob made its
/// Job, so the name must be one only a run scheduled in the last
/// [`RUN_MINUTES`] (and up to [`SKEW_MINUTES`] ahead) has: a plain Job
/// `backup-2`, `backup-20240101` or `backup-1765000000` is never taken for
/// a run of `backup`; one named after the minute it runs in would be.
fn cronjob_of(job: &str, now: i64) -> Option<&str> {
    let (cronjob, minute) = job.rsplit_once('-')?;
    if cronjob.is_empty()
        || cronjob.len() > MAX_CRONJOB_NAME
        || minute.starts_with('0')
        || !minute.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let minute: i64 = minute.parse().ok()?;
    let now = now.div_euclid(60);
    (now - RUN_MINUTES..=now + SKEW_MINUTES)
        .contains(&minute)
        .then_some(cronjob)
}

/// Pods admitted without a sidecar because of a `trellis.io/inject` label
/// whose value is neither `enabled` nor `disabled`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UninjectedPod {
    /// Whose pods: the entry ends when a pod of theirs is injected.
    pub owner: Owner,
    /// Whose label: [`UnknownInjectValue::PodLabel`] or
    /// [`UnknownInjectValue::NamespaceLabel`].
    pub found: UnknownInjectValue,
    /// The pod's label's value; `None` for a namespace's label, which the
    /// webhook cannot read.
    pub value: Option<String>,
}

impl UninjectedPod {
    /// The pod `pod` of a review in `namespace` at `now` (Unix seconds),
    /// admitted because of the label `found` with `value`.
    pub(super) fn of(
        namespace: &str,
        pod: &Value,
        now: i64,
        found: UnknownInjectValue,
        value: Option<String>,
    ) -> Self {
        Self {
            owner: Owner::of(namespace, pod, now),
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

/// The entries, at most [`MAX_ENTRIES`], and the owners injected lately,
/// at most [`MAX_INJECTED`]; shared by the webhook server, which records,
/// and the Admin and Replica services, which list.
#[derive(Debug, Default)]
pub struct UninjectedPods {
    recorded: Mutex<Recorded>,
}

#[derive(Debug, Default)]
struct Recorded {
    entries: HashMap<UninjectedPod, Admitted>,
    /// When each owner's last pod was injected, Unix seconds.
    injected: HashMap<Owner, i64>,
}

impl UninjectedPods {
    /// One more pod of `pod`'s entry admitted at `now` (Unix seconds). A
    /// new entry past [`MAX_ENTRIES`] takes the place of the one admitted
    /// least lately.
    pub fn record(&self, pod: UninjectedPod, now: i64) {
        let mut recorded = self.recorded.lock().expect("not poisoned");
        // Admitted after this replica's last injection of the owner, if
        // in the same second: the join must not take the entry for older.
        if let Some(at) = recorded.injected.get_mut(&pod.owner)
            && *at >= now
        {
            *at = now - 1;
        }
        let entries = &mut recorded.entries;
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

    /// A pod of `owner` injected at `now` (Unix seconds): the owner's
    /// entries end, and it is remembered as injected then. An owner new
    /// past [`MAX_INJECTED`] takes the place of the one injected least
    /// lately.
    pub fn injected(&self, owner: Owner, now: i64) {
        let mut recorded = self.recorded.lock().expect("not poisoned");
        recorded.entries.retain(|pod, _| pod.owner != owner);
        let injected = &mut recorded.injected;
        if let Some(at) = injected.get_mut(&owner) {
            *at = (*at).max(now);
            return;
        }
        if injected.len() >= MAX_INJECTED {
            let oldest = injected
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(owner, _)| owner.clone());
            if let Some(oldest) = oldest {
                injected.remove(&oldest);
            }
        }
        injected.insert(owner, now);
    }

    /// Every entry, last admitted first.
    pub fn recent(&self) -> Vec<(UninjectedPod, Admitted)> {
        let recorded = self.recorded.lock().expect("not poisoned");
        let mut recent: Vec<_> = (recorded.entries.iter())
            .map(|(p, a)| (p.clone(), *a))
            .collect();
        drop(recorded);
        recent.sort_by(|a, b| b.1.last_unix.cmp(&a.1.last_unix).then(a.0.cmp(&b.0)));
        recent
    }

    /// Every owner injected lately, with when its last pod was, last
    /// injected first.
    pub fn injected_owners(&self) -> Vec<(Owner, i64)> {
        let recorded = self.recorded.lock().expect("not poisoned");
        let mut owners: Vec<_> = (recorded.injected.iter())
            .map(|(o, at)| (o.clone(), *at))
            .collect();
        drop(recorded);
        owners.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        owners
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// 2026-12-01T00:00:00Z.
    const NOW: i64 = 1_764_547_200;

    fn pod_of(name: &str) -> UninjectedPod {
        UninjectedPod {
            owner: Owner {
                namespace: "shop".into(),
                kind: "ReplicaSet".into(),
                name: name.into(),
            },
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
        assert_eq!(recent[0].0.owner.name, "new");
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
        assert!(!recent.iter().any(|(p, _)| p.owner.name == "web-1"));
        assert!(recent.iter().any(|(p, _)| p.owner.name == "web-2"));
    }

    /// An injected pod of an owner ends its entries, whatever their label
    /// and value, and no other owner's; the owner is remembered as
    /// injected then. An entry admitted after an injection in the same
    /// second is not taken for older than it.
    #[test]
    fn an_injected_pod_ends_its_owners_entries() {
        let recorded = UninjectedPods::default();
        let mut namespace_label = pod_of("web");
        namespace_label.found = UnknownInjectValue::NamespaceLabel;
        namespace_label.value = None;
        recorded.record(pod_of("web"), 1000);
        recorded.record(namespace_label, 1001);
        recorded.record(pod_of("api"), 1002);
        let mut elsewhere = pod_of("web");
        elsewhere.owner.namespace = "other".into();
        recorded.record(elsewhere.clone(), 1003);
        let web = Owner {
            namespace: "shop".into(),
            kind: "ReplicaSet".into(),
            name: "web".into(),
        };
        recorded.injected(web.clone(), 1010);
        let left: Vec<_> = recorded.recent().into_iter().map(|(p, _)| p).collect();
        assert_eq!(left, [elsewhere, pod_of("api")]);
        assert_eq!(recorded.injected_owners(), [(web.clone(), 1010)]);

        recorded.record(pod_of("web"), 1010);
        assert_eq!(recorded.injected_owners(), [(web, 1009)]);
    }

    /// Past the bound, the owner injected least lately makes way.
    #[test]
    fn injected_owners_are_bounded() {
        let recorded = UninjectedPods::default();
        let owner = |i: usize| Owner {
            namespace: "shop".into(),
            kind: "StatefulSet".into(),
            name: format!("db-{i}"),
        };
        for i in 0..MAX_INJECTED {
            recorded.injected(owner(i), 1000 + i as i64);
        }
        recorded.injected(owner(0), 5000);
        recorded.injected(owner(MAX_INJECTED), 6000);
        let owners = recorded.injected_owners();
        assert_eq!(owners.len(), MAX_INJECTED);
        assert_eq!(owners[..2], [(owner(MAX_INJECTED), 6000), (owner(0), 5000)]);
        assert!(!owners.iter().any(|(o, _)| *o == owner(1)));
    }

    /// The controlling owner names the pods; a Deployment's ReplicaSet,
    /// by its name and the pods' pod-template-hash, is the Deployment; a
    /// pod without owners is named by its name, or its generateName; text
    /// is cut at the bound.
    #[test]
    fn the_owner_is_the_controller_else_the_pod() {
        let owned = json!({"metadata": {
            "generateName": "web-7d9f-",
            "ownerReferences": [
                {"kind": "Other", "name": "x"},
                {"kind": "ReplicaSet", "name": "web-7d9f", "controller": true},
            ],
        }});
        let found = UninjectedPod::of("shop", &owned, NOW, UnknownInjectValue::PodLabel, None);
        assert_eq!(
            (found.owner.kind.as_str(), found.owner.name.as_str()),
            ("ReplicaSet", "web-7d9f")
        );
        let of_deployment = |hash: &str| {
            let pod = json!({"metadata": {
                "labels": {"pod-template-hash": hash},
                "ownerReferences": [
                    {"kind": "ReplicaSet", "name": "web-api-7d9f", "controller": true},
                ],
            }});
            let owner = Owner::of("shop", &pod, NOW);
            (owner.kind, owner.name)
        };
        assert_eq!(
            of_deployment("7d9f"),
            ("Deployment".into(), "web-api".into())
        );
        assert_eq!(
            of_deployment("8e0a"),
            ("ReplicaSet".into(), "web-api-7d9f".into())
        );
        assert_eq!(
            of_deployment(""),
            ("ReplicaSet".into(), "web-api-7d9f".into())
        );
        let named = json!({"metadata": {"name": "debug", "namespace": "legacy"}});
        let found = UninjectedPod::of("", &named, NOW, UnknownInjectValue::NamespaceLabel, None);
        assert_eq!(
            (
                found.owner.namespace.as_str(),
                found.owner.kind.as_str(),
                found.owner.name.as_str()
            ),
            ("legacy", "Pod", "debug")
        );
        let generated = json!({"metadata": {"generateName": "job-"}});
        let long = "é".repeat(200);
        let found = UninjectedPod::of(
            "shop",
            &generated,
            NOW,
            UnknownInjectValue::PodLabel,
            Some(long),
        );
        assert_eq!(found.owner.name, "job-*");
        assert_eq!(found.value.unwrap(), "é".repeat(MAX_TEXT_BYTES / 2));
    }

    /// A Job's pod, as the Job controller labels it, is its CronJob's when
    /// the Job is named after a CronJob and a minute since the epoch no
    /// more than a day before now (or a few minutes after): the run's
    /// name. Any other Job is itself: a number that is no such minute
    /// (`backup-2`, a date, seconds since the epoch, a leading zero), a
    /// run too long ago, a Job of another group, or a pod whose labels
    /// do not name its Job.
    #[test]
    fn a_cronjobs_run_is_its_cronjob() {
        let minute = NOW / 60;
        let of_job = |job: &str, api_version: &str, labelled: &str| {
            let pod = json!({"metadata": {
                "generateName": format!("{job}-"),
                "labels": {
                    "batch.kubernetes.io/controller-uid": "8d1f0c2e-7a43-4b5e-9c61-2f3a4b5c6d7e",
                    "batch.kubernetes.io/job-name": labelled,
                    "controller-uid": "8d1f0c2e-7a43-4b5e-9c61-2f3a4b5c6d7e",
                    "job-name": labelled,
                },
                "ownerReferences": [{
                    "apiVersion": api_version,
                    "kind": "Job",
                    "name": job,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            }});
            let owner = Owner::of("shop", &pod, NOW);
            format!("{} {}", owner.kind, owner.name)
        };
        let run = |job: &str| of_job(job, "batch/v1", job);
        assert_eq!(run(&format!("backup-{minute}")), "CronJob backup");
        assert_eq!(
            run(&format!("nightly-db-backup-{}", minute - 23 * 60)),
            "CronJob nightly-db-backup"
        );
        assert_eq!(run(&format!("backup-{}", minute + 5)), "CronJob backup");
        let longest = "c".repeat(MAX_CRONJOB_NAME);
        assert_eq!(
            run(&format!("{longest}-{minute}")),
            format!("CronJob {longest}")
        );
        for job in [
            "backup-2".to_owned(),
            "backup-20261201".to_owned(),
            format!("backup-{NOW}"),
            format!("backup-0{minute}"),
            format!("backup-{}", minute - 24 * 60 - 1),
            format!("backup-{}", minute + 6),
            format!("-{minute}"),
            format!("backup-{minute}x"),
            format!("{}c-{minute}", longest),
            "backup".to_owned(),
        ] {
            assert_eq!(run(&job), format!("Job {job}"));
        }
        let job = format!("backup-{minute}");
        assert_eq!(of_job(&job, "example.com/v1", &job), format!("Job {job}"));
        assert_eq!(of_job(&job, "batch/v1", "other"), format!("Job {job}"));
        // The legacy label alone names the Job as well.
        let pod = json!({"metadata": {
            "labels": {"job-name": job},
            "ownerReferences": [
                {"apiVersion": "batch/v1", "kind": "Job", "name": job, "controller": true},
            ],
        }});
        let owner = Owner::of("shop", &pod, NOW);
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("CronJob", "backup")
        );
    }
}
