//! Durable storage of the pool database in SQLite.
//!
//! Why SQLite (see docs/architecture.md): WAL with `synchronous=FULL` gives
//! an fsync'd append per commit, atomic multi-row transactions, crash
//! recovery that is decades old, and a file an operator can inspect with
//! `sqlite3`. The `objects` table holds the current row of every persistent
//! object; `changes` holds the recent change records (the replication log).

use crate::{ChangeRecord, Op, SCHEMA_VERSION, State};
use corral_model::Value;
use corral_model::jsonrpc::{from_json, write_value};
use corral_model::schema::ClassId;
use corral_model::value::coerce;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;

/// How many change records are kept on disk.
const KEEP_CHANGES: u64 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database schema version {found} is newer than this corrald supports ({supported})")]
    TooNew { found: u32, supported: u32 },
    #[error("corrupt row {reference} in table {class}")]
    Corrupt { class: String, reference: String },
}

pub(crate) struct Store {
    conn: Connection,
    /// Unit tests: every batch write fails, as a full disk would.
    #[cfg(test)]
    pub(crate) fail_writes: bool,
}

type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// Numbered migrations: entry `n` takes the schema from version `n` to `n+1`.
/// New fields need no migration: rows are stored by field name and missing
/// fields take their datamodel defaults when loaded.
const MIGRATIONS: &[Migration] = &[|c| {
    c.execute_batch(
        "CREATE TABLE objects (ref TEXT PRIMARY KEY, class TEXT NOT NULL, data TEXT NOT NULL);
         CREATE TABLE changes (generation INTEGER PRIMARY KEY, record TEXT NOT NULL);",
    )
}];

fn row_json(class: ClassId, fields: &[Value]) -> String {
    let def = class.def();
    let mut out = String::from("{");
    let mut first = true;
    for (f, v) in def.fields.iter().zip(fields) {
        if f.rel.is_some() {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        corral_model::jsonrpc::write_str(f.name, &mut out);
        out.push(':');
        write_value(v, &mut out);
    }
    out.push('}');
    out
}

fn row_from_json(class: ClassId, text: &str) -> Option<Vec<Value>> {
    let j: serde_json::Value = serde_json::from_str(text).ok()?;
    let serde_json::Value::Object(mut o) = j else {
        return None;
    };
    let def = class.def();
    Some(
        def.fields
            .iter()
            .map(|f| {
                let dflt = || corral_model::value::default_value(&f.ty, f.default);
                match o.remove(f.name) {
                    Some(v) => coerce(from_json(v), &f.ty, f.name).unwrap_or_else(|_| dflt()),
                    None => dflt(),
                }
            })
            .collect(),
    )
}

fn record_json(rec_gen: u64, ops: &[&Op]) -> String {
    let mut out = format!("{{\"generation\":{rec_gen},\"ops\":[");
    for (n, op) in ops.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        match op {
            Op::Create {
                class,
                reference,
                fields,
            } => {
                out.push_str(&format!(
                    "{{\"op\":\"create\",\"class\":\"{}\",\"ref\":",
                    class.name()
                ));
                corral_model::jsonrpc::write_str(reference, &mut out);
                out.push_str(",\"row\":");
                out.push_str(&row_json(*class, fields));
                out.push('}');
            }
            Op::Set {
                class,
                reference,
                field,
                value,
            } => {
                out.push_str(&format!(
                    "{{\"op\":\"set\",\"class\":\"{}\",\"field\":\"{}\",\"ref\":",
                    class.name(),
                    class.def().fields[*field].name
                ));
                corral_model::jsonrpc::write_str(reference, &mut out);
                out.push_str(",\"value\":");
                write_value(value, &mut out);
                out.push('}');
            }
            Op::Delete { class, reference } => {
                out.push_str(&format!(
                    "{{\"op\":\"delete\",\"class\":\"{}\",\"ref\":",
                    class.name()
                ));
                corral_model::jsonrpc::write_str(reference, &mut out);
                out.push('}');
            }
        }
    }
    out.push_str("]}");
    out
}

/// Decodes a stored change record (for replication and inspection).
pub fn decode_record(text: &str) -> Option<ChangeRecord> {
    let j: serde_json::Value = serde_json::from_str(text).ok()?;
    let generation = j.get("generation")?.as_u64()?;
    let mut ops = Vec::new();
    for op in j.get("ops")?.as_array()? {
        let class = ClassId::by_name(op.get("class")?.as_str()?)?;
        let reference = op.get("ref")?.as_str()?.to_owned();
        match op.get("op")?.as_str()? {
            "create" => {
                let fields = row_from_json(class, &op.get("row")?.to_string())?;
                ops.push(Op::Create {
                    class,
                    reference,
                    fields,
                })
            }
            "set" => {
                let f = class.field(op.get("field")?.as_str()?)?;
                let value =
                    coerce(from_json(op.get("value")?.clone()), &f.def().ty, "value").ok()?;
                ops.push(Op::Set {
                    class,
                    reference,
                    field: f.index,
                    value,
                })
            }
            "delete" => ops.push(Op::Delete { class, reference }),
            _ => return None,
        }
    }
    Some(ChangeRecord { generation, ops })
}

impl Store {
    pub(crate) fn open(
        path: &Path,
    ) -> Result<(Store, Vec<(ClassId, String, Vec<Value>)>, u64), StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let version: u32 = conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        for (n, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            m(&tx)?;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
                params![(n + 1).to_string()],
            )?;
            tx.commit()?;
        }
        let generation: u64 = conn
            .query_row("SELECT value FROM meta WHERE key='generation'", [], |r| {
                r.get::<_, String>(0)
            })
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut rows = Vec::new();
        {
            let mut stmt = conn.prepare("SELECT ref, class, data FROM objects ORDER BY rowid")?;
            let mut q = stmt.query([])?;
            while let Some(r) = q.next()? {
                let reference: String = r.get(0)?;
                let class_name: String = r.get(1)?;
                let data: String = r.get(2)?;
                let Some(class) = ClassId::by_name(&class_name) else {
                    tracing::warn!(class = %class_name, "skipping row of unknown class");
                    continue;
                };
                let fields = row_from_json(class, &data).ok_or_else(|| StoreError::Corrupt {
                    class: class_name.clone(),
                    reference: reference.clone(),
                })?;
                rows.push((class, reference, fields));
            }
        }
        Ok((
            Store {
                conn,
                #[cfg(test)]
                fail_writes: false,
            },
            rows,
            generation,
        ))
    }

    /// Writes a batch of commits in one SQLite transaction: one fsync for
    /// all of them (group commit).
    pub(crate) fn write_batch(&mut self, b: &Batch) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_writes {
            return Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery));
        }
        let tx = self.conn.transaction()?;
        {
            let mut upsert =
                tx.prepare_cached("INSERT INTO objects (ref, class, data) VALUES (?1, ?2, ?3) ON CONFLICT(ref) DO UPDATE SET data=excluded.data")?;
            let mut delete = tx.prepare_cached("DELETE FROM objects WHERE ref = ?1")?;
            for (reference, row) in &b.rows {
                match row {
                    Some((class, data)) => {
                        upsert.execute(params![reference, class, data])?;
                    }
                    None => {
                        delete.execute(params![reference])?;
                    }
                }
            }
            let mut change = tx.prepare_cached(
                "INSERT OR REPLACE INTO changes (generation, record) VALUES (?1, ?2)",
            )?;
            for (generation, record) in &b.changes {
                change.execute(params![*generation as i64, record])?;
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', ?1)",
                params![b.last.to_string()],
            )?;
            // Old change records go now and then (every 1,000 generations).
            if b.changes.iter().any(|(g, _)| g % 1000 == 0) && b.last > KEEP_CHANGES {
                tx.execute(
                    "DELETE FROM changes WHERE generation < ?1",
                    params![(b.last - KEEP_CHANGES) as i64],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// What a batch of commits writes, taken from the state while no writer
/// runs (so the rows are exactly those commits' results): each touched
/// row as it now is (`None`: deleted), and each commit's record.
pub(crate) struct Batch {
    rows: Vec<(String, Option<(&'static str, String)>)>,
    changes: Vec<(u64, String)>,
    last: u64,
}

impl Batch {
    /// `None` when no commit of the batch touches a persistent class.
    pub(crate) fn of(records: &[&ChangeRecord], state: &State) -> Option<Batch> {
        let mut rows = Vec::new();
        let mut changes = Vec::new();
        let mut done = std::collections::HashSet::new();
        for rec in records {
            let durable: Vec<&Op> = rec
                .ops
                .iter()
                .filter(|op| op.target().0.def().persist)
                .collect();
            if durable.is_empty() {
                continue;
            }
            for op in &durable {
                let (class, reference) = op.target();
                if !done.insert(reference.to_owned()) {
                    continue;
                }
                let row = state
                    .row(class, reference)
                    .map(|r| (class.name(), row_json(class, &r.fields)));
                rows.push((reference.to_owned(), row));
            }
            changes.push((rec.generation, record_json(rec.generation, &durable)));
        }
        let last = changes.last()?.0;
        Some(Batch {
            rows,
            changes,
            last,
        })
    }
}
