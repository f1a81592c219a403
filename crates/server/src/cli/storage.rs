//! `xe` storage commands (sr-*, pbd-*, vdi-*, vbd-* beyond the generic
//! list/param commands), each a thin mapping onto the XenAPI messages.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError, member, text};
use crate::cli::protocol::Out;
use corral_model::args::vbd as vbd_args;
use corral_model::args::vdi as vdi_args;
use corral_model::args::{Args, pbd, sr};
use corral_model::refs::{Class, Ref, classes};
use corral_model::schema::class;
use corral_model::{ClassId, NULL_REF, Value};

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

    async fn print_uuid(&self, c: ClassId, out: &mut Vec<Out>, r: &Value) -> Result<(), CliError> {
        out.push(Out::Print(self.uuid(c, &r.db_string()).await?));
        Ok(())
    }

    /// A message on the object named by `uuid=` (sr-scan, pbd-plug, ...).
    pub(crate) async fn on_uuid<C, A>(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError>
    where
        C: Class,
        A: Args + From<Ref<C>> + Send,
    {
        let r = self.ref_of(C::ID, cmd, "uuid").await?;
        self.invoke(A::from(Ref::new(r))).await?;
        Ok(())
    }

    /// `<class>.destroy` of the object named by `uuid=` (the implicit
    /// destroy has no argument struct).
    pub(crate) async fn destroy<C: Class>(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let r = self.ref_of(C::ID, cmd, "uuid").await?;
        self.call(&format!("{}.destroy", C::ID.name()), vec![Value::str(r)])
            .await?;
        Ok(())
    }

    pub(crate) async fn sr_upgrade(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        self.on_uuid::<classes::SR, sr::Upgrade>(cmd, out).await?;
        let uuid = cmd.get("uuid").unwrap_or_default();
        out.push(Out::Print(format!("SR {uuid} successfully upgraded")));
        Ok(())
    }

    pub(crate) async fn sr_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        let host = self.host_or_this(cmd).await?;
        let size = parse_size(cmd.get("physical-size").unwrap_or("0"))
            .ok_or_else(|| CliError::Text("Failed to parse parameter 'physical-size'".into()))?;
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
        self.print_uuid(class::SR, out, &r).await
    }

    pub(crate) async fn sr_probe(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let host = self.host_or_this(cmd).await?;
        let a = sr::Probe {
            host: Ref::new(host),
            device_config: str_map(cmd, "device-config"),
            type_: cmd.get("type").unwrap_or("").to_owned(),
            sm_config: str_map(cmd, "sm-config"),
        };
        let r = self.invoke(a).await?;
        out.push(Out::Print(r.db_string()));
        Ok(())
    }

    pub(crate) async fn sr_introduce(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
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
        self.print_uuid(class::SR, out, &r).await
    }

    pub(crate) async fn pbd_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
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
        self.print_uuid(class::PBD, out, &r).await
    }

    pub(crate) async fn vdi_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        let sr = self.ref_of(class::SR, cmd, "sr-uuid").await?;
        let size = parse_size(&arg("virtual-size"))
            .ok_or_else(|| CliError::Text("Failed to parse parameter 'virtual-size'".into()))?;
        let ty = cmd.get("type").unwrap_or("user").to_owned();
        let record = vec![
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
        ];
        let r = self.call("VDI.create", vec![Value::Struct(record)]).await?;
        self.print_uuid(class::VDI, out, &r).await
    }

    pub(crate) async fn vdi_clone(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vdi = Ref::new(self.ref_of(class::VDI, cmd, "uuid").await?);
        let driver_params = Default::default();
        let r = self.invoke(vdi_args::Clone { vdi, driver_params }).await?;
        self.name_new_vdi(cmd, out, &r).await
    }

    pub(crate) async fn vdi_snapshot(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vdi = Ref::new(self.ref_of(class::VDI, cmd, "uuid").await?);
        let driver_params = Default::default();
        let r = self
            .invoke(vdi_args::Snapshot { vdi, driver_params })
            .await?;
        self.name_new_vdi(cmd, out, &r).await
    }

    /// new-name-label / new-name-description of a clone or snapshot.
    async fn name_new_vdi(&self, cmd: &Cmd, out: &mut Vec<Out>, r: &Value) -> Result<(), CliError> {
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
        self.print_uuid(class::VDI, out, r).await
    }

    pub(crate) async fn vdi_resize(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vdi = Ref::new(self.ref_of(class::VDI, cmd, "uuid").await?);
        let size = parse_size(cmd.get("disk-size").unwrap_or_default())
            .ok_or_else(|| CliError::Text("Failed to parse parameter 'disk-size'".into()))?;
        match boolean(cmd, "online", false)? {
            true => self.invoke(vdi_args::ResizeOnline { vdi, size }).await?,
            false => self.invoke(vdi_args::Resize { vdi, size }).await?,
        };
        Ok(())
    }

    /// Onto `sr-uuid=`, else the VDI's own SR.
    pub(crate) async fn vdi_copy(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
        let sr = match cmd.get("sr-uuid") {
            Some(_) => self.ref_of(class::SR, cmd, "sr-uuid").await?,
            None => self.get("VDI", &vdi, "SR").await?.db_string(),
        };
        let a = vdi_args::Copy {
            vdi: Ref::new(vdi),
            sr: Ref::new(sr),
            base_vdi: Ref::null(),
            into_vdi: Ref::null(),
        };
        let r = self.invoke(a).await?;
        self.print_uuid(class::VDI, out, &r).await
    }

    pub(crate) async fn vbd_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
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
        let record = vec![
            ("VM".into(), Value::str(vm)),
            ("VDI".into(), Value::str(vdi)),
            (
                "userdevice".into(),
                Value::str(cmd.get("device").unwrap_or_default()),
            ),
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
        ];
        let r = self.call("VBD.create", vec![Value::Struct(record)]).await?;
        self.print_uuid(class::VBD, out, &r).await
    }

    pub(crate) async fn vbd_insert(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let vbd = Ref::new(self.ref_of(class::VBD, cmd, "uuid").await?);
        let vdi = Ref::new(self.ref_of(class::VDI, cmd, "vdi-uuid").await?);
        self.invoke(vbd_args::Insert { vbd, vdi }).await?;
        Ok(())
    }

    pub(crate) async fn vdi_import(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        self.vdi_transfer(true, cmd, out).await
    }

    pub(crate) async fn vdi_export(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        self.vdi_transfer(false, cmd, out).await
    }

    /// The client sends or receives the file over HTTP, under a task the
    /// transfer handler finishes.
    async fn vdi_transfer(&self, put: bool, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vdi = self.ref_of(class::VDI, cmd, "uuid").await?;
        let format = cmd.get("format").unwrap_or("raw").to_owned();
        let label = if put { "VDI import" } else { "VDI export" };
        let task = self
            .call("task.create", vec![Value::str(label), Value::str("")])
            .await?
            .db_string();
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
            filename: cmd.get("filename").unwrap_or_default().to_owned(),
            url,
            task,
            session: self.session.clone(),
            own_session: cmd.get("session_id").is_none(),
        });
        Ok(())
    }

    pub(crate) async fn sr_repair_cmd(
        &self,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let sr = self.ref_of(class::SR, cmd, "uuid").await?;
        self.sr_repair(&sr, out).await
    }

    /// XenCenter's "Repair storage repository": every host that should see
    /// the SR gets a PBD (device-config copied from an existing one), and
    /// every unplugged PBD is plugged. Keeps going past failures and reports
    /// each host; fails at the end if any host failed.
    async fn sr_repair(&self, sr: &str, out: &mut Vec<Out>) -> Result<(), CliError> {
        let shared = self.get("SR", sr, "shared").await?.as_bool() == Some(true);
        let pbds: Vec<(String, Value)> = self
            .records_where("PBD", &format!(r#"field "SR" = "{sr}""#))
            .await?;
        let hosts = self.call("host.get_all", vec![]).await?;
        let hosts: Vec<String> = hosts
            .as_array()
            .unwrap_or_default()
            .iter()
            .map(Value::db_string)
            .collect();
        let template = pbds.first().map(|(_, rec)| {
            rec.member("device_config")
                .cloned()
                .unwrap_or(Value::Struct(vec![]))
        });
        let mut failed = 0;
        // (host, its PBD and whether that is attached)
        let mut targets: Vec<(String, Option<(String, bool)>)> = pbds
            .iter()
            .map(|(p, rec)| {
                let attached = rec.member("currently_attached").and_then(Value::as_bool);
                (
                    member(rec, "host"),
                    Some((p.clone(), attached == Some(true))),
                )
            })
            .collect();
        if shared {
            for h in &hosts {
                if !targets.iter().any(|(th, _)| th == h) {
                    targets.push((h.clone(), None));
                }
            }
        }
        for (host, pbd) in targets {
            let host_name = self.get("host", &host, "name_label").await?.db_string();
            let pbd = match pbd {
                Some((_, true)) => {
                    out.push(Out::Print(format!("{host_name}: already attached")));
                    continue;
                }
                Some((p, false)) => p,
                None => {
                    let Some(dc) = template.clone() else {
                        return text(format!(
                            "SR {} has no PBD to copy the device-config from",
                            self.uuid(class::SR, sr).await?
                        ));
                    };
                    let record = vec![
                        ("host".into(), Value::str(&host)),
                        ("SR".into(), Value::str(sr)),
                        ("device_config".into(), dc),
                    ];
                    match self.call("PBD.create", vec![Value::Struct(record)]).await {
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
            match self.invoke(pbd::Plug::from(Ref::new(pbd))).await {
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
