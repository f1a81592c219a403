//! A storage driver for an SR on a host, the per-SR lock and driver errors.

use crate::context::Server;
use crate::core::records::strmap;
use crate::ops::query::flag;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value};
use corral_storage::{Driver, FORMAT_VERSION, SrCtx};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Runs blocking storage work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("storage worker: {e}")))
}

pub(crate) fn driver(kind: &str) -> Result<&'static dyn Driver, ApiError> {
    corral_storage::driver(kind).ok_or_else(|| errors::sr_unknown_driver(kind))
}

/// The SR's driver and the context for calling it on this host.
pub(crate) struct SrOn {
    pub(crate) sr: String,
    pub(crate) uuid: String,
    pub(crate) driver: &'static dyn Driver,
    pub(crate) ctx: SrCtx,
    pub(crate) pbd: Option<String>,
    attached: bool,
    pub(crate) format_version: u32,
}

pub(crate) fn resolve_secrets(st: &corral_db::State, dc: &mut BTreeMap<String, String>) {
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

/// The SR as the host that works on it sees it: this host when it has a
/// PBD for the SR, else a host where the SR is plugged (a shared SR's
/// images are reached from any of them).
pub(crate) fn sr_on(s: &Server, sr: &str) -> Result<SrOn, ApiError> {
    sr_on_in(s, &s.db.read(), sr)
}

/// [`sr_on`] under the caller's read lock.
pub(crate) fn sr_on_in(s: &Server, st: &corral_db::State, sr: &str) -> Result<SrOn, ApiError> {
    if !st.exists(class::SR, sr) {
        return Err(ApiError::handle_invalid("SR", sr));
    }
    let pbds: Vec<&String> = st
        .refs(class::PBD)
        .filter(|p| st.get_str(field::pbd::SR, p).as_deref() == Some(sr))
        .collect();
    let on_host =
        |p: &&&String| st.get_str(field::pbd::HOST, p).as_deref() == Some(s.host_ref.as_str());
    let pbd = pbds
        .iter()
        .find(on_host)
        .or_else(|| {
            pbds.iter()
                .find(|p| flag(st, field::pbd::CURRENTLY_ATTACHED, p))
        })
        .map(|p| (*p).clone());
    sr_via_pbd(s, st, sr, pbd.as_deref())
}

/// The SR through one PBD: that PBD's host, device config and state.
pub(crate) fn sr_via_pbd(
    s: &Server,
    st: &corral_db::State,
    sr: &str,
    pbd: Option<&str>,
) -> Result<SrOn, ApiError> {
    let kind = st.get_str(field::sr::TYPE_, sr).unwrap_or_default();
    let driver = driver(&kind)?;
    let uuid = st.get_str(field::sr::UUID, sr).unwrap_or_default();
    let sm_config = strmap(&st.get(field::sr::SM_CONFIG, sr).unwrap_or(Value::Nil));
    let host = match pbd.and_then(|p| st.get_str(field::pbd::HOST, p)) {
        Some(h) => s.host(&h)?,
        None => s.local(),
    };
    let (mut dc, attached) = match pbd {
        Some(p) => (
            strmap(&st.get(field::pbd::DEVICE_CONFIG, p).unwrap_or(Value::Nil)),
            flag(st, field::pbd::CURRENTLY_ATTACHED, p),
        ),
        None => (BTreeMap::new(), false),
    };
    resolve_secrets(st, &mut dc);
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
            state_dir: host.state_dir.clone(),
        },
        pbd: pbd.map(str::to_owned),
        attached,
        format_version,
    })
}

/// The SR must be plugged (on the host of [`sr_on`]) for anything that
/// reads its storage.
pub(crate) fn attached(s: &Server, sr: &str) -> Result<SrOn, ApiError> {
    attached_on(sr_on(s, sr)?)
}

pub(crate) fn attached_on(on: SrOn) -> Result<SrOn, ApiError> {
    let sr = on.sr.as_str();
    match &on.pbd {
        None => Err(errors::sr_no_pbds(sr)),
        Some(_) if !on.attached => Err(errors::sr_not_attached(sr)),
        Some(_) => Ok(on),
    }
}

pub(crate) fn has_cap(on: &SrOn, cap: &str) -> bool {
    on.driver.info().capabilities.contains(&cap)
}

/// Serialises chain-changing work per SR.
pub(crate) async fn sr_lock(s: &Server, sr_uuid: &str) -> tokio::sync::OwnedMutexGuard<()> {
    let m = {
        let mut locks = s.sr_locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(sr_uuid.to_owned()).or_default())
    };
    m.lock_owned().await
}
