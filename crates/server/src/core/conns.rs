//! Open connections, counted in total and per source.

use crate::core::config::Limits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open connections, in total and per source address.
#[derive(Default)]
pub struct ConnGate {
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it frees its place.
pub struct ConnPermit {
    gate: Arc<ConnGate>,
    addr: Option<IpAddr>,
}

impl ConnGate {
    /// A place for a new connection from `addr` (`None`: the unix socket,
    /// counted only in the total), or `None` when over a limit.
    pub fn admit(self: &Arc<Self>, addr: Option<IpAddr>, limits: &Limits) -> Option<ConnPermit> {
        let mut c = self.counts.lock().ok()?;
        if c.0 >= limits.max_connections {
            return None;
        }
        if let Some(a) = addr {
            let n = c.1.entry(a).or_insert(0);
            if *n >= limits.max_per_source {
                return None;
            }
            *n += 1;
        }
        c.0 += 1;
        Some(ConnPermit {
            gate: Arc::clone(self),
            addr,
        })
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        if let Ok(mut c) = self.gate.counts.lock() {
            c.0 = c.0.saturating_sub(1);
            if let Some(a) = self.addr {
                if let Some(n) = c.1.get_mut(&a) {
                    *n -= 1;
                    if *n == 0 {
                        c.1.remove(&a);
                    }
                }
            }
        }
    }
}
