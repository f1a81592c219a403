//! The QEMU command line for a VmConfig: every value that reaches it is escaped or chosen by corrald, never passed through.

use crate::qemu::QemuAgent;
use crate::{Boot, Drive, VmConfig};
use std::path::Path;

pub(crate) fn opt_escape(s: &str) -> String {
    // QEMU option values escape a comma by doubling it.
    s.replace(',', ",,")
}

impl QemuAgent {
    /// The QEMU command line for `cfg` (without the binary).
    pub fn command_line(
        &self,
        cfg: &VmConfig,
        dir: &Path,
        paused: bool,
        incoming: Option<&Path>,
        tap_fds: &[(u32, i32)],
    ) -> Vec<String> {
        let d = |f: &str| opt_escape(&dir.join(f).to_string_lossy());
        let mib = (cfg.memory / (1024 * 1024)).max(16);
        let accel = if self.settings.accel == "tcg" {
            // Bound TCG's translation cache (its default is 1 GiB per VM).
            "tcg,tb-size=64".to_owned()
        } else {
            self.settings.accel.clone()
        };
        let vmax = cfg.vcpus_max.max(cfg.vcpus).max(1);
        let mut smp = format!("{},maxcpus={vmax}", cfg.vcpus.max(1));
        // The caller checked that cores-per-socket divides VCPUs_max.
        if cfg.cores_per_socket > 0 && vmax % cfg.cores_per_socket == 0 {
            let c = cfg.cores_per_socket;
            smp.push_str(&format!(",sockets={},cores={c},threads=1", vmax / c));
        }
        let vga = match cfg.vga.as_deref() {
            Some("cirrus") => "cirrus",
            _ => "std",
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!(
                "guest={},debug-threads=on",
                opt_escape(&cfg.name.replace(['=', '\n'], "_"))
            ),
            "-uuid".into(),
            cfg.uuid.clone(),
            "-machine".into(),
            format!(
                "{},acpi={}{}",
                self.settings.machine,
                if cfg.acpi { "on" } else { "off" },
                match cfg.hpet {
                    Some(false) => ",hpet=off",
                    _ => "",
                }
            ),
            "-accel".into(),
            accel,
            "-m".into(),
            format!("{mib}M"),
            "-smp".into(),
            smp,
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-vga".into(),
            vga.into(),
            "-vnc".into(),
            format!("unix:{}", d("vnc.sock")),
            "-daemonize".into(),
            "-pidfile".into(),
            dir.join("qemu.pid").to_string_lossy().into_owned(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d("qmp.sock")),
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                d("serial.sock"),
                d("serial.log")
            ),
            "-serial".into(),
            "chardev:serial0".into(),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!("socket,id=qga0,path={},server=on,wait=off", d("qga.sock")),
            "-device".into(),
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into(),
            "-device".into(),
            "virtio-balloon-pci,id=balloon0".into(),
            "-device".into(),
            "pvpanic".into(),
            "-action".into(),
            format!(
                "shutdown=pause,panic=pause,reboot={}",
                if cfg.reboot_stops {
                    "shutdown"
                } else {
                    "reset"
                }
            ),
        ];
        match &cfg.boot {
            Boot::Kernel {
                kernel,
                initrd,
                args,
            } => {
                a.extend(["-kernel".into(), kernel.clone()]);
                if let Some(i) = initrd {
                    a.extend(["-initrd".into(), i.clone()]);
                }
                a.extend(["-append".into(), args.clone()]);
            }
            Boot::Firmware { order, uefi } => {
                let order: String = order
                    .chars()
                    .filter(|c| matches!(c, 'c' | 'd' | 'n'))
                    .collect();
                if !order.is_empty() {
                    a.extend(["-boot".into(), format!("order={order}")]);
                }
                if *uefi {
                    a.extend(["-bios".into(), self.settings.ovmf.clone()]);
                }
            }
        }
        let mut cd_unit = 0;
        for drv in &cfg.drives {
            a.extend(["-drive".into(), drive_spec(drv)]);
            if drv.cdrom {
                // Two IDE buses, one CD per unit: up to four CD drives.
                let (bus, unit) = (1 - (cd_unit / 2) % 2, cd_unit % 2);
                cd_unit += 1;
                a.extend([
                    "-device".into(),
                    format!(
                        "ide-cd,drive=drive-{0},id=vbd-{0},bus=ide.{bus},unit={unit}",
                        drv.id
                    ),
                ]);
            } else {
                a.extend([
                    "-device".into(),
                    format!("virtio-blk-pci,drive=drive-{0},id=vbd-{0}", drv.id),
                ]);
            }
        }
        for nic in &cfg.nics {
            let Some((_, fd)) = tap_fds.iter().find(|(d, _)| *d == nic.device) else {
                continue;
            };
            let model = crate::NIC_MODELS
                .iter()
                .find(|m| **m == nic.model)
                .copied()
                .unwrap_or(crate::NIC_MODELS[0]);
            let mac = if corral_net::mac::is_valid(&nic.mac) {
                nic.mac.to_ascii_lowercase()
            } else {
                continue;
            };
            a.extend([
                "-netdev".into(),
                format!("tap,id=vif{0},fd={fd}", nic.device),
                "-device".into(),
                format!("{model},netdev=vif{0},id=nic{0},mac={mac}", nic.device),
            ]);
        }
        if cfg.videoram_mib > 0 {
            let dev = if vga == "cirrus" { "cirrus-vga" } else { "VGA" };
            a.extend([
                "-global".into(),
                format!("{dev}.vgamem_mb={}", cfg.videoram_mib),
            ]);
        }
        if let Some(base) = &cfg.rtc_base {
            a.extend(["-rtc".into(), format!("base={base}")]);
        }
        if paused {
            a.push("-S".into());
        }
        if let Some(src) = incoming {
            a.extend([
                "-incoming".into(),
                format!("exec:cat {}", shell_quote(&src.to_string_lossy())),
            ]);
        }
        a
    }
}

pub(crate) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub(crate) fn drive_spec(drv: &Drive) -> String {
    let mut s = format!("if=none,id=drive-{}", drv.id);
    if drv.cdrom {
        s.push_str(",media=cdrom");
    }
    if let Some(p) = &drv.path {
        s.push_str(&format!(
            ",file={},format={},read-only={}",
            opt_escape(p),
            drv.format,
            if drv.read_only || drv.cdrom {
                "on"
            } else {
                "off"
            }
        ));
        if !drv.cdrom {
            s.push_str(",cache=writeback,discard=unmap");
        }
    }
    s
}
