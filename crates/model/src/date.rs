//! XenAPI dates: `YYYYMMDDTHH:MM:SSZ` in UTC, with no dashes.

use std::time::{SystemTime, UNIX_EPOCH};

/// The "null" date.
pub const EPOCH: &str = "19700101T00:00:00Z";

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Formats unix seconds as a XenAPI date.
pub fn format(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn now() -> String {
    format(now_secs())
}

/// Parses `YYYYMMDDTHH:MM:SSZ` and RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`)
/// into unix seconds.
pub fn parse(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d, rest) = if b.len() >= 10 && b[4] == b'-' && b[7] == b'-' {
        (num(0..4)?, num(5..7)?, num(8..10)?, 10)
    } else {
        (num(0..4)?, num(4..6)?, num(6..8)?, 8)
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) {
        return None;
    }
    let mut secs = days_from_civil(y, mo, d) * 86_400;
    if rest == s.len() {
        return Some(secs);
    }
    if b.get(rest) != Some(&b'T') {
        return None;
    }
    let t = rest + 1;
    let (h, mi, se) = (num(t..t + 2)?, num(t + 3..t + 5)?, num(t + 6..t + 8)?);
    if b.get(t + 2) != Some(&b':') || b.get(t + 5) != Some(&b':') || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    secs += h * 3600 + mi * 60 + se;
    let mut i = t + 8;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    match b.get(i) {
        None | Some(b'Z') if i + 1 >= b.len() => Some(secs),
        Some(&sign @ (b'+' | b'-')) => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let off = oh * 3600 + om * 60;
            Some(if sign == b'+' { secs - off } else { secs + off })
        }
        _ => None,
    }
}

// Howard Hinnant's days/civil conversions (public domain algorithms).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forms() {
        assert_eq!(format(0), EPOCH);
        assert_eq!(format(1_742_357_784), "20250319T04:16:24Z");
        assert_eq!(parse("20250319T04:16:24Z"), Some(1_742_357_784));
        assert_eq!(parse("2025-03-19T04:16:24Z"), Some(1_742_357_784));
        assert_eq!(parse("2025-03-19T05:16:24+01:00"), Some(1_742_357_784));
        assert_eq!(parse("2025-03-19T04:16:24.123Z"), Some(1_742_357_784));
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse("20251319T04:16:24Z"), None);
        for s in [-86_400 * 365 * 3, 0, 951_782_400, 4_102_444_800] {
            assert_eq!(parse(&format(s)), Some(s));
        }
    }
}
