//! The XenAPI side of storage: SR, PBD, VDI and VBD messages on top of the
//! drivers in `corral-storage`.
//!
//! Every operation that touches storage follows one pattern: check what the
//! database allows, do the storage steps (undoing finished ones if a later
//! step fails), then commit the database change in one transaction. Images
//! created before that commit are listed in a journal file first, so that
//! after a crash [`recover`] deletes the ones the database never adopted.

use crate::api::{ApiResult, BoxFut, Ctx, Handler, Server, check_refs, create_fields, pstr, void};
use corral_db::Txn;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use corral_storage::{Driver, FORMAT_VERSION, Image, SrCtx, StorageError, VdiInfo};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Backing chains deeper than this refuse further snapshots (SMAPI's 30).
const MAX_CHAIN: usize = 30;
/// device-config keys whose values are stored as `secret` objects.
const SECRET_KEYS: &[&str] = &[
    "password",
    "chappassword",
    "incoming_chappassword",
    "cifspassword",
];

pub fn register(t: &mut HashMap<String, Handler>) {
    let mut a = |n: &str, f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut| {
        t.insert(n.to_owned(), Handler::Async(f));
    };
    a("SR.create", |s, c, p| Box::pin(sr_create(s, c, p)));
    a("SR.introduce", |s, _, p| {
        Box::pin(async move { sr_introduce(&s, p) })
    });
    a("SR.forget", |s, _, p| Box::pin(sr_forget(s, p)));
    a("SR.destroy", |s, _, p| Box::pin(sr_destroy(s, p)));
    a("SR.scan", |s, _, p| {
        Box::pin(async move { sr_scan(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("SR.update", |s, _, p| {
        Box::pin(async move { sr_update(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("SR.probe", |s, _, p| Box::pin(sr_probe(s, p)));
    a("SR.upgrade", |s, _, p| Box::pin(sr_upgrade(s, p)));
    a("SR.get_supported_types", |_, _, _| {
        Box::pin(async {
            Ok(Value::string_set(
                corral_storage::driver_kinds().iter().copied(),
            ))
        })
    });
    a("PBD.create", |s, _, p| {
        Box::pin(async move { pbd_create(&s, p) })
    });
    a("PBD.destroy", |s, _, p| {
        Box::pin(async move { pbd_destroy(&s, p) })
    });
    a("PBD.plug", |s, _, p| {
        Box::pin(async move { pbd_plug(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("PBD.unplug", |s, _, p| {
        Box::pin(async move { pbd_unplug(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("VDI.create", |s, _, p| Box::pin(vdi_create(s, p)));
    a("VDI.destroy", |s, _, p| Box::pin(vdi_destroy(s, p)));
    a("VDI.snapshot", |s, _, p| {
        Box::pin(async move { vdi_snapshot(&s, &first(p), true).await })
    });
    a("VDI.clone", |s, _, p| {
        Box::pin(async move { vdi_snapshot(&s, &first(p), false).await })
    });
    a("VDI.resize", |s, _, p| Box::pin(vdi_resize(s, p)));
    a("VDI.resize_online", |s, _, p| Box::pin(vdi_resize(s, p)));
    a("VDI.copy", |s, c, p| Box::pin(vdi_copy(s, c, p)));
    a("VDI.introduce", |s, _, p| Box::pin(vdi_introduce(s, p)));
    a("VDI.forget", |s, _, p| {
        Box::pin(async move { vdi_forget(&s, p) })
    });
    a("VDI.update", |s, _, p| Box::pin(vdi_update(s, p)));
    a("VBD.create", |s, _, p| {
        Box::pin(async move { vbd_create(&s, p) })
    });
    a("VBD.destroy", |s, _, p| {
        Box::pin(async move { vbd_destroy(&s, p) })
    });
    a("VBD.set_mode", |s, _, p| {
        Box::pin(async move { vbd_set_mode(&s, p) })
    });
}

/// VBD.set_mode: as XAPI, only while the VM is halted, and never RW onto a
/// VDI no guest may write (the drive builder enforces that too).
fn vbd_set_mode(s: &Server, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let vbd = pstr(&mut p);
    let mode = pstr(&mut p);
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        let vm = st.get_str(field::vbd::VM, &vbd).unwrap_or_default();
        let power = st.get_str(field::vm::POWER_STATE, &vm).unwrap_or_default();
        if power != "Halted" {
            return Err(ApiError::new(
                "VM_BAD_POWER_STATE",
                [vm.as_str(), "halted", &power.to_ascii_lowercase()],
            ));
        }
        let vdi = st.get_str(field::vbd::VDI, &vbd).unwrap_or_default();
        let empty = st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if mode == "RW"
            && !empty
            && st.exists(class::VDI, &vdi)
            && crate::vm::vdi_read_only(st, &vdi)
        {
            return Err(ApiError::new("VDI_READONLY", [vdi.as_str()]));
        }
        let v = corral_db::check_field(field::vbd::MODE, Value::String(mode.clone()))?;
        t.set(field::vbd::MODE, &vbd, v)
    }))?;
    void()
}

fn first(p: Vec<Value>) -> String {
    pstr(&mut p.into_iter())
}

pub(crate) fn strmap(v: &Value) -> BTreeMap<String, String> {
    v.as_struct()
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| (k.clone(), v.db_string()))
        .collect()
}

pub(crate) fn to_value(m: &BTreeMap<String, String>) -> Value {
    Value::Struct(m.iter().map(|(k, v)| (k.clone(), Value::str(v))).collect())
}

pub(crate) fn db<T>(r: Result<T, corral_db::DbError>) -> Result<T, ApiError> {
    r.map_err(ApiError::from)
}

/// XenAPI's form of a storage failure; `code` is the SMAPI code used when
/// the driver gave none (78 VDI create, 80 delete, 81 clone, 82 snapshot,
/// 79 resize, 40 scan, 47 SR unavailable).
pub fn storage_error(code: u32, sr: &str, e: StorageError) -> ApiError {
    let backend = |code: u32, reason: &str, detail: String| {
        ApiError::new(
            &format!("SR_BACKEND_FAILURE_{code}"),
            [String::new(), reason.to_owned(), detail],
        )
    };
    match e {
        StorageError::Backend {
            code,
            reason,
            detail,
        } => backend(code, &reason, detail),
        StorageError::Tool(m) => backend(code, "Storage operation failed", m),
        StorageError::Io(e) => backend(code, "Storage operation failed", e.to_string()),
        StorageError::Full(m) => backend(44, "There is insufficient space", m),
        StorageError::Missing(loc) => ApiError::new("VDI_MISSING", [sr.to_owned(), loc]),
        StorageError::NotSupported => ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr]),
        StorageError::RequiresUpgrade => ApiError::new("SR_REQUIRES_UPGRADE", [sr]),
        StorageError::Untrusted(why) => backend(code, "The image cannot be used", why),
        StorageError::BadConfig { key, why } => {
            ApiError::invalid_value(&format!("device-config:{key}"), &why)
        }
        StorageError::TooNew { found, supported } => backend(
            47,
            "The SR is not available",
            format!(
                "SR format version {found} was written by a newer Corral (this one supports up to {supported})"
            ),
        ),
    }
}

/// Runs blocking storage work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("storage worker: {e}")))
}

fn driver(kind: &str) -> Result<&'static dyn Driver, ApiError> {
    corral_storage::driver(kind).ok_or_else(|| ApiError::new("SR_UNKNOWN_DRIVER", [kind]))
}

/// The SR's driver and the context for calling it on this host.
struct SrOn {
    sr: String,
    uuid: String,
    driver: &'static dyn Driver,
    ctx: SrCtx,
    pbd: Option<String>,
    attached: bool,
    format_version: u32,
}

fn resolve_secrets(st: &corral_db::State, dc: &mut BTreeMap<String, String>) {
    let secret_keys: Vec<String> = dc
        .keys()
        .filter(|k| k.ends_with("_secret"))
        .cloned()
        .collect();
    for k in secret_keys {
        let uuid = dc.get(&k).cloned().unwrap_or_default();
        if let Some(r) = st.by_uuid(class::SECRET, &uuid) {
            let value = st.get_str(field::secret::VALUE, r).unwrap_or_default();
            dc.insert(k.trim_end_matches("_secret").to_owned(), value);
        }
    }
}

fn sr_on(s: &Server, sr: &str) -> Result<SrOn, ApiError> {
    sr_on_in(s, &s.db.read(), sr)
}

/// [`sr_on`] under the caller's read lock.
fn sr_on_in(s: &Server, st: &corral_db::State, sr: &str) -> Result<SrOn, ApiError> {
    if !st.exists(class::SR, sr) {
        return Err(ApiError::handle_invalid("SR", sr));
    }
    let kind = st.get_str(field::sr::TYPE_, sr).unwrap_or_default();
    let driver = driver(&kind)?;
    let uuid = st.get_str(field::sr::UUID, sr).unwrap_or_default();
    let sm_config = strmap(&st.get(field::sr::SM_CONFIG, sr).unwrap_or(Value::Nil));
    let pbd = st
        .refs(class::PBD)
        .find(|p| {
            st.get_str(field::pbd::SR, p).as_deref() == Some(sr)
                && st.get_str(field::pbd::HOST, p).as_deref() == Some(s.host_ref.as_str())
        })
        .cloned();
    let (mut dc, attached) = match &pbd {
        Some(p) => (
            strmap(&st.get(field::pbd::DEVICE_CONFIG, p).unwrap_or(Value::Nil)),
            st.get(field::pbd::CURRENTLY_ATTACHED, p)
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        ),
        None => (BTreeMap::new(), false),
    };
    resolve_secrets(&st, &mut dc);
    let format_version = sm_config
        .get("format_version")
        .and_then(|v| v.parse().ok())
        .unwrap_or(FORMAT_VERSION);
    Ok(SrOn {
        sr: sr.to_owned(),
        uuid: uuid.clone(),
        driver,
        ctx: SrCtx {
            uuid,
            device_config: dc,
            sm_config,
            state_dir: s.state_dir.clone(),
        },
        pbd,
        attached,
        format_version,
    })
}

/// The SR must be plugged on this host for anything that reads its storage.
fn attached(s: &Server, sr: &str) -> Result<SrOn, ApiError> {
    attached_on(sr_on(s, sr)?)
}

fn attached_on(on: SrOn) -> Result<SrOn, ApiError> {
    let sr = on.sr.as_str();
    match &on.pbd {
        None => Err(ApiError::new("SR_NO_PBDS", [sr])),
        Some(_) if !on.attached => Err(ApiError::new("SR_NOT_ATTACHED", [sr])),
        Some(_) => Ok(on),
    }
}

fn has_cap(on: &SrOn, cap: &str) -> bool {
    on.driver.info().capabilities.contains(&cap)
}

/// Serialises chain-changing work per SR.
async fn sr_lock(s: &Server, sr_uuid: &str) -> tokio::sync::OwnedMutexGuard<()> {
    let m = {
        let mut locks = s.sr_locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(sr_uuid.to_owned()).or_default())
    };
    m.lock_owned().await
}

// ---------------------------------------------------------------------------
// Journal: images made before the database knows them.

fn journal_dir(s: &Server) -> std::path::PathBuf {
    s.state_dir.join("storage-journal")
}

/// A journal entry naming images on an SR that may have to be deleted.
struct Journal {
    path: std::path::PathBuf,
}

impl Journal {
    fn open(s: &Server, sr_uuid: &str, locations: &[&str]) -> Result<Journal, ApiError> {
        let dir = journal_dir(s);
        let io = |e: std::io::Error| ApiError::internal(format!("storage journal: {e}"));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{}.json", uuid::Uuid::new_v4()));
        let text = serde_json::json!({ "sr": sr_uuid, "locations": locations }).to_string();
        std::fs::write(&path, text).map_err(io)?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        Ok(Journal { path })
    }

    fn add(&self, location: &str) {
        if let Ok(text) = std::fs::read_to_string(&self.path) {
            if let Ok(mut j) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(a) = j["locations"].as_array_mut() {
                    a.push(serde_json::Value::String(location.to_owned()));
                }
                let _ = std::fs::write(&self.path, j.to_string());
                if let Ok(f) = std::fs::File::open(&self.path) {
                    let _ = f.sync_all();
                }
            }
        }
    }

    fn close(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Operations recorded on SRs, VDIs and VBDs belonged to tasks of the old
/// corrald (tasks are volatile); nothing runs them any more.
fn forget_dead_operations(s: &Server) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        for (c, f) in [
            (class::SR, field::sr::CURRENT_OPERATIONS),
            (class::VDI, field::vdi::CURRENT_OPERATIONS),
            (class::VBD, field::vbd::CURRENT_OPERATIONS),
        ] {
            let refs: Vec<String> = t.state().refs(c).cloned().collect();
            for r in refs {
                t.set_if_changed(f, &r, Value::Struct(vec![]))?;
            }
        }
        let srs: Vec<String> = t.state().refs(class::SR).cloned().collect();
        for sr in srs {
            refresh_allowed(t, &sr)?;
        }
        Ok::<(), ApiError>(())
    }))
}

/// After a crash: delete journalled images the database never adopted.
pub fn recover(s: &Server) {
    let Ok(entries) = std::fs::read_dir(journal_dir(s)) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Ok(j) = serde_json::from_str::<serde_json::Value>(&text) else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let sr_uuid = j["sr"].as_str().unwrap_or_default();
        let sr = s.db.read().by_uuid(class::SR, sr_uuid).cloned();
        let Some(sr) = sr else {
            let _ = std::fs::remove_file(e.path());
            continue;
        };
        let Ok(on) = sr_on(s, &sr) else { continue };
        let referenced: HashSet<String> = {
            let st = s.db.read();
            st.refs(class::VDI)
                .filter(|v| st.get_str(field::vdi::SR, v).as_deref() == Some(sr.as_str()))
                .filter_map(|v| st.get_str(field::vdi::LOCATION, v))
                .collect()
        };
        let _ = on.driver.attach(&on.ctx);
        let mut done = true;
        for loc in j["locations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str())
        {
            if !referenced.contains(loc) {
                tracing::info!(
                    sr = sr_uuid,
                    location = loc,
                    "removing image left by an interrupted operation"
                );
                if on.driver.vdi_delete(&on.ctx, loc).is_err() {
                    done = false;
                }
            }
        }
        if done {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

// ---------------------------------------------------------------------------
// allowed_operations

const SR_OPS: &[(&str, Option<&str>)] = &[
    ("scan", Some("SR_SCAN")),
    ("destroy", None),
    ("forget", None),
    ("plug", None),
    ("unplug", None),
    ("update", None),
    ("vdi_create", Some("VDI_CREATE")),
    ("vdi_introduce", Some("VDI_INTRODUCE")),
    ("vdi_destroy", Some("VDI_DELETE")),
    ("vdi_resize", Some("VDI_RESIZE")),
    ("vdi_clone", Some("VDI_CLONE")),
    ("vdi_snapshot", Some("VDI_SNAPSHOT")),
    ("vdi_copy", None),
    ("pbd_create", None),
    ("pbd_destroy", None),
];

/// Recomputes SR.allowed_operations and those of its VDIs from the driver's
/// capabilities, the SR's format and the current operations.
fn refresh_allowed(t: &mut Txn<'_>, sr: &str) -> Result<(), ApiError> {
    let st = t.state();
    let Some(kind) = st.get_str(field::sr::TYPE_, sr) else {
        return Ok(());
    };
    let caps: &[&str] = corral_storage::driver(&kind)
        .map(|d| d.info().capabilities)
        .unwrap_or(&[]);
    let legacy = strmap(&st.get(field::sr::SM_CONFIG, sr).unwrap_or(Value::Nil))
        .get("format_version")
        .is_some_and(|v| v.parse::<u32>().unwrap_or(FORMAT_VERSION) < FORMAT_VERSION);
    let busy = !st
        .get(field::sr::CURRENT_OPERATIONS, sr)
        .and_then(|v| v.as_struct().map(|m| m.is_empty()))
        .unwrap_or(true);
    let sr_allowed: Vec<&str> = if busy {
        vec![]
    } else {
        SR_OPS
            .iter()
            .filter(|(_, cap)| cap.is_none_or(|c| caps.contains(&c)))
            .filter(|(op, _)| !(legacy && matches!(*op, "vdi_clone" | "vdi_snapshot")))
            .map(|(op, _)| *op)
            .collect()
    };
    let vdis: Vec<String> = st
        .refs(class::VDI)
        .filter(|v| st.get_str(field::vdi::SR, v).as_deref() == Some(sr))
        .cloned()
        .collect();
    let mut vdi_allowed = Vec::new();
    for v in &vdis {
        let managed = st
            .get(field::vdi::MANAGED, v)
            .and_then(|x| x.as_bool())
            .unwrap_or(true);
        let vbusy = !st
            .get(field::vdi::CURRENT_OPERATIONS, v)
            .and_then(|x| x.as_struct().map(|m| m.is_empty()))
            .unwrap_or(true);
        let ops: Vec<&str> = if !managed || vbusy {
            vec![]
        } else {
            [
                ("clone", Some("VDI_CLONE")),
                ("copy", None),
                ("resize", Some("VDI_RESIZE")),
                ("snapshot", Some("VDI_SNAPSHOT")),
                ("destroy", Some("VDI_DELETE")),
                ("forget", None),
                ("update", Some("VDI_UPDATE")),
            ]
            .iter()
            .filter(|(_, cap)| cap.is_none_or(|c| caps.contains(&c)))
            .filter(|(op, _)| !(legacy && matches!(*op, "clone" | "snapshot")))
            .map(|(op, _)| *op)
            .collect()
        };
        vdi_allowed.push((v.clone(), ops));
    }
    t.set(
        field::sr::ALLOWED_OPERATIONS,
        sr,
        Value::string_set(sr_allowed),
    )?;
    for (v, ops) in vdi_allowed {
        t.set(field::vdi::ALLOWED_OPERATIONS, &v, Value::string_set(ops))?;
    }
    Ok(())
}

/// Marks `op` running on the SR (and a VDI) for the guard's lifetime.
struct OpGuard<'a> {
    s: &'a Server,
    sr: String,
    vdi: Option<String>,
    key: String,
}

impl<'a> OpGuard<'a> {
    fn start(
        s: &'a Server,
        sr: &str,
        vdi: Option<&str>,
        sr_op: &str,
        vdi_op: &str,
    ) -> Result<Self, ApiError> {
        let key = new_ref();
        db(s.db.write(|t| {
            let add = |t: &mut Txn<'_>,
                       f: corral_model::FieldId,
                       r: &str,
                       op: &str|
             -> Result<(), ApiError> {
                let mut m = t
                    .state()
                    .get(f, r)
                    .and_then(|v| v.as_struct().map(<[_]>::to_vec))
                    .unwrap_or_default();
                m.push((key.clone(), Value::str(op)));
                t.set(f, r, Value::Struct(m))
            };
            add(t, field::sr::CURRENT_OPERATIONS, sr, sr_op)?;
            if let Some(v) = vdi {
                add(t, field::vdi::CURRENT_OPERATIONS, v, vdi_op)?;
            }
            refresh_allowed(t, sr)
        }))?;
        Ok(OpGuard {
            s,
            sr: sr.to_owned(),
            vdi: vdi.map(str::to_owned),
            key,
        })
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let _ = self.s.db.write(|t| {
            let drop_key =
                |t: &mut Txn<'_>, f: corral_model::FieldId, r: &str| -> Result<(), ApiError> {
                    if let Some(m) = t
                        .state()
                        .get(f, r)
                        .and_then(|v| v.as_struct().map(<[_]>::to_vec))
                    {
                        t.set(
                            f,
                            r,
                            Value::Struct(m.into_iter().filter(|(k, _)| *k != self.key).collect()),
                        )?;
                    }
                    Ok(())
                };
            if t.state().exists(class::SR, &self.sr) {
                drop_key(t, field::sr::CURRENT_OPERATIONS, &self.sr)?;
            }
            if let Some(v) = &self.vdi {
                if t.state().exists(class::VDI, v) {
                    drop_key(t, field::vdi::CURRENT_OPERATIONS, v)?;
                }
            }
            refresh_allowed(t, &self.sr)
        });
    }
}

fn vdi_busy(st: &corral_db::State, vdi: &str, op: &str) -> Result<(), ApiError> {
    let busy = st
        .get(field::vdi::CURRENT_OPERATIONS, vdi)
        .and_then(|v| v.as_struct().map(|m| !m.is_empty()))
        .unwrap_or(false);
    if busy {
        return Err(ApiError::new("VDI_IN_USE", [vdi, op]));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Records

fn vdi_fields(sr: &str, info: &VdiInfo, name: &str, descr: &str, ty: &str) -> Vec<(usize, Value)> {
    vec![
        (field::vdi::NAME_LABEL.index, Value::str(name)),
        (field::vdi::NAME_DESCRIPTION.index, Value::str(descr)),
        (field::vdi::SR.index, Value::str(sr)),
        (
            field::vdi::VIRTUAL_SIZE.index,
            Value::Int(info.virtual_size),
        ),
        (
            field::vdi::PHYSICAL_UTILISATION.index,
            Value::Int(info.physical_utilisation),
        ),
        (field::vdi::TYPE_.index, Value::str(ty)),
        (field::vdi::SHARABLE.index, Value::Bool(false)),
        (field::vdi::READ_ONLY.index, Value::Bool(info.read_only)),
        (field::vdi::OTHER_CONFIG.index, Value::Struct(vec![])),
        (field::vdi::LOCATION.index, Value::str(&info.location)),
        (field::vdi::MANAGED.index, Value::Bool(true)),
        (field::vdi::MISSING.index, Value::Bool(false)),
        (field::vdi::PARENT.index, Value::str(NULL_REF)),
        (field::vdi::SM_CONFIG.index, sm_config_for(None)),
    ]
}

fn sm_config_for(parent_uuid: Option<&str>) -> Value {
    let mut m = vec![];
    if let Some(p) = parent_uuid {
        // XenCenter draws snapshot trees from this key.
        m.push(("vhd-parent".to_owned(), Value::str(p)));
    }
    Value::Struct(m)
}

fn vdis_of(st: &corral_db::State, sr: &str) -> Vec<String> {
    st.refs(class::VDI)
        .filter(|v| st.get_str(field::vdi::SR, v).as_deref() == Some(sr))
        .cloned()
        .collect()
}

fn vdi_attached(st: &corral_db::State, vdi: &str) -> bool {
    st.refs(class::VBD).any(|b| {
        st.get_str(field::vbd::VDI, b).as_deref() == Some(vdi)
            && st
                .get(field::vbd::CURRENTLY_ATTACHED, b)
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
    })
}

/// Sets SR sizes from the driver's stat and the VDIs' sizes.
fn write_sr_sizes(t: &mut Txn<'_>, sr: &str, stat: corral_storage::SrStat) -> Result<(), ApiError> {
    let st = t.state();
    let virtual_allocation: i64 = vdis_of(st, sr)
        .iter()
        .filter(|v| {
            st.get(field::vdi::MANAGED, v)
                .and_then(|x| x.as_bool())
                .unwrap_or(true)
        })
        .filter_map(|v| st.get(field::vdi::VIRTUAL_SIZE, v).and_then(|x| x.as_int()))
        .sum();
    t.set(field::sr::PHYSICAL_SIZE, sr, Value::Int(stat.physical_size))?;
    t.set(
        field::sr::PHYSICAL_UTILISATION,
        sr,
        Value::Int(stat.physical_utilisation),
    )?;
    t.set(
        field::sr::VIRTUAL_ALLOCATION,
        sr,
        Value::Int(virtual_allocation),
    )
}

async fn refresh_sizes(s: &Server, on: &SrOn) {
    let (d, ctx) = (on.driver, on.ctx.clone());
    if let Ok(Ok(stat)) = blocking(move || d.stat(&ctx)).await {
        let _ = s.db.write(|t| write_sr_sizes(t, &on.sr, stat));
    }
}

// ---------------------------------------------------------------------------
// SR

/// Replaces secret device-config values with `secret` objects.
fn store_secrets(t: &mut Txn<'_>, dc: &mut BTreeMap<String, String>) -> Result<(), ApiError> {
    for k in SECRET_KEYS {
        if let Some(v) = dc.remove(*k) {
            let r = new_ref();
            let uuid = corral_model::new_uuid();
            t.create(
                class::SECRET,
                &r,
                vec![
                    (field::secret::UUID.index, Value::str(&uuid)),
                    (field::secret::VALUE.index, Value::String(v)),
                ],
            )?;
            dc.insert(format!("{k}_secret"), uuid);
        }
    }
    Ok(())
}

fn delete_secrets(t: &mut Txn<'_>, dc: &BTreeMap<String, String>) -> Result<(), ApiError> {
    for (k, v) in dc {
        if k.ends_with("_secret") {
            if let Some(r) = t.state().by_uuid(class::SECRET, v).cloned() {
                t.delete(class::SECRET, &r)?;
            }
        }
    }
    Ok(())
}

async fn sr_create(s: Arc<Server>, _c: Ctx, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let host = pstr(&mut p);
    let dc = strmap(&p.next().unwrap_or(Value::Nil));
    let physical_size = p.next().and_then(|v| v.as_int()).unwrap_or(0);
    let (name, descr, kind, content_type) =
        (pstr(&mut p), pstr(&mut p), pstr(&mut p), pstr(&mut p));
    let shared = p.next().and_then(|v| v.as_bool()).unwrap_or(false);
    let sm_config = strmap(&p.next().unwrap_or(Value::Nil));
    if !s.db.read().exists(class::HOST, &host) {
        return Err(ApiError::handle_invalid("host", &host));
    }
    let d = driver(&kind)?;
    let content_type = if content_type.is_empty() {
        d.info().content_type.to_owned()
    } else {
        content_type
    };
    let sr = new_ref();
    let uuid = corral_model::new_uuid();
    let ctx = SrCtx {
        uuid: uuid.clone(),
        device_config: dc.clone(),
        sm_config: sm_config.clone(),
        state_dir: s.state_dir.clone(),
    };
    {
        let ctx = ctx.clone();
        blocking(move || d.create(&ctx, physical_size))
            .await?
            .map_err(|e| storage_error(78, &sr, e))?;
    }
    let hosts: Vec<String> = if shared {
        s.db.read().refs(class::HOST).cloned().collect()
    } else {
        vec![host.clone()]
    };
    let mut sm = sm_config.clone();
    sm.insert("format_version".into(), FORMAT_VERSION.to_string());
    let created = s.db.write(|t| {
        t.create(
            class::SR,
            &sr,
            vec![
                (field::sr::UUID.index, Value::str(&uuid)),
                (field::sr::NAME_LABEL.index, Value::str(&name)),
                (field::sr::NAME_DESCRIPTION.index, Value::str(&descr)),
                (field::sr::TYPE_.index, Value::str(&kind)),
                (field::sr::CONTENT_TYPE.index, Value::str(&content_type)),
                (field::sr::SHARED.index, Value::Bool(shared)),
                (field::sr::PHYSICAL_SIZE.index, Value::Int(physical_size)),
                (field::sr::SM_CONFIG.index, to_value(&sm)),
                (field::sr::OTHER_CONFIG.index, Value::Struct(vec![])),
            ],
        )?;
        let mut dc = dc.clone();
        store_secrets(t, &mut dc)?;
        for h in &hosts {
            t.create(
                class::PBD,
                &new_ref(),
                vec![
                    (field::pbd::HOST.index, Value::str(h)),
                    (field::pbd::SR.index, Value::str(&sr)),
                    (field::pbd::DEVICE_CONFIG.index, to_value(&dc)),
                    (field::pbd::CURRENTLY_ATTACHED.index, Value::Bool(false)),
                ],
            )?;
        }
        refresh_allowed(t, &sr)
    });
    if let Err(e) = created {
        let _ = blocking(move || d.delete(&ctx)).await;
        return Err(e.into());
    }
    // Plug this host's PBD; on failure the SR is removed again, as XAPI does.
    let pbd = sr_on(&s, &sr)?.pbd;
    if let Some(pbd) = pbd {
        if let Err(e) = pbd_plug(&s, &pbd).await {
            let _ = blocking(move || d.delete(&ctx)).await;
            let _ = s.db.write(|t| {
                for p in t.state().refs(class::PBD).cloned().collect::<Vec<_>>() {
                    if t.state().get_str(field::pbd::SR, &p).as_deref() == Some(sr.as_str()) {
                        let dc = strmap(
                            &t.state()
                                .get(field::pbd::DEVICE_CONFIG, &p)
                                .unwrap_or(Value::Nil),
                        );
                        delete_secrets(t, &dc)?;
                        t.delete(class::PBD, &p)?;
                    }
                }
                t.delete(class::SR, &sr)
            });
            return Err(e);
        }
    }
    Ok(Value::String(sr))
}

fn sr_introduce(s: &Server, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let (uuid, name, descr, kind, content_type) = (
        pstr(&mut p),
        pstr(&mut p),
        pstr(&mut p),
        pstr(&mut p),
        pstr(&mut p),
    );
    let shared = p.next().and_then(|v| v.as_bool()).unwrap_or(false);
    let sm_config = strmap(&p.next().unwrap_or(Value::Nil));
    driver(&kind)?;
    let uuid = if uuid.is_empty() {
        corral_model::new_uuid()
    } else {
        uuid
    };
    if uuid::Uuid::parse_str(&uuid).is_err() {
        return Err(ApiError::uuid_invalid("SR", &uuid));
    }
    let sr = new_ref();
    db(s.db.write(|t| {
        if t.state().by_uuid(class::SR, &uuid).is_some() {
            return Err(ApiError::new("SR_UUID_EXISTS", [uuid.as_str()]));
        }
        t.create(
            class::SR,
            &sr,
            vec![
                (field::sr::UUID.index, Value::str(&uuid)),
                (field::sr::NAME_LABEL.index, Value::str(&name)),
                (field::sr::NAME_DESCRIPTION.index, Value::str(&descr)),
                (field::sr::TYPE_.index, Value::str(&kind)),
                (field::sr::CONTENT_TYPE.index, Value::str(&content_type)),
                (field::sr::SHARED.index, Value::Bool(shared)),
                (field::sr::SM_CONFIG.index, to_value(&sm_config)),
                (field::sr::OTHER_CONFIG.index, Value::Struct(vec![])),
            ],
        )?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(Value::String(sr))
}

fn pbds_of(st: &corral_db::State, sr: &str) -> Vec<String> {
    st.refs(class::PBD)
        .filter(|p| st.get_str(field::pbd::SR, p).as_deref() == Some(sr))
        .cloned()
        .collect()
}

fn assert_no_plugged_pbd(st: &corral_db::State, sr: &str) -> Result<(), ApiError> {
    if pbds_of(st, sr).iter().any(|p| {
        st.get(field::pbd::CURRENTLY_ATTACHED, p)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }) {
        return Err(ApiError::new("SR_HAS_PBD", [sr]));
    }
    Ok(())
}

/// Removes the SR's records (VDIs, VBD links to them, PBDs, secrets).
fn remove_sr_records(t: &mut Txn<'_>, sr: &str) -> Result<(), ApiError> {
    let st = t.state();
    let vdis = vdis_of(st, sr);
    let vbds: Vec<String> = st
        .refs(class::VBD)
        .filter(|b| {
            st.get_str(field::vbd::VDI, b)
                .is_some_and(|v| vdis.contains(&v))
        })
        .cloned()
        .collect();
    let pbds = pbds_of(st, sr);
    for b in vbds {
        t.set(field::vbd::VDI, &b, Value::str(NULL_REF))?;
        t.set(field::vbd::EMPTY, &b, Value::Bool(true))?;
    }
    for v in vdis {
        t.delete(class::VDI, &v)?;
    }
    for p in pbds {
        let dc = strmap(
            &t.state()
                .get(field::pbd::DEVICE_CONFIG, &p)
                .unwrap_or(Value::Nil),
        );
        delete_secrets(t, &dc)?;
        t.delete(class::PBD, &p)?;
    }
    let default_sr = t
        .state()
        .get_str(field::pool::DEFAULT_SR, &pool_ref(t.state()));
    if default_sr.as_deref() == Some(sr) {
        let pool = pool_ref(t.state());
        t.set(field::pool::DEFAULT_SR, &pool, Value::str(NULL_REF))?;
    }
    t.delete(class::SR, sr)
}

fn pool_ref(st: &corral_db::State) -> String {
    st.refs(class::POOL).next().cloned().unwrap_or_default()
}

async fn sr_forget(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let sr = first(p);
    let _l = sr_lock(&s, &sr_on(&s, &sr)?.uuid).await;
    db(s.db.write(|t| {
        if !t.state().exists(class::SR, &sr) {
            return Err(ApiError::handle_invalid("SR", &sr));
        }
        assert_no_plugged_pbd(t.state(), &sr)?;
        remove_sr_records(t, &sr)
    }))?;
    void()
}

async fn sr_destroy(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let sr = first(p);
    let on = sr_on(&s, &sr)?;
    let _l = sr_lock(&s, &on.uuid).await;
    {
        let st = s.db.read();
        assert_no_plugged_pbd(&st, &sr)?;
        let managed = vdis_of(&st, &sr).iter().any(|v| {
            st.get(field::vdi::MANAGED, v)
                .and_then(|x| x.as_bool())
                .unwrap_or(true)
        });
        if managed && st.get_str(field::sr::TYPE_, &sr).as_deref() != Some("iso") {
            return Err(ApiError::new("SR_NOT_EMPTY", Vec::<String>::new()));
        }
        if on.pbd.is_none() {
            return Err(ApiError::new("SR_NO_PBDS", [sr.as_str()]));
        }
    }
    let (d, ctx) = (on.driver, on.ctx.clone());
    blocking(move || -> Result<(), StorageError> {
        d.attach(&ctx)?;
        // Unmanaged base copies go with the SR.
        for v in d.scan(&ctx)? {
            d.vdi_delete(&ctx, &v.location)?;
        }
        d.delete(&ctx)
    })
    .await?
    .map_err(|e| storage_error(39, &sr, e))?;
    db(s.db.write(|t| remove_sr_records(t, &sr)))?;
    void()
}

async fn sr_probe(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let host = pstr(&mut p);
    let dc = strmap(&p.next().unwrap_or(Value::Nil));
    let kind = pstr(&mut p);
    if !s.db.read().exists(class::HOST, &host) {
        return Err(ApiError::handle_invalid("host", &host));
    }
    let d = driver(&kind)?;
    if !d.info().capabilities.contains(&"SR_PROBE") {
        return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [NULL_REF]));
    }
    let state_dir = s.state_dir.clone();
    let xml = blocking(move || d.probe(&dc, &state_dir))
        .await?
        .map_err(|e| storage_error(1, "", e))?;
    Ok(Value::String(xml))
}

async fn sr_upgrade(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let sr = first(p);
    let on = attached(&s, &sr)?;
    let _l = sr_lock(&s, &on.uuid).await;
    {
        let st = s.db.read();
        if let Some(v) = vdis_of(&st, &sr).iter().find(|v| vdi_attached(&st, v)) {
            return Err(ApiError::new("VDI_IN_USE", [v.as_str(), "sr_upgrade"]));
        }
    }
    if on.format_version < FORMAT_VERSION {
        let (d, ctx) = (on.driver, on.ctx.clone());
        blocking(move || d.upgrade(&ctx))
            .await?
            .map_err(|e| storage_error(47, &sr, e))?;
    }
    db(s.db.write(|t| {
        let mut sm = strmap(
            &t.state()
                .get(field::sr::SM_CONFIG, &sr)
                .unwrap_or(Value::Nil),
        );
        sm.insert("format_version".into(), FORMAT_VERSION.to_string());
        sm.remove("requires_upgrade");
        t.set(field::sr::SM_CONFIG, &sr, to_value(&sm))?;
        refresh_allowed(t, &sr)
    }))?;
    void()
}

async fn sr_update(s: &Arc<Server>, sr: &str) -> Result<(), ApiError> {
    let on = attached(s, sr)?;
    refresh_sizes(s, &on).await;
    Ok(())
}

/// Reconciles the database with the images on the SR.
pub async fn sr_scan(s: &Arc<Server>, sr: &str) -> Result<(), ApiError> {
    let on = attached(s, sr)?;
    let _l = sr_lock(s, &on.uuid).await;
    let _op = OpGuard::start(s, sr, None, "scan", "")?;
    let (d, ctx) = (on.driver, on.ctx.clone());
    let (images, stat) =
        blocking(move || -> Result<_, StorageError> { Ok((d.scan(&ctx)?, d.stat(&ctx)?)) })
            .await?
            .map_err(|e| storage_error(40, sr, e))?;
    let iso = s.db.read().get_str(field::sr::TYPE_, sr).as_deref() == Some("iso");
    db(s.db.write(|t| reconcile(t, sr, &images, iso).and_then(|_| write_sr_sizes(t, sr, stat))))?;
    Ok(())
}

fn reconcile(t: &mut Txn<'_>, sr: &str, images: &[VdiInfo], iso: bool) -> Result<(), ApiError> {
    let st = t.state();
    let by_loc: HashMap<String, String> = vdis_of(st, sr)
        .into_iter()
        .filter_map(|v| st.get_str(field::vdi::LOCATION, &v).map(|l| (l, v)))
        .collect();
    let on_disk: HashMap<&str, &VdiInfo> =
        images.iter().map(|i| (i.location.as_str(), i)).collect();
    let parents: HashSet<&str> = images.iter().filter_map(|i| i.parent.as_deref()).collect();
    // Vanished images: records go, unless a VBD still uses them (then `missing`).
    let gone: Vec<(String, bool)> = by_loc
        .iter()
        .filter(|(l, _)| !on_disk.contains_key(l.as_str()))
        .map(|(_, v)| {
            (
                v.clone(),
                st.refs(class::VBD)
                    .any(|b| st.get_str(field::vbd::VDI, b).as_deref() == Some(v.as_str())),
            )
        })
        .collect();
    for (v, used) in gone {
        if used {
            t.set(field::vdi::MISSING, &v, Value::Bool(true))?;
        } else {
            t.delete(class::VDI, &v)?;
        }
    }
    // New images: introduced; those that back others are hidden base copies.
    for img in images {
        match by_loc.get(&img.location) {
            Some(v) => {
                let v = v.clone();
                t.set(field::vdi::VIRTUAL_SIZE, &v, Value::Int(img.virtual_size))?;
                t.set(
                    field::vdi::PHYSICAL_UTILISATION,
                    &v,
                    Value::Int(img.physical_utilisation),
                )?;
                t.set(field::vdi::MISSING, &v, Value::Bool(false))?;
            }
            None => {
                let base = parents.contains(img.location.as_str());
                let name = if iso {
                    img.location.clone()
                } else if base {
                    "base copy".into()
                } else {
                    String::new()
                };
                let mut f = vdi_fields(sr, img, &name, "", "user");
                if base {
                    f.push((field::vdi::MANAGED.index, Value::Bool(false)));
                    f.push((field::vdi::READ_ONLY.index, Value::Bool(true)));
                }
                t.create(class::VDI, &new_ref(), f)?;
            }
        }
    }
    // vhd-parent keys follow the chains as found.
    let st = t.state();
    let uuid_of_loc: HashMap<String, String> = vdis_of(st, sr)
        .into_iter()
        .filter_map(|v| {
            Some((
                st.get_str(field::vdi::LOCATION, &v)?,
                st.get_str(field::vdi::UUID, &v)?,
            ))
        })
        .collect();
    let loc_to_ref: HashMap<String, String> = vdis_of(st, sr)
        .into_iter()
        .filter_map(|v| Some((st.get_str(field::vdi::LOCATION, &v)?, v)))
        .collect();
    for img in images {
        if let Some(v) = loc_to_ref.get(&img.location) {
            let mut sm = strmap(
                &t.state()
                    .get(field::vdi::SM_CONFIG, v)
                    .unwrap_or(Value::Nil),
            );
            // Formats are the storage layer's alone (older Corrals kept
            // one here, where users could change it).
            sm.remove("image-format");
            match img.parent.as_ref().and_then(|p| uuid_of_loc.get(p)) {
                Some(pu) => sm.insert("vhd-parent".into(), pu.clone()),
                None => sm.remove("vhd-parent"),
            };
            t.set(field::vdi::SM_CONFIG, v, to_value(&sm))?;
        }
    }
    refresh_allowed(t, sr)
}

// ---------------------------------------------------------------------------
// PBD

fn pbd_create(s: &Server, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let given = create_fields(class::PBD, &args)?;
    let get = |f: corral_model::FieldId| given_field(&given, f);
    let sr = get(field::pbd::SR)
        .map(|v| v.db_string())
        .unwrap_or_default();
    let host = get(field::pbd::HOST)
        .map(|v| v.db_string())
        .unwrap_or_default();
    let mut dc = strmap(&get(field::pbd::DEVICE_CONFIG).unwrap_or(Value::Nil));
    if dc.contains_key("SRmaster") {
        return Err(ApiError::invalid_value("device_config", "SRmaster"));
    }
    let r = new_ref();
    db(s.db.write(|t| {
        check_refs(t, class::PBD, &given)?;
        if let Some(existing) = pbds_of(t.state(), &sr)
            .into_iter()
            .find(|p| t.state().get_str(field::pbd::HOST, p).as_deref() == Some(host.as_str()))
        {
            return Err(ApiError::new(
                "PBD_EXISTS",
                [sr.as_str(), host.as_str(), existing.as_str()],
            ));
        }
        store_secrets(t, &mut dc)?;
        let mut fields = given.clone();
        fields.retain(|(i, _)| *i != field::pbd::DEVICE_CONFIG.index);
        fields.push((field::pbd::DEVICE_CONFIG.index, to_value(&dc)));
        fields.push((field::pbd::CURRENTLY_ATTACHED.index, Value::Bool(false)));
        t.create(class::PBD, &r, fields)
    }))?;
    Ok(Value::String(r))
}

/// `HANDLE_INVALID` for a missing object, `OPERATION_NOT_ALLOWED` while its
/// `currently_attached` flag is set (PBDs and VBDs are destroyed unplugged).
fn assert_detached(
    st: &corral_db::State,
    attached: corral_model::FieldId,
    r: &str,
) -> Result<(), ApiError> {
    let c = attached.class;
    if !st.exists(c, r) {
        return Err(ApiError::handle_invalid(c.name(), r));
    }
    if st
        .get(attached, r)
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    {
        return Err(ApiError::operation_not_allowed(format!(
            "{} is currently attached",
            c.name()
        )));
    }
    Ok(())
}

fn pbd_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
    let pbd = first(p);
    db(s.db.write(|t| {
        let st = t.state();
        assert_detached(st, field::pbd::CURRENTLY_ATTACHED, &pbd)?;
        let dc = strmap(
            &st.get(field::pbd::DEVICE_CONFIG, &pbd)
                .unwrap_or(Value::Nil),
        );
        delete_secrets(t, &dc)?;
        t.delete(class::PBD, &pbd)
    }))?;
    void()
}

pub async fn pbd_plug(s: &Arc<Server>, pbd: &str) -> Result<(), ApiError> {
    let (sr, host) = {
        let st = s.db.read();
        if !st.exists(class::PBD, pbd) {
            return Err(ApiError::handle_invalid("PBD", pbd));
        }
        (
            st.get_str(field::pbd::SR, pbd).unwrap_or_default(),
            st.get_str(field::pbd::HOST, pbd).unwrap_or_default(),
        )
    };
    if host != s.host_ref {
        return Err(ApiError::new("HOST_OFFLINE", [host]));
    }
    {
        // A non-shared SR may be attached on one host only.
        let st = s.db.read();
        let shared = st
            .get(field::sr::SHARED, &sr)
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if !shared
            && pbds_of(&st, &sr).iter().any(|p| {
                p != pbd
                    && st
                        .get(field::pbd::CURRENTLY_ATTACHED, p)
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false)
            })
        {
            return Err(ApiError::new(
                "SR_NOT_SHARABLE",
                [sr.as_str(), host.as_str()],
            ));
        }
    }
    let on = sr_on(s, &sr)?;
    let (d, ctx) = (on.driver, on.ctx.clone());
    let version = blocking(move || d.attach(&ctx))
        .await?
        .map_err(|e| storage_error(47, &sr, e))?;
    db(s.db.write(|t| {
        t.set(field::pbd::CURRENTLY_ATTACHED, pbd, Value::Bool(true))?;
        let mut sm = strmap(
            &t.state()
                .get(field::sr::SM_CONFIG, &sr)
                .unwrap_or(Value::Nil),
        );
        sm.insert("format_version".into(), version.to_string());
        if version < FORMAT_VERSION {
            sm.insert("requires_upgrade".into(), "true".into());
        } else {
            sm.remove("requires_upgrade");
        }
        t.set(field::sr::SM_CONFIG, &sr, to_value(&sm))?;
        refresh_allowed(t, &sr)
    }))?;
    let on = sr_on(s, &sr)?;
    refresh_sizes(s, &on).await;
    // XAPI scans on plug so the VDIs appear.
    sr_scan(s, &sr).await
}

pub async fn pbd_unplug(s: &Arc<Server>, pbd: &str) -> Result<(), ApiError> {
    let sr =
        s.db.read()
            .get_str(field::pbd::SR, pbd)
            .ok_or_else(|| ApiError::handle_invalid("PBD", pbd))?;
    {
        let st = s.db.read();
        let in_use: Vec<String> = vdis_of(&st, &sr)
            .into_iter()
            .filter(|v| vdi_attached(&st, v))
            .collect();
        if let Some(v) = in_use.first() {
            return Err(ApiError::new("VDI_IN_USE", [v.as_str(), "unplug"]));
        }
    }
    let on = sr_on(s, &sr)?;
    let _l = sr_lock(s, &on.uuid).await;
    let (d, ctx) = (on.driver, on.ctx.clone());
    blocking(move || d.detach(&ctx))
        .await?
        .map_err(|e| storage_error(47, &sr, e))?;
    db(s.db.write(|t| {
        t.set(field::pbd::CURRENTLY_ATTACHED, pbd, Value::Bool(false))?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// VDI

pub(crate) async fn vdi_create(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let given = create_fields(class::VDI, &args)?;
    let get = |f: corral_model::FieldId| given_field(&given, f);
    let sr = get(field::vdi::SR)
        .map(|v| v.db_string())
        .unwrap_or_default();
    let size = get(field::vdi::VIRTUAL_SIZE)
        .and_then(|v| v.as_int())
        .unwrap_or(0);
    // `attached` answers HANDLE_INVALID for a bad SR before any storage work;
    // the other references are checked in the transaction.
    let on = attached(&s, &sr)?;
    if !has_cap(&on, "VDI_CREATE") {
        return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr.as_str()]));
    }
    if size <= 0 {
        return Err(ApiError::invalid_value("virtual_size", &size.to_string()));
    }
    let _l = sr_lock(&s, &on.uuid).await;
    let (d, ctx, v) = (on.driver, on.ctx.clone(), on.format_version);
    let info = blocking(move || d.vdi_create(&ctx, size, v))
        .await?
        .map_err(|e| storage_error(78, &sr, e))?;
    let r = new_ref();
    let created = s.db.write(|t| {
        let mut fields = vdi_fields(&sr, &info, "", "", "user");
        for (i, val) in &given {
            if ![
                field::vdi::VIRTUAL_SIZE.index,
                field::vdi::SR.index,
                field::vdi::LOCATION.index,
            ]
            .contains(i)
            {
                fields.push((*i, val.clone()));
            }
        }
        // The record's sm_config keeps what the caller gave; the image's
        // format is the storage layer's and is not recorded here.
        let mut sm = strmap(&get(field::vdi::SM_CONFIG).unwrap_or(Value::Nil));
        sm.remove("image-format");
        fields.push((field::vdi::SM_CONFIG.index, to_value(&sm)));
        check_refs(t, class::VDI, &fields)?;
        t.create(class::VDI, &r, fields)?;
        refresh_allowed(t, &sr)
    });
    if let Err(e) = created {
        let (d, ctx, loc) = (on.driver, on.ctx.clone(), info.location.clone());
        let _ = blocking(move || d.vdi_delete(&ctx, &loc)).await;
        return Err(e.into());
    }
    refresh_sizes(&s, &on).await;
    Ok(Value::String(r))
}

/// A field of a create call's record, as `create_fields` parsed it.
fn given_field(given: &[(usize, Value)], f: corral_model::FieldId) -> Option<Value> {
    given
        .iter()
        .find(|(i, _)| *i == f.index)
        .map(|(_, v)| v.clone())
}

struct VdiOn {
    on: SrOn,
    location: String,
    managed: bool,
}

fn vdi_on(s: &Server, vdi: &str) -> Result<VdiOn, ApiError> {
    let (sr, location, managed) = {
        let st = s.db.read();
        if !st.exists(class::VDI, vdi) {
            return Err(ApiError::handle_invalid("VDI", vdi));
        }
        (
            st.get_str(field::vdi::SR, vdi).unwrap_or_default(),
            st.get_str(field::vdi::LOCATION, vdi).unwrap_or_default(),
            st.get(field::vdi::MANAGED, vdi)
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
        )
    };
    Ok(VdiOn {
        on: attached(s, &sr)?,
        location,
        managed,
    })
}

/// The SR lock for a VDI's SR, then the VDI's state as it is under that lock
/// (garbage collection may have moved its image while we waited).
async fn vdi_locked(
    s: &Server,
    vdi: &str,
) -> Result<(tokio::sync::OwnedMutexGuard<()>, VdiOn), ApiError> {
    let sr_uuid = vdi_on(s, vdi)?.on.uuid;
    let guard = sr_lock(s, &sr_uuid).await;
    Ok((guard, vdi_on(s, vdi)?))
}

pub(crate) async fn vdi_destroy(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let vdi = first(p);
    let (_l, v) = vdi_locked(&s, &vdi).await?;
    if !v.managed {
        return Err(ApiError::new("VDI_NOT_MANAGED", [vdi.as_str()]));
    }
    if !has_cap(&v.on, "VDI_DELETE") {
        return Err(ApiError::new(
            "SR_OPERATION_NOT_SUPPORTED",
            [v.on.sr.as_str()],
        ));
    }
    {
        let st = s.db.read();
        vdi_busy(&st, &vdi, "destroy")?;
        if vdi_attached(&st, &vdi) {
            return Err(ApiError::new("VDI_IN_USE", [vdi.as_str(), "destroy"]));
        }
    }
    // Database first: once the record is gone nothing can use the image; a
    // crash before the file is deleted leaves an orphan that scan adopts.
    db(s.db.write(|t| {
        let st = t.state();
        let vbds: Vec<String> = st
            .refs(class::VBD)
            .filter(|b| st.get_str(field::vbd::VDI, b).as_deref() == Some(vdi.as_str()))
            .cloned()
            .collect();
        for b in vbds {
            t.delete(class::VBD, &b)?;
        }
        // Snapshots of this VDI stay, pointing nowhere (as in XAPI).
        let snaps: Vec<String> = t
            .state()
            .refs(class::VDI)
            .filter(|x| {
                t.state().get_str(field::vdi::SNAPSHOT_OF, x).as_deref() == Some(vdi.as_str())
            })
            .cloned()
            .collect();
        for x in snaps {
            t.set(field::vdi::SNAPSHOT_OF, &x, Value::str(NULL_REF))?;
        }
        t.delete(class::VDI, &vdi)?;
        refresh_allowed(t, &v.on.sr)
    }))?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    blocking(move || d.vdi_delete(&ctx, &loc))
        .await?
        .map_err(|e| storage_error(80, &v.on.sr, e))?;
    drop(_l);
    refresh_sizes(&s, &v.on).await;
    spawn_gc(&s, &v.on.sr);
    void()
}

/// Length of the backing chain under `location` (1 = no parent).
fn chain_len(d: &dyn Driver, ctx: &SrCtx, location: &str) -> Result<usize, StorageError> {
    let mut n = 1;
    let mut cur = d.vdi_info(ctx, location)?;
    while let Some(p) = cur.parent.clone() {
        n += 1;
        if n > MAX_CHAIN + 1 {
            break;
        }
        cur = d.vdi_info(ctx, &p)?;
    }
    Ok(n)
}

/// `VDI.snapshot` and `VDI.clone`: the VDI's current image becomes a hidden
/// read-only base copy; the VDI moves to a new empty image on top of it, and
/// the snapshot (or clone) is a second new image on top of it. Instant, and
/// nothing is copied.
async fn vdi_snapshot(s: &Arc<Server>, vdi: &str, is_snapshot: bool) -> ApiResult {
    let (_l, v) = vdi_locked(s, vdi).await?;
    let (op, cap, code) = if is_snapshot {
        ("snapshot", "VDI_SNAPSHOT", 82)
    } else {
        ("clone", "VDI_CLONE", 81)
    };
    if !v.managed {
        return Err(ApiError::new("VDI_NOT_MANAGED", [vdi]));
    }
    if !has_cap(&v.on, cap) {
        return Err(ApiError::new(
            "SR_OPERATION_NOT_SUPPORTED",
            [v.on.sr.as_str()],
        ));
    }
    if v.on.format_version < FORMAT_VERSION {
        return Err(ApiError::new("SR_REQUIRES_UPGRADE", [v.on.sr.as_str()]));
    }
    vdi_busy(&s.db.read(), vdi, op)?;
    let _g = OpGuard::start(s, &v.on.sr, Some(vdi), &format!("vdi_{op}"), op)?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    let journal = Journal::open(s, &v.on.uuid, &[])?;
    let jpath = journal.path.clone();
    let made = blocking(
        move || -> Result<(VdiInfo, VdiInfo, VdiInfo), StorageError> {
            if chain_len(d, &ctx, &loc)? >= MAX_CHAIN {
                return Err(StorageError::backend(
                    109,
                    "The snapshot chain is too long",
                    loc,
                ));
            }
            let j = Journal { path: jpath };
            let base = d.vdi_info(&ctx, &loc)?;
            let leaf = d.vdi_child(&ctx, &loc)?;
            j.add(&leaf.location);
            let copy = match d.vdi_child(&ctx, &loc) {
                Ok(c) => c,
                Err(e) => {
                    let _ = d.vdi_delete(&ctx, &leaf.location);
                    return Err(e);
                }
            };
            j.add(&copy.location);
            Ok((base, leaf, copy))
        },
    )
    .await?;
    let (base, leaf, copy) = match made {
        Ok(x) => x,
        Err(e) => {
            journal.close();
            return Err(storage_error(code, &v.on.sr, e));
        }
    };
    let base_ref = new_ref();
    let new_ref_ = new_ref();
    let old_sm_config =
        s.db.read()
            .get(field::vdi::SM_CONFIG, vdi)
            .unwrap_or(Value::Struct(vec![]));
    let committed = s.db.write(|t| {
        let st = t.state();
        let row = st
            .row(class::VDI, vdi)
            .ok_or_else(|| ApiError::handle_invalid("VDI", vdi))?;
        let orig: Vec<Value> = row.fields.clone();
        let get = |f: corral_model::FieldId| orig[f.index].clone();
        let old_sm = strmap(&get(field::vdi::SM_CONFIG));
        let base_uuid = corral_model::new_uuid();
        // The hidden base copy keeps the old image and its place in the chain.
        let mut bf = vdi_fields(
            &v.on.sr,
            &base,
            "base copy",
            "",
            &get(field::vdi::TYPE_).db_string(),
        );
        bf.push((field::vdi::UUID.index, Value::str(&base_uuid)));
        bf.push((field::vdi::MANAGED.index, Value::Bool(false)));
        bf.push((field::vdi::READ_ONLY.index, Value::Bool(true)));
        let mut bsm = strmap(&sm_config_for(None));
        if let Some(pp) = old_sm.get("vhd-parent") {
            bsm.insert("vhd-parent".into(), pp.clone());
        }
        bf.push((field::vdi::SM_CONFIG.index, to_value(&bsm)));
        t.create(class::VDI, &base_ref, bf)?;
        // The VDI itself now lives in the new leaf.
        t.set(field::vdi::LOCATION, vdi, Value::str(&leaf.location))?;
        t.set(
            field::vdi::PHYSICAL_UTILISATION,
            vdi,
            Value::Int(leaf.physical_utilisation),
        )?;
        t.set(field::vdi::SM_CONFIG, vdi, sm_config_for(Some(&base_uuid)))?;
        // The snapshot or clone: same metadata, its own image.
        let mut nf: Vec<(usize, Value)> = orig.iter().cloned().enumerate().collect();
        let set = |nf: &mut Vec<(usize, Value)>, f: corral_model::FieldId, val: Value| {
            nf[f.index].1 = val
        };
        set(&mut nf, field::vdi::UUID, Value::str(""));
        set(&mut nf, field::vdi::LOCATION, Value::str(&copy.location));
        set(
            &mut nf,
            field::vdi::PHYSICAL_UTILISATION,
            Value::Int(copy.physical_utilisation),
        );
        set(
            &mut nf,
            field::vdi::SM_CONFIG,
            sm_config_for(Some(&base_uuid)),
        );
        set(
            &mut nf,
            field::vdi::CURRENT_OPERATIONS,
            Value::Struct(vec![]),
        );
        set(&mut nf, field::vdi::MANAGED, Value::Bool(true));
        set(&mut nf, field::vdi::IS_A_SNAPSHOT, Value::Bool(is_snapshot));
        set(
            &mut nf,
            field::vdi::SNAPSHOT_OF,
            Value::str(if is_snapshot { vdi } else { NULL_REF }),
        );
        set(
            &mut nf,
            field::vdi::SNAPSHOT_TIME,
            Value::DateTime(if is_snapshot {
                date::now()
            } else {
                "19700101T00:00:00Z".into()
            }),
        );
        t.create(class::VDI, &new_ref_, nf)?;
        Ok(())
    });
    journal.close();
    let undo_images = || {
        let (d, ctx) = (v.on.driver, v.on.ctx.clone());
        let (a, b) = (leaf.location.clone(), copy.location.clone());
        blocking(move || {
            let _ = d.vdi_delete(&ctx, &a);
            let _ = d.vdi_delete(&ctx, &b);
        })
    };
    if let Err(e) = committed {
        let _ = undo_images().await;
        return Err(e.into());
    }
    // A disk a running guest writes: QEMU moves to the new leaf in one
    // step, so the base (now the snapshot's) holds exactly what was
    // written before. The records went first: a crash before the switch
    // leaves QEMU on the base, which start-up finds and switches (no
    // write is lost either way).
    if let Some((vm, drive)) = crate::vm::plugged_rw_drive(s, vdi) {
        let switched = async {
            let (d, ctx, l) = (v.on.driver, v.on.ctx.clone(), leaf.location.clone());
            let overlay = blocking(move || d.vdi_image(&ctx, &l))
                .await?
                .map_err(|e| storage_error(code, &v.on.sr, e))?;
            s.agent
                .drive_switch_to_overlay(&vm, &drive, &overlay.path)
                .await
                .map_err(|e| {
                    storage_error(
                        code,
                        &v.on.sr,
                        StorageError::Tool(format!("QEMU did not switch to the new image: {e}")),
                    )
                })
        }
        .await;
        if let Err(e) = switched {
            // Back to the records before the snapshot, then the images go.
            let _ = s.db.write(|t| {
                t.set(field::vdi::LOCATION, vdi, Value::str(&v.location))?;
                t.set(field::vdi::SM_CONFIG, vdi, old_sm_config.clone())?;
                for r in [&base_ref, &new_ref_] {
                    if t.state().exists(class::VDI, r) {
                        t.delete(class::VDI, r)?;
                    }
                }
                Ok(())
            });
            let _ = undo_images().await;
            return Err(e);
        }
    }
    drop(_g);
    refresh_sizes(s, &v.on).await;
    Ok(Value::String(new_ref_))
}

async fn vdi_resize(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let vdi = pstr(&mut p);
    let size = p.next().and_then(|v| v.as_int()).unwrap_or(0);
    let (_l, v) = vdi_locked(&s, &vdi).await?;
    if !v.managed {
        return Err(ApiError::new("VDI_NOT_MANAGED", [vdi.as_str()]));
    }
    if !has_cap(&v.on, "VDI_RESIZE") {
        return Err(ApiError::new(
            "SR_OPERATION_NOT_SUPPORTED",
            [v.on.sr.as_str()],
        ));
    }
    let current =
        s.db.read()
            .get(field::vdi::VIRTUAL_SIZE, &vdi)
            .and_then(|x| x.as_int())
            .unwrap_or(0);
    if size < current {
        return Err(storage_error(
            79,
            &v.on.sr,
            StorageError::backend(
                79,
                "VDI Invalid size",
                format!("shrinking from {current} to {size} is not allowed"),
            ),
        ));
    }
    vdi_busy(&s.db.read(), &vdi, "resize")?;
    let _g = OpGuard::start(&s, &v.on.sr, Some(&vdi), "vdi_resize", "resize")?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    let info = if let Some((vm, drive)) = crate::vm::plugged_drive(&s, &vdi) {
        // Online: QEMU owns the image while the guest runs, so QEMU grows it
        // (the guest sees the new size at once).
        s.agent.drive_resize(&vm, &drive, size).await.map_err(|e| {
            storage_error(
                79,
                &v.on.sr,
                StorageError::backend(79, "VDI Invalid size", e.to_string()),
            )
        })?;
        blocking(move || d.vdi_info(&ctx, &loc)).await?
    } else {
        blocking(move || d.vdi_resize(&ctx, &loc, size)).await?
    }
    .map_err(|e| storage_error(79, &v.on.sr, e))?;
    db(s.db.write(|t| write_vdi_sizes(t, &vdi, &info)))?;
    drop(_g);
    refresh_sizes(&s, &v.on).await;
    void()
}

/// `VDI.copy(vdi, sr, base_vdi, into_vdi)`: a full copy of the VDI's data
/// (its whole chain) into a new standalone image on `sr` (default: the same
/// SR), or into the existing `into_vdi`. `base_vdi` is accepted and ignored:
/// the copy is always full.
async fn vdi_copy(s: Arc<Server>, c: Ctx, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let vdi = pstr(&mut p);
    let dest_sr = p
        .next()
        .map(|v| v.db_string())
        .filter(|r| !r.is_empty() && r != NULL_REF);
    let _base = p.next();
    let into = p
        .next()
        .map(|v| v.db_string())
        .filter(|r| !r.is_empty() && r != NULL_REF);
    // Held for the whole copy: garbage collection must not move the source's
    // image while qemu-img reads it.
    let (_src_lock, src) = vdi_locked(&s, &vdi).await?;
    if crate::vm::plugged_rw_drive(&s, &vdi).is_some() {
        return Err(ApiError::new("VDI_IN_USE", [vdi.as_str(), "copy"]));
    }
    let src_image = {
        let (d, ctx, loc) = (src.on.driver, src.on.ctx.clone(), src.location.clone());
        d.vdi_image(&ctx, &loc)
            .map_err(|e| storage_error(1, &src.on.sr, e))?
    };
    if let Some(task) = &c.task {
        s.task_progress(task, 0.0);
    }
    if let Some(into) = into {
        if crate::vm::plugged_rw_drive(&s, &into).is_some() {
            return Err(ApiError::new("VDI_IN_USE", [into.as_str(), "copy"]));
        }
        let dst = vdi_on(&s, &into)?;
        let (src_size, dst_size) = {
            let st = s.db.read();
            (
                st.get(field::vdi::VIRTUAL_SIZE, &vdi)
                    .and_then(|x| x.as_int())
                    .unwrap_or(0),
                st.get(field::vdi::VIRTUAL_SIZE, &into)
                    .and_then(|x| x.as_int())
                    .unwrap_or(0),
            )
        };
        if dst_size < src_size {
            return Err(ApiError::new(
                "VDI_TOO_SMALL",
                [into.clone(), src_size.to_string()],
            ));
        }
        let dst_image = dst
            .on
            .driver
            .vdi_image(&dst.on.ctx, &dst.location)
            .map_err(|e| storage_error(1, &dst.on.sr, e))?;
        let _g = OpGuard::start(&s, &dst.on.sr, Some(&into), "vdi_copy", "copy")?;
        blocking(move || {
            corral_storage::qemu_img::QemuImg::default().convert_into(&src_image, &dst_image)
        })
        .await?
        .map_err(|e| storage_error(1, &dst.on.sr, e))?;
        return Ok(Value::String(into));
    }
    let dest_sr = dest_sr.unwrap_or_else(|| src.on.sr.clone());
    let dst = attached(&s, &dest_sr)?;
    if !has_cap(&dst, "VDI_CREATE") {
        return Err(ApiError::new(
            "SR_OPERATION_NOT_SUPPORTED",
            [dest_sr.as_str()],
        ));
    }
    let _g = OpGuard::start(&s, &dst.sr, None, "vdi_copy", "")?;
    // Journalled before the copy starts: a crash mid-copy leaves a partial
    // image that start-up deletes rather than adopts.
    let loc = corral_storage::new_location();
    let journal = Journal::open(&s, &dst.uuid, &[&loc])?;
    let (d, ctx) = (dst.driver, dst.ctx.clone());
    let info = blocking(move || d.vdi_import_from(&ctx, &loc, &src_image)).await?;
    let info = match info {
        Ok(i) => i,
        Err(e) => {
            journal.close();
            return Err(storage_error(1, &dest_sr, e));
        }
    };
    let r = new_ref();
    let committed = s.db.write(|t| {
        let st = t.state();
        let row = st
            .row(class::VDI, &vdi)
            .ok_or_else(|| ApiError::handle_invalid("VDI", &vdi))?;
        let orig = row.fields.clone();
        let mut f = vdi_fields(
            &dest_sr,
            &info,
            &orig[field::vdi::NAME_LABEL.index].db_string(),
            &orig[field::vdi::NAME_DESCRIPTION.index].db_string(),
            &orig[field::vdi::TYPE_.index].db_string(),
        );
        f.push((
            field::vdi::OTHER_CONFIG.index,
            orig[field::vdi::OTHER_CONFIG.index].clone(),
        ));
        f.push((
            field::vdi::SHARABLE.index,
            orig[field::vdi::SHARABLE.index].clone(),
        ));
        t.create(class::VDI, &r, f)?;
        refresh_allowed(t, &dest_sr)
    });
    journal.close();
    if let Err(e) = committed {
        let (d, ctx, loc) = (dst.driver, dst.ctx.clone(), info.location.clone());
        let _ = blocking(move || d.vdi_delete(&ctx, &loc)).await;
        return Err(e.into());
    }
    if let Some(task) = &c.task {
        s.task_progress(task, 1.0);
    }
    drop(_g);
    refresh_sizes(&s, &dst).await;
    Ok(Value::String(r))
}

/// VDI.clone for VM.clone: the new VDI's reference.
pub(crate) async fn vdi_clone_of(s: &Arc<Server>, vdi: &str) -> Result<String, ApiError> {
    Ok(vdi_snapshot(s, vdi, false).await?.db_string())
}

/// VDI.copy onto `sr` for VM.copy: the new VDI's reference.
pub(crate) async fn vdi_copy_to(
    s: &Arc<Server>,
    c: &Ctx,
    vdi: &str,
    sr: &str,
) -> Result<String, ApiError> {
    Ok(vdi_copy(
        Arc::clone(s),
        c.clone(),
        vec![Value::str(vdi), Value::str(sr)],
    )
    .await?
    .db_string())
}

async fn vdi_introduce(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let p: Vec<Value> = p;
    let get = |i: usize| p.get(i).cloned().unwrap_or(Value::Nil);
    let uuid = get(0).db_string();
    let (name, descr, sr) = (get(1).db_string(), get(2).db_string(), get(3).db_string());
    let ty = get(4).db_string();
    let (sharable, read_only) = (
        get(5).as_bool().unwrap_or(false),
        get(6).as_bool().unwrap_or(false),
    );
    let other_config = get(7);
    let location = get(8).db_string();
    let on = attached(&s, &sr)?;
    if !has_cap(&on, "VDI_INTRODUCE") {
        return Err(ApiError::new("SR_OPERATION_NOT_SUPPORTED", [sr.as_str()]));
    }
    let (d, ctx, loc) = (on.driver, on.ctx.clone(), location.clone());
    let info = blocking(move || d.vdi_info(&ctx, &loc))
        .await?
        .map_err(|e| storage_error(1, &sr, e))?;
    let r = new_ref();
    db(s.db.write(|t| {
        let st = t.state();
        if vdis_of(st, &sr)
            .iter()
            .any(|v| st.get_str(field::vdi::LOCATION, v).as_deref() == Some(location.as_str()))
        {
            return Err(ApiError::new(
                "SR_BACKEND_FAILURE_1",
                [
                    "",
                    "A VDI with this location already exists",
                    location.as_str(),
                ],
            ));
        }
        let mut f = vdi_fields(
            &sr,
            &info,
            &name,
            &descr,
            if ty.is_empty() { "user" } else { &ty },
        );
        if !uuid.is_empty() {
            f.push((field::vdi::UUID.index, Value::str(&uuid)));
        }
        f.push((field::vdi::SHARABLE.index, Value::Bool(sharable)));
        f.push((
            field::vdi::READ_ONLY.index,
            Value::Bool(read_only || info.read_only),
        ));
        f.push((
            field::vdi::OTHER_CONFIG.index,
            if other_config.as_struct().is_some() {
                other_config.clone()
            } else {
                Value::Struct(vec![])
            },
        ));
        t.create(class::VDI, &r, f)?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(Value::String(r))
}

fn vdi_forget(s: &Server, p: Vec<Value>) -> ApiResult {
    let vdi = first(p);
    db(s.db.write(|t| {
        let sr = t
            .state()
            .get_str(field::vdi::SR, &vdi)
            .ok_or_else(|| ApiError::handle_invalid("VDI", &vdi))?;
        if vdi_attached(t.state(), &vdi) {
            return Err(ApiError::new("VDI_IN_USE", [vdi.as_str(), "forget"]));
        }
        t.delete(class::VDI, &vdi)?;
        refresh_allowed(t, &sr)
    }))?;
    void()
}

/// A VDI's sizes as the storage reports them.
fn write_vdi_sizes(t: &mut Txn<'_>, vdi: &str, info: &VdiInfo) -> Result<(), ApiError> {
    t.set(field::vdi::VIRTUAL_SIZE, vdi, Value::Int(info.virtual_size))?;
    t.set(
        field::vdi::PHYSICAL_UTILISATION,
        vdi,
        Value::Int(info.physical_utilisation),
    )
}

async fn vdi_update(s: Arc<Server>, p: Vec<Value>) -> ApiResult {
    let vdi = first(p);
    let v = vdi_on(&s, &vdi)?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    let info = blocking(move || d.vdi_info(&ctx, &loc))
        .await?
        .map_err(|e| storage_error(1, &v.on.sr, e))?;
    db(s.db.write(|t| write_vdi_sizes(t, &vdi, &info)))?;
    void()
}

/// A VDI's image with its pinned format, for the transfer handlers and QEMU;
/// `st` is the caller's read lock.
pub fn vdi_image(
    s: &Server,
    st: &corral_db::State,
    sr: &str,
    location: &str,
) -> Result<Image, ApiError> {
    let on = attached_on(sr_on_in(s, st, sr)?)?;
    on.driver
        .vdi_image(&on.ctx, location)
        .map_err(|e| storage_error(1, sr, e))
}

/// Re-reads a VDI's sizes (after an import wrote into it).
pub async fn refresh_vdi(s: &Arc<Server>, vdi: &str) {
    if let Ok(v) = vdi_on(s, vdi) {
        let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
        if let Ok(Ok(info)) = blocking(move || d.vdi_info(&ctx, &loc)).await {
            let _ = s.db.write(|t| {
                t.set(
                    field::vdi::PHYSICAL_UTILISATION,
                    vdi,
                    Value::Int(info.physical_utilisation),
                )
            });
        }
        refresh_sizes(s, &v.on).await;
    }
}

// ---------------------------------------------------------------------------
// Garbage collection: coalescing chains after deletes.

/// The child's sm_config once its base copy is merged away: the child now
/// sits on whatever the base sat on.
fn sm_config_after_merge(
    st: &corral_db::State,
    base: &str,
    child: &str,
) -> BTreeMap<String, String> {
    let base_sm = strmap(&st.get(field::vdi::SM_CONFIG, base).unwrap_or(Value::Nil));
    let mut csm = strmap(&st.get(field::vdi::SM_CONFIG, child).unwrap_or(Value::Nil));
    match base_sm.get("vhd-parent") {
        Some(p) => csm.insert("vhd-parent".into(), p.clone()),
        None => csm.remove("vhd-parent"),
    };
    csm
}

fn spawn_gc(s: &Arc<Server>, sr: &str) {
    let (s, sr) = (Arc::clone(s), sr.to_owned());
    tokio::spawn(async move {
        if let Err(e) = gc(&s, &sr).await {
            tracing::warn!(sr = %sr, error = %e, "storage garbage collection");
        }
    });
}

/// Removes base copies nothing depends on, and merges each base copy that
/// has exactly one child into that child (`qemu-img commit`, then the child
/// takes over the base's image). Never loses a block: the child stays a
/// valid view of the same data until the database points at the merged
/// image, and only then is the child's old image deleted.
pub async fn gc(s: &Arc<Server>, sr: &str) -> Result<(), ApiError> {
    loop {
        let on = attached(s, sr)?;
        let _l = sr_lock(s, &on.uuid).await;
        let (d, ctx) = (on.driver, on.ctx.clone());
        let images = blocking(move || d.scan(&ctx))
            .await?
            .map_err(|e| storage_error(40, sr, e))?;
        let (bases, by_loc) = {
            let st = s.db.read();
            let vdis = vdis_of(&st, sr);
            let by_loc: HashMap<String, String> = vdis
                .iter()
                .filter_map(|v| Some((st.get_str(field::vdi::LOCATION, v)?, v.clone())))
                .collect();
            let bases: Vec<(String, String)> = vdis
                .iter()
                .filter(|v| {
                    !st.get(field::vdi::MANAGED, v)
                        .and_then(|x| x.as_bool())
                        .unwrap_or(true)
                })
                .filter_map(|v| Some((v.clone(), st.get_str(field::vdi::LOCATION, v)?)))
                .collect();
            (bases, by_loc)
        };
        let mut progressed = false;
        for (base, base_loc) in bases {
            let children: Vec<&VdiInfo> = images
                .iter()
                .filter(|i| i.parent.as_deref() == Some(base_loc.as_str()))
                .collect();
            match children.as_slice() {
                [] => {
                    db(s.db.write(|t| {
                        t.delete(class::VDI, &base)?;
                        refresh_allowed(t, sr)
                    }))?;
                    let (d, ctx, loc) = (on.driver, on.ctx.clone(), base_loc.clone());
                    blocking(move || d.vdi_delete(&ctx, &loc))
                        .await?
                        .map_err(|e| storage_error(80, sr, e))?;
                    progressed = true;
                }
                [child] => {
                    let Some(child_ref) = by_loc.get(&child.location).cloned() else {
                        continue;
                    };
                    if vdi_attached(&s.db.read(), &child_ref) {
                        continue;
                    }
                    if !on.driver.merges_by_commit() {
                        // Pull the base's data into the child; then the base
                        // has no children and goes on the next pass.
                        let grandparent = images
                            .iter()
                            .find(|i| i.location == base_loc)
                            .and_then(|i| i.parent.clone());
                        let (d, ctx, loc, gp) = (
                            on.driver,
                            on.ctx.clone(),
                            child.location.clone(),
                            grandparent.clone(),
                        );
                        blocking(move || d.vdi_pull_parent(&ctx, &loc, gp.as_deref()))
                            .await?
                            .map_err(|e| storage_error(1, sr, e))?;
                        db(s.db.write(|t| {
                            let csm = sm_config_after_merge(t.state(), &base, &child_ref);
                            t.set(field::vdi::SM_CONFIG, &child_ref, to_value(&csm))
                        }))?;
                        progressed = true;
                        break;
                    }
                    let journal = Journal::open(s, &on.uuid, &[&child.location])?;
                    // The child's own children (when it is a base copy too)
                    // must follow it onto the merged image.
                    let grandchildren: Vec<String> = images
                        .iter()
                        .filter(|i| i.parent.as_deref() == Some(child.location.as_str()))
                        .map(|i| i.location.clone())
                        .collect();
                    let (d, ctx, loc, bl) = (
                        on.driver,
                        on.ctx.clone(),
                        child.location.clone(),
                        base_loc.clone(),
                    );
                    blocking(move || -> Result<(), StorageError> {
                        d.vdi_commit(&ctx, &loc)?;
                        // Now the base holds exactly the child's view.
                        for g in &grandchildren {
                            d.vdi_set_parent(&ctx, g, &bl)?;
                        }
                        Ok(())
                    })
                    .await?
                    .map_err(|e| storage_error(1, sr, e))?;
                    let (d, ctx, bl) = (on.driver, on.ctx.clone(), base_loc.clone());
                    let merged = blocking(move || d.vdi_info(&ctx, &bl))
                        .await?
                        .map_err(|e| storage_error(1, sr, e))?;
                    db(s.db.write(|t| {
                        let csm = sm_config_after_merge(t.state(), &base, &child_ref);
                        t.set(field::vdi::LOCATION, &child_ref, Value::str(&base_loc))?;
                        t.set(field::vdi::SM_CONFIG, &child_ref, to_value(&csm))?;
                        t.set(
                            field::vdi::PHYSICAL_UTILISATION,
                            &child_ref,
                            Value::Int(merged.physical_utilisation),
                        )?;
                        t.delete(class::VDI, &base)?;
                        refresh_allowed(t, sr)
                    }))?;
                    let (d, ctx, loc) = (on.driver, on.ctx.clone(), child.location.clone());
                    blocking(move || d.vdi_delete(&ctx, &loc))
                        .await?
                        .map_err(|e| storage_error(80, sr, e))?;
                    journal.close();
                    progressed = true;
                }
                _ => {}
            }
            if progressed {
                break;
            }
        }
        drop(_l);
        if !progressed {
            refresh_sizes(s, &on).await;
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// VBD

fn vbd_create(s: &Server, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let mut given = create_fields(class::VBD, &args)?;
    let get = given_field;
    let vm = get(&given, field::vbd::VM)
        .map(|v| v.db_string())
        .unwrap_or_default();
    let vdi = get(&given, field::vbd::VDI)
        .map(|v| v.db_string())
        .unwrap_or_else(|| NULL_REF.into());
    let empty = get(&given, field::vbd::EMPTY)
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let ty = get(&given, field::vbd::TYPE_)
        .map(|v| v.db_string())
        .unwrap_or_else(|| "Disk".into());
    let mode = get(&given, field::vbd::MODE)
        .map(|v| v.db_string())
        .unwrap_or_else(|| "RW".into());
    let r = new_ref();
    db(s.db.write(|t| {
        check_refs(t, class::VBD, &given)?;
        let st = t.state();
        if !st.exists(class::VM, &vm) {
            return Err(ApiError::handle_invalid("VM", &vm));
        }
        if !empty && vdi == NULL_REF {
            return Err(ApiError::handle_invalid("VDI", &vdi));
        }
        if empty && ty != "CD" {
            return Err(ApiError::new("VBD_NOT_REMOVABLE_MEDIA", [r.as_str()]));
        }
        if !empty {
            let ro = crate::vm::vdi_read_only(st, &vdi);
            if ro && mode == "RW" && ty == "Disk" {
                return Err(ApiError::new("VDI_READONLY", [vdi.as_str()]));
            }
            if !st
                .get(field::vdi::MANAGED, &vdi)
                .and_then(|v| v.as_bool())
                .unwrap_or(true)
            {
                return Err(ApiError::new("VDI_NOT_MANAGED", [vdi.as_str()]));
            }
        }
        // userdevice: unique per VM; "autodetect" takes the lowest free slot.
        let used: HashSet<String> = st
            .refs(class::VBD)
            .filter(|b| st.get_str(field::vbd::VM, b).as_deref() == Some(vm.as_str()))
            .filter_map(|b| st.get_str(field::vbd::USERDEVICE, b))
            .collect();
        let mut userdevice = get(&given, field::vbd::USERDEVICE)
            .map(|v| v.db_string())
            .unwrap_or_default();
        if userdevice.is_empty() || userdevice == "autodetect" {
            userdevice = (0..)
                .map(|i: u32| i.to_string())
                .find(|d| !used.contains(d))
                .unwrap_or_default();
        } else if used.contains(&userdevice) {
            return Err(ApiError::new(
                "DEVICE_ALREADY_EXISTS",
                [userdevice.as_str()],
            ));
        }
        given.retain(|(i, _)| {
            *i != field::vbd::USERDEVICE.index && *i != field::vbd::CURRENTLY_ATTACHED.index
        });
        given.push((field::vbd::USERDEVICE.index, Value::String(userdevice)));
        given.push((field::vbd::CURRENTLY_ATTACHED.index, Value::Bool(false)));
        if empty {
            given.retain(|(i, _)| *i != field::vbd::VDI.index);
            given.push((field::vbd::VDI.index, Value::str(NULL_REF)));
        }
        given.push((
            field::vbd::ALLOWED_OPERATIONS.index,
            vbd_allowed(&ty, empty),
        ));
        t.create(class::VBD, &r, given.clone())
    }))?;
    Ok(Value::String(r))
}

fn vbd_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
    let vbd = first(p);
    db(s.db.write(|t| {
        assert_detached(t.state(), field::vbd::CURRENTLY_ATTACHED, &vbd)?;
        t.delete(class::VBD, &vbd)
    }))?;
    void()
}

pub(crate) fn vbd_insert(s: &Server, p: Vec<Value>) -> ApiResult {
    let mut p = p.into_iter();
    let (vbd, vdi) = (pstr(&mut p), pstr(&mut p));
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        if !st.exists(class::VDI, &vdi) {
            return Err(ApiError::handle_invalid("VDI", &vdi));
        }
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("CD") {
            return Err(ApiError::new("VBD_NOT_REMOVABLE_MEDIA", [vbd.as_str()]));
        }
        if !st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(true)
        {
            return Err(ApiError::new("VBD_NOT_EMPTY", [vbd.as_str()]));
        }
        t.set(field::vbd::VDI, &vbd, Value::str(&vdi))?;
        t.set(
            field::vbd::ALLOWED_OPERATIONS,
            &vbd,
            vbd_allowed("CD", false),
        )?;
        t.set(field::vbd::EMPTY, &vbd, Value::Bool(false))
    }))?;
    void()
}

pub(crate) fn vbd_eject(s: &Server, p: Vec<Value>) -> ApiResult {
    let vbd = first(p);
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VBD, &vbd) {
            return Err(ApiError::handle_invalid("VBD", &vbd));
        }
        if st.get_str(field::vbd::TYPE_, &vbd).as_deref() != Some("CD") {
            return Err(ApiError::new("VBD_NOT_REMOVABLE_MEDIA", [vbd.as_str()]));
        }
        if st
            .get(field::vbd::EMPTY, &vbd)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
        {
            return Err(ApiError::new("VBD_IS_EMPTY", [vbd.as_str()]));
        }
        t.set(field::vbd::VDI, &vbd, Value::str(NULL_REF))?;
        t.set(
            field::vbd::ALLOWED_OPERATIONS,
            &vbd,
            vbd_allowed("CD", true),
        )?;
        t.set(field::vbd::EMPTY, &vbd, Value::Bool(true))
    }))?;
    void()
}

/// A VBD's `allowed_operations`: only what can run (a CD takes a medium
/// when empty, gives it up when not).
pub(crate) fn vbd_allowed(ty: &str, empty: bool) -> Value {
    let ops: &[&str] = match (ty, empty) {
        ("CD", true) => &["attach", "insert"],
        ("CD", false) => &["attach", "eject"],
        _ => &["attach"],
    };
    Value::string_set(ops.iter().copied())
}

// ---------------------------------------------------------------------------
// Start-up

/// SM records follow the drivers this build has (added, updated, removed).
pub fn sync_sm_records(s: &Server) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let st = t.state();
        let existing: HashMap<String, String> = st
            .refs(class::SM)
            .filter_map(|r| Some((st.get_str(field::sm::TYPE_, r)?, r.clone())))
            .collect();
        for (kind, r) in &existing {
            if corral_storage::driver(kind).is_none() {
                t.delete(class::SM, r)?;
            }
        }
        for kind in corral_storage::driver_kinds() {
            let Some(d) = corral_storage::driver(kind) else {
                continue;
            };
            let info = d.info();
            let fields = vec![
                (field::sm::NAME_LABEL.index, Value::str(info.name)),
                (
                    field::sm::NAME_DESCRIPTION.index,
                    Value::str(info.description),
                ),
                (field::sm::TYPE_.index, Value::str(info.kind)),
                (field::sm::VENDOR.index, Value::str("Corral")),
                (
                    field::sm::COPYRIGHT.index,
                    Value::str("(C) Corral developers"),
                ),
                (field::sm::VERSION.index, Value::str("1.0")),
                (field::sm::REQUIRED_API_VERSION.index, Value::str("1.0")),
                (
                    field::sm::CONFIGURATION.index,
                    Value::Struct(
                        info.configuration
                            .iter()
                            .map(|(k, h)| ((*k).to_owned(), Value::str(*h)))
                            .collect(),
                    ),
                ),
                (
                    field::sm::CAPABILITIES.index,
                    Value::string_set(info.capabilities.iter().copied()),
                ),
                (
                    field::sm::FEATURES.index,
                    Value::Struct(
                        info.capabilities
                            .iter()
                            .map(|c| ((*c).to_owned(), Value::Int(1)))
                            .collect(),
                    ),
                ),
                (
                    field::sm::DRIVER_FILENAME.index,
                    Value::str(format!("corral-storage/{}", info.kind)),
                ),
            ];
            match existing.get(*kind) {
                Some(r) => {
                    for (i, v) in fields {
                        t.set(
                            corral_model::FieldId {
                                class: class::SM,
                                index: i,
                            },
                            r,
                            v,
                        )?;
                    }
                }
                None => t.create(class::SM, &new_ref(), fields)?,
            }
        }
        Ok(())
    }))
}

/// First start: a `file` SR "Local storage" under the state directory,
/// made the pool's default SR. Later starts: re-plug this host's PBDs that
/// were plugged (mounts do not survive a reboot) and finish interrupted
/// storage operations.
pub async fn startup(s: &Arc<Server>) -> Result<(), ApiError> {
    sync_sm_records(s)?;
    forget_dead_operations(s)?;
    recover(s);
    let dir = s.state_dir.join("local-sr");
    // The directory (or, for an `ext` local SR, the marker) exists from the
    // first start on; an SR the admin later forgets or destroys is not
    // brought back behind their back.
    let marker = s.state_dir.join("local-sr.made");
    let has_local = dir.exists() || marker.exists();
    if !has_local {
        let (kind, dc) = match &s.config.local_sr_device {
            Some(dev) => (
                "ext",
                Value::Struct(vec![("device".into(), Value::str(dev))]),
            ),
            None => (
                "file",
                Value::Struct(vec![("location".into(), Value::str(dir.to_string_lossy()))]),
            ),
        };
        let ctx = Ctx {
            session: String::new(),
            role: corral_model::Role::Root,
            user: "root".into(),
            user_ref: String::new(),
            task: None,
        };
        let sr = sr_create(
            Arc::clone(s),
            ctx,
            vec![
                Value::str(&s.host_ref),
                dc,
                Value::Int(0),
                Value::str("Local storage"),
                Value::str(""),
                Value::str(kind),
                Value::str("user"),
                Value::Bool(false),
                Value::Struct(vec![]),
            ],
        )
        .await?;
        let sr = sr.db_string();
        db(s.db.write(|t| {
            t.set(
                field::sr::OTHER_CONFIG,
                &sr,
                Value::Struct(vec![("i18n-key".into(), Value::str("local-storage"))]),
            )?;
            let pool = pool_ref(t.state());
            t.set(field::pool::DEFAULT_SR, &pool, Value::str(&sr))?;
            t.set(field::pool::SUSPEND_IMAGE_SR, &pool, Value::str(&sr))?;
            t.set(field::pool::CRASH_DUMP_SR, &pool, Value::str(&sr))
        }))?;
        if kind != "file" {
            std::fs::write(
                &marker,
                s.config.local_sr_device.as_deref().unwrap_or_default(),
            )
            .map_err(|e| ApiError::internal(format!("{}: {e}", marker.display())))?;
        }
        return Ok(());
    }
    let plugged: Vec<String> = {
        let st = s.db.read();
        st.refs(class::PBD)
            .filter(|p| st.get_str(field::pbd::HOST, p).as_deref() == Some(s.host_ref.as_str()))
            .filter(|p| {
                st.get(field::pbd::CURRENTLY_ATTACHED, p)
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false)
            })
            .cloned()
            .collect()
    };
    for p in plugged {
        if let Err(e) = pbd_plug(s, &p).await {
            tracing::warn!(pbd = %p, error = %e, "re-plugging PBD at start-up failed");
            let _ =
                s.db.write(|t| t.set(field::pbd::CURRENTLY_ATTACHED, &p, Value::Bool(false)));
        }
    }
    Ok(())
}

/// Start-up: a snapshot of a running disk whose records committed but
/// whose QEMU switch did not happen (corrald died in between) leaves the
/// guest writing the image that is now the snapshot's base. Each running
/// disk is checked against its record, and such a switch is finished.
pub async fn finish_interrupted_switches(s: &Arc<Server>) {
    let vdis: Vec<String> = s.db.read().refs(class::VDI).cloned().collect();
    for vdi in vdis {
        let Some((vm, drive)) = crate::vm::plugged_rw_drive(s, &vdi) else {
            continue;
        };
        let Ok(v) = vdi_on(s, &vdi) else { continue };
        let Ok(Some(active)) = s.agent.drive_image(&vm, &drive).await else {
            continue;
        };
        let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
        let Ok(Ok((image, info))) = blocking(move || {
            let image = d.vdi_image(&ctx, &loc)?;
            let info = d.vdi_info(&ctx, &loc)?;
            let parent = match info.parent {
                Some(p) => Some(d.vdi_image(&ctx, &p)?.path),
                None => None,
            };
            Ok::<_, StorageError>((image, parent))
        })
        .await
        else {
            continue;
        };
        if image.path != active && info.as_deref() == Some(active.as_str()) {
            match s
                .agent
                .drive_switch_to_overlay(&vm, &drive, &image.path)
                .await
            {
                Ok(()) => {
                    tracing::warn!(%vdi, "finished a snapshot interrupted before QEMU switched")
                }
                Err(e) => {
                    tracing::error!(%vdi, error = %e, "could not finish an interrupted snapshot")
                }
            }
        }
    }
}
