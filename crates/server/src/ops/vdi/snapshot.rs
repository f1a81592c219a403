//! VDI.snapshot and VDI.clone: instant qcow2 overlays, point-in-time for running disks.

use crate::context::Server;
use crate::core::call::ApiResult;
use crate::core::driver_errors;
use crate::core::records::{strmap, to_value};
use crate::ops::storage::backend::{blocking, has_cap};
use crate::ops::storage::journal::Journal;
use crate::ops::storage::records::{
    mark_storage, refresh_sizes, sm_config_for, vdi_busy, vdi_fields,
};
use crate::ops::vdi::{vdi_locked, vdi_on};
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use corral_storage::{Driver, FORMAT_VERSION, SrCtx, StorageError, VdiInfo};
use std::sync::Arc;

/// Backing chains deeper than this refuse further snapshots (SMAPI's 30).
pub(crate) const MAX_CHAIN: usize = 30;

/// Length of the backing chain under `location` (1 = no parent).
pub(crate) fn chain_len(
    d: &dyn Driver,
    ctx: &SrCtx,
    location: &str,
) -> Result<usize, StorageError> {
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
pub(crate) async fn vdi_snapshot(s: &Arc<Server>, vdi: &str, is_snapshot: bool) -> ApiResult {
    let (_l, v) = vdi_locked(s, vdi).await?;
    let (op, cap, code) = if is_snapshot {
        ("snapshot", "VDI_SNAPSHOT", 82)
    } else {
        ("clone", "VDI_CLONE", 81)
    };
    if !v.managed {
        return Err(errors::vdi_not_managed(vdi));
    }
    if !has_cap(&v.on, cap) {
        return Err(errors::sr_operation_not_supported(v.on.sr.as_str()));
    }
    if v.on.format_version < FORMAT_VERSION {
        return Err(errors::sr_requires_upgrade(v.on.sr.as_str()));
    }
    vdi_busy(&s.db.read(), vdi, op)?;
    let _g = mark_storage(s, &v.on.sr, Some(vdi), &format!("vdi_{op}"), op)?;
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
            return Err(driver_errors::storage(code, &v.on.sr, e));
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
    if let Some(p) = crate::ops::query::plugged_rw_drive(s, vdi) {
        let switched = async {
            let h = s.host(&p.host)?;
            let (d, ctx, l) = (v.on.driver, v.on.ctx.clone(), leaf.location.clone());
            let overlay = blocking(move || d.vdi_image(&ctx, &l))
                .await?
                .map_err(|e| driver_errors::storage(code, &v.on.sr, e))?;
            h.agent
                .drive_switch_to_overlay(&p.vm_uuid, &p.drive, &overlay.path)
                .await
                .map_err(|e| {
                    driver_errors::storage(
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

/// Start-up: a snapshot of a running disk whose records committed but
/// whose QEMU switch did not happen (corrald died in between) leaves the
/// guest writing the image that is now the snapshot's base. Each running
/// disk is checked against its record, and such a switch is finished.
pub async fn finish_interrupted_switches(s: &Arc<Server>) {
    let vdis: Vec<String> = s.db.read().refs(class::VDI).cloned().collect();
    for vdi in vdis {
        // Only this host's QEMUs can have been left half-way by its restart.
        let Some(p) = crate::ops::query::plugged_rw_drive(s, &vdi).filter(|p| p.host == s.host_ref)
        else {
            continue;
        };
        let (vm, drive, h) = (p.vm_uuid, p.drive, s.local());
        let Ok(v) = vdi_on(s, &vdi) else { continue };
        let Ok(Some(active)) = h.agent.drive_image(&vm, &drive).await else {
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
            match h
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
