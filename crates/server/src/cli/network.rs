//! `xe` network commands: network-, vif-, pif-, vlan- and bond- commands,
//! host-management-reconfigure and vm-vif-list.

use crate::cli::args::Cmd;
use crate::cli::context::{CliCtx, CliError, text};
use crate::cli::protocol::Out;
use crate::cli::records::cli_classes;
use crate::cli::storage::boolean;
use crate::cli::table::{Command, act, cmd};
use corral_model::Value;
use corral_model::args::{bond, host, pif, vif, vlan};
use corral_model::refs::{Ref, classes};
use corral_model::schema::class;

/// The network commands, in `xe help` order.
pub(crate) const NETWORK_COMMANDS: &[Command] = &[
    cmd(
        "network-create",
        "name-label",
        "name-description, MTU, bridge, managed",
        "Create a network (an internal one until a PIF joins it). Prints the new uuid.",
        act!(network_create),
    ),
    cmd(
        "network-destroy",
        "uuid",
        "",
        "Destroy a network with no PIFs and no attached VIFs.",
        act!(destroy::<classes::Network>),
    ),
    cmd(
        "vif-create",
        "device, network-uuid, vm-uuid",
        "mac",
        "Create a VIF (mac=random for a random one; none: from the VM's seed). Prints the new uuid.",
        act!(vif_create),
    ),
    cmd(
        "vif-destroy",
        "uuid",
        "",
        "Destroy a VIF that is not plugged into a running VM.",
        act!(destroy::<classes::VIF>),
    ),
    cmd(
        "vif-plug",
        "uuid",
        "",
        "Hot-plug a VIF into its running VM.",
        act!(on_uuid::<classes::VIF, vif::Plug>),
    ),
    cmd(
        "vif-unplug",
        "uuid",
        "force",
        "Hot-unplug a VIF from its running VM (force=true: without the guest's consent).",
        act!(vif_unplug),
    ),
    cmd(
        "vif-move",
        "uuid, network-uuid",
        "",
        "Move a VIF to another network, plugged or not.",
        act!(vif_move),
    ),
    cmd(
        "vif-configure-ipv4",
        "uuid, mode",
        "address, gateway",
        "Record the guest's IPv4 configuration for the VIF (mode=static|none, address=a.b.c.d/prefix).",
        act!(vif_configure_ipv4),
    ),
    cmd(
        "vif-configure-ipv6",
        "uuid, mode",
        "address, gateway",
        "Record the guest's IPv6 configuration for the VIF (mode=static|none, address=addr/prefix).",
        act!(vif_configure_ipv6),
    ),
    cmd(
        "vm-vif-list",
        "",
        "vm, uuid, params",
        "List the VM's VIFs.",
        act!(vm_vif_list),
    ),
    cmd(
        "pif-scan",
        "host-uuid",
        "",
        "Make a PIF (and a network) for each of the host's NICs that has none.",
        act!(pif_scan),
    ),
    cmd(
        "pif-introduce",
        "host-uuid, device",
        "mac, managed",
        "Make a PIF for one NIC of the host. Prints the new uuid.",
        act!(pif_introduce),
    ),
    cmd(
        "pif-forget",
        "uuid",
        "",
        "Forget a PIF (not the management interface).",
        act!(on_uuid::<classes::PIF, pif::Forget>),
    ),
    cmd(
        "pif-plug",
        "uuid",
        "",
        "Attach a PIF: its NIC joins its network's bridge.",
        act!(on_uuid::<classes::PIF, pif::Plug>),
    ),
    cmd(
        "pif-unplug",
        "uuid",
        "",
        "Detach a PIF from its network's bridge.",
        act!(on_uuid::<classes::PIF, pif::Unplug>),
    ),
    cmd(
        "pif-destroy",
        "uuid",
        "",
        "Destroy a VLAN PIF (deprecated: use vlan-destroy).",
        act!(on_uuid::<classes::PIF, pif::Destroy>),
    ),
    cmd(
        "pif-reconfigure-ip",
        "uuid, mode",
        "IP, netmask, gateway, DNS",
        "Set the host's IPv4 configuration on a PIF (mode=none|dhcp|static).",
        act!(pif_reconfigure_ip),
    ),
    cmd(
        "pif-reconfigure-ipv6",
        "uuid, mode",
        "IPv6, gateway, DNS",
        "Set the host's IPv6 configuration on a PIF (mode=none|dhcp|static|autoconf).",
        act!(pif_reconfigure_ipv6),
    ),
    cmd(
        "host-management-reconfigure",
        "pif-uuid",
        "",
        "Make a PIF with an IP configuration the host's management interface.",
        act!(host_management_reconfigure),
    ),
    cmd(
        "vlan-create",
        "pif-uuid, vlan, network-uuid",
        "",
        "Create a VLAN on a PIF; prints the uuid of the new (untagged) PIF.",
        act!(vlan_create),
    ),
    cmd(
        "pool-vlan-create",
        "pif-uuid, vlan, network-uuid",
        "",
        "Create the VLAN on every host that has a PIF on the PIF's network; prints the new PIFs' uuids.",
        act!(pool_vlan_create),
    ),
    cmd(
        "vlan-destroy",
        "uuid",
        "",
        "Destroy a VLAN (uuid of the VLAN or of its untagged PIF).",
        act!(vlan_destroy),
    ),
    cmd(
        "bond-create",
        "network-uuid, pif-uuids",
        "mac, mode, properties:",
        "Bond two or more PIFs of one host (mode=balance-slb|active-backup|lacp). Prints the bond's uuid.",
        act!(bond_create),
    ),
    cmd(
        "bond-destroy",
        "uuid",
        "",
        "Destroy a bond; its members get their networks back.",
        act!(on_uuid::<classes::Bond, bond::Destroy>),
    ),
    cmd(
        "bond-set-mode",
        "uuid, mode",
        "",
        "Change a bond's mode.",
        act!(bond_set_mode),
    ),
];

/// A parameter's value whatever the case of its key (`pif-reconfigure-ip`
/// takes `IP=` and `ip=`).
fn any_case<'a>(cmd: &'a Cmd, key: &str) -> &'a str {
    cmd.params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// xe's lower-case mode names onto the API's enum values.
fn mode_value(given: &str, names: &[&'static str]) -> Result<&'static str, CliError> {
    names
        .iter()
        .find(|n| n.eq_ignore_ascii_case(given))
        .copied()
        .ok_or_else(|| {
            CliError::Text(format!(
                "Unknown mode '{given}': expecting one of {}",
                names.join(", ").to_lowercase()
            ))
        })
}

impl CliCtx {
    pub(crate) async fn network_create(
        &self,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let arg = |k: &str| cmd.get(k).unwrap_or("").to_owned();
        let mut rec = vec![
            ("name_label".into(), Value::String(arg("name-label"))),
            (
                "name_description".into(),
                Value::String(arg("name-description")),
            ),
            (
                "MTU".into(),
                Value::String(cmd.get("MTU").unwrap_or("1500").to_owned()),
            ),
            ("other_config".into(), Value::Struct(vec![])),
            ("bridge".into(), Value::String(arg("bridge"))),
        ];
        if cmd.get("managed").is_some() {
            rec.push((
                "managed".into(),
                Value::Bool(boolean(cmd, "managed", true)?),
            ));
        }
        let r = self
            .call("network.create", vec![Value::Struct(rec)])
            .await?;
        out.push(Out::Print(self.uuid(class::NETWORK, &r.db_string()).await?));
        Ok(())
    }

    pub(crate) async fn vif_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.ref_of(class::VM, cmd, "vm-uuid").await?;
        let network = self.ref_of(class::NETWORK, cmd, "network-uuid").await?;
        let mtu = self.get("network", &network, "MTU").await?;
        let mac = match cmd.get("mac") {
            Some("random") => corral_net::mac::random(),
            Some(m) => m.to_owned(),
            None => String::new(),
        };
        let rec = vec![
            ("device".into(), Value::str(cmd.get("device").unwrap_or(""))),
            ("network".into(), Value::String(network)),
            ("VM".into(), Value::String(vm)),
            ("MAC".into(), Value::String(mac)),
            ("MTU".into(), mtu),
            ("other_config".into(), Value::Struct(vec![])),
            ("qos_algorithm_type".into(), Value::str("")),
            ("qos_algorithm_params".into(), Value::Struct(vec![])),
            ("locking_mode".into(), Value::str("network_default")),
        ];
        let r = self.call("VIF.create", vec![Value::Struct(rec)]).await?;
        out.push(Out::Print(self.uuid(class::VIF, &r.db_string()).await?));
        Ok(())
    }

    pub(crate) async fn vif_unplug(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let self_ = Ref::new(self.ref_of(class::VIF, cmd, "uuid").await?);
        if boolean(cmd, "force", false)? {
            self.invoke(vif::UnplugForce { self_ }).await?;
        } else {
            self.invoke(vif::Unplug { self_ }).await?;
        }
        Ok(())
    }

    pub(crate) async fn vif_move(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let self_ = Ref::new(self.ref_of(class::VIF, cmd, "uuid").await?);
        let network = Ref::new(self.ref_of(class::NETWORK, cmd, "network-uuid").await?);
        self.invoke(vif::Move { self_, network }).await?;
        Ok(())
    }

    pub(crate) async fn vif_configure_ipv4(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        self.vif_configure(cmd, "VIF.configure_ipv4").await
    }

    pub(crate) async fn vif_configure_ipv6(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        self.vif_configure(cmd, "VIF.configure_ipv6").await
    }

    async fn vif_configure(&self, cmd: &Cmd, message: &str) -> Result<(), CliError> {
        let vif = self.ref_of(class::VIF, cmd, "uuid").await?;
        let mode = mode_value(cmd.get("mode").unwrap_or(""), &["None", "Static"])?;
        self.call(
            message,
            vec![
                Value::String(vif),
                Value::str(mode),
                Value::str(cmd.get("address").unwrap_or("")),
                Value::str(cmd.get("gateway").unwrap_or("")),
            ],
        )
        .await?;
        Ok(())
    }

    /// The VM's VIFs as records (uuid, device, MAC, network, attached).
    pub(crate) async fn vm_vif_list(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let vm = self.vm_of(cmd).await?;
        let Some(cc) = cli_classes().into_iter().find(|c| c.class == class::VIF) else {
            return text("no vif class");
        };
        let wanted: Vec<String> = match cmd.get("params") {
            Some(p) => p.split(',').map(|s| s.trim().to_owned()).collect(),
            None => [
                "uuid",
                "vm-uuid",
                "device",
                "MAC",
                "network-uuid",
                "currently-attached",
            ]
            .map(String::from)
            .to_vec(),
        };
        let vifs = self.get("VM", &vm, "VIFs").await?;
        let mut rows = Vec::new();
        for v in vifs.as_array().unwrap_or_default() {
            let Ok(rec) = self.call("VIF.get_record", vec![v.clone()]).await else {
                continue;
            };
            let device: u32 = rec
                .member("device")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok())
                .unwrap_or(u32::MAX);
            let all = wanted.iter().any(|w| w == "all");
            let cols = self
                .cli_record(&cc, &rec, |n| all || wanted.iter().any(|w| w == n))
                .await?;
            rows.push((device, cols));
        }
        rows.sort_by_key(|(d, _)| *d);
        for (_, cols) in rows {
            out.push(Out::Print(format!(
                "{}\n",
                crate::cli::records::table(&cols)
            )));
        }
        Ok(())
    }

    pub(crate) async fn pif_scan(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let host = Ref::new(self.ref_of(class::HOST, cmd, "host-uuid").await?);
        self.invoke(pif::Scan { host }).await?;
        Ok(())
    }

    pub(crate) async fn pif_introduce(
        &self,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let host = Ref::new(self.ref_of(class::HOST, cmd, "host-uuid").await?);
        let r = self
            .invoke(pif::Introduce {
                host,
                mac: cmd.get("mac").unwrap_or("").to_owned(),
                device: cmd.get("device").unwrap_or("").to_owned(),
                managed: boolean(cmd, "managed", true)?,
            })
            .await?;
        out.push(Out::Print(self.uuid(class::PIF, &r.db_string()).await?));
        Ok(())
    }

    pub(crate) async fn pif_reconfigure_ip(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let pif = self.ref_of(class::PIF, cmd, "uuid").await?;
        let mode = mode_value(cmd.get("mode").unwrap_or(""), &["None", "DHCP", "Static"])?;
        let params = [
            Value::String(pif),
            Value::str(mode),
            Value::str(any_case(cmd, "IP")),
            Value::str(any_case(cmd, "netmask")),
            Value::str(any_case(cmd, "gateway")),
            Value::str(any_case(cmd, "DNS")),
        ];
        self.call("PIF.reconfigure_ip", params.to_vec()).await?;
        Ok(())
    }

    pub(crate) async fn pif_reconfigure_ipv6(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let pif = self.ref_of(class::PIF, cmd, "uuid").await?;
        let mode = mode_value(
            cmd.get("mode").unwrap_or(""),
            &["None", "DHCP", "Static", "Autoconf"],
        )?;
        let params = [
            Value::String(pif),
            Value::str(mode),
            Value::str(any_case(cmd, "IPv6")),
            Value::str(any_case(cmd, "gateway")),
            Value::str(any_case(cmd, "DNS")),
        ];
        self.call("PIF.reconfigure_ipv6", params.to_vec()).await?;
        Ok(())
    }

    pub(crate) async fn host_management_reconfigure(
        &self,
        cmd: &Cmd,
        _: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let pif = Ref::new(self.ref_of(class::PIF, cmd, "pif-uuid").await?);
        self.invoke(host::ManagementReconfigure { pif }).await?;
        Ok(())
    }

    /// The tag as xe reads it: a number, else the API's `VLAN_TAG_INVALID`.
    fn tag(cmd: &Cmd) -> i64 {
        // An unreadable tag is sent as -1, which the API refuses with
        // VLAN_TAG_INVALID like any other tag out of range.
        cmd.get("vlan").and_then(|v| v.parse().ok()).unwrap_or(-1)
    }

    pub(crate) async fn vlan_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let tagged_pif = Ref::new(self.ref_of(class::PIF, cmd, "pif-uuid").await?);
        let network = Ref::new(self.ref_of(class::NETWORK, cmd, "network-uuid").await?);
        let v = self
            .invoke(vlan::Create {
                tagged_pif,
                tag: Self::tag(cmd),
                network,
            })
            .await?;
        // xe prints the new PIF, not the VLAN object.
        let untagged = self
            .call("VLAN.get_untagged_PIF", vec![Value::str(v.db_string())])
            .await?;
        out.push(Out::Print(
            self.uuid(class::PIF, &untagged.db_string()).await?,
        ));
        Ok(())
    }

    pub(crate) async fn pool_vlan_create(
        &self,
        cmd: &Cmd,
        out: &mut Vec<Out>,
    ) -> Result<(), CliError> {
        let pif = self.ref_of(class::PIF, cmd, "pif-uuid").await?;
        let network = self.ref_of(class::NETWORK, cmd, "network-uuid").await?;
        let made = self
            .call(
                "pool.create_VLAN_from_PIF",
                vec![
                    Value::String(pif),
                    Value::String(network),
                    Value::Int(Self::tag(cmd)),
                ],
            )
            .await?;
        for p in made.as_array().unwrap_or_default() {
            out.push(Out::Print(self.uuid(class::PIF, &p.db_string()).await?));
        }
        Ok(())
    }

    /// `uuid=` names the VLAN, or (as xe allows) its untagged PIF.
    pub(crate) async fn vlan_destroy(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let uuid = cmd.get("uuid").unwrap_or("");
        let vlan = match self.find_uuid("VLAN", uuid).await? {
            Some(v) => v,
            None => {
                let pif = self.ref_of(class::PIF, cmd, "uuid").await?;
                self.get("PIF", &pif, "VLAN_master_of").await?.db_string()
            }
        };
        self.call("VLAN.destroy", vec![Value::String(vlan)]).await?;
        Ok(())
    }

    pub(crate) async fn bond_create(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        let network = self.ref_of(class::NETWORK, cmd, "network-uuid").await?;
        let mut members = Vec::new();
        for u in cmd.get("pif-uuids").unwrap_or("").split(',').map(str::trim) {
            if u.is_empty() {
                continue;
            }
            let r = self.call("PIF.get_by_uuid", vec![Value::str(u)]).await?;
            members.push(r);
        }
        let props: Vec<(String, Value)> = cmd
            .params
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("properties:")?.to_owned(), Value::str(v))))
            .collect();
        let mode = mode_value(
            cmd.get("mode").unwrap_or("balance-slb"),
            &["balance-slb", "active-backup", "lacp"],
        )?;
        let r = self
            .call(
                "Bond.create",
                vec![
                    Value::String(network),
                    Value::Array(members),
                    Value::str(cmd.get("mac").unwrap_or("")),
                    Value::str(mode),
                    Value::Struct(props),
                ],
            )
            .await?;
        out.push(Out::Print(self.uuid(class::BOND, &r.db_string()).await?));
        Ok(())
    }

    pub(crate) async fn bond_set_mode(&self, cmd: &Cmd, _: &mut Vec<Out>) -> Result<(), CliError> {
        let b = self.ref_of(class::BOND, cmd, "uuid").await?;
        let mode = mode_value(
            cmd.get("mode").unwrap_or(""),
            &["balance-slb", "active-backup", "lacp"],
        )?;
        self.call("Bond.set_mode", vec![Value::String(b), Value::str(mode)])
            .await?;
        Ok(())
    }
}
