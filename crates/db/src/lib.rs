//! Corral's pool database.
//!
//! Every class of the datamodel is a table held in memory, keyed by ref. All
//! writes go through [`Db::write`]: the closure runs under the write lock
//! against the live tables while an undo log is kept; when it returns `Ok`
//! the transaction becomes one [`ChangeRecord`], written to SQLite (WAL,
//! `synchronous=FULL`) before the call returns, then published to event
//! waiters. When the closure or the disk write fails, the undo log puts the
//! tables back, so a transaction commits whole or not at all.
//!
//! The change record is the unit a later pool will replicate (Raft): it holds
//! field-level operations that [`State::apply`] replays deterministically.
//!
//! Sets that XenAPI binds to a child's pointer (`VM.VBDs` ↔ `VBD.VM`) are not
//! stored: they are derived from an index over the child field, so the two
//! sides can never disagree.

mod commit;
use commit::{Pending, Queue, lock, publish};
mod store;

use corral_model::schema::{CLASSES, ClassId, FieldId, Qual, Ty};
use corral_model::value::{coerce, default_value};
use corral_model::{ApiError, Value};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

pub use store::{StoreError, decode_record};

/// Bumped when the on-disk schema changes; see `store::MIGRATIONS`.
pub const SCHEMA_VERSION: u32 = 1;

/// How many change events are kept in memory for `event.from`.
const EVENT_LOG_LEN: usize = 200_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOp {
    Add,
    Mod,
    Del,
}

impl EventOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOp::Add => "add",
            EventOp::Mod => "mod",
            EventOp::Del => "del",
        }
    }
}

/// One entry of the in-memory event log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub generation: u64,
    pub class: ClassId,
    pub reference: String,
    pub op: EventOp,
}

/// One field-level operation of a committed transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Create {
        class: ClassId,
        reference: String,
        fields: Vec<Value>,
    },
    Set {
        class: ClassId,
        reference: String,
        field: usize,
        value: Value,
    },
    Delete {
        class: ClassId,
        reference: String,
    },
}

impl Op {
    /// The object this operation touches.
    pub fn target(&self) -> (ClassId, &str) {
        match self {
            Op::Create {
                class, reference, ..
            }
            | Op::Set {
                class, reference, ..
            }
            | Op::Delete { class, reference } => (*class, reference),
        }
    }
}

/// A committed transaction: what the pool replicates, in commit order.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub generation: u64,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub fields: Vec<Value>,
    pub created: u64,
    pub modified: u64,
}

#[derive(Default)]
struct Table {
    rows: HashMap<String, Row>,
    by_uuid: HashMap<String, String>,
    /// Insertion order, so `get_all` is stable.
    order: Vec<String>,
}

/// Parent ref → child refs, for one `rel` set field.
type RelIndex = HashMap<String, Vec<String>>;

pub struct State {
    tables: Vec<Table>,
    /// Keyed by (child class, child pointer field index).
    rels: HashMap<(ClassId, usize), RelIndex>,
    /// For each (child class, child field): the parent (class, set field).
    rel_targets: HashMap<(ClassId, usize), (ClassId, usize)>,
    /// The last generation published (durable, with its events).
    generation: u64,
    /// The last generation given to a transaction; ahead of `generation`
    /// while commits wait for their batch's fsync.
    reserved: u64,
    log: VecDeque<LogEntry>,
    /// Events older than this generation are gone.
    log_floor: u64,
}

/// Why a write failed: an API error from the closure, or the disk.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("database store")]
    Store(#[from] StoreError),
    /// The batch this commit was written in failed on disk; it was undone.
    #[error("database write failed: {0}")]
    Lost(String),
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        match e {
            DbError::Api(a) => a,
            DbError::Store(s) => ApiError::internal(format!("database write failed: {s}")),
            DbError::Lost(m) => ApiError::internal(format!("database write failed: {m}")),
        }
    }
}

type CommitHook = Box<dyn Fn(u64) + Send + Sync>;

pub struct Db {
    state: RwLock<State>,
    /// Held by the one thread writing a batch to disk (group commit).
    store: Mutex<Option<store::Store>>,
    /// Whether commits go to disk (false: in memory, published at once).
    persistent: bool,
    /// Commits applied in memory and waiting for their batch's fsync.
    queue: Mutex<Queue>,
    hook: RwLock<Option<CommitHook>>,
    /// Runs the wait for durability (the server lets its async runtime
    /// move other work off the waiting thread meanwhile).
    wait_hook: RwLock<Option<WaitHook>>,
}

type WaitHook = Box<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

fn field_default(f: &corral_model::FieldDef) -> Value {
    default_value(&f.ty, f.default)
}

impl State {
    fn new() -> State {
        let mut rels = HashMap::new();
        let mut rel_targets = HashMap::new();
        for pc in ClassId::all() {
            for (i, f) in pc.def().fields.iter().enumerate() {
                if let Some((cc, cf)) = f.rel {
                    let child = ClassId::by_name(cc).expect("spec checked by build.rs");
                    let cfi = child.field(cf).expect("spec checked by build.rs").index;
                    rels.insert((child, cfi), RelIndex::new());
                    rel_targets.insert((child, cfi), (pc, i));
                }
            }
        }
        State {
            tables: CLASSES.iter().map(|_| Table::default()).collect(),
            rels,
            rel_targets,
            generation: 0,
            reserved: 0,
            log: VecDeque::new(),
            log_floor: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn log_floor(&self) -> u64 {
        self.log_floor
    }

    /// Log entries with generation greater than `since`.
    pub fn events_since(&self, since: u64) -> impl Iterator<Item = &LogEntry> {
        let start = self.log.partition_point(|e| e.generation <= since);
        self.log.range(start..)
    }

    pub fn row(&self, class: ClassId, reference: &str) -> Option<&Row> {
        self.tables[class.0].rows.get(reference)
    }

    pub fn exists(&self, class: ClassId, reference: &str) -> bool {
        self.tables[class.0].rows.contains_key(reference)
    }

    pub fn count(&self, class: ClassId) -> usize {
        self.tables[class.0].rows.len()
    }

    pub fn refs(&self, class: ClassId) -> impl Iterator<Item = &String> {
        self.tables[class.0].order.iter()
    }

    pub fn by_uuid(&self, class: ClassId, uuid: &str) -> Option<&String> {
        self.tables[class.0].by_uuid.get(uuid)
    }

    /// The value of a field, deriving relation sets from their index.
    pub fn get(&self, f: FieldId, reference: &str) -> Option<Value> {
        let row = self.row(f.class, reference)?;
        Some(self.field_of(f, reference, row))
    }

    fn field_of(&self, f: FieldId, reference: &str, row: &Row) -> Value {
        let def = f.def();
        if let Some((cc, cf)) = def.rel {
            let child = ClassId::by_name(cc).expect("checked");
            let cfi = child.field(cf).expect("checked").index;
            let kids = self
                .rels
                .get(&(child, cfi))
                .and_then(|ix| ix.get(reference));
            return Value::Array(
                kids.map(|k| k.iter().map(|r| Value::String(r.clone())).collect())
                    .unwrap_or_default(),
            );
        }
        row.fields[f.index].clone()
    }

    /// Convenience for hand-written code: a string field.
    pub fn get_str(&self, f: FieldId, reference: &str) -> Option<String> {
        match self.get(f, reference)? {
            Value::String(s) | Value::DateTime(s) => Some(s),
            other => Some(other.db_string()),
        }
    }

    /// The full record as XenAPI returns it: every non-internal field, in
    /// declaration order.
    pub fn record(&self, class: ClassId, reference: &str) -> Option<Value> {
        let row = self.row(class, reference)?;
        let def = class.def();
        let mut members = Vec::with_capacity(def.fields.len());
        for (i, fd) in def.fields.iter().enumerate() {
            if fd.internal {
                continue;
            }
            members.push((
                fd.name.to_owned(),
                self.field_of(FieldId { class, index: i }, reference, row),
            ));
        }
        Some(Value::Struct(members))
    }

    /// Calls `f` with each field of a record as [`State::record`] would
    /// return it, borrowing stored values instead of cloning them (large
    /// replies are encoded straight from the tables). False if no such row.
    pub fn visit_record(
        &self,
        class: ClassId,
        reference: &str,
        mut f: impl FnMut(&str, &Value),
    ) -> bool {
        let Some(row) = self.row(class, reference) else {
            return false;
        };
        for (i, fd) in class.def().fields.iter().enumerate() {
            if fd.internal {
                continue;
            }
            if fd.rel.is_some() {
                f(
                    fd.name,
                    &self.field_of(FieldId { class, index: i }, reference, row),
                );
            } else {
                f(fd.name, &row.fields[i]);
            }
        }
        true
    }

    fn index_child(
        &mut self,
        class: ClassId,
        reference: &str,
        field: usize,
        old: Option<&str>,
        new: Option<&str>,
    ) {
        if let Some(ix) = self.rels.get_mut(&(class, field)) {
            if let Some(o) = old {
                if let Some(v) = ix.get_mut(o) {
                    v.retain(|r| r != reference);
                    if v.is_empty() {
                        ix.remove(o);
                    }
                }
            }
            if let Some(n) = new {
                if n != corral_model::NULL_REF {
                    ix.entry(n.to_owned())
                        .or_default()
                        .push(reference.to_owned());
                }
            }
        }
    }

    fn rel_fields(&self, class: ClassId) -> Vec<usize> {
        self.rels
            .keys()
            .filter(|(c, _)| *c == class)
            .map(|(_, f)| *f)
            .collect()
    }

    fn insert_row(&mut self, class: ClassId, reference: &str, fields: Vec<Value>, generation: u64) {
        let uuid_ix = class.def().fields.iter().position(|f| f.name == "uuid");
        for f in self.rel_fields(class) {
            let target = fields[f].as_str().map(str::to_owned);
            self.index_child(class, reference, f, None, target.as_deref());
        }
        let t = &mut self.tables[class.0];
        if let Some(u) = uuid_ix.and_then(|i| fields[i].as_str()) {
            t.by_uuid.insert(u.to_owned(), reference.to_owned());
        }
        t.order.push(reference.to_owned());
        t.rows.insert(
            reference.to_owned(),
            Row {
                fields,
                created: generation,
                modified: generation,
            },
        );
    }

    fn remove_row(&mut self, class: ClassId, reference: &str) -> Option<Row> {
        let row = self.tables[class.0].rows.remove(reference)?;
        for f in self.rel_fields(class) {
            let old = row.fields[f].as_str().map(str::to_owned);
            self.index_child(class, reference, f, old.as_deref(), None);
        }
        let t = &mut self.tables[class.0];
        if let Some(i) = class.def().fields.iter().position(|f| f.name == "uuid") {
            if let Some(u) = row.fields[i].as_str() {
                t.by_uuid.remove(u);
            }
        }
        if let Some(p) = t.order.iter().position(|r| r == reference) {
            t.order.remove(p);
        }
        Some(row)
    }

    fn set_field(
        &mut self,
        class: ClassId,
        reference: &str,
        field: usize,
        value: Value,
    ) -> Option<Value> {
        let old = {
            let row = self.tables[class.0].rows.get_mut(reference)?;
            std::mem::replace(&mut row.fields[field], value.clone())
        };
        if self.rels.contains_key(&(class, field)) {
            let (o, n) = (
                old.as_str().map(str::to_owned),
                value.as_str().map(str::to_owned),
            );
            self.index_child(class, reference, field, o.as_deref(), n.as_deref());
        }
        if class.def().fields[field].name == "uuid" {
            let t = &mut self.tables[class.0];
            if let Some(o) = old.as_str() {
                t.by_uuid.remove(o);
            }
            if let Some(n) = value.as_str() {
                t.by_uuid.insert(n.to_owned(), reference.to_owned());
            }
        }
        Some(old)
    }

    /// Replays a committed record (startup from a log, or a replica).
    pub fn apply(&mut self, rec: &ChangeRecord) {
        for op in &rec.ops {
            match op {
                Op::Create {
                    class,
                    reference,
                    fields,
                } => {
                    self.remove_row(*class, reference);
                    self.insert_row(*class, reference, fields.clone(), rec.generation)
                }
                Op::Set {
                    class,
                    reference,
                    field,
                    value,
                } => {
                    self.set_field(*class, reference, *field, value.clone());
                    if let Some(r) = self.tables[class.0].rows.get_mut(reference) {
                        r.modified = rec.generation;
                    }
                }
                Op::Delete { class, reference } => {
                    self.remove_row(*class, reference);
                }
            }
        }
        self.generation = self.generation.max(rec.generation);
        self.reserved = self.reserved.max(self.generation);
    }
}

enum Undo {
    Created(ClassId, String),
    Set(ClassId, String, usize, Value),
    Deleted(ClassId, String, Row),
}

/// A transaction in progress: reads see its own writes.
pub struct Txn<'a> {
    state: &'a mut State,
    ops: Vec<Op>,
    undo: Vec<Undo>,
    /// Parents whose derived sets this transaction changed.
    parents: Vec<(ClassId, String)>,
}

impl Txn<'_> {
    pub fn state(&self) -> &State {
        self.state
    }

    /// Creates a row; missing fields take their spec defaults. `fields` are
    /// given by name and are assumed already type-checked.
    pub fn create(
        &mut self,
        class: ClassId,
        reference: &str,
        given: Vec<(usize, Value)>,
    ) -> Result<(), ApiError> {
        if self.state.exists(class, reference) {
            return Err(ApiError::new(
                "DB_UNIQUENESS_CONSTRAINT_VIOLATION",
                [class.name(), "ref", reference],
            ));
        }
        let def = class.def();
        let mut fields: Vec<Value> = def.fields.iter().map(field_default).collect();
        for (i, v) in given {
            fields[i] = v;
        }
        if let Some(ui) = def.fields.iter().position(|f| f.name == "uuid") {
            match fields[ui].as_str() {
                Some("") | None => fields[ui] = Value::String(corral_model::new_uuid()),
                Some(u) => {
                    if self.state.by_uuid(class, u).is_some() {
                        return Err(ApiError::new(
                            "DB_UNIQUENESS_CONSTRAINT_VIOLATION",
                            [class.name(), "uuid", u],
                        ));
                    }
                }
            }
        }
        // Derived sets are never stored.
        for (i, f) in def.fields.iter().enumerate() {
            if f.rel.is_some() {
                fields[i] = Value::Array(Vec::new());
            }
        }
        self.note_parents(class, &fields);
        self.state.insert_row(class, reference, fields.clone(), 0);
        self.undo.push(Undo::Created(class, reference.to_owned()));
        self.ops.push(Op::Create {
            class,
            reference: reference.to_owned(),
            fields,
        });
        Ok(())
    }

    /// Writes one field (no type check: callers coerce first).
    pub fn set(&mut self, f: FieldId, reference: &str, value: Value) -> Result<(), ApiError> {
        if f.def().rel.is_some() {
            return Err(ApiError::internal(format!(
                "{}.{} is derived",
                f.class.name(),
                f.def().name
            )));
        }
        match self
            .state
            .set_field(f.class, reference, f.index, value.clone())
        {
            Some(old) => {
                if let Some(&(pc, _)) = self.state.rel_targets.get(&(f.class, f.index)) {
                    for p in [old.as_str(), value.as_str()].into_iter().flatten() {
                        self.parents.push((pc, p.to_owned()));
                    }
                }
                self.undo
                    .push(Undo::Set(f.class, reference.to_owned(), f.index, old));
                self.ops.push(Op::Set {
                    class: f.class,
                    reference: reference.to_owned(),
                    field: f.index,
                    value,
                });
                Ok(())
            }
            None => Err(ApiError::handle_invalid(f.class.name(), reference)),
        }
    }

    /// Writes one field only if its value differs; says whether it did.
    /// For periodic refreshes, which should not commit (or wake event
    /// clients) when nothing changed.
    pub fn set_if_changed(
        &mut self,
        f: FieldId,
        reference: &str,
        value: Value,
    ) -> Result<bool, ApiError> {
        if self.state.get(f, reference).as_ref() == Some(&value) {
            return Ok(false);
        }
        self.set(f, reference, value).map(|()| true)
    }

    pub fn delete(&mut self, class: ClassId, reference: &str) -> Result<(), ApiError> {
        match self.state.remove_row(class, reference) {
            Some(row) => {
                self.note_parents(class, &row.fields);
                self.undo
                    .push(Undo::Deleted(class, reference.to_owned(), row));
                self.ops.push(Op::Delete {
                    class,
                    reference: reference.to_owned(),
                });
                Ok(())
            }
            None => Err(ApiError::handle_invalid(class.name(), reference)),
        }
    }

    /// Marks an object modified without changing it (`event.inject`).
    pub fn touch(&mut self, class: ClassId, reference: &str) -> Result<(), ApiError> {
        let uuid = class
            .field("uuid")
            .ok_or_else(|| ApiError::internal("class without uuid"))?;
        let v = self
            .state
            .get(uuid, reference)
            .ok_or_else(|| ApiError::handle_invalid(class.name(), reference))?;
        self.set(uuid, reference, v)
    }

    fn note_parents(&mut self, class: ClassId, fields: &[Value]) {
        for (&(cc, cf), &(pc, _)) in &self.state.rel_targets {
            if cc == class {
                if let Some(p) = fields[cf].as_str() {
                    self.parents.push((pc, p.to_owned()));
                }
            }
        }
    }

    fn rollback(self) {
        let Txn { state, undo, .. } = self;
        undo_all(state, undo);
    }
}

/// Puts back what a transaction changed, newest change first.
fn undo_all(state: &mut State, undo: Vec<Undo>) {
    for u in undo.into_iter().rev() {
        match u {
            Undo::Created(c, r) => {
                state.remove_row(c, &r);
            }
            Undo::Set(c, r, f, v) => {
                state.set_field(c, &r, f, v);
            }
            Undo::Deleted(c, r, row) => {
                let (created, modified) = (row.created, row.modified);
                state.insert_row(c, &r, row.fields, created);
                if let Some(x) = state.tables[c.0].rows.get_mut(&r) {
                    x.modified = modified;
                }
            }
        }
    }
}

impl Db {
    /// An empty database held only in memory (tests, benchmarks).
    pub fn in_memory() -> Db {
        Db {
            state: RwLock::new(State::new()),
            store: Mutex::new(None),
            persistent: false,
            queue: Mutex::new(Queue::default()),
            hook: RwLock::new(None),
            wait_hook: RwLock::new(None),
        }
    }

    /// Opens (creating if needed) the database at `path`, migrating its schema
    /// and loading every persisted row.
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let (store, rows, generation) = store::Store::open(path)?;
        let mut state = State::new();
        for (class, reference, fields) in rows {
            state.insert_row(class, &reference, fields, generation);
        }
        state.generation = generation;
        state.reserved = generation;
        state.log_floor = generation;
        Ok(Db {
            state: RwLock::new(state),
            store: Mutex::new(Some(store)),
            persistent: true,
            queue: Mutex::new(Queue {
                durable: generation,
                ..Queue::default()
            }),
            hook: RwLock::new(None),
            wait_hook: RwLock::new(None),
        })
    }

    /// Wraps every wait for a commit's batch to reach the disk.
    pub fn set_wait_hook(&self, hook: impl Fn(&mut dyn FnMut()) + Send + Sync + 'static) {
        if let Ok(mut h) = self.wait_hook.write() {
            *h = Some(Box::new(hook));
        }
    }

    /// Called with the new generation after every commit.
    pub fn set_commit_hook(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        if let Ok(mut h) = self.hook.write() {
            *h = Some(Box::new(hook));
        }
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` as one transaction. See the module docs.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Txn<'_>) -> Result<T, ApiError>,
    ) -> Result<T, DbError> {
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut txn = Txn {
            state: &mut guard,
            ops: Vec::new(),
            undo: Vec::new(),
            parents: Vec::new(),
        };
        let out = match f(&mut txn) {
            Ok(v) => v,
            Err(e) => {
                txn.rollback();
                return Err(e.into());
            }
        };
        if txn.ops.is_empty() {
            return Ok(out);
        }
        let Txn {
            state,
            ops,
            undo,
            parents,
        } = txn;
        let generation = state.reserved.max(state.generation) + 1;
        state.reserved = generation;
        let record = ChangeRecord { generation, ops };
        if !self.persistent {
            state.generation = generation;
            publish(state, &record, parents);
            drop(guard);
            self.call_hook(generation);
            return Ok(out);
        }
        lock(&self.queue).pending.push(Pending {
            record,
            parents,
            undo,
        });
        drop(guard);
        let mut result = None;
        let mut wait = || result = Some(self.wait_durable(generation));
        match self.wait_hook.read().ok().as_ref().and_then(|h| h.as_ref()) {
            Some(h) => h(&mut wait),
            None => wait(),
        }
        result.unwrap_or_else(|| self.wait_durable(generation))?;
        Ok(out)
    }

    fn call_hook(&self, generation: u64) {
        if let Ok(h) = self.hook.read() {
            if let Some(h) = h.as_ref() {
                h(generation);
            }
        }
    }
}

/// Type-checks a field value given over the API.
pub fn check_field(f: FieldId, v: Value) -> Result<Value, ApiError> {
    let def = f.def();
    coerce(v, &def.ty, def.name)
}

/// Whether a field may be given to the generic `create`.
pub fn settable_at_create(f: &corral_model::FieldDef) -> bool {
    matches!(f.qual, Qual::RW | Qual::Ctor) && f.rel.is_none() && !f.internal
}

/// Whether `ty` is a set of refs (for `valid_ref_counts`-style helpers).
pub fn is_ref(ty: &Ty) -> bool {
    matches!(ty, Ty::Ref(_))
}
