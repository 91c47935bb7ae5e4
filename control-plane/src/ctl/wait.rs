//! `trellisctl policy apply --wait`: after a write, wait until every
//! connected sidecar, on every control-plane replica, holds the snapshot
//! that carries it.
//!
//! The wait asks `ListWorkloads` again and again (which joins every
//! replica's streams), naming the write's store position (and its
//! snapshot version). It is over when every replica that answered serves
//! content that reaches that position and every connected sidecar holds
//! such content. Positions are ordered where versions are not (the
//! Kubernetes store's are digests): a replica that saw the write together
//! with, or after, changes the writing replica had not seen never serves
//! the write's version but does hold the write, and a change that comes
//! after the write (a pod starting, another policy) does not keep the wait
//! from ending. It fails at its deadline naming what is not there yet, or
//! as soon as what is missing is only sidecars that refused the snapshot
//! and have kept refusing it for [`REFUSAL_STANDS`]. A control plane that
//! predates positions is asked by version (each replica remembers the
//! order in which it served its versions); one that predates `reached` is
//! compared by version, for equality.
//!
//! Each replica judges its own streams. Across them, a snapshot version is
//! compared with the epoch it was set in where both epochs are known
//! ([`super::same_snapshot`]): a replica serving, or a sidecar holding,
//! the write's version number set in another epoch than the write's
//! (after a restore of the embedded database from a backup, versions count
//! again in another epoch, with other content) does not hold the write,
//! and is waited for and named. The write's epoch is the one the write
//! returned; a control plane that predates it returns none, and then the
//! version the answering replica serves, with its epoch, stands for it.
//! Where either epoch is 0 (the Kubernetes store sets none; a replica or
//! stream that predates epochs reports none) the numbers alone are
//! compared, as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_proto::admin::v1::admin_client::AdminClient;
use trellis_proto::admin::v1::{
    ListWorkloadsRequest, ListWorkloadsResponse, SnapshotSync, StorePosition,
};

use super::CtlError;

/// Between two asks.
const POLL: Duration = Duration::from_millis(200);

/// A refusal seen this long is taken as the sidecar's answer: the snapshot
/// was sent to it and it said no, which another ask will not change.
pub const REFUSAL_STANDS: Duration = Duration::from_secs(2);

/// What a write returned, for the wait to ask about.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    /// The first snapshot version that holds the write.
    pub version: u64,
    /// The epoch `version` was set in; 0 from a store that sets none (the
    /// Kubernetes store) or a control plane that predates it.
    pub epoch: u64,
    /// Where the write stands in the store's history; `None` from a
    /// control plane that predates positions.
    pub position: Option<StorePosition>,
}

/// Where the fleet stands against the applied version.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Standing {
    /// Connected sidecars that hold it.
    pub holding: usize,
    /// Replicas that answered.
    pub replicas: usize,
    /// What is not there yet, a line each.
    pub missing: Vec<String>,
    /// The SPIFFE IDs that refused their newest snapshot.
    pub refused: Vec<String>,
    /// Replicas nothing listened for (starting, stopping or gone), a line
    /// each: they hold no sidecar stream, and one starting loads the
    /// write before it serves, so the wait does not wait for them.
    pub not_listening: Vec<String>,
}

/// How a wait ended.
#[derive(Clone, Copy, Debug)]
pub enum Over {
    /// Every connected sidecar holds the write, after this long.
    Held(Duration),
    /// All that is missing is refusals that stand.
    Refused,
    /// The deadline, this long, came first.
    Late(Duration),
}

impl Standing {
    /// Counts a replica that answered, serving `serves`, as missing unless
    /// it has `reached` the write of `version`.
    fn serving(&mut self, name: &str, reached: bool, serves: u64, version: u64) {
        self.replicas += 1;
        if !reached {
            self.missing.push(format!(
                "{name} serves snapshot {serves}, which does not hold the write (snapshot {version}) yet"
            ));
        }
    }

    /// What the wait prints as it ends (`over`): the sidecars and replicas
    /// that hold the write, or what is missing, a line each; then, either
    /// way, each replica nothing listened for.
    pub fn told(&self, version: u64, over: Over) -> String {
        let mut text = match over {
            Over::Held(after) => format!(
                "every connected sidecar holds snapshot {version} or a later one: {} on {} replica{} (after {})\n",
                self.holding,
                self.replicas,
                if self.replicas == 1 { "" } else { "s" },
                trellis_core::duration::words(to_tenths(after))
            ),
            Over::Refused => format!("not every connected sidecar holds snapshot {version}:\n"),
            Over::Late(timeout) => format!(
                "not every connected sidecar holds snapshot {version} after {}:\n",
                trellis_core::duration::words(timeout)
            ),
        };
        let mut missing: Vec<&String> = self.missing.iter().collect();
        missing.sort();
        for line in missing.into_iter().chain(&self.not_listening) {
            text.push_str("  ");
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// `d` to the nearest tenth of a second, as long as a wait that held is
/// said to have taken: the time it took to ask, not to the nanosecond.
fn to_tenths(d: Duration) -> Duration {
    let tenths = (d.as_millis() + 50) / 100;
    Duration::from_millis(u64::try_from(tenths * 100).unwrap_or(u64::MAX))
}

/// Where one `ListWorkloads` answer, asked with `reached_version` the
/// version of `written` (a snapshot version with the epoch it was set
/// in), stands against it.
pub fn standing(answer: &ListWorkloadsResponse, written: (u64, u64)) -> Standing {
    let version = written.0;
    let mut standing = Standing::default();
    // A control plane that predates the replica list is one replica, and
    // knows no `reached`: its version must be the one applied.
    let ordered = !answer.replicas.is_empty();
    if !ordered {
        let serves = answer.snapshot_version;
        standing.serving("the control plane", serves == version, serves, version);
    }
    // What a replica's or a sidecar's version is told apart from by epoch:
    // the write's own, or, from a control plane that returned no epoch with
    // it, what the answering replica serves now.
    let (against, named) = match written.1 {
        0 => {
            let served = (answer.snapshot_version, answer.snapshot_version_epoch);
            let shown = super::version_shown(served.0, served.1);
            (served, format!("the {shown} the answering replica serves"))
        }
        _ => (
            written,
            format!("the write's {}", super::version_shown(written.0, written.1)),
        ),
    };
    for r in &answer.replicas {
        let serves = (r.snapshot_version, r.snapshot_version_epoch);
        if r.not_listening {
            standing.not_listening.push(format!(
                "{}: it holds no sidecar stream, and loads the write if it starts",
                super::unanswered(r)
            ));
        } else if !r.error.is_empty() {
            standing.missing.push(super::unanswered(r));
        } else if super::same_number_other_epoch(serves, against) {
            standing.replicas += 1;
            standing.missing.push(format!(
                "{} serves snapshot {}, of another database epoch than {named}, with other \
                 content: it does not hold the write",
                super::replica_label(r),
                super::version_shown(serves.0, serves.1),
            ));
        } else {
            let name = super::replica_label(r);
            standing.serving(&name, r.reached, r.snapshot_version, version);
        }
    }
    for w in answer.workloads.iter().filter(|w| w.connected) {
        // Which replica, when there is more than one to tell apart.
        let on = match w.replicas.is_empty() || answer.replicas.len() < 2 {
            true => String::new(),
            false => format!(" (on {})", w.replicas.join(",")),
        };
        let held = (w.synced_version, w.synced_version_epoch);
        let holds = match ordered {
            true => w.reached,
            false => w.sync() == SnapshotSync::Synced,
        };
        let other_epoch = super::same_number_other_epoch(held, against);
        if holds && !other_epoch {
            standing.holding += 1;
        } else if w.sync() == SnapshotSync::Refused {
            standing.missing.push(format!(
                "{}{on} refused its newest snapshot: {}",
                w.spiffe_id, w.last_nack
            ));
            standing.refused.push(w.spiffe_id.clone());
        } else if other_epoch {
            standing.missing.push(format!(
                "{}{on} holds version {} of another database epoch ({}, not {named}), with \
                 other content, not the write",
                w.spiffe_id,
                held.0,
                super::version_shown(held.0, held.1),
            ));
        } else {
            standing
                .missing
                .push(format!("{}{on} does not hold it yet", w.spiffe_id));
        }
    }
    // The lines hold what the replicas and sidecars sent (SPIFFE IDs,
    // reasons): escaped, so none can drive the terminal.
    for line in standing
        .missing
        .iter_mut()
        .chain(&mut standing.not_listening)
    {
        *line = super::escape_controls(line);
    }
    standing
}

/// Waits up to `timeout` for every connected sidecar to hold the write:
/// what to print, and whether it failed.
pub async fn wait_for(
    client: &mut AdminClient<Channel>,
    written: Written,
    timeout: Duration,
) -> Result<(String, bool), CtlError> {
    let version = written.version;
    let start = Instant::now();
    let mut refused_since = HashMap::<String, Instant>::new();
    loop {
        let answer = client
            .list_workloads(ListWorkloadsRequest {
                reached_version: version,
                reached_position: written.position,
            })
            .await?
            .into_inner();
        let now = Instant::now();
        let standing = standing(&answer, (version, written.epoch));
        if standing.missing.is_empty() {
            let held = Over::Held(now.duration_since(start));
            return Ok((standing.told(version, held), false));
        }
        refused_since.retain(|id, _| standing.refused.contains(id));
        for id in &standing.refused {
            refused_since.entry(id.clone()).or_insert(now);
        }
        let refusals_stand = standing.missing.len() == standing.refused.len()
            && refused_since
                .values()
                .all(|since| now.duration_since(*since) >= REFUSAL_STANDS);
        if now.duration_since(start) >= timeout {
            return Ok((standing.told(version, Over::Late(timeout)), true));
        }
        if refusals_stand {
            return Ok((standing.told(version, Over::Refused), true));
        }
        tokio::time::sleep(POLL.min(timeout.saturating_sub(now.duration_since(start)))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proto::admin::v1::{ReplicaStatus, Workload};

    fn workload(id: &str, reached: bool, sync: SnapshotSync, nack: &str) -> Workload {
        Workload {
            spiffe_id: id.into(),
            connected: sync != SnapshotSync::NotConnected,
            reached,
            sync: sync.into(),
            last_nack: nack.into(),
            replicas: vec!["cp-a".into()],
            ..Workload::default()
        }
    }

    fn replica(name: &str, version: u64, reached: bool, error: &str) -> ReplicaStatus {
        ReplicaStatus {
            name: name.into(),
            address: "10.0.0.1:15012".into(),
            snapshot_version: version,
            reached,
            error: error.into(),
            ..ReplicaStatus::default()
        }
    }

    /// A change after the write (here version 10 after 9) does not keep
    /// the wait going: a sidecar still on its way to 10 holds 9's write.
    #[test]
    fn held_when_every_replica_and_connected_sidecar_has_reached_it() {
        let answer = ListWorkloadsResponse {
            workloads: vec![
                workload("spiffe://td/a", true, SnapshotSync::Synced, ""),
                workload("spiffe://td/b", true, SnapshotSync::Pending, ""),
                workload("spiffe://td/c", false, SnapshotSync::NotConnected, ""),
            ],
            snapshot_version: 10,
            snapshot_version_epoch: 0,
            replicas: vec![replica("cp-a", 10, true, ""), replica("cp-b", 9, true, "")],
            uninjected_pods: Vec::new(),
        };
        let standing = standing(&answer, (9, 0));
        assert!(standing.missing.is_empty(), "{standing:?}");
        assert_eq!((standing.holding, standing.replicas), (2, 2));
    }

    /// A replica nothing listens for holds no stream and has no write to
    /// load before it serves: it is named, and not waited for. One that
    /// did not answer in time may hold streams, and is waited for.
    #[test]
    fn a_replica_nothing_listens_for_is_named_and_not_waited_for() {
        let mut gone = replica("", 0, false, "cannot connect: connection refused");
        gone.not_listening = true;
        let answer = ListWorkloadsResponse {
            workloads: vec![workload("spiffe://td/a", true, SnapshotSync::Synced, "")],
            snapshot_version: 9,
            snapshot_version_epoch: 0,
            replicas: vec![replica("cp-a", 9, true, ""), gone],
            uninjected_pods: Vec::new(),
        };
        let standing = standing(&answer, (9, 0));
        assert!(standing.missing.is_empty(), "{standing:?}");
        assert_eq!((standing.holding, standing.replicas), (1, 1));
        assert_eq!(
            standing.not_listening,
            [
                "replica at 10.0.0.1:15012 is not listening (cannot connect: connection refused): \
              it holds no sidecar stream, and loads the write if it starts"
            ]
        );
        let gone = format!("\n  {}\n", standing.not_listening[0]);
        let held = standing.told(9, Over::Held(Duration::from_millis(1_234)));
        assert!(
            held.starts_with(
                "every connected sidecar holds snapshot 9 or a later one: 1 on 1 replica \
                 (after 1 second 200 milliseconds)\n"
            ) && held.ends_with(&gone),
            "{held}"
        );

        // A wait that fails names it too, after what is missing.
        let mut late = standing;
        late.missing = vec!["spiffe://td/b does not hold it yet".into()];
        let text = late.told(9, Over::Late(Duration::from_secs(60)));
        assert_eq!(
            text,
            format!(
                "not every connected sidecar holds snapshot 9 after 1 minute:\n  \
                 spiffe://td/b does not hold it yet{gone}"
            )
        );
    }

    #[test]
    fn names_what_is_missing() {
        let answer = ListWorkloadsResponse {
            workloads: vec![
                workload("spiffe://td/a", false, SnapshotSync::Pending, ""),
                workload("spiffe://td/b", false, SnapshotSync::Refused, "bad\x1b[0m"),
                workload("spiffe://td/c", true, SnapshotSync::Refused, "a later one"),
            ],
            snapshot_version: 9,
            snapshot_version_epoch: 0,
            replicas: vec![
                replica("cp-a", 9, true, ""),
                replica("cp-b", 8, false, ""),
                replica("", 0, false, "no answer within 3 seconds"),
            ],
            uninjected_pods: Vec::new(),
        };
        let standing = standing(&answer, (9, 0));
        assert_eq!(
            standing.missing,
            [
                "replica cp-b at 10.0.0.1:15012 serves snapshot 8, which does not hold the write (snapshot 9) yet",
                "replica at 10.0.0.1:15012 did not answer (no answer within 3 seconds)",
                "spiffe://td/a (on cp-a) does not hold it yet",
                "spiffe://td/b (on cp-a) refused its newest snapshot: bad\\u{1b}[0m",
            ]
        );
        assert_eq!(standing.refused, ["spiffe://td/b"]);
        assert_eq!(
            standing.holding, 1,
            "c refused a later snapshot, not this one"
        );
    }

    /// After a restore of the embedded database from a backup, versions
    /// count again in another epoch: a replica or sidecar at the number
    /// served, in another epoch, holds other content and is waited for,
    /// even when its own replica says it reached the write. An epoch of 0
    /// (not known) compares the numbers alone.
    #[test]
    fn the_served_number_in_another_epoch_does_not_hold_the_write() {
        const OLD: u64 = 0x1f;
        const NEW: u64 = 0x9c;
        let at = |id: &str, sync: SnapshotSync, version: u64, epoch: u64| Workload {
            synced_version: version,
            synced_version_epoch: epoch,
            ..workload(id, true, sync, "")
        };
        let mut restored = replica("cp-b", 9, true, "");
        restored.snapshot_version_epoch = OLD;
        let mut answering = replica("cp-a", 9, true, "");
        answering.snapshot_version_epoch = NEW;
        let mut answer = ListWorkloadsResponse {
            workloads: vec![
                at("spiffe://td/a", SnapshotSync::Synced, 9, OLD),
                at("spiffe://td/b", SnapshotSync::Synced, 9, NEW),
                // A stream that predates epochs.
                at("spiffe://td/c", SnapshotSync::Synced, 9, 0),
                // A refusal is one still, whatever it holds.
                Workload {
                    reached: false,
                    last_nack: "bad".into(),
                    ..at("spiffe://td/d", SnapshotSync::Refused, 9, OLD)
                },
            ],
            snapshot_version: 9,
            snapshot_version_epoch: NEW,
            replicas: vec![answering, restored, replica("cp-c", 9, true, "")],
            uninjected_pods: Vec::new(),
        };
        let found = standing(&answer, (9, 0));
        assert_eq!(
            found.missing,
            [
                "replica cp-b at 10.0.0.1:15012 serves snapshot 9@000000000000001f, of another \
                 database epoch than the 9@000000000000009c the answering replica serves, with \
                 other content: it does not hold the write",
                "spiffe://td/a (on cp-a) holds version 9 of another database epoch \
                 (9@000000000000001f, not the 9@000000000000009c the answering replica \
                 serves), with other content, not the write",
                "spiffe://td/d (on cp-a) refused its newest snapshot: bad",
            ]
        );
        assert_eq!(found.refused, ["spiffe://td/d"]);
        assert_eq!((found.holding, found.replicas), (2, 3));
        let told = found.told(9, Over::Late(Duration::from_secs(60)));
        assert!(
            told.starts_with("not every connected sidecar holds snapshot 9 after 1 minute:\n")
                && told.contains("\n  spiffe://td/a (on cp-a) holds version 9 of another"),
            "{told}"
        );

        // Without the answer's epoch (the Kubernetes store, or a replica
        // that predates epochs), numbers alone are compared.
        answer.snapshot_version_epoch = 0;
        let found = standing(&answer, (9, 0));
        assert_eq!(
            found.missing,
            ["spiffe://td/d (on cp-a) refused its newest snapshot: bad"]
        );
        assert_eq!(found.holding, 3);
    }

    /// The write's own epoch, when it returned one, is what versions are
    /// told apart by, not the epoch the answering replica serves now: after
    /// the write (9 set in OLD) the database was restored from a backup
    /// and counts 9 again in NEW, with other content. A replica serving
    /// that 9, and a sidecar holding it, do not hold the write, though
    /// their replica says they reached 9 and it is the 9 served; a sidecar
    /// at the write's own 9 holds it. Without the write's epoch (a control
    /// plane that predates it) the answering replica's stands for it, as
    /// before, and the restored 9 passes for the write.
    #[test]
    fn the_write_is_told_apart_by_its_own_epoch() {
        const OLD: u64 = 0x1f;
        const NEW: u64 = 0x9c;
        let at = |id: &str, epoch: u64| Workload {
            synced_version: 9,
            synced_version_epoch: epoch,
            ..workload(id, true, SnapshotSync::Synced, "")
        };
        let mut restored = replica("cp-a", 9, true, "");
        restored.snapshot_version_epoch = NEW;
        let mut kept = replica("cp-b", 9, true, "");
        kept.snapshot_version_epoch = OLD;
        let answer = ListWorkloadsResponse {
            workloads: vec![
                at("spiffe://td/a", NEW),
                at("spiffe://td/b", OLD),
                // A stream that predates epochs.
                at("spiffe://td/c", 0),
            ],
            snapshot_version: 9,
            snapshot_version_epoch: NEW,
            replicas: vec![restored, kept],
            uninjected_pods: Vec::new(),
        };
        let found = standing(&answer, (9, OLD));
        assert_eq!(
            found.missing,
            [
                "replica cp-a at 10.0.0.1:15012 serves snapshot 9@000000000000009c, of another \
                 database epoch than the write's 9@000000000000001f, with other content: it \
                 does not hold the write",
                "spiffe://td/a (on cp-a) holds version 9 of another database epoch \
                 (9@000000000000009c, not the write's 9@000000000000001f), with other \
                 content, not the write",
            ]
        );
        assert_eq!((found.holding, found.replicas), (2, 2));

        // A control plane that returned no epoch with the write: the
        // answering replica's NEW stands for it.
        let found = standing(&answer, (9, 0));
        assert_eq!(
            found.missing,
            [
                "replica cp-b at 10.0.0.1:15012 serves snapshot 9@000000000000001f, of another \
                 database epoch than the 9@000000000000009c the answering replica serves, with \
                 other content: it does not hold the write",
                "spiffe://td/b (on cp-a) holds version 9 of another database epoch \
                 (9@000000000000001f, not the 9@000000000000009c the answering replica \
                 serves), with other content, not the write",
            ]
        );
        assert_eq!(found.holding, 2);
    }

    #[test]
    fn an_older_control_plane_is_one_replica_compared_by_version() {
        let mut answer = ListWorkloadsResponse {
            workloads: vec![workload("spiffe://td/a", false, SnapshotSync::Synced, "")],
            snapshot_version: 4,
            ..ListWorkloadsResponse::default()
        };
        assert_eq!(
            standing(&answer, (5, 0)).missing,
            ["the control plane serves snapshot 4, which does not hold the write (snapshot 5) yet"]
        );
        answer.snapshot_version = 5;
        let standing = standing(&answer, (5, 0));
        assert!(standing.missing.is_empty(), "{standing:?}");
        assert_eq!(standing.holding, 1);
    }
}
