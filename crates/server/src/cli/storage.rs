//! `xe` storage commands (sr-*, pbd-*, vdi-*, vbd-* beyond the generic
//! list/param commands), each a thin mapping onto the XenAPI messages.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError, text};
use crate::cli::protocol::Out;
use corral_model::args::sr;
use corral_model::refs::Ref;
use corral_model::schema::{class, field};
use corral_model::{ClassId, NULL_REF, Value};

/// Commands that call one message on the object named by `uuid=`.
pub(crate) const ON_UUID: &[(&str, ClassId, &str)] = &[
    ("sr-forget", class::SR, "SR.forget"),
    ("sr-destroy", class::SR, "SR.destroy"),
    ("sr-scan", class::SR, "SR.scan"),
    ("sr-update", class::SR, "SR.update"),
    ("sr-upgrade", class::SR, "SR.upgrade"),
    ("pbd-plug", class::PBD, "PBD.plug"),
    ("pbd-unplug", class::PBD, "PBD.unplug"),
    ("pbd-destroy", class::PBD, "PBD.destroy"),
    ("vdi-destroy", class::VDI, "VDI.destroy"),
    ("vdi-forget", class::VDI, "VDI.forget"),
    ("vdi-update", class::VDI, "VDI.update"),
    ("vbd-destroy", class::VBD, "VBD.destroy"),
    ("vbd-eject", class::VBD, "VBD.eject"),
    ("vbd-plug", class::VBD, "VBD.plug"),
    ("vbd-unplug", class::VBD, "VBD.unplug"),
];

/// `key:sub=value` parameters of one map argument (`device-config:`).
pub(crate) fn map_arg(cmd: &Cmd, prefix: &str) -> Value {
    Value::Struct(
        str_map(cmd, prefix)
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
}

/// `prefix:key=value` parameters as a string map (typed arguments).
pub(crate) fn str_map(cmd: &Cmd, prefix: &str) -> std::collections::BTreeMap<String, String> {
    let p = format!("{prefix}:");
    cmd.params
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(&p).map(|sub| (sub.to_owned(), v.clone())))
        .collect()
}

/// Sizes as xe accepts them: bytes, or with KiB/MiB/GiB/TiB (and K/M/G/T).
pub fn parse_size(s: &str) -> Option<i64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().ok()?;
    let mult: i64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(crate) fn boolean(cmd: &Cmd, k: &str, default: bool) -> Result<bool, CliError> {
    match cmd.get(k) {
        None => Ok(default),
        Some(v) => crate::cli::args::parse_bool(v).ok_or_else(|| {
            CliError::Text(format!(
                "Failed to parse parameter '{k}': expecting a boolean (true or false)"
            ))
        }),
    }
}

impl CliCtx {
    /// The ref of the object of `class` with the uuid in parameter `param`.
    pub(crate) async fn ref_of(
        &self,
        c: ClassId,
        cmd: &Cmd,
        param: &str,
    ) -> Result<String, CliError> {
        let Some(uuid) = cmd.get(param) else {
            return text(format!("Required parameter not found: {param}"));
        };
        let r = self
            .call(&format!("{}.get_by_uuid", c.name()), vec![Value::str(uuid)])
            .await?;
        Ok(r.db_string())
    }

    /// `host-uuid=` if given, else the host serving this command.
    async fn host_or_this(&self, cmd: &Cmd) -> Result<String, CliError> {
        match cmd.get("host-uuid") {
            Some(_) => self.ref_of(class::HOST, cmd, "host-uuid").await,
            None => Ok(self.server.host_ref.clone()),
        }
    }

    fn print_uuid(&self, out: &mut Vec<Out>, r: &Value) {
        out.push(Out::Print(self.uuid_of(&r.db_string())));
    }

    pub(crate) async fn storage_command(
        &self,
        name: &str,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        if let Some((_, c, method)) = ON_UUID.iter().find(|(n, ..)| *n == name) {
            let r = self.ref_of(*c, cmd, "uuid").await?;
            self.call(method, vec![Value::str(r)]).await?;
            if name == "sr-upgrade" {
                out.push(Out::Print(format!(
                    "SR {} successfully upgraded",
                    arg("uuid")
                )));
            }
            return Ok(());
        }
        match name {
            "sr-create" => {
                let host = self.host_or_this(cmd).await?;
                let size =
                    parse_size(cmd.get("physical-size").unwrap_or("0")).ok_or_else(|| {
                        CliError::Text("Failed to parse parameter 'physical-size'".into())
                    })?;
                let a = sr::Create {
                    host: Ref::new(host),
                    device_config: str_map(cmd, "device-config"),
                    physical_size: size,
                    name_label: arg("name-label"),
                    name_description: arg("name-description"),
                    type_: arg("type"),
                    content_type: arg("content-type"),
                    shared: boolean(cmd, "shared", false)?,
                    sm_config: str_map(cmd, "sm-config"),
                };
                let r = self.invoke(a).await?;
                self.print_uuid(out, &r);
            }
            "sr-probe" => {
                let host = self.host_or_this(cmd).await?;
                let a = sr::Probe {
                    host: Ref::new(host),
                    device_config: str_map(cmd, "device-config"),
                    type_: arg("type"),
                    sm_config: str_map(cmd, "sm-config"),
                };
                let r = self.invoke(a).await?;
                out.push(Out::Print(r.db_string()));
            }
            "sr-introduce" => {
                let a = sr::Introduce {
                    uuid: arg("uuid"),
                    name_label: arg("name-label"),
                    name_description: arg("name-description"),
                    type_: arg("type"),
                    content_type: arg("content-type"),
                    shared: boolean(cmd, "shared", false)?,
                    sm_config: str_map(cmd, "sm-config"),
                };
                let r = self.invoke(a).await?;
                self.print_uuid(out, &r);
            }
            "sr-repair" => {
                let sr = self.ref_of(class::SR, cmd, "uuid").await?;
                self.sr_repair(&sr, out).await?;
            }
            "pbd-create" => {
                let host = self.ref_of(class::HOST, cmd, "host-uuid").await?;
                let sr = self.ref_of(class::SR, cmd, "sr-uuid").await?;
                let r = self
                    .call(
                        "PBD.create",
                        vec![Value::Struct(vec![
                            ("host".into(), Value::str(host)),
                            ("SR".into(), Value::str(sr)),
                            ("device_config".into(), map_arg(cmd, "device-config")),
                        ])],
                    )
                    .await?;
                self.print_uuid(out, &r);
            }
            "vdi-create" => {
                let sr = self.ref_of(class::SR, cmd, "sr-uuid").await?;
                let size = parse_size(&arg("virtual-size")).ok_or_else(|| {
                    CliError::Text("Failed to parse parameter 'virtual-size'".into())
                })?;
                let ty = cmd.get("type").unwrap_or("user").to_owned();
                let r = self
                    .call(
                        "VDI.create",
                        vec![Value::Struct(vec![
                            ("name_label".into(), Value::String(arg("name-label"))),
                            (
                                "name_description".into(),
                                Value::String(arg("name-description")),
                            ),
                            ("SR".into(), Value::str(sr)),
                            ("virtual_size".into(), Value::Int(size)),
                            ("type".into(), Value::String(ty)),
                            (
                                "sharable".into(),
                                Value::Bool(boolean(cmd, "sharable", false)?),
                            ),
                            (
                                "read_only".into(),
                                Value::Bool(boolean(cmd, "read-only", false)?),
                            ),
                            ("other_config".into(), map_arg(cmd, "other-config")),
                            ("sm_config".into(), map_arg(cmd, "sm-config")),
                        ])],
                    )
                    .await?;
                self.print_uuid(out, &r);
            }
            "vdi-clone" | "vdi-snapshot" => {
                let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
                let method = if name == "vdi-clone" {
                    "VDI.clone"
                } else {
                    "VDI.snapshot"
                };
                let r = self
                    .call(method, vec![Value::str(&vdi), Value::Struct(vec![])])
                    .await?;
                let new = r.db_string();
                if let Some(n) = cmd.get("new-name-label") {
                    self.call("VDI.set_name_label", vec![Value::str(&new), Value::str(n)])
                        .await?;
                }
                if let Some(n) = cmd.get("new-name-description") {
                    self.call(
                        "VDI.set_name_description",
                        vec![Value::str(&new), Value::str(n)],
                    )
                    .await?;
                }
                self.print_uuid(out, &r);
            }
            "vdi-resize" => {
                let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
                let size = parse_size(&arg("disk-size")).ok_or_else(|| {
                    CliError::Text("Failed to parse parameter 'disk-size'".into())
                })?;
                let method = if boolean(cmd, "online", false)? {
                    "VDI.resize_online"
                } else {
                    "VDI.resize"
                };
                self.call(method, vec![Value::str(vdi), Value::Int(size)])
                    .await?;
            }
            "vdi-copy" => {
                let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
                let sr = match cmd.get("sr-uuid") {
                    Some(_) => self.ref_of(class::SR, cmd, "sr-uuid").await?,
                    None => self
                        .server
                        .db
                        .read()
                        .get_str(field::vdi::SR, &vdi)
                        .unwrap_or_default(),
                };
                let r = self
                    .call(
                        "VDI.copy",
                        vec![
                            Value::str(vdi),
                            Value::str(sr),
                            Value::str(NULL_REF),
                            Value::str(NULL_REF),
                        ],
                    )
                    .await?;
                self.print_uuid(out, &r);
            }
            "vbd-create" => {
                let vm = self.ref_of(class::VM, cmd, "vm-uuid").await?;
                let vdi = match cmd.get("vdi-uuid") {
                    Some(_) => self.ref_of(class::VDI, cmd, "vdi-uuid").await?,
                    None => NULL_REF.to_owned(),
                };
                let ty = cmd.get("type").unwrap_or("Disk").to_owned();
                let empty = boolean(cmd, "empty", vdi == NULL_REF)?;
                let mode = cmd
                    .get("mode")
                    .unwrap_or(if ty == "CD" { "RO" } else { "RW" })
                    .to_owned();
                let r = self
                    .call(
                        "VBD.create",
                        vec![Value::Struct(vec![
                            ("VM".into(), Value::str(vm)),
                            ("VDI".into(), Value::str(vdi)),
                            ("userdevice".into(), Value::String(arg("device"))),
                            (
                                "bootable".into(),
                                Value::Bool(boolean(cmd, "bootable", false)?),
                            ),
                            ("mode".into(), Value::String(mode)),
                            ("type".into(), Value::String(ty)),
                            (
                                "unpluggable".into(),
                                Value::Bool(boolean(cmd, "unpluggable", true)?),
                            ),
                            ("empty".into(), Value::Bool(empty)),
                            ("other_config".into(), Value::Struct(vec![])),
                            ("qos_algorithm_type".into(), Value::str("")),
                            ("qos_algorithm_params".into(), Value::Struct(vec![])),
                        ])],
                    )
                    .await?;
                self.print_uuid(out, &r);
            }
            "vbd-insert" => {
                let vbd = self.ref_of(class::VBD, cmd, "uuid").await?;
                let vdi = self.ref_of(class::VDI, cmd, "vdi-uuid").await?;
                self.call("VBD.insert", vec![Value::str(vbd), Value::str(vdi)])
                    .await?;
            }
            "vdi-import" | "vdi-export" => {
                let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
                let format = cmd.get("format").unwrap_or("raw").to_owned();
                let put = name == "vdi-import";
                let task = self.server.task_create(
                    if put { "VDI import" } else { "VDI export" },
                    "",
                    &self.session,
                    true,
                )?;
                let url = format!(
                    "/{}?session_id={}&task_id={task}&vdi={vdi}&format={format}",
                    if put {
                        "import_raw_vdi"
                    } else {
                        "export_raw_vdi"
                    },
                    self.session
                );
                out.push(Out::Transfer {
                    put,
                    filename: arg("filename"),
                    url,
                    task,
                    session: self.session.clone(),
                });
            }
            other => return self.vm_command(other, cmd, out).await,
        }
        Ok(())
    }

    /// XenCenter's "Repair storage repository": every host that should see
    /// the SR gets a PBD (device-config copied from an existing one), and
    /// every unplugged PBD is plugged. Keeps going past failures and reports
    /// each host; fails at the end if any host failed.
    async fn sr_repair(&self, sr: &str, out: &mut Vec<Out>) -> Result<(), CliError> {
        let (shared, pbds, hosts) = {
            let st = self.server.db.read();
            let shared = st
                .get(field::sr::SHARED, sr)
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let pbds: Vec<(String, String)> = st
                .refs(class::PBD)
                .filter(|p| st.get_str(field::pbd::SR, p).as_deref() == Some(sr))
                .map(|p| {
                    (
                        p.clone(),
                        st.get_str(field::pbd::HOST, p).unwrap_or_default(),
                    )
                })
                .collect();
            let hosts: Vec<String> = st.refs(class::HOST).cloned().collect();
            (shared, pbds, hosts)
        };
        let template = pbds.first().map(|(p, _)| p.clone());
        let mut failed = 0;
        let mut targets: Vec<(String, Option<String>)> = pbds
            .iter()
            .map(|(p, h)| (h.clone(), Some(p.clone())))
            .collect();
        if shared {
            for h in &hosts {
                if !pbds.iter().any(|(_, ph)| ph == h) {
                    targets.push((h.clone(), None));
                }
            }
        }
        for (host, pbd) in targets {
            let host_name = self
                .server
                .db
                .read()
                .get_str(field::host::NAME_LABEL, &host)
                .unwrap_or_default();
            let pbd = match pbd {
                Some(p) => p,
                None => {
                    let Some(t) = &template else {
                        return text(format!(
                            "SR {} has no PBD to copy the device-config from",
                            self.uuid_of(sr)
                        ));
                    };
                    let dc = self
                        .server
                        .db
                        .read()
                        .get(field::pbd::DEVICE_CONFIG, t)
                        .unwrap_or(Value::Struct(vec![]));
                    match self
                        .call(
                            "PBD.create",
                            vec![Value::Struct(vec![
                                ("host".into(), Value::str(&host)),
                                ("SR".into(), Value::str(sr)),
                                ("device_config".into(), dc),
                            ])],
                        )
                        .await
                    {
                        Ok(r) => r.db_string(),
                        Err(e) => {
                            failed += 1;
                            out.push(Out::Print(format!(
                                "{host_name}: creating PBD failed: {}",
                                describe(&e)
                            )));
                            continue;
                        }
                    }
                }
            };
            let attached = self
                .server
                .db
                .read()
                .get(field::pbd::CURRENTLY_ATTACHED, &pbd)
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            if attached {
                out.push(Out::Print(format!("{host_name}: already attached")));
                continue;
            }
            match self.call("PBD.plug", vec![Value::str(&pbd)]).await {
                Ok(_) => out.push(Out::Print(format!("{host_name}: attached"))),
                Err(e) => {
                    failed += 1;
                    out.push(Out::Print(format!(
                        "{host_name}: plug failed: {}",
                        describe(&e)
                    )));
                }
            }
        }
        if failed > 0 {
            return text(format!("SR repair failed on {failed} host(s)"));
        }
        Ok(())
    }
}

pub(crate) fn describe(e: &CliError) -> String {
    match e {
        CliError::Text(t) => t.clone(),
        CliError::Api(a) => a.description().join(", "),
    }
}
