//! `xe` VM commands: power operations (vm-start, vm-shutdown [force=true],
//! vm-reboot, vm-suspend, vm-resume, vm-pause, vm-unpause) and CD drives
//! (vm-cd-insert, vm-cd-eject, vm-cd-list), provisioning (vm-clone, vm-copy,
//! vm-install, vm-uninstall, vm-destroy), vm-disk-list, vm-reset-powerstate
//! and `console`, as XenServer's xe has them.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError, text};
use crate::cli::protocol::Out;
use corral_model::schema::{class, field};
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
    async fn vm_of(&self, cmd: &Cmd) -> Result<String, CliError> {
        let key = cmd.get("vm").or(cmd.get("uuid")).or(cmd.get("name-label"));
        let Some(key) = key else {
            return text("Required parameter not found: vm (or uuid)".to_owned());
        };
        let st = self.server.db.read();
        if let Some(r) = st.by_uuid(class::VM, key) {
            return Ok(r.clone());
        }
        let matches: Vec<String> = st
            .refs(class::VM)
            .filter(|r| st.get_str(field::vm::NAME_LABEL, r).as_deref() == Some(key))
            .cloned()
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => text(format!("No matching VMs found for {key}")),
            _ => text(format!("Multiple VMs match {key}: use uuid=")),
        }
    }

    fn cd_vbds(&self, vm: &str) -> Vec<String> {
        self.vbds_of_type(vm, "CD")
    }

    fn vbds_of_type(&self, vm: &str, ty: &str) -> Vec<String> {
        let st = self.server.db.read();
        let mut v: Vec<String> = st
            .refs(class::VBD)
            .filter(|b| {
                st.get_str(field::vbd::VM, b).as_deref() == Some(vm)
                    && st.get_str(field::vbd::TYPE_, b).as_deref() == Some(ty)
            })
            .cloned()
            .collect();
        v.sort_by_key(|b| {
            st.get_str(field::vbd::USERDEVICE, b)
                .and_then(|d| d.parse::<u32>().ok())
                .unwrap_or(u32::MAX)
        });
        v
    }

    /// `vm-cd-list` / `vm-disk-list`: each drive's VBD, then its VDI, in
    /// xe's layout ("CD 0 VBD:", "Disk 0 VDI:").
    fn drive_list(&self, vm: &str, ty: &str, out: &mut Vec<Out>) {
        let label = if ty == "CD" { "CD" } else { "Disk" };
        let vbds = self.vbds_of_type(vm, ty);
        let st = self.server.db.read();
        for (i, vbd) in vbds.iter().enumerate() {
            let g = |f| st.get(f, vbd).map(|v| v.db_string()).unwrap_or_default();
            out.push(Out::Print(format!(
                "{label} {i} VBD:\nuuid ( RO)             : {}\n    vm-name-label ( RO): {}\n       userdevice ( RW): {}\n            empty ( RO): {}\n",
                g(field::vbd::UUID),
                st.get_str(field::vm::NAME_LABEL, vm).unwrap_or_default(),
                g(field::vbd::USERDEVICE),
                g(field::vbd::EMPTY),
            )));
            let vdi = g(field::vbd::VDI);
            if st.exists(class::VDI, &vdi) {
                out.push(Out::Print(format!(
                    "{label} {i} VDI:\nuuid ( RO)             : {}\n       name-label ( RW): {}\n    sr-name-label ( RO): {}\n     virtual-size ( RO): {}\n",
                    st.get_str(field::vdi::UUID, &vdi).unwrap_or_default(),
                    st.get_str(field::vdi::NAME_LABEL, &vdi).unwrap_or_default(),
                    st.get_str(field::vdi::SR, &vdi)
                        .and_then(|sr| st.get_str(field::sr::NAME_LABEL, &sr))
                        .unwrap_or_default(),
                    st.get(field::vdi::VIRTUAL_SIZE, &vdi).map(|v| v.db_string()).unwrap_or_default(),
                )));
            }
        }
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
        out.push(Out::Print(self.uuid_of(&new)));
        Ok(())
    }

    /// `vm-install`: XenServer's recipe. Clone the template (copy it when it
    /// has disks and an SR is named), point the disks its
    /// `other_config:disks` asks for at the SR, provision, and make the
    /// result a VM. A failure uninstalls what was made.
    async fn vm_install(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
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
            let st = self.server.db.read();
            let is_tpl = |r: &String| {
                st.get(field::vm::IS_A_TEMPLATE, r)
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false)
            };
            let by_uuid = st.by_uuid(class::VM, key).filter(|r| is_tpl(r)).cloned();
            let by_name: Vec<String> = st
                .refs(class::VM)
                .filter(|r| {
                    is_tpl(r) && st.get_str(field::vm::NAME_LABEL, r).as_deref() == Some(key)
                })
                .cloned()
                .collect();
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
        let has_disks = !self.vbds_of_type(&tpl, "Disk").is_empty();
        let copy = cmd
            .get("copy")
            .and_then(crate::cli::args::parse_bool)
            .unwrap_or(false)
            || (has_disks && sr.is_some());
        let new = self.clone_vm(&tpl, name, copy.then(|| sr.clone())).await?;
        let finish = async {
            if let Some(sr) = &sr {
                let disks = {
                    let st = self.server.db.read();
                    st.get(field::vm::OTHER_CONFIG, &new)
                        .and_then(|v| v.member("disks").map(|d| d.db_string()))
                };
                if let Some(xml) = disks {
                    let sr_uuid = self.uuid_of(sr);
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
                        *p = self.uuid_of(p);
                    }
                }
            }
            let _ = self.uninstall(&new).await;
            return Err(e);
        }
        out.push(Out::Print(self.uuid_of(&new)));
        Ok(())
    }

    /// Destroys the VM record, then its own disks; returns what went.
    async fn uninstall(&self, vm: &str) -> Result<Vec<String>, CliError> {
        let disks = crate::ops::vm::clone::own_disks(&self.server.db.read(), vm);
        self.call("VM.destroy", vec![Value::str(vm)]).await?;
        for vdi in &disks {
            self.call("VDI.destroy", vec![Value::str(vdi)]).await?;
        }
        Ok(disks)
    }

    async fn vm_uninstall(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let label = |r: &str, f| self.server.db.read().get_str(f, r).unwrap_or_default();
        let mut listing = String::from("The following items are about to be destroyed\n");
        listing += &format!(
            "VM : {} ({})\n",
            self.uuid_of(&vm),
            label(&vm, field::vm::NAME_LABEL)
        );
        let disks = crate::ops::vm::clone::own_disks(&self.server.db.read(), &vm);
        for vdi in disks {
            listing += &format!(
                "VDI: {} ({})\n",
                self.uuid_of(&vdi),
                label(&vdi, field::vdi::NAME_LABEL)
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
    async fn console(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let (name, location) = {
            let st = self.server.db.read();
            let location = st
                .refs(class::CONSOLE)
                .filter(|c| st.get_str(field::console::VM, c).as_deref() == Some(vm.as_str()))
                .find(|c| st.get_str(field::console::PROTOCOL, c).as_deref() == Some("vt100"))
                .and_then(|c| st.get_str(field::console::LOCATION, c));
            (
                st.get_str(field::vm::NAME_LABEL, &vm).unwrap_or_default(),
                location,
            )
        };
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

    pub(crate) async fn vm_command(
        &self,
        name: &str,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let force = cmd
            .get("force")
            .and_then(crate::cli::args::parse_bool)
            .unwrap_or(false);
        let flag = |k: &str| {
            Value::Bool(
                cmd.get(k)
                    .and_then(crate::cli::args::parse_bool)
                    .unwrap_or(false),
            )
        };
        if name == "host-shutdown-vms" {
            let host = self.server.host_ref.clone();
            self.call("host.shutdown_vms", vec![Value::str(&host)])
                .await?;
            return Ok(());
        }
        match name {
            "console" => return self.console(cmd, out).await,
            "vm-clone" | "vm-copy" => return self.vm_clone_cmd(name == "vm-copy", cmd, out).await,
            "vm-install" => return self.vm_install(cmd, out).await,
            "vm-uninstall" => return self.vm_uninstall(cmd, out).await,
            "vm-destroy" => {
                let vm = self.vm_of(cmd).await?;
                self.call("VM.destroy", vec![Value::str(&vm)]).await?;
                return Ok(());
            }
            "vm-reset-powerstate" => {
                let vm = self.vm_of(cmd).await?;
                if !force {
                    return text(
                        "This operation is dangerous: it marks the VM halted without stopping it. \
                         Only use it when the VM's host is known to be down, and add force=true.",
                    );
                }
                self.call("VM.power_state_reset", vec![Value::str(&vm)])
                    .await?;
                return Ok(());
            }
            "vm-disk-list" => {
                let vm = self.vm_of(cmd).await?;
                self.drive_list(&vm, "Disk", out);
                return Ok(());
            }
            _ => {}
        }
        let method = match name {
            "vm-start" => "VM.start",
            "vm-shutdown" if force => "VM.hard_shutdown",
            "vm-shutdown" => "VM.clean_shutdown",
            "vm-reboot" if force => "VM.hard_reboot",
            "vm-reboot" => "VM.clean_reboot",
            "vm-suspend" => "VM.suspend",
            "vm-resume" => "VM.resume",
            "vm-pause" => "VM.pause",
            "vm-unpause" => "VM.unpause",
            "vm-cd-insert" | "vm-cd-eject" | "vm-cd-list" => "",
            other => return text(format!("Unknown command: {other}")),
        };
        let vm = self.vm_of(cmd).await?;
        match name {
            "vm-start" | "vm-resume" => {
                let mut p = vec![Value::str(&vm)];
                let on = cmd.get("on");
                let method = match on {
                    Some(h) => {
                        let st = self.server.db.read();
                        let host = st
                            .by_uuid(class::HOST, h)
                            .cloned()
                            .or_else(|| {
                                st.refs(class::HOST)
                                    .find(|r| {
                                        st.get_str(field::host::NAME_LABEL, r).as_deref() == Some(h)
                                    })
                                    .cloned()
                            })
                            .unwrap_or_default();
                        p.push(Value::String(host));
                        if name == "vm-start" {
                            "VM.start_on"
                        } else {
                            "VM.resume_on"
                        }
                    }
                    None => method,
                };
                p.push(flag("paused"));
                p.push(Value::Bool(force));
                self.call(method, p).await?;
            }
            "vm-cd-insert" => {
                let Some(cd_name) = cmd.get("cd-name") else {
                    return text("Required parameter not found: cd-name".to_owned());
                };
                let vdi = {
                    let st = self.server.db.read();
                    st.refs(class::VDI)
                        .find(|v| st.get_str(field::vdi::NAME_LABEL, v).as_deref() == Some(cd_name))
                        .cloned()
                };
                let Some(vdi) = vdi else {
                    return text(format!("CD {cd_name} not found"));
                };
                let empty: Vec<String> = {
                    // (The drives first: one read lock at a time.)
                    let cds = self.cd_vbds(&vm);
                    let st = self.server.db.read();
                    cds.into_iter()
                        .filter(|b| {
                            st.get(field::vbd::EMPTY, b)
                                .and_then(|v| v.as_bool())
                                .unwrap_or(false)
                        })
                        .collect()
                };
                let Some(vbd) = empty.first() else {
                    return text("No empty CD drive found".to_owned());
                };
                self.call("VBD.insert", vec![Value::str(vbd), Value::str(&vdi)])
                    .await?;
            }
            "vm-cd-eject" => {
                let full: Vec<String> = {
                    // (The drives first: one read lock at a time.)
                    let cds = self.cd_vbds(&vm);
                    let st = self.server.db.read();
                    cds.into_iter()
                        .filter(|b| {
                            !st.get(field::vbd::EMPTY, b)
                                .and_then(|v| v.as_bool())
                                .unwrap_or(true)
                        })
                        .collect()
                };
                if full.is_empty() {
                    return text("No CDs found".to_owned());
                }
                for vbd in full {
                    self.call("VBD.eject", vec![Value::str(&vbd)]).await?;
                }
            }
            "vm-cd-list" => self.drive_list(&vm, "CD", out),
            _ => {
                self.call(method, vec![Value::str(&vm)]).await?;
            }
        }
        Ok(())
    }
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
