//! `trellisctl check`: is the mesh healthy, in one command.
//!
//! It reads what the other commands read (`ListWorkloads`, joined over
//! every replica, and the operator credential's trust bundle and
//! certificate) and says, a line each, what is fine, what needs attention
//! soon (`warn`) and what is broken now (`FAIL`): replicas that do not
//! answer or serve another snapshot, sidecars that refused their snapshot
//! or have not received it yet (or hold the number served set in another
//! epoch), connected sidecars whose certificate is revoked, connected
//! sidecars that have not renewed
//! their certificate or are well past the time to (with the Kubernetes
//! store, as the replicas' issued-certificate logs tell, or that they
//! cannot), stored policies
//! that fail a check added since they were stored (`ListPolicies`: a
//! selector outside the policy's namespace, enforced as written), pods the
//! replicas' warning-only admission webhooks admitted without a sidecar
//! because of a mistyped `trellis.io/inject` label (`ListWorkloads`'
//! `uninjected_pods`, which a controller's pods are seen in only here),
//! roots of the trust bundle that expire soon or have, and an operator
//! credential about to expire. It exits 1 when anything is `FAIL`.
//!
//! A snapshot version is compared with the epoch it was set in where both
//! epochs are known ([`super::same_snapshot`]): after a restore of the
//! embedded database from a backup, versions count again in another epoch
//! with other content, so a replica or sidecar at "the same" number in
//! another epoch does not serve or hold the current snapshot. Where
//! either epoch is 0 (the Kubernetes store sets none; a replica or stream
//! that predates epochs reports none) the numbers alone are compared.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use trellis_core::policy::policy_key;
use trellis_proto::admin::v1::{
    ListWorkloadsResponse, SnapshotSync, StoredPolicyWarning, Workload,
};

use super::rfc3339;
use crate::ca::anchors::expiries;
use crate::inject::{INJECT_KEY, UnknownInjectValue};

/// How bad one finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of the check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub text: String,
}

/// A finding whose text is escaped ([`super::escape_controls`]): it holds
/// what the control plane and the sidecars sent (SPIFFE IDs, policy names,
/// reasons, warnings), which must not drive the terminal.
fn finding(level: Level, text: String) -> Finding {
    Finding {
        level,
        text: super::escape_controls(&text),
    }
}

/// What to check against.
pub struct Inputs<'a> {
    /// Where the control plane was reached.
    pub address: &'a str,
    pub answer: &'a ListWorkloadsResponse,
    /// What stored policies fail of checks added since they were stored.
    pub stored_warnings: &'a [StoredPolicyWarning],
    /// The trust bundle of the operator credential: the signing CA's root
    /// first.
    pub bundle: &'a [CertificateDer<'static>],
    /// The operator certificate.
    pub operator: &'a CertificateDer<'static>,
    /// Unix seconds.
    pub now: i64,
    /// A root or credential expiring within this is a warning.
    pub soon: Duration,
}

/// Every finding, in the order printed.
pub fn findings(inputs: &Inputs<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    let answer = inputs.answer;
    out.push(finding(
        Level::Ok,
        format!(
            "the control plane at {} answered, serving snapshot {}",
            inputs.address,
            super::version_shown(answer.snapshot_version, answer.snapshot_version_epoch)
        ),
    ));
    replicas(answer, &mut out);
    sidecars(answer, inputs.now, &mut out);
    uninjected(answer, &mut out);
    stored_policies(inputs.stored_warnings, &mut out);
    roots(inputs, &mut out);
    operator(inputs, &mut out);
    out
}

fn replicas(answer: &ListWorkloadsResponse, out: &mut Vec<Finding>) {
    if answer.replicas.len() < 2 {
        return;
    }
    let served = (answer.snapshot_version, answer.snapshot_version_epoch);
    let mut fine = true;
    for r in &answer.replicas {
        if r.not_listening {
            fine = false;
            out.push(finding(
                Level::Warn,
                format!(
                    "{}: it is starting, stopping or gone, and holds no sidecar stream (check \
                     again once it serves)",
                    super::unanswered(r)
                ),
            ));
        } else if !r.error.is_empty() {
            fine = false;
            out.push(finding(
                Level::Fail,
                format!(
                    "{}: the sidecars streaming to it are not seen, nor its webhook's record \
                     of the pods it let through without a sidecar",
                    super::unanswered(r)
                ),
            ));
        } else if super::same_number_other_epoch(
            (r.snapshot_version, r.snapshot_version_epoch),
            served,
        ) {
            fine = false;
            out.push(finding(
                Level::Warn,
                format!(
                    "{} serves snapshot {}, not {}: the same version of another database \
                     epoch, with other content (a database restored from a backup, or \
                     another database)",
                    super::replica_label(r),
                    super::version_shown(r.snapshot_version, r.snapshot_version_epoch),
                    super::version_shown(served.0, served.1)
                ),
            ));
        } else if r.snapshot_version != answer.snapshot_version {
            fine = false;
            out.push(finding(
                Level::Warn,
                format!(
                    "{} serves snapshot {}, not {} (a change one of them has not loaded \
                     yet; check again)",
                    super::replica_label(r),
                    super::version_shown(r.snapshot_version, r.snapshot_version_epoch),
                    super::version_shown(served.0, served.1)
                ),
            ));
        }
    }
    if fine {
        out.push(finding(
            Level::Ok,
            format!(
                "{} replicas answered, all serving snapshot {}",
                answer.replicas.len(),
                super::version_shown(served.0, served.1)
            ),
        ));
    }
}

/// Whether a certificate issued at `issued` that expires at `expires` is,
/// at `now`, so far past its renewal time that its sidecar has been failing
/// to renew: three quarters of its life have passed. A sidecar renews at
/// half the life, moved by up to a tenth of that half either way (so by
/// 55 % of it), counting from when it got the certificate, and retries a
/// failed Certify within 1 s, then 2 s, doubling up to 30 s. Three
/// quarters leaves a fifth of the life after the latest renewal on
/// schedule (12 minutes of a one-hour certificate: retries enough to ride
/// out a short outage of the control plane), and a quarter before the
/// certificate expires to find out why.
fn renewal_overdue(issued: i64, expires: i64, now: i64) -> bool {
    let (lived, life) = (
        i128::from(now) - i128::from(issued),
        i128::from(expires) - i128::from(issued),
    );
    4 * lived >= 3 * life
}

fn sidecars(answer: &ListWorkloadsResponse, now: i64, out: &mut Vec<Finding>) {
    let connected: Vec<_> = answer.workloads.iter().filter(|w| w.connected).collect();
    // A sidecar renews at half its certificate's life; one still connected
    // past its newest certificate's expiry has not managed to, nor has one
    // well past the renewal time ([`renewal_overdue`]). With the
    // Kubernetes store the newest is the newest in the replicas'
    // issued-certificate logs, or one its sidecar presented on connecting
    // after they began; when they cannot tell, the answer says why,
    // and that is said, neither passed over as fine nor failed. A control
    // plane older than that says `i64::MAX` for a Pod (0 before that), and
    // one older than issue times says none (0).
    let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
    let mut unreported = 0;
    let mut unscheduled = 0;
    for w in &connected {
        // Revoked on purpose (`trellisctl identity revoke`), so not a
        // failure; but the sidecar is cut off, and keeps running as if not.
        if w.revoked {
            out.push(finding(
                Level::Warn,
                format!(
                    "{} is connected, but its certificate is revoked: it cannot renew it, and \
                     its peers refuse it (give it a new join token, or trellisctl identity \
                     unrevoke it)",
                    w.spiffe_id
                ),
            ));
        }
        if !w.cert_expiry_unknown.is_empty() {
            *unknown.entry(w.cert_expiry_unknown.as_str()).or_default() += 1;
        } else if w.no_certificate_since_unix != 0 {
            out.push(finding(
                Level::Fail,
                format!(
                    "{} is connected, but no replica has issued it a certificate since {}, \
                     longer ago than a certificate's lifetime: it has not renewed (see its \
                     sidecar's log), and its peers refuse it",
                    w.spiffe_id,
                    rfc3339(w.no_certificate_since_unix)
                ),
            ));
        } else if matches!(w.cert_expires_at_unix, 0 | i64::MAX) {
            unreported += 1;
        } else if w.cert_expires_at_unix <= now {
            out.push(finding(
                Level::Fail,
                format!(
                    "{} is connected, but its newest certificate expired at {}: it has not \
                     renewed (see its sidecar's log), and its peers refuse it",
                    w.spiffe_id,
                    rfc3339(w.cert_expires_at_unix)
                ),
            ));
        } else if !(0 < w.cert_issued_at_unix && w.cert_issued_at_unix < w.cert_expires_at_unix) {
            unscheduled += 1;
        } else if !renewal_overdue(w.cert_issued_at_unix, w.cert_expires_at_unix, now) {
            continue;
        } else if !w.cert_renewal_unknown.is_empty() {
            // A newer certificate may be where the answer could not look.
            *unknown.entry(w.cert_renewal_unknown.as_str()).or_default() += 1;
        } else {
            let (issued, expires) = (w.cert_issued_at_unix, w.cert_expires_at_unix);
            let due = issued + (expires - issued) / 2;
            out.push(finding(
                Level::Fail,
                format!(
                    "{} is connected, but has not renewed its certificate: the newest, issued \
                     at {}, was due for renewal at half its life, {} ago, and expires at {}, \
                     when its peers refuse it (see its sidecar's log and \
                     trellis_certificate_renewals_total{{outcome=\"error\"}}, and the control \
                     plane's trellis_certify_failures_total)",
                    w.spiffe_id,
                    rfc3339(issued),
                    trellis_core::duration::words(Duration::from_secs((now - due).max(0) as u64)),
                    rfc3339(expires)
                ),
            ));
        }
    }
    let sidecars = |n: usize| format!("{n} connected sidecar{}", if n == 1 { "" } else { "s" });
    for (why, count) in unknown {
        out.push(finding(
            Level::Ok,
            format!(
                "certificate renewal not known for {}: {}",
                sidecars(count),
                why
            ),
        ));
    }
    if unreported > 0 {
        out.push(finding(
            Level::Ok,
            format!(
                "certificate renewal not checked for {}: the control plane does not report \
                 their certificates (an older version, with the Kubernetes store); alert on \
                 the sidecars' trellis_certificate_expiry_timestamp_seconds instead",
                sidecars(unreported)
            ),
        ));
    }
    if unscheduled > 0 {
        out.push(finding(
            Level::Ok,
            format!(
                "certificate renewal schedule not checked for {}: the control plane does not \
                 say when their newest certificate was issued (an older version, or a \
                 certificate issued before it recorded that)",
                sidecars(unscheduled)
            ),
        ));
    }
    // The replica a sidecar streams to says whether it holds what that
    // replica serves; one that holds the number served here set in another
    // epoch holds other content, and is not current.
    let served = (answer.snapshot_version, answer.snapshot_version_epoch);
    let other_epoch = |w: &Workload| {
        super::same_number_other_epoch((w.synced_version, w.synced_version_epoch), served)
    };
    let synced = connected
        .iter()
        .filter(|w| w.sync() == SnapshotSync::Synced && !other_epoch(w))
        .count();
    for w in &connected {
        match w.sync() {
            SnapshotSync::Synced if other_epoch(w) => out.push(finding(
                Level::Warn,
                format!(
                    "{} holds version {} of another database epoch ({}, not the {} served), \
                     with other content: it does not hold the current snapshot (check again)",
                    w.spiffe_id,
                    w.synced_version,
                    super::version_shown(w.synced_version, w.synced_version_epoch),
                    super::version_shown(served.0, served.1)
                ),
            )),
            SnapshotSync::Synced => {}
            SnapshotSync::Refused => out.push(finding(
                Level::Fail,
                format!(
                    "{} refused its newest snapshot and enforces an older one: {}",
                    w.spiffe_id, w.last_nack
                ),
            )),
            _ => out.push(finding(
                Level::Warn,
                format!(
                    "{} does not hold the current snapshot yet (check again)",
                    w.spiffe_id
                ),
            )),
        }
        for warning in &w.ack_warnings {
            out.push(finding(
                Level::Warn,
                format!(
                    "{} enforces its snapshot otherwise than sent: {}",
                    w.spiffe_id, warning
                ),
            ));
        }
    }
    out.push(finding(
        Level::Ok,
        format!(
            "{synced} of {} connected sidecar{} hold the current snapshot ({} workload{} known)",
            connected.len(),
            if connected.len() == 1 { "" } else { "s" },
            answer.workloads.len(),
            if answer.workloads.len() == 1 { "" } else { "s" },
        ),
    ));
}

/// Each entry of the pods the replicas' warning-only webhooks let through
/// without a sidecar, because a `trellis.io/inject` label (theirs or their
/// namespace's) is neither `enabled` nor `disabled`: a warning naming the
/// namespace, the pods' owner, the label and its value. `kubectl` shows the
/// webhook's warning only for the pods it creates itself; a controller's
/// pods (a Deployment's) run outside the mesh unseen but for this. Only
/// what is known is said: the webhook reviewed the pods, and those created
/// run without a sidecar (a later admission step may have refused a pod).
fn uninjected(answer: &ListWorkloadsResponse, out: &mut Vec<Finding>) {
    let several_replicas = answer.replicas.len() > 1;
    for pods in &answer.uninjected_pods {
        let (namespace, name) = (&pods.namespace, &pods.owner_name);
        let who = match (pods.owner_kind.as_str(), pods.admitted) {
            ("Pod", 1) => format!("pod {name}"),
            ("Pod", _) => format!("pods {name}"),
            (kind, _) => format!("the pods of {kind} {name}"),
        };
        let (count, created) = match pods.admitted {
            1 => ("1 pod".to_owned(), "if it was created, it runs"),
            n => (format!("{n} pods"), "those created run"),
        };
        let allowed = "neither \"enabled\" nor \"disabled\"";
        let why = if pods.reason == UnknownInjectValue::NamespaceLabel.reason() {
            format!(
                "the namespace's label {INJECT_KEY} is {allowed} (the webhook cannot read its \
                 value: kubectl get namespace {namespace} --show-labels)"
            )
        } else {
            format!(
                "their label {INJECT_KEY} is {}, {allowed}",
                crate::api::quoted(&pods.value)
            )
        };
        let by = match several_replicas {
            true => format!(", by {}", pods.replicas.join(", ")),
            false => String::new(),
        };
        out.push(finding(
            Level::Warn,
            format!(
                "namespace {namespace}: the webhook let {who} through without a sidecar \
                 ({count}, the last at {}{by}): {why}; {created} outside the mesh",
                rfc3339(pods.last_admitted_unix)
            ),
        ));
    }
}

/// Each check a stored policy fails: it is enforced as the warning says,
/// and applying it again as it is would be refused.
fn stored_policies(warnings: &[StoredPolicyWarning], out: &mut Vec<Finding>) {
    for w in warnings {
        let v = w.violation.clone().unwrap_or_default();
        let at = match v.path.as_str() {
            "" => String::new(),
            path => format!("{path}: "),
        };
        out.push(finding(
            Level::Warn,
            format!(
                "stored {} {}: {at}{}",
                w.kind,
                policy_key(&w.namespace, &w.name),
                v.message
            ),
        ));
    }
}

fn roots(inputs: &Inputs<'_>, out: &mut Vec<Finding>) {
    let roots = expiries(inputs.bundle);
    let soon = inputs.now + inputs.soon.as_secs() as i64;
    let mut live = 0;
    for (i, (subject, at)) in roots.iter().enumerate() {
        let which = match i {
            0 => format!("the signing CA's root {subject}"),
            _ => format!("trust anchor {subject}"),
        };
        if *at <= inputs.now {
            let (level, advice) = match i {
                0 => (
                    Level::Fail,
                    "no certificate it signed verifies; rotate the root",
                ),
                _ => (
                    Level::Warn,
                    "it anchors nothing; remove it from --trust-anchors",
                ),
            };
            out.push(finding(
                level,
                format!("{which} expired at {}: {advice}", rfc3339(*at)),
            ));
            continue;
        }
        live += 1;
        if *at <= soon {
            out.push(finding(
                Level::Warn,
                format!(
                    "{which} expires at {}, within {}: rotate it",
                    rfc3339(*at),
                    trellis_core::duration::words(inputs.soon)
                ),
            ));
        }
    }
    match roots
        .iter()
        .filter(|(_, at)| *at > inputs.now)
        .min_by_key(|(_, at)| *at)
    {
        Some((_, first)) => out.push(finding(
            Level::Ok,
            format!(
                "trust bundle: {live} of {} root{} valid, the first to expire at {}",
                roots.len(),
                if roots.len() == 1 { "" } else { "s" },
                rfc3339(*first)
            ),
        )),
        None => out.push(finding(
            Level::Fail,
            "trust bundle: every root has expired; nothing verifies".to_owned(),
        )),
    }
}

fn operator(inputs: &Inputs<'_>, out: &mut Vec<Finding>) {
    let Some((_, at)) = expiries(std::slice::from_ref(inputs.operator))
        .into_iter()
        .next()
    else {
        return;
    };
    let soon = inputs.now + inputs.soon.as_secs() as i64;
    if at <= soon {
        out.push(finding(
            Level::Warn,
            format!(
                "the operator credential expires at {}: a control plane started less than a \
                 day before that issues a new one; for one now, delete admin.crt from its \
                 state dir and restart it",
                rfc3339(at)
            ),
        ));
    }
}

/// The findings as printed, then a summary line; and whether any failed.
pub fn report(findings: &[Finding]) -> (String, bool) {
    let mut text = String::new();
    for f in findings {
        text.push_str(&format!("{:<5} {}\n", f.level.label(), f.text));
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let (failures, warnings) = (count(Level::Fail), count(Level::Warn));
    text.push_str(&format!(
        "{failures} failure{}, {warnings} warning{}\n",
        if failures == 1 { "" } else { "s" },
        if warnings == 1 { "" } else { "s" },
    ));
    (text, failures > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use trellis_proto::admin::v1::{ReplicaStatus, UninjectedPods, Workload};

    const NOW: i64 = 1_900_000_000;
    const DAY: i64 = 86_400;

    fn root(name: &str, not_after: i64) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 400 * DAY).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn workload(id: &str, connected: bool, sync: SnapshotSync, nack: &str) -> Workload {
        Workload {
            spiffe_id: id.into(),
            connected,
            sync: sync.into(),
            last_nack: nack.into(),
            cert_issued_at_unix: NOW - 600,
            cert_expires_at_unix: NOW + 3000,
            ..Workload::default()
        }
    }

    /// The lines of `found` that hold `what`.
    fn containing<'a>(found: &'a [String], what: &str) -> Vec<&'a str> {
        found
            .iter()
            .filter(|l| l.contains(what))
            .map(String::as_str)
            .collect()
    }

    fn lines(answer: &ListWorkloadsResponse, bundle: &[CertificateDer<'static>]) -> Vec<String> {
        let operator = root("operator", NOW + 300 * DAY);
        let inputs = Inputs {
            address: "127.0.0.1:15012",
            answer,
            stored_warnings: &[],
            bundle,
            operator: &operator,
            now: NOW,
            soon: Duration::from_secs(30 * DAY as u64),
        };
        findings(&inputs)
            .into_iter()
            .map(|f| format!("{} {}", f.level.label(), f.text))
            .collect()
    }

    #[test]
    fn a_healthy_mesh_is_all_ok() {
        let answer = ListWorkloadsResponse {
            workloads: vec![
                workload("spiffe://td/a", true, SnapshotSync::Synced, ""),
                workload("spiffe://td/b", false, SnapshotSync::NotConnected, ""),
            ],
            snapshot_version: 7,
            snapshot_version_epoch: 0,
            replicas: Vec::new(),
            uninjected_pods: Vec::new(),
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        assert_eq!(
            found,
            [
                "ok the control plane at 127.0.0.1:15012 answered, serving snapshot 7",
                "ok 1 of 1 connected sidecar hold the current snapshot (2 workloads known)",
                &format!(
                    "ok trust bundle: 1 of 1 root valid, the first to expire at {}",
                    rfc3339(NOW + 3650 * DAY)
                ),
            ]
        );
        let (text, failed) = report(&findings(&Inputs {
            address: "x",
            answer: &answer,
            stored_warnings: &[],
            bundle: &[root("Trellis root", NOW + 3650 * DAY)],
            operator: &root("operator", NOW + 300 * DAY),
            now: NOW,
            soon: Duration::from_secs(30 * DAY as u64),
        }));
        assert!(!failed);
        assert!(text.ends_with("0 failures, 0 warnings\n"), "{text}");
    }

    /// A sidecar that acknowledged its snapshot with warnings (a policy
    /// enforced failing closed on a port it declares opaque) holds the
    /// current snapshot, and check names each warning, escaped.
    #[test]
    fn warnings_a_sidecar_acknowledged_with_are_shown() {
        let mut db = workload("spiffe://td/db", true, SnapshotSync::Synced, "");
        db.ack_warnings =
            vec!["default/no-admin rule 0 has HTTP conditions on port 5432\x1b".into()];
        let answer = ListWorkloadsResponse {
            workloads: vec![db],
            snapshot_version: 7,
            snapshot_version_epoch: 0,
            replicas: Vec::new(),
            uninjected_pods: Vec::new(),
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        assert_eq!(
            containing(&found, "spiffe://td/db"),
            [
                "warn spiffe://td/db enforces its snapshot otherwise than sent: default/no-admin \
                 rule 0 has HTTP conditions on port 5432\\u{1b}"
            ]
        );
        assert!(
            found.contains(
                &"ok 1 of 1 connected sidecar hold the current snapshot (1 workload known)"
                    .to_owned()
            ),
            "{found:#?}"
        );
    }

    #[test]
    fn what_is_broken_or_soon_to_be_is_named() {
        let answer = ListWorkloadsResponse {
            workloads: vec![
                workload("spiffe://td/a", true, SnapshotSync::Refused, "bad\x1b[0m"),
                workload("spiffe://td/b", true, SnapshotSync::Pending, ""),
            ],
            snapshot_version: 7,
            snapshot_version_epoch: 0,
            replicas: vec![
                ReplicaStatus {
                    name: "cp-a".into(),
                    address: "10.0.0.1:15012".into(),
                    snapshot_version: 7,
                    ..ReplicaStatus::default()
                },
                ReplicaStatus {
                    name: "cp-b".into(),
                    address: "10.0.0.2:15012".into(),
                    snapshot_version: 6,
                    ..ReplicaStatus::default()
                },
                ReplicaStatus {
                    address: "10.0.0.3:15012".into(),
                    error: "no answer within 3 seconds".into(),
                    ..ReplicaStatus::default()
                },
                ReplicaStatus {
                    address: "10.0.0.4:15012".into(),
                    error: "cannot connect: connection refused".into(),
                    not_listening: true,
                    ..ReplicaStatus::default()
                },
            ],
            uninjected_pods: Vec::new(),
        };
        let bundle = [
            root("Signing root", NOW + 10 * DAY),
            root("Old root", NOW - DAY),
        ];
        let found = lines(&answer, &bundle);
        let failures: Vec<_> = found.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(
            failures,
            [
                "FAIL replica at 10.0.0.3:15012 did not answer (no answer within 3 seconds): the sidecars \
                 streaming to it are not seen, nor its webhook's record of the pods it let \
                 through without a sidecar",
                "FAIL spiffe://td/a refused its newest snapshot and enforces an older one: bad\\u{1b}[0m",
            ]
        );
        let warnings: Vec<_> = found.iter().filter(|l| l.starts_with("warn")).collect();
        assert_eq!(warnings.len(), 5, "{found:#?}");
        assert!(warnings[0].contains("replica cp-b at 10.0.0.2:15012 serves snapshot 6, not 7"));
        assert_eq!(
            warnings[1],
            "warn replica at 10.0.0.4:15012 is not listening (cannot connect: connection refused): \
             it is starting, stopping or gone, and holds no sidecar stream (check again once it \
             serves)"
        );
        assert!(warnings[2].contains("spiffe://td/b does not hold the current snapshot yet"));
        assert!(
            warnings[3].contains("the signing CA's root CN=Signing root expires at")
                && warnings[3].contains("within 30 days")
        );
        assert!(
            warnings[4].contains("trust anchor CN=Old root expired at")
                && warnings[4].contains("it anchors nothing")
        );
        assert!(
            found.contains(
                &"ok 0 of 2 connected sidecars hold the current snapshot (2 workloads known)"
                    .to_owned()
            ),
            "{found:#?}"
        );
        let operator_soon = Inputs {
            address: "x",
            answer: &answer,
            stored_warnings: &[],
            bundle: &bundle,
            operator: &root("operator", NOW + DAY),
            now: NOW,
            soon: Duration::from_secs(30 * DAY as u64),
        };
        let all = findings(&operator_soon);
        assert!(
            all.last()
                .unwrap()
                .text
                .contains("the operator credential expires at")
        );
        let (text, failed) = report(&all);
        assert!(failed);
        assert!(text.ends_with("2 failures, 6 warnings\n"), "{text}");
    }

    /// After a restore of the embedded database from a backup, versions
    /// count again in another epoch: a replica or sidecar at the number
    /// served, in another epoch, holds other content, and is not current
    /// even when its own replica says it is synced. An epoch of 0 (not
    /// known) compares the numbers alone.
    #[test]
    fn the_served_number_in_another_epoch_is_not_current() {
        const OLD: u64 = 0x1f;
        const NEW: u64 = 0x9c;
        let at = |id: &str, version: u64, epoch: u64| Workload {
            synced_version: version,
            synced_version_epoch: epoch,
            ..workload(id, true, SnapshotSync::Synced, "")
        };
        let replica = |name: &str, epoch: u64| ReplicaStatus {
            name: name.into(),
            address: "10.0.0.1:15012".into(),
            snapshot_version: 7,
            snapshot_version_epoch: epoch,
            ..ReplicaStatus::default()
        };
        let mut answer = ListWorkloadsResponse {
            workloads: vec![
                at("spiffe://td/a", 7, OLD),
                at("spiffe://td/b", 7, NEW),
                // A stream that predates epochs.
                at("spiffe://td/c", 7, 0),
                // Synced to what a lagging replica serves.
                at("spiffe://td/d", 6, OLD),
            ],
            snapshot_version: 7,
            snapshot_version_epoch: NEW,
            replicas: vec![
                replica("cp-a", NEW),
                replica("cp-b", OLD),
                replica("cp-c", 0),
            ],
            uninjected_pods: Vec::new(),
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        assert_eq!(
            found[0],
            "ok the control plane at 127.0.0.1:15012 answered, serving snapshot \
             7@000000000000009c"
        );
        let warnings: Vec<_> = found.iter().filter(|l| l.starts_with("warn")).collect();
        assert_eq!(
            warnings,
            [
                "warn replica cp-b at 10.0.0.1:15012 serves snapshot 7@000000000000001f, not \
                 7@000000000000009c: the same version of another database epoch, with other \
                 content (a database restored from a backup, or another database)",
                "warn spiffe://td/a holds version 7 of another database epoch \
                 (7@000000000000001f, not the 7@000000000000009c served), with other content: \
                 it does not hold the current snapshot (check again)",
            ],
            "{found:#?}"
        );
        assert!(
            found.contains(
                &"ok 3 of 4 connected sidecars hold the current snapshot (4 workloads known)"
                    .to_owned()
            ),
            "{found:#?}"
        );

        // Without the answer's epoch (the Kubernetes store, or a replica
        // that predates epochs), numbers alone are compared.
        answer.snapshot_version_epoch = 0;
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        assert!(!found.iter().any(|l| l.starts_with("warn")), "{found:#?}");
        assert!(
            found.contains(&"ok 3 replicas answered, all serving snapshot 7".to_owned())
                && found.contains(
                    &"ok 4 of 4 connected sidecars hold the current snapshot (4 workloads \
                      known)"
                        .to_owned()
                ),
            "{found:#?}"
        );
    }

    #[test]
    fn a_stored_policy_selecting_outside_its_namespace_is_a_warning() {
        let answer = ListWorkloadsResponse::default();
        let warning = StoredPolicyWarning {
            kind: "AuthorizationPolicy".into(),
            namespace: "team-a".into(),
            name: "deny-all".into(),
            violation: Some(trellis_proto::policy::v1::Violation {
                path: "spec.selector.spiffeIds[0]".into(),
                message: "\"spiffe://td/*\" selects workloads outside the policy's namespace"
                    .into(),
                warning: true,
            }),
        };
        let inputs = Inputs {
            address: "x",
            answer: &answer,
            stored_warnings: std::slice::from_ref(&warning),
            bundle: &[root("Trellis root", NOW + 3650 * DAY)],
            operator: &root("operator", NOW + 300 * DAY),
            now: NOW,
            soon: Duration::from_secs(30 * DAY as u64),
        };
        let found = findings(&inputs);
        let warnings: Vec<_> = found.iter().filter(|f| f.level == Level::Warn).collect();
        assert_eq!(warnings.len(), 1, "{found:#?}");
        assert_eq!(
            warnings[0].text,
            "stored AuthorizationPolicy team-a/deny-all: spec.selector.spiffeIds[0]: \"spiffe://td/*\" selects workloads outside the policy's namespace"
        );
        assert!(!report(&found).1, "a warning, not a failure");
    }

    /// Each entry of the pods let through without a sidecar is a warning
    /// naming the namespace, the owner, the label, its value and the
    /// values allowed, and that the pods created run outside the mesh
    /// (a later admission step may have refused one); the replicas that
    /// let them through are named when several answered. Text from the
    /// pods is escaped.
    #[test]
    fn pods_admitted_without_a_sidecar_are_warnings() {
        let pods = |owner_kind: &str, owner_name: &str, reason: &str, value: &str| UninjectedPods {
            namespace: "shop".into(),
            owner_kind: owner_kind.into(),
            owner_name: owner_name.into(),
            reason: reason.into(),
            value: value.into(),
            admitted: 3,
            last_admitted_unix: NOW - 60,
            replicas: vec!["cp-a".into(), "cp-b".into()],
        };
        let mut debug = pods("Pod", "debug", "namespace_label", "");
        debug.admitted = 1;
        let mut answer = ListWorkloadsResponse {
            uninjected_pods: vec![
                pods("ReplicaSet", "web-7d9f", "pod_label", "true"),
                debug,
                pods("Pod", "job-*", "pod_label", "\x1b[31m"),
            ],
            ..ListWorkloadsResponse::default()
        };
        let at = rfc3339(NOW - 60);
        let expected = [
            format!(
                "warn namespace shop: the webhook let the pods of ReplicaSet web-7d9f through \
                 without a sidecar (3 pods, the last at {at}): their label trellis.io/inject \
                 is \"true\", neither \"enabled\" nor \"disabled\"; those created run outside \
                 the mesh"
            ),
            format!(
                "warn namespace shop: the webhook let pod debug through without a sidecar (1 \
                 pod, the last at {at}): the namespace's label trellis.io/inject is neither \
                 \"enabled\" nor \"disabled\" (the webhook cannot read its value: kubectl get \
                 namespace shop --show-labels); if it was created, it runs outside the mesh"
            ),
            format!(
                "warn namespace shop: the webhook let pods job-* through without a sidecar (3 \
                 pods, the last at {at}): their label trellis.io/inject is \"\\u{{1b}}[31m\", \
                 neither \"enabled\" nor \"disabled\"; those created run outside the mesh"
            ),
        ];
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        let warnings: Vec<_> = found.iter().filter(|l| l.starts_with("warn")).collect();
        assert_eq!(warnings, expected.iter().collect::<Vec<_>>(), "{found:#?}");

        answer.replicas = vec![ReplicaStatus::default(), ReplicaStatus::default()];
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        assert!(
            found.iter().any(|l| l
                .starts_with("warn namespace shop: the webhook let the pods of ReplicaSet")
                && l.contains(&format!("the last at {at}, by cp-a, cp-b): their label"))),
            "{found:#?}"
        );
    }

    #[test]
    fn a_connected_sidecar_past_its_certificate_has_not_renewed() {
        let mut late = workload("spiffe://td/a", true, SnapshotSync::Synced, "");
        late.cert_expires_at_unix = NOW - 60;
        let mut fine = workload("spiffe://td/b", true, SnapshotSync::Synced, "");
        fine.cert_issued_at_unix = NOW - 60;
        fine.cert_expires_at_unix = NOW + 60;
        // Gone: nothing to say. Known only as a Pod: said to be unchecked.
        let mut gone = workload("spiffe://td/c", false, SnapshotSync::NotConnected, "");
        gone.cert_expires_at_unix = NOW - 60;
        let mut pod = workload("spiffe://td/d", true, SnapshotSync::Synced, "");
        pod.cert_expires_at_unix = i64::MAX;
        let answer = ListWorkloadsResponse {
            workloads: vec![late, fine, gone, pod],
            ..ListWorkloadsResponse::default()
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        let failures: Vec<_> = found.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(failures.len(), 1, "{found:#?}");
        assert!(
            failures[0].starts_with(
                "FAIL spiffe://td/a is connected, but its newest certificate expired at"
            ),
            "{found:#?}"
        );
        assert!(
            found.iter().any(|l| l.starts_with(
                "ok certificate renewal not checked for 1 connected sidecar: the control plane \
                 does not report their certificates (an older version"
            )),
            "{found:#?}"
        );
    }

    /// With the Kubernetes store the answer says what the replicas'
    /// issued-certificate logs tell: a certificate found expired, or none
    /// issued for longer than a lifetime, fails; what the logs cannot tell
    /// is said once a reason, and fails nothing.
    #[test]
    fn what_the_issued_certificate_logs_cannot_tell_is_said_and_not_failed() {
        let mut expired = workload("spiffe://td/a", true, SnapshotSync::Synced, "");
        expired.cert_expires_at_unix = NOW - 60;
        let mut none = workload("spiffe://td/b", true, SnapshotSync::Synced, "");
        none.cert_expires_at_unix = 0;
        none.no_certificate_since_unix = NOW - 2 * 3600;
        let silent = "the replica at 10.0.0.2:15012 did not answer, and its issued-certificate \
                      log may hold a newer certificate";
        let mut unknown = Vec::new();
        for id in ["spiffe://td/c", "spiffe://td/d"] {
            let mut w = workload(id, true, SnapshotSync::Synced, "");
            w.cert_expires_at_unix = i64::MAX;
            w.cert_expiry_unknown = silent.into();
            unknown.push(w);
        }
        let mut restarted = workload("spiffe://td/e", true, SnapshotSync::Synced, "");
        restarted.cert_expires_at_unix = i64::MAX;
        restarted.cert_expiry_unknown = "the logs are complete only since\x1b[0m".into();
        let answer = ListWorkloadsResponse {
            workloads: [vec![expired, none, restarted], unknown].concat(),
            ..ListWorkloadsResponse::default()
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        let failures: Vec<_> = found.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(
            failures,
            [
                &format!(
                    "FAIL spiffe://td/a is connected, but its newest certificate expired at {}: \
                     it has not renewed (see its sidecar's log), and its peers refuse it",
                    rfc3339(NOW - 60)
                ),
                &format!(
                    "FAIL spiffe://td/b is connected, but no replica has issued it a certificate \
                     since {}, longer ago than a certificate's lifetime: it has not renewed (see \
                     its sidecar's log), and its peers refuse it",
                    rfc3339(NOW - 2 * 3600)
                ),
            ],
            "{found:#?}"
        );
        let said = containing(&found, "certificate renewal");
        assert_eq!(
            said,
            [
                "ok certificate renewal not known for 1 connected sidecar: the logs are complete \
                 only since\\u{1b}[0m",
                format!("ok certificate renewal not known for 2 connected sidecars: {silent}")
                    .as_str(),
            ],
            "{found:#?}"
        );
    }

    /// A sidecar renews at half its certificate's life, give or take a
    /// tenth of that: one with three quarters of the life behind it has
    /// been failing to, and is named before it expires. One renewing on
    /// schedule, at the latest its jitter allows, is not; one whose issue
    /// time is not known, or whose newer certificate may be in a log the
    /// answer did not read, is said not to be known.
    #[test]
    fn a_sidecar_well_past_its_renewal_time_has_not_renewed() {
        const LIFE: i64 = 3600;
        let issued = |id, ago: i64| {
            let mut w = workload(id, true, SnapshotSync::Synced, "");
            w.cert_issued_at_unix = NOW - ago;
            w.cert_expires_at_unix = NOW - ago + LIFE;
            w
        };
        // Renewing now, at 55 % of the life, and still at 74 %.
        let on_schedule = issued("spiffe://td/a", LIFE * 55 / 100);
        let late = issued("spiffe://td/b", LIFE * 74 / 100);
        // 16 minutes past half the life: 77 % of it.
        let stuck = issued("spiffe://td/c", LIFE / 2 + 16 * 60);
        let mut old = issued("spiffe://td/d", LIFE * 9 / 10);
        old.cert_issued_at_unix = 0;
        let silent = "the replica at 10.0.0.2:15012 did not answer, and its issued-certificate \
                      log may hold a newer certificate";
        let mut maybe_renewed = issued("spiffe://td/e", LIFE * 9 / 10);
        maybe_renewed.cert_renewal_unknown = silent.into();
        // Young enough that a newer one does not matter.
        let mut young = issued("spiffe://td/f", LIFE / 10);
        young.cert_renewal_unknown = silent.into();
        let answer = ListWorkloadsResponse {
            workloads: vec![on_schedule, late, stuck, old, maybe_renewed, young],
            ..ListWorkloadsResponse::default()
        };
        let found = lines(&answer, &[root("Trellis root", NOW + 3650 * DAY)]);
        let failures: Vec<_> = found.iter().filter(|l| l.starts_with("FAIL")).collect();
        assert_eq!(
            failures,
            [&format!(
                "FAIL spiffe://td/c is connected, but has not renewed its certificate: the \
                 newest, issued at {}, was due for renewal at half its life, 16 minutes ago, and \
                 expires at {}, when its peers refuse it (see its sidecar's log and \
                 trellis_certificate_renewals_total{{outcome=\"error\"}}, and the control \
                 plane's trellis_certify_failures_total)",
                rfc3339(NOW - LIFE / 2 - 16 * 60),
                rfc3339(NOW + LIFE / 2 - 16 * 60),
            )],
            "{found:#?}"
        );
        let said = containing(&found, "certificate renewal");
        assert_eq!(
            said,
            [
                format!("ok certificate renewal not known for 1 connected sidecar: {silent}")
                    .as_str(),
                "ok certificate renewal schedule not checked for 1 connected sidecar: the \
                 control plane does not say when their newest certificate was issued (an older \
                 version, or a certificate issued before it recorded that)",
            ],
            "{found:#?}"
        );
    }

    #[test]
    fn renewal_is_overdue_from_three_quarters_of_the_life() {
        assert!(!renewal_overdue(1000, 1100, 1074));
        assert!(renewal_overdue(1000, 1100, 1075));
        // No overflow on the widest times.
        assert!(!renewal_overdue(i64::MIN, i64::MAX, 0));
        assert!(renewal_overdue(i64::MIN, i64::MAX, i64::MAX));
    }

    #[test]
    fn a_bundle_of_expired_roots_fails() {
        let answer = ListWorkloadsResponse::default();
        let found = lines(&answer, &[root("Signing root", NOW - DAY)]);
        assert!(
            found
                .iter()
                .any(|l| l.starts_with("FAIL the signing CA's root CN=Signing root expired"))
        );
        assert!(
            found.contains(
                &"FAIL trust bundle: every root has expired; nothing verifies".to_owned()
            )
        );
    }
}
