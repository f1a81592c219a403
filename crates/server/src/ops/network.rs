//! network.create and destroy: the bridge name Corral chooses or checks,
//! and what may not go while in use.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::records::{check_refs, create_fields, db, first, given_field};
use crate::ops::query::power;
use corral_model::enums::VmPowerState;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, new_ref};

/// `network.create`: a bridge name of its own (`xapiN`, the first free)
/// unless the caller gives a legal one; MTU 1500 unless given above 0.
pub(crate) fn network_create(s: &Server, p: Vec<Value>) -> ApiResult {
    let args = p.into_iter().next().unwrap_or(Value::Nil);
    let mut given = create_fields(class::NETWORK, &args)?;
    let asked = given_field(&given, field::network::BRIDGE)
        .map(|v| v.db_string())
        .unwrap_or_default();
    if !asked.is_empty() && !corral_net::names::user_bridge_ok(&asked) {
        return Err(ApiError::invalid_value("bridge", &asked));
    }
    let mtu = match given_field(&given, field::network::MTU).and_then(|v| v.as_int()) {
        Some(m) if m > 0 => m,
        _ => 1500,
    };
    let r = new_ref();
    db(s.db.write(|t| {
        check_refs(t, class::NETWORK, &given)?;
        let st = t.state();
        let in_use: Vec<String> = st
            .refs(class::NETWORK)
            .filter_map(|n| st.get_str(field::network::BRIDGE, n))
            .collect();
        let bridge = if asked.is_empty() {
            corral_net::names::next_internal_bridge(in_use.iter().map(String::as_str))
        } else if in_use.contains(&asked) {
            return Err(errors::bridge_name_exists(asked.as_str()));
        } else {
            asked.clone()
        };
        given
            .retain(|(i, _)| *i != field::network::BRIDGE.index && *i != field::network::MTU.index);
        given.extend([
            (field::network::BRIDGE.index, Value::String(bridge)),
            (field::network::MTU.index, Value::Int(mtu)),
            (
                field::network::ALLOWED_OPERATIONS.index,
                Value::string_set(["attaching"]),
            ),
        ]);
        t.create(class::NETWORK, &r, given.clone())
    }))?;
    Ok(Value::String(r))
}

/// `network.destroy`: not while a running VM's VIF or any PIF is on it;
/// its other VIFs go with it, and its bridge (if Corral made it) leaves
/// this host.
pub(crate) async fn network_destroy(s: &Server, p: Vec<Value>) -> ApiResult {
    let network = first(p);
    let bridge = db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::NETWORK, &network) {
            return Err(ApiError::handle_invalid("network", &network));
        }
        let vifs: Vec<String> = st
            .refs(class::VIF)
            .filter(|v| st.get_str(field::vif::NETWORK, v).as_deref() == Some(network.as_str()))
            .cloned()
            .collect();
        let active: Vec<String> = vifs
            .iter()
            .filter(|v| {
                let vm = st.get_str(field::vif::VM, v).unwrap_or_default();
                let attached = st
                    .get(field::vif::CURRENTLY_ATTACHED, v)
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false);
                attached && power(st, &vm) != VmPowerState::Halted
            })
            .cloned()
            .collect();
        if !active.is_empty() {
            // XAPI names each VIF as a parameter of its own.
            return Err(ApiError::new(errors::NETWORK_CONTAINS_VIF, active));
        }
        let pifs: Vec<String> = st
            .refs(class::PIF)
            .filter(|p| st.get_str(field::pif::NETWORK, p).as_deref() == Some(network.as_str()))
            .cloned()
            .collect();
        if !pifs.is_empty() {
            return Err(ApiError::new(errors::NETWORK_CONTAINS_PIF, pifs));
        }
        let bridge = st
            .get_str(field::network::BRIDGE, &network)
            .unwrap_or_default();
        for v in &vifs {
            crate::ops::vif::delete_vif(t, v)?;
        }
        t.delete(class::NETWORK, &network)?;
        Ok(bridge)
    }))?;
    if corral_net::names::made_by_corral(&bridge) {
        if let Err(e) = s.local().net.remove_link(&bridge).await {
            tracing::warn!(%bridge, error = %e, "the destroyed network's bridge stays");
        }
    }
    void()
}
