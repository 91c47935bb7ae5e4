//! The injection settings file (`--inject-config FILE`), which the Helm chart
//! renders from its `injection.*` values into a ConfigMap.
//!
//! This module owns that file's format and turning it into an
//! [`InjectConfig`]. Every field is optional and defaults to
//! [`InjectConfig::default`]. Unknown fields are named in a warning and
//! otherwise ignored: the ConfigMap is shared by every ReplicaSet of the
//! control plane, so after an upgrade added a field, a rollback (`kubectl
//! rollout undo`), or an older replica restarting mid-rollout, reads a file
//! written for a newer release and must still start. Invalid values of
//! known fields are refused (exit 64). The
//! trust domain and the trust bundle are not in the file: the control plane
//! passes its own.
//!
//! ```json
//! {"image": "trellis/trellis:0.1.0", "imagePullPolicy": "IfNotPresent",
//!  "imagePullSecrets": [{"name": "regcred"}],
//!  "controlPlane": "trellis-control-plane.trellis-system.svc:15012",
//!  "tokenExpirationSeconds": 3600, "trustBundleConfigMap": "",
//!  "proxyResources": {"requests": {"cpu": "50m", "memory": "64Mi",
//!                                 "ephemeral-storage": "100Mi"}, "limits": {...}},
//!  "initResources": {...}, "excludeInboundPorts": [], "excludeOutboundPorts": [],
//!  "excludeOutboundCIDRs": [], "excludeOutboundDNS": true, "failurePolicy": "Fail", "logFormat": "json",
//!  "ipFamilies": ["IPv4"], "tcpUserTimeout": "2m",
//!  "maxH2ConnectionsPerPeer": 8, "maxH2Connections": 1024, "proxyUid": 1337}
//! ```

use clap::ValueEnum;
use serde::Deserialize;
use serde_json::Value;
use trellis_core::{TrustDomain, h2_limits};

use super::{
    FailurePolicy, InjectConfig, IpFamily, MAX_TOKEN_EXPIRATION_SECONDS,
    MIN_TOKEN_EXPIRATION_SECONDS, Resources, TrustBundleSource,
};

/// Why a settings file was refused; the message names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid injection settings: {0}")]
pub struct InvalidSettings(String);

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Settings {
    image: Option<String>,
    image_pull_policy: Option<String>,
    image_pull_secrets: Option<Vec<SecretReference>>,
    control_plane: Option<String>,
    token_expiration_seconds: Option<i64>,
    trust_bundle_config_map: Option<String>,
    proxy_resources: Option<KubeResources>,
    init_resources: Option<KubeResources>,
    exclude_inbound_ports: Option<Vec<u16>>,
    exclude_outbound_ports: Option<Vec<u16>>,
    #[serde(rename = "excludeOutboundCIDRs")]
    exclude_outbound_cidrs: Option<Vec<String>>,
    #[serde(rename = "excludeOutboundDNS")]
    exclude_outbound_dns: Option<bool>,
    failure_policy: Option<String>,
    log_format: Option<String>,
    #[serde(rename = "ipFamilies")]
    ip_families: Option<Vec<String>>,
    tcp_user_timeout: Option<String>,
    #[serde(rename = "maxH2ConnectionsPerPeer")]
    max_h2_connections_per_peer: Option<i64>,
    #[serde(rename = "maxH2Connections")]
    max_h2_connections: Option<i64>,
    proxy_uid: Option<i64>,
    /// Fields this release does not know: a typo, or a newer chart's.
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, Value>,
}

/// `{name: regcred}`, as a pod's `imagePullSecrets` names a Secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretReference {
    name: String,
}

/// `{requests: {cpu, memory, ephemeral-storage}, limits: {...}}` as in a
/// pod spec.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct KubeResources {
    #[serde(default)]
    requests: Quantities,
    #[serde(default)]
    limits: Quantities,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Quantities {
    cpu: Option<Value>,
    memory: Option<Value>,
    #[serde(rename = "ephemeral-storage")]
    ephemeral_storage: Option<Value>,
}

fn quantity(value: Option<Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl From<KubeResources> for Resources {
    fn from(r: KubeResources) -> Self {
        Self {
            requests_cpu: quantity(r.requests.cpu),
            requests_memory: quantity(r.requests.memory),
            requests_ephemeral_storage: quantity(r.requests.ephemeral_storage),
            limits_cpu: quantity(r.limits.cpu),
            limits_memory: quantity(r.limits.memory),
            limits_ephemeral_storage: quantity(r.limits.ephemeral_storage),
        }
    }
}

/// The resources of the injected container `field` (`proxyResources`,
/// `initResources`), refused when the API server would refuse every pod
/// they are injected into: a quantity Kubernetes cannot parse (`256MB`), or
/// a request above its limit. Neither is seen before a pod is created, and
/// the webhook's failure policy does not apply: the injection succeeded,
/// the pod it made is invalid.
fn checked_resources(r: KubeResources, field: &str) -> Result<Resources, InvalidSettings> {
    let resources = Resources::from(r);
    let parse = |name: &str, text: &Option<String>| match text {
        None => Ok(None),
        Some(text) => Quantity::parse(text).map(Some).ok_or_else(|| {
            InvalidSettings(format!(
                "{field}.{name}: {text:?} is not a Kubernetes quantity (such as 100m, 0.5, \
                 64Mi or 1Gi): the API server would refuse every injected pod"
            ))
        }),
    };
    for (resource, request, limit) in resources.by_name() {
        let parsed_request = parse(&format!("requests.{resource}"), request)?;
        let parsed_limit = parse(&format!("limits.{resource}"), limit)?;
        if let (Some(r), Some(l), Some(request), Some(limit)) =
            (parsed_request, parsed_limit, request, limit)
            && r > l
        {
            return Err(InvalidSettings(format!(
                "{field}: requests.{resource} {request} is above limits.{resource} {limit}: the \
                 API server would refuse every injected pod; raise the limit or lower the request"
            )));
        }
    }
    Ok(resources)
}

/// A Kubernetes resource quantity (`100m`, `1.5`, `64Mi`, `1e3`), as the
/// exact number `digits * multiplier * 10^exponent`, for comparing a request
/// with its limit. Only what a resource may be: no sign (requests and limits
/// are never negative).
#[derive(Debug, Clone, Copy)]
struct Quantity {
    digits: u128,
    /// 1, or a power of 1024 (`Ki` .. `Ei`).
    multiplier: u128,
    exponent: i32,
}

impl Quantity {
    /// The quantity `text` is, as Kubernetes' `resource.ParseQuantity`
    /// reads it, or `None`.
    fn parse(text: &str) -> Option<Self> {
        let number_end = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(number_end);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let mut digits: u128 = 0;
        // Each digit of the fraction scales the digits down by ten. Digits
        // beyond what u128 holds change no comparison a resource makes:
        // they are dropped, a whole one keeping its place in the exponent.
        let mut scale: i32 = 0;
        for (i, c) in whole.chars().chain(fraction.chars()).enumerate() {
            let d = u128::from(c.to_digit(10)?);
            let in_fraction = i >= whole.len();
            match digits.checked_mul(10).and_then(|n| n.checked_add(d)) {
                Some(n) => {
                    digits = n;
                    scale -= i32::from(in_fraction);
                }
                None => scale += i32::from(!in_fraction),
            }
        }
        let (multiplier, exponent): (u128, i32) = match suffix {
            "" => (1, 0),
            "n" => (1, -9),
            "u" => (1, -6),
            "m" => (1, -3),
            "k" => (1, 3),
            "M" => (1, 6),
            "G" => (1, 9),
            "T" => (1, 12),
            "P" => (1, 15),
            "E" => (1, 18),
            "Ki" => (1 << 10, 0),
            "Mi" => (1 << 20, 0),
            "Gi" => (1 << 30, 0),
            "Ti" => (1 << 40, 0),
            "Pi" => (1 << 50, 0),
            "Ei" => (1 << 60, 0),
            _ => {
                let exponent = suffix.strip_prefix(['e', 'E'])?;
                let digits = exponent.trim_start_matches(['+', '-']);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (1, exponent.parse().ok()?)
            }
        };
        Some(Self {
            digits,
            multiplier,
            exponent: exponent.checked_add(scale)?,
        })
    }

    /// `digits * multiplier` scaled to `10^exponent`, when it fits.
    fn scaled(self, exponent: i32) -> Option<u128> {
        let shift = u32::try_from(self.exponent - exponent).ok()?;
        self.digits
            .checked_mul(self.multiplier)?
            .checked_mul(10u128.checked_pow(shift)?)
    }
}

impl PartialEq for Quantity {
    fn eq(&self, other: &Self) -> bool {
        self.partial_cmp(other) == Some(std::cmp::Ordering::Equal)
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        let common = self.exponent.min(other.exponent);
        match (self.scaled(common), other.scaled(common)) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            // Too large to scale exactly: far apart, as the magnitudes say.
            _ => {
                let magnitude =
                    |q: &Self| (q.digits as f64) * (q.multiplier as f64) * 10f64.powi(q.exponent);
                magnitude(self).partial_cmp(&magnitude(other))
            }
        }
    }
}

impl InjectConfig {
    /// Reads the settings file for the mesh of `trust_domain`, whose sidecars
    /// get `trust_bundle_pem` (unless the file names a ConfigMap).
    pub fn from_settings(
        json: &str,
        trust_domain: TrustDomain,
        trust_bundle_pem: String,
    ) -> Result<Self, InvalidSettings> {
        let s: Settings = serde_json::from_str(json).map_err(|e| InvalidSettings(e.to_string()))?;
        if !s.unknown.is_empty() {
            let fields: Vec<&str> = s.unknown.keys().map(String::as_str).collect();
            tracing::warn!(
                fields = %fields.join(", "),
                "injection settings: ignoring fields this release does not know (a typo, or \
                 settings written for a newer release)"
            );
        }
        let mut config = InjectConfig {
            trust_domain,
            trust_bundle: TrustBundleSource::Annotation(trust_bundle_pem),
            ..InjectConfig::default()
        };
        if let Some(image) = s.image {
            if image.trim().is_empty() {
                return Err(InvalidSettings("image: must not be empty".into()));
            }
            config.image = image;
        }
        if let Some(policy) = s.image_pull_policy.filter(|p| !p.is_empty()) {
            if !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never") {
                return Err(InvalidSettings(format!(
                    "imagePullPolicy: expected Always, IfNotPresent or Never, got {policy:?}"
                )));
            }
            config.image_pull_policy = Some(policy);
        }
        if let Some(secrets) = s.image_pull_secrets {
            for SecretReference { name } in secrets {
                if !crate::config::is_dns_subdomain(&name) {
                    return Err(InvalidSettings(format!(
                        "imagePullSecrets: {name:?} is not a Secret name (lower case letters, \
                         digits, '-' and '.'; at most 253): the API server would refuse every \
                         injected pod"
                    )));
                }
                if !config.image_pull_secrets.contains(&name) {
                    config.image_pull_secrets.push(name);
                }
            }
        }
        if let Some(address) = s.control_plane {
            config.control_plane = address;
        }
        if let Some(seconds) = s.token_expiration_seconds {
            if seconds < MIN_TOKEN_EXPIRATION_SECONDS {
                return Err(InvalidSettings(format!(
                    "tokenExpirationSeconds: {seconds} is below the Kubernetes minimum of {MIN_TOKEN_EXPIRATION_SECONDS}"
                )));
            }
            if seconds > MAX_TOKEN_EXPIRATION_SECONDS {
                return Err(InvalidSettings(format!(
                    "tokenExpirationSeconds: {seconds} is above the Kubernetes maximum of \
                     {MAX_TOKEN_EXPIRATION_SECONDS} (2^32): the API server would refuse every \
                     injected pod"
                )));
            }
            config.token_expiration_seconds = seconds;
        }
        if let Some(name) = s.trust_bundle_config_map.filter(|n| !n.is_empty()) {
            if !crate::config::is_dns_subdomain(&name) {
                return Err(InvalidSettings(format!(
                    "trustBundleConfigMap: {name:?} is not a ConfigMap name (lower case \
                     letters, digits, '-' and '.'; at most 253): no injected sidecar could \
                     read its trust bundle"
                )));
            }
            config.trust_bundle = TrustBundleSource::ConfigMap(name);
        }
        if let Some(r) = s.proxy_resources {
            config.proxy_resources = checked_resources(r, "proxyResources")?;
        }
        if let Some(r) = s.init_resources {
            config.init_resources = checked_resources(r, "initResources")?;
        }
        if let Some(ports) = s.exclude_inbound_ports {
            config.exclude_inbound_ports = nonzero(ports, "excludeInboundPorts")?;
        }
        if let Some(ports) = s.exclude_outbound_ports {
            config.exclude_outbound_ports = nonzero(ports, "excludeOutboundPorts")?;
        }
        if let Some(cidrs) = s.exclude_outbound_cidrs {
            config.exclude_outbound_cidrs = cidrs
                .iter()
                .map(|item| super::annotations::cidr(item.trim()))
                .collect::<Result<_, _>>()
                .map_err(|why| InvalidSettings(format!("excludeOutboundCIDRs: {why}")))?;
        }
        if let Some(dns) = s.exclude_outbound_dns {
            config.exclude_outbound_dns = dns;
        }
        if let Some(policy) = s.failure_policy {
            config.failure_policy = match policy.as_str() {
                "Ignore" => FailurePolicy::Ignore,
                "Fail" => FailurePolicy::Fail,
                other => {
                    return Err(InvalidSettings(format!(
                        "failurePolicy: expected Ignore or Fail, got {other:?}"
                    )));
                }
            };
        }
        if let Some(format) = s.log_format {
            config.log_format = one_of(&format, "logFormat")?;
        }
        if let Some(families) = s.ip_families {
            config.ip_families = ip_families(&families)?;
        }
        if let Some(timeout) = s.tcp_user_timeout {
            config.tcp_user_timeout = trellis_core::tcp::parse_user_timeout(&timeout)
                .map_err(|why| InvalidSettings(format!("tcpUserTimeout: {why}")))?;
        }
        if let Some(limit) = s.max_h2_connections_per_peer {
            config.max_h2_connections_per_peer =
                h2_limits::check(limit, h2_limits::MAX_PER_PEER)
                    .map_err(|why| InvalidSettings(format!("maxH2ConnectionsPerPeer: {why}")))?;
        }
        if let Some(limit) = s.max_h2_connections {
            config.max_h2_connections = h2_limits::check(limit, h2_limits::MAX_TOTAL)
                .map_err(|why| InvalidSettings(format!("maxH2Connections: {why}")))?;
        }
        if let Some(uid) = s.proxy_uid {
            config.proxy_uid = u32::try_from(uid)
                .ok()
                .filter(|uid| (1..=MAX_RUN_AS_USER).contains(uid))
                .ok_or_else(|| {
                    InvalidSettings(format!(
                        "proxyUid: {uid} is outside 1..{MAX_RUN_AS_USER}: the sidecar never runs \
                         as root (UID 0), and Kubernetes refuses a runAsUser above \
                         {MAX_RUN_AS_USER}"
                    ))
                })?;
        }
        Ok(config)
    }
}

/// The largest `runAsUser` the API server accepts.
const MAX_RUN_AS_USER: u32 = i32::MAX as u32;

/// `["IPv4"]`, `["IPv6"]`, or both in the cluster's order, as a Service's
/// `ipFamilies` names them.
fn ip_families(names: &[String]) -> Result<Vec<IpFamily>, InvalidSettings> {
    let mut families = Vec::with_capacity(names.len());
    for name in names {
        let family = match name.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            other => {
                return Err(InvalidSettings(format!(
                    "ipFamilies: expected IPv4 or IPv6, got {other:?}"
                )));
            }
        };
        if families.contains(&family) {
            return Err(InvalidSettings(format!(
                "ipFamilies: {name} is given twice"
            )));
        }
        families.push(family);
    }
    if families.is_empty() {
        return Err(InvalidSettings(
            "ipFamilies: name at least the primary family".into(),
        ));
    }
    Ok(families)
}

fn nonzero(ports: Vec<u16>, field: &str) -> Result<Vec<u16>, InvalidSettings> {
    if ports.contains(&0) {
        return Err(InvalidSettings(format!("{field}: 0 is not a port")));
    }
    Ok(ports)
}

/// The value of `E` (a flag's values, as `--log-format`'s) that `given`
/// names, as the flag takes it; or a refusal naming `field` and every value
/// `E` has.
fn one_of<E: ValueEnum>(given: &str, field: &str) -> Result<E, InvalidSettings> {
    E::from_str(given, false).map_err(|_| {
        let names: Vec<String> = E::value_variants()
            .iter()
            .filter_map(ValueEnum::to_possible_value)
            .map(|value| value.get_name().to_owned())
            .collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => "nothing".to_owned(),
        };
        InvalidSettings(format!("{field}: expected {expected}, got {given:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let config = InjectConfig::from_settings("{}", td(), "PEM".into()).unwrap();
        assert_eq!(
            config,
            InjectConfig {
                trust_bundle: TrustBundleSource::Annotation("PEM".into()),
                ..InjectConfig::default()
            }
        );
    }

    #[test]
    fn ignores_fields_it_does_not_know() {
        let newer = r#"{"image": "trellis:2", "imagePullPolicies": "Always"}"#;
        let config = InjectConfig::from_settings(newer, td(), "".into()).unwrap();
        assert_eq!(config.image, "trellis:2", "the known fields are read");
        // A known field with a wrong value is still refused.
        let e =
            InjectConfig::from_settings(r#"{"image": 7, "x": 1}"#, td(), "".into()).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn reads_ip_families_primary_first() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        assert_eq!(read("{}").unwrap().ip_families, [IpFamily::V4]);
        let config = read(r#"{"ipFamilies": ["IPv6", "IPv4"]}"#).unwrap();
        assert_eq!(config.ip_families, [IpFamily::V6, IpFamily::V4]);
        for (bad, says) in [
            (r#"{"ipFamilies": []}"#, "primary"),
            (r#"{"ipFamilies": ["IPv6", "IPv6"]}"#, "twice"),
            (r#"{"ipFamilies": ["ipv6"]}"#, "expected IPv4 or IPv6"),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains("ipFamilies") && e.contains(says), "{bad}: {e}");
        }
    }

    /// A token lifetime the API server would refuse in every injected pod
    /// (below 10 minutes, above 2^32 seconds) fails the control plane's
    /// start.
    #[test]
    fn refuses_a_token_lifetime_kubernetes_would() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        for seconds in [600, 3600, 4_294_967_296] {
            let json = format!(r#"{{"tokenExpirationSeconds": {seconds}}}"#);
            assert_eq!(read(&json).unwrap().token_expiration_seconds, seconds);
        }
        for (seconds, says) in [
            (599_i64, "below the Kubernetes minimum of 600"),
            (4_294_967_297, "above the Kubernetes maximum of 4294967296"),
        ] {
            let json = format!(r#"{{"tokenExpirationSeconds": {seconds}}}"#);
            let e = read(&json).unwrap_err().to_string();
            assert!(
                e.contains("tokenExpirationSeconds") && e.contains(says),
                "{e}"
            );
        }
    }

    /// DNS bypasses the sidecar only towards the pod's nameservers unless
    /// the settings turn it off; port 53 is excluded for no other host.
    #[test]
    fn reads_whether_dns_to_the_nameservers_bypasses_the_sidecar() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        let config = read("{}").unwrap();
        assert!(config.exclude_outbound_dns);
        assert!(config.exclude_outbound_ports.is_empty());
        assert!(
            !read(r#"{"excludeOutboundDNS": false}"#)
                .unwrap()
                .exclude_outbound_dns
        );
        let e = read(r#"{"excludeOutboundDNS": "yes"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }

    /// A CIDR the init container would refuse fails the control plane's
    /// start, not every pod injected after it.
    #[test]
    fn reads_excluded_cidrs_and_refuses_what_is_not_one() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        let config =
            read(r#"{"excludeOutboundCIDRs": ["10.0.0.0/8", "fd00::1", " 169.254.169.254/32"]}"#)
                .unwrap();
        assert_eq!(
            config.exclude_outbound_cidrs,
            ["10.0.0.0/8", "fd00::1/128", "169.254.169.254/32"]
        );
        for (bad, says) in [
            ("10.96.0.0/33", "the prefix length must be 0-32"),
            ("kubernetes.default", "not an IPv4 or IPv6 address"),
            ("10.0.0.0/8;172.16.0.0/12", "the prefix length must be 0-32"),
        ] {
            let json = format!(r#"{{"excludeOutboundCIDRs": ["{bad}"]}}"#);
            let e = read(&json).unwrap_err().to_string();
            assert!(
                e.contains("excludeOutboundCIDRs") && e.contains(bad) && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    /// The sidecars' user timeout for pods without the annotation; a value
    /// the sidecar would refuse fails the control plane's start, not every
    /// pod injected after it.
    #[test]
    fn reads_the_tcp_user_timeout_and_refuses_what_the_sidecar_would() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        assert_eq!(
            read("{}").unwrap().tcp_user_timeout,
            Some(std::time::Duration::from_secs(120))
        );
        let config = read(r#"{"tcpUserTimeout": "15m"}"#).unwrap();
        assert_eq!(
            config.tcp_user_timeout,
            Some(std::time::Duration::from_secs(900))
        );
        assert_eq!(
            read(r#"{"tcpUserTimeout": "0"}"#).unwrap().tcp_user_timeout,
            None
        );
        for (bad, says) in [("10s", "out of range"), ("120", "not a duration")] {
            let json = format!(r#"{{"tcpUserTimeout": "{bad}"}}"#);
            let e = read(&json).unwrap_err().to_string();
            assert!(
                e.contains(&format!("tcpUserTimeout: \"{bad}\" ")) && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    /// The sidecar's UID, which an operator moves off one their images
    /// use; root, or a UID Kubernetes refuses, fails the control plane's
    /// start, naming the field, rather than every pod injected after it.
    #[test]
    fn reads_each_log_format_the_sidecar_takes_and_refuses_any_other() {
        use trellis_core::logging::Format;
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        assert_eq!(read("{}").unwrap().log_format, Format::Json);
        let names: Vec<String> = Format::value_variants()
            .iter()
            .map(|format| format.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        for (format, name) in Format::value_variants().iter().zip(&names) {
            let config = read(&format!(r#"{{"logFormat": "{name}"}}"#)).unwrap();
            assert_eq!(config.log_format, *format, "{name}");
        }
        for bad in ["xml", "JSON", ""] {
            let e = read(&format!(r#"{{"logFormat": "{bad}"}}"#))
                .unwrap_err()
                .to_string();
            let says = format!(
                "invalid injection settings: logFormat: expected text or json, got {bad:?}"
            );
            assert_eq!(e, says);
            assert!(names.iter().all(|name| e.contains(name.as_str())), "{e}");
        }
    }

    #[test]
    fn reads_the_proxy_uid_and_refuses_root() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        assert_eq!(read("{}").unwrap().proxy_uid, 1337);
        assert_eq!(read(r#"{"proxyUid": 2102}"#).unwrap().proxy_uid, 2102);
        for bad in ["0", "-1", "2147483648"] {
            let e = read(&format!(r#"{{"proxyUid": {bad}}}"#))
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!(
                    "invalid injection settings: proxyUid: {bad} is outside 1..2147483647: the \
                     sidecar never runs as root (UID 0), and Kubernetes refuses a runAsUser \
                     above 2147483647"
                )
            );
        }
    }

    /// The sidecars' HTTP/2 connection limits for pods without the
    /// annotations; a value the sidecar would refuse fails the control
    /// plane's start, not every pod injected after it.
    #[test]
    fn reads_the_h2_connection_limits_and_refuses_what_the_sidecar_would() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        let config = read("{}").unwrap();
        assert_eq!(
            (
                config.max_h2_connections_per_peer,
                config.max_h2_connections
            ),
            (8, 1024)
        );
        let config = read(r#"{"maxH2ConnectionsPerPeer": 64, "maxH2Connections": 512}"#).unwrap();
        assert_eq!(
            (
                config.max_h2_connections_per_peer,
                config.max_h2_connections
            ),
            (64, 512)
        );
        for (bad, says) in [
            (
                r#"{"maxH2ConnectionsPerPeer": 0}"#,
                "maxH2ConnectionsPerPeer: 0 is not a number of connections from 1 to 1024",
            ),
            (
                r#"{"maxH2ConnectionsPerPeer": 1025}"#,
                "maxH2ConnectionsPerPeer: 1025 is not a number of connections from 1 to 1024",
            ),
            (
                r#"{"maxH2Connections": -5}"#,
                "maxH2Connections: -5 is not a number of connections from 1 to 65536",
            ),
            (
                r#"{"maxH2Connections": 65537}"#,
                "maxH2Connections: 65537 is not a number of connections from 1 to 65536",
            ),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let e = read(r#"{"maxH2Connections": "1024"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }

    /// Resources the API server would refuse in every injected pod fail
    /// the control plane's start, naming the field, not every pod injected
    /// after it.
    #[test]
    fn refuses_resources_the_api_server_would_refuse() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        for good in [
            r#"{"proxyResources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                   "limits": {"cpu": "0.1", "memory": "67108864"}}}"#,
            r#"{"proxyResources": {"requests": {"cpu": 0.5, "memory": "1G"},
                                   "limits": {"cpu": "1", "memory": "1Gi"}}}"#,
            r#"{"initResources": {"requests": {"cpu": ".5", "memory": "1e3"},
                                  "limits": {"cpu": "500m", "memory": "1k"}}}"#,
            r#"{"initResources": {"requests": {"memory": "512Mi"}}}"#,
            r#"{"proxyResources": {"requests": {"ephemeral-storage": "1Gi"},
                                   "limits": {"ephemeral-storage": "1024Mi"}}}"#,
        ] {
            read(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, says) in [
            (
                r#"{"proxyResources": {"limits": {"memory": "256MB"}}}"#,
                "proxyResources.limits.memory: \"256MB\" is not a Kubernetes quantity",
            ),
            (
                r#"{"initResources": {"requests": {"cpu": "1 core"}}}"#,
                "initResources.requests.cpu: \"1 core\" is not a Kubernetes quantity",
            ),
            (
                r#"{"proxyResources": {"requests": {"memory": "512Mi"},
                                       "limits": {"memory": "256Mi"}}}"#,
                "proxyResources: requests.memory 512Mi is above limits.memory 256Mi",
            ),
            (
                r#"{"initResources": {"requests": {"cpu": "1001m"}, "limits": {"cpu": 1}}}"#,
                "initResources: requests.cpu 1001m is above limits.cpu 1",
            ),
            (
                r#"{"proxyResources": {"requests": {"ephemeral-storage": "1GB"}}}"#,
                "proxyResources.requests.ephemeral-storage: \"1GB\" is not a Kubernetes quantity",
            ),
            (
                r#"{"initResources": {"requests": {"ephemeral-storage": "2Gi"},
                                      "limits": {"ephemeral-storage": "1Gi"}}}"#,
                "initResources: requests.ephemeral-storage 2Gi is above limits.ephemeral-storage 1Gi",
            ),
        ] {
            let e = read(bad).unwrap_err().to_string();
            assert!(
                e.contains(says) && e.contains("would refuse every injected pod"),
                "{bad}: {e}"
            );
        }
    }

    /// Pull secrets are the pod's `imagePullSecrets` entries; a name the
    /// API server would refuse in every injected pod fails the start.
    #[test]
    fn reads_pull_secrets_and_refuses_what_is_not_a_name() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        assert!(read("{}").unwrap().image_pull_secrets.is_empty());
        let config =
            read(r#"{"imagePullSecrets": [{"name": "regcred"}, {"name": "mirror.io"}, {"name": "regcred"}]}"#)
                .unwrap();
        assert_eq!(config.image_pull_secrets, ["regcred", "mirror.io"]);
        for bad in ["RegCred", "", "-regcred", "reg_cred"] {
            let json = format!(r#"{{"imagePullSecrets": [{{"name": "{bad}"}}]}}"#);
            let e = read(&json).unwrap_err().to_string();
            assert!(
                e.contains(&format!("imagePullSecrets: {bad:?} is not a Secret name")),
                "{bad}: {e}"
            );
        }
        let e = read(r#"{"imagePullSecrets": ["regcred"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid type"), "{e}");
    }

    /// The trust bundle's ConfigMap is named in every injected pod's volume;
    /// a name no ConfigMap can have fails the start, naming the field.
    #[test]
    fn refuses_a_trust_bundle_config_map_that_is_not_a_name() {
        let read = |json: &str| InjectConfig::from_settings(json, td(), "PEM".into());
        let config = read(r#"{"trustBundleConfigMap": "trellis.bundle-1"}"#).unwrap();
        assert_eq!(
            config.trust_bundle,
            TrustBundleSource::ConfigMap("trellis.bundle-1".into())
        );
        for bad in ["Trellis_Bundle", "-bundle", "bundle.", "bundle pem"] {
            let json = format!(r#"{{"trustBundleConfigMap": "{bad}"}}"#);
            let e = read(&json).unwrap_err().to_string();
            assert!(
                e.contains(&format!(
                    "trustBundleConfigMap: {bad:?} is not a ConfigMap name"
                )),
                "{bad}: {e}"
            );
        }
    }

    /// Settings that name no failure policy fail closed, as the chart's
    /// default does: a pod that cannot be injected is refused, not run
    /// outside the mesh.
    #[test]
    fn without_a_failure_policy_injection_fails_closed() {
        let config = InjectConfig::from_settings("{}", td(), "PEM".into()).unwrap();
        assert_eq!(config.failure_policy, FailurePolicy::Fail);
        let ignore = r#"{"failurePolicy": "Ignore"}"#;
        let config = InjectConfig::from_settings(ignore, td(), "PEM".into()).unwrap();
        assert_eq!(config.failure_policy, FailurePolicy::Ignore);
    }

    #[test]
    fn reads_resources_and_policy() {
        let json = r#"{"proxyResources": {"requests": {"cpu": "20m", "ephemeral-storage": "100Mi"},
                                          "limits": {"memory": 1073741824, "ephemeral-storage": "1Gi"}},
                       "failurePolicy": "Fail", "trustBundleConfigMap": "bundle"}"#;
        let config = InjectConfig::from_settings(json, td(), "PEM".into()).unwrap();
        assert_eq!(
            config.proxy_resources,
            Resources {
                requests_cpu: Some("20m".into()),
                requests_ephemeral_storage: Some("100Mi".into()),
                limits_memory: Some("1073741824".into()),
                limits_ephemeral_storage: Some("1Gi".into()),
                ..Resources::default()
            }
        );
        assert_eq!(config.failure_policy, FailurePolicy::Fail);
        assert_eq!(
            config.trust_bundle,
            TrustBundleSource::ConfigMap("bundle".into())
        );
    }
}
