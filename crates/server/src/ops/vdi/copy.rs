//! VDI.copy.

use crate::context::Server;
use crate::core::call::{ApiResult, Ctx};
use crate::core::driver_errors;
use crate::ops::storage::backend::{attached, blocking, has_cap};
use crate::ops::storage::journal::Journal;
use crate::ops::storage::records::{mark_storage, refresh_allowed, refresh_sizes, vdi_fields};
use crate::ops::vdi::snapshot::vdi_snapshot;
use crate::ops::vdi::{vdi_locked, vdi_on};
use corral_model::args;
use corral_model::errors;
use corral_model::refs::Ref;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use std::sync::Arc;

/// `VDI.copy(vdi, sr, base_vdi, into_vdi)`: a full copy of the VDI's data
/// (its whole chain) into a new standalone image on `sr` (default: the same
/// SR), or into the existing `into_vdi`. `base_vdi` is accepted and ignored:
/// the copy is always full.
pub(crate) async fn vdi_copy(s: Arc<Server>, c: Ctx, a: args::vdi::Copy) -> ApiResult {
    let vdi = a.vdi.into_string();
    let given = |r: String| (!r.is_empty() && r != NULL_REF).then_some(r);
    let dest_sr = given(a.sr.into_string());
    let into = given(a.into_vdi.into_string());
    // Held for the whole copy: garbage collection must not move the source's
    // image while qemu-img reads it.
    let (_src_lock, src) = vdi_locked(&s, &vdi).await?;
    if crate::ops::query::plugged_rw_drive(&s, &vdi).is_some() {
        return Err(errors::vdi_in_use(vdi.as_str(), "copy"));
    }
    let src_image = {
        let (d, ctx, loc) = (src.on.driver, src.on.ctx.clone(), src.location.clone());
        d.vdi_image(&ctx, &loc)
            .map_err(|e| driver_errors::storage(1, &src.on.sr, e))?
    };
    if let Some(task) = &c.task {
        s.task_progress(task, 0.0);
    }
    if let Some(into) = into {
        if crate::ops::query::plugged_rw_drive(&s, &into).is_some() {
            return Err(errors::vdi_in_use(into.as_str(), "copy"));
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
            return Err(errors::vdi_too_small(into.clone(), src_size.to_string()));
        }
        let dst_image = dst
            .on
            .driver
            .vdi_image(&dst.on.ctx, &dst.location)
            .map_err(|e| driver_errors::storage(1, &dst.on.sr, e))?;
        let _g = mark_storage(&s, &dst.on.sr, Some(&into), "vdi_copy", "copy")?;
        blocking(move || {
            corral_storage::qemu_img::QemuImg::default().convert_into(&src_image, &dst_image)
        })
        .await?
        .map_err(|e| driver_errors::storage(1, &dst.on.sr, e))?;
        return Ok(Value::String(into));
    }
    let dest_sr = dest_sr.unwrap_or_else(|| src.on.sr.clone());
    let dst = attached(&s, &dest_sr)?;
    if !has_cap(&dst, "VDI_CREATE") {
        return Err(errors::sr_operation_not_supported(dest_sr.as_str()));
    }
    let _g = mark_storage(&s, &dst.sr, None, "vdi_copy", "")?;
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
            return Err(driver_errors::storage(1, &dest_sr, e));
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
    let a = args::vdi::Copy {
        vdi: Ref::new(vdi),
        sr: Ref::new(sr),
        base_vdi: Ref::null(),
        into_vdi: Ref::null(),
    };
    Ok(vdi_copy(Arc::clone(s), c.clone(), a).await?.db_string())
}
