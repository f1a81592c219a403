//! VM memory settings.

use crate::context::Server;
use crate::core::call::{ApiResult, void};
use crate::core::driver_errors;
use crate::core::records::db;
use crate::ops::query::{int, live_on, power, vm_uuid};
use corral_model::enums::VmPowerState;
use corral_model::schema::{class, field};
use corral_model::{ApiError, Value, errors};

/// Sets any of the four memory fields after checking XAPI's ordering
/// constraint; static limits only while Halted.
pub(crate) async fn set_memory(
    s: &Server,
    vm: &str,
    smin: Option<i64>,
    smax: Option<i64>,
    dmin: Option<i64>,
    dmax: Option<i64>,
) -> ApiResult {
    db(s.db.write(|t| {
        let st = t.state();
        if !st.exists(class::VM, vm) {
            return Err(ApiError::handle_invalid("VM", vm));
        }
        let p = power(st, vm);
        if (smin.is_some() || smax.is_some()) && p != VmPowerState::Halted {
            return Err(errors::vm_bad_power_state(vm, "halted", p.as_str().to_lowercase()));
        }
        let cur = |f| int(st, f, vm);
        let (a, b, c, d) = (
            smin.unwrap_or_else(|| cur(field::vm::MEMORY_STATIC_MIN)),
            dmin.unwrap_or_else(|| cur(field::vm::MEMORY_DYNAMIC_MIN)),
            dmax.unwrap_or_else(|| cur(field::vm::MEMORY_DYNAMIC_MAX)),
            smax.unwrap_or_else(|| cur(field::vm::MEMORY_STATIC_MAX)),
        );
        if !(a <= b && b <= c && c <= d) {
            return Err(errors::memory_constraint_violation("Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max"));
        }
        t.set(field::vm::MEMORY_STATIC_MIN, vm, Value::Int(a))?;
        t.set(field::vm::MEMORY_DYNAMIC_MIN, vm, Value::Int(b))?;
        t.set(field::vm::MEMORY_DYNAMIC_MAX, vm, Value::Int(c))?;
        t.set(field::vm::MEMORY_STATIC_MAX, vm, Value::Int(d))
    }))?;
    // A running VM follows its new dynamic_max through the balloon.
    let (uuid, target, live) = {
        let st = s.db.read();
        (
            vm_uuid(&st, vm),
            int(&st, field::vm::MEMORY_DYNAMIC_MAX, vm),
            live_on(&st, vm),
        )
    };
    if let Some(host) = live.filter(|_| dmax.is_some()) {
        s.host(&host)?
            .agent
            .set_balloon(&uuid, target)
            .await
            .map_err(|e| driver_errors::agent(&vm, e))?;
    }
    void()
}
