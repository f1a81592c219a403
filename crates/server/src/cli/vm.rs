//! `xe` VM commands: power operations (vm-start, vm-shutdown [force=true],
//! vm-reboot, vm-suspend, vm-resume, vm-pause, vm-unpause) and CD drives
//! (vm-cd-insert, vm-cd-eject, vm-cd-list), provisioning (vm-clone, vm-copy,
//! vm-install, vm-uninstall, vm-destroy), vm-disk-list, vm-reset-powerstate
//! and `console`, as XenServer's xe has them.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError, member, text};
use crate::cli::protocol::Out;
use corral_model::args::vbd as vbd_args;
use corral_model::args::vm as args;
use corral_model::refs::{Ref, classes};
use corral_model::schema::class;
use corral_model::{NULL_REF, Value};

/// A template's `<provision>` XML with every disk's `sr` set to `sr_uuid`
/// (what `vm-install sr-uuid=` does in XenServer).
pub(crate) fn point_disks_at(xml: &str, sr_uuid: &str) -> String {
    let mut out = String::with_capacity(xml.len() + 64);
    for (i, part) in xml.split("<disk").enumerate() {
        if i == 0 {
            out.push_str(part);
            continue;
        }
        out.push_str("<disk");
        let end = part.find("/>").unwrap_or(part.len());
        let (attrs, rest) = part.split_at(end);
        let attrs = match attrs.find(" sr=\"") {
            Some(at) => {
                let v = at + 5;
                let close = attrs[v..].find('"').map(|c| v + c).unwrap_or(attrs.len());
                format!("{}{}{}", &attrs[..v], sr_uuid, &attrs[close..])
            }
            None => format!("{attrs} sr=\"{sr_uuid}\""),
        };
        out.push_str(&attrs);
        out.push_str(rest);
    }
    out
}

impl CliCtx {
    /// The VM named by `vm=` (name-label or uuid), `uuid=` or `name-label=`.
    pub(crate) async fn vm_of(&self, cmd: &Cmd) -> Result<String, CliError> {
        let key = cmd.get("vm").or(cmd.get("uuid")).or(cmd.get("name-label"));
        let Some(key) = key else {
            return text("Required parameter not found: vm (or uuid)".to_owned());
        };
        if let Some(r) = self.find_uuid("VM", key).await? {
            return Ok(r);
        }
        let matches = self.find_named("VM", key).await?;
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => text(format!("No matching VMs found for {key}")),
            _ => text(format!("Multiple VMs match {key}: use uuid=")),
        }
    }

    async fn is_template(&self, vm: &str) -> Result<bool, CliError> {
        Ok(self.get("VM", vm, "is_a_template").await?.as_bool() == Some(true))
    }

    /// The disks only this VM uses: what `vm-uninstall` destroys with it.
    async fn own_disks(&self, vm: &str) -> Result<Vec<String>, CliError> {
        let mut out: Vec<String> = Vec::new();
        for (_, vbd) in self.vbds_of_type(vm, "Disk").await? {
            let vdi = member(&vbd, "VDI");
            if vdi == NULL_REF || out.contains(&vdi) {
                continue;
            }
            if self.get("VDI", &vdi, "uuid").await.is_err() {
                continue; // a dangling reference
            }
            let users = self
                .records_where("VBD", &format!(r#"field "VDI" = "{vdi}""#))
                .await?;
            if users.iter().all(|(_, b)| member(b, "VM") == vm) {
                out.push(vdi);
            }
        }
        Ok(out)
    }

    async fn cd_vbds(&self, vm: &str) -> Result<Vec<(String, Value)>, CliError> {
        self.vbds_of_type(vm, "CD").await
    }

    /// The VM's VBDs of one type, by userdevice.
    async fn vbds_of_type(&self, vm: &str, ty: &str) -> Result<Vec<(String, Value)>, CliError> {
        let expr = format!(r#"field "VM" = "{vm}" and field "type" = "{ty}""#);
        let mut v = self.records_where("VBD", &expr).await?;
        v.sort_by_key(|(_, rec)| member(rec, "userdevice").parse::<u32>().unwrap_or(u32::MAX));
        Ok(v)
    }

    /// `vm-cd-list` / `vm-disk-list`: each drive's VBD, then its VDI, in
    /// xe's layout ("CD 0 VBD:", "Disk 0 VDI:").
    async fn drive_list(&self, vm: &str, ty: &str, out: &mut Vec<Out>) -> Result<(), CliError> {
        let label = if ty == "CD" { "CD" } else { "Disk" };
        let vbds = self.vbds_of_type(vm, ty).await?;
        let vm_name = self.get("VM", vm, "name_label").await?.db_string();
        for (i, (_, vbd)) in vbds.iter().enumerate() {
            out.push(Out::Print(format!(
                "{label} {i} VBD:\nuuid ( RO)             : {}\n    vm-name-label ( RO): {}\n       userdevice ( RW): {}\n            empty ( RO): {}\n",
                member(vbd, "uuid"),
                vm_name,
                member(vbd, "userdevice"),
                member(vbd, "empty"),
            )));
            let vdi = member(vbd, "VDI");
            if vdi == NULL_REF {
                continue;
            }
            // The record can go meanwhile.
            let Ok(rec) = self.call("VDI.get_record", vec![Value::str(&vdi)]).await else {
                continue;
            };
            let sr_name = self.get("SR", &member(&rec, "SR"), "name_label").await;
            out.push(Out::Print(format!(
                "{label} {i} VDI:\nuuid ( RO)             : {}\n       name-label ( RW): {}\n    sr-name-label ( RO): {}\n     virtual-size ( RO): {}\n",
                member(&rec, "uuid"),
                member(&rec, "name_label"),
                sr_name.map(|v| v.db_string()).unwrap_or_default(),
                member(&rec, "virtual_size"),
            )));
        }
        Ok(())
    }

    /// An SR named by `sr-uuid=` or `sr-name-label=`, if either is given.
    async fn sr_param(&self, cmd: &Cmd) -> Result<Option<String>, CliError> {
        if let Some(u) = cmd.get("sr-uuid") {
            let r = self.call("SR.get_by_uuid", vec![Value::str(u)]).await?;
            return Ok(Some(r.db_string()));
        }
        if let Some(n) = cmd.get("sr-name-label") {
            let r = self
                .call("SR.get_by_name_label", vec![Value::str(n)])
                .await?;
            return match r.as_array() {
                Some([one]) => Ok(Some(one.db_string())),
                Some([]) | None => text(format!("No SR found with name-label {n}")),
                Some(_) => text(format!("Multiple SRs match {n}: use sr-uuid=")),
            };
        }
        Ok(None)
    }

    /// `VM.clone`, or with `copy` = Some(sr) `VM.copy` onto that SR (None:
    /// each disk's own SR); the new VM's ref.
    async fn clone_vm(
        &self,
        src: &str,
        name: &str,
        copy: Option<Option<String>>,
    ) -> Result<String, CliError> {
        let r = match copy {
            Some(sr) => {
                let sr = sr.unwrap_or_else(|| NULL_REF.into());
                let p = vec![Value::str(src), Value::str(name), Value::str(&sr)];
                self.call("VM.copy", p).await?
            }
            None => {
                self.call("VM.clone", vec![Value::str(src), Value::str(name)])
                    .await?
            }
        };
        Ok(r.db_string())
    }

    /// `vm-clone` / `vm-copy`: prints the new VM's uuid.
    async fn vm_clone_cmd(
        &self,
        copy: bool,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let name = cmd.get("new-name-label").unwrap_or_default();
        let sr = if copy {
            self.sr_param(cmd).await?
        } else {
            None
        };
        let new = self.clone_vm(&vm, name, copy.then_some(sr)).await?;
        if let Some(d) = cmd.get("new-name-description") {
            self.call(
                "VM.set_name_description",
                vec![Value::str(&new), Value::str(d)],
            )
            .await?;
        }
        out.push(Out::Print(self.uuid(class::VM, &new).await?));
        Ok(())
    }

    /// `vm-install`: XenServer's recipe. Clone the template (copy it when it
    /// has disks and an SR is named), point the disks its
    /// `other_config:disks` asks for at the SR, provision, and make the
    /// result a VM. A failure uninstalls what was made.
    pub(crate) async fn vm_install(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let key = cmd
            .get("template")
            .or(cmd.get("template-uuid"))
            .or(cmd.get("template-name-label"));
        let Some(key) = key else {
            return text(
                "Required parameter not found: template (or template-uuid, template-name-label)",
            );
        };
        let tpl = {
            let mut by_uuid = None;
            if let Some(r) = self.find_uuid("VM", key).await? {
                if self.is_template(&r).await? {
                    by_uuid = Some(r);
                }
            }
            let mut by_name = Vec::new();
            for r in self.find_named("VM", key).await? {
                if self.is_template(&r).await? {
                    by_name.push(r);
                }
            }
            match (by_uuid, by_name.as_slice()) {
                (Some(r), _) => r,
                (None, [one]) => one.clone(),
                (None, []) => return text(format!("Template {key} not found")),
                (None, _) => {
                    return text(format!(
                        "Multiple templates match {key}: use template-uuid="
                    ));
                }
            }
        };
        let name = cmd.get("new-name-label").unwrap_or_default();
        let sr = self.sr_param(cmd).await?;
        let has_disks = !self.vbds_of_type(&tpl, "Disk").await?.is_empty();
        let copy = cmd
            .get("copy")
            .and_then(crate::cli::args::parse_bool)
            .unwrap_or(false)
            || (has_disks && sr.is_some());
        let new = self.clone_vm(&tpl, name, copy.then(|| sr.clone())).await?;
        let finish = async {
            if let Some(sr) = &sr {
                let other_config = self.get("VM", &new, "other_config").await?;
                let disks = other_config.member("disks").map(Value::db_string);
                if let Some(xml) = disks {
                    let sr_uuid = self.uuid(class::SR, sr).await?;
                    self.call(
                        "VM.remove_from_other_config",
                        vec![Value::str(&new), Value::str("disks")],
                    )
                    .await?;
                    self.call(
                        "VM.add_to_other_config",
                        vec![
                            Value::str(&new),
                            Value::str("disks"),
                            Value::String(point_disks_at(&xml, &sr_uuid)),
                        ],
                    )
                    .await?;
                }
            }
            self.call("VM.provision", vec![Value::str(&new)]).await?;
            self.call(
                "VM.set_is_a_template",
                vec![Value::str(&new), Value::Bool(false)],
            )
            .await?;
            if let Some(d) = cmd.get("new-name-description") {
                self.call(
                    "VM.set_name_description",
                    vec![Value::str(&new), Value::str(d)],
                )
                .await?;
            }
            Ok::<(), CliError>(())
        }
        .await;
        if let Err(mut e) = finish {
            // Named by uuid now: the objects the error names may go with
            // the undo.
            if let CliError::Api(a) = &mut e {
                for p in a.params.iter_mut() {
                    if p.starts_with("OpaqueRef:") && p != NULL_REF {
                        *p = self.uuid_of(p).await;
                    }
                }
            }
            let _ = self.uninstall(&new).await;
            return Err(e);
        }
        out.push(Out::Print(self.uuid(class::VM, &new).await?));
        Ok(())
    }

    /// Destroys the VM record, then its own disks; returns what went.
    async fn uninstall(&self, vm: &str) -> Result<Vec<String>, CliError> {
        let disks = self.own_disks(vm).await?;
        self.call("VM.destroy", vec![Value::str(vm)]).await?;
        for vdi in &disks {
            self.call("VDI.destroy", vec![Value::str(vdi)]).await?;
        }
        Ok(disks)
    }

    pub(crate) async fn vm_uninstall(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let mut listing = String::from("The following items are about to be destroyed\n");
        listing += &format!(
            "VM : {} ({})\n",
            self.uuid(class::VM, &vm).await?,
            self.get("VM", &vm, "name_label").await?.db_string()
        );
        for vdi in self.own_disks(&vm).await? {
            listing += &format!(
                "VDI: {} ({})\n",
                self.uuid(class::VDI, &vdi).await?,
                self.get("VDI", &vdi, "name_label").await?.db_string()
            );
        }
        if !cmd
            .get("force")
            .and_then(crate::cli::args::parse_bool)
            .unwrap_or(false)
        {
            // The thin client cannot answer a prompt; xe's own --force path.
            return text(format!("{listing}Add force=true to destroy them."));
        }
        out.push(Out::Print(listing.trim_end().to_owned()));
        self.uninstall(&vm).await?;
        out.push(Out::Print("All objects destroyed".into()));
        Ok(())
    }

    /// `xe console`: the client CONNECTs to the VM's vt100 console with this
    /// command's session and proxies the user's terminal to it.
    pub(crate) async fn console(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let name = self.get("VM", &vm, "name_label").await?.db_string();
        let expr = format!(r#"field "VM" = "{vm}" and field "protocol" = "vt100""#);
        let location = self
            .records_where("console", &expr)
            .await?
            .first()
            .map(|(_, c)| member(c, "location"));
        let Some(location) = location else {
            return text("No text console available");
        };
        out.push(Out::Stderr(format!(
            "Connecting to console on VM {name}. Press Ctrl + ']' to quit.\n"
        )));
        out.push(Out::Connect {
            url: format!("{location}&session_id={}", self.session),
            // A session the caller passed in (session_id=) stays theirs.
            session: if cmd.get("session_id").is_some() {
                String::new()
            } else {
                self.session.clone()
            },
        });
        Ok(())
    }

    /// A message on the VM named by `vm=`/`uuid=` (vm-suspend, vm-pause, ...).
    pub(crate) async fn on_vm<A>(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError>
    where
        A: corral_model::args::Args + From<Ref<classes::VM>> + Send,
    {
        let vm = Ref::new(self.vm_of(cmd).await?);
        self.invoke(A::from(vm)).await?;
        Ok(())
    }

    /// `on=`: a host by uuid or name-label.
    async fn on_host(&self, cmd: &Cmd) -> Result<Option<Ref<classes::Host>>, CliError> {
        let Some(h) = cmd.get("on") else {
            return Ok(None);
        };
        let host = match self.find_uuid("host", h).await? {
            Some(r) => r,
            None => self
                .find_named("host", h)
                .await?
                .into_iter()
                .next()
                .unwrap_or_default(),
        };
        Ok(Some(Ref::new(host)))
    }

    pub(crate) async fn vm_start(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = Ref::new(self.vm_of(cmd).await?);
        let (start_paused, force) = (flag(cmd, "paused"), flag(cmd, "force"));
        match self.on_host(cmd).await? {
            None => {
                self.invoke(args::Start {
                    vm,
                    start_paused,
                    force,
                })
                .await?
            }
            Some(host) => {
                let a = args::StartOn {
                    vm,
                    host,
                    start_paused,
                    force,
                };
                self.invoke(a).await?
            }
        };
        Ok(())
    }

    pub(crate) async fn vm_resume(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = Ref::new(self.vm_of(cmd).await?);
        let (start_paused, force) = (flag(cmd, "paused"), flag(cmd, "force"));
        match self.on_host(cmd).await? {
            None => {
                self.invoke(args::Resume {
                    vm,
                    start_paused,
                    force,
                })
                .await?
            }
            Some(host) => {
                let a = args::ResumeOn {
                    vm,
                    host,
                    start_paused,
                    force,
                };
                self.invoke(a).await?
            }
        };
        Ok(())
    }

    pub(crate) async fn vm_shutdown(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = Ref::new(self.vm_of(cmd).await?);
        match flag(cmd, "force") {
            true => self.invoke(args::HardShutdown { vm }).await?,
            false => self.invoke(args::CleanShutdown { vm }).await?,
        };
        Ok(())
    }

    pub(crate) async fn vm_reboot(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = Ref::new(self.vm_of(cmd).await?);
        match flag(cmd, "force") {
            true => self.invoke(args::HardReboot { vm }).await?,
            false => self.invoke(args::CleanReboot { vm }).await?,
        };
        Ok(())
    }

    pub(crate) async fn vm_cd_insert(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let cd_name = cmd.get("cd-name").unwrap_or_default();
        let vdi = self.find_named("VDI", cd_name).await?.into_iter().next();
        let Some(vdi) = vdi else {
            return text(format!("CD {cd_name} not found"));
        };
        let cds = self.cd_vbds(&vm).await?;
        let empty = cds.iter().find(|(_, b)| member(b, "empty") == "true");
        let Some((vbd, _)) = empty else {
            return text("No empty CD drive found".to_owned());
        };
        let (vbd, vdi) = (Ref::new(vbd.clone()), Ref::new(vdi));
        self.invoke(vbd_args::Insert { vbd, vdi }).await?;
        Ok(())
    }

    pub(crate) async fn vm_cd_eject(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let full: Vec<String> = self
            .cd_vbds(&vm)
            .await?
            .into_iter()
            .filter(|(_, b)| member(b, "empty") == "false")
            .map(|(r, _)| r)
            .collect();
        if full.is_empty() {
            return text("No CDs found".to_owned());
        }
        for vbd in full {
            self.invoke(vbd_args::Eject::from(Ref::new(vbd))).await?;
        }
        Ok(())
    }

    pub(crate) async fn vm_cd_list(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        self.drive_list(&vm, "CD", out).await
    }

    pub(crate) async fn vm_disk_list(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        self.drive_list(&vm, "Disk", out).await
    }

    pub(crate) async fn vm_clone(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        self.vm_clone_cmd(false, cmd, out).await
    }

    pub(crate) async fn vm_copy(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        self.vm_clone_cmd(true, cmd, out).await
    }

    /// The record only (`VM.destroy`); its disks stay.
    pub(crate) async fn vm_destroy(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        self.call("VM.destroy", vec![Value::str(&vm)]).await?;
        Ok(())
    }

    pub(crate) async fn vm_reset_powerstate(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let vm = Ref::new(self.vm_of(cmd).await?);
        if !flag(cmd, "force") {
            return text(
                "This operation is dangerous: it marks the VM halted without stopping it. \
                 Only use it when the VM's host is known to be down, and add force=true.",
            );
        }
        self.invoke(args::PowerStateReset { vm }).await?;
        Ok(())
    }
}

/// A boolean parameter, false when absent or unreadable.
fn flag(cmd: &Cmd, k: &str) -> bool {
    cmd.get(k)
        .and_then(crate::cli::args::parse_bool)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::point_disks_at;

    #[test]
    fn vm_install_points_every_disk_at_the_sr() {
        let xml = r#"<provision><disk device="0" size="8589934592" sr="" bootable="true" type="system"/><disk device="1" size="1024" bootable="false" type="user"/></provision>"#;
        assert_eq!(
            point_disks_at(xml, "u-1"),
            r#"<provision><disk device="0" size="8589934592" sr="u-1" bootable="true" type="system"/><disk device="1" size="1024" bootable="false" type="user" sr="u-1"/></provision>"#
        );
    }
}
