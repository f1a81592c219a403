//! NIC hot-plug: the tap handed to a running QEMU over QMP (`getfd`), then
//! its backend and device; unplug waits for the guest unless forced.

use crate::qemu::QemuAgent;
use crate::{AgentError, Nic};
use serde_json::json;

impl QemuAgent {
    pub(crate) async fn hotplug_nic(&self, vm: &str, nic: Nic) -> Result<(), AgentError> {
        if !corral_net::mac::is_valid(&nic.mac) || !crate::NIC_MODELS.contains(&nic.model.as_str())
        {
            return Err(AgentError::Other(format!("NIC {}: refused", nic.device)));
        }
        let at = self.attached(vm)?;
        let tap = self
            .net
            .open_tap(
                &corral_net::names::tap_name(vm, nic.device),
                &nic.bridge,
                nic.mtu,
            )
            .await
            .map_err(|e| AgentError::Other(e.to_string()))?;
        let (fdname, netdev, id) = (
            format!("tap-vif{}", nic.device),
            format!("vif{}", nic.device),
            format!("nic{}", nic.device),
        );
        use std::os::fd::AsFd;
        at.qmp
            .execute_with_fd("getfd", json!({"fdname": fdname}), tap.as_fd())
            .await?;
        if let Err(e) = at
            .qmp
            .execute(
                "netdev_add",
                json!({"type": "tap", "id": netdev, "fd": fdname}),
            )
            .await
        {
            let _ = at.qmp.execute("closefd", json!({"fdname": fdname})).await;
            return Err(e.into());
        }
        let dev = json!({"driver": nic.model, "id": id, "netdev": netdev, "mac": nic.mac.to_ascii_lowercase()});
        if let Err(e) = at.qmp.execute("device_add", dev).await {
            let _ = at.qmp.execute("netdev_del", json!({"id": netdev})).await;
            return Err(e.into());
        }
        // QEMU holds the tap now.
        drop(tap);
        Ok(())
    }

    pub(crate) async fn unplug_nic(
        &self,
        vm: &str,
        device: u32,
        force: bool,
    ) -> Result<(), AgentError> {
        let at = self.attached(vm)?;
        let (netdev, id) = (format!("vif{device}"), format!("nic{device}"));
        let wait = (!force).then_some(crate::qemu::UNPLUG_WAIT);
        // Until the guest lets it go, the device stays (and its backend).
        if !at.unplug(&id, wait).await? && !force {
            return Err(AgentError::Rejected(id));
        }
        // Forced: the backend goes at once, and the tap with it.
        at.qmp.execute("netdev_del", json!({"id": netdev})).await?;
        Ok(())
    }
}
