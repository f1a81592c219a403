//! What corrald creates on first start, and what it refreshes on every start.

use crate::sessions::hash_password;
use anyhow::Context;
use corral_db::Db;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};

/// Corral's product version (numeric X.Y.Z, as Ansible requires) and build.
pub const PRODUCT_VERSION: &str = "0.1.0";
pub const BUILD_NUMBER: &str = "1";
pub const API_MAJOR: i64 = 2;
pub const API_MINOR: i64 = 21;

pub struct Identity {
    pub host_ref: String,
    pub pool_ref: String,
}

fn cpuinfo() -> (usize, Vec<(String, String)>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut count = 0;
    let mut first: Vec<(String, String)> = Vec::new();
    for block in text.split("\n\n").filter(|b| b.contains("processor")) {
        count += 1;
        if first.is_empty() {
            first = block
                .lines()
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
        }
    }
    (count.max(1), first)
}

fn meminfo_kib(key: &str) -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The first non-loopback IPv4 address of this host (the management address).
pub fn primary_address() -> String {
    let mut out = None;
    // SAFETY: getifaddrs fills a linked list we only read and then free.
    unsafe {
        let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut ifa) == 0 {
            let mut p = ifa;
            while !p.is_null() {
                let a = (*p).ifa_addr;
                if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                    let sin = &*(a as *const libc::sockaddr_in);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                    if !ip.is_loopback() {
                        out = Some(ip.to_string());
                        break;
                    }
                }
                p = (*p).ifa_next;
            }
            libc::freeifaddrs(ifa);
        }
    }
    out.unwrap_or_else(|| "127.0.0.1".into())
}

fn s(v: &str) -> Value {
    Value::str(v)
}

/// Finds this host's pool and host, creating everything on first start.
pub fn ensure(db: &Db, root_password: Option<String>) -> anyhow::Result<Identity> {
    let existing = {
        let st = db.read();
        st.refs(class::POOL).next().cloned().and_then(|pool| {
            let host = st.get_str(field::pool::MASTER, &pool).unwrap_or_default();
            st.exists(class::HOST, &host).then_some(Identity {
                host_ref: host,
                pool_ref: pool,
            })
        })
    };
    if let Some(id) = existing {
        refresh(db, &id)?;
        return Ok(id);
    }
    let password = root_password.context(
        "first start needs the root password: set CORRAL_ROOT_PASSWORD or pass --root-password-file",
    )?;
    let (ncpu, cpu) = cpuinfo();
    let get = |k: &str| {
        cpu.iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let host_ref = new_ref();
    let pool_ref = new_ref();
    let metrics_ref = new_ref();
    let name = hostname();
    let address = primary_address();
    let total = meminfo_kib("MemTotal:") * 1024;
    let free = meminfo_kib("MemAvailable:") * 1024;
    let root_hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cpu_info = Value::Struct(vec![
        ("cpu_count".into(), s(&ncpu.to_string())),
        ("socket_count".into(), s("1")),
        ("vendor".into(), s(&get("vendor_id"))),
        ("speed".into(), s(&get("cpu MHz"))),
        ("modelname".into(), s(&get("model name"))),
        ("family".into(), s(&get("cpu family"))),
        ("model".into(), s(&get("model"))),
        ("stepping".into(), s(&get("stepping"))),
        ("flags".into(), s(&get("flags"))),
        ("features".into(), s("")),
    ]);
    let software = Value::Struct(vec![
        ("product_brand".into(), s("Corral")),
        ("product_version".into(), s(PRODUCT_VERSION)),
        ("product_version_text".into(), s(PRODUCT_VERSION)),
        ("product_version_text_short".into(), s(PRODUCT_VERSION)),
        ("platform_name".into(), s("Corral")),
        ("platform_version".into(), s(PRODUCT_VERSION)),
        ("build_number".into(), s(BUILD_NUMBER)),
        ("xapi".into(), s(&format!("{API_MAJOR}.{API_MINOR}"))),
        ("hostname".into(), s(&name)),
        ("date".into(), s(&date::now())),
        ("hypervisor".into(), s("kvm")),
    ]);
    db.write(|t| {
        t.create(
            class::HOST_METRICS,
            &metrics_ref,
            vec![
                (field::host_metrics::MEMORY_TOTAL.index, Value::Int(total)),
                (field::host_metrics::MEMORY_FREE.index, Value::Int(free)),
                (field::host_metrics::LIVE.index, Value::Bool(true)),
                (
                    field::host_metrics::LAST_UPDATED.index,
                    Value::DateTime(date::now()),
                ),
            ],
        )?;
        t.create(
            class::HOST,
            &host_ref,
            vec![
                (field::host::NAME_LABEL.index, s(&name)),
                (field::host::HOSTNAME.index, s(&name)),
                (field::host::ADDRESS.index, s(&address)),
                (field::host::API_VERSION_MAJOR.index, Value::Int(API_MAJOR)),
                (field::host::API_VERSION_MINOR.index, Value::Int(API_MINOR)),
                (field::host::API_VERSION_VENDOR.index, s("Corral")),
                (field::host::ENABLED.index, Value::Bool(true)),
                (field::host::SOFTWARE_VERSION.index, software.clone()),
                (field::host::CPU_INFO.index, cpu_info.clone()),
                (field::host::METRICS.index, s(&metrics_ref)),
                (
                    field::host::CAPABILITIES.index,
                    Value::string_set(["hvm-3.0-x86_64"]),
                ),
                (field::host::EDITION.index, s("free")),
                (field::host::SCHED_POLICY.index, s("credit")),
            ],
        )?;
        for n in 0..ncpu {
            t.create(
                class::HOST_CPU,
                &new_ref(),
                vec![
                    (field::host_cpu::HOST.index, s(&host_ref)),
                    (field::host_cpu::NUMBER.index, Value::Int(n as i64)),
                    (field::host_cpu::VENDOR.index, s(&get("vendor_id"))),
                    (
                        field::host_cpu::SPEED.index,
                        Value::Int(get("cpu MHz").parse::<f64>().unwrap_or(0.0) as i64),
                    ),
                    (field::host_cpu::MODELNAME.index, s(&get("model name"))),
                    (
                        field::host_cpu::FAMILY.index,
                        Value::Int(get("cpu family").parse().unwrap_or(0)),
                    ),
                    (
                        field::host_cpu::MODEL.index,
                        Value::Int(get("model").parse().unwrap_or(0)),
                    ),
                    (field::host_cpu::STEPPING.index, s(&get("stepping"))),
                    (field::host_cpu::FLAGS.index, s(&get("flags"))),
                ],
            )?;
        }
        t.create(
            class::POOL,
            &pool_ref,
            vec![
                (field::pool::NAME_LABEL.index, s("")),
                (field::pool::NAME_DESCRIPTION.index, s("")),
                (field::pool::MASTER.index, s(&host_ref)),
                (field::pool::DEFAULT_SR.index, s(NULL_REF)),
                (field::pool::SUSPEND_IMAGE_SR.index, s(NULL_REF)),
                (field::pool::CRASH_DUMP_SR.index, s(NULL_REF)),
                (field::pool::OTHER_CONFIG.index, Value::Struct(vec![])),
                (field::pool::METADATA_VDIS.index, Value::Array(vec![])),
            ],
        )?;
        for role in Role::ALL {
            t.create(
                class::ROLE,
                &new_ref(),
                vec![
                    (field::role::NAME_LABEL.index, s(role.name())),
                    (field::role::NAME_DESCRIPTION.index, s(role.description())),
                ],
            )?;
        }
        t.create(
            class::USER,
            &new_ref(),
            vec![
                (field::user::SHORT_NAME.index, s("root")),
                (field::user::FULLNAME.index, s("Local superuser")),
                (
                    field::user::PASSWORD_HASH.index,
                    Value::String(root_hash.clone()),
                ),
            ],
        )?;
        for tpl in templates() {
            t.create(class::VM, &new_ref(), tpl)?;
        }
        Ok::<(), ApiError>(())
    })
    .map_err(|e| anyhow::anyhow!("creating the initial database: {e}"))?;
    tracing::info!(host = %name, "created pool database on first start");
    Ok(Identity { host_ref, pool_ref })
}

/// Refreshes what changes between starts (memory, address, version).
fn refresh(db: &Db, id: &Identity) -> anyhow::Result<()> {
    let metrics = db
        .read()
        .get_str(field::host::METRICS, &id.host_ref)
        .unwrap_or_default();
    db.write(|t| {
        if t.state().exists(class::HOST_METRICS, &metrics) {
            t.set(
                field::host_metrics::MEMORY_FREE,
                &metrics,
                Value::Int(meminfo_kib("MemAvailable:") * 1024),
            )?;
            t.set(field::host_metrics::LIVE, &metrics, Value::Bool(true))?;
            t.set(
                field::host_metrics::LAST_UPDATED,
                &metrics,
                Value::DateTime(date::now()),
            )?;
        }
        Ok::<(), ApiError>(())
    })
    .map_err(|e| anyhow::anyhow!("refreshing host metrics: {e}"))
}

/// The default templates.
fn templates() -> Vec<Vec<(usize, Value)>> {
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

/// Records which host agent runs VMs here: `software_version:host_driver`,
/// and for the simulator a name_description that `xe host-list` shows.
pub fn record_host_driver(server: &crate::api::Server) {
    const SIM_NOTE: &str = "Simulated host (sim driver): VMs do not really run";
    let kind = server.agent.kind();
    let host = server.host_ref.clone();
    let r = server.db.write(|t| {
        let st = t.state();
        let mut sv = st
            .get(field::host::SOFTWARE_VERSION, &host)
            .and_then(|v| v.as_struct().map(<[_]>::to_vec))
            .unwrap_or_default();
        sv.retain(|(k, _)| k != "host_driver");
        sv.push(("host_driver".into(), s(kind)));
        let descr = st
            .get_str(field::host::NAME_DESCRIPTION, &host)
            .unwrap_or_default();
        t.set(field::host::SOFTWARE_VERSION, &host, Value::Struct(sv))?;
        if kind == "sim" && descr.is_empty() {
            t.set(field::host::NAME_DESCRIPTION, &host, s(SIM_NOTE))?;
        } else if kind != "sim" && descr == SIM_NOTE {
            t.set(field::host::NAME_DESCRIPTION, &host, s(""))?;
        }
        Ok::<(), ApiError>(())
    });
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot record the host driver");
    }
}
