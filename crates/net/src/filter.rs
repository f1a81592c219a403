//! What a VIF's port lets through (XenAPI's `locking_mode` with
//! `ipv4_allowed`/`ipv6_allowed`, and the `ratelimit` QoS), as nftables
//! rules of the bridge family on frames the guest sends into its tap.
//!
//! One table, `bridge corral`: its prerouting chain jumps, by the tap's
//! name, through the map `vifs` to a chain of that tap's own. Rules match
//! the name, not the device, so they can be in place before QEMU opens the
//! tap, and they outlive corrald (a `kill -9` leaves guests filtered).

use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

/// The nftables table that holds every port's rules.
pub const TABLE: &str = "corral";

/// Which frames from the guest pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortMode {
    /// All of them.
    Unlocked,
    /// Only from the VIF's MAC, and with IP traffic only from these
    /// addresses (none listed: no IP traffic of that family).
    Locked {
        ipv4: Vec<Ipv4Addr>,
        ipv6: Vec<Ipv6Addr>,
    },
    /// None.
    Disabled,
}

/// A tap's filter: its mode and an optional rate limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// The guest NIC's MAC, six bytes.
    pub mac: [u8; 6],
    pub mode: PortMode,
    /// XenAPI's `qos_algorithm_params:kbps` (kilobytes per second) for
    /// `qos_algorithm_type=ratelimit`: what the guest sends beyond it is
    /// dropped.
    pub rate_kbytes: Option<u64>,
}

impl PortPolicy {
    /// Whether the port needs no rules at all.
    pub fn is_open(&self) -> bool {
        self.mode == PortMode::Unlocked && self.rate_kbytes.is_none()
    }
}

/// The table and its dispatch, declared idempotently (`add` of what
/// exists is no error).
fn table_head(s: &mut String) {
    // A rule inside a declared chain would be added again each time: the
    // dispatch rule is flushed and written once instead.
    let _ = writeln!(
        s,
        "table bridge {TABLE} {{\n  map vifs {{ type ifname : verdict; }}\n  chain prerouting {{ type filter hook prerouting priority -200; policy accept; }}\n}}\nflush chain bridge {TABLE} prerouting\nadd rule bridge {TABLE} prerouting iifname vmap @vifs"
    );
}

/// A set of addresses in nft syntax.
fn set<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(T::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// Whether `tap` can name a chain: Corral's tap names (`vif<hex>.<n>`)
/// can; nothing else is let into a script.
pub fn nameable(tap: &str) -> bool {
    !tap.is_empty()
        && tap.len() <= 15
        && tap.starts_with(|c: char| c.is_ascii_alphabetic())
        && tap.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
}

/// The nft script that gives `tap` exactly this policy, in one
/// transaction. `tap` must be [`nameable`]; every other value is typed.
pub fn script(tap: &str, policy: &PortPolicy) -> String {
    let mut s = String::new();
    table_head(&mut s);
    let chain = format!("bridge {TABLE} {tap}");
    let _ = writeln!(s, "add chain {chain}");
    let _ = writeln!(s, "flush chain {chain}");
    let mut rule = |r: &str| {
        let _ = writeln!(s, "add rule {chain} {r}");
    };
    match &policy.mode {
        PortMode::Disabled => rule("drop"),
        PortMode::Unlocked => {}
        PortMode::Locked { ipv4, ipv6 } => {
            let mac = crate::mac::format_mac(policy.mac);
            rule(&format!("ether saddr != {mac} drop"));
            if ipv4.is_empty() {
                rule("ether type arp drop");
                rule("ether type ip drop");
            } else {
                rule(&format!("ether type arp arp saddr ether != {mac} drop"));
                rule(&format!(
                    "ether type arp arp saddr ip != {} drop",
                    set(ipv4)
                ));
                rule(&format!("ether type ip ip saddr != {} drop", set(ipv4)));
            }
            if ipv6.is_empty() {
                rule("ether type ip6 drop");
            } else {
                rule(&format!("ether type ip6 ip6 saddr != {} drop", set(ipv6)));
            }
            // Nothing but IP and ARP leaves a locked port.
            rule("ether type != { ip, ip6, arp } drop");
        }
    }
    if let Some(k) = policy.rate_kbytes {
        rule(&format!("limit rate over {k} kbytes/second drop"));
    }
    let _ = writeln!(
        s,
        "add element bridge {TABLE} vifs {{ \"{tap}\" : jump {tap} }}"
    );
    s
}

/// The nft script that removes `tap`'s rules whether or not it has any
/// (adding first makes the deletes safe).
pub fn clear_script(tap: &str) -> String {
    let mut s = String::new();
    table_head(&mut s);
    let chain = format!("bridge {TABLE} {tap}");
    let _ = writeln!(s, "add chain {chain}");
    let _ = writeln!(
        s,
        "add element bridge {TABLE} vifs {{ \"{tap}\" : jump {tap} }}"
    );
    let _ = writeln!(s, "delete element bridge {TABLE} vifs {{ \"{tap}\" }}");
    let _ = writeln!(s, "delete chain {chain}");
    s
}

/// The taps with rules, from `nft list chains` output of the table.
pub fn chains_in(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| l.trim().strip_prefix("chain "))
        .filter_map(|l| l.split_whitespace().next())
        .map(|n| n.trim_matches('"').to_owned())
        .filter(|n| n != "prerouting")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x96, 0xd5, 0xc7, 0xdc, 0x29, 0x39];

    #[test]
    fn a_locked_port_passes_only_its_mac_and_addresses() {
        let p = PortPolicy {
            mac: MAC,
            mode: PortMode::Locked {
                ipv4: vec!["198.18.0.5".parse().unwrap()],
                ipv6: vec![],
            },
            rate_kbytes: None,
        };
        let s = script("vif1234567.0", &p);
        for line in [
            "flush chain bridge corral vif1234567.0",
            "add rule bridge corral vif1234567.0 ether saddr != 96:d5:c7:dc:29:39 drop",
            "add rule bridge corral vif1234567.0 ether type arp arp saddr ip != { 198.18.0.5 } drop",
            "add rule bridge corral vif1234567.0 ether type ip ip saddr != { 198.18.0.5 } drop",
            "add rule bridge corral vif1234567.0 ether type ip6 drop",
            "add element bridge corral vifs { \"vif1234567.0\" : jump vif1234567.0 }",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} not in\n{s}");
        }
        assert!(!s.contains("limit"));
    }

    #[test]
    fn locked_without_addresses_passes_no_ip() {
        let p = PortPolicy {
            mac: MAC,
            mode: PortMode::Locked {
                ipv4: vec![],
                ipv6: vec![],
            },
            rate_kbytes: None,
        };
        let s = script("vif1234567.0", &p);
        assert!(s.contains("ether type ip drop") && s.contains("ether type arp drop"));
    }

    #[test]
    fn disabled_drops_everything_and_a_rate_limit_follows_the_mode() {
        let p = PortPolicy {
            mac: MAC,
            mode: PortMode::Disabled,
            rate_kbytes: Some(100),
        };
        let s = script("vif1234567.1", &p);
        let rules: Vec<&str> = s
            .lines()
            .filter(|l| l.starts_with("add rule bridge corral vif"))
            .collect();
        assert_eq!(rules.len(), 2, "{s}");
        assert!(rules[0].ends_with(" drop") && !rules[0].contains("ether"));
        assert!(rules[1].ends_with("limit rate over 100 kbytes/second drop"));
        assert!(!p.is_open());
        assert!(
            PortPolicy {
                mode: PortMode::Unlocked,
                rate_kbytes: None,
                ..p
            }
            .is_open()
        );
    }

    #[test]
    fn clearing_is_safe_when_nothing_is_there() {
        let s = clear_script("vif1234567.2");
        let add = s.find("add chain").unwrap();
        let del = s.find("delete chain").unwrap();
        assert!(add < del && s.contains("delete element bridge corral vifs { \"vif1234567.2\" }"));
    }

    #[test]
    fn chains_are_read_back_by_tap_name() {
        let listing = "table bridge corral {\n\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\t}\n\tchain vif1234567.0 {\n\t}\n\tchain \"vif7654321.3\" {\n\t}\n}\n";
        assert_eq!(chains_in(listing), vec!["vif1234567.0", "vif7654321.3"]);
    }
}
