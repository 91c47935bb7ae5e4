//! Watches: one task per kind keeps the [`Cache`] equal to what the API
//! server holds, with kube-rs's watcher (list, then watch from the list's
//! resourceVersion, with bookmarks; a `410 Gone` or a broken stream means a
//! fresh list, which replaces the kind whole).
//!
//! Each task also says how its watch fares ([`WatchHealth`]): a watch is
//! failing from an error until it delivers an event or a complete list
//! again. After an error the task starts the watcher again, from a list,
//! once its backoff has passed: kube-rs resumes a watch without a word
//! when it succeeds, and a list is what shows that the kind is read again
//! (and brings everything missed meanwhile).
//!
//! A policy kind's position (see [`Cache::reached`]) moves with each
//! object's resourceVersion. A re-list shows a deletion made while the
//! watch was away only by leaving the object out, and kube-rs does not say
//! at which resourceVersion it listed: the position would stay below the
//! deletion, and a `--wait` for it would run to its deadline. So after a
//! re-list of a policy kind the task lists the kind once more, from the API
//! server's latest state: when that list names the same objects at the same
//! resourceVersions, nothing changed in between, and the position moves to
//! its resourceVersion, past any deletion the re-list reflected. When it
//! differs, the changes in between are on their way through the watch, and
//! their resourceVersions move the position past the deletion.
//!
//! Each object is turned into an [`Entry`] by the kind's conversion, told
//! whether the cache already holds the object at the resourceVersion read
//! ([`Reading`]): a re-list brings back every object, changed or not, so
//! what a conversion says of an object (a stored policy enforced relaxed)
//! it says once per change of the object, not again with every re-list of
//! a long-running replica. The cache holds each valid object's
//! resourceVersion and forgets it with the object; of an object that does
//! not convert (a policy that fails `policy lint`) it holds the last valid
//! version, so the watch task remembers beside it the resourceVersion it
//! last read such an object at ([`Skipped`]): it is logged once per change
//! too, and never stops the watch. It is never pushed: a policy keeps
//! its last valid version in force (a DENY edited by a newer release, or
//! past a webhook that was down, must not vanish), any other object is
//! held as absent. After every change of content the new version is announced.
//! Errors before the first full list are returned to start-up; later ones
//! are logged and retried with backoff while the cache keeps serving what
//! it holds, and the health says for how long.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ListParams};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, watch};
use trellis_core::duration::Words;

use super::cache::{Cache, Entry, Kind, Reflected, numeric};
use super::objects::object_key;

/// The shortest and longest wait before polling a failed watch again.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the list that follows a re-list of a policy kind may take.
const CHECK_LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// The cache and its announcements, shared by the watch tasks and the store.
#[derive(Debug)]
pub struct Shared {
    pub cache: RwLock<Cache>,
    /// The version after every change of content.
    pub changes: watch::Sender<u64>,
    pub health: Arc<WatchHealth>,
}

impl Shared {
    /// A policy kind whose watch fails for longer than `unready_after`
    /// may make the replica not ready ([`WatchHealth::unready`]).
    pub fn new(unready_after: Duration) -> Self {
        let cache = Cache::default();
        let version = cache.version();
        Self {
            cache: RwLock::new(cache),
            changes: watch::Sender::new(version),
            health: Arc::new(WatchHealth::new(unready_after)),
        }
    }

    /// Runs `f` on the cache and announces the version when it says the
    /// content changed.
    pub fn update(&self, f: impl FnOnce(&mut Cache) -> bool) -> u64 {
        let mut cache = self.cache.write().expect("not poisoned");
        let changed = f(&mut cache);
        let version = cache.version();
        drop(cache);
        if changed {
            self.changes.send_replace(version);
        }
        version
    }

    pub fn read<T>(&self, f: impl FnOnce(&Cache) -> T) -> T {
        f(&self.cache.read().expect("not poisoned"))
    }
}

/// How each kind's watch fares: since when it has been failing, if it is.
/// A watch is failing from an error until it next delivers an event or a
/// complete list; meanwhile the cache serves what it last saw of the kind.
#[derive(Debug)]
pub struct WatchHealth {
    failing_since: Mutex<BTreeMap<Kind, Option<Instant>>>,
    unready_after: Duration,
    /// How many times [`unready`](Self::unready) has had its reason
    /// taken away by a recovery; changed under `failing_since`'s lock.
    recoveries: AtomicU64,
}

impl WatchHealth {
    pub(crate) fn new(unready_after: Duration) -> Self {
        Self {
            failing_since: Mutex::new(Kind::ALL.into_iter().map(|k| (k, None)).collect()),
            unready_after,
            recoveries: AtomicU64::new(0),
        }
    }

    /// The watch of `kind` failed at `at`; it has been failing since its
    /// first error after its last success.
    pub(crate) fn failed(&self, kind: Kind, at: Instant) {
        let mut failing = self.failing_since.lock().expect("not poisoned");
        failing.entry(kind).or_default().get_or_insert(at);
    }

    /// The watch of `kind` delivered an event or a complete list. A
    /// policy kind's recovery that leaves none failing past its grace ends
    /// the outage [`unready`](Self::unready) spoke of: counted in
    /// [`recoveries`](Self::recoveries).
    pub(crate) fn succeeded(&self, kind: Kind) {
        let mut failing = self.failing_since.lock().expect("not poisoned");
        let was_failing = failing.insert(kind, None).flatten().is_some();
        // Most events are of a watch that was not failing: no more to do.
        if !(kind.is_policy() && was_failing) {
            return;
        }
        let still_stale = failing.iter().any(|(kind, since)| {
            kind.is_policy() && since.is_some_and(|at| at.elapsed() > self.unready_after)
        });
        if !still_stale {
            self.recoveries.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// How many times a policy kind's watch has recovered leaving none
    /// failing past its grace: a number that changes whenever an outage
    /// [`unready`](Self::unready) spoke of ends, even one that ended and
    /// began again between two looks at it.
    pub fn recoveries(&self) -> u64 {
        self.recoveries.load(Ordering::Acquire)
    }

    /// Every watched kind and how long its watch has been failing (`None`:
    /// it is not).
    pub fn failing(&self) -> Vec<(Kind, Option<Duration>)> {
        let failing = self.failing_since.lock().expect("not poisoned");
        failing
            .iter()
            .map(|(kind, since)| (*kind, since.map(|at| at.elapsed())))
            .collect()
    }

    /// Whether the watch of every policy kind works now: the policies
    /// served are as current as the API server's.
    pub fn policies_current(&self) -> bool {
        let failing = self.failing_since.lock().expect("not poisoned");
        failing
            .iter()
            .all(|(kind, since)| !kind.is_policy() || since.is_none())
    }

    /// Why this replica may be a worse place for new sidecars than a
    /// peer whose policies are current: the watch of a policy kind has
    /// been failing for longer than the grace it was given, so the
    /// policies it would push may be stale (one deleted meanwhile still
    /// allowed). `None` when every policy kind's watch works, or has
    /// failed for less. Whether the replica then goes unready is
    /// [`Readiness`](crate::readiness::Readiness)'s to say.
    pub fn unready(&self) -> Option<String> {
        let stale: Vec<String> = self
            .failing()
            .into_iter()
            .filter(|(kind, _)| kind.is_policy())
            .filter_map(|(kind, failing)| {
                let failing = failing.filter(|d| *d > self.unready_after)?;
                Some(format!(
                    "the {} watch has been failing for {}",
                    kind.as_str(),
                    Words(Duration::from_secs(failing.as_secs()))
                ))
            })
            .collect();
        (!stale.is_empty())
            .then(|| format!("{}: the policies served may be stale", stale.join(", ")))
    }
}

/// How one kind's objects become entries: `Err` is why an object is
/// skipped (logged), `Ok(None)` an object that contributes nothing.
pub type Convert<K> = Box<dyn Fn(&K, Reading) -> Result<Option<Entry>, String> + Send + Sync>;

/// Whether an object is read at a resourceVersion not read for it yet
/// (created or changed, or first listed), or again (a re-list of an
/// unchanged object, valid or not, the watch's echo of this replica's own
/// write): what is logged of an object is logged on its first reading only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reading {
    First,
    Again,
}

/// The objects of one kind whose last reading did not convert, each with
/// the resourceVersion it was read at: the cache holds such an object at
/// its last valid resourceVersion, or not at all, so this is what tells a
/// re-list of it, unchanged, from a change that still fails. Bounded by
/// the objects of the kind that fail now: an object leaves it when it is
/// read valid, deleted, or left out of a list.
#[derive(Debug, Default)]
struct Skipped(BTreeMap<String, String>);

impl Skipped {
    /// Whether the last reading of `key` did not convert, at `resource_version`.
    fn read_at(&self, key: &str, resource_version: &str) -> bool {
        self.0.get(key).is_some_and(|at| at == resource_version)
    }

    /// `key` did not convert at `resource_version`.
    fn failed(&mut self, key: String, resource_version: &str) {
        self.0.insert(key, resource_version.to_owned());
    }

    /// `key` converted, or is gone.
    fn forget(&mut self, key: &str) {
        self.0.remove(key);
    }

    /// Forgets every object but those the list just read did not convert.
    fn keep_listed(&mut self, invalid: &BTreeSet<String>) {
        self.0.retain(|key, _| invalid.contains(key));
    }
}

/// What one object became.
enum Read {
    Entry(Reflected),
    /// An object that contributes nothing (a Pod without a sidecar).
    Nothing,
    /// An object its conversion refused (logged).
    Invalid,
}

/// Reads one object into what the cache holds, and remembers in `skipped`
/// whether it converted.
fn reflected<K: Resource>(
    kind: Kind,
    object: &K,
    convert: &Convert<K>,
    shared: &Shared,
    skipped: &mut Skipped,
) -> Read {
    let key = object_key(object);
    let resource_version = object.resource_version().unwrap_or_default();
    let held = skipped.read_at(&key, &resource_version)
        || shared
            .read(|cache| cache.resource_version(kind, &key) == Some(resource_version.as_str()));
    let reading = if held { Reading::Again } else { Reading::First };
    let entry = match convert(object, reading) {
        Ok(Some(entry)) => entry,
        Ok(None) => {
            skipped.forget(&key);
            return Read::Nothing;
        }
        Err(reason) => {
            let kept = if kind.is_policy() {
                "its last valid version, if any, stays in force until it is fixed or deleted"
            } else {
                "it is not pushed to any sidecar until it is fixed"
            };
            if reading == Reading::First {
                tracing::warn!(
                    kind = kind.as_str(),
                    object = %key,
                    resource_version,
                    reason,
                    kept,
                    "skipped an invalid object"
                );
            }
            skipped.failed(key, &resource_version);
            return Read::Invalid;
        }
    };
    skipped.forget(&key);
    Read::Entry(Reflected {
        resource_version,
        entry,
    })
}

/// The resourceVersion of a list of `kind` read now, if it names exactly
/// the objects of `listed`, at the same resourceVersions: then nothing of
/// the kind changed between the two lists, and a cache that holds the first
/// holds every change up to the second. `None` when it differs or cannot
/// be read (the watch's own events move the position then).
async fn unchanged_since<K>(api: &Api<K>, kind: Kind, listed: &BTreeMap<String, u64>) -> Option<u64>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let fresh = match tokio::time::timeout(CHECK_LIST_TIMEOUT, api.list(&ListParams::default()))
        .await
    {
        Ok(Ok(fresh)) => fresh,
        Ok(Err(e)) => {
            tracing::debug!(kind = kind.as_str(), error = %e, "listing again after a re-list failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(
                kind = kind.as_str(),
                "listing again after a re-list timed out"
            );
            return None;
        }
    };
    let at = numeric(fresh.metadata.resource_version.as_deref());
    let same = fresh.items.len() == listed.len()
        && fresh.items.iter().all(|object| {
            listed.get(&object_key(object)) == Some(&numeric(object.resource_version().as_deref()))
        });
    (same && at > 0).then_some(at)
}

/// Keeps `kind` in the cache until the task is aborted. `first` gets the
/// outcome of the first full list.
pub async fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: Convert<K>,
    shared: Arc<Shared>,
    first: oneshot::Sender<Result<(), watcher::Error>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut first = Some(first);
    let mut backoff = BACKOFF_MIN;
    let lister = api.clone();
    let mut skipped = Skipped::default();
    loop {
        let mut listing: Option<BTreeMap<String, Reflected>> = None;
        // For a policy kind, every object of the list being read (those
        // that do not convert too) at its resourceVersion: the newest of
        // them is where the list brings the position, and after a re-list
        // they are what the check compares with.
        let mut listed_versions: BTreeMap<String, u64> = BTreeMap::new();
        // Objects of the list in progress that did not convert.
        let mut invalid: BTreeSet<String> = BTreeSet::new();
        let stream = watcher(api.clone(), config.clone());
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    if let Some(first) = first.take() {
                        let _ = first.send(Err(e));
                        return;
                    }
                    shared.health.failed(kind, Instant::now());
                    tracing::warn!(kind = kind.as_str(), error = %e, retry_in = ?backoff, "watch failed; serving what was last seen");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    break;
                }
            };
            // `Init` comes before the list is asked for, and one object
            // of a list is no complete list.
            if !matches!(event, Event::Init | Event::InitApply(_)) {
                shared.health.succeeded(kind);
                backoff = BACKOFF_MIN;
            }
            match event {
                Event::Init => {
                    listing = Some(BTreeMap::new());
                    listed_versions.clear();
                    invalid.clear();
                }
                Event::InitApply(object) => {
                    if kind.is_policy() {
                        let at = numeric(object.resource_version().as_deref());
                        listed_versions.insert(object_key(&object), at);
                    }
                    match reflected(kind, &object, &convert, &shared, &mut skipped) {
                        Read::Entry(found) => {
                            listing
                                .get_or_insert_with(BTreeMap::new)
                                .insert(object_key(&object), found);
                        }
                        Read::Invalid => {
                            invalid.insert(object_key(&object));
                        }
                        Read::Nothing => {}
                    }
                }
                Event::InitDone => {
                    let mut listed = listing.take().unwrap_or_default();
                    let invalid = std::mem::take(&mut invalid);
                    skipped.keep_listed(&invalid);
                    // A policy that no longer converts (edited by a newer
                    // release, or past a webhook that was down) keeps its
                    // last valid version, as a sidecar keeps its last good
                    // snapshot: a DENY must not vanish for being edited.
                    if kind.is_policy() {
                        shared.read(|cache| {
                            for key in invalid {
                                if let Some(held) = cache.held(kind, &key) {
                                    listed.insert(key, held);
                                }
                            }
                        });
                    }
                    let count = listed.len();
                    // A list says nothing of deletions since the last
                    // event: the position moves to the newest object listed.
                    let listed_up_to = listed_versions.values().copied().max().unwrap_or(0);
                    let version = shared.update(|cache| {
                        let changed = cache.replace(kind, listed);
                        cache.reached(kind, listed_up_to) || changed
                    });
                    tracing::info!(kind = kind.as_str(), count, version, "listed");
                    match first.take() {
                        Some(first) => {
                            let _ = first.send(Ok(()));
                        }
                        None if kind.is_policy() => {
                            if let Some(at) = unchanged_since(&lister, kind, &listed_versions).await
                            {
                                shared.update(|cache| cache.reached(kind, at));
                            }
                        }
                        None => {}
                    }
                }
                Event::Apply(object) => {
                    let found = reflected(kind, &object, &convert, &shared, &mut skipped);
                    let key = object_key(&object);
                    let at = numeric(object.resource_version().as_deref());
                    // The echo of this replica's own write changes no
                    // content, but moves the position: announced all the
                    // same. A policy that no longer converts keeps its
                    // last valid version (see the list above).
                    shared.update(|cache| {
                        let changed = match found {
                            Read::Entry(found) => cache.apply(kind, &key, Some(found)),
                            Read::Invalid if kind.is_policy() => false,
                            Read::Invalid | Read::Nothing => cache.apply(kind, &key, None),
                        };
                        cache.reached(kind, at) || changed
                    });
                }
                Event::Delete(object) => {
                    let key = object_key(&object);
                    skipped.forget(&key);
                    let at = numeric(object.resource_version().as_deref());
                    shared.update(|cache| {
                        let changed = cache.remove(kind, &key);
                        cache.reached(kind, at) || changed
                    });
                }
            }
        }
    }
}
