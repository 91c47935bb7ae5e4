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
//! one jump rule from `PREROUTING` and the one from `OUTPUT` in the nat table, and the
//! one from `OUTPUT` in the filter table (only under outbound deny).

use std::net::IpAddr;

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

/// Our chain in the filter table (jumped to from its `OUTPUT` under outbound deny): lets
/// UDP out only to the pod's nameservers on port 53, over loopback, from the proxy, and
/// to excluded ports and CIDRs; drops the rest.
pub const OUT_UDP: &str = "TRELLIS_OUT_UDP";

/// All chains we own in the nat table, in the order they are declared.
pub const CHAINS: [&str; 4] = [INBOUND, IN_REDIRECT, OUTPUT, OUT_REDIRECT];
/// All chains we own in the filter table. Nothing else is ours.
pub const FILTER_CHAINS: [&str; 1] = [OUT_UDP];

/// The one rule in a built-in nat chain that sends TCP into ours.
const JUMPS: [(&str, &str, &str); 2] = [("PREROUTING", "tcp", INBOUND), ("OUTPUT", "tcp", OUTPUT)];
/// The one rule in a built-in filter chain that sends UDP into ours.
const FILTER_JUMPS: [(&str, &str, &str); 1] = [("OUTPUT", "udp", OUT_UDP)];

/// The nat or the filter table: which chains of ours it holds and which jumps lead there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    /// The name `iptables-save` prints after `*`.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }

    fn chains(self) -> &'static [&'static str] {
        match self {
            Table::Nat => &CHAINS,
            Table::Filter => &FILTER_CHAINS,
        }
    }

    fn jumps(self) -> &'static [(&'static str, &'static str, &'static str)] {
        match self {
            Table::Nat => &JUMPS,
            Table::Filter => &FILTER_JUMPS,
        }
    }
}

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
    /// The pod's nameservers: DNS (port 53, TCP and UDP) to them is not redirected.
    pub nameservers: Vec<IpAddr>,
    /// Outbound deny: UDP that leaves the pod is dropped, except DNS to the nameservers,
    /// loopback, the proxy's own, and excluded ports and CIDRs.
    pub drop_udp: bool,
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

        rules.extend(self.outbound_returns(family, OUTPUT, "tcp"));
        rules.push(format!("-A {OUTPUT} -p tcp -j {OUT_REDIRECT}"));
        rules.push(format!(
            "-A {OUT_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        ));
        rules
    }

    /// The rules of `chain` letting outbound `proto` traffic through untouched, one `-A`
    /// line each, in order: the proxy's own, what stays in the pod, DNS to the pod's
    /// nameservers and what the operator excluded. The nat table redirects what is left
    /// of TCP; the filter table drops what is left of UDP.
    fn outbound_returns(&self, family: Family, chain: &str, proto: &str) -> Vec<String> {
        // First the proxy's own traffic: whatever it dials (peers, the app over
        // loopback, the control plane) must never come back into it.
        let mut rules = vec![format!(
            "-A {chain} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        )];
        if let Some(gid) = self.proxy_gid {
            rules.push(format!("-A {chain} -m owner --gid-owner {gid} -j RETURN"));
        }
        // Everything that leaves through lo stays inside the pod: 127.0.0.0/8 and ::1,
        // and also the pod's own address (the kernel routes it via lo). An app calling
        // itself never crosses a pod boundary, so there is no peer to authenticate.
        rules.push(format!("-A {chain} -o lo -j RETURN"));
        rules.push(format!("-A {chain} -d {} -j RETURN", family.loopback()));
        for nameserver in self.nameservers(family) {
            rules.push(format!(
                "-A {chain} -d {nameserver} -p {proto} -m {proto} --dport 53 -j RETURN"
            ));
        }
        for port in &self.exclude_outbound_ports {
            rules.push(format!(
                "-A {chain} -p {proto} -m {proto} --dport {port} -j RETURN"
            ));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.family() == family)
        {
            rules.push(format!("-A {chain} -d {cidr} -j RETURN"));
        }
        rules
    }

    /// The pod's nameservers of one family, as iptables prints them (`10.96.0.10/32`).
    fn nameservers(&self, family: Family) -> Vec<Cidr> {
        self.nameservers
            .iter()
            .map(|ip| Cidr::host(*ip))
            .filter(|c| c.family() == family)
            .collect()
    }

    /// The rules of our filter chain for one family, one `-A` line each, in order: empty
    /// unless UDP is dropped (outbound deny).
    pub fn filter_rules(&self, family: Family) -> Vec<String> {
        if !self.drop_udp {
            return Vec::new();
        }
        // What the operator excluded bypasses the sidecar for UDP too: with DROP they
        // would otherwise be cut off, not merely left alone.
        let mut rules = self.outbound_returns(family, OUT_UDP, "udp");
        rules.push(format!("-A {OUT_UDP} -j DROP"));
        rules
    }

    /// The `iptables-restore --noflush` input for both tables: the nat table as
    /// [`Interception::apply_input`] makes it, then the filter table: our UDP chain and its
    /// jump under outbound deny, or the removal of any left by an earlier run otherwise.
    pub fn apply_all_input(&self, family: Family, nat: &NatTable, filter: &NatTable) -> String {
        let mut out = self.apply_input(family, nat);
        if self.drop_udp {
            out.push_str(&table_input(
                Table::Filter,
                &self.filter_rules(family),
                filter,
            ));
        } else if let Some(cleanup) = cleanup_input_of(Table::Filter, filter) {
            out.push_str(&cleanup);
        }
        out
    }

    /// The `iptables-restore --noflush` input that makes the nat table hold exactly our
    /// rules, given what it holds now. Declaring a chain (`:NAME - [0:0]`) creates it or
    /// empties it, so our chain contents are replaced whole; the jump rules are kept when
    /// they are already right and otherwise removed and appended once. The whole input is
    /// one transaction: it applies completely or not at all.
    pub fn apply_input(&self, family: Family, current: &NatTable) -> String {
        table_input(Table::Nat, &self.chain_rules(family), current)
    }
}

/// The input that makes `table` hold exactly `rules` in our chains and our jumps once.
fn table_input(table: Table, rules: &[String], current: &NatTable) -> String {
    let mut out = format!("*{}\n", table.name());
    for chain in table.chains() {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for rule in rules {
        out.push_str(rule);
        out.push('\n');
    }
    for rule in &current.references {
        let wanted = table.jumps().iter().any(|(from, ..)| *from == rule.chain)
            && current.jump_is_right(table, &rule.chain);
        if !wanted {
            out.push_str(&rule.delete());
        }
    }
    for (from, protocol, to) in table.jumps() {
        if !current.jump_is_right(table, from) {
            out.push_str(&jump_rule(from, protocol, to));
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    out
}

fn jump_rule(from: &str, protocol: &str, to: &str) -> String {
    format!("-A {from} -p {protocol} -j {to}")
}

/// The `iptables-restore --noflush` input that removes every rule and chain of ours and
/// nothing else from both tables, or `None` when there is nothing of ours to remove.
pub fn cleanup_all_input(nat: &NatTable, filter: &NatTable) -> Option<String> {
    match (cleanup_input(nat), cleanup_input_of(Table::Filter, filter)) {
        (None, None) => None,
        (nat, filter) => Some(nat.unwrap_or_default() + &filter.unwrap_or_default()),
    }
}

/// The `iptables-restore --noflush` input that removes every rule and chain of ours and
/// nothing else from the nat table, or `None` when there is nothing of ours to remove.
pub fn cleanup_input(current: &NatTable) -> Option<String> {
    cleanup_input_of(Table::Nat, current)
}

fn cleanup_input_of(table: Table, current: &NatTable) -> Option<String> {
    if !current.holds_ours() {
        return None;
    }
    let mut out = format!("*{}\n", table.name());
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
/// (read before a change) when the table now holds `now`: used to undo what changed when
/// a change fails (the IPv4 one when IPv6 fails; the nat table when iptables-legacy fails
/// in the filter table after committing it), so a failure leaves nothing half done. Our
/// chains get their rules back and each jump goes back to its number in its chain, so
/// the table reads as it did, order included. Both tables: `previous` and `now` are
/// (nat, filter).
pub fn revert_all_input(previous: (&NatTable, &NatTable), now: (&NatTable, &NatTable)) -> String {
    let mut out = revert_input_of(Table::Nat, previous.0, now.0);
    if previous.1.holds_ours() || now.1.holds_ours() {
        out.push_str(&revert_input_of(Table::Filter, previous.1, now.1));
    }
    out
}

fn revert_input_of(table: Table, previous: &NatTable, now: &NatTable) -> String {
    let mut out = format!("*{}\n", table.name());
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
    // Each jump goes back to the place it had in its chain: rules the pod holds after it
    // (an earlier run's, a CNI's) stay after it. With ours deleted the chain holds only
    // the others, unchanged, so inserting in the order they were read puts every one back
    // at its number.
    for rule in &previous.references {
        out.push_str(&rule.insert());
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
    /// Its number in its chain (1 for the first rule), counting every rule there.
    pub position: usize,
}

impl Reference {
    /// The rule without `-A `: the chain and what follows.
    fn spec(&self) -> &str {
        self.line.strip_prefix("-A ").unwrap_or(&self.line)
    }

    fn delete(&self) -> String {
        format!("-D {}\n", self.spec())
    }

    /// Puts the rule back at its number in its chain.
    fn insert(&self) -> String {
        let rest = self
            .spec()
            .strip_prefix(self.chain.as_str())
            .unwrap_or_default();
        format!("-I {} {}{rest}\n", self.chain, self.position)
    }
}

/// What of ours the nat (or the filter) table holds now, read from `iptables-save`.
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
        NatTable::parse_table(save, Table::Nat)
    }

    /// Reads the section of `table` in `iptables-save` output; other tables are ignored.
    pub fn parse_table(save: &str, which: Table) -> NatTable {
        let mut table = NatTable::default();
        let mut in_table = false;
        // How many rules each chain not ours has shown so far.
        let mut counts: std::collections::HashMap<&str, usize> = Default::default();
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_table = name == which.name();
                continue;
            }
            if !in_table {
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if is_ours(which, name) {
                    table.chains.push(name.to_owned());
                }
            } else if let Some(spec) = line.strip_prefix("-A ") {
                let mut words = spec.split_whitespace();
                let chain = words.next().unwrap_or_default();
                if is_ours(which, chain) {
                    table.rules.push(line.to_owned());
                    continue;
                }
                let position = counts.entry(chain).or_default();
                *position += 1;
                let mut target = None;
                let mut prev = "";
                for word in words {
                    if prev == "-j" || prev == "-g" {
                        target = Some(word);
                    }
                    prev = word;
                }
                if target.is_some_and(|t| is_ours(which, t)) {
                    table.references.push(Reference {
                        chain: chain.to_owned(),
                        line: line.to_owned(),
                        position: *position,
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
    fn jump_is_right(&self, table: Table, chain: &str) -> bool {
        let Some((from, protocol, to)) = table.jumps().iter().find(|(from, ..)| *from == chain)
        else {
            return false;
        };
        let mut refs = self.references.iter().filter(|r| r.chain == *from);
        let one = refs
            .next()
            .is_some_and(|r| r.line == jump_rule(from, protocol, to));
        one && refs.next().is_none()
    }
}

fn is_ours(table: Table, chain: &str) -> bool {
    table.chains().contains(&chain)
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
            nameservers: vec![],
            drop_udp: false,
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
            nameservers: vec![],
            drop_udp: false,
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

    fn with_dns(drop_udp: bool) -> Interception {
        Interception {
            nameservers: vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()],
            drop_udp,
            ..defaults()
        }
    }

    #[test]
    fn dns_bypasses_only_towards_the_nameservers_of_its_family() {
        let v4 = with_dns(false).chain_rules(Family::V4);
        let dns: Vec<&String> = v4.iter().filter(|r| r.contains("--dport 53")).collect();
        assert_eq!(
            dns,
            ["-A TRELLIS_OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j RETURN"]
        );
        let dns_at = v4.iter().position(|r| r.contains("--dport 53"));
        let redirect = v4
            .iter()
            .position(|r| r.ends_with("-j TRELLIS_OUT_REDIRECT"));
        assert!(dns_at.unwrap() < redirect.unwrap());

        let v6 = with_dns(false).chain_rules(Family::V6);
        let dns: Vec<&String> = v6.iter().filter(|r| r.contains("--dport 53")).collect();
        assert_eq!(
            dns,
            ["-A TRELLIS_OUTPUT -d fd00::a/128 -p tcp -m tcp --dport 53 -j RETURN"]
        );
        assert!(
            !defaults()
                .chain_rules(Family::V4)
                .iter()
                .any(|r| r.contains("--dport 53"))
        );
    }

    #[test]
    fn outbound_deny_drops_udp_but_dns_to_the_nameservers_loopback_and_the_proxy() {
        let config = Interception {
            proxy_gid: Some(3000),
            exclude_outbound_ports: vec![5353],
            exclude_outbound_cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            ..with_dns(true)
        };
        assert_eq!(
            config.filter_rules(Family::V4),
            [
                "-A TRELLIS_OUT_UDP -m owner --uid-owner 1337 -j RETURN",
                "-A TRELLIS_OUT_UDP -m owner --gid-owner 3000 -j RETURN",
                "-A TRELLIS_OUT_UDP -o lo -j RETURN",
                "-A TRELLIS_OUT_UDP -d 127.0.0.0/8 -j RETURN",
                "-A TRELLIS_OUT_UDP -d 10.96.0.10/32 -p udp -m udp --dport 53 -j RETURN",
                "-A TRELLIS_OUT_UDP -p udp -m udp --dport 5353 -j RETURN",
                "-A TRELLIS_OUT_UDP -d 10.2.0.0/16 -j RETURN",
                "-A TRELLIS_OUT_UDP -j DROP",
            ]
        );
        let v6 = config.filter_rules(Family::V6);
        assert!(v6.contains(
            &"-A TRELLIS_OUT_UDP -d fd00::a/128 -p udp -m udp --dport 53 -j RETURN".to_owned()
        ));
        assert!(!v6.iter().any(|r| r.contains("10.")), "{v6:?}");

        let input = config.apply_all_input(Family::V4, &NatTable::default(), &NatTable::default());
        let filter = input.split_once("COMMIT\n").unwrap().1;
        assert!(
            filter.starts_with("*filter\n:TRELLIS_OUT_UDP - [0:0]\n"),
            "{input}"
        );
        assert!(
            filter.ends_with("-A OUTPUT -p udp -j TRELLIS_OUT_UDP\nCOMMIT\n"),
            "{input}"
        );
    }

    #[test]
    fn outbound_passthrough_leaves_udp_alone_and_removes_an_earlier_drop() {
        assert!(with_dns(false).filter_rules(Family::V4).is_empty());
        let input =
            with_dns(false).apply_all_input(Family::V4, &NatTable::default(), &NatTable::default());
        assert!(!input.contains("*filter"), "{input}");
        assert!(!input.contains("udp"), "{input}");

        let earlier = "*filter\n:OUTPUT ACCEPT [0:0]\n:TRELLIS_OUT_UDP - [0:0]\n\
            -A OUTPUT -p udp -j TRELLIS_OUT_UDP\n-A TRELLIS_OUT_UDP -j DROP\nCOMMIT\n";
        let filter = NatTable::parse_table(earlier, Table::Filter);
        let input = with_dns(false).apply_all_input(Family::V4, &NatTable::default(), &filter);
        let tail = input.split_once("COMMIT\n").unwrap().1;
        assert_eq!(
            lines(tail),
            [
                "*filter",
                "-D OUTPUT -p udp -j TRELLIS_OUT_UDP",
                "-F TRELLIS_OUT_UDP",
                "-X TRELLIS_OUT_UDP",
                "COMMIT",
            ]
        );
        // A rerun under deny keeps the jump and replaces the chain.
        let again = with_dns(true).apply_all_input(Family::V4, &NatTable::default(), &filter);
        assert!(!again.contains("-D OUTPUT"), "{again}");
        assert_eq!(lines_with(&again, "-A OUTPUT -p udp"), 0, "{again}");
        // Cleanup removes it too, and nat chains in the filter table are not ours.
        let all = cleanup_all_input(&NatTable::default(), &filter).unwrap();
        assert!(
            all.starts_with("*filter\n-D OUTPUT -p udp -j TRELLIS_OUT_UDP\n"),
            "{all}"
        );
        let stray = NatTable::parse_table(INSTALLED, Table::Filter);
        assert!(!stray.holds_ours(), "{stray:?}");
    }

    fn lines_with(text: &str, needle: &str) -> usize {
        text.lines().filter(|l| l.contains(needle)).count()
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
                    position: 1,
                },
                Reference {
                    chain: "OUTPUT".into(),
                    line: "-A OUTPUT -p tcp -j TRELLIS_OUTPUT".into(),
                    position: 2,
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
            revert_input_of(Table::Nat, &before, &after),
            cleanup_input(&after).unwrap(),
            "nothing before: reverting is cleaning up"
        );

        let input = revert_input_of(Table::Nat, &after, &after);
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
                "-I PREROUTING 1 -p tcp -j TRELLIS_INBOUND",
                "-I OUTPUT 2 -p tcp -j TRELLIS_OUTPUT",
                "COMMIT",
            ]
        );
    }

    #[test]
    fn revert_puts_each_jump_back_at_its_number_in_its_chain() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
            :TRELLIS_OUTPUT - [0:0]\n\
            -A PREROUTING -s 10.0.0.0/8 -j RETURN\n\
            -A OUTPUT -p tcp -j TRELLIS_OUTPUT\n\
            -A PREROUTING -p tcp -j TRELLIS_INBOUND\n\
            -A OUTPUT -d 10.9.9.9/32 -j RETURN\n\
            -A OUTPUT -p udp -j TRELLIS_OUTPUT\n\
            -A TRELLIS_OUTPUT -j RETURN\nCOMMIT\n";
        let before = NatTable::parse(save);
        let positions: Vec<(&str, usize)> = before
            .references
            .iter()
            .map(|r| (r.chain.as_str(), r.position))
            .collect();
        assert_eq!(positions, [("OUTPUT", 1), ("PREROUTING", 2), ("OUTPUT", 3)]);

        let input = revert_input_of(Table::Nat, &before, &NatTable::default());
        let inserts: Vec<&str> = input.lines().filter(|l| l.starts_with("-I")).collect();
        assert_eq!(
            inserts,
            [
                "-I OUTPUT 1 -p tcp -j TRELLIS_OUTPUT",
                "-I PREROUTING 2 -p tcp -j TRELLIS_INBOUND",
                "-I OUTPUT 3 -p udp -j TRELLIS_OUTPUT",
            ]
        );
        assert!(!input.contains("\n-A PREROUTING"), "{input}");
        assert!(!input.contains("\n-A OUTPUT"), "{input}");
    }
}
