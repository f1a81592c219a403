//! From the records to the agent's VmConfig.

use crate::context::Server;
use crate::ops::query::{flag, int, strmap, vbds_of, vm_uuid};
use crate::ops::vbd::{check_vdi_free, drive_of};
use corral_agent::{Boot, VmConfig};
use corral_model::schema::{class, field};
use corral_model::{ApiError, date, errors};

pub(crate) fn build_config(s: &Server, vm: &str) -> Result<VmConfig, ApiError> {
    let st = s.db.read();
    let g = |f| st.get_str(f, vm).unwrap_or_default();
    let (smin, dmin, dmax, smax) = (
        int(&st, field::vm::MEMORY_STATIC_MIN, vm),
        int(&st, field::vm::MEMORY_DYNAMIC_MIN, vm),
        int(&st, field::vm::MEMORY_DYNAMIC_MAX, vm),
        int(&st, field::vm::MEMORY_STATIC_MAX, vm),
    );
    if !(smin <= dmin && dmin <= dmax && dmax <= smax) {
        return Err(errors::memory_constraint_violation(
            "memory_static_min <= memory_dynamic_min <= memory_dynamic_max <= memory_static_max",
        ));
    }
    if smax < 16 * 1024 * 1024 {
        return Err(errors::vm_memory_size_too_low(vm));
    }
    let (vmax, vstart) = (
        int(&st, field::vm::VCPUS_MAX, vm),
        int(&st, field::vm::VCPUS_AT_STARTUP, vm),
    );
    if vstart < 1 || vstart > vmax {
        return Err(ApiError::invalid_value(
            "VCPUs_at_startup",
            &vstart.to_string(),
        ));
    }
    let platform = strmap(st.get(field::vm::PLATFORM, vm));
    let hvm = strmap(st.get(field::vm::HVM_BOOT_PARAMS, vm));
    // XAPI's checks: the topology must fit VCPUs_max.
    let cores_per_socket = match platform.get("cores-per-socket") {
        None => 0,
        Some(c) => match c.parse::<i64>() {
            Ok(n) if n > 0 && vmax % n == 0 => n,
            Ok(n) if n > 0 => {
                return Err(ApiError::invalid_value(
                    "platform:cores-per-socket",
                    &format!("VCPUs_max ({vmax}) must be a multiple of this field ({n})"),
                ));
            }
            _ => return Err(ApiError::invalid_value("platform:cores-per-socket", c)),
        },
    };
    let rtc_base = match platform.get("timeoffset") {
        None => None,
        Some(o) => match o.trim().parse::<i64>() {
            Ok(0) => None,
            Ok(secs) => {
                // YYYYMMDDTHH:MM:SSZ → YYYY-MM-DDTHH:MM:SS
                let d = date::format(date::now_secs() + secs);
                Some(format!(
                    "{}-{}-{}T{}",
                    &d[0..4],
                    &d[4..6],
                    &d[6..8],
                    &d[9..17]
                ))
            }
            Err(_) => return Err(ApiError::invalid_value("platform:timeoffset", o)),
        },
    };
    let kernel = g(field::vm::PV_KERNEL);
    let boot = if !kernel.is_empty() {
        let kernel = boot_file(s, &st, vm, "PV-kernel", &kernel)?;
        let rd = g(field::vm::PV_RAMDISK);
        let initrd = if rd.is_empty() {
            None
        } else {
            Some(boot_file(s, &st, vm, "PV-ramdisk", &rd)?)
        };
        Boot::Kernel {
            kernel,
            initrd,
            args: g(field::vm::PV_ARGS),
        }
    } else if g(field::vm::HVM_BOOT_POLICY).is_empty() {
        // A PV-style (direct kernel) VM with no kernel has nothing to boot.
        return Err(errors::bootloader_failed(
            vm.to_owned(),
            "the VM boots a kernel directly (HVM-boot-policy is empty) but PV-kernel is not set"
                .to_owned(),
        ));
    } else {
        Boot::Firmware {
            order: hvm.get("order").cloned().unwrap_or_else(|| "cd".into()),
            uefi: hvm.get("firmware").map(String::as_str) == Some("uefi"),
        }
    };
    let mut drives = Vec::new();
    let mut vbds = vbds_of(&st, vm);
    vbds.sort_by_key(|v| {
        st.get_str(field::vbd::USERDEVICE, v)
            .and_then(|u| u.parse::<u32>().ok())
    });
    for vbd in &vbds {
        check_vdi_free(&st, vm, vbd)?;
        if let Some(d) = drive_of(s, &st, vbd)? {
            drives.push(d);
        }
    }
    Ok(VmConfig {
        uuid: vm_uuid(&st, vm),
        name: g(field::vm::NAME_LABEL),
        memory: smax,
        memory_target: dmax,
        vcpus_max: vmax,
        vcpus: vstart,
        boot,
        drives,
        reboot_stops: g(field::vm::ACTIONS_AFTER_REBOOT) == "destroy",
        acpi: platform.get("acpi").map(String::as_str) != Some("0"),
        cores_per_socket,
        rtc_base,
        vga: platform.get("vga").cloned(),
        videoram_mib: platform
            .get("videoram")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        hpet: platform.get("hpet").map(|v| v != "false" && v != "0"),
        nics: crate::ops::vif::nics_of(&st, vm)?,
    })
}

/// A `PV-kernel`/`PV-ramdisk` path as QEMU gets it: resolved (links
/// followed) to a regular file inside one of the boot directories
/// (`<state-dir>/boot`, those of the `boot-dirs` setting, and local ISO
/// libraries). Anything else gets one answer, whether or not the path
/// exists, so the check reveals nothing about the rest of the host.
pub(crate) fn boot_file(
    s: &Server,
    st: &corral_db::State,
    vm: &str,
    what: &str,
    path: &str,
) -> Result<String, ApiError> {
    let refused = || {
        errors::bootloader_failed(
            vm.to_owned(),
            format!("{what} must be a file in a boot directory of this host"),
        )
    };
    let real = std::fs::canonicalize(path).map_err(|_| refused())?;
    let inside = boot_dirs(s, st)
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .any(|d| real.starts_with(&d));
    if !inside || !std::fs::metadata(&real).is_ok_and(|m| m.is_file()) {
        return Err(refused());
    }
    real.to_str().map(str::to_owned).ok_or_else(refused)
}

/// Where boot files may come from: the configured directories and the
/// directories of plugged local ISO libraries. `st` is the caller's read
/// lock (a second one could deadlock behind a waiting writer).
pub(crate) fn boot_dirs(s: &Server, st: &corral_db::State) -> Vec<std::path::PathBuf> {
    let mut dirs = s.config.boot_dirs.clone();
    dirs.push(s.state_dir.join("boot"));
    for pbd in st.refs(class::PBD) {
        let sr = st.get_str(field::pbd::SR, pbd).unwrap_or_default();
        let iso = st.get_str(field::sr::TYPE_, &sr).as_deref() == Some("iso");
        if !iso || !flag(st, field::pbd::CURRENTLY_ATTACHED, pbd) {
            continue;
        }
        if let Some(l) = strmap(st.get(field::pbd::DEVICE_CONFIG, pbd)).get("location") {
            if l.starts_with('/') {
                dirs.push(l.into());
            }
        }
    }
    dirs
}
