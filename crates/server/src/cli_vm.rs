//! `xe` VM commands: power operations (vm-start, vm-shutdown [force=true],
//! vm-reboot, vm-suspend, vm-resume, vm-pause, vm-unpause) and CD drives
//! (vm-cd-insert, vm-cd-eject, vm-cd-list) and `console`, as XenServer's xe
//! has them.

use crate::cli::{CliCtx, CliError, Cmd, Out, text};
use corral_model::Value;
use corral_model::schema::{class, field};

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
        let st = self.server.db.read();
        st.refs(class::VBD)
            .filter(|b| {
                st.get_str(field::vbd::VM, b).as_deref() == Some(vm)
                    && st.get_str(field::vbd::TYPE_, b).as_deref() == Some("CD")
            })
            .cloned()
            .collect()
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
            .and_then(crate::cli::parse_bool)
            .unwrap_or(false);
        let flag =
            |k: &str| Value::Bool(cmd.get(k).and_then(crate::cli::parse_bool).unwrap_or(false));
        if name == "host-shutdown-vms" {
            let host = self.server.host_ref.clone();
            self.call("host.shutdown_vms", vec![Value::str(&host)])
                .await?;
            return Ok(());
        }
        if name == "console" {
            return self.console(cmd, out).await;
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
                    let st = self.server.db.read();
                    self.cd_vbds(&vm)
                        .into_iter()
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
                    let st = self.server.db.read();
                    self.cd_vbds(&vm)
                        .into_iter()
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
            "vm-cd-list" => {
                let st = self.server.db.read();
                for (i, vbd) in self.cd_vbds(&vm).iter().enumerate() {
                    let g = |f| st.get(f, vbd).map(|v| v.db_string()).unwrap_or_default();
                    out.push(Out::Print(format!(
                        "CD {i} VBD:\nuuid ( RO)             : {}\n    vm-name-label ( RO): {}\n       userdevice ( RW): {}\n            empty ( RO): {}\n",
                        g(field::vbd::UUID),
                        st.get_str(field::vm::NAME_LABEL, &vm).unwrap_or_default(),
                        g(field::vbd::USERDEVICE),
                        g(field::vbd::EMPTY),
                    )));
                    let vdi = g(field::vbd::VDI);
                    if st.exists(class::VDI, &vdi) {
                        out.push(Out::Print(format!(
                            "CD {i} VDI:\nuuid ( RO)             : {}\n       name-label ( RW): {}\n          sr-name-label ( RO): {}\n     virtual-size ( RO): {}\n",
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
            _ => {
                self.call(method, vec![Value::str(&vm)]).await?;
            }
        }
        Ok(())
    }
}
