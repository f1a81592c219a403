//! The SR, PBD, VDI and VBD handlers.

use crate::context::{Handler, Server};
use crate::core::call::{BoxFut, Ctx};
use crate::core::records::first;
use crate::ops::pbd::{pbd_create, pbd_destroy, pbd_plug, pbd_unplug};
use crate::ops::sr::{sr_create, sr_destroy, sr_forget, sr_introduce, sr_probe, sr_upgrade};
use crate::ops::storage::scan::{sr_scan, sr_update};
use crate::ops::vbd::{vbd_create, vbd_destroy, vbd_set_mode};
use crate::ops::vdi::copy::vdi_copy;
use crate::ops::vdi::snapshot::vdi_snapshot;
use crate::ops::vdi::{vdi_create, vdi_destroy, vdi_forget, vdi_introduce, vdi_resize, vdi_update};
use corral_model::Value;
use std::collections::HashMap;
use std::sync::Arc;

pub fn register(t: &mut HashMap<String, Handler>) {
    let mut a = |n: &str, f: fn(Arc<Server>, Ctx, Vec<Value>) -> BoxFut| {
        t.insert(n.to_owned(), Handler::Async(f));
    };
    a("SR.create", |s, c, p| Box::pin(sr_create(s, c, p)));
    a("SR.introduce", |s, _, p| {
        Box::pin(async move { sr_introduce(&s, p) })
    });
    a("SR.forget", |s, _, p| Box::pin(sr_forget(s, p)));
    a("SR.destroy", |s, _, p| Box::pin(sr_destroy(s, p)));
    a("SR.scan", |s, _, p| {
        Box::pin(async move { sr_scan(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("SR.update", |s, _, p| {
        Box::pin(async move { sr_update(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("SR.probe", |s, _, p| Box::pin(sr_probe(s, p)));
    a("SR.upgrade", |s, _, p| Box::pin(sr_upgrade(s, p)));
    a("SR.get_supported_types", |_, _, _| {
        Box::pin(async {
            Ok(Value::string_set(
                corral_storage::driver_kinds().iter().copied(),
            ))
        })
    });
    a("PBD.create", |s, _, p| {
        Box::pin(async move { pbd_create(&s, p) })
    });
    a("PBD.destroy", |s, _, p| {
        Box::pin(async move { pbd_destroy(&s, p) })
    });
    a("PBD.plug", |s, _, p| {
        Box::pin(async move { pbd_plug(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("PBD.unplug", |s, _, p| {
        Box::pin(async move { pbd_unplug(&s, &first(p)).await.map(|_| Value::str("")) })
    });
    a("VDI.create", |s, _, p| Box::pin(vdi_create(s, p)));
    a("VDI.destroy", |s, _, p| Box::pin(vdi_destroy(s, p)));
    a("VDI.snapshot", |s, _, p| {
        Box::pin(async move { vdi_snapshot(&s, &first(p), true).await })
    });
    a("VDI.clone", |s, _, p| {
        Box::pin(async move { vdi_snapshot(&s, &first(p), false).await })
    });
    a("VDI.resize", |s, _, p| Box::pin(vdi_resize(s, p)));
    a("VDI.resize_online", |s, _, p| Box::pin(vdi_resize(s, p)));
    a("VDI.copy", |s, c, p| Box::pin(vdi_copy(s, c, p)));
    a("VDI.introduce", |s, _, p| Box::pin(vdi_introduce(s, p)));
    a("VDI.forget", |s, _, p| {
        Box::pin(async move { vdi_forget(&s, p) })
    });
    a("VDI.update", |s, _, p| Box::pin(vdi_update(s, p)));
    a("VBD.create", |s, _, p| {
        Box::pin(async move { vbd_create(&s, p) })
    });
    a("VBD.destroy", |s, _, p| {
        Box::pin(async move { vbd_destroy(&s, p) })
    });
    a("VBD.set_mode", |s, _, p| {
        Box::pin(async move { vbd_set_mode(&s, p) })
    });
}
