//! Wakes event.from and event.next waiters when the database changes.

use tokio::sync::watch;

pub struct EventHub {
    tx: watch::Sender<u64>,
}

impl EventHub {
    pub fn new(g: u64) -> EventHub {
        EventHub {
            tx: watch::channel(g).0,
        }
    }
    pub fn sender(&self) -> watch::Sender<u64> {
        self.tx.clone()
    }
    /// Wakes waiters without a commit (logout).
    pub fn wake(&self) {
        self.tx.send_modify(|_| {});
    }
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}
