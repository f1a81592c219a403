//! First start and every start: the host and pool records, templates and the local SR.

use crate::auth::passwords::hash_password;
use crate::init::host_facts::{cpuinfo, hostname, meminfo_kib, primary_address};
use crate::init::templates::templates;
use anyhow::Context;
use corral_db::Db;
use corral_model::schema::{Role, class, field};
use corral_model::{ApiError, NULL_REF, Value, date, new_ref};
pub mod host_facts;
pub mod templates;

/// Corral's product version (numeric X.Y.Z, as Ansible requires) and build.
pub const PRODUCT_VERSION: &str = "0.1.0";

pub const BUILD_NUMBER: &str = "1";

pub const API_MAJOR: i64 = 2;

pub const API_MINOR: i64 = 21;

pub struct Identity {
    pub host_ref: String,
    pub pool_ref: String,
}

pub(crate) fn s(v: &str) -> Value {
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
    let facts = HostFacts::of_this_machine();
    let root_hash = hash_password(&password).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pool_ref = new_ref();
    let name = facts.name.clone();
    let mut host_ref = String::new();
    db.write(|t| {
        host_ref = create_host(t, &facts)?;
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

/// What a host record says about its machine.
pub struct HostFacts {
    pub name: String,
    pub address: String,
    pub memory_total: i64,
    pub memory_free: i64,
    pub ncpu: usize,
    /// `/proc/cpuinfo`'s first processor, key by key.
    pub cpu: Vec<(String, String)>,
}

impl HostFacts {
    pub fn of_this_machine() -> HostFacts {
        let (ncpu, cpu) = cpuinfo();
        HostFacts {
            name: hostname(),
            address: primary_address(),
            memory_total: meminfo_kib("MemTotal:") * 1024,
            memory_free: meminfo_kib("MemAvailable:") * 1024,
            ncpu,
            cpu,
        }
    }
}

/// Adds a host's records to the pool database (a member joining; the
/// in-process pools of the tests).
pub fn add_host(db: &Db, facts: &HostFacts) -> Result<String, ApiError> {
    db.write(|t| create_host(t, facts)).map_err(ApiError::from)
}

/// The host, its metrics and its CPUs; returns the host's ref.
fn create_host(t: &mut corral_db::Txn<'_>, facts: &HostFacts) -> Result<String, ApiError> {
    let host_ref = new_ref();
    let metrics_ref = new_ref();
    let (name, address, total, free, ncpu) = (
        &facts.name,
        &facts.address,
        facts.memory_total,
        facts.memory_free,
        facts.ncpu,
    );
    let get = |k: &str| {
        facts
            .cpu
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
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
        ("hostname".into(), s(name)),
        ("date".into(), s(&date::now())),
        ("hypervisor".into(), s("kvm")),
    ]);
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
            (field::host::NAME_LABEL.index, s(name)),
            (field::host::HOSTNAME.index, s(name)),
            (field::host::ADDRESS.index, s(address)),
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
    Ok(host_ref)
}

/// Refreshes what changes between starts (memory, address, version).
pub(crate) fn refresh(db: &Db, id: &Identity) -> anyhow::Result<()> {
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
