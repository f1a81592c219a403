//! Group commit: commits applied in memory wait here for the disk; the
//! first waiter to take the store writes every commit queued by then in one
//! SQLite transaction (one fsync), then publishes them in generation order.

use crate::{
    ChangeRecord, Db, DbError, EVENT_LOG_LEN, EventOp, LogEntry, Op, State, Undo, store, undo_all,
};
use corral_model::schema::ClassId;
use std::sync::Mutex;

/// Commits between the write lock and the disk.
#[derive(Default)]
pub(crate) struct Queue {
    /// In generation order.
    pub(crate) pending: Vec<Pending>,
    /// The last generation durable and published.
    pub(crate) durable: u64,
    /// Generations (from, to) whose batch failed on disk and was undone,
    /// with why; never handed out again.
    pub(crate) failed: Vec<(u64, u64, String)>,
}

pub(crate) struct Pending {
    pub(crate) record: ChangeRecord,
    pub(crate) parents: Vec<(ClassId, String)>,
    pub(crate) undo: Vec<Undo>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stamps generations on touched rows and appends the events, including
/// `mod` events for parents whose derived sets changed.
pub(crate) fn publish(state: &mut State, rec: &ChangeRecord, parents: Vec<(ClassId, String)>) {
    let g = rec.generation;
    let mut events: Vec<(ClassId, String, EventOp)> =
        Vec::with_capacity(rec.ops.len() + parents.len());
    for op in &rec.ops {
        let (class, reference) = op.target();
        let kind = match op {
            Op::Create { .. } => EventOp::Add,
            Op::Set { .. } => EventOp::Mod,
            Op::Delete { .. } => EventOp::Del,
        };
        events.push((class, reference.to_owned(), kind));
    }
    for (pc, p) in parents {
        if state.exists(pc, &p) {
            events.push((pc, p, EventOp::Mod));
        }
    }
    for (class, reference, op) in events {
        if let Some(r) = state.tables[class.0].rows.get_mut(&reference) {
            r.modified = g;
            if op == EventOp::Add {
                r.created = g;
            }
        }
        if class.def().events {
            state.log.push_back(LogEntry {
                generation: g,
                class,
                reference,
                op,
            });
        }
    }
    while state.log.len() > EVENT_LOG_LEN {
        if let Some(e) = state.log.pop_front() {
            state.log_floor = e.generation;
        }
    }
}

impl Db {
    /// Whether commit `g` is durable (or was lost with its batch).
    fn settled(&self, g: u64) -> Option<Result<(), DbError>> {
        let q = lock(&self.queue);
        if let Some((_, _, why)) = q.failed.iter().find(|(a, b, _)| (*a..=*b).contains(&g)) {
            return Some(Err(DbError::Lost(why.clone())));
        }
        (q.durable >= g).then_some(Ok(()))
    }

    /// Group commit: the first waiter to get the store writes every commit
    /// queued by then in one transaction and one fsync; the others find
    /// theirs durable when they get it in turn.
    pub(crate) fn wait_durable(&self, g: u64) -> Result<(), DbError> {
        loop {
            if let Some(r) = self.settled(g) {
                return r;
            }
            let mut store = lock(&self.store);
            if let Some(r) = self.settled(g) {
                return r;
            }
            let Some(s) = store.as_mut() else {
                return Err(DbError::Lost("no store".into()));
            };
            self.commit_batch(s);
        }
    }

    /// Writes the queued commits, then publishes them, or undoes them and
    /// every commit made on top of them.
    fn commit_batch(&self, store: &mut store::Store) {
        // The rows as the queued commits left them: taken under the read
        // lock, so no writer adds to them meanwhile.
        let (batch, rows) = {
            let st = self.read();
            let batch = std::mem::take(&mut lock(&self.queue).pending);
            let records: Vec<&ChangeRecord> = batch.iter().map(|p| &p.record).collect();
            let rows = store::Batch::of(&records, &st);
            (batch, rows)
        };
        let Some(last) = batch.last().map(|p| p.record.generation) else {
            return;
        };
        // The disk, with no lock on the state: writers go on meanwhile.
        let written = match &rows {
            Some(b) => store.write_batch(b).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        match written {
            Ok(()) => {
                for p in batch {
                    st.generation = p.record.generation;
                    publish(&mut st, &p.record, p.parents);
                }
                lock(&self.queue).durable = last;
                drop(st);
                self.call_hook(last);
            }
            Err(why) => {
                tracing::error!(error = %why, "database batch not written: undone");
                let mut q = lock(&self.queue);
                let later = std::mem::take(&mut q.pending);
                let upto = later.last().map(|p| p.record.generation).unwrap_or(last);
                let from = batch.first().map(|p| p.record.generation).unwrap_or(last);
                for p in later.into_iter().rev().chain(batch.into_iter().rev()) {
                    undo_all(&mut st, p.undo);
                }
                q.failed.push((from, upto, why));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::commit::lock;
    use crate::*;
    use corral_model::schema::{class, field};

    fn make(db: &Db, name: &str) -> Result<String, DbError> {
        let r = corral_model::new_ref();
        db.write(|t| {
            t.create(
                class::VM,
                &r,
                vec![(field::vm::NAME_LABEL.index, Value::str(name))],
            )
        })?;
        Ok(r)
    }

    /// A batch the disk refuses is undone in memory, its writer told, and
    /// its generation never handed out again; later commits go on.
    #[test]
    fn a_failed_batch_is_undone_and_reported() {
        let dir = std::env::temp_dir().join(format!("corral-db-unit-{}", corral_model::new_uuid()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("pool.db");
        {
            let db = Db::open(&path).expect("open");
            let a = make(&db, "kept").expect("first commit");
            let g = db.read().generation();
            let set_fail = |on: bool| {
                if let Some(s) = lock(&db.store).as_mut() {
                    s.fail_writes = on;
                }
            };
            set_fail(true);
            let lost = corral_model::new_ref();
            let r = db.write(|t| {
                t.set(field::vm::NAME_LABEL, &a, Value::str("changed"))?;
                t.create(class::VM, &lost, vec![])
            });
            assert!(matches!(r, Err(DbError::Lost(_))), "{r:?}");
            {
                let st = db.read();
                assert!(!st.exists(class::VM, &lost), "undone in memory");
                assert_eq!(
                    st.get_str(field::vm::NAME_LABEL, &a).as_deref(),
                    Some("kept")
                );
                assert_eq!(st.generation(), g);
            }
            set_fail(false);
            let c = make(&db, "after").expect("a later commit");
            assert!(
                db.read().generation() > g + 1,
                "the lost generation is skipped"
            );
            drop(db);
            let db = Db::open(&path).expect("reopen");
            let st = db.read();
            assert!(st.exists(class::VM, &a) && st.exists(class::VM, &c));
            assert!(!st.exists(class::VM, &lost));
            assert_eq!(
                st.get_str(field::vm::NAME_LABEL, &a).as_deref(),
                Some("kept")
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
