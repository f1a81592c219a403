//! What goes into the logs from outside: names a client chose are cut short
//! and escaped (a newline cannot forge a line), and what a client can make
//! happen at will is logged at most once per window.

use std::sync::atomic::{AtomicU64, Ordering};

/// At most this many characters of a client-chosen name are logged.
pub(crate) const MAX_NAME: usize = 64;

/// `name` as it may appear in a log line: control characters, quotes and
/// backslashes escaped, cut after [`MAX_NAME`] characters.
pub fn name(name: &str) -> String {
    let mut out = String::with_capacity(name.len().min(MAX_NAME) + 8);
    for (i, c) in name.chars().enumerate() {
        if i == MAX_NAME {
            out.push_str(&format!("…(+{} chars)", name.chars().count() - MAX_NAME));
            break;
        }
        if c.is_control() || c == '"' || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// True at most once per `secs` seconds for each `last` (which holds the
/// second it was last true).
pub fn once_per(last: &AtomicU64, secs: u64) -> bool {
    let now = now_secs();
    let prev = last.load(Ordering::Relaxed);
    now >= prev.saturating_add(secs)
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped_and_cut() {
        assert_eq!(name("root"), "root");
        assert_eq!(name("evil\n2026 INFO x"), "evil\\n2026 INFO x");
        assert_eq!(name("a\"b\\c\u{1b}[31m"), "a\\\"b\\\\c\\u{1b}[31m");
        let long = "x".repeat(300_000);
        let n = name(&long);
        assert!(n.len() < 100 && n.ends_with("(+299936 chars)"), "{n}");
    }

    #[test]
    fn once_per_window() {
        let last = AtomicU64::new(0);
        assert!(once_per(&last, 60));
        assert!(!once_per(&last, 60));
    }
}
