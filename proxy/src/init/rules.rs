//! The rules of `trellis-proxy init`, as text: what our chains contain, and the
//! `iptables-restore --noflush` input that installs or removes them given what the nat
//! table holds now.
//!
//! Everything here is pure (no process, no file, no kernel), so the exact rule text is
//! unit-tested. Rules are written the way `iptables-save` prints them (option order,
//! `-m tcp` before `--dport`, masked CIDRs), so what we install reads back unchanged and
//! a second run can tell that nothing has to change.
//!
//! This module must never emit a rule that touches a chain that is not ours, except the
//! one jump rule from `PREROUTING` and the one from `OUTPUT`.

use super::cidr::{Cidr, Family};

/// Our chain for inbound TCP (jumped to from `PREROUTING`): skips excluded ports.
pub const INBOUND: &str = "TRELLIS_INBOUND";
/// Redirects inbound TCP to the sidecar's inbound port.
pub const IN_REDIRECT: &str = "TRELLIS_IN_REDIRECT";
/// Our chain for locally generated TCP (jumped to from `OUTPUT`): skips the proxy's
/// own traffic, loopback, excluded ports and CIDRs.
pub const OUTPUT: &str = "TRELLIS_OUTPUT";
/// Redirects outbound TCP to the sidecar's outbound port.
pub const OUT_REDIRECT: &str = "TRELLIS_OUT_REDIRECT";

/// All chains we own, in the order they are declared. Nothing else is ours.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, OUT_REDIRECT];

/// The one rule in a built-in chain that sends TCP into ours.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND), ("OUTPUT", OUTPUT)];

/// What to intercept: the validated flags of `trellis-proxy init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interception {
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

impl Interception {
    /// The rules of our chains for one family, one `-A` line each, in order.
    pub fn chain_rules(&self, family: Family) -> Vec<String> {
        let mut rules = Vec::new();

        for port in &self.exclude_inbound_ports {
            rules.push(format!(
                "-A {INBOUND} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        rules.push(format!("-A {INBOUND} -p tcp -j {IN_REDIRECT}"));
        rules.push(format!(
            "-A {IN_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        ));

        // First the proxy's own traffic: whatever it dials (peers, the app over
        // loopback, the control plane) must never come back into it.
        rules.push(format!(
            "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        ));
        if let Some(gid) = self.proxy_gid {
            rules.push(format!("-A {OUTPUT} -m owner --gid-owner {gid} -j RETURN"));
        }
        // Everything that leaves through lo stays inside the pod: 127.0.0.0/8 and ::1,
        // and also the pod's own address (the kernel routes it via lo). An app calling
        // itself never crosses a pod boundary, so there is no peer to authenticate.
        rules.push(format!("-A {OUTPUT} -o lo -j RETURN"));
        rules.push(format!("-A {OUTPUT} -d {} -j RETURN", family.loopback()));
        for port in &self.exclude_outbound_ports {
            rules.push(format!(
                "-A {OUTPUT} -p tcp -m tcp --dport {port} -j RETURN"
            ));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            rules.push(format!("-A {OUTPUT} -d {cidr} -j RETURN"));
        }
        rules.push(format!("-A {OUTPUT} -p tcp -j {OUT_REDIRECT}"));
        rules.push(format!(
            "-A {OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rules
    }

    /// The `iptables-restore --noflush` input that makes the nat table hold exactly our
    /// rules, given what it holds now. Declaring a chain (`:NAME - [0:0]`) creates it or
    /// empties it, so our chain contents are replaced whole; the jump rules are kept when
    /// they are already right and otherwise removed and appended once. The whole input is
    /// one transaction: it applies completely or not at all.
    pub fn apply_input(&self, family: Family, current: &NatTable) -> String {
        let mut out = String::from("*nat\n");
        for chain in CHAINS {
            out.push_str(&format!(":{chain} - [0:0]\n"));
        }
        for rule in self.chain_rules(family) {
            out.push_str(&rule);
            out.push('\n');
        }
        for rule in &current.references {
            let wanted = JUMPS.iter().any(|(from, _)| *from == rule.chain)
                && current.jump_is_right(&rule.chain);
            if !wanted {
                out.push_str(&rule.delete());
            }
        }
        for (from, to) in JUMPS {
            if !current.jump_is_right(from) {
                out.push_str(&jump_rule(from, to));
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
        out
    }
}

fn jump_rule(from: &str, to: &str) -> String {
    format!("-A {from} -p tcp -j {to}")
}

/// The `iptables-restore --noflush` input that removes every rule and chain of ours and
/// nothing else, or `None` when there is nothing of ours to remove.
pub fn cleanup_input(current: &NatTable) -> Option<String> {
    if !current.holds_ours() {
        return None;
    }
    let mut out = String::from("*nat\n");
    for rule in &current.references {
        out.push_str(&rule.delete());
    }
    // Our chains jump to each other: empty them all before deleting any.
    for chain in &current.chains {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &current.chains {
        out.push_str(&format!("-X {chain}\n"));
    }
    out.push_str("COMMIT\n");
    Some(out)
}

/// The `iptables-restore --noflush` input that puts back what was ours in `previous`
/// (read before a change) when the table now holds `now`: used to undo the IPv4 change
/// when the IPv6 one fails, so a failure leaves neither family half done.
pub fn revert_input(previous: &NatTable, now: &NatTable) -> String {
    let mut out = String::from("*nat\n");
    for rule in &now.references {
        out.push_str(&rule.delete());
    }
    for chain in &previous.chains {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    let gone: Vec<&String> = now
        .chains
        .iter()
        .filter(|c| !previous.chains.contains(c))
        .collect();
    for chain in &gone {
        out.push_str(&format!("-F {chain}\n"));
    }
    for chain in &gone {
        out.push_str(&format!("-X {chain}\n"));
    }
    for rule in &previous.rules {
        out.push_str(rule);
        out.push('\n');
    }
    for rule in &previous.references {
        out.push_str(&rule.line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// A rule in a chain that is not ours whose target is one of our chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub chain: String,
    /// The rule as `iptables-save` printed it, starting with `-A CHAIN`.
    pub line: String,
}

impl Reference {
    fn delete(&self) -> String {
        let spec = self.line.strip_prefix("-A ").unwrap_or(&self.line);
        format!("-D {spec}\n")
    }
}

/// What of ours the nat table holds now, read from `iptables-save -t nat`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTable {
    /// Our chains that exist.
    pub chains: Vec<String>,
    /// Rules outside our chains that jump or go to one of ours.
    pub references: Vec<Reference>,
    /// The rules inside our chains, as `iptables-save` printed them.
    pub rules: Vec<String>,
}

impl NatTable {
    /// Reads the `*nat` section of `iptables-save` output; other tables are ignored.
    pub fn parse(save: &str) -> NatTable {
        let mut table = NatTable::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == "nat";
                continue;
            }
            if !in_nat {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if is_ours(name) {
                    table.chains.push(name.to_owned());
                }
            } else if let Some(spec) = line.strip_prefix("-A ") {
                let mut words = spec.split_whitespace();
                let chain = words.next().unwrap_or_default();
                if is_ours(chain) {
                    table.rules.push(line.to_owned());
                    continue;
                }
                let mut target = None;
                let mut prev = "";
                for word in words {
                    if prev == "-j" || prev == "-g" {
                        target = Some(word);
                    }
                    prev = word;
                }
                if target.is_some_and(is_ours) {
                    table.references.push(Reference {
                        chain: chain.to_owned(),
                        line: line.to_owned(),
                    });
                }
            }
        }
        table
    }

    /// Whether any chain or jump of ours is there.
    pub fn holds_ours(&self) -> bool {
        !self.chains.is_empty() || !self.references.is_empty()
    }

    /// Whether `chain` holds exactly one reference to our chains and it is the jump rule
    /// we install.
    fn jump_is_right(&self, chain: &str) -> bool {
        let Some((from, to)) = JUMPS.iter().find(|(from, _)| *from == chain) else {
            return false;
        };
        let mut refs = self.references.iter().filter(|r| r.chain == *from);
        let one = refs.next().is_some_and(|r| r.line == jump_rule(from, to));
        one && refs.next().is_none()
    }
}

fn is_ours(chain: &str) -> bool {
    CHAINS.contains(&chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Interception {
        Interception {
            proxy_uid: 1337,
            proxy_gid: None,
            inbound_port: 15006,
            outbound_port: 15001,
            exclude_inbound_ports: vec![15020],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn default_ipv4_rules_redirect_tcp_in_and_out() {
        let input = defaults().apply_input(Family::V4, &NatTable::default());
        assert_eq!(
            lines(&input),
            [
                "*nat",
                ":TRELLIS_INBOUND - [0:0]",
                ":TRELLIS_IN_REDIRECT - [0:0]",
                ":TRELLIS_OUTPUT - [0:0]",
                ":TRELLIS_OUT_REDIRECT - [0:0]",
                "-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A TRELLIS_OUTPUT -o lo -j RETURN",
                "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp -j TRELLIS_OUT_REDIRECT",
                "-A TRELLIS_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
                "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn exclusions_and_gid_become_returns_before_the_redirect() {
        let config = Interception {
            proxy_uid: 2000,
            proxy_gid: Some(3000),
            inbound_port: 16006,
            outbound_port: 16001,
            exclude_inbound_ports: vec![22, 15020],
            exclude_outbound_ports: vec![53, 443],
            exclude_outbound_cidrs: vec![
                "10.1.2.3/8".parse().unwrap(),
                "fd00::1/8".parse().unwrap(),
                "192.168.1.7".parse().unwrap(),
            ],
        };
        assert_eq!(
            config.chain_rules(Family::V4),
            [
                "-A TRELLIS_INBOUND -p tcp -m tcp --dport 22 -j RETURN",
                "-A TRELLIS_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
                "-A TRELLIS_OUTPUT -m owner --uid-owner 2000 -j RETURN",
                "-A TRELLIS_OUTPUT -m owner --gid-owner 3000 -j RETURN",
                "-A TRELLIS_OUTPUT -o lo -j RETURN",
                "-A TRELLIS_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp -m tcp --dport 53 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp -m tcp --dport 443 -j RETURN",
                "-A TRELLIS_OUTPUT -d 10.0.0.0/8 -j RETURN",
                "-A TRELLIS_OUTPUT -d 192.168.1.7/32 -j RETURN",
                "-A TRELLIS_OUTPUT -p tcp -j TRELLIS_OUT_REDIRECT",
                "-A TRELLIS_OUT_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
            ]
        );
        let v6 = config.chain_rules(Family::V6);
        assert!(v6.contains(&"-A TRELLIS_OUTPUT -d ::1/128 -j RETURN".to_owned()));
        assert!(v6.contains(&"-A TRELLIS_OUTPUT -d fd00::/8 -j RETURN".to_owned()));
        assert!(
            !v6.iter()
                .any(|r| r.contains("10.0.0.0") || r.contains("127."))
        );
    }

    #[test]
    fn the_proxy_uid_is_skipped_before_anything_is_redirected() {
        let rules = defaults().chain_rules(Family::V6);
        let uid = rules.iter().position(|r| r.contains("--uid-owner 1337"));
        let redirect = rules
            .iter()
            .position(|r| r.ends_with("TRELLIS_OUT_REDIRECT"));
        assert!(uid.unwrap() < redirect.unwrap());
    }

    const INSTALLED: &str = "\
# Generated by iptables-save v1.8.9 on Tue Nov 24 13:45:04 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j TRELLIS_INBOUND
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:TRELLIS_INBOUND - [0:0]
:TRELLIS_IN_REDIRECT - [0:0]
:TRELLIS_OUTPUT - [0:0]
:TRELLIS_OUT_REDIRECT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -j TRELLIS_INBOUND
-A OUTPUT -d 10.9.9.9/32 -j OTHER
-A OUTPUT -p tcp -j TRELLIS_OUTPUT
-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT
-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
COMMIT
";

    #[test]
    fn parse_finds_our_chains_and_the_rules_that_reach_them() {
        let table = NatTable::parse(INSTALLED);
        assert_eq!(table.chains, CHAINS);
        assert_eq!(
            table.references,
            [
                Reference {
                    chain: "PREROUTING".into(),
                    line: "-A PREROUTING -p tcp -j TRELLIS_INBOUND".into(),
                },
                Reference {
                    chain: "OUTPUT".into(),
                    line: "-A OUTPUT -p tcp -j TRELLIS_OUTPUT".into(),
                },
            ]
        );
    }

    #[test]
    fn second_apply_keeps_the_jumps_and_replaces_chain_contents() {
        let input = defaults().apply_input(Family::V4, &NatTable::parse(INSTALLED));
        assert!(!input.contains("-A PREROUTING"), "{input}");
        assert!(!input.contains("-A OUTPUT"), "{input}");
        assert!(!input.contains("-D "), "{input}");
        assert!(input.contains(":TRELLIS_OUTPUT - [0:0]\n"));
    }

    #[test]
    fn duplicate_or_stray_jumps_are_replaced_by_one() {
        let save = "*nat\n:TRELLIS_INBOUND - [0:0]\n\
            -A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
            -A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
            -A INPUT -s 10.0.0.0/8 -j TRELLIS_OUTPUT\n\
            -A OUTPUT -p tcp -j TRELLIS_OUTPUT\nCOMMIT\n";
        let input = defaults().apply_input(Family::V4, &NatTable::parse(save));
        let tail: Vec<&str> = input.lines().skip(13).collect();
        assert_eq!(
            tail,
            [
                "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-D INPUT -s 10.0.0.0/8 -j TRELLIS_OUTPUT",
                "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn cleanup_removes_only_ours() {
        let input = cleanup_input(&NatTable::parse(INSTALLED)).unwrap();
        assert_eq!(
            lines(&input),
            [
                "*nat",
                "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "-F TRELLIS_INBOUND",
                "-F TRELLIS_IN_REDIRECT",
                "-F TRELLIS_OUTPUT",
                "-F TRELLIS_OUT_REDIRECT",
                "-X TRELLIS_INBOUND",
                "-X TRELLIS_IN_REDIRECT",
                "-X TRELLIS_OUTPUT",
                "-X TRELLIS_OUT_REDIRECT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn cleanup_without_our_rules_is_nothing() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OTHER - [0:0]\n-A OUTPUT -j OTHER\nCOMMIT\n";
        assert_eq!(cleanup_input(&NatTable::parse(save)), None);
        assert_eq!(cleanup_input(&NatTable::parse("")), None);
    }

    #[test]
    fn revert_restores_what_was_there_before() {
        let before = NatTable::default();
        let after = NatTable::parse(INSTALLED);
        assert_eq!(
            revert_input(&before, &after),
            cleanup_input(&after).unwrap(),
            "nothing before: reverting is cleaning up"
        );

        let input = revert_input(&after, &after);
        assert_eq!(
            lines(&input),
            [
                "*nat",
                "-D PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-D OUTPUT -p tcp -j TRELLIS_OUTPUT",
                ":TRELLIS_INBOUND - [0:0]",
                ":TRELLIS_IN_REDIRECT - [0:0]",
                ":TRELLIS_OUTPUT - [0:0]",
                ":TRELLIS_OUT_REDIRECT - [0:0]",
                "-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT",
                "-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
                "-A PREROUTING -p tcp -j TRELLIS_INBOUND",
                "-A OUTPUT -p tcp -j TRELLIS_OUTPUT",
                "COMMIT",
            ]
        );
    }
}
