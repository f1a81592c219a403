//! Coalescing: hidden base copies merged away in the background.

use crate::context::Server;
use crate::core::driver_errors;
use crate::core::records::{db, strmap, to_value};
use crate::ops::storage::backend::{attached, blocking, sr_lock};
use crate::ops::storage::journal::Journal;
use crate::ops::storage::records::{refresh_allowed, refresh_sizes, vdi_attached, vdis_of};
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use corral_storage::{StorageError, VdiInfo};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// The child's sm_config once its base copy is merged away: the child now
/// sits on whatever the base sat on.
pub(crate) fn sm_config_after_merge(
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

pub(crate) fn spawn_gc(s: &Arc<Server>, sr: &str) {
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
            .map_err(|e| driver_errors::storage(40, sr, e))?;
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
                        .map_err(|e| driver_errors::storage(80, sr, e))?;
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
                            .map_err(|e| driver_errors::storage(1, sr, e))?;
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
                    .map_err(|e| driver_errors::storage(1, sr, e))?;
                    let (d, ctx, bl) = (on.driver, on.ctx.clone(), base_loc.clone());
                    let merged = blocking(move || d.vdi_info(&ctx, &bl))
                        .await?
                        .map_err(|e| driver_errors::storage(1, sr, e))?;
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
                        .map_err(|e| driver_errors::storage(80, sr, e))?;
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
