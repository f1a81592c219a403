//! VLANs: `VLAN.create`/`destroy`, `pool.create_VLAN_from_PIF`,
//! `pool.create_VLAN` and the deprecated `PIF.create_VLAN`. A VLAN is an
//! untagged PIF (`VLAN=<tag>`, the base's device name) on its own network,
//! realised as the 802.1Q device `<base>.<tag>` on that network's bridge.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::records::db;
use crate::ops::pif::{delete_pif, flag, pif_plug, pif_unplug_device, pifs_of};
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};

/// The highest 802.1Q tag (0 is allowed, as in XAPI).
const MAX_TAG: i64 = 4094;

/// XAPI's checks of a new VLAN on `base`, in its order; the host's PIF
/// already on `network` is an error too.
fn check_create(
    st: &corral_db::State,
    base: &str,
    tag: i64,
    network: &str,
) -> Result<(String, String), ApiError> {
    if !st.exists(class::PIF, base) {
        return Err(ApiError::handle_invalid("PIF", base));
    }
    if !st.exists(class::NETWORK, network) {
        return Err(ApiError::handle_invalid("network", network));
    }
    if !st
        .get(field::network::MANAGED, network)
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
    {
        return Err(errors::network_unmanaged(network));
    }
    let host = st.get_str(field::pif::HOST, base).unwrap_or_default();
    if let Some(p) = pifs_of(st, &host)
        .into_iter()
        .find(|p| st.get_str(field::pif::NETWORK, p).as_deref() == Some(network))
    {
        return Err(errors::network_already_connected(network, p.as_str()));
    }
    if !st
        .get(field::pif::MANAGED, base)
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
    {
        return Err(errors::pif_unmanaged(base));
    }
    if st
        .get_str(field::pif::BOND_SLAVE_OF, base)
        .as_deref()
        .unwrap_or(NULL_REF)
        != NULL_REF
    {
        return Err(errors::cannot_add_vlan_to_bond_slave(base));
    }
    if st
        .get(field::pif::VLAN, base)
        .and_then(|v| v.as_int())
        .unwrap_or(-1)
        >= 0
    {
        return Err(errors::pif_is_vlan(base));
    }
    if !(0..=MAX_TAG).contains(&tag) {
        return Err(errors::vlan_tag_invalid(tag.to_string()));
    }
    let device = st.get_str(field::pif::DEVICE, base).unwrap_or_default();
    let exists = pifs_of(st, &host).into_iter().any(|p| {
        st.get_str(field::pif::DEVICE, &p).as_deref() == Some(device.as_str())
            && st.get(field::pif::VLAN, &p).and_then(|v| v.as_int()) == Some(tag)
    });
    if exists {
        return Err(errors::pif_vlan_exists(device.as_str()));
    }
    Ok((host, device))
}

/// `VLAN.create`: the untagged PIF and the VLAN record, then the PIF is
/// plugged; if the host cannot make the device, both records go again.
pub(crate) async fn vlan_create(s: &Server, base: &str, tag: i64, network: &str) -> ApiResult {
    let (vlan, pif) = (new_ref(), new_ref());
    db(s.db.write(|t| {
        let (host, device) = check_create(t.state(), base, tag, network)?;
        let mtu = t
            .state()
            .get(field::pif::MTU, base)
            .and_then(|v| v.as_int())
            .unwrap_or(1500);
        t.create(
            class::PIF,
            &pif,
            vec![
                (field::pif::DEVICE.index, Value::String(device)),
                (field::pif::NETWORK.index, Value::str(network)),
                (field::pif::HOST.index, Value::String(host)),
                (
                    field::pif::MAC.index,
                    Value::String(corral_net::mac::format_mac(corral_net::TAP_MAC)),
                ),
                (field::pif::MTU.index, Value::Int(mtu)),
                (field::pif::VLAN.index, Value::Int(tag)),
                (field::pif::PHYSICAL.index, Value::Bool(false)),
                (field::pif::CURRENTLY_ATTACHED.index, Value::Bool(false)),
                (field::pif::METRICS.index, Value::str(NULL_REF)),
                (field::pif::VLAN_MASTER_OF.index, Value::str(&vlan)),
            ],
        )?;
        t.create(
            class::VLAN,
            &vlan,
            vec![
                (field::vlan::TAGGED_PIF.index, Value::str(base)),
                (field::vlan::UNTAGGED_PIF.index, Value::str(&pif)),
                (field::vlan::TAG.index, Value::Int(tag)),
            ],
        )
    }))?;
    if let Err(e) = pif_plug(s, &pif).await {
        let _ = forget_records(s, &vlan, &pif);
        return Err(e);
    }
    Ok(Value::String(vlan))
}

fn forget_records(s: &Server, vlan: &str, pif: &str) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        delete_pif(t, pif)?;
        if t.state().exists(class::VLAN, vlan) {
            t.delete(class::VLAN, vlan)?;
        }
        Ok(())
    }))
}

/// `VLAN.destroy`: not while its PIF is the management interface; the
/// device leaves the bridge and goes, then both records.
pub(crate) async fn vlan_destroy(s: &Server, vlan: &str) -> ApiResult {
    let pif = {
        let st = s.db.read();
        if !st.exists(class::VLAN, vlan) {
            return Err(ApiError::handle_invalid("VLAN", vlan));
        }
        let pif = st
            .get_str(field::vlan::UNTAGGED_PIF, vlan)
            .unwrap_or_default();
        if flag(&st, field::pif::MANAGEMENT, &pif) {
            return Err(errors::pif_is_management_interface(pif.as_str()));
        }
        pif
    };
    if s.db.read().exists(class::PIF, &pif) {
        pif_unplug_device(s, &pif).await?;
    }
    forget_records(s, vlan, &pif)?;
    void()
}

/// `pool.create_VLAN_from_PIF`: the VLAN on every PIF of `pif`'s network
/// whose host is live; one failure undoes the others. The new PIFs.
pub(crate) async fn pool_create_vlan_from_pif(
    s: &Server,
    pif: &str,
    network: &str,
    tag: i64,
) -> ApiResult {
    let bases: Vec<String> = {
        let st = s.db.read();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        let base_network = st.get_str(field::pif::NETWORK, pif).unwrap_or_default();
        let mut bases: Vec<String> = st
            .refs(class::PIF)
            .filter(|p| st.get_str(field::pif::NETWORK, p).as_deref() == Some(&base_network))
            .filter(|p| {
                let host = st.get_str(field::pif::HOST, p).unwrap_or_default();
                crate::ops::query::host_live(&st, &host)
            })
            .cloned()
            .collect();
        bases.sort();
        bases
    };
    let mut made: Vec<String> = Vec::new();
    for base in &bases {
        match vlan_create(s, base, tag, network).await {
            Ok(v) => made.push(v.db_string()),
            Err(e) => {
                for v in &made {
                    let _ = vlan_destroy(s, v).await;
                }
                return Err(e);
            }
        }
    }
    let st = s.db.read();
    Ok(Value::Array(
        made.iter()
            .filter_map(|v| st.get_str(field::vlan::UNTAGGED_PIF, v))
            .map(Value::String)
            .collect(),
    ))
}

/// The PIF called `device` that is no VLAN (of `host`, or of any host):
/// where the calls that name a VLAN's base by device start;
/// `INVALID_VALUE` when there is none.
fn base_by_device(s: &Server, host: Option<&str>, device: &str) -> Result<String, ApiError> {
    let st = s.db.read();
    st.refs(class::PIF)
        .find(|p| {
            host.is_none_or(|h| st.get_str(field::pif::HOST, p).as_deref() == Some(h))
                && st.get_str(field::pif::DEVICE, p).as_deref() == Some(device)
                && st.get(field::pif::VLAN, p).and_then(|v| v.as_int()) == Some(-1)
        })
        .cloned()
        .ok_or_else(|| ApiError::invalid_value("device", device))
}

/// `pool.create_VLAN` (deprecated): the same from a device name, on every
/// host's physical PIF of that name.
pub(crate) async fn pool_create_vlan(
    s: &Server,
    device: &str,
    network: &str,
    tag: i64,
) -> ApiResult {
    let first = base_by_device(s, None, device)?;
    pool_create_vlan_from_pif(s, &first, network, tag).await
}

/// `PIF.create_VLAN` (deprecated): one host's VLAN by device name; the new
/// PIF.
pub(crate) async fn pif_create_vlan(
    s: &Server,
    device: &str,
    network: &str,
    host: &str,
    tag: i64,
) -> ApiResult {
    let base = base_by_device(s, Some(host), device)?;
    let vlan = vlan_create(s, &base, tag, network).await?.db_string();
    Ok(Value::String(
        s.db.read()
            .get_str(field::vlan::UNTAGGED_PIF, &vlan)
            .unwrap_or_default(),
    ))
}
