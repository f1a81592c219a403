//! VIF MAC addresses: XAPI's rule for generating one from the VM's
//! `other_config:mac_seed`, and the check of one a client gives.

use md5::{Digest, Md5};

/// The MAC XAPI gives VIF `device` of a VM whose `mac_seed` is `seed`:
/// MD5 applied 2·device + 1 times to the seed gives d1, MD5(d1) gives d2,
/// and the bytes are d1[0..4], d2[1], d2[2], made locally administered and
/// unicast. Deterministic, so a VM's NICs keep their MACs across re-creation.
pub fn from_seed(seed: &str, device: u32) -> String {
    let mut x: Vec<u8> = seed.as_bytes().to_vec();
    for _ in 0..(2 * device + 1) {
        x = Md5::digest(&x).to_vec();
    }
    let d2 = Md5::digest(&x);
    let first = (x[0] | 0x02) & !0x01;
    format_mac([first, x[1], x[2], x[3], d2[1], d2[2]])
}

/// A random locally administered unicast MAC (`xe vif-create mac=random`).
pub fn random() -> String {
    let mut b = [0u8; 6];
    // getrandom(2) fills a small buffer in one call or fails.
    // SAFETY: the buffer is valid for its whole length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Never expected; a time-derived MAC is still locally administered.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    b[0] = (b[0] | 0x02) & !0x01;
    format_mac(b)
}

pub fn format_mac(b: [u8; 6]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `mac` is six `:`-separated groups of two hex digits (XAPI's
/// `MAC_INVALID` rule).
pub fn is_valid(mac: &str) -> bool {
    let groups: Vec<&str> = mac.split(':').collect();
    groups.len() == 6
        && groups
            .iter()
            .all(|g| g.len() == 2 && g.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// The six bytes of a valid MAC.
pub fn parse(mac: &str) -> Option<[u8; 6]> {
    if !is_valid(mac) {
        return None;
    }
    let mut b = [0u8; 6];
    for (i, g) in mac.split(':').enumerate() {
        b[i] = u8::from_str_radix(g, 16).ok()?;
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// XAPI's own function, run on this seed, gives these (reference digest).
    #[test]
    fn seeded_macs_match_xapi() {
        let seed = "2a5a8c8c-7c3a-4c8e-9d4b-0f6b1d2e3f40";
        assert_eq!(from_seed(seed, 0), "96:d5:c7:dc:29:39");
        assert_eq!(from_seed(seed, 1), "0e:14:6a:ef:b6:a0");
        assert_eq!(from_seed(seed, 2), "7e:6f:6f:bd:48:f8");
    }

    #[test]
    fn mac_syntax() {
        assert!(is_valid("96:d5:c7:dc:29:39"));
        assert!(is_valid("96:D5:C7:DC:29:39"));
        for bad in [
            "",
            "96:d5:c7:dc:29",
            "96-d5-c7-dc-29-39",
            "96:d5:c7:dc:29:3g",
            "096:d5:c7:dc:29:39",
            "96:d5:c7:dc:29:39:00",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        let r = random();
        assert!(is_valid(&r));
        let first = u8::from_str_radix(&r[..2], 16).unwrap_or(1);
        assert_eq!(first & 0x03, 0x02, "locally administered unicast: {r}");
    }
}
