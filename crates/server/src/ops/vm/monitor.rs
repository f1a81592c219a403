//! Reacting to the agent: guest shutdowns, crashes and metrics.

use crate::context::Server;
use crate::context::hosts::HostHandle;
use crate::core::driver_errors;
use crate::core::records::db;
use crate::ops::query::{busy, live_on, power, vm_by_uuid, vm_uuid};
use crate::ops::vm::power::halt;
use crate::ops::vm::state::{alert, ensure_metrics, record_stopped, set_paused};
use corral_agent::{RunState, VmEvent};
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, date, new_ref};
use std::collections::HashMap;
use std::sync::Arc;

impl Server {
    /// Marks a VM whose next guest shutdown an operation is waiting for, so
    /// the monitor leaves it to that operation.
    pub(crate) fn expect_shutdown(&self, uuid: &str, on: bool) {
        if let Ok(mut e) = self.expected_shutdowns.lock() {
            if on {
                e.insert(uuid.to_owned());
            } else {
                e.remove(uuid);
            }
        }
    }
    fn shutdown_expected(&self, uuid: &str) -> bool {
        self.expected_shutdowns
            .lock()
            .map(|e| e.contains(uuid))
            .unwrap_or(false)
    }
}

/// Reacts to an event of `h`'s agent about one of its VMs.
pub(crate) async fn on_event(s: &Arc<Server>, h: &HostHandle, uuid: &str, ev: VmEvent) {
    let Some(vm) = vm_by_uuid(s, uuid) else {
        return;
    };
    let action = |f| s.db.read().get_str(f, &vm).unwrap_or_default();
    let r = match ev {
        VmEvent::GuestShutdown if s.shutdown_expected(uuid) => Ok(()),
        VmEvent::GuestShutdown => {
            if action(field::vm::ACTIONS_AFTER_SHUTDOWN) == "restart" {
                h.agent
                    .reset(uuid)
                    .await
                    .map_err(|e| driver_errors::agent(&vm, e))
            } else {
                alert(s, &vm, "VM_SHUTDOWN", 5, "The guest shut itself down");
                halt(s, h, &vm).await
            }
        }
        VmEvent::GuestReboot => {
            if action(field::vm::ACTIONS_AFTER_REBOOT) == "destroy" {
                halt(s, h, &vm).await
            } else {
                h.agent
                    .reset(uuid)
                    .await
                    .map_err(|e| driver_errors::agent(&vm, e))
            }
        }
        // QEMU reset the guest itself (the VM started with
        // actions_after_reboot=restart); if the field was changed to destroy
        // since, the reboot ends the VM now (not during VM.clean_reboot).
        VmEvent::GuestRebooted
            if action(field::vm::ACTIONS_AFTER_REBOOT) == "destroy" && !busy(s, &vm) =>
        {
            alert(
                s,
                &vm,
                "VM_SHUTDOWN",
                5,
                "The guest rebooted; actions_after_reboot=destroy halted it",
            );
            halt(s, h, &vm).await
        }
        VmEvent::GuestRebooted => {
            alert(s, &vm, "VM_REBOOTED", 5, "The guest rebooted itself");
            Ok(())
        }
        VmEvent::GuestCrash => {
            alert(s, &vm, "VM_CRASHED", 2, "The guest crashed (pvpanic)");
            match action(field::vm::ACTIONS_AFTER_CRASH).as_str() {
                "preserve" => set_paused(s, &vm, true),
                "restart" | "coredump_and_restart" | "rename_restart" => h
                    .agent
                    .reset(uuid)
                    .await
                    .map_err(|e| driver_errors::agent(&vm, e)),
                _ => halt(s, h, &vm).await,
            }
        }
        VmEvent::Paused | VmEvent::Resumed if busy(s, &vm) => Ok(()),
        VmEvent::Paused | VmEvent::Resumed => {
            let p = power(&s.db.read(), &vm);
            let paused = ev == VmEvent::Paused;
            if (p == VmPowerState::Running && paused) || (p == VmPowerState::Paused && !paused) {
                // Someone outside the toolstack paused or resumed it; the
                // database follows what the guest does.
                match h.agent.state(uuid).await {
                    Ok(RunState::Paused) => set_paused(s, &vm, true),
                    Ok(RunState::Running) => set_paused(s, &vm, false),
                    _ => Ok(()),
                }
            } else {
                Ok(())
            }
        }
        VmEvent::Died(why) => {
            if s.shutdown_expected(uuid) {
                s.expect_shutdown(uuid, false);
            }
            let p = power(&s.db.read(), &vm);
            if p == VmPowerState::Running || p == VmPowerState::Paused {
                let _ = h.agent.destroy(uuid).await;
                alert(
                    s,
                    &vm,
                    "VM_CRASHED",
                    2,
                    &format!(
                        "The VM's QEMU process ended unexpectedly ({why}); the VM is now halted."
                    ),
                );
                record_stopped(s, &vm, VmPowerState::Halted, None)
            } else {
                Ok(())
            }
        }
    };
    if let Err(e) = r {
        tracing::warn!(vm = %uuid, error = %e, "handling a VM event failed");
    }
}

/// Reads guest statistics of every running VM into VM_metrics and
/// VM_guest_metrics. Unknown values stay unknown (absent), never 100 % used.
/// All VMs go into one transaction that writes only what changed, so an idle
/// pool commits nothing and wakes no event clients.
pub async fn refresh_metrics(s: &Arc<Server>) {
    let running: Vec<(String, String, String)> = {
        let st = s.db.read();
        st.refs(class::VM)
            .filter(|vm| power(&st, vm) == VmPowerState::Running)
            .filter_map(|vm| Some((live_on(&st, vm)?, vm.clone(), vm_uuid(&st, vm))))
            .collect()
    };
    let mut stats = Vec::with_capacity(running.len());
    let mut rates: Vec<(String, f64, f64)> = Vec::new();
    let mut hosts: HashMap<String, Option<HostHandle>> = HashMap::new();
    for (host, vm, uuid) in running {
        // A host that cannot be reached keeps its last figures.
        let h = hosts.entry(host).or_insert_with_key(|h| s.host(h).ok());
        let Some(h) = h else { continue };
        // The VIFs' traffic, as the host's taps count it: what a tap
        // receives, the guest sent.
        let vifs: Vec<(String, u32)> = {
            let st = s.db.read();
            crate::ops::vif::vifs_of(&st, &vm)
                .into_iter()
                .filter(|v| {
                    st.get(field::vif::CURRENTLY_ATTACHED, v)
                        .and_then(|x| x.as_bool())
                        .unwrap_or(false)
                })
                .filter_map(|v| {
                    let d = st.get_str(field::vif::DEVICE, &v)?.parse().ok()?;
                    Some((v, d))
                })
                .collect()
        };
        for (vif, device) in vifs {
            if let Some(r) = h
                .net
                .link_rates(&corral_net::names::tap_name(&uuid, device))
            {
                rates.push((vif, r.tx_kib_s, r.rx_kib_s));
            }
        }
        if let Ok(g) = h.agent.stats(&uuid).await {
            stats.push((vm, g));
        }
    }
    let _ = db(s.db.write(|t| {
        for (vm, g) in &stats {
            // Stopped or destroyed while we were asking.
            if !t.state().exists(class::VM, vm) || power(t.state(), vm) != VmPowerState::Running {
                continue;
            }
            write_guest_stats(t, vm, g)?;
        }
        for (vif, read, write) in &rates {
            crate::ops::vif::write_vif_rates(t, vif, *read, *write)?;
        }
        Ok(())
    }));
}

/// XenAPI's `VM_guest_metrics.networks` from the guest's interfaces: each
/// keyed by the device of the VIF with its MAC (`0/ip` the first IPv4
/// address, `0/ipv4/N`, `0/ipv6/N`); interfaces no VIF has are left out.
pub(crate) fn guest_networks(
    interfaces: &[corral_agent::GuestInterface],
    vifs: &[(String, String)],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut by_device: Vec<(&str, &corral_agent::GuestInterface)> = interfaces
        .iter()
        .filter_map(|i| {
            let (device, _) = vifs
                .iter()
                .find(|(_, mac)| mac.eq_ignore_ascii_case(&i.mac))?;
            Some((device.as_str(), i))
        })
        .collect();
    by_device.sort_by_key(|(d, _)| d.parse::<u32>().unwrap_or(u32::MAX));
    for (device, i) in by_device {
        if let Some(first) = i.ipv4.first() {
            out.push((format!("{device}/ip"), first.clone()));
        }
        for (n, a) in i.ipv4.iter().enumerate() {
            out.push((format!("{device}/ipv4/{n}"), a.clone()));
        }
        for (n, a) in i.ipv6.iter().enumerate() {
            out.push((format!("{device}/ipv6/{n}"), a.clone()));
        }
    }
    out
}

pub(crate) fn write_guest_stats(
    t: &mut corral_db::Txn<'_>,
    vm: &str,
    g: &corral_agent::GuestStats,
) -> Result<(), ApiError> {
    let metrics = ensure_metrics(t, vm)?;
    if let Some(a) = g.memory_actual {
        if t.set_if_changed(field::vm_metrics::MEMORY_ACTUAL, &metrics, Value::Int(a))? {
            t.set(
                field::vm_metrics::LAST_UPDATED,
                &metrics,
                Value::DateTime(date::now()),
            )?;
        }
    }
    let mut memory: Vec<(String, String)> = Vec::new();
    if let Some(tot) = g.memory_total {
        memory.push(("total".into(), (tot / 1024).to_string()));
    }
    if let Some(free) = g.memory_free {
        memory.push(("free".into(), (free / 1024).to_string()));
    }
    if memory.is_empty() && !g.agent {
        return Ok(());
    }
    let gm = {
        let cur = t
            .state()
            .get_str(field::vm::GUEST_METRICS, vm)
            .unwrap_or_default();
        if t.state().exists(class::VM_GUEST_METRICS, &cur) {
            cur
        } else {
            let r = new_ref();
            t.create(class::VM_GUEST_METRICS, &r, vec![])?;
            t.set(field::vm::GUEST_METRICS, vm, Value::str(&r))?;
            r
        }
    };
    let map = |v: &[(String, String)]| {
        Value::Struct(
            v.iter()
                .map(|(k, x)| (k.clone(), Value::String(x.clone())))
                .collect(),
        )
    };
    let mut changed = t.set_if_changed(field::vm_guest_metrics::MEMORY, &gm, map(&memory))?;
    if g.agent {
        changed |=
            t.set_if_changed(field::vm_guest_metrics::OS_VERSION, &gm, map(&g.os_version))?;
        let vifs: Vec<(String, String)> = crate::ops::vif::vifs_of(t.state(), vm)
            .iter()
            .filter_map(|v| {
                let st = t.state();
                Some((
                    st.get_str(field::vif::DEVICE, v)?,
                    st.get_str(field::vif::MAC, v)?,
                ))
            })
            .collect();
        let networks = guest_networks(&g.interfaces, &vifs);
        changed |= t.set_if_changed(field::vm_guest_metrics::NETWORKS, &gm, map(&networks))?;
    }
    changed |= t.set_if_changed(
        field::vm_guest_metrics::PV_DRIVERS_DETECTED,
        &gm,
        Value::Bool(g.agent),
    )?;
    changed |= t.set_if_changed(field::vm_guest_metrics::LIVE, &gm, Value::Bool(g.agent))?;
    if changed {
        t.set(
            field::vm_guest_metrics::LAST_UPDATED,
            &gm,
            Value::DateTime(date::now()),
        )?;
    }
    Ok(())
}

/// Follows `h`'s agent: each VM event is handled as it comes (this host's
/// own agent from start-up; another host's once the pool link reaches it).
pub fn watch_host(s: &Arc<Server>, h: HostHandle) {
    let mut rx = h.agent.events();
    let srv = Arc::clone(s);
    tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok((uuid, ev)) => {
                    let (srv, h) = (Arc::clone(&srv), h.clone());
                    tokio::spawn(async move { on_event(&srv, &h, &uuid, ev).await });
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::guest_networks;
    use corral_agent::GuestInterface;

    fn iface(mac: &str, v4: &[&str], v6: &[&str]) -> GuestInterface {
        GuestInterface {
            mac: mac.into(),
            ipv4: v4.iter().map(|s| s.to_string()).collect(),
            ipv6: v6.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn guest_addresses_are_keyed_by_the_vifs_device() {
        let vifs = vec![
            ("0".to_string(), "96:d5:c7:dc:29:39".to_string()),
            ("3".to_string(), "0E:14:6A:EF:B6:A0".to_string()),
        ];
        let cases: Vec<(Vec<GuestInterface>, Vec<(&str, &str)>)> = vec![
            (vec![], vec![]),
            // The guest lists device 3's NIC first, and one no VIF has.
            (
                vec![
                    iface("0e:14:6a:ef:b6:a0", &["198.18.1.3"], &["fe80::1"]),
                    iface("02:00:00:00:00:99", &["198.18.9.9"], &[]),
                    iface("96:d5:c7:dc:29:39", &["198.18.1.1", "198.18.1.2"], &[]),
                ],
                vec![
                    ("0/ip", "198.18.1.1"),
                    ("0/ipv4/0", "198.18.1.1"),
                    ("0/ipv4/1", "198.18.1.2"),
                    ("3/ip", "198.18.1.3"),
                    ("3/ipv4/0", "198.18.1.3"),
                    ("3/ipv6/0", "fe80::1"),
                ],
            ),
            // No IPv4 address: no `/ip` key.
            (
                vec![iface("96:d5:c7:dc:29:39", &[], &["2001:db8::5"])],
                vec![("0/ipv6/0", "2001:db8::5")],
            ),
        ];
        for (ifaces, want) in cases {
            let got = guest_networks(&ifaces, &vifs);
            let want: Vec<(String, String)> = want
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(got, want);
        }
    }
}
