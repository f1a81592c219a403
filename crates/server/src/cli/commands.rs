//! The command table: names, parameters, help, and where each runs.

use crate::cli::args::{Cmd, STD_PARAMS};
use crate::cli::context::{CliCtx, CliError, text};
use crate::cli::protocol::{Out, Run, fail_text};
use crate::cli::records::{CliClass, cli_classes};
use crate::cli::table::{Command, act, cmd};
use corral_model::args::{pbd, sr, vbd, vdi, vm};
use corral_model::refs::classes;

/// The hand-written commands; `<class>-list` and `<class>-param-*` come
/// from the datamodel ([`GENERIC_COMMANDS`]).
pub(crate) const COMMANDS: &[Command] = &[
    cmd(
        "host-refresh-server-certificate",
        "",
        "host",
        "Replace the host's self-signed TLS certificate with a new one (valid ten years); new connections see it at once.",
        act!(host_refresh_server_certificate),
    ),
    cmd(
        "host-shutdown-vms",
        "",
        "",
        "Apply this host's VM shutdown policy (other-config:vm-shutdown-policy, vm-shutdown-timeout) before the host goes down (Corral extension; run by corral-host-shutdown.service).",
        act!(host_shutdown_vms),
    ),
    cmd(
        "console",
        "",
        "vm, uuid",
        "Attach to the VM's serial console (vt100); Ctrl-] leaves it.",
        act!(console),
    ),
    cmd(
        "vm-start",
        "",
        "vm, uuid, paused, force, on",
        "Start a VM (on= a host).",
        act!(vm_start),
    ),
    cmd(
        "vm-shutdown",
        "",
        "vm, uuid, force",
        "Shut a VM down cleanly, or at once with force=true.",
        act!(vm_shutdown),
    ),
    cmd(
        "vm-reboot",
        "",
        "vm, uuid, force",
        "Reboot a VM cleanly, or reset it with force=true.",
        act!(vm_reboot),
    ),
    cmd(
        "vm-suspend",
        "",
        "vm, uuid",
        "Suspend a VM to its suspend SR.",
        act!(on_vm::<vm::Suspend>),
    ),
    cmd(
        "vm-resume",
        "",
        "vm, uuid, paused, force, on",
        "Resume a suspended VM.",
        act!(vm_resume),
    ),
    cmd(
        "vm-pause",
        "",
        "vm, uuid",
        "Pause a running VM.",
        act!(on_vm::<vm::Pause>),
    ),
    cmd(
        "vm-unpause",
        "",
        "vm, uuid",
        "Unpause a paused VM.",
        act!(on_vm::<vm::Unpause>),
    ),
    cmd(
        "vm-cd-insert",
        "cd-name",
        "vm, uuid",
        "Insert an ISO (by VDI name-label) into the VM's empty CD drive.",
        act!(vm_cd_insert),
    ),
    cmd(
        "vm-cd-eject",
        "",
        "vm, uuid",
        "Eject the VM's CD.",
        act!(vm_cd_eject),
    ),
    cmd(
        "vm-cd-list",
        "",
        "vm, uuid",
        "List the VM's CD drives and their media.",
        act!(vm_cd_list),
    ),
    cmd(
        "vm-clone",
        "new-name-label",
        "vm, uuid, new-name-description",
        "Clone a halted VM or template; its disks are cloned (instant). Prints the new uuid.",
        act!(vm_clone),
    ),
    cmd(
        "vm-copy",
        "new-name-label",
        "vm, uuid, new-name-description, sr-uuid",
        "Copy a halted VM or template with full copies of its disks (onto sr-uuid if given). Prints the new uuid.",
        act!(vm_copy),
    ),
    cmd(
        "vm-install",
        "new-name-label",
        "template, template-uuid, template-name-label, sr-uuid, sr-name-label, copy",
        "Install a VM from a template: clone it, make the disks its other-config:disks asks for (on sr-uuid, else the pool's default SR). Prints the new uuid.",
        act!(vm_install),
    ),
    cmd(
        "vm-uninstall",
        "",
        "vm, uuid, force",
        "Destroy a halted VM and the disks only it uses (force=true: do not ask).",
        act!(vm_uninstall),
    ),
    cmd(
        "vm-destroy",
        "uuid",
        "",
        "Destroy a VM record; its disks stay.",
        act!(vm_destroy),
    ),
    cmd(
        "vm-reset-powerstate",
        "",
        "vm, uuid, force",
        "Mark a VM halted whose host is known to be down (force=true required).",
        act!(vm_reset_powerstate),
    ),
    cmd(
        "vm-disk-list",
        "",
        "vm, uuid",
        "List the VM's disks (VBDs and their VDIs).",
        act!(vm_disk_list),
    ),
    cmd(
        "vdi-import",
        "uuid, filename",
        "format",
        "Import a disk image (raw, vhd or qcow2) into a VDI.",
        act!(vdi_import),
    ),
    cmd(
        "vdi-export",
        "uuid, filename",
        "format",
        "Export a VDI's data as raw, vhd or qcow2.",
        act!(vdi_export),
    ),
    cmd(
        "sr-create",
        "name-label, type",
        "host-uuid, content-type, shared, physical-size, device-config:, sm-config:",
        "Create an SR, plugging it on its host(s).",
        act!(sr_create),
    ),
    cmd(
        "sr-probe",
        "type",
        "host-uuid, device-config:, sm-config:",
        "Probe for SRs with the given device-config; prints what was found.",
        act!(sr_probe),
    ),
    cmd(
        "sr-introduce",
        "uuid, name-label, type",
        "content-type, shared, sm-config:",
        "Introduce an SR record for existing storage (no PBDs).",
        act!(sr_introduce),
    ),
    cmd(
        "sr-forget",
        "uuid",
        "",
        "Forget an SR (its storage is untouched).",
        act!(on_uuid::<classes::SR, sr::Forget>),
    ),
    cmd(
        "sr-destroy",
        "uuid",
        "",
        "Destroy an SR and its storage.",
        act!(on_uuid::<classes::SR, sr::Destroy>),
    ),
    cmd(
        "sr-scan",
        "uuid",
        "",
        "Rescan an SR, reconciling the database with its storage.",
        act!(on_uuid::<classes::SR, sr::Scan>),
    ),
    cmd(
        "sr-update",
        "uuid",
        "",
        "Refresh an SR's sizes.",
        act!(on_uuid::<classes::SR, sr::Update>),
    ),
    cmd(
        "sr-repair",
        "uuid",
        "",
        "Create missing PBDs and plug every unplugged one, reporting each host (Corral extension, as XenCenter's Repair).",
        act!(sr_repair_cmd),
    ),
    cmd(
        "sr-upgrade",
        "uuid",
        "",
        "Upgrade a legacy-format SR in place, one way (Corral extension).",
        act!(sr_upgrade),
    ),
    cmd(
        "pbd-create",
        "host-uuid, sr-uuid",
        "device-config:",
        "Create a PBD.",
        act!(pbd_create),
    ),
    cmd(
        "pbd-plug",
        "uuid",
        "",
        "Attach the SR on the PBD's host.",
        act!(on_uuid::<classes::PBD, pbd::Plug>),
    ),
    cmd(
        "pbd-unplug",
        "uuid",
        "",
        "Detach the SR from the PBD's host.",
        act!(on_uuid::<classes::PBD, pbd::Unplug>),
    ),
    cmd(
        "pbd-destroy",
        "uuid",
        "",
        "Destroy an unplugged PBD.",
        act!(destroy::<classes::PBD>),
    ),
    cmd(
        "vdi-create",
        "sr-uuid, name-label, virtual-size",
        "type, sharable, read-only, sm-config:, other-config:",
        "Create a VDI; sizes take KiB, MiB, GiB, TiB suffixes.",
        act!(vdi_create),
    ),
    cmd(
        "vdi-destroy",
        "uuid",
        "",
        "Destroy a VDI and its data.",
        act!(destroy::<classes::VDI>),
    ),
    cmd(
        "vdi-forget",
        "uuid",
        "",
        "Forget a VDI record (its data stays).",
        act!(on_uuid::<classes::VDI, vdi::Forget>),
    ),
    cmd(
        "vdi-clone",
        "uuid",
        "new-name-label, new-name-description",
        "Clone a VDI (instant).",
        act!(vdi_clone),
    ),
    cmd(
        "vdi-snapshot",
        "uuid",
        "",
        "Snapshot a VDI (instant).",
        act!(vdi_snapshot),
    ),
    cmd(
        "vdi-resize",
        "uuid, disk-size",
        "online",
        "Grow a VDI.",
        act!(vdi_resize),
    ),
    cmd(
        "vdi-copy",
        "uuid",
        "sr-uuid",
        "Copy a VDI's data into a new VDI.",
        act!(vdi_copy),
    ),
    cmd(
        "vdi-update",
        "uuid",
        "",
        "Refresh a VDI's sizes from its storage.",
        act!(on_uuid::<classes::VDI, vdi::Update>),
    ),
    cmd(
        "vbd-create",
        "vm-uuid, device",
        "vdi-uuid, type, mode, bootable, empty, unpluggable",
        "Create a VBD.",
        act!(vbd_create),
    ),
    cmd(
        "vbd-destroy",
        "uuid",
        "",
        "Destroy a VBD.",
        act!(destroy::<classes::VBD>),
    ),
    cmd(
        "vbd-insert",
        "uuid, vdi-uuid",
        "",
        "Insert a VDI into an empty CD drive.",
        act!(vbd_insert),
    ),
    cmd(
        "vbd-eject",
        "uuid",
        "",
        "Eject the media from a CD drive.",
        act!(on_uuid::<classes::VBD, vbd::Eject>),
    ),
    cmd(
        "vbd-plug",
        "uuid",
        "",
        "Hot-plug a disk into its running VM.",
        act!(on_uuid::<classes::VBD, vbd::Plug>),
    ),
    cmd(
        "vbd-unplug",
        "uuid",
        "",
        "Hot-unplug a disk from its running VM.",
        act!(on_uuid::<classes::VBD, vbd::Unplug>),
    ),
    cmd(
        "user-create",
        "user-name, password-new, role",
        "fullname",
        "Creates a local user with a role (Corral extension).",
        act!(user_create),
    ),
    cmd(
        "user-password-change",
        "new",
        "old",
        "Changes the password of the logged-in user.",
        act!(user_password_change),
    ),
];

/// Every hand-written command.
pub(crate) fn all_commands() -> impl Iterator<Item = &'static Command> {
    COMMANDS.iter().chain(crate::cli::network::NETWORK_COMMANDS)
}

impl CliCtx {
    pub(crate) async fn dispatch(&self, cmd: &Cmd, out: &mut Vec<Out>) -> Result<(), CliError> {
        if let Some(spec) = all_commands().find(|c| c.name == cmd.name) {
            for k in spec.reqd.split(", ").filter(|k| !k.is_empty()) {
                if cmd.get(k).is_none() {
                    return text(format!("Required parameter not found: {k}"));
                }
            }
            return (spec.run)(self, cmd, out).await;
        }
        if let Some((cc, (suffix, ..))) = generic_command(&cmd.name) {
            return self.generic(&cc, suffix, cmd, out).await;
        }
        text(format!(
            "Unknown command: {}\nFor usage run: 'xe help'",
            cmd.name
        ))
    }
}

pub(crate) fn help(cmd: &Cmd) -> Run {
    let classes = cli_classes();
    let target = cmd
        .params
        .iter()
        .find(|(k, v)| v.is_empty() && !STD_PARAMS.contains(&k.as_str()))
        .map(|(k, _)| k.clone());
    let mut out = Vec::new();
    match target {
        Some(c) if c != "--all" => {
            let (reqd, opt, desc) = if let Some((_, (_, reqd, opt, desc))) = generic_command(&c) {
                (*reqd, *opt, (*desc).to_owned())
            } else if let Some(spec) = all_commands().find(|s| s.name == c) {
                (spec.reqd, spec.optional, spec.description.to_owned())
            } else {
                return fail_text(format!("Unknown command: {c}\nFor usage run: 'xe help'"));
            };
            out.push(Out::Print(format!("command name            : {c}\n        reqd params     : {reqd}\n        optional params : {opt}\n\n        description     : {desc}")));
        }
        _ => {
            let mut names: Vec<String> = vec!["help".into()];
            names.extend(all_commands().map(|c| c.name.to_owned()));
            for c in &classes {
                for (suffix, ..) in GENERIC_COMMANDS {
                    names.push(format!("{}{suffix}", c.name));
                }
            }
            names.sort();
            if cmd.flag("minimal") {
                // What shell completion reads.
                out.push(Out::Print(names.join(",")));
                return Run { out, exit: 0 };
            }
            out.push(Out::Print(format!("Usage: xe <command> [-s server] [-pw passwd] [-p port] [-u user] [-pwf password-file]\n  [command specific arguments]\n\nTo get help on a specific command: xe help <command>\n\nCommands:\n{}", names.join(", "))));
        }
    }
    Run { out, exit: 0 }
}

/// The per-class generic commands: suffix, required params, optional
/// params, description. `-list` comes last so that `vm-param-list` is not
/// taken for a `-list` of the class `vm-param`.
pub(crate) const GENERIC_COMMANDS: &[(&str, &str, &str, &str)] = &[
    (
        "-param-list",
        "uuid",
        "",
        "Lists all the parameters of the object",
    ),
    (
        "-param-get",
        "uuid, param-name",
        "param-key",
        "Gets a parameter of the object",
    ),
    ("-param-set", "uuid", "", "Sets parameters of the object"),
    (
        "-param-add",
        "uuid, param-name",
        "param-key",
        "Adds to a set or map parameter",
    ),
    (
        "-param-remove",
        "uuid, param-name, param-key",
        "",
        "Removes from a set or map parameter",
    ),
    ("-param-clear", "uuid, param-name", "", "Clears a parameter"),
    (
        "-list",
        "",
        "params",
        "Lists the objects, filtered by field=value",
    ),
];

pub(crate) type GenericCommand = (&'static str, &'static str, &'static str, &'static str);

/// Splits `vm-param-get` into the CLI class and the generic command's entry.
pub(crate) fn generic_command(name: &str) -> Option<(CliClass, &'static GenericCommand)> {
    GENERIC_COMMANDS.iter().find_map(|entry| {
        let cname = name.strip_suffix(entry.0)?;
        cli_classes()
            .into_iter()
            .find(|c| c.name == cname)
            .map(|c| (c, entry))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `xe help` and bash completion read this table: each command once,
    /// named as xe names them, with its help and well-formed parameter lists.
    #[test]
    fn the_command_table_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for c in all_commands() {
            assert!(seen.insert(c.name), "{} listed twice", c.name);
            assert!(
                c.name
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-'),
                "{}: xe command names are lower-case with dashes",
                c.name
            );
            assert!(!c.description.is_empty(), "{}: no help", c.name);
            for p in c.reqd.split(", ").chain(c.optional.split(", ")) {
                assert!(
                    !p.contains(' ') && !p.contains(','),
                    "{}: parameter list `{}` / `{}`",
                    c.name,
                    c.reqd,
                    c.optional
                );
            }
        }
    }
}
