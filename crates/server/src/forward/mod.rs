//! The routing seam: every call that acts on a host passes here. It marks
//! the objects the call works on (held until the call ends), decides which
//! host's drivers it acts through, and hands the operation that host.
//!
//! The pool master runs operations and all database writes; a member's
//! drivers are reached through the pool link ([`crate::context::hosts`]),
//! so with one host every route is local and nothing else changes.

pub mod vm;

/// Where a call acts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through this host's own drivers.
    Here,
    /// Through another host's drivers, over the pool link.
    Host(String),
}

/// The route to the host an object lives on: `on` is its host (a running
/// VM's `resident_on`, a PBD's `host`), none for an object that lives on
/// no host yet (a halted VM: placement chooses).
pub fn route(this_host: &str, on: Option<&str>) -> Route {
    match on {
        Some(h) if h != this_host => Route::Host(h.to_owned()),
        _ => Route::Here,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_route_to_the_host_they_live_on() {
        let cases: &[(Option<&str>, Route)] = &[
            (None, Route::Here),
            (Some("OpaqueRef:a"), Route::Here),
            (Some("OpaqueRef:b"), Route::Host("OpaqueRef:b".into())),
        ];
        for (on, want) in cases {
            assert_eq!(route("OpaqueRef:a", *on), *want, "on {on:?}");
        }
    }
}
