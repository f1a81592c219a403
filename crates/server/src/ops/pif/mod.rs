//! PIFs: a host's NICs as XenServer shows them (PIF.scan, introduce,
//! forget), attaching them to their network's bridge (plug, unplug), their
//! IPv4 configuration (reconfigure_ip) and the management interface.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::db;
use corral_model::errors;
use corral_model::schema::{class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
use corral_net::{Link, NicFacts};

pub(crate) mod address;
pub(crate) mod bond;
pub(crate) mod vlan;

pub(crate) use address::pif_reconfigure_ip;
use address::{configured_ipv4, configured_ipv6};

/// The PIFs of `host`.
pub(crate) fn pifs_of(st: &corral_db::State, host: &str) -> Vec<String> {
    st.refs(class::PIF)
        .filter(|p| st.get_str(field::pif::HOST, p).as_deref() == Some(host))
        .cloned()
        .collect()
}

pub(crate) fn flag(st: &corral_db::State, f: corral_model::FieldId, r: &str) -> bool {
    st.get(f, r).and_then(|v| v.as_bool()).unwrap_or(false)
}

/// The device a PIF stands for in the host's kernel.
#[derive(Clone, Debug)]
pub(crate) enum Kernel {
    /// A NIC (or anything else the host made).
    Nic(String),
    /// `<base>.<tag>`, made on the tagged PIF's device.
    Vlan {
        name: String,
        base: String,
        tag: u16,
    },
    /// `bondN` with its members' devices.
    Bond {
        name: String,
        members: Vec<String>,
        spec: corral_net::BondSpec,
    },
}

impl Kernel {
    pub(crate) fn name(&self) -> &str {
        match self {
            Kernel::Nic(n) | Kernel::Vlan { name: n, .. } | Kernel::Bond { name: n, .. } => n,
        }
    }

    /// Makes the device if Corral makes it (a NIC is there already).
    async fn realise(&self, h: &HostHandle, mtu: u32) -> Result<(), ApiError> {
        let r = match self {
            Kernel::Nic(_) => Ok(()),
            Kernel::Vlan { name, base, tag } => h.net.ensure_vlan(name, base, *tag, mtu).await,
            Kernel::Bond {
                name,
                members,
                spec,
            } => h.net.ensure_bond(name, members.clone(), spec.clone()).await,
        };
        r.map_err(|e| driver_errors::network(self.name(), e))
    }

    /// Removes the device if Corral made it.
    async fn unrealise(&self, h: &HostHandle) -> Result<(), ApiError> {
        match self {
            Kernel::Nic(_) => Ok(()),
            _ => h
                .net
                .remove_link(self.name())
                .await
                .map_err(|e| driver_errors::network(self.name(), e)),
        }
    }
}

/// The kernel device of `pif`, from its record (and its bond's).
pub(crate) fn kernel_of(st: &corral_db::State, pif: &str) -> Kernel {
    let device = st.get_str(field::pif::DEVICE, pif).unwrap_or_default();
    let tag = st
        .get(field::pif::VLAN, pif)
        .and_then(|v| v.as_int())
        .unwrap_or(-1);
    if let Ok(tag) = u16::try_from(tag) {
        return Kernel::Vlan {
            name: format!("{device}.{tag}"),
            base: device,
            tag,
        };
    }
    let bonds = crate::ops::query::refs_in(st, field::pif::BOND_MASTER_OF, pif);
    if let Some(bond) = bonds.first() {
        return Kernel::Bond {
            name: device,
            members: crate::ops::query::refs_in(st, field::bond::SLAVES, bond)
                .iter()
                .filter_map(|m| st.get_str(field::pif::DEVICE, m))
                .collect(),
            spec: bond::spec_of(st, bond, pif),
        };
    }
    Kernel::Nic(device)
}

/// The handle of the PIF's host, with the PIF's kernel device, its
/// network's bridge and its MTU.
pub(crate) fn pif_parts(
    s: &Server,
    pif: &str,
) -> Result<(HostHandle, Kernel, String, i64), ApiError> {
    let st = s.db.read();
    if !st.exists(class::PIF, pif) {
        return Err(ApiError::handle_invalid("PIF", pif));
    }
    let host = st.get_str(field::pif::HOST, pif).unwrap_or_default();
    let kernel = kernel_of(&st, pif);
    let network = st.get_str(field::pif::NETWORK, pif).unwrap_or_default();
    let bridge = st
        .get_str(field::network::BRIDGE, &network)
        .unwrap_or_default();
    let mtu = st
        .get(field::pif::MTU, pif)
        .and_then(|v| v.as_int())
        .unwrap_or(1500);
    drop(st);
    Ok((s.host(&host)?, kernel, bridge, mtu))
}

/// Deletes the PIF record, if there, with its metrics.
pub(crate) fn delete_pif(t: &mut corral_db::Txn<'_>, pif: &str) -> Result<(), ApiError> {
    let metrics = t
        .state()
        .get_str(field::pif::METRICS, pif)
        .unwrap_or_default();
    if t.state().exists(class::PIF_METRICS, &metrics) {
        t.delete(class::PIF_METRICS, &metrics)?;
    }
    if t.state().exists(class::PIF, pif) {
        t.delete(class::PIF, pif)?;
    }
    Ok(())
}

/// Writes the PIF_metrics record of `pif` from what sysfs says.
fn write_metrics(
    t: &mut corral_db::Txn<'_>,
    pif: &str,
    facts: &NicFacts,
) -> Result<String, ApiError> {
    let mut metrics = t
        .state()
        .get_str(field::pif::METRICS, pif)
        .unwrap_or_default();
    if !t.state().exists(class::PIF_METRICS, &metrics) {
        metrics = new_ref();
        t.create(class::PIF_METRICS, &metrics, vec![])?;
        t.set(field::pif::METRICS, pif, Value::str(&metrics))?;
    }
    let f = field::pif_metrics::CARRIER;
    t.set(f, &metrics, Value::Bool(facts.carrier))?;
    t.set(field::pif_metrics::SPEED, &metrics, Value::Int(facts.speed))?;
    t.set(
        field::pif_metrics::DUPLEX,
        &metrics,
        Value::Bool(facts.full_duplex),
    )?;
    t.set(
        field::pif_metrics::VENDOR_ID,
        &metrics,
        Value::str(&facts.vendor_id),
    )?;
    t.set(
        field::pif_metrics::DEVICE_ID,
        &metrics,
        Value::str(&facts.device_id),
    )?;
    t.set(
        field::pif_metrics::PCI_BUS_PATH,
        &metrics,
        Value::str(&facts.pci_bus_path),
    )?;
    t.set(
        field::pif_metrics::LAST_UPDATED,
        &metrics,
        Value::DateTime(date::now()),
    )?;
    Ok(metrics)
}

/// The network of a NIC's bridge, made (as XenServer's installer names
/// them) if no network has that bridge.
fn network_for_bridge(
    t: &mut corral_db::Txn<'_>,
    bridge: &str,
    device: &str,
) -> Result<String, ApiError> {
    let st = t.state();
    if let Some(n) = st
        .refs(class::NETWORK)
        .find(|n| st.get_str(field::network::BRIDGE, n).as_deref() == Some(bridge))
    {
        return Ok(n.clone());
    }
    let n = new_ref();
    t.create(
        class::NETWORK,
        &n,
        vec![
            (
                field::network::NAME_LABEL.index,
                Value::String(format!("Pool-wide network associated with {device}")),
            ),
            (field::network::BRIDGE.index, Value::str(bridge)),
            (field::network::MTU.index, Value::Int(1500)),
            (
                field::network::ALLOWED_OPERATIONS.index,
                Value::string_set(["attaching"]),
            ),
        ],
    )?;
    Ok(n)
}

/// A PIF record for NIC `link` of `host` (unplugged: plugging moves it
/// onto its network's bridge).
fn introduce_pif(
    t: &mut corral_db::Txn<'_>,
    host: &str,
    link: &Link,
    facts: &NicFacts,
    managed: bool,
) -> Result<String, ApiError> {
    let bridge = corral_net::names::bridge_for_nic(&link.name);
    let network = network_for_bridge(t, &bridge, &link.name)?;
    let pif = new_ref();
    t.create(
        class::PIF,
        &pif,
        vec![
            (field::pif::DEVICE.index, Value::str(&link.name)),
            (field::pif::NETWORK.index, Value::str(&network)),
            (field::pif::HOST.index, Value::str(host)),
            (field::pif::MAC.index, Value::str(&link.mac)),
            (field::pif::MTU.index, Value::Int(i64::from(link.mtu))),
            (field::pif::VLAN.index, Value::Int(-1)),
            (field::pif::PHYSICAL.index, Value::Bool(true)),
            (field::pif::CURRENTLY_ATTACHED.index, Value::Bool(false)),
            (field::pif::MANAGED.index, Value::Bool(managed)),
            (field::pif::METRICS.index, Value::str(NULL_REF)),
        ],
    )?;
    write_metrics(t, &pif, facts)?;
    Ok(pif)
}

/// `PIF.scan`: a PIF (and, when its bridge has none, a network) for every
/// NIC of the host that has none yet, matched by MAC as XAPI does; a
/// second scan adds nothing.
pub(crate) async fn pif_scan(s: &Server, host: &str) -> ApiResult {
    let h = s.host(host)?;
    let links = h
        .net
        .links()
        .await
        .map_err(|e| driver_errors::network("scanning the NICs", e))?;
    let nics: Vec<(Link, NicFacts)> = links
        .into_iter()
        .filter(Link::is_nic)
        .map(|l| {
            let f = h.net.nic_facts(&l.name);
            (l, f)
        })
        .collect();
    db(s.db.write(|t| {
        if !t.state().exists(class::HOST, host) {
            return Err(ApiError::handle_invalid("host", host));
        }
        for (link, facts) in &nics {
            let st = t.state();
            let known = pifs_of(st, host).into_iter().find(|p| {
                st.get_str(field::pif::MAC, p)
                    .is_some_and(|m| m.eq_ignore_ascii_case(&link.mac))
                    && flag(st, field::pif::PHYSICAL, p)
            });
            match known {
                Some(p) => {
                    write_metrics(t, &p, facts)?;
                }
                None => {
                    introduce_pif(t, host, link, facts, true)?;
                }
            }
        }
        Ok(())
    }))?;
    void()
}

/// `PIF.introduce`: the PIF of one named NIC (whose MAC must match, when
/// given).
pub(crate) async fn pif_introduce(
    s: &Server,
    host: &str,
    mac: &str,
    device: &str,
    managed: bool,
) -> ApiResult {
    if !mac.is_empty() && !corral_net::mac::is_valid(mac) {
        return Err(errors::mac_invalid(mac));
    }
    let h = s.host(host)?;
    let links = h
        .net
        .links()
        .await
        .map_err(|e| driver_errors::network("listing the NICs", e))?;
    let Some(link) = links.into_iter().find(|l| {
        l.name == device && l.is_nic() && (mac.is_empty() || l.mac.eq_ignore_ascii_case(mac))
    }) else {
        return Err(ApiError::invalid_value("device", device));
    };
    let facts = h.net.nic_facts(&link.name);
    let pif = db(s.db.write(|t| {
        let st = t.state();
        if pifs_of(st, host)
            .iter()
            .any(|p| st.get_str(field::pif::DEVICE, p).as_deref() == Some(device))
        {
            return Err(errors::device_already_exists(device));
        }
        introduce_pif(t, host, &link, &facts, managed)
    }))?;
    Ok(Value::String(pif))
}

/// `PIF.plug`: the network's bridge on the PIF's host, the NIC enslaved
/// to it, and the PIF's IPv4 configuration on the bridge.
pub(crate) async fn pif_plug(s: &Server, pif: &str) -> ApiResult {
    {
        let st = s.db.read();
        if st.exists(class::PIF, pif)
            && st
                .get_str(field::pif::BOND_SLAVE_OF, pif)
                .as_deref()
                .unwrap_or(NULL_REF)
                != NULL_REF
        {
            return Err(errors::cannot_plug_bond_slave(pif));
        }
    }
    let (h, kernel, bridge, mtu) = pif_parts(s, pif)?;
    let device = kernel.name().to_owned();
    let mtu = u32::try_from(mtu).unwrap_or(1500);
    h.net
        .ensure_bridge(&bridge, mtu)
        .await
        .map_err(|e| driver_errors::network(&bridge, e))?;
    kernel.realise(&h, mtu).await?;
    h.net
        .set_controller(&device, Some(&bridge))
        .await
        .map_err(|e| driver_errors::network(&device, e))?;
    let addresses = configured_ipv4(&s.db.read(), pif)?;
    h.net
        .set_ipv4(&bridge, addresses)
        .await
        .map_err(|e| driver_errors::network(&bridge, e))?;
    let addresses = configured_ipv6(&s.db.read(), pif);
    if !addresses.is_empty() {
        h.net
            .set_ipv6(&bridge, addresses)
            .await
            .map_err(|e| driver_errors::network(&bridge, e))?;
    }
    let facts = h.net.nic_facts(&device);
    db(s.db.write(|t| {
        t.set(field::pif::CURRENTLY_ATTACHED, pif, Value::Bool(true))?;
        write_metrics(t, pif, &facts).map(|_| ())
    }))?;
    void()
}

/// Start-up: this host's plugged PIFs are plugged again (after a host
/// reboot their bridges, VLANs and bonds are gone; after a corrald
/// restart this finds them there and changes nothing). A PIF that cannot
/// be is left recorded as attached, with a warning.
pub async fn startup(s: &Server) {
    let mine: Vec<String> = {
        let st = s.db.read();
        let mut pifs: Vec<String> = pifs_of(&st, &s.host_ref)
            .into_iter()
            .filter(|p| flag(&st, field::pif::CURRENTLY_ATTACHED, p))
            .collect();
        // Bond masters after the NICs, VLANs after their bases.
        pifs.sort_by_key(|p| match kernel_of(&st, p) {
            Kernel::Nic(_) => 0,
            Kernel::Bond { .. } => 1,
            Kernel::Vlan { .. } => 2,
        });
        pifs
    };
    for pif in mine {
        if let Err(e) = pif_plug(s, &pif).await {
            tracing::warn!(pif = %pif, error = %e, "cannot plug a PIF again at start-up");
        }
    }
}

/// `PIF.unplug`: not the management interface, nor one that forbids it.
pub(crate) async fn pif_unplug(s: &Server, pif: &str) -> ApiResult {
    {
        let st = s.db.read();
        if st.exists(class::PIF, pif) && flag(&st, field::pif::MANAGEMENT, pif) {
            return Err(errors::pif_is_management_interface(pif));
        }
        if flag(&st, field::pif::DISALLOW_UNPLUG, pif) {
            return Err(errors::pif_does_not_allow_unplug(pif));
        }
    }
    pif_unplug_device(s, pif).await?;
    void()
}

/// Takes the PIF's device off its bridge (and away, if Corral made it),
/// and records it detached; no checks.
pub(crate) async fn pif_unplug_device(s: &Server, pif: &str) -> Result<(), ApiError> {
    let (h, kernel, bridge, _) = pif_parts(s, pif)?;
    detach(&h, kernel.name(), &bridge).await?;
    kernel.unrealise(&h).await?;
    db(s.db.write(|t| t.set(field::pif::CURRENTLY_ATTACHED, pif, Value::Bool(false))))
}

pub(crate) async fn detach(h: &HostHandle, device: &str, bridge: &str) -> Result<(), ApiError> {
    match h.net.set_controller(device, None).await {
        // A VLAN or bond device that is not there is not on the bridge.
        Ok(()) | Err(corral_net::NetError::NoDevice(_)) => {}
        Err(e) => return Err(driver_errors::network(device, e)),
    }
    match h.net.set_ipv4(bridge, vec![]).await {
        Ok(()) | Err(corral_net::NetError::NoDevice(_)) => Ok(()),
        Err(e) => Err(driver_errors::network(bridge, e)),
    }
}

/// `PIF.forget`: the record (and its metrics) go; the NIC is freed from
/// the bridge first. Not the management interface.
pub(crate) async fn pif_forget(s: &Server, pif: &str) -> ApiResult {
    let attached = {
        let st = s.db.read();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        if flag(&st, field::pif::MANAGEMENT, pif) {
            return Err(errors::pif_is_management_interface(pif));
        }
        flag(&st, field::pif::CURRENTLY_ATTACHED, pif)
    };
    if attached {
        let (h, kernel, bridge, _) = pif_parts(s, pif)?;
        detach(&h, kernel.name(), &bridge).await?;
        kernel.unrealise(&h).await?;
    }
    db(s.db.write(|t| delete_pif(t, pif)))?;
    void()
}

/// `PIF.destroy` (deprecated): a VLAN's PIF goes with its VLAN; a
/// physical PIF cannot be destroyed.
pub(crate) async fn pif_destroy(s: &Server, pif: &str) -> ApiResult {
    let (physical, vlan) = {
        let st = s.db.read();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        (
            flag(&st, field::pif::PHYSICAL, pif),
            st.get_str(field::pif::VLAN_MASTER_OF, pif)
                .filter(|v| st.exists(class::VLAN, v)),
        )
    };
    match vlan {
        _ if physical => Err(errors::pif_is_physical(pif)),
        Some(v) => vlan::vlan_destroy(s, &v).await,
        None => pif_forget(s, pif).await,
    }
}

/// `host.management_reconfigure`: the PIF (which must have an IPv4
/// configuration) becomes its host's management interface, and the host's
/// address its IP.
pub(crate) fn management_reconfigure(s: &Server, pif: &str) -> ApiResult {
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::PIF, pif) {
            return Err(ApiError::handle_invalid("PIF", pif));
        }
        if st
            .get_str(field::pif::IP_CONFIGURATION_MODE, pif)
            .as_deref()
            == Some("None")
        {
            return Err(errors::pif_has_no_network_configuration(pif));
        }
        let host = st.get_str(field::pif::HOST, pif).unwrap_or_default();
        let ip = st.get_str(field::pif::IP, pif).unwrap_or_default();
        for p in pifs_of(st, &host) {
            t.set(field::pif::MANAGEMENT, &p, Value::Bool(p == pif))?;
        }
        if !ip.is_empty() {
            t.set(field::host::ADDRESS, &host, Value::String(ip))?;
        }
        Ok(())
    }))?;
    void()
}
