//! Bonds: `Bond.create`/`destroy`/`set_mode`. A bond is a master PIF
//! (`bondN`) on the bond's network over two or more member PIFs of one
//! host, realised as a Linux bonding device on that network's bridge. The
//! primary member's IP configuration and management role move to the
//! master, and back when the bond goes.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::records::db;
use crate::ops::pif::{delete_pif, flag, pif_parts, pif_plug, pif_unplug_device, pifs_of};
use crate::ops::query::{refs_in, strmap};
use corral_model::errors;
use corral_model::schema::{FieldId, class, field};
use corral_model::{ApiError, NULL_REF, Value, new_ref};
use corral_net::{BondMode, BondSpec};

/// The mode's Linux settings, from the Bond record and its master PIF.
pub(crate) fn spec_of(st: &corral_db::State, bond: &str, master: &str) -> BondSpec {
    let props = strmap(st.get(field::bond::PROPERTIES, bond));
    BondSpec {
        mode: mode_of(&st.get_str(field::bond::MODE, bond).unwrap_or_default()),
        lacp_fast: props.get("lacp-time").map(String::as_str) == Some("fast"),
        hash_src_mac: props.get("hashing_algorithm").map(String::as_str) == Some("src_mac"),
        mac: corral_net::mac::parse(&st.get_str(field::pif::MAC, master).unwrap_or_default())
            .unwrap_or([0x02, 0, 0, 0, 0, 1]),
        mtu: st
            .get(field::pif::MTU, master)
            .and_then(|v| v.as_int())
            .and_then(|m| u32::try_from(m).ok())
            .unwrap_or(1500),
    }
}

fn mode_of(mode: &str) -> BondMode {
    match mode {
        "active-backup" => BondMode::ActiveBackup,
        "lacp" => BondMode::Lacp,
        _ => BondMode::BalanceSlb,
    }
}

/// The IP configuration fields that move between a member and the master.
const IP_FIELDS: [FieldId; 10] = [
    field::pif::IP_CONFIGURATION_MODE,
    field::pif::IP,
    field::pif::NETMASK,
    field::pif::GATEWAY,
    field::pif::DNS,
    field::pif::IPV6_CONFIGURATION_MODE,
    field::pif::IPV6,
    field::pif::IPV6_GATEWAY,
    field::pif::PRIMARY_ADDRESS_TYPE,
    field::pif::MANAGEMENT,
];

fn has_ip(st: &corral_db::State, pif: &str) -> bool {
    st.get_str(field::pif::IP_CONFIGURATION_MODE, pif)
        .is_some_and(|m| m != "None")
        || st
            .get_str(field::pif::IPV6_CONFIGURATION_MODE, pif)
            .is_some_and(|m| m != "None")
}

/// Copies the IP configuration (and management role) of `from` to `to`
/// and leaves `from` with none.
fn move_ip(t: &mut corral_db::Txn<'_>, from: &str, to: &str) -> Result<(), ApiError> {
    for f in IP_FIELDS {
        if let Some(v) = t.state().get(f, from) {
            t.set(f, to, v)?;
        }
    }
    t.set(field::pif::IP_CONFIGURATION_MODE, from, Value::str("None"))?;
    t.set(
        field::pif::IPV6_CONFIGURATION_MODE,
        from,
        Value::str("None"),
    )?;
    for f in [
        field::pif::IP,
        field::pif::NETMASK,
        field::pif::GATEWAY,
        field::pif::DNS,
    ] {
        t.set(f, from, Value::str(""))?;
    }
    t.set(field::pif::IPV6, from, Value::Array(vec![]))?;
    t.set(field::pif::MANAGEMENT, from, Value::Bool(false))
}

/// XAPI's checks, in its order; the members' host and the primary member.
fn check_create(
    st: &corral_db::State,
    network: &str,
    members: &[String],
    mac: &str,
) -> Result<(String, String), ApiError> {
    if !st.exists(class::NETWORK, network) {
        return Err(ApiError::handle_invalid("network", network));
    }
    for m in members {
        if !st.exists(class::PIF, m) {
            return Err(ApiError::handle_invalid("PIF", m));
        }
    }
    if !mac.is_empty() && !corral_net::mac::is_valid(mac) {
        return Err(errors::mac_invalid(mac));
    }
    if members.len() < 2 {
        return Err(errors::pif_bond_needs_more_members());
    }
    let host = st
        .get_str(field::pif::HOST, &members[0])
        .unwrap_or_default();
    if members
        .iter()
        .any(|m| st.get_str(field::pif::HOST, m).as_deref() != Some(host.as_str()))
    {
        return Err(errors::pif_cannot_bond_cross_host());
    }
    for m in members {
        if st
            .get_str(field::pif::BOND_SLAVE_OF, m)
            .as_deref()
            .unwrap_or(NULL_REF)
            != NULL_REF
        {
            return Err(errors::pif_already_bonded(m.as_str()));
        }
        if st
            .get(field::pif::VLAN, m)
            .and_then(|v| v.as_int())
            .unwrap_or(-1)
            >= 0
        {
            return Err(errors::pif_is_vlan(m.as_str()));
        }
        if !refs_in(st, field::pif::BOND_MASTER_OF, m).is_empty() {
            return Err(errors::pif_already_bonded(m.as_str()));
        }
    }
    if members.iter().filter(|m| has_ip(st, m)).count() > 1 {
        return Err(errors::pif_bond_more_than_one_ip());
    }
    if let Some(p) = pifs_of(st, &host)
        .into_iter()
        .find(|p| st.get_str(field::pif::NETWORK, p).as_deref() == Some(network))
    {
        return Err(errors::network_already_connected(network, p.as_str()));
    }
    // The primary member: the management interface, else the one with an
    // IP configuration, else the first.
    let primary = members
        .iter()
        .find(|m| flag(st, field::pif::MANAGEMENT, m))
        .or_else(|| members.iter().find(|m| has_ip(st, m)))
        .unwrap_or(&members[0])
        .clone();
    Ok((host, primary))
}

/// The first `bondN` no PIF of the host is called.
fn free_bond_device(st: &corral_db::State, host: &str) -> String {
    let used: Vec<String> = pifs_of(st, host)
        .iter()
        .filter_map(|p| st.get_str(field::pif::DEVICE, p))
        .collect();
    (0..)
        .map(|n| format!("bond{n}"))
        .find(|d| !used.contains(d))
        .unwrap_or_else(|| "bond0".into())
}

/// `Bond.create`: the records first (members detached, the primary's IP
/// and role on the master), then the members leave their bridges and the
/// master is plugged; if the host cannot make the bond, all is undone.
pub(crate) async fn bond_create(
    s: &Server,
    network: &str,
    members: Vec<String>,
    mac: &str,
    mode: &str,
    properties: Vec<(String, String)>,
) -> ApiResult {
    let mut members = members;
    members.dedup();
    let (bond, master) = (new_ref(), new_ref());
    let attached: Vec<String> = {
        let st = s.db.read();
        members
            .iter()
            .filter(|m| flag(&st, field::pif::CURRENTLY_ATTACHED, m))
            .cloned()
            .collect()
    };
    db(s.db.write(|t| {
        let (host, primary) = check_create(t.state(), network, &members, mac)?;
        let st = t.state();
        let device = free_bond_device(st, &host);
        let bond_mac = if mac.is_empty() {
            st.get_str(field::pif::MAC, &primary).unwrap_or_default()
        } else {
            mac.to_ascii_lowercase()
        };
        let mtu = st
            .get(field::pif::MTU, &primary)
            .and_then(|v| v.as_int())
            .unwrap_or(1500);
        let mut props: Vec<(String, Value)> = properties
            .iter()
            .map(|(k, v)| (k.clone(), Value::str(v)))
            .collect();
        if mode == "lacp" {
            for (k, d) in [("hashing_algorithm", "tcpudp_ports"), ("lacp-time", "slow")] {
                if !props.iter().any(|(x, _)| x == k) {
                    props.push((k.into(), Value::str(d)));
                }
            }
        }
        t.create(
            class::PIF,
            &master,
            vec![
                (field::pif::DEVICE.index, Value::String(device)),
                (field::pif::NETWORK.index, Value::str(network)),
                (field::pif::HOST.index, Value::str(&host)),
                (field::pif::MAC.index, Value::String(bond_mac)),
                (field::pif::MTU.index, Value::Int(mtu)),
                (field::pif::VLAN.index, Value::Int(-1)),
                (field::pif::PHYSICAL.index, Value::Bool(false)),
                (field::pif::CURRENTLY_ATTACHED.index, Value::Bool(false)),
                (field::pif::METRICS.index, Value::str(NULL_REF)),
            ],
        )?;
        t.create(
            class::BOND,
            &bond,
            vec![
                (field::bond::MASTER.index, Value::str(&master)),
                (field::bond::PRIMARY_SLAVE.index, Value::str(&primary)),
                (field::bond::MODE.index, Value::str(mode)),
                (field::bond::PROPERTIES.index, Value::Struct(props)),
                (
                    field::bond::AUTO_UPDATE_MAC.index,
                    Value::Bool(mac.is_empty()),
                ),
            ],
        )?;
        move_ip(t, &primary, &master)?;
        for m in &members {
            t.set(field::pif::BOND_SLAVE_OF, m, Value::str(&bond))?;
            t.set(field::pif::CURRENTLY_ATTACHED, m, Value::Bool(false))?;
        }
        Ok(())
    }))?;
    let realised = async {
        for m in &attached {
            let (h, kernel, bridge, _) = pif_parts(s, m)?;
            crate::ops::pif::detach(&h, kernel.name(), &bridge).await?;
        }
        pif_plug(s, &master).await
    };
    if let Err(e) = realised.await {
        if let Ok((h, kernel, _, _)) = pif_parts(s, &master) {
            let _ = h.net.remove_link(kernel.name()).await;
        }
        let _ = undo(s, &bond, &master, &members).await;
        for m in &attached {
            let _ = pif_plug(s, m).await;
        }
        return Err(e);
    }
    let n = i64::try_from(members.len()).unwrap_or(0);
    db(s.db.write(|t| t.set(field::bond::LINKS_UP, &bond, Value::Int(n))))?;
    Ok(Value::String(bond))
}

/// The bond's records go; the primary member gets its IP configuration
/// and role back, every member its freedom.
async fn undo(s: &Server, bond: &str, master: &str, members: &[String]) -> Result<(), ApiError> {
    db(s.db.write(|t| {
        let primary = t
            .state()
            .get_str(field::bond::PRIMARY_SLAVE, bond)
            .unwrap_or_default();
        if t.state().exists(class::PIF, &primary) && t.state().exists(class::PIF, master) {
            move_ip(t, master, &primary)?;
        }
        for m in members {
            if t.state().exists(class::PIF, m) {
                t.set(field::pif::BOND_SLAVE_OF, m, Value::str(NULL_REF))?;
            }
        }
        delete_pif(t, master)?;
        if t.state().exists(class::BOND, bond) {
            t.delete(class::BOND, bond)?;
        }
        Ok(())
    }))
}

/// `Bond.destroy`: the bond device goes, then the records; the members
/// are plugged into their own networks again.
pub(crate) async fn bond_destroy(s: &Server, bond: &str) -> ApiResult {
    let (master, members) = {
        let st = s.db.read();
        if !st.exists(class::BOND, bond) {
            return Err(ApiError::handle_invalid("Bond", bond));
        }
        (
            st.get_str(field::bond::MASTER, bond).unwrap_or_default(),
            refs_in(&st, field::bond::SLAVES, bond),
        )
    };
    if s.db.read().exists(class::PIF, &master) {
        pif_unplug_device(s, &master).await?;
    }
    undo(s, bond, &master, &members).await?;
    for m in &members {
        if let Err(e) = pif_plug(s, m).await {
            tracing::warn!(pif = %m, error = %e, "a former bond member could not be plugged");
        }
    }
    void()
}

/// `Bond.set_mode`: the record, and the device at once if plugged.
pub(crate) async fn bond_set_mode(s: &Server, bond: &str, mode: &str) -> ApiResult {
    let (master, attached) = db(s.db.write(|t| {
        if !t.state().exists(class::BOND, bond) {
            return Err(ApiError::handle_invalid("Bond", bond));
        }
        t.set(field::bond::MODE, bond, Value::str(mode))?;
        let master = t
            .state()
            .get_str(field::bond::MASTER, bond)
            .unwrap_or_default();
        let attached = flag(t.state(), field::pif::CURRENTLY_ATTACHED, &master);
        Ok((master, attached))
    }))?;
    if attached {
        pif_plug(s, &master).await?;
    }
    void()
}
