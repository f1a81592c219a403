//! The built-in VM templates.

use crate::init::s;
use corral_model::schema::field;
use corral_model::{NULL_REF, Value};

/// The default templates.
pub(crate) fn templates() -> Vec<Vec<(usize, Value)>> {
    use field::vm as f;
    let mib = |n: i64| Value::Int(n * 1024 * 1024);
    let base = |name: &str, descr: &str| -> Vec<(usize, Value)> {
        vec![
            (f::NAME_LABEL.index, s(name)),
            (f::NAME_DESCRIPTION.index, s(descr)),
            (f::IS_A_TEMPLATE.index, Value::Bool(true)),
            (f::IS_DEFAULT_TEMPLATE.index, Value::Bool(true)),
            (f::MEMORY_STATIC_MAX.index, mib(512)),
            (f::MEMORY_DYNAMIC_MAX.index, mib(512)),
            (f::MEMORY_DYNAMIC_MIN.index, mib(512)),
            (f::MEMORY_STATIC_MIN.index, mib(128)),
            (f::VCPUS_MAX.index, Value::Int(1)),
            (f::VCPUS_AT_STARTUP.index, Value::Int(1)),
            (f::ACTIONS_AFTER_SHUTDOWN.index, s("destroy")),
            (f::ACTIONS_AFTER_REBOOT.index, s("restart")),
            (f::ACTIONS_AFTER_CRASH.index, s("restart")),
            (f::RESIDENT_ON.index, s(NULL_REF)),
            (f::AFFINITY.index, s(NULL_REF)),
            (f::USER_VERSION.index, Value::Int(1)),
            (f::DOMAIN_TYPE.index, s("hvm")),
            (f::BLOCKED_OPERATIONS.index, Value::Struct(vec![])),
        ]
    };
    let mut other = base(
        "Other install media",
        "Template for installing an operating system from install media (BIOS boot).",
    );
    other.push((f::HVM_BOOT_POLICY.index, s("BIOS order")));
    other.push((
        f::HVM_BOOT_PARAMS.index,
        Value::string_map([("order", "cd")]),
    ));
    other.push((
        f::PLATFORM.index,
        Value::string_map([
            ("acpi", "1"),
            ("apic", "true"),
            ("pae", "true"),
            ("nx", "true"),
        ]),
    ));
    other.push((
        f::OTHER_CONFIG.index,
        Value::string_map([
            ("install-methods", "cdrom"),
            ("default_template", "true"),
            // What VM.provision (xe vm-install) makes: one 32 GiB boot disk
            // on the named SR, else the pool's default SR.
            (
                "disks",
                r#"<provision><disk device="0" size="34359738368" sr="" bootable="true" type="system"/></provision>"#,
            ),
        ]),
    ));
    let mut linux = base(
        "Linux direct kernel boot",
        "Template for a Linux guest booted from a kernel and initrd on the host (PV_kernel, PV_ramdisk, PV_args).",
    );
    linux.push((f::HVM_BOOT_POLICY.index, s("")));
    linux.push((f::PV_ARGS.index, s("console=ttyS0")));
    linux.push((
        f::PLATFORM.index,
        Value::string_map([("acpi", "1"), ("apic", "true")]),
    ));
    linux.push((
        f::OTHER_CONFIG.index,
        Value::string_map([("default_template", "true"), ("linux_template", "true")]),
    ));
    vec![other, linux]
}
