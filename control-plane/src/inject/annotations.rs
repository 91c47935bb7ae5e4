//! What a pod's annotations ask of its injection: the ports and CIDRs
//! `trellis-proxy init` leaves alone, whether the sidecar writes an
//! access log, its TCP user timeout, its HTTP/2 connection limits and its
//! opaque ports. Every value is
//! checked here; a bad one is an [`InjectError::InvalidAnnotation`] naming
//! the annotation, and the pod is refused rather than injected with a
//! guess.
//!
//! [`POD_ANNOTATIONS`] lists every pod annotation under `trellis.io/` the
//! injector reads or writes, and nothing here reads one it does not list
//! ([`Key::known`] fails the build). A name under `trellis.io/` that no
//! list has, in a pod's annotations or labels (`trellis.io/acces-log`), is
//! no error, since a newer chart's annotation must not block pods on an
//! older control plane: an injected pod's author is warned of it, with the
//! known name it is close to ([`unknown_names`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{Display, Write as _};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use trellis_core::h2_limits;
use trellis_core::tcp::{parse_port, parse_user_timeout};

use super::pod::InjectError;
use super::{
    ACCESS_LOG_ANNOTATION, EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_CIDRS, EXCLUDE_OUTBOUND_PORTS,
    INJECT_KEY, INJECTED_ANNOTATION, INJECTED_CONTAINERS_ANNOTATION, InjectConfig,
    MAX_H2_CONNECTIONS_ANNOTATION, MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION, OPAQUE_PORTS_ANNOTATION,
    TCP_USER_TIMEOUT_ANNOTATION, TRUST_BUNDLE_ANNOTATION,
};

/// The prefix of the names the mesh owns in a pod's annotations and labels.
pub const PREFIX: &str = "trellis.io/";

/// Every pod annotation under `trellis.io/` the injector reads (the pod's
/// author writes them) or writes itself (the last three). The only list:
/// the readers below take a `Key`, which names one of these or fails
/// the build, and any other name under the prefix is warned of
/// (`unknown_names`).
pub const POD_ANNOTATIONS: [&str; 12] = [
    INJECT_KEY,
    ACCESS_LOG_ANNOTATION,
    TCP_USER_TIMEOUT_ANNOTATION,
    OPAQUE_PORTS_ANNOTATION,
    EXCLUDE_INBOUND_PORTS,
    EXCLUDE_OUTBOUND_PORTS,
    EXCLUDE_OUTBOUND_CIDRS,
    MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION,
    MAX_H2_CONNECTIONS_ANNOTATION,
    INJECTED_ANNOTATION,
    INJECTED_CONTAINERS_ANNOTATION,
    TRUST_BUNDLE_ANNOTATION,
];

/// Every pod label under `trellis.io/` the injector reads.
pub const POD_LABELS: [&str; 1] = [INJECT_KEY];

/// The most names under `trellis.io/` that are not the mesh's one pod is
/// warned of one by one; the rest are told of by one warning more (which
/// names no number), so a pod with a thousand of them costs a few lines,
/// not a thousand.
pub const MAX_UNKNOWN_NAME_WARNINGS: usize = 5;

/// The longest name under `trellis.io/` a warning says back, in bytes as
/// it is shown (quoted when it holds a byte no name may); a longer one is
/// told of by its length.
const MAX_NAME_SHOWN: usize = 128;

/// A pod annotation the injector reads: one of [`POD_ANNOTATIONS`].
#[derive(Debug, Clone, Copy)]
struct Key(&'static str);

impl Key {
    /// `key`, which must be in [`POD_ANNOTATIONS`]: called in a `const`
    /// block, a key missing there fails the build, so no annotation is
    /// read that the injector would also warn of as unknown.
    const fn known(key: &'static str) -> Self {
        let mut i = 0;
        while i < POD_ANNOTATIONS.len() {
            if same(POD_ANNOTATIONS[i].as_bytes(), key.as_bytes()) {
                return Self(key);
            }
            i += 1;
        }
        panic!("a pod annotation the injector reads is missing from POD_ANNOTATIONS");
    }
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The most items a list annotation (`trellis.io/exclude-inbound-ports`,
/// `trellis.io/exclude-outbound-ports`, `trellis.io/exclude-outbound-cidrs`,
/// `trellis.io/opaque-ports`) may hold, duplicates included; a longer one
/// is refused naming the annotation. Each excluded port or CIDR becomes an
/// iptables rule that every new connection of the pod walks in order, and
/// each opaque port an entry the sidecar checks: lists are written by hand
/// and real ones hold a few items, so a few hundred is a mistake (or a pod
/// making the webhook's every review slow), never a workload's need.
pub const MAX_LIST_ITEMS: usize = 256;

/// Whether the sidecar writes its access log: `trellis.io/access-log`,
/// `"true"` (the default when absent) or `"false"`.
pub(super) fn access_log(annotations: &BTreeMap<String, String>) -> Result<bool, InjectError> {
    annotation_or(
        annotations,
        const { Key::known(ACCESS_LOG_ANNOTATION) },
        true,
        |value| match value {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(format!("expected \"true\" or \"false\", got {other:?}")),
        },
    )
}

/// The sidecar's `--tcp-user-timeout`: `trellis.io/tcp-user-timeout`, or
/// the config's when the pod has none.
pub(super) fn tcp_user_timeout(
    annotations: &BTreeMap<String, String>,
    config: &InjectConfig,
) -> Result<Option<Duration>, InjectError> {
    annotation_or(
        annotations,
        const { Key::known(TCP_USER_TIMEOUT_ANNOTATION) },
        config.tcp_user_timeout,
        parse_user_timeout,
    )
}

/// The sidecar's HTTP/2 connection limits, from one peer and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct H2Limits {
    pub per_peer: usize,
    pub total: usize,
}

impl H2Limits {
    /// `trellis.io/max-h2-connections-per-peer` and
    /// `trellis.io/max-h2-connections`, each the config's when the pod has
    /// none.
    pub(super) fn read(
        annotations: &BTreeMap<String, String>,
        config: &InjectConfig,
    ) -> Result<Self, InjectError> {
        Ok(Self {
            per_peer: annotation_or(
                annotations,
                const { Key::known(MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION) },
                config.max_h2_connections_per_peer,
                h2_limits::parse_per_peer,
            )?,
            total: annotation_or(
                annotations,
                const { Key::known(MAX_H2_CONNECTIONS_ANNOTATION) },
                config.max_h2_connections,
                h2_limits::parse_total,
            )?,
        })
    }
}

/// The sidecar's own `--opaque-ports`: `trellis.io/opaque-ports`, each item
/// a port as the sidecar's flag takes it ([`parse_port`]) or the name of a
/// TCP port one of `containers` declares (`mysql`), which the sidecar
/// cannot resolve itself: it never sees the pod's spec. An item with a
/// letter is a name (a Kubernetes port name has one); a name several
/// containers give different numbers stands for each of them. Duplicates
/// are dropped, the order kept; more than [`MAX_LIST_ITEMS`] items are
/// refused.
pub(super) fn opaque_ports<'a>(
    annotations: &BTreeMap<String, String>,
    containers: impl Iterator<Item = &'a Value>,
) -> Result<Vec<u16>, InjectError> {
    let key = const { Key::known(OPAQUE_PORTS_ANNOTATION) };
    let invalid = invalid(key.0);
    let items = list(annotations, key)?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    // The pod's TCP port names and their numbers, in the containers'
    // order, read once rather than for each item.
    let mut named: HashMap<&str, Vec<u16>> = HashMap::new();
    let declared = containers
        .filter_map(|c| c.get("ports").and_then(Value::as_array))
        .flatten()
        .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP");
    for port in declared {
        let name = port.get("name").and_then(Value::as_str);
        let number = port
            .get("containerPort")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0);
        if let (Some(name), Some(number)) = (name, number) {
            named.entry(name).or_default().push(number);
        }
    }
    let mut ports = Vec::new();
    for item in items {
        if !item.bytes().any(|b| b.is_ascii_alphabetic()) {
            ports.push(parse_port(item).map_err(invalid)?);
            continue;
        }
        match named.get(item) {
            Some(numbers) => ports.extend(numbers),
            None => {
                return Err(invalid(format!(
                    "{item:?} is neither a port (1-65535) nor the name of a TCP port a \
                     container of the pod declares"
                )));
            }
        }
    }
    dedup(&mut ports);
    Ok(ports)
}

/// The ports and CIDRs `trellis-proxy init` leaves alone: the config's, then
/// the pod's annotations'.
#[derive(Debug, Default)]
pub(super) struct Exclusions {
    pub inbound_ports: Vec<u16>,
    pub outbound_ports: Vec<u16>,
    pub outbound_cidrs: Vec<String>,
}

impl Exclusions {
    pub(super) fn read(
        annotations: &BTreeMap<String, String>,
        config: &InjectConfig,
    ) -> Result<Self, InjectError> {
        // The admin port must stay reachable for the kubelet's probes;
        // `--exclude-ports` replaces init's default, so it is always listed.
        let mut inbound_ports = vec![config.admin_port];
        inbound_ports.extend(&config.exclude_inbound_ports);
        let inbound = const { Key::known(EXCLUDE_INBOUND_PORTS) };
        inbound_ports.extend(each(annotations, inbound, parse_port)?);
        let mut outbound_ports = config.exclude_outbound_ports.clone();
        let outbound = const { Key::known(EXCLUDE_OUTBOUND_PORTS) };
        outbound_ports.extend(each(annotations, outbound, parse_port)?);
        let mut outbound_cidrs = config.exclude_outbound_cidrs.clone();
        let cidrs = const { Key::known(EXCLUDE_OUTBOUND_CIDRS) };
        outbound_cidrs.extend(each(annotations, cidrs, cidr)?);
        dedup(&mut inbound_ports);
        dedup(&mut outbound_ports);
        dedup(&mut outbound_cidrs);
        Ok(Self {
            inbound_ports,
            outbound_ports,
            outbound_cidrs,
        })
    }
}

/// The containers an earlier injection saw, as it wrote them in
/// `trellis.io/injected-containers` (comma-separated, blanks ignored,
/// duplicates dropped); `None` when the pod has no such annotation. Each
/// must be a container's name, as Kubernetes takes one (a DNS label): a
/// value written by hand that is not (`web, *`, a sentence) is an
/// [`InjectError::InvalidAnnotation`] naming the annotation, rather than
/// guessed at. A name no container of the pod has (one a later webhook
/// took out) is no error: it names nothing. The API server bounds the
/// value (256 KiB for all of a pod's annotations), so no count is.
pub(super) fn injected_containers(
    annotations: &BTreeMap<String, String>,
) -> Result<Option<HashSet<&str>>, InjectError> {
    let key = const { Key::known(INJECTED_CONTAINERS_ANNOTATION) };
    let Some(value) = annotations.get(key.0) else {
        return Ok(None);
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| container_name(name).map(|()| name).map_err(invalid(key.0)))
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Whether `name` may name a container (a DNS label, RFC 1123: 1 to 63
/// lowercase letters, digits and '-', starting and ending with a letter or
/// a digit), or why not.
fn container_name(name: &str) -> Result<(), String> {
    const RULE: &str = "a container's name is at most 63 lowercase letters, digits and '-', \
                        starting and ending with a letter or a digit";
    if name.len() > 63 {
        // A long value is not said back: the pod's author has it.
        return Err(format!(
            "an item of {} bytes is not a container name: {RULE}",
            name.len()
        ));
    }
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge = |b: Option<&u8>| b.is_some_and(|b| *b != b'-');
    if bytes.iter().all(inner) && edge(bytes.first()) && edge(bytes.last()) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a container name: {RULE}"))
    }
}

/// Drops the items seen before, keeping the first of each in its place.
fn dedup<T: Eq + Hash + Clone>(items: &mut Vec<T>) {
    let mut seen = HashSet::with_capacity(items.len());
    items.retain(|item| seen.insert(item.clone()));
}

/// The items of the list annotation `key` (comma-separated, blanks
/// ignored); more than [`MAX_LIST_ITEMS`] are an
/// [`InjectError::InvalidAnnotation`] naming `key`.
fn list(annotations: &BTreeMap<String, String>, Key(key): Key) -> Result<Vec<&str>, InjectError> {
    let items: Vec<&str> = annotations
        .get(key)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if items.len() > MAX_LIST_ITEMS {
        return Err(invalid(key)(format!(
            "{} items, more than the {MAX_LIST_ITEMS} a list annotation may hold",
            items.len()
        )));
    }
    Ok(items)
}

/// Each item of the list annotation `key` read by `parse`; the first it
/// refuses is an [`InjectError::InvalidAnnotation`] naming `key`.
fn each<T>(
    annotations: &BTreeMap<String, String>,
    key: Key,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, InjectError> {
    list(annotations, key)?
        .into_iter()
        .map(|item| parse(item).map_err(invalid(key.0)))
        .collect()
}

/// The annotation `key` read by `parse`, or `default` (the config's, or
/// the sidecar's own) when the pod has none; a value `parse` refuses is an
/// [`InjectError::InvalidAnnotation`] naming `key`.
fn annotation_or<T>(
    annotations: &BTreeMap<String, String>,
    Key(key): Key,
    default: T,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, InjectError> {
    match annotations.get(key) {
        None => Ok(default),
        Some(value) => parse(value).map_err(invalid(key)),
    }
}

/// The error for the annotation `key`, from why its value is refused.
fn invalid(key: &'static str) -> impl Fn(String) -> InjectError + Copy {
    move |message| InjectError::InvalidAnnotation { key, message }
}

/// `item` as a CIDR the init container takes (`ADDR/PREFIX`, a bare
/// address a block of one), or why it is not one.
pub(super) fn cidr(item: &str) -> Result<String, String> {
    let invalid = |why: &str| format!("{item:?} is not a CIDR: {why}");
    let (addr, prefix) = item.split_once('/').unwrap_or((item, ""));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid("not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| invalid(&format!("the prefix length must be 0-{max}")))?
    };
    Ok(format!("{addr}/{prefix}"))
}

/// `items` comma-separated, as the sidecar's and init's list flags and the
/// list annotations take them (`3306,5432`).
pub(crate) fn join<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut joined = String::new();
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            joined.push(',');
        }
        let _ = write!(joined, "{item}");
    }
    joined
}

/// Where `unknown_names` found a name under `trellis.io/` that is not the
/// mesh's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnknownName {
    PodAnnotation,
    PodLabel,
}

impl UnknownName {
    /// The metrics' label for it.
    pub fn reason(self) -> &'static str {
        match self {
            Self::PodAnnotation => "pod_annotation",
            Self::PodLabel => "pod_label",
        }
    }

    /// The pod's field, its names and what one is called.
    fn place(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Self::PodAnnotation => ("annotations", &POD_ANNOTATIONS, "annotation"),
            Self::PodLabel => ("labels", &POD_LABELS, "label"),
        }
    }
}

/// The names under `trellis.io/` of `pod`'s annotations and labels that are
/// not the mesh's (not in [`POD_ANNOTATIONS`], [`POD_LABELS`]): where
/// each kind was found, and the warnings for them, one a name, naming it
/// and the known name it is close to if one is ([`suggestion`]), for the
/// first [`MAX_UNKNOWN_NAME_WARNINGS`], then one that stands for the rest
/// in words that do not depend on how many they are.
/// Nothing is allocated for a name past those.
pub(super) fn unknown_names(pod: &Value) -> (Vec<UnknownName>, Vec<String>) {
    let metadata = pod.get("metadata");
    let mut found = Vec::new();
    let mut warnings = Vec::new();
    let mut more = false;
    for kind in [UnknownName::PodAnnotation, UnknownName::PodLabel] {
        let (field, known, noun) = kind.place();
        let unknown = metadata
            .and_then(|m| m.get(field))
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|names| names.keys())
            .filter(|name| name.starts_with(PREFIX) && !known.contains(&name.as_str()));
        for name in unknown {
            if found.last() != Some(&kind) {
                found.push(kind);
            }
            if warnings.len() == MAX_UNKNOWN_NAME_WARNINGS {
                more = true;
                continue;
            }
            // A long name is not said back: the pod's author has it, and
            // Kubernetes refuses it anyway (63 bytes after the prefix). One
            // with a byte no name may hold is quoted, so that a newline in
            // it cannot start a line of the log; quoted, a control byte
            // takes up to 6, so the bound is of the name as shown. The API
            // server keeps 4 KiB of a request's warnings: the few of these
            // leave room for the injection's own after them.
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_./".contains(&b);
            let shown = (name.len() <= MAX_NAME_SHOWN)
                .then(|| {
                    if name.bytes().all(plain) {
                        name.clone()
                    } else {
                        format!("{name:?}")
                    }
                })
                .filter(|shown| shown.len() <= MAX_NAME_SHOWN);
            let what = match shown {
                Some(shown) => format!("metadata.{field}[{shown}]"),
                None => format!(
                    "a name of {} bytes under metadata.{field}[{PREFIX}]",
                    name.len()
                ),
            };
            let mut warning = format!("trellis: {what} is not a Trellis {noun} and is ignored");
            if let Some(close) = suggestion(name, known) {
                let _ = write!(warning, "; did you mean {close}?");
            }
            warnings.push(warning);
        }
    }
    // The line for the rest says no number: a webhook called after ours
    // may add names before the API server reviews the pod again in the
    // same request, and the API server passes each text on once, so a
    // count would show twice, with two numbers. The same words on every
    // review show it once.
    if more {
        warnings.push(format!(
            "trellis: and more names under {PREFIX} in metadata.annotations or metadata.labels \
             that Trellis does not know, ignored"
        ));
    }
    (found, warnings)
}

/// The name of `known` that `name` is likely a typo of: the first one at
/// the fewest edits (a letter added, dropped or changed; ASCII case
/// aside), when those are 2 at most. A singular for a plural, or a plural
/// for a singular, is one of those (`trellis.io/opaque-port`).
fn suggestion(name: &str, known: &[&'static str]) -> Option<&'static str> {
    let name = name.strip_prefix(PREFIX)?.as_bytes();
    let mut best: Option<(usize, &'static str)> = None;
    for &candidate in known {
        let Some(target) = candidate.strip_prefix(PREFIX) else {
            continue;
        };
        if let Some(d) = edit_distance(name, target.as_bytes(), 2)
            && best.is_none_or(|(b, _)| d < b)
        {
            best = Some((d, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// The Levenshtein distance of `a` and `b`, ASCII case aside, when it is
/// `max` at most; on two rows on the stack, `b` being one of the mesh's
/// short names (a longer one, or an `a` longer by more than `max`, is
/// never that close).
fn edit_distance(a: &[u8], b: &[u8], max: usize) -> Option<usize> {
    const ROW: usize = 64;
    if b.len() >= ROW || a.len() > b.len() + max || b.len() > a.len() + max {
        return None;
    }
    let mut previous = [0_usize; ROW];
    let mut current = [0_usize; ROW];
    for (j, cell) in previous.iter_mut().enumerate().take(b.len() + 1) {
        *cell = j;
    }
    for (i, x) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, y) in b.iter().enumerate() {
            let change = usize::from(!x.eq_ignore_ascii_case(y));
            current[j + 1] = (previous[j] + change)
                .min(previous[j + 1] + 1)
                .min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    Some(previous[b.len()]).filter(|d| *d <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn parses_port_and_cidr_lists() {
        let a = annotations(&[
            (EXCLUDE_INBOUND_PORTS, "22, 9090,22"),
            (EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8,192.168.1.1"),
        ]);
        let e = Exclusions::read(&a, &InjectConfig::default()).unwrap();
        assert_eq!(e.inbound_ports, [15020, 22, 9090]);
        assert_eq!(
            e.outbound_cidrs,
            ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]
        );
    }

    #[test]
    fn names_a_bad_port_annotation() {
        let a = annotations(&[(EXCLUDE_OUTBOUND_PORTS, "443,https")]);
        let e = Exclusions::read(&a, &InjectConfig::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata.annotations[trellis.io/exclude-outbound-ports]: \"https\" is not a port (1-65535)"
        );
    }

    #[test]
    fn the_access_log_is_on_unless_the_annotation_says_false() {
        assert!(access_log(&annotations(&[])).unwrap());
        assert!(access_log(&annotations(&[(ACCESS_LOG_ANNOTATION, "true")])).unwrap());
        assert!(!access_log(&annotations(&[(ACCESS_LOG_ANNOTATION, "false")])).unwrap());
        let e = access_log(&annotations(&[(ACCESS_LOG_ANNOTATION, "False")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "metadata.annotations[trellis.io/access-log]: expected \"true\" or \"false\", got \"False\""
        );
    }

    #[test]
    fn the_tcp_user_timeout_annotation_overrides_the_config() {
        let config = InjectConfig::default();
        let read = |value: &str| {
            tcp_user_timeout(
                &annotations(&[(TCP_USER_TIMEOUT_ANNOTATION, value)]),
                &config,
            )
        };
        assert_eq!(
            tcp_user_timeout(&annotations(&[]), &config).unwrap(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(read("10m").unwrap(), Some(Duration::from_secs(600)));
        assert_eq!(read("0").unwrap(), None);
        assert_eq!(
            read("30s").unwrap_err().to_string(),
            "metadata.annotations[trellis.io/tcp-user-timeout]: \"30s\" is out of range: 0 \
             (off) or 80s to 1h (below 80s keepalive would reset an idle connection on one lost \
             probe)"
        );
        let e = read("600").unwrap_err().to_string();
        assert!(e.contains("\"600\" is not a duration"), "{e}");
    }

    #[test]
    fn the_h2_connection_annotations_override_the_config() {
        let config = InjectConfig {
            max_h2_connections_per_peer: 16,
            max_h2_connections: 2048,
            ..InjectConfig::default()
        };
        let read = |pairs: &[(&str, &str)]| H2Limits::read(&annotations(pairs), &config);
        assert_eq!(
            read(&[]).unwrap(),
            H2Limits {
                per_peer: 16,
                total: 2048
            }
        );
        assert_eq!(
            read(&[(MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION, "64")]).unwrap(),
            H2Limits {
                per_peer: 64,
                total: 2048
            }
        );
        assert_eq!(
            read(&[(MAX_H2_CONNECTIONS_ANNOTATION, " 256 ")]).unwrap(),
            H2Limits {
                per_peer: 16,
                total: 256
            }
        );
        for (key, bad, max) in [
            (MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION, "0", 1024),
            (MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION, "2000", 1024),
            (MAX_H2_CONNECTIONS_PER_PEER_ANNOTATION, "many", 1024),
            (MAX_H2_CONNECTIONS_ANNOTATION, "-1", 65536),
            (MAX_H2_CONNECTIONS_ANNOTATION, "100000", 65536),
            (MAX_H2_CONNECTIONS_ANNOTATION, "", 65536),
        ] {
            assert_eq!(
                read(&[(key, bad)]).unwrap_err().to_string(),
                format!(
                    "metadata.annotations[{key}]: {bad:?} is not a number of connections from 1 \
                     to {max}"
                )
            );
        }
    }

    #[test]
    fn opaque_ports_are_numbers_or_the_containers_port_names() {
        let containers = [
            serde_json::json!({"name": "db", "ports": [
                {"name": "mysql", "containerPort": 3306},
                {"name": "metrics", "containerPort": 9104},
            ]}),
            serde_json::json!({"name": "cache", "ports": [
                {"name": "redis", "containerPort": 6379, "protocol": "TCP"},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"},
            ]}),
        ];
        let read = |value: &str| {
            opaque_ports(
                &annotations(&[(OPAQUE_PORTS_ANNOTATION, value)]),
                containers.iter(),
            )
        };
        assert_eq!(
            opaque_ports(&annotations(&[]), containers.iter()).unwrap(),
            [] as [u16; 0]
        );
        assert_eq!(read("mysql, 25,redis,3306").unwrap(), [3306, 25, 6379]);
        assert_eq!(read("").unwrap(), [] as [u16; 0]);
        for (bad, says) in [
            ("3306,0", "\"0\" is not a port (1-65535)"),
            ("70000", "\"70000\" is not a port (1-65535)"),
            ("3306-3310", "ranges are not taken, list each port"),
            (
                "postgres",
                "\"postgres\" is neither a port (1-65535) nor the name of a TCP port a \
                 container of the pod declares",
            ),
            ("dns", "\"dns\" is neither a port"),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(
                e.starts_with("metadata.annotations[trellis.io/opaque-ports]: ")
                    && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    /// A list annotation of [`MAX_LIST_ITEMS`] items is taken, its
    /// duplicates dropped and the first of each kept in its place; one
    /// item more is refused naming the annotation, the count and the limit.
    #[test]
    fn list_annotations_take_up_to_the_limit_of_items() {
        // 200 distinct /32s, then the first 56 again, reversed.
        let distinct: Vec<String> = (0..200)
            .map(|i| format!("10.0.{}.{}/32", i / 100, i % 100))
            .collect();
        let mut items = distinct.clone();
        items.extend(distinct[..MAX_LIST_ITEMS - 200].iter().rev().cloned());
        assert_eq!(items.len(), MAX_LIST_ITEMS);
        let ports: Vec<String> = (0..MAX_LIST_ITEMS)
            .map(|i| (1000 + i % 100).to_string())
            .collect();
        let a = annotations(&[
            (EXCLUDE_OUTBOUND_CIDRS, &items.join(",")),
            (EXCLUDE_INBOUND_PORTS, &ports.join(", ")),
            (OPAQUE_PORTS_ANNOTATION, &ports.join(",")),
        ]);
        let e = Exclusions::read(&a, &InjectConfig::default()).unwrap();
        assert_eq!(e.outbound_cidrs, distinct);
        let expected: Vec<u16> = (1000..1100).collect();
        assert_eq!(e.inbound_ports[0], 15020);
        assert_eq!(e.inbound_ports[1..], expected);
        assert_eq!(opaque_ports(&a, [].iter()).unwrap(), expected);

        for key in [
            EXCLUDE_INBOUND_PORTS,
            EXCLUDE_OUTBOUND_PORTS,
            EXCLUDE_OUTBOUND_CIDRS,
            OPAQUE_PORTS_ANNOTATION,
        ] {
            let value = vec!["443"; MAX_LIST_ITEMS + 1].join(",");
            let a = annotations(&[(key, &value)]);
            let e = if key == OPAQUE_PORTS_ANNOTATION {
                opaque_ports(&a, [].iter()).unwrap_err()
            } else {
                Exclusions::read(&a, &InjectConfig::default()).unwrap_err()
            };
            assert_eq!(
                e.to_string(),
                format!(
                    "metadata.annotations[{key}]: 257 items, more than the 256 a list \
                     annotation may hold"
                )
            );
        }
    }

    /// A name under `trellis.io/` that is not the mesh's is told of with
    /// the known name at 1 or 2 edits (case aside: a plural for a
    /// singular, a letter dropped, doubled or swapped), the first of the
    /// closest; with none for a name farther from every one; never for a
    /// known name or one of another prefix.
    #[test]
    fn unknown_names_are_told_of_with_the_name_they_are_close_to() {
        for (name, close) in [
            ("trellis.io/acces-log", Some(ACCESS_LOG_ANNOTATION)),
            ("trellis.io/Access-Log", Some(ACCESS_LOG_ANNOTATION)),
            ("trellis.io/opaque-port", Some(OPAQUE_PORTS_ANNOTATION)),
            (
                "trellis.io/exclude-outbound-port",
                Some(EXCLUDE_OUTBOUND_PORTS),
            ),
            (
                "trellis.io/exclude-inbound-portss",
                Some(EXCLUDE_INBOUND_PORTS),
            ),
            (
                "trellis.io/max-h2-conections",
                Some(MAX_H2_CONNECTIONS_ANNOTATION),
            ),
            (
                "trellis.io/tcp-user-timout",
                Some(TCP_USER_TIMEOUT_ANNOTATION),
            ),
            ("trellis.io/injectd", Some(INJECT_KEY)),
            (
                "trellis.io/injected-container",
                Some(INJECTED_CONTAINERS_ANNOTATION),
            ),
            ("trellis.io/trustbundel", None),
            ("trellis.io/sidecar-image", None),
            ("trellis.io/", None),
        ] {
            assert_eq!(suggestion(name, &POD_ANNOTATIONS), close, "{name}");
        }
        assert_eq!(
            suggestion("trellis.io/injct", &POD_LABELS),
            Some(INJECT_KEY)
        );
        assert_eq!(edit_distance(b"ab", b"ba", 2), Some(2));
        assert_eq!(edit_distance(&[b'a'; 70], &[b'a'; 68], 2), None);

        let pod = serde_json::json!({"metadata": {
            "annotations": {
                ACCESS_LOG_ANNOTATION: "false",
                "example.com/trellis.io-acces-log": "x",
                "trellis.io/acces-log": "false",
            },
            "labels": {INJECT_KEY: "enabled", "app": "web"},
        }});
        let (found, warnings) = unknown_names(&pod);
        assert_eq!(found, [UnknownName::PodAnnotation]);
        assert_eq!(
            warnings,
            [
                "trellis: metadata.annotations[trellis.io/acces-log] is not a Trellis annotation \
              and is ignored; did you mean trellis.io/access-log?"
            ]
        );
        let forged = serde_json::json!({"metadata": {"annotations": {
            "trellis.io/acces-log\nINFO forged": "1",
        }}});
        assert_eq!(
            unknown_names(&forged).1,
            [
                "trellis: metadata.annotations[\"trellis.io/acces-log\\nINFO forged\"] is not a \
              Trellis annotation and is ignored"
            ]
        );
        // Control bytes are shown escaped, and a name whose escaped form
        // would be long is told of by its length: 100 bytes, 6 shown each.
        let controls = format!("{PREFIX}{}", "\u{1}".repeat(89));
        let pod = serde_json::json!({"metadata": {"annotations": {controls: "1"}}});
        assert_eq!(
            unknown_names(&pod).1,
            [
                "trellis: a name of 100 bytes under metadata.annotations[trellis.io/] is not a \
                 Trellis annotation and is ignored"
            ]
        );
        let tab = format!("{PREFIX}a\tb");
        let pod = serde_json::json!({"metadata": {"annotations": {tab: "1"}}});
        assert_eq!(
            unknown_names(&pod).1,
            [
                "trellis: metadata.annotations[\"trellis.io/a\\tb\"] is not a Trellis annotation \
              and is ignored"
            ]
        );
        let long = format!("{PREFIX}{}", "x".repeat(200));
        let pod = serde_json::json!({"metadata": {"labels": {long: "1"}}});
        assert_eq!(
            unknown_names(&pod),
            (
                vec![UnknownName::PodLabel],
                vec![
                    "trellis: a name of 211 bytes under metadata.labels[trellis.io/] is not a \
                     Trellis label and is ignored"
                        .to_owned()
                ]
            )
        );
    }

    #[test]
    fn names_a_bad_cidr_annotation() {
        let a = annotations(&[(EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33")]);
        let e = Exclusions::read(&a, &InjectConfig::default()).unwrap_err();
        assert!(e.to_string().contains("prefix length must be 0-32"), "{e}");
    }
}
