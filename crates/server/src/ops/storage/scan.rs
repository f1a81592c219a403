//! SR.scan and SR.update: the records follow the images.

use crate::context::Server;
use crate::core::driver_errors;
use crate::core::records::{db, strmap, to_value};
use crate::ops::storage::backend::{attached, blocking, sr_lock};
use crate::ops::storage::records::{
    mark_storage, refresh_allowed, refresh_sizes, vdi_fields, vdis_of, write_sr_sizes,
};
use corral_db::Txn;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, new_ref};
use corral_storage::{StorageError, VdiInfo};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub(crate) async fn sr_update(s: &Arc<Server>, sr: &str) -> Result<(), ApiError> {
    let on = attached(s, sr)?;
    refresh_sizes(s, &on).await;
    Ok(())
}

/// Reconciles the database with the images on the SR.
pub async fn sr_scan(s: &Arc<Server>, sr: &str) -> Result<(), ApiError> {
    let on = attached(s, sr)?;
    let _l = sr_lock(s, &on.uuid).await;
    let _op = mark_storage(s, sr, None, "scan", "")?;
    let (d, ctx) = (on.driver, on.ctx.clone());
    let (images, stat) =
        blocking(move || -> Result<_, StorageError> { Ok((d.scan(&ctx)?, d.stat(&ctx)?)) })
            .await?
            .map_err(|e| driver_errors::storage(40, sr, e))?;
    let iso = s.db.read().get_str(field::sr::TYPE_, sr).as_deref() == Some("iso");
    db(s.db.write(|t| reconcile(t, sr, &images, iso).and_then(|_| write_sr_sizes(t, sr, stat))))?;
    Ok(())
}

pub(crate) fn reconcile(
    t: &mut Txn<'_>,
    sr: &str,
    images: &[VdiInfo],
    iso: bool,
) -> Result<(), ApiError> {
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
