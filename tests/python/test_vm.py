"""VMs on real QEMU (TCG) with the test guest from scripts/build-test-guest.sh."""
import os
import re
import shutil
import select
import socket
import subprocess
import time

import pytest
import XenAPI

from conftest import ROOT_PASSWORD

HERE = os.path.dirname(__file__)
GUEST_DIR = os.environ.get("CORRAL_GUEST_DIR", os.path.expanduser("~/.cache/corral/guest"))

if not shutil.which("qemu-system-x86_64"):
    if os.environ.get("CORRAL_REQUIRE_QEMU") == "1":
        raise RuntimeError("qemu-system-x86_64 is required (CORRAL_REQUIRE_QEMU=1)")
    pytest.skip("qemu-system-x86_64 not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def guest():
    subprocess.run([os.path.join(HERE, "..", "..", "scripts", "build-test-guest.sh"), GUEST_DIR], check=True)
    return os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initrd.img")


def login(daemon):
    s = XenAPI.Session(daemon.http)
    s.login_with_password("root", ROOT_PASSWORD, "1.0", "pytest")
    return s


def failure(fn, *args):
    try:
        fn(*args)
    except XenAPI.Failure as e:
        return e.details
    raise AssertionError("expected a XenAPI failure")


class Console:
    """A vt100 console opened with HTTP CONNECT on its location."""

    def __init__(self, daemon, x, session_ref, vm, sock=None):
        [con] = [c for c in x.VM.get_consoles(vm) if x.console.get_protocol(c) == "vt100"]
        loc = x.console.get_location(con)
        path = loc[loc.index("/console"):]
        self.sock = sock or socket.create_connection(("127.0.0.1", daemon.http_port), timeout=60)
        self.sock.sendall(f"CONNECT {path}&session_id={session_ref} HTTP/1.0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        self.buf = b""

    def expect(self, pattern, timeout=60):
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = rx.search(self.buf)
            if m:
                self.buf = self.buf[m.end():]
                return m
            self.sock.settimeout(max(0.1, deadline - time.time()))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            self.buf += data
        raise AssertionError(f"console never showed {pattern!r}; tail: {self.buf[-500:]!r}")

    def drain(self):
        """Drops everything received so far (e.g. the replay)."""
        self.sock.settimeout(0.3)
        try:
            while self.sock.recv(65536):
                pass
        except socket.timeout:
            pass
        self.buf = b""

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def close(self):
        self.sock.close()


def last_tick(con, timeout=30):
    m = None
    deadline = time.time() + timeout
    while m is None or time.time() < deadline:
        m = con.expect(r"corral-tick ([0-9.]+)\r?\n", timeout=timeout)
        if not re.search(rb"corral-tick", con.buf):
            break
    return float(m.group(1))


def make_vm(x, guest, name, args="console=ttyS0 quiet", disk_sr=None, cd=True):
    kernel, initrd = guest
    tpl = x.VM.get_by_name_label("Linux direct kernel boot")[0]
    vm = x.VM.clone(tpl, name)
    x.VM.set_is_a_template(vm, False)
    x.VM.set_PV_kernel(vm, kernel)
    x.VM.set_PV_ramdisk(vm, initrd)
    x.VM.set_PV_args(vm, args)
    mib = 256 * 1024 * 1024
    x.VM.set_memory_limits(vm, mib, mib, mib, mib)
    if disk_sr:
        vdi = x.VDI.create({"name_label": name + " disk", "SR": disk_sr, "virtual_size": str(64 << 20),
                            "type": "user", "sharable": False, "read_only": False, "other_config": {}})
        x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                      "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    if cd:
        x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "3", "bootable": False, "mode": "RO",
                      "type": "CD", "empty": True, "other_config": {}, "qos_algorithm_type": "",
                      "qos_algorithm_params": {}})
    return vm


def iso_sr(x, tmp_path):
    lib = tmp_path / "isos"
    lib.mkdir()
    src = tmp_path / "cdcontent"
    src.mkdir()
    (src / "hello.txt").write_text("hello from the CD\n" * 1000)
    subprocess.run(["genisoimage", "-quiet", "-o", str(lib / "tools.iso"), "-V", "TOOLS", str(src)], check=True)
    host = x.host.get_all()[0]
    sr = x.SR.create(host, {"location": str(lib)}, "0", "ISO library", "", "iso", "iso", True, {})
    [iso] = x.SR.get_VDIs(sr)
    return iso


def wait_power(x, vm, state, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if x.VM.get_power_state(vm) == state:
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"{vm} never became {state} (is {x.VM.get_power_state(vm)})")


def guest_shell(con, cmd, marker, timeout=30):
    con.send(f"{cmd}; echo {marker}-$?")
    return con.expect(marker + r"-(\d+)\r?\n", timeout=timeout)


def assert_memory_sane(x, gm, timeout=30):
    """VM_guest_metrics.memory (KiB): total and free both present, and free
    strictly between nothing and everything."""
    deadline = time.time() + timeout
    mem = {}
    while time.time() < deadline:
        mem = x.VM_guest_metrics.get_memory(gm)
        if "free" in mem and "total" in mem:
            break
        time.sleep(1)
    assert 0 < int(mem["free"]) < int(mem["total"]) <= 256 * 1024, mem


def test_vm_lifecycle_on_qemu(daemon, guest, tmp_path):
    s = login(daemon)
    x = s.xenapi
    pool = x.pool.get_all()[0]
    local = x.pool.get_default_SR(pool)
    iso = iso_sr(x, tmp_path)
    vm = make_vm(x, guest, "life", disk_sr=local)
    mib = 1 << 20
    x.VM.set_memory_limits(vm, str(128 * mib), str(256 * mib), str(256 * mib), str(256 * mib))
    assert x.VM.get_power_state(vm) == "Halted"
    assert "start" in x.VM.get_allowed_operations(vm)
    [cd] = [v for v in x.VM.get_VBDs(vm) if x.VBD.get_type(v) == "CD"]

    # Refusals, each with XAPI's exact error.
    tpl = x.VM.get_by_name_label("Linux direct kernel boot")[0]
    assert failure(x.VM.start, tpl, False, False) == ["VM_IS_TEMPLATE", tpl, "start"]
    assert failure(x.VM.clean_shutdown, vm) == ["VM_BAD_POWER_STATE", vm, "running", "halted"]
    x.VM.add_to_blocked_operations(vm, "start", "maintenance")
    assert failure(x.VM.start, vm, False, False) == ["OPERATION_BLOCKED", vm, "maintenance"]
    x.VM.remove_from_blocked_operations(vm, "start")
    big = make_vm(x, guest, "too-big", cd=False)
    tib = str(1 << 40)
    x.VM.set_memory_limits(big, tib, tib, tib, tib)
    err = failure(x.VM.start, big, False, False)
    assert err[0] == "HOST_NOT_ENOUGH_FREE_MEMORY" and int(err[1]) > 1 << 40 and int(err[2]) < 1 << 40, err

    x.VM.start(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_resident_on(vm) == x.host.get_all()[0]
    assert set(x.VM.get_allowed_operations(vm)) >= {"clean_shutdown", "hard_shutdown", "suspend", "pause",
                                                    "clean_reboot"}
    assert "start" not in x.VM.get_allowed_operations(vm)
    assert all(x.VBD.get_currently_attached(v) for v in x.VM.get_VBDs(vm))
    assert {x.console.get_protocol(c) for c in x.VM.get_consoles(vm)} == {"vt100", "rfb"}
    # The graphical console is QEMU's VNC server: an RFB handshake through CONNECT.
    [rfb] = [c for c in x.VM.get_consoles(vm) if x.console.get_protocol(c) == "rfb"]
    loc = x.console.get_location(rfb)
    with socket.create_connection(("127.0.0.1", daemon.http_port), timeout=30) as v:
        v.sendall(f"CONNECT {loc[loc.index('/console'):]}&session_id={s._session} HTTP/1.0\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += v.recv(1)
        assert got.startswith(b"HTTP/1.1 200"), got
        got = b""
        while len(got) < 12:
            got += v.recv(12 - len(got))
        assert got.startswith(b"RFB 003."), got
        v.sendall(got)  # the client's version: the server answers with security types
        assert len(v.recv(64)) >= 2
    assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    assert failure(x.VM.unpause, vm) == ["VM_BAD_POWER_STATE", vm, "paused", "running"]
    assert failure(x.VM.destroy, vm) == ["VM_BAD_POWER_STATE", vm, "halted, suspended", "running"]
    assert failure(x.VM.resume, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "suspended", "running"]
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    guest_shell(con, "ls /dev/vda", "disk")

    # The disk is in use read-write: another VM cannot have it.
    [disk_vbd] = [v for v in x.VM.get_VBDs(vm) if x.VBD.get_type(v) == "Disk"]
    other = make_vm(x, guest, "other", cd=False)
    x.VBD.create({"VM": other, "VDI": x.VBD.get_VDI(disk_vbd), "userdevice": "0", "bootable": True, "mode": "RW",
                  "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                  "qos_algorithm_params": {}})
    assert failure(x.VM.start, other, False, False) == ["VDI_IN_USE", x.VBD.get_VDI(disk_vbd), "start"]

    # CD insert and eject while running; the guest sees the medium come and go.
    x.VBD.insert(cd, iso)
    assert not x.VBD.get_empty(cd) and x.VBD.get_VDI(cd) == iso
    # The guest reads the medium's first sector, then cannot once ejected.
    # (The marker is computed by the guest's shell, so the echo of the typed
    # command can never match it.)
    read_cmd = "head -c 2048 /dev/sr0 >/dev/null 2>&1; echo rd$((40+2))=$(head -c 2048 /dev/sr0 2>/dev/null | wc -c)"
    con.send(read_cmd)
    assert int(con.expect(r"rd42=(\d+)\r?\n").group(1)) == 2048
    x.VBD.eject(cd)
    assert x.VBD.get_empty(cd)
    con.send(read_cmd)
    assert int(con.expect(r"rd42=(\d+)\r?\n").group(1)) == 0
    assert failure(x.VBD.eject, cd) == ["VBD_IS_EMPTY", cd]

    # Suspend and resume: the guest's uptime continues.
    before = last_tick(con)
    x.VM.suspend(vm)
    assert x.VM.get_power_state(vm) == "Suspended"
    suspend_vdi = x.VM.get_suspend_VDI(vm)
    assert x.VDI.get_type(suspend_vdi) == "suspend"
    assert x.VM.get_consoles(vm) == []
    assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "suspended"]
    con.close()
    time.sleep(2)
    x.VM.resume(vm, False, False)
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_suspend_VDI(vm) == "OpaqueRef:NULL"
    con = Console(daemon, x, s._session, vm)
    con.expect(r"corral-tick")
    con.drain()  # the replayed output
    ticks = []
    deadline = time.time() + 10
    while time.time() < deadline and len(ticks) < 3:
        ticks.append(float(con.expect(r"corral-tick ([0-9.]+)\r?\n").group(1)))
    after = ticks[-1]
    # Uptime continued from where it was (no reboot, no jump of the wall time).
    assert before < after < before + 30, (before, ticks)

    # Pause and unpause.
    x.VM.pause(vm)
    assert x.VM.get_power_state(vm) == "Paused"
    assert failure(x.VM.pause, vm) == ["VM_BAD_POWER_STATE", vm, "running", "paused"]
    x.VM.unpause(vm)
    assert x.VM.get_power_state(vm) == "Running"

    # Guest metrics from the guest agent and the balloon.
    deadline = time.time() + 40
    gm = "OpaqueRef:NULL"
    while time.time() < deadline:
        gm = x.VM.get_guest_metrics(vm)
        if gm != "OpaqueRef:NULL" and x.VM_guest_metrics.get_os_version(gm).get("name"):
            break
        time.sleep(1)
    assert x.VM_guest_metrics.get_os_version(gm)["name"] == "Corral test guest (Debian kernel, busybox)"
    assert x.VM_guest_metrics.get_PV_drivers_detected(gm)
    # After the resume (a new QEMU) the memory statistics were re-armed: free
    # memory is real, never the "100 % used" of a stale or missing reading.
    assert_memory_sane(x, gm)
    metrics = x.VM.get_metrics(vm)
    assert int(x.VM_metrics.get_VCPUs_number(metrics)) == 1
    assert int(x.VM_metrics.get_memory_actual(metrics)) == 256 * mib
    # Static limits are fixed while it runs; the dynamic range moves the
    # balloon, and memory_actual follows.
    assert failure(x.VM.set_memory_static_range, vm, str(128 * mib), str(512 * mib)) == \
        ["VM_BAD_POWER_STATE", vm, "halted", "running"]
    x.VM.set_memory_dynamic_range(vm, str(128 * mib), str(192 * mib))
    deadline = time.time() + 30
    while int(x.VM_metrics.get_memory_actual(metrics)) != 192 * mib:
        assert time.time() < deadline, x.VM_metrics.get_memory_actual(metrics)
        time.sleep(0.5)

    # Clean reboot: the guest boots again.
    x.VM.clean_reboot(vm)
    assert x.VM.get_power_state(vm) == "Running"
    con.expect("corral-guest: ready", timeout=60)
    con.close()

    # Clean shutdown, start again, hard shutdown.
    x.VM.clean_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"
    assert x.VM.get_resident_on(vm) == "OpaqueRef:NULL"
    assert not any(x.VBD.get_currently_attached(v) for v in x.VM.get_VBDs(vm))
    x.VM.start(vm, True, False)
    assert x.VM.get_power_state(vm) == "Paused"
    x.VM.unpause(vm)
    x.VM.hard_reboot(vm)
    assert x.VM.get_power_state(vm) == "Running"
    x.VM.hard_shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"
    assert not os.path.exists(os.path.join(daemon.state_dir, "vms", x.VM.get_uuid(vm)))
    # Destroy removes the VM and its VBDs, not its disks.
    vdi = x.VBD.get_VDI(disk_vbd)
    x.VM.destroy(vm)
    assert vdi in x.VDI.get_all()
    assert disk_vbd not in x.VBD.get_all()


def running_qemus(daemon):
    out = subprocess.run(["pgrep", "-f", daemon.vm_dir + "/"], capture_output=True, text=True)
    return set(out.stdout.split())


def test_kill9_corrald_leaves_vms_running(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    vms = [make_vm(x, guest, f"keep{i}", cd=False) for i in range(2)]
    for vm in vms:
        x.VM.start(vm, False, False)
    before = {}
    for vm in vms:
        con = Console(daemon, x, s._session, vm)
        con.expect("corral-guest: ready")
        con.drain()  # the replay may hold ticks printed long before now
        before[vm] = (float(con.expect(r"corral-tick ([0-9.]+)\r?\n").group(1)), time.time())
        con.close()
    pids = running_qemus(daemon)
    assert len(pids) == 2
    daemon.kill9()
    time.sleep(4)
    assert running_qemus(daemon) == pids
    daemon.start()
    s = login(daemon)
    x = s.xenapi
    for vm in vms:
        assert x.VM.get_power_state(vm) == "Running"
    for vm in vms:
        con = Console(daemon, x, s._session, vm)
        con.expect(r"corral-tick")
        con.drain()  # the replayed output
        # A fresh line: the guest's uptime advanced with the wall clock, so
        # it never paused while corrald was gone.
        tick, now = float(con.expect(r"corral-tick ([0-9.]+)\r?\n").group(1)), time.time()
        t0, w0 = before[vm]
        assert abs((tick - t0) - (now - w0)) < 2.5, (tick - t0, now - w0)
        con.close()
    # Statistics were re-armed by the new corrald: real free memory.
    for vm in vms:
        assert_memory_sane(x, x.VM.get_guest_metrics(vm))
    x.VM.pause(vms[0])
    x.VM.unpause(vms[0])
    for vm in vms:
        x.VM.hard_shutdown(vm)
    assert running_qemus(daemon) == set()


def test_guest_poweroff_and_dead_qemu_are_noticed(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    vm = make_vm(x, guest, "notice", cd=False)
    x.VM.start(vm, False, False)
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    time.sleep(1)
    con.send("poweroff")
    con.expect("Power down|reboot: Power", timeout=30)
    t0 = time.time()
    wait_power(x, vm, "Halted", 10)
    assert time.time() - t0 < 2
    x.VM.start(vm, False, False)
    Console(daemon, x, s._session, vm).expect("corral-tick")
    [pid] = running_qemus(daemon)
    t0 = time.time()
    os.kill(int(pid), 9)
    wait_power(x, vm, "Halted", 10)
    assert time.time() - t0 < 2
    uuid = x.VM.get_uuid(vm)
    msgs = [m for m in x.message.get_all_records().values() if m["obj_uuid"] == uuid and m["name"] == "VM_CRASHED"]
    assert msgs and "unexpectedly" in msgs[-1]["body"]
    assert x.VM.get_allowed_operations(vm).count("start") == 1


def test_clean_shutdown_timeout_and_other_operation(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    vm = make_vm(x, guest, "stubborn", args="console=ttyS0 quiet corral.noacpi", cd=False)
    x.VM.add_to_other_config(vm, "clean_shutdown_timeout", "4")
    x.VM.start(vm, False, False)
    Console(daemon, x, s._session, vm).expect("corral-guest: ready")
    task = x.Async.VM.clean_shutdown(vm)
    time.sleep(0.5)
    assert failure(x.VM.pause, vm) == ["OTHER_OPERATION_IN_PROGRESS", "VM", vm, "clean_shutdown", task]
    # Only forcing it off may join a running clean shutdown (XAPI's rule).
    assert set(x.VM.get_allowed_operations(vm)) == {"hard_shutdown", "hard_reboot", "power_state_reset"}
    deadline = time.time() + 20
    while x.task.get_status(task) == "pending" and time.time() < deadline:
        time.sleep(0.2)
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task) == ["VM_SHUTDOWN_TIMEOUT", vm, "4"]
    assert x.VM.get_power_state(vm) == "Running"
    # shutdown = clean with a forced fallback.
    x.VM.shutdown(vm)
    assert x.VM.get_power_state(vm) == "Halted"


def test_host_shutdown_policy_order_and_timeout(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    host = x.host.get_all()[0]
    first = make_vm(x, guest, "first", cd=False)     # order 1: stopped last
    second = make_vm(x, guest, "second", args="console=ttyS0 quiet corral.noacpi", cd=False)  # ignores ACPI
    third = make_vm(x, guest, "third", cd=False)     # order 3: stopped first
    for vm, order in ((first, 1), (second, 2), (third, 3)):
        x.VM.set_order(vm, str(order))
        x.VM.start(vm, False, False)
    for vm in (first, second, third):
        Console(daemon, x, s._session, vm).expect("corral-guest: ready")
    x.host.add_to_other_config(host, "vm-shutdown-policy", "shutdown")
    x.host.add_to_other_config(host, "vm-shutdown-timeout", "5")
    t0 = time.time()
    r = daemon.xe("host-shutdown-vms")
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 5 + 30
    for vm in (first, second, third):
        assert x.VM.get_power_state(vm) == "Halted"
    uuids = {x.VM.get_uuid(v): v for v in (first, second, third)}
    msgs = sorted((m["timestamp"].value if hasattr(m["timestamp"], "value") else str(m["timestamp"]), m)
                  for m in x.message.get_all_records().values()
                  if m["name"] == "VM_SHUTDOWN" and m["obj_uuid"] in uuids)
    order = [uuids[m["obj_uuid"]] for _, m in msgs]
    assert order == [third, second, first], order
    bodies = {uuids[m["obj_uuid"]]: m["body"] for _, m in msgs}
    assert "cleanly" in bodies[third] and "cleanly" in bodies[first]
    assert "Forced off" in bodies[second]
    # refuse: with a VM running, the host shutdown step fails.
    x.host.remove_from_other_config(host, "vm-shutdown-policy")
    x.host.add_to_other_config(host, "vm-shutdown-policy", "refuse")
    x.VM.start(first, False, False)
    assert failure(x.host.shutdown_vms, host)[0] == "OPERATION_NOT_ALLOWED"
    assert x.VM.get_power_state(first) == "Running"
    # suspend: the VM is suspended to its SR ...
    Console(daemon, x, s._session, first).expect("corral-guest: ready")
    x.host.remove_from_other_config(host, "vm-shutdown-policy")
    x.host.add_to_other_config(host, "vm-shutdown-policy", "suspend")
    daemon.xe("host-shutdown-vms", check=0)
    assert x.VM.get_power_state(first) == "Suspended"
    # ... and stays suspended when the host comes back, even with
    # vm-boot-policy=start and auto_poweron: nothing resumes behind the
    # operator's back.
    x.host.add_to_other_config(host, "vm-boot-policy", "start")
    x.VM.add_to_other_config(first, "auto_poweron", "true")
    daemon.stop()
    os.unlink(os.path.join(daemon.state_dir, "last-boot-id"))   # a host boot
    daemon.start()
    x = login(daemon).xenapi
    time.sleep(3)
    assert x.VM.get_power_state(first) == "Suspended"
    x.VM.resume(first, False, False)
    x.VM.hard_shutdown(first)


def cgroup2_root():
    """Where the unified cgroup hierarchy is mounted, if anywhere."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split()[0] == "cgroup2":
                return pre.split()[4]
    return None


def read_until(fd, pattern, timeout=60):
    seen = b""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if pattern in seen:
                return seen
    raise AssertionError(f"never saw {pattern!r}; tail: {seen[-500:]!r}")


def xe_console(daemon, server):
    """xe console: replayed output, a command typed into the guest's shell and
    its answer, then Ctrl-] to leave with exit code 0."""
    cmd, env = daemon.xe_command(server)
    p = subprocess.Popen(cmd + ["console", "vm=xe-vm"], env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(p.stdout.fileno(), b"corral-guest: ready")
        p.stdin.write(b"echo con$((6*7))sole\n")
        p.stdin.flush()
        # Only the guest's shell turns the expression into 42.
        read_until(p.stdout.fileno(), b"con42sole")
        p.stdin.write(b"\x1d")
        p.stdin.flush()
        assert p.wait(timeout=10) == 0
        assert b"Connecting to console on VM xe-vm" in p.stderr.read()
    finally:
        p.kill()
        p.wait()


def test_xe_vm_commands(daemon, guest, tmp_path):
    s = login(daemon)
    x = s.xenapi
    iso_sr(x, tmp_path)
    vm = make_vm(x, guest, "xe-vm")
    host = x.host.get_all()[0]
    r = daemon.xe("vm-start", "vm=xe-vm", "on=no-such-host")
    assert r.returncode == 1 and x.VM.get_power_state(vm) == "Halted", (r.stdout, r.stderr)
    daemon.xe("vm-start", "vm=xe-vm", f"on={x.host.get_name_label(host)}", check=0)   # VM.start_on
    assert x.VM.get_power_state(vm) == "Running"
    uuid = x.VM.get_uuid(vm)
    scope = cgroup2_root() and os.path.join(cgroup2_root(), "corral.slice", f"vm-{uuid}.scope")
    if scope:
        # The VM's QEMU runs in its own cgroup, removed when the VM stops.
        with open(os.path.join(daemon.vm_dir, uuid, "qemu.pid")) as f:
            pid = f.read().strip()
        with open(f"/proc/{pid}/cgroup") as f:
            unified = [line.strip() for line in f if line.startswith("0::")]
        assert unified == [f"0::/corral.slice/vm-{uuid}.scope"], unified
    daemon.xe("vm-cd-insert", "vm=xe-vm", "cd-name=tools.iso", check=0)
    listing = daemon.xe("vbd-list", "type=CD", "empty=false", check=0).stdout
    assert x.VM.get_uuid(vm) in daemon.xe("vbd-list", "type=CD", "empty=false", "params=vm-uuid", check=0).stdout
    assert "uuid" in listing
    assert "tools.iso" in daemon.xe("vm-cd-list", "vm=xe-vm", check=0).stdout
    # Seed 001's upgrade preparation: eject every CD in use with vbd-eject.
    for cd in daemon.xe("vbd-list", "type=CD", "empty=false", "--minimal", check=0).stdout.strip().split(","):
        daemon.xe("vbd-eject", f"uuid={cd}", check=0)
    assert daemon.xe("vbd-list", "type=CD", "empty=false", "--minimal", check=0).stdout.strip() == ""
    daemon.xe("vm-cd-insert", "vm=xe-vm", "cd-name=tools.iso", check=0)
    daemon.xe("vm-cd-eject", "vm=xe-vm", check=0)
    assert daemon.xe("vbd-list", "type=CD", "empty=false", "--minimal", check=0).stdout.strip() == ""
    r = daemon.xe("vm-start", "vm=xe-vm")
    assert r.returncode != 0, r.stdout
    for server in (None, "https"):
        xe_console(daemon, server)
    daemon.xe("vm-suspend", "vm=xe-vm", check=0)
    assert x.VM.get_power_state(vm) == "Suspended"
    daemon.xe("vm-resume", "vm=xe-vm", f"on={x.host.get_uuid(host)}", check=0)        # VM.resume_on
    assert x.VM.get_power_state(vm) == "Running" and x.VM.get_resident_on(vm) == host
    daemon.xe("vm-shutdown", "vm=xe-vm", "force=true", check=0)
    assert x.VM.get_power_state(vm) == "Halted"
    r = daemon.xe("console", "vm=xe-vm")
    assert r.returncode == 1 and "No text console available" in r.stderr, (r.stdout, r.stderr)
    if scope:
        # Removed once init has reaped the exited QEMU.
        deadline = time.time() + 10
        while os.path.exists(scope) and time.time() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(scope)


def test_platform_keys_reach_qemu_and_the_guest(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    vm = make_vm(x, guest, "platform", cd=False)
    x.VM.set_VCPUs_max(vm, "2")
    x.VM.set_VCPUs_at_startup(vm, "2")
    x.VM.set_platform(vm, {"cores-per-socket": "3"})
    err = failure(x.VM.start, vm, False, False)
    assert err[:2] == ["INVALID_VALUE", "platform:cores-per-socket"], err
    assert x.VM.get_power_state(vm) == "Halted"
    x.VM.set_platform(vm, {"cores-per-socket": "2", "timeoffset": "86400", "vga": "cirrus",
                           "videoram": "16", "hpet": "false"})
    x.VM.start(vm, False, False)
    uuid = x.VM.get_uuid(vm)
    with open(os.path.join(daemon.vm_dir, uuid, "qemu.pid")) as f:
        pid = f.read().strip()
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().decode().split("\0")
    arg = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
    assert arg("-smp") == "2,maxcpus=2,sockets=1,cores=2,threads=1"
    assert arg("-vga") == "cirrus" and "cirrus-vga.vgamem_mb=16" in argv
    assert arg("-machine").endswith(",hpet=off")
    assert arg("-rtc").startswith("base=")
    # The guest sees two cores in one socket and a clock a day ahead.
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    con.drain()
    con.send("echo T=$(date +%s) C=$(grep -c ^processor /proc/cpuinfo) K=$(grep -m1 'cpu cores' /proc/cpuinfo)")
    m = con.expect(r"T=(\d+) C=(\d+) K=cpu cores\s*: (\d+)")
    assert abs(int(m.group(1)) - time.time() - 86400) < 120, (m.group(1), time.time())
    assert m.group(2) == b"2" and m.group(3) == b"2"
    con.close()
    x.VM.hard_shutdown(vm)


def test_uefi_firmware_boots(daemon):
    """HVM_boot_params:firmware=uefi boots OVMF; with no disk it ends in the UEFI shell."""
    if not os.path.exists("/usr/share/OVMF/OVMF_CODE.fd"):
        if os.environ.get("CORRAL_REQUIRE_QEMU"):
            raise AssertionError("OVMF is missing: apt-get install ovmf")
        pytest.skip("no OVMF")
    s = login(daemon)
    x = s.xenapi
    tpl = x.VM.get_by_name_label("Other install media")[0]
    vm = x.VM.clone(tpl, "uefi")
    x.VM.set_is_a_template(vm, False)
    mib = str(256 * 1024 * 1024)
    x.VM.set_memory_limits(vm, mib, mib, mib, mib)
    x.VM.set_HVM_boot_params(vm, {"order": "dc", "firmware": "uefi"})
    x.VM.start(vm, False, False)
    con = Console(daemon, x, s._session, vm)
    con.expect("UEFI Interactive Shell", timeout=120)
    con.close()
    x.VM.hard_shutdown(vm)


def messages_for(x, vm, name):
    uuid = x.VM.get_uuid(vm)
    return [m for m in x.message.get_all_records().values() if m["obj_uuid"] == uuid and m["name"] == name]


def test_disk_hotplug_and_guest_reboot_and_crash(daemon, guest, tmp_path):
    s = login(daemon)
    x = s.xenapi
    local = x.pool.get_default_SR(x.pool.get_all()[0])
    vm = make_vm(x, guest, "events", disk_sr=local)
    x.VM.start(vm, False, False)
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    assert guest_shell(con, "test -b /dev/vda", "vda").group(1) == b"0"

    # Hot-plug a second disk (VBD.plug), then unplug it with xe.
    vdi = x.VDI.create({"name_label": "hot", "SR": local, "virtual_size": str(32 << 20), "type": "user",
                        "sharable": False, "read_only": False, "other_config": {}})
    vbd = x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "1", "bootable": False, "mode": "RW", "type": "Disk",
                        "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert not x.VBD.get_currently_attached(vbd)
    assert guest_shell(con, "test -b /dev/vdb", "vdbabsent").group(1) == b"1"
    x.VBD.plug(vbd)
    assert x.VBD.get_currently_attached(vbd) and x.VBD.get_device(vbd) == "xvdb"
    assert failure(x.VBD.plug, vbd) == ["DEVICE_ALREADY_ATTACHED", vbd]
    deadline = time.time() + 20
    while guest_shell(con, "test -b /dev/vdb", "vdbplug").group(1) != b"0":
        assert time.time() < deadline, "the guest never saw the hot-plugged disk"
        time.sleep(0.5)
    # The guest writes to it; the data is on the VDI.
    assert guest_shell(con, "echo hotplugged-data | dd of=/dev/vdb bs=512 count=1 conv=sync 2>/dev/null && sync",
                       "vdbwrite").group(1) == b"0"
    # Online resize: QEMU grows the image and the guest sees the new size.
    x.VDI.resize(vdi, str(48 << 20))
    assert int(x.VDI.get_virtual_size(vdi)) == 48 << 20
    deadline = time.time() + 20
    while True:
        con.send("echo sz$((1+1))=$(cat /sys/block/vdb/size)")
        if int(con.expect(r"sz2=(\d+)\r?\n").group(1)) == (48 << 20) // 512:
            break
        assert time.time() < deadline, "the guest never saw the new size"
        time.sleep(0.5)
    daemon.xe("vbd-unplug", f"uuid={x.VBD.get_uuid(vbd)}", check=0)
    assert not x.VBD.get_currently_attached(vbd)
    assert failure(x.VBD.unplug, vbd) == ["DEVICE_ALREADY_DETACHED", vbd]
    deadline = time.time() + 20
    while guest_shell(con, "test -b /dev/vdb", "vdbunplug").group(1) != b"1":
        assert time.time() < deadline, "the hot-unplugged disk never left the guest"
        time.sleep(0.5)
    [cd] = [v for v in x.VM.get_VBDs(vm) if x.VBD.get_type(v) == "CD"]
    assert failure(x.VBD.unplug, cd) == ["VBD_NOT_UNPLUGGABLE", cd]
    # A disk plugged read-write into a running VM is in use: not destroyable.
    x.VBD.plug(vbd)
    assert failure(x.VDI.destroy, vdi)[0] == "VDI_IN_USE"
    x.VBD.unplug(vbd)

    # In-guest reboot with actions_after_reboot=restart: same QEMU, guest
    # boots again, the VM stays Running.
    [pid] = running_qemus(daemon)
    con.drain()
    con.send("reboot")
    con.expect("corral-guest: ready", timeout=60)
    assert x.VM.get_power_state(vm) == "Running"
    assert running_qemus(daemon) == {pid}
    deadline = time.time() + 5
    while not messages_for(x, vm, "VM_REBOOTED") and time.time() < deadline:
        time.sleep(0.1)
    assert messages_for(x, vm, "VM_REBOOTED")
    # actions_after_reboot=destroy: an in-guest reboot halts the VM.
    x.VM.set_actions_after_reboot(vm, "destroy")
    con.send("reboot")
    wait_power(x, vm, "Halted", 30)
    assert running_qemus(daemon) == set()
    con.close()
    # Started that way (QEMU stops on a guest reboot), VM.hard_reboot still
    # reboots it, and a reboot from inside still halts it.
    x.VM.start(vm, False, False)
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    x.VM.hard_reboot(vm)
    con.expect("corral-guest: ready", timeout=60)
    time.sleep(1)
    assert x.VM.get_power_state(vm) == "Running"
    con.send("reboot")
    wait_power(x, vm, "Halted", 30)
    con.close()

    # Guest crashes (a kernel panic reported by pvpanic).
    def crash():
        c = Console(daemon, x, s._session, vm)
        c.expect("corral-guest: ready")
        c.send("echo c > /proc/sysrq-trigger")
        return c

    x.VM.set_actions_after_crash(vm, "preserve")
    x.VM.start(vm, False, False)
    c = crash()
    wait_power(x, vm, "Paused", 30)    # kept for inspection
    assert messages_for(x, vm, "VM_CRASHED")
    c.close()
    x.VM.hard_shutdown(vm)
    x.VM.set_actions_after_crash(vm, "restart")
    x.VM.start(vm, False, False)
    c = crash()
    c.expect("corral-guest: ready", timeout=60)   # booted again
    assert x.VM.get_power_state(vm) == "Running"
    c.close()
    x.VM.set_actions_after_crash(vm, "destroy")
    c = crash()
    wait_power(x, vm, "Halted", 30)
    c.close()
    assert running_qemus(daemon) == set()
    # The hot-plugged disk kept what the guest wrote.
    out = tmp_path / "first-sector"
    subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=512", "count=1",
                    "if=" + vdi_path(x, vdi), f"of={out}"], capture_output=True, check=True)
    data = out.read_bytes()
    assert data.startswith(b"hotplugged-data\n"), data[:32]


def vdi_path(x, vdi):
    sr = x.VDI.get_SR(vdi)
    [pbd] = x.SR.get_PBDs(sr)
    loc = x.PBD.get_device_config(pbd).get("location")
    return os.path.join(loc, x.VDI.get_location(vdi) + ".qcow2")


def test_boot_policy_starts_auto_poweron_vms_in_order(daemon, guest):
    s = login(daemon)
    x = s.xenapi
    host = x.host.get_all()[0]
    late = make_vm(x, guest, "late", cd=False)
    early = make_vm(x, guest, "early", cd=False)
    manual = make_vm(x, guest, "manual", cd=False)
    for vm, order, delay in ((late, 2, 0), (early, 1, 2)):
        x.VM.add_to_other_config(vm, "auto_poweron", "true")
        x.VM.set_order(vm, str(order))
        x.VM.set_start_delay(vm, str(delay))
    marker = os.path.join(daemon.state_dir, "last-boot-id")
    assert os.path.exists(marker)

    def restart(host_booted):
        daemon.stop()
        if host_booted:
            os.unlink(marker)   # as after a reboot: the kernel's boot id changed
        daemon.start()
        return login(daemon).xenapi

    # Default policy (ignore): a host boot starts nothing.
    x = restart(True)
    time.sleep(3)
    assert [x.VM.get_power_state(v) for v in (late, early, manual)] == ["Halted"] * 3
    daemon.xe("host-param-set", f"uuid={x.host.get_uuid(host)}", "other-config:vm-boot-policy=start", check=0)
    # A toolstack restart is not a host boot: still nothing.
    x = restart(False)
    time.sleep(3)
    assert [x.VM.get_power_state(v) for v in (late, early, manual)] == ["Halted"] * 3
    # A host boot starts the auto_poweron VMs, in order, start_delay apart.
    x = restart(True)
    wait_power(x, early, "Running", 30)
    wait_power(x, late, "Running", 30)
    t_early = x.VM_metrics.get_start_time(x.VM.get_metrics(early)).value
    t_late = x.VM_metrics.get_start_time(x.VM.get_metrics(late)).value
    assert t_early < t_late, (t_early, t_late)
    assert x.VM.get_power_state(manual) == "Halted"
    for vm in (early, late):
        x.VM.hard_shutdown(vm)


def test_kill9_mid_suspend_and_mid_copy_undoes_them(daemon, guest):
    """corrald killed in the middle of VM.suspend and of VM.copy: after the
    restart the suspend is undone (the guest runs on, no image is left) and
    the half-made copy is gone with its disks; the VM works as before."""
    s = login(daemon)
    x = s.xenapi
    local = x.pool.get_default_SR(x.pool.get_all()[0])
    vm = make_vm(x, guest, "crashy", cd=False)
    big = str(512 << 20)
    x.VM.set_memory_limits(vm, big, big, big, big)
    x.VM.start(vm, False, False)
    con = Console(daemon, x, s._session, vm)
    con.expect("corral-guest: ready")
    # Guest memory full of random data, so the suspend stream takes a while
    # (about a second here).
    assert guest_shell(con, "dd if=/dev/urandom of=/tmp/fill bs=1M count=220 2>/dev/null", "fill",
                       timeout=120).group(1) == b"0"
    con.close()
    task = x.Async.VM.suspend(vm)
    deadline = time.time() + 10
    while not x.VM.get_current_operations(vm) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert x.task.get_status(task) == "pending"
    daemon.kill9()
    daemon.start()
    x = login(daemon).xenapi
    assert x.VM.get_power_state(vm) == "Running"
    assert x.VM.get_current_operations(vm) == {}
    assert "suspend" in x.VM.get_allowed_operations(vm)
    assert [v for v in x.VDI.get_all() if x.VDI.get_type(v) == "suspend"] == []
    con = Console(daemon, x, login(daemon)._session, vm)
    con.expect(r"corral-tick")
    con.drain()
    con.expect(r"corral-tick ([0-9.]+)\r?\n")    # the guest runs on
    con.close()
    x.VM.hard_shutdown(vm)

    # A VM with a 512 MiB disk full of data, copied; corrald dies mid-copy.
    vdi = x.VDI.create({"name_label": "big", "SR": local, "virtual_size": str(512 << 20), "type": "user",
                        "sharable": False, "read_only": False, "other_config": {}})
    sid = login(daemon)._session
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=120)
    c.putrequest("PUT", f"/import_raw_vdi?session_id={sid}&vdi={vdi}&format=raw")
    c.putheader("Content-Length", str(512 << 20))
    c.endheaders()
    chunk = os.urandom(1 << 20)
    for _ in range(512):
        c.send(chunk)
    assert c.getresponse().status == 200
    x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "1", "bootable": False, "mode": "RW", "type": "Disk",
                  "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    vdis_before = set(x.VDI.get_all())
    sr_dir = os.path.join(daemon.state_dir, "local-sr")
    files_before = sorted(os.listdir(sr_dir))
    task = x.Async.VM.copy(vm, "half-copy", "OpaqueRef:NULL")
    deadline = time.time() + 20
    while not x.VM.get_by_name_label("half-copy") and time.time() < deadline:
        time.sleep(0.01)
    assert x.task.get_status(task) == "pending"
    daemon.kill9()
    daemon.start()
    x = login(daemon).xenapi
    assert x.VM.get_by_name_label("half-copy") == []
    assert set(x.VDI.get_all()) == vdis_before
    assert sorted(os.listdir(sr_dir)) == files_before
    assert x.VM.get_current_operations(vm) == {}
    # Nothing is stuck: the same copy now completes.
    new = x.VM.copy(vm, "full-copy", "OpaqueRef:NULL")
    assert len([b for b in x.VM.get_VBDs(new) if x.VBD.get_type(b) == "Disk"]) == 1
