//! What a VIF's port lets through on its host (locking mode and the
//! ratelimit QoS), VIF.move, and the checks on the fields behind them.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::db;
use crate::ops::query::strmap;
use crate::ops::vif::vifs_of;
use corral_model::errors;
use corral_model::schema::{ClassId, FieldId, class, field};
use corral_model::{ApiError, Value};
use corral_net::filter::{PortMode, PortPolicy};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The filter a VIF's port needs, from its record and its network's:
/// `network_default` takes the network's `default_locking_mode`
/// (`unlocked` or `disabled`); `locked` passes the VIF's MAC and listed
/// addresses only; `ratelimit` QoS with `kbps` caps what the guest sends.
pub(crate) fn port_policy(st: &corral_db::State, vif: &str) -> PortPolicy {
    let text = |f: FieldId, r: &str| st.get_str(f, r).unwrap_or_default();
    let network = text(field::vif::NETWORK, vif);
    let mut mode = text(field::vif::LOCKING_MODE, vif);
    if mode.is_empty() || mode == "network_default" {
        mode = text(field::network::DEFAULT_LOCKING_MODE, &network);
    }
    let list = |f: FieldId| -> Vec<String> {
        st.get(f, vif)
            .and_then(|v| v.as_array().map(<[Value]>::to_vec))
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let mode = match mode.as_str() {
        "disabled" => PortMode::Disabled,
        "locked" => PortMode::Locked {
            // Entries are checked when set; one that is not an address
            // passes nothing.
            ipv4: list(field::vif::IPV4_ALLOWED)
                .iter()
                .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                .collect(),
            ipv6: list(field::vif::IPV6_ALLOWED)
                .iter()
                .filter_map(|a| a.parse::<Ipv6Addr>().ok())
                .collect(),
        },
        _ => PortMode::Unlocked,
    };
    let rate_kbytes = (text(field::vif::QOS_ALGORITHM_TYPE, vif) == "ratelimit")
        .then(|| strmap(st.get(field::vif::QOS_ALGORITHM_PARAMS, vif)))
        .and_then(|p| p.get("kbps").and_then(|k| k.trim().parse::<u64>().ok()))
        .filter(|k| *k > 0);
    let mac = corral_net::mac::parse(&text(field::vif::MAC, vif)).unwrap_or([0; 6]);
    PortPolicy {
        mac,
        mode,
        rate_kbytes,
    }
}

/// The tap a VIF of a VM with this uuid has on its host.
fn tap_of(st: &corral_db::State, vif: &str) -> Option<String> {
    let vm = st.get_str(field::vif::VM, vif)?;
    let device: u32 = st.get_str(field::vif::DEVICE, vif)?.parse().ok()?;
    let uuid = crate::ops::query::vm_uuid(st, &vm);
    Some(corral_net::names::tap_name(&uuid, device))
}

/// Gives the port of each of the VM's VIFs its filter on `h`, before the
/// VM starts: its taps are filtered from their first frame.
pub(crate) async fn apply_vm(s: &Server, h: &HostHandle, vm: &str) -> Result<(), ApiError> {
    let ports: Vec<(String, PortPolicy)> = {
        let st = s.db.read();
        vifs_of(&st, vm)
            .iter()
            .filter_map(|v| Some((tap_of(&st, v)?, port_policy(&st, v))))
            .collect()
    };
    for (tap, policy) in ports {
        h.net
            .set_port_policy(&tap, Some(policy))
            .await
            .map_err(|e| driver_errors::network(&tap, e))?;
    }
    Ok(())
}

/// Gives one VIF's port its filter (`None`: takes it away).
pub(crate) async fn apply_vif(
    s: &Server,
    h: &HostHandle,
    vif: &str,
    on: bool,
) -> Result<(), ApiError> {
    let (tap, policy) = {
        let st = s.db.read();
        let Some(tap) = tap_of(&st, vif) else {
            return Ok(());
        };
        (tap, on.then(|| port_policy(&st, vif)))
    };
    h.net
        .set_port_policy(&tap, policy)
        .await
        .map_err(|e| driver_errors::network(&tap, e))
}

/// The attached VIFs of running VMs, each with the host it runs on.
fn live_vifs(st: &corral_db::State, vifs: &[String]) -> Vec<(String, String)> {
    vifs.iter()
        .filter(|v| {
            st.get(field::vif::CURRENTLY_ATTACHED, v)
                .and_then(|x| x.as_bool())
                .unwrap_or(false)
        })
        .filter_map(|v| {
            let vm = st.get_str(field::vif::VM, v)?;
            Some((v.clone(), crate::ops::query::live_on(st, &vm)?))
        })
        .collect()
}

/// After a generic setter changed `f` of `r`: a VIF's locking or QoS
/// fields, or a network's default locking mode, take effect at once on the
/// ports of running VMs (as XAPI refreshes its filtering rules).
pub(crate) async fn after_set(s: &Server, c: ClassId, f: FieldId, r: &str) -> Result<(), ApiError> {
    let vif_fields = [
        field::vif::LOCKING_MODE,
        field::vif::IPV4_ALLOWED,
        field::vif::IPV6_ALLOWED,
        field::vif::QOS_ALGORITHM_TYPE,
        field::vif::QOS_ALGORITHM_PARAMS,
    ];
    let vifs = if c == class::VIF && vif_fields.iter().any(|x| x.index == f.index) {
        vec![r.to_owned()]
    } else if c == class::NETWORK && f.index == field::network::DEFAULT_LOCKING_MODE.index {
        crate::ops::query::refs_in(&s.db.read(), field::network::VIFS, r)
    } else {
        return Ok(());
    };
    let live = live_vifs(&s.db.read(), &vifs);
    for (vif, host) in live {
        apply_vif(s, &s.host(&host)?, &vif, true).await?;
    }
    Ok(())
}

/// What a generic setter may store in a VIF's address lists: addresses of
/// the list's family, as XAPI checks them.
pub(crate) fn check_set(c: ClassId, f: FieldId, v: &Value) -> Result<(), ApiError> {
    if c != class::VIF {
        return Ok(());
    }
    let v4 = f.index == field::vif::IPV4_ALLOWED.index;
    let v6 = f.index == field::vif::IPV6_ALLOWED.index;
    if !v4 && !v6 {
        return Ok(());
    }
    let items: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        one => vec![one.clone()],
    };
    for i in items {
        let a = i.as_str().unwrap_or_default();
        let ok = if v4 {
            a.parse::<Ipv4Addr>().is_ok()
        } else {
            a.parse::<Ipv6Addr>().is_ok()
        };
        if !ok {
            return Err(errors::invalid_ip_address_specified(f.def().name));
        }
    }
    Ok(())
}

/// Start-up: every attached VIF of a VM running here has its filter, and
/// taps that no such VIF has lose theirs (what a destroyed VIF or a VM
/// that stopped while corrald was down left).
pub(crate) async fn reconcile(s: &Server, h: &HostHandle) {
    let (want, vms): (Vec<(String, PortPolicy)>, usize) = {
        let st = s.db.read();
        let all: Vec<String> = st.refs(class::VIF).cloned().collect();
        let live = live_vifs(&st, &all);
        let here: Vec<String> = live
            .into_iter()
            .filter(|(_, host)| *host == h.host)
            .map(|(v, _)| v)
            .collect();
        let n = here.len();
        (
            here.iter()
                .filter_map(|v| Some((tap_of(&st, v)?, port_policy(&st, v))))
                .collect(),
            n,
        )
    };
    for (tap, policy) in &want {
        if let Err(e) = h.net.set_port_policy(tap, Some(policy.clone())).await {
            tracing::warn!(tap = %tap, error = %e, "cannot restore a VIF's filter");
        }
    }
    let have = h.net.port_policies().await.unwrap_or_default();
    for tap in have.iter().filter(|t| !want.iter().any(|(w, _)| w == *t)) {
        if let Err(e) = h.net.set_port_policy(tap, None).await {
            tracing::warn!(tap = %tap, error = %e, "cannot remove a stale VIF filter");
        }
    }
    tracing::debug!(vifs = vms, "VIF filters reconciled");
}

/// `VIF.move`: the VIF goes onto another network. A plugged one keeps its
/// tap, which moves to the new network's bridge: the guest sees no change
/// of device. The host must reach the network (`HOST_CANNOT_ATTACH_NETWORK`).
pub(crate) async fn vif_move(s: &Server, vif: &str, network: &str) -> ApiResult {
    // XenAPI's VIF operations have no `move`: it holds `attach`.
    let _mark = crate::ops::vif::mark_vif(s, vif, "attach")?;
    let (live_host, tap, bridge, mtu) = {
        let st = s.db.read();
        if !st.exists(class::VIF, vif) {
            return Err(ApiError::handle_invalid("VIF", vif));
        }
        if !st.exists(class::NETWORK, network) {
            return Err(ApiError::handle_invalid("network", network));
        }
        let live = live_vifs(&st, &[vif.to_owned()]).into_iter().next();
        let bridge = st
            .get_str(field::network::BRIDGE, network)
            .unwrap_or_default();
        let mtu = st
            .get(field::network::MTU, network)
            .and_then(|v| v.as_int())
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(1500);
        if let Some((_, host)) = &live {
            if !host_sees(&st, host, network) {
                return Err(errors::host_cannot_attach_network(host.as_str(), network));
            }
        }
        (live.map(|(_, h)| h), tap_of(&st, vif), bridge, mtu)
    };
    if let (Some(host), Some(tap)) = (&live_host, &tap) {
        let h = s.host(host)?;
        h.net
            .ensure_bridge(&bridge, mtu)
            .await
            .map_err(|e| driver_errors::network(&bridge, e))?;
        h.net
            .set_controller(tap, Some(&bridge))
            .await
            .map_err(|e| driver_errors::network(tap, e))?;
    }
    db(s.db.write(|t| {
        if !t.state().exists(class::VIF, vif) {
            return Err(ApiError::handle_invalid("VIF", vif));
        }
        t.set(field::vif::NETWORK, vif, Value::str(network))
    }))?;
    if let Some(host) = &live_host {
        // The new network's default locking mode may differ.
        apply_vif(s, &s.host(host)?, vif, true).await?;
    }
    void()
}

/// Whether `host` can put a VIF on `network`: an internal network (no PIF
/// at all) or one with a PIF of this host; unmanaged networks are taken
/// to be everywhere.
fn host_sees(st: &corral_db::State, host: &str, network: &str) -> bool {
    let managed = st
        .get(field::network::MANAGED, network)
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let pifs = crate::ops::query::refs_in(st, field::network::PIFS, network);
    !managed
        || pifs.is_empty()
        || pifs
            .iter()
            .any(|p| st.get_str(field::pif::HOST, p).as_deref() == Some(host))
}

/// `VIF.configure_ipv4`/`configure_ipv6`: the guest's address as the
/// toolstack records it for the guest agent (`Static` with `addr/prefix`
/// and an optional gateway, or `None`).
pub(crate) fn configure_ip(
    s: &Server,
    vif: &str,
    v6: bool,
    mode: &str,
    address: &str,
    gateway: &str,
) -> ApiResult {
    let valid_ip = |a: &str| {
        if v6 {
            a.parse::<Ipv6Addr>().is_ok()
        } else {
            a.parse::<Ipv4Addr>().is_ok()
        }
    };
    let (address, gateway) = if mode == "Static" {
        let ok = address.split_once('/').is_some_and(|(ip, prefix)| {
            valid_ip(ip)
                && prefix
                    .parse::<u8>()
                    .is_ok_and(|p| p <= if v6 { 128 } else { 32 })
        });
        if !ok {
            return Err(errors::invalid_ip_address_specified("address"));
        }
        if !gateway.is_empty() && !valid_ip(gateway) {
            return Err(errors::invalid_ip_address_specified("gateway"));
        }
        (address, gateway)
    } else {
        ("", "")
    };
    let (fm, fa, fg) = if v6 {
        (
            field::vif::IPV6_CONFIGURATION_MODE,
            field::vif::IPV6_ADDRESSES,
            field::vif::IPV6_GATEWAY,
        )
    } else {
        (
            field::vif::IPV4_CONFIGURATION_MODE,
            field::vif::IPV4_ADDRESSES,
            field::vif::IPV4_GATEWAY,
        )
    };
    db(s.db.write(|t| {
        if !t.state().exists(class::VIF, vif) {
            return Err(ApiError::handle_invalid("VIF", vif));
        }
        t.set(fm, vif, Value::str(mode))?;
        let addresses = if address.is_empty() {
            vec![]
        } else {
            vec![Value::str(address)]
        };
        t.set(fa, vif, Value::Array(addresses))?;
        t.set(fg, vif, Value::str(gateway))
    }))?;
    void()
}
