//! PBD.create, destroy, plug and unplug.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::{check_refs, create_fields, db, first, given_field, strmap, to_value};
use crate::ops::storage::backend::{blocking, sr_lock, sr_on, sr_via_pbd};
use crate::ops::storage::records::{
    assert_detached, delete_secrets, pbds_of, refresh_allowed, refresh_sizes, store_secrets,
    vdi_attached, vdis_of,
};
use crate::ops::storage::scan::sr_scan;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, new_ref};
use corral_storage::FORMAT_VERSION;
use std::sync::Arc;

pub(crate) fn pbd_create(s: &Server, p: Vec<Value>) -> ApiResult {
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
            return Err(errors::pbd_exists(
                sr.as_str(),
                host.as_str(),
                existing.as_str(),
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

pub(crate) fn pbd_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
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
            return Err(errors::sr_not_sharable(sr.as_str(), host.as_str()));
        }
    }
    // Attached through the PBD's own host.
    let on = sr_via_pbd(s, &s.db.read(), &sr, Some(pbd))?;
    let (d, ctx) = (on.driver, on.ctx.clone());
    let version = blocking(move || d.attach(&ctx))
        .await?
        .map_err(|e| driver_errors::storage(47, &sr, e))?;
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
            return Err(errors::vdi_in_use(v.as_str(), "unplug"));
        }
    }
    let on = sr_via_pbd(s, &s.db.read(), &sr, Some(pbd))?;
    let _l = sr_lock(s, &on.uuid).await;
    let (d, ctx) = (on.driver, on.ctx.clone());
    blocking(move || d.detach(&ctx))
        .await?
        .map_err(|e| driver_errors::storage(47, &sr, e))?;
    db(s.db.write(|t| {
        t.set(field::pbd::CURRENTLY_ATTACHED, pbd, Value::Bool(false))?;
        refresh_allowed(t, &sr)
    }))?;
    Ok(())
}
