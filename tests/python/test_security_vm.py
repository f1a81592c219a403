"""Correctness bugs found testing as a new user would (issue 11, item 10),
on real QEMU: point-in-time snapshots of running disks, forcing off a VM
whose guest ignores ACPI, cancelling VM operations (task.cancel, Ctrl-C in
xe), and CD drives added to a running VM."""
import signal
import subprocess
import time

from test_storage import http_transfer, local_sr, make_vdi
from test_vm import Console, failure, guest, guest_shell, login, make_vm  # noqa: F401 (guest: a fixture)

MiB = 1 << 20


def attach_disk(x, vm, vdi, device):
    return x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": str(device), "bootable": False, "mode": "RW",
                         "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                         "qos_algorithm_params": {}})


def write_sector(con, text, marker):
    cmd = f"test -b /dev/vda && printf {text} | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null && sync"
    assert guest_shell(con, cmd, marker).group(1) == b"0"


def test_live_snapshot_is_point_in_time(daemon, guest):
    s = login(daemon)
    x, sid = s.xenapi, s._session
    vm = make_vm(x, guest, "snap", cd=False)
    data = make_vdi(x, local_sr(x), 8 * MiB, "data")
    attach_disk(x, vm, data, 1)
    x.VM.start(vm, False, False)
    con = Console(daemon, x, sid, vm)
    con.expect("corral-guest: ready")
    write_sector(con, "BEFORE", "w1")
    snap = x.VDI.snapshot(data, {})
    write_sector(con, "AFTER", "w2")
    # The snapshot holds what was written before it, and is readable while
    # the VM runs; the live disk is QEMU's alone until the VM stops.
    status, _, body = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={snap}&format=raw")
    assert status == 200 and body.startswith(b"BEFORE"), body[:16]
    copy = x.VDI.copy(snap, local_sr(x))
    assert http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={copy}&format=raw")[2] \
        .startswith(b"BEFORE")
    assert http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={data}&format=raw")[0] == 409
    assert failure(x.VDI.copy, data, local_sr(x))[:2] == ["VDI_IN_USE", data]
    # The guest keeps writing after the snapshot, into the new leaf.
    write_sector(con, "LATER", "w3")
    con.close()
    x.VM.hard_shutdown(vm)
    status, _, body = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={data}&format=raw")
    assert status == 200 and body.startswith(b"LATER"), body[:16]
    assert http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={snap}&format=raw")[2] \
        .startswith(b"BEFORE")
    # And the VM boots again from the recorded chain with its data.
    x.VM.start(vm, False, False)
    con = Console(daemon, x, sid, vm)
    con.expect("corral-guest: ready")
    assert guest_shell(con, "head -c 5 /dev/vda | grep -q LATER", "r1").group(1) == b"0"
    con.close()
    x.VM.hard_shutdown(vm)


def stubborn_vm(daemon, x, sid, guest, name):
    vm = make_vm(x, guest, name, args="console=ttyS0 quiet corral.noacpi", cd=False)
    x.VM.start(vm, False, False)
    Console(daemon, x, sid, vm).expect("corral-guest: ready")
    return vm


def wait_task(x, task, timeout=20):
    deadline = time.time() + timeout
    while x.task.get_status(task) == "pending":
        assert time.time() < deadline, "task never finished"
        time.sleep(0.1)
    return x.task.get_status(task)


def test_hard_shutdown_while_clean_shutdown_pending_and_cancel(daemon, guest):
    s = login(daemon)
    x, sid = s.xenapi, s._session
    vm = stubborn_vm(daemon, x, sid, guest, "stubborn")
    # A clean shutdown the guest ignores (the default timeout is 20 minutes).
    clean = x.Async.VM.clean_shutdown(vm)
    time.sleep(0.5)
    assert "hard_shutdown" in x.VM.get_allowed_operations(vm)
    t = time.time()
    x.VM.hard_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted" and time.time() - t < 10
    assert wait_task(x, clean) in ("success", "failure")
    assert x.VM.get_current_operations(vm) == {}
    # task.cancel ends a cancellable VM operation; the VM keeps running.
    x.VM.start(vm, False, False)
    Console(daemon, x, sid, vm).expect("corral-guest: ready")
    clean = x.Async.VM.clean_shutdown(vm)
    time.sleep(0.5)
    x.task.cancel(clean)
    assert wait_task(x, clean, 10) == "cancelled"
    assert x.task.get_error_info(clean) == ["TASK_CANCELLED", clean]
    assert x.VM.get_power_state(vm) == "Running" and x.VM.get_current_operations(vm) == {}
    # Ctrl-C in xe cancels the task its command started.
    cmd, env = daemon.xe_command()
    p = subprocess.Popen(cmd + ["vm-shutdown", f"uuid={x.VM.get_uuid(vm)}"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while not x.VM.get_current_operations(vm):
        assert time.time() < deadline, "xe's shutdown never started"
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    p.wait(10)
    deadline = time.time() + 10
    while x.VM.get_current_operations(vm):
        assert time.time() < deadline, "the shutdown xe started was not cancelled"
        time.sleep(0.1)
    assert x.VM.get_power_state(vm) == "Running"
    x.VM.hard_shutdown(vm)


def test_cd_drive_added_to_a_running_vm(daemon, guest, tmp_path):
    from test_vm import iso_sr
    s = login(daemon)
    x, sid = s.xenapi, s._session
    iso = iso_sr(x, tmp_path)
    vm = make_vm(x, guest, "cd-later", cd=False)
    x.VM.start(vm, False, False)
    Console(daemon, x, sid, vm).expect("corral-guest: ready")
    cd = x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "3", "bootable": False, "mode": "RO",
                       "type": "CD", "empty": True, "other_config": {}, "qos_algorithm_type": "",
                       "qos_algorithm_params": {}})
    assert sorted(x.VBD.get_allowed_operations(cd)) == ["attach", "insert"]
    # Refused with a clear error; the medium is recorded for the next start.
    err = failure(x.VBD.plug, cd)
    assert err[0] == "OPERATION_NOT_ALLOWED" and "next starts" in err[1], err
    r = daemon.xe("vm-cd-insert", f"uuid={x.VM.get_uuid(vm)}", "cd-name=tools.iso")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert x.VBD.get_VDI(cd) == iso and sorted(x.VBD.get_allowed_operations(cd)) == ["attach", "eject"]
    x.VM.hard_shutdown(vm)
    x.VM.start(vm, False, False)
    con = Console(daemon, x, sid, vm)
    con.expect("corral-guest: ready")
    assert x.VBD.get_currently_attached(cd)
    assert guest_shell(con, "test -b /dev/sr0", "sr0").group(1) == b"0"
    con.close()
    x.VM.hard_shutdown(vm)
