//! SR.create, introduce, forget, destroy, probe and upgrade; storage at start.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::marks::clear_dead;
use crate::core::records::{db, strmap, to_value};
use crate::ops::pbd::{pbd_plug, pbd_unplug};
use crate::ops::storage::backend::{attached, blocking, driver, sr_lock, sr_on};
use crate::ops::storage::journal::journal_dir;
use crate::ops::storage::records::{
    delete_secrets, pbds_of, refresh_allowed, store_secrets, sync_sm_records, vdi_attached, vdis_of,
};
use corral_db::Txn;
use corral_model::args::sr;
use corral_model::errors;
use corral_model::refs::Ref;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use corral_storage::{FORMAT_VERSION, SrCtx, StorageError};
use std::collections::HashSet;
use std::sync::Arc;

/// Operations this host had recorded on SRs, VDIs and VBDs died with its
/// old process; nothing runs them any more (another host's stay).
pub(crate) fn forget_dead_operations(s: &Server) -> Result<(), ApiError> {
    let is_master = s.is_master();
    db(s.db.write(|t| {
        for (c, f) in [
            (class::SR, field::sr::CURRENT_OPERATIONS),
            (class::VDI, field::vdi::CURRENT_OPERATIONS),
            (class::VBD, field::vbd::CURRENT_OPERATIONS),
        ] {
            let refs: Vec<String> = t.state().refs(c).cloned().collect();
            for r in refs {
                clear_dead(t, f, &r, &s.host_ref, is_master)?;
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

pub(crate) async fn sr_create(s: Arc<Server>, a: sr::Create) -> ApiResult {
    let sr::Create {
        host,
        device_config: dc,
        physical_size,
        name_label: name,
        name_description: descr,
        type_: kind,
        content_type,
        shared,
        sm_config,
    } = a;
    let host = host.into_string();
    if !s.db.read().exists(class::HOST, &host) {
        return Err(ApiError::handle_invalid("host", &host));
    }
    let d = driver(&kind)?;
    // The storage is prepared from the host asked for.
    let on = s.host(&host)?;
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
        state_dir: on.state_dir.clone(),
    };
    {
        let ctx = ctx.clone();
        blocking(move || d.create(&ctx, physical_size))
            .await?
            .map_err(|e| driver_errors::storage(78, &sr, e))?;
    }
    let hosts: Vec<String> = if shared {
        s.db.read().refs(class::HOST).cloned().collect()
    } else {
        vec![host.clone()]
    };
    let mut sm = sm_config.clone();
    sm.insert("format_version".into(), FORMAT_VERSION.to_string());
    let created = s.db.write(|t| {
        t.create(class::SR, &sr, {
            let mut f = sr_fields(&uuid, &name, &descr, &kind, &content_type, shared, &sm);
            f.push((field::sr::PHYSICAL_SIZE.index, Value::Int(physical_size)));
            f
        })?;
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
    // Plug every new PBD (each on its own host); on failure the SR is
    // removed again, as XAPI does.
    let pbds = pbds_of(&s.db.read(), &sr);
    for (i, pbd) in pbds.iter().enumerate() {
        if let Err(e) = pbd_plug(&s, pbd).await {
            for plugged in &pbds[..i] {
                let _ = pbd_unplug(&s, plugged).await;
            }
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

pub(crate) fn sr_introduce(s: &Server, a: sr::Introduce) -> ApiResult {
    let sr::Introduce {
        uuid,
        name_label: name,
        name_description: descr,
        type_: kind,
        content_type,
        shared,
        sm_config,
    } = a;
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
            return Err(errors::sr_uuid_exists(uuid.as_str()));
        }
        t.create(
            class::SR,
            &sr,
            sr_fields(
                &uuid,
                &name,
                &descr,
                &kind,
                &content_type,
                shared,
                &sm_config,
            ),
        )?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(Value::String(sr))
}

/// A new SR record's fields (SR.create adds its physical size).
fn sr_fields(
    uuid: &str,
    name: &str,
    descr: &str,
    kind: &str,
    content_type: &str,
    shared: bool,
    sm_config: &std::collections::BTreeMap<String, String>,
) -> Vec<(usize, Value)> {
    vec![
        (field::sr::UUID.index, Value::str(uuid)),
        (field::sr::NAME_LABEL.index, Value::str(name)),
        (field::sr::NAME_DESCRIPTION.index, Value::str(descr)),
        (field::sr::TYPE_.index, Value::str(kind)),
        (field::sr::CONTENT_TYPE.index, Value::str(content_type)),
        (field::sr::SHARED.index, Value::Bool(shared)),
        (field::sr::SM_CONFIG.index, to_value(sm_config)),
        (field::sr::OTHER_CONFIG.index, Value::Struct(vec![])),
    ]
}

pub(crate) fn assert_no_plugged_pbd(st: &corral_db::State, sr: &str) -> Result<(), ApiError> {
    if pbds_of(st, sr).iter().any(|p| {
        st.get(field::pbd::CURRENTLY_ATTACHED, p)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }) {
        return Err(errors::sr_has_pbd(sr));
    }
    Ok(())
}

/// Removes the SR's records (VDIs, VBD links to them, PBDs, secrets).
pub(crate) fn remove_sr_records(t: &mut Txn<'_>, sr: &str) -> Result<(), ApiError> {
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

pub(crate) fn pool_ref(st: &corral_db::State) -> String {
    st.refs(class::POOL).next().cloned().unwrap_or_default()
}

pub(crate) async fn sr_forget(s: Arc<Server>, sr: &str) -> ApiResult {
    let sr = sr.to_owned();
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

pub(crate) async fn sr_destroy(s: Arc<Server>, sr: &str) -> ApiResult {
    let sr = sr.to_owned();
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
            return Err(ApiError::new(errors::SR_NOT_EMPTY, Vec::<String>::new()));
        }
        if on.pbd.is_none() {
            return Err(errors::sr_no_pbds(sr.as_str()));
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
    .map_err(|e| driver_errors::storage(39, &sr, e))?;
    db(s.db.write(|t| remove_sr_records(t, &sr)))?;
    void()
}

pub(crate) async fn sr_probe(s: Arc<Server>, a: sr::Probe) -> ApiResult {
    let (host, dc, kind) = (a.host.into_string(), a.device_config, a.type_);
    if !s.db.read().exists(class::HOST, &host) {
        return Err(ApiError::handle_invalid("host", &host));
    }
    let d = driver(&kind)?;
    if !d.info().capabilities.contains(&"SR_PROBE") {
        return Err(errors::sr_operation_not_supported(NULL_REF));
    }
    let state_dir = s.state_dir.clone();
    let xml = blocking(move || d.probe(&dc, &state_dir))
        .await?
        .map_err(|e| driver_errors::storage(1, "", e))?;
    Ok(Value::String(xml))
}

pub(crate) async fn sr_upgrade(s: Arc<Server>, sr: &str) -> ApiResult {
    let sr = sr.to_owned();
    let on = attached(&s, &sr)?;
    let _l = sr_lock(&s, &on.uuid).await;
    {
        let st = s.db.read();
        if let Some(v) = vdis_of(&st, &sr).iter().find(|v| vdi_attached(&st, v)) {
            return Err(errors::vdi_in_use(v.as_str(), "sr_upgrade"));
        }
    }
    if on.format_version < FORMAT_VERSION {
        let (d, ctx) = (on.driver, on.ctx.clone());
        blocking(move || d.upgrade(&ctx))
            .await?
            .map_err(|e| driver_errors::storage(47, &sr, e))?;
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
            Some(dev) => ("ext", [("device".to_owned(), dev.clone())]),
            None => (
                "file",
                [("location".to_owned(), dir.to_string_lossy().into_owned())],
            ),
        };
        let sr = sr_create(
            Arc::clone(s),
            sr::Create {
                host: Ref::new(s.host_ref.as_str()),
                device_config: dc.into_iter().collect(),
                physical_size: 0,
                name_label: "Local storage".into(),
                name_description: String::new(),
                type_: kind.into(),
                content_type: "user".into(),
                shared: false,
                sm_config: Default::default(),
            },
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
