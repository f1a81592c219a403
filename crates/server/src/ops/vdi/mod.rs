//! VDI.create, destroy, resize, introduce, forget and update.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::{check_refs, create_fields, db, given_field, strmap, to_value};
use crate::ops::storage::backend::{
    SrOn, attached, attached_on, blocking, has_cap, sr_lock, sr_on_in,
};
use crate::ops::storage::records::{
    mark_storage, refresh_allowed, refresh_sizes, vdi_attached, vdi_busy, vdi_fields, vdis_of,
    write_vdi_sizes,
};
use crate::ops::vdi::gc::spawn_gc;
use corral_model::args;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use corral_storage::{Image, StorageError};
use std::sync::Arc;
pub mod copy;
pub mod gc;
pub mod snapshot;

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
        return Err(errors::sr_operation_not_supported(sr.as_str()));
    }
    if size <= 0 {
        return Err(ApiError::invalid_value("virtual_size", &size.to_string()));
    }
    let _l = sr_lock(&s, &on.uuid).await;
    let (d, ctx, v) = (on.driver, on.ctx.clone(), on.format_version);
    let info = blocking(move || d.vdi_create(&ctx, size, v))
        .await?
        .map_err(|e| driver_errors::storage(78, &sr, e))?;
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

pub(crate) struct VdiOn {
    on: SrOn,
    location: String,
    managed: bool,
}

pub(crate) fn vdi_on(s: &Server, vdi: &str) -> Result<VdiOn, ApiError> {
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
pub(crate) async fn vdi_locked(
    s: &Server,
    vdi: &str,
) -> Result<(tokio::sync::OwnedMutexGuard<()>, VdiOn), ApiError> {
    let sr_uuid = vdi_on(s, vdi)?.on.uuid;
    let guard = sr_lock(s, &sr_uuid).await;
    Ok((guard, vdi_on(s, vdi)?))
}

pub(crate) async fn vdi_destroy(s: Arc<Server>, vdi: &str) -> ApiResult {
    let vdi = vdi.to_owned();
    let (_l, v) = vdi_locked(&s, &vdi).await?;
    if !v.managed {
        return Err(errors::vdi_not_managed(vdi.as_str()));
    }
    if !has_cap(&v.on, "VDI_DELETE") {
        return Err(errors::sr_operation_not_supported(v.on.sr.as_str()));
    }
    {
        let st = s.db.read();
        vdi_busy(&st, &vdi, "destroy")?;
        if vdi_attached(&st, &vdi) {
            return Err(errors::vdi_in_use(vdi.as_str(), "destroy"));
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
        .map_err(|e| driver_errors::storage(80, &v.on.sr, e))?;
    drop(_l);
    refresh_sizes(&s, &v.on).await;
    spawn_gc(&s, &v.on.sr);
    void()
}

pub(crate) async fn vdi_resize(s: Arc<Server>, vdi: &str, size: i64) -> ApiResult {
    let vdi = vdi.to_owned();
    let (_l, v) = vdi_locked(&s, &vdi).await?;
    if !v.managed {
        return Err(errors::vdi_not_managed(vdi.as_str()));
    }
    if !has_cap(&v.on, "VDI_RESIZE") {
        return Err(errors::sr_operation_not_supported(v.on.sr.as_str()));
    }
    let current =
        s.db.read()
            .get(field::vdi::VIRTUAL_SIZE, &vdi)
            .and_then(|x| x.as_int())
            .unwrap_or(0);
    if size < current {
        return Err(driver_errors::storage(
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
    let _g = mark_storage(&s, &v.on.sr, Some(&vdi), "vdi_resize", "resize")?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    let info = if let Some(p) = crate::ops::query::plugged_drive(&s, &vdi) {
        // Online: QEMU owns the image while the guest runs, so QEMU grows it
        // (the guest sees the new size at once).
        let h = s.host(&p.host)?;
        h.agent
            .drive_resize(&p.vm_uuid, &p.drive, size)
            .await
            .map_err(|e| {
                driver_errors::storage(
                    79,
                    &v.on.sr,
                    StorageError::backend(79, "VDI Invalid size", e.to_string()),
                )
            })?;
        blocking(move || d.vdi_info(&ctx, &loc)).await?
    } else {
        blocking(move || d.vdi_resize(&ctx, &loc, size)).await?
    }
    .map_err(|e| driver_errors::storage(79, &v.on.sr, e))?;
    db(s.db.write(|t| write_vdi_sizes(t, &vdi, &info)))?;
    drop(_g);
    refresh_sizes(&s, &v.on).await;
    void()
}

pub(crate) async fn vdi_introduce(s: Arc<Server>, a: args::vdi::Introduce) -> ApiResult {
    let (uuid, name, descr, sr) = (a.uuid, a.name_label, a.name_description, a.sr.into_string());
    let ty = a.type_.as_str();
    let (sharable, read_only) = (a.sharable, a.read_only);
    let other_config = to_value(&a.other_config);
    let location = a.location;
    let on = attached(&s, &sr)?;
    if !has_cap(&on, "VDI_INTRODUCE") {
        return Err(errors::sr_operation_not_supported(sr.as_str()));
    }
    let (d, ctx, loc) = (on.driver, on.ctx.clone(), location.clone());
    let info = blocking(move || d.vdi_info(&ctx, &loc))
        .await?
        .map_err(|e| driver_errors::storage(1, &sr, e))?;
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
        let mut f = vdi_fields(&sr, &info, &name, &descr, ty);
        if !uuid.is_empty() {
            f.push((field::vdi::UUID.index, Value::str(&uuid)));
        }
        f.push((field::vdi::SHARABLE.index, Value::Bool(sharable)));
        f.push((
            field::vdi::READ_ONLY.index,
            Value::Bool(read_only || info.read_only),
        ));
        f.push((field::vdi::OTHER_CONFIG.index, other_config.clone()));
        t.create(class::VDI, &r, f)?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(Value::String(r))
}

pub(crate) fn vdi_forget(s: &Server, vdi: &str) -> ApiResult {
    let vdi = vdi.to_owned();
    db(s.db.write(|t| {
        let sr = t
            .state()
            .get_str(field::vdi::SR, &vdi)
            .ok_or_else(|| ApiError::handle_invalid("VDI", &vdi))?;
        if vdi_attached(t.state(), &vdi) {
            return Err(errors::vdi_in_use(vdi.as_str(), "forget"));
        }
        t.delete(class::VDI, &vdi)?;
        refresh_allowed(t, &sr)
    }))?;
    void()
}

pub(crate) async fn vdi_update(s: Arc<Server>, vdi: &str) -> ApiResult {
    let vdi = vdi.to_owned();
    let v = vdi_on(&s, &vdi)?;
    let (d, ctx, loc) = (v.on.driver, v.on.ctx.clone(), v.location.clone());
    let info = blocking(move || d.vdi_info(&ctx, &loc))
        .await?
        .map_err(|e| driver_errors::storage(1, &v.on.sr, e))?;
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
        .map_err(|e| driver_errors::storage(1, sr, e))
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

/// A VDI's image and the format the storage layer pins for it.
pub(crate) fn vdi_image_of(
    s: &Server,
    st: &corral_db::State,
    vdi: &str,
) -> Result<corral_storage::Image, ApiError> {
    let sr = st.get_str(field::vdi::SR, vdi).unwrap_or_default();
    let loc = st.get_str(field::vdi::LOCATION, vdi).unwrap_or_default();
    vdi_image(s, st, &sr, &loc)
}
