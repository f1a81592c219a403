//! The SR, PBD, VDI and VBD handlers, each with its message's argument
//! struct (the implicit constructors and destructors take their record).

use crate::core::call::void;
use crate::core::records::first;
use crate::dispatch::registry::{Table, untyped_async, untyped_sync};
use crate::ops::pbd::{pbd_create, pbd_destroy, pbd_plug, pbd_unplug};
use crate::ops::sr::{sr_create, sr_destroy, sr_forget, sr_introduce, sr_probe, sr_upgrade};
use crate::ops::storage::scan::{sr_scan, sr_update};
use crate::ops::vbd::{vbd_create, vbd_destroy, vbd_set_mode};
use crate::ops::vdi::copy::vdi_copy;
use crate::ops::vdi::snapshot::vdi_snapshot;
use crate::ops::vdi::{vdi_create, vdi_destroy, vdi_forget, vdi_introduce, vdi_resize, vdi_update};
use corral_model::Value;
use corral_model::args::{pbd, sr, vdi};

pub fn register(t: &mut Table) {
    t.on(|s, _, a: sr::Create| sr_create(s, a));
    t.on(|s, _, a: sr::Introduce| async move { sr_introduce(&s, a) });
    t.on(|s, _, a: sr::Forget| async move { sr_forget(s, a.sr.as_str()).await });
    t.on(|s, _, a: sr::Destroy| async move { sr_destroy(s, a.sr.as_str()).await });
    t.on(|s, _, a: sr::Scan| async move {
        sr_scan(&s, a.sr.as_str()).await?;
        void()
    });
    t.on(|s, _, a: sr::Update| async move {
        sr_update(&s, a.sr.as_str()).await?;
        void()
    });
    t.on(|s, _, a: sr::Probe| sr_probe(s, a));
    t.on(|s, _, a: sr::Upgrade| async move { sr_upgrade(s, a.sr.as_str()).await });
    t.on_sync(|_, _, _: sr::GetSupportedTypes| {
        Ok(Value::string_set(
            corral_storage::driver_kinds().iter().copied(),
        ))
    });
    t.untyped("PBD.create", untyped_sync(|s, _, p| pbd_create(s, p)));
    t.untyped("PBD.destroy", untyped_sync(|s, _, p| pbd_destroy(s, p)));
    t.on(|s, _, a: pbd::Plug| async move {
        pbd_plug(&s, a.self_.as_str()).await?;
        void()
    });
    t.on(|s, _, a: pbd::Unplug| async move {
        pbd_unplug(&s, a.self_.as_str()).await?;
        void()
    });
    t.untyped(
        "VDI.create",
        untyped_async(|s, _, p| Box::pin(vdi_create(s, p))),
    );
    t.untyped(
        "VDI.destroy",
        untyped_async(|s, _, p| Box::pin(async move { vdi_destroy(s, &first(p)).await })),
    );
    t.on(|s, _, a: vdi::Snapshot| async move { vdi_snapshot(&s, a.vdi.as_str(), true).await });
    t.on(|s, _, a: vdi::Clone| async move { vdi_snapshot(&s, a.vdi.as_str(), false).await });
    t.on(|s, _, a: vdi::Resize| async move { vdi_resize(s, a.vdi.as_str(), a.size).await });
    t.on(|s, _, a: vdi::ResizeOnline| async move { vdi_resize(s, a.vdi.as_str(), a.size).await });
    t.on(vdi_copy);
    t.on(|s, _, a: vdi::Introduce| vdi_introduce(s, a));
    t.on(|s, _, a: vdi::Forget| async move { vdi_forget(&s, a.vdi.as_str()) });
    t.on(|s, _, a: vdi::Update| async move { vdi_update(s, a.vdi.as_str()).await });
    t.untyped("VBD.create", untyped_sync(|s, _, p| vbd_create(s, p)));
    t.untyped("VBD.destroy", untyped_sync(|s, _, p| vbd_destroy(s, p)));
    // A setter with checks of its own: implicit, so without a struct.
    t.untyped("VBD.set_mode", untyped_sync(|s, _, p| vbd_set_mode(s, p)));
}
