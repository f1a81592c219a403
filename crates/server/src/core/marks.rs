//! The one guard for `current_operations`, whatever the class: an operation
//! marks every object it works on in one transaction, keeps the marks for
//! the whole call, and drops them in one transaction when it ends (also
//! when its future is dropped half-way). Each class brings its rules: who
//! may join a running operation, and how `allowed_operations` follows.

use corral_db::{Db, State, Txn};
use corral_model::schema::FieldId;
use corral_model::{ApiError, Value};
use std::sync::Arc;

/// Recomputes an object's `allowed_operations` from its state and marks.
pub type Refresh = fn(&mut Txn<'_>, &str) -> Result<(), ApiError>;

/// One object an operation wants to mark.
pub struct Want<'a> {
    /// The object's `current_operations` field (which also names its class).
    pub current: FieldId,
    pub obj: &'a str,
    /// The operation, as `current_operations` shows it.
    pub op: &'a str,
    /// Whether the operation may start now (checked inside the transaction
    /// that marks, so two callers cannot both pass).
    pub check: Option<&'a dyn Fn(&State) -> Result<(), ApiError>>,
    pub refresh: Refresh,
}

struct Held {
    current: FieldId,
    obj: String,
    refresh: Refresh,
}

/// The marks of one running operation.
pub struct Mark {
    db: Arc<Db>,
    key: String,
    held: Vec<Held>,
}

impl Mark {
    /// Checks and marks every wanted object under `key` (the call's task,
    /// so `current_operations` points at what runs), or marks nothing.
    pub fn take(db: &Arc<Db>, key: String, wants: &[Want<'_>]) -> Result<Mark, ApiError> {
        db.write(|t| {
            for w in wants {
                if let Some(check) = w.check {
                    check(t.state())?;
                }
                let mut cur = entries(t.state(), w.current, w.obj);
                cur.push((key.clone(), Value::str(w.op)));
                t.set(w.current, w.obj, Value::Struct(cur))?;
            }
            for w in wants {
                (w.refresh)(t, w.obj)?;
            }
            Ok(())
        })
        .map_err(ApiError::from)?;
        Ok(Mark {
            db: Arc::clone(db),
            key,
            held: wants
                .iter()
                .map(|w| Held {
                    current: w.current,
                    obj: w.obj.to_owned(),
                    refresh: w.refresh,
                })
                .collect(),
        })
    }

    /// The key the marks are held under.
    pub fn key(&self) -> &str {
        &self.key
    }
}

fn entries(st: &State, current: FieldId, obj: &str) -> Vec<(String, Value)> {
    st.get(current, obj)
        .and_then(|v| v.as_struct().map(<[_]>::to_vec))
        .unwrap_or_default()
}

impl Drop for Mark {
    fn drop(&mut self) {
        let r = self.db.write(|t| {
            for h in &self.held {
                // The operation may have destroyed its object.
                if !t.state().exists(h.current.class, &h.obj) {
                    continue;
                }
                let left: Vec<_> = entries(t.state(), h.current, &h.obj)
                    .into_iter()
                    .filter(|(k, _)| *k != self.key)
                    .collect();
                t.set(h.current, &h.obj, Value::Struct(left))?;
                (h.refresh)(t, &h.obj)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(error = %ApiError::from(e).code, "could not clear an operation's marks");
        }
    }
}

/// Whether a mark found at start-up belongs to an operation that died with
/// this host's previous process. A mark made under a task is the task's
/// host's; one made without a task (internal work) is the pool master's,
/// which runs the pool's operations. Another host's marks are left alone.
pub fn died_with_restart(st: &State, key: &str, this_host: &str, is_master: bool) -> bool {
    let task_class = corral_model::schema::class::TASK;
    if st.exists(task_class, key) {
        st.get_str(corral_model::schema::field::task::RESIDENT_ON, key)
            .is_some_and(|h| h == this_host)
    } else {
        is_master
    }
}

/// Clears the marks on `obj` that [`died_with_restart`]; returns the
/// operations they were.
pub fn clear_dead(
    t: &mut Txn<'_>,
    current: FieldId,
    obj: &str,
    this_host: &str,
    is_master: bool,
) -> Result<Vec<String>, ApiError> {
    let (dead, alive): (Vec<_>, Vec<_>) = entries(t.state(), current, obj)
        .into_iter()
        .partition(|(k, _)| died_with_restart(t.state(), k, this_host, is_master));
    if !dead.is_empty() {
        t.set(current, obj, Value::Struct(alive))?;
    }
    Ok(dead.into_iter().map(|(_, op)| op.db_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_model::schema::{class, field};

    #[test]
    fn a_restart_clears_only_the_marks_of_its_own_host() {
        let db = Db::in_memory();
        let (here, other) = ("OpaqueRef:here", "OpaqueRef:other");
        db.write(|t| {
            for (task, host) in [("OpaqueRef:t-here", here), ("OpaqueRef:t-other", other)] {
                t.create(class::TASK, task, vec![])?;
                t.set(field::task::RESIDENT_ON, task, Value::str(host))?;
            }
            Ok::<(), ApiError>(())
        })
        .unwrap();
        let st = db.read();
        // (key, this host is the master, cleared)
        let cases = [
            ("OpaqueRef:t-here", false, true),
            ("OpaqueRef:t-here", true, true),
            ("OpaqueRef:t-other", false, false),
            ("OpaqueRef:t-other", true, false),
            ("OpaqueRef:no-task", true, true),
            ("OpaqueRef:no-task", false, false),
        ];
        for (key, master, want) in cases {
            assert_eq!(
                died_with_restart(&st, key, here, master),
                want,
                "{key} master={master}"
            );
        }
    }
}
