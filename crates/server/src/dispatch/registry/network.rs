//! The network and VIF handlers.

use crate::dispatch::registry::{Table, untyped_async, untyped_sync};
use crate::ops::network::{network_create, network_destroy};
use crate::ops::pif;
use crate::ops::vif::{allowed_vif_devices, vif_create, vif_destroy, vif_plug, vif_unplug};
use corral_model::Value;
use corral_model::args::{bond, host, pif as pif_args, pool, vif, vlan, vm};

pub fn register(t: &mut Table) {
    t.untyped(
        "network.create",
        untyped_sync(|s, _, p| network_create(s, p)),
    );
    t.untyped(
        "network.destroy",
        untyped_async(|s, _, p| Box::pin(async move { network_destroy(&s, p).await })),
    );
    t.untyped("VIF.create", untyped_sync(|s, _, p| vif_create(s, p)));
    t.untyped("VIF.destroy", untyped_sync(|s, _, p| vif_destroy(s, p)));
    t.on(|s, _, a: pif_args::Scan| async move { pif::pif_scan(&s, a.host.as_str()).await });
    t.on(|s, _, a: pif_args::Introduce| async move {
        pif::pif_introduce(&s, a.host.as_str(), &a.mac, &a.device, a.managed).await
    });
    t.on(|s, _, a: pif_args::Forget| async move { pif::pif_forget(&s, a.self_.as_str()).await });
    t.on(|s, _, a: pif_args::Destroy| async move { pif::pif_destroy(&s, a.self_.as_str()).await });
    t.on(|s, _, a: pif_args::Plug| async move { pif::pif_plug(&s, a.self_.as_str()).await });
    t.on(|s, _, a: pif_args::Unplug| async move { pif::pif_unplug(&s, a.self_.as_str()).await });
    t.on(|s, _, a: pif_args::ReconfigureIp| async move {
        pif::pif_reconfigure_ip(
            &s,
            a.self_.as_str(),
            a.mode,
            &a.ip,
            &a.netmask,
            &a.gateway,
            &a.dns,
        )
        .await
    });
    t.on(|s, _, a: pif_args::ReconfigureIpv6| async move {
        pif::address::pif_reconfigure_ipv6(
            &s,
            a.self_.as_str(),
            a.mode,
            &a.ipv6,
            &a.gateway,
            &a.dns,
        )
        .await
    });
    t.on_sync(|s, _, a: host::ManagementReconfigure| {
        pif::management_reconfigure(s, a.pif.as_str())
    });
    t.on(|s, _, a: vif::Plug| async move { vif_plug(&s, a.self_.as_str()).await });
    t.on(|s, _, a: vif::Unplug| async move { vif_unplug(&s, a.self_.as_str(), false).await });
    t.on(|s, _, a: vif::Move| async move {
        crate::ops::vif::port::vif_move(&s, a.self_.as_str(), a.network.as_str()).await
    });
    t.on(|s, _, a: vif::UnplugForce| async move { vif_unplug(&s, a.self_.as_str(), true).await });
    t.on(|s, _, a: vif::ConfigureIpv4| async move {
        crate::ops::vif::port::configure_ip(
            &s,
            a.self_.as_str(),
            false,
            a.mode.as_str(),
            &a.address,
            &a.gateway,
        )
    });
    t.on(|s, _, a: vif::ConfigureIpv6| async move {
        crate::ops::vif::port::configure_ip(
            &s,
            a.self_.as_str(),
            true,
            a.mode.as_str(),
            &a.address,
            &a.gateway,
        )
    });
    t.on(|s, _, a: vlan::Create| async move {
        pif::vlan::vlan_create(&s, a.tagged_pif.as_str(), a.tag, a.network.as_str()).await
    });
    t.on(
        |s, _, a: vlan::Destroy| async move { pif::vlan::vlan_destroy(&s, a.self_.as_str()).await },
    );
    t.on(|s, _, a: pool::CreateVLANFromPIF| async move {
        pif::vlan::pool_create_vlan_from_pif(&s, a.pif.as_str(), a.network.as_str(), a.vlan).await
    });
    t.on(|s, _, a: pool::CreateVLAN| async move {
        pif::vlan::pool_create_vlan(&s, &a.device, a.network.as_str(), a.vlan).await
    });
    t.on(|s, _, a: pif_args::CreateVLAN| async move {
        pif::vlan::pif_create_vlan(&s, &a.device, a.network.as_str(), a.host.as_str(), a.vlan).await
    });
    t.on(|s, _, a: bond::Create| async move {
        let members = a.members.iter().map(|m| m.as_str().to_owned()).collect();
        let props = a.properties.into_iter().collect();
        pif::bond::bond_create(
            &s,
            a.network.as_str(),
            members,
            &a.mac,
            a.mode.as_str(),
            props,
        )
        .await
    });
    t.on(
        |s, _, a: bond::Destroy| async move { pif::bond::bond_destroy(&s, a.self_.as_str()).await },
    );
    t.on(|s, _, a: bond::SetMode| async move {
        pif::bond::bond_set_mode(&s, a.self_.as_str(), a.value.as_str()).await
    });
    t.on_sync(|s, _, a: vm::GetAllowedVBDDevices| {
        let devices = crate::ops::vbd::allowed_vbd_devices(&s.db.read(), a.vm.as_str());
        Ok(Value::string_set(devices.iter().map(String::as_str)))
    });
    t.on_sync(|s, _, a: vm::GetAllowedVIFDevices| {
        let devices = allowed_vif_devices(&s.db.read(), a.vm.as_str());
        Ok(Value::string_set(devices.iter().map(String::as_str)))
    });
}
