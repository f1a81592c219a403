//! Names of the host devices Corral makes, and the rules for names a
//! client chooses. Pure, so that they are table-tested.

/// Linux's limit on an interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Prefixes of the devices Corral names itself; a client may not choose a
/// bridge name that starts with one (XAPI's `INVALID_VALUE ["bridge", …]`).
pub const RESERVED_PREFIXES: &[&str] = &["xen", "xapi", "vif", "tap", "eth"];

/// The bridge of the network a NIC's PIF is on: `ethN` → `xenbrN` as on a
/// fresh XenServer install, any other NIC `br<device>`.
pub fn bridge_for_nic(device: &str) -> String {
    match device.strip_prefix("eth") {
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => format!("xenbr{n}"),
        _ => {
            let mut b = format!("br{device}");
            b.truncate(IFNAME_MAX);
            b
        }
    }
}

/// The first `xapiN` bridge name not in use: an internal network's bridge.
pub fn next_internal_bridge<'a>(in_use: impl IntoIterator<Item = &'a str>) -> String {
    let used: std::collections::HashSet<&str> = in_use.into_iter().collect();
    (0u32..)
        .map(|n| format!("xapi{n}"))
        .find(|b| !used.contains(b.as_str()))
        .unwrap_or_default()
}

/// Whether a client may name a bridge `name`: a legal interface name, not
/// one of the names Corral gives its own devices.
pub fn user_bridge_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !RESERVED_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The tap of VIF `device` of the VM `vm_uuid` on this host: `vif` + the
/// first 7 hex digits of the uuid + `.` + the device (at most 14 bytes).
pub fn tap_name(vm_uuid: &str, device: u32) -> String {
    let short: String = vm_uuid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(7)
        .collect();
    format!("vif{short}.{device}")
}

/// Whether Corral made a device of this name (bridges and taps it may
/// remove when nothing in the database explains them).
pub fn made_by_corral(name: &str) -> bool {
    let numbered = |p: &str| {
        name.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    numbered("xapi") || numbered("xenbr") || name.starts_with("vif")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_rules() {
        assert_eq!(bridge_for_nic("eth0"), "xenbr0");
        assert_eq!(bridge_for_nic("eth12"), "xenbr12");
        assert_eq!(bridge_for_nic("enp3s0"), "brenp3s0");
        assert_eq!(bridge_for_nic("veth-outside-x1"), "brveth-outside-");
        assert_eq!(next_internal_bridge([]), "xapi0");
        assert_eq!(next_internal_bridge(["xapi0", "xapi2"]), "xapi1");
        assert!(user_bridge_ok("lab-br"));
        for bad in [
            "",
            "xenbr7",
            "xapi1",
            "vif3.0",
            "tap0",
            "eth0",
            "a-very-long-bridge-name",
            "br 0",
            "br/0",
        ] {
            assert!(!user_bridge_ok(bad), "{bad}");
        }
        let t = tap_name("2a5a8c8c-7c3a-4c8e-9d4b-0f6b1d2e3f40", 15);
        assert_eq!(t, "vif2a5a8c8.15");
        assert!(t.len() <= IFNAME_MAX);
        assert!(made_by_corral("xapi3") && made_by_corral("xenbr0") && made_by_corral(&t));
        assert!(!made_by_corral("xapi") && !made_by_corral("eth0") && !made_by_corral("lab-br"));
    }
}
