"""Security audit 2026-12, images and paths (C1-C3, H1-H3, M8, L5): no
delegated role, and no guest it controls, gets root to open a host file.
Each test reproduces the audit's finding against a live corrald."""
import os
import shutil
import subprocess
import time

import pytest
import XenAPI

from conftest import failure, login
from test_storage import http_transfer, local_sr, make_vdi

MiB = 1 << 20
SECRET = b"HOST-SECRET-0123456789\n"


def as_role(daemon, role):
    """A session of a fresh local user holding `role`."""
    x = login(daemon).xenapi
    name = "u-" + role
    x.user.create_local(name, role, "pw-" + role, role)
    return login(daemon, name, "pw-" + role)


def host_secret(tmp_path):
    p = tmp_path / "host-secret.txt"
    p.write_bytes(SECRET)
    os.chmod(p, 0o600)
    return p


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def put(daemon, sid, vdi, fmt, data):
    return http_transfer(daemon, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={vdi}&format={fmt}", data,
                         len(data))


def get(daemon, sid, vdi, fmt="raw"):
    return http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={vdi}&format={fmt}")


def test_import_qcow2_does_not_follow_backing_file(daemon, tmp_path):
    """C1: an uploaded qcow2 naming a host file as its backing file."""
    secret = host_secret(tmp_path)
    evil = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(evil), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={secret},data_file_raw=on", str(tmp_path / "d.qcow2"),
             "1M")
    s = as_role(daemon, "vm-admin")
    x = s.xenapi
    v = make_vdi(x, local_sr(x), MiB, "target")
    for image in (evil, tmp_path / "d.qcow2"):
        status, _, body = put(daemon, s._session, v, "qcow2", image.read_bytes())
        assert status == 500 and b"IMPORT_ERROR" in body, body
        status, _, data = get(daemon, s._session, v)
        assert status == 200 and SECRET not in data and data == bytes(MiB)
    # A standalone qcow2 still imports.
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(good), "1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x61 0 4096", str(good)], check=True, capture_output=True)
    assert put(daemon, s._session, v, "qcow2", good.read_bytes())[0] == 200
    assert get(daemon, s._session, v)[2][:4096] == b"a" * 4096


def test_raw_images_not_format_probed(daemon, tmp_path):
    """C2: a raw VDI whose contents look like a qcow2 naming a host file."""
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    sr = x.SR.introduce("", "legacy", "", "file", "user", False, {})
    x.PBD.plug(x.PBD.create({"host": host, "SR": sr, "device_config": {"location": str(legacy)}}))
    victim = tmp_path / "victim.bin"
    carrier = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={victim},data_file_raw=on", str(carrier), "1M")
    victim.write_bytes(b"ORIGINAL-HOST-FILE-CONTENT".ljust(MiB, b"\0"))  # (create truncated it)
    s = as_role(daemon, "vm-admin")
    v = make_vdi(s.xenapi, sr, MiB, "raw disk")
    header = carrier.read_bytes()
    assert put(daemon, s._session, v, "raw", header)[0] == 200
    status, _, data = get(daemon, s._session, v)
    assert status == 200 and data.startswith(b"QFI\xfb") and b"ORIGINAL-HOST-FILE" not in data
    assert put(daemon, s._session, v, "raw", b"PWNED-BY-VMADMIN".ljust(MiB, b"\0"))[0] == 200
    assert victim.read_bytes().startswith(b"ORIGINAL-HOST-FILE-CONTENT")
    # The scan keeps calling it raw, and its sm_config names no format.
    x.SR.scan(sr)
    assert "image-format" not in x.VDI.get_sm_config(v)


def qemu_cmdline(vm_uuid, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"qemu-system-x86_64") and any(vm_uuid.encode() in a for a in args):
                return [a.decode() for a in args]
        time.sleep(0.1)
    raise AssertionError("no QEMU for " + vm_uuid)


def drive_args(cmdline):
    return [a for a in cmdline if a.startswith("if=none,id=drive-")]


needs_qemu = pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="no QEMU")


def guest_vm(x, name):
    from test_vm import GUEST_DIR
    subprocess.run([os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "build-test-guest.sh"),
                    GUEST_DIR], check=True, capture_output=True)
    tpl = x.VM.get_by_name_label("Linux direct kernel boot")[0]
    vm = x.VM.clone(tpl, name)
    x.VM.set_is_a_template(vm, False)
    x.VM.set_PV_kernel(vm, os.path.join(GUEST_DIR, "vmlinuz"))
    x.VM.set_PV_ramdisk(vm, os.path.join(GUEST_DIR, "initrd.img"))
    x.VM.set_PV_args(vm, "console=ttyS0 quiet")
    mib = 128 * MiB
    x.VM.set_memory_limits(vm, mib, mib, mib, mib)
    return vm


def disk(x, vm, vdi, device, mode="RW"):
    return x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": str(device), "bootable": False, "mode": mode,
                         "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                         "qos_algorithm_params": {}})


@needs_qemu
def test_vdi_image_format_not_user_controlled(daemon):
    """C3: sm_config:image-format no longer chooses the format QEMU opens."""
    s = as_role(daemon, "vm-admin")
    x = s.xenapi
    vm = guest_vm(login(daemon).xenapi, "c3")
    a = make_vdi(x, local_sr(x), MiB, "A")
    try:
        x.VDI.add_to_sm_config(a, "image-format", "raw")
    except XenAPI.Failure:
        pass  # refusing the key is as good as ignoring it
    disk(x, vm, a, 1)
    x.VM.start(vm, False, False)
    try:
        [d] = drive_args(qemu_cmdline(x.VM.get_uuid(vm)))
        assert ",format=qcow2," in d, d
    finally:
        x.VM.hard_shutdown(vm)


@needs_qemu
def test_read_only_vdi_stays_read_only(daemon, tmp_path):
    """H1: VBD.set_mode RW and VDI.read_only changes cannot make a guest
    write a read-only VDI; the drive builder decides."""
    lib = tmp_path / "isolib"
    lib.mkdir()
    (lib / "target.iso").write_bytes(b"ISO-CONTENT".ljust(MiB, b"\0"))
    x = login(daemon).xenapi
    iso = x.SR.create(x.host.get_all()[0], {"location": str(lib)}, "0", "isos", "", "iso", "iso", True, {})
    s = as_role(daemon, "vm-admin")
    v = s.xenapi
    [t] = v.SR.get_VDIs(iso)
    vm = guest_vm(x, "h1")
    assert failure(disk, v, vm, t, 1, "RW")[0] == "VDI_READONLY"
    vbd = disk(v, vm, t, 1, "RO")
    assert failure(v.VBD.set_mode, vbd, "RW") == ["VDI_READONLY", t]
    # A user VDI made read-only after its RW VBD exists is still attached read-only.
    u = make_vdi(v, local_sr(v), MiB, "later read-only")
    disk(v, vm, u, 2, "RW")
    v.VDI.set_read_only(u, True)
    v.VM.start(vm, False, False)
    try:
        drives = drive_args(qemu_cmdline(v.VM.get_uuid(vm)))
        assert len(drives) == 2 and all("read-only=on" in d for d in drives), drives
        assert failure(v.VBD.set_mode, vbd, "RO")[0] == "VM_BAD_POWER_STATE"
    finally:
        v.VM.hard_shutdown(vm)
    assert (lib / "target.iso").read_bytes().startswith(b"ISO-CONTENT")


def test_iso_sr_introduce_only_regular_iso_files(daemon, tmp_path):
    """H2: only regular *.iso files inside the library, never through a link out of it."""
    secret = host_secret(tmp_path)
    lib = tmp_path / "isos"
    lib.mkdir()
    (lib / "ok.iso").write_bytes(b"\0" * 4096)
    (lib / "notes.txt").write_text("not an iso")
    os.symlink(secret, lib / "link.iso")
    os.symlink(lib / "ok.iso", lib / "alias.iso")   # a link inside the library is fine
    (lib / "sub").mkdir()
    (lib / "sub" / "deep.iso").write_bytes(b"\0" * 4096)
    x = login(daemon).xenapi
    sr = x.SR.create(x.host.get_all()[0], {"location": str(lib)}, "0", "isos", "", "iso", "iso", True, {})
    assert sorted(x.VDI.get_location(v) for v in x.SR.get_VDIs(sr)) == ["alias.iso", "ok.iso"]
    s = as_role(daemon, "vm-admin")
    for loc in ("notes.txt", "link.iso", "sub", "../host-secret.txt", "sub/deep.iso", "shadow"):
        err = failure(s.xenapi.VDI.introduce, "", "x", "", sr, "user", False, True, {}, loc)
        assert err[0] == "VDI_MISSING", (loc, err)
    # Also no export of a library on /etc through a name without .iso.
    etc = x.SR.create(x.host.get_all()[0], {"location": "/etc"}, "0", "etc", "", "iso", "iso", True, {})
    assert failure(s.xenapi.VDI.introduce, "", "x", "", etc, "user", False, True, {}, "shadow")[0] == "VDI_MISSING"


def test_iso_and_copy_do_not_probe_image_format(daemon, tmp_path):
    """H3: an "ISO" that is really a qcow2 with a backing file is read raw."""
    secret = host_secret(tmp_path)
    lib = tmp_path / "isos"
    lib.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", str(lib / "evil.iso"), "1M")
    x = login(daemon).xenapi
    sr = x.SR.create(x.host.get_all()[0], {"location": str(lib)}, "0", "isos", "", "iso", "iso", True, {})
    [evil] = x.SR.get_VDIs(sr)
    s = as_role(daemon, "vm-admin")
    status, _, data = get(daemon, s._session, evil)
    assert status == 200 and data.startswith(b"QFI\xfb") and SECRET not in data
    copy = s.xenapi.VDI.copy(evil, local_sr(x))
    status, _, data = get(daemon, s._session, copy)
    assert status == 200 and data.startswith(b"QFI\xfb") and SECRET not in data


@needs_qemu
def test_pv_kernel_restricted_to_allowed_paths(daemon, tmp_path):
    """M8: PV-kernel/PV-ramdisk only from boot directories, one answer for
    every other path whether it exists or not."""
    s = as_role(daemon, "vm-admin")
    x = s.xenapi
    vm = guest_vm(login(daemon).xenapi, "m8")
    answers = set()
    for p in ("/etc/shadow", "/nonexistent", "/etc", str(host_secret(tmp_path))):
        x.VM.set_PV_kernel(vm, p)
        err = failure(x.VM.start, vm, False, False)
        assert err[0] == "BOOTLOADER_FAILED" and p not in err[2], err
        answers.add(tuple(err))
    assert len(answers) == 1, answers
    # A link from a boot directory to elsewhere does not count as inside it.
    boot = os.path.join(daemon.state_dir, "boot")
    os.symlink("/etc/shadow", os.path.join(boot, "vmlinuz-link"))
    x.VM.set_PV_kernel(vm, os.path.join(boot, "vmlinuz-link"))
    assert failure(x.VM.start, vm, False, False) == list(answers.pop())
    assert x.VM.get_power_state(vm) == "Halted"


def test_empty_pv_kernel_is_refused(daemon):
    """A direct-kernel VM with nothing to boot does not "start"."""
    x = login(daemon).xenapi
    tpl = x.VM.get_by_name_label("Linux direct kernel boot")[0]
    vm = x.VM.clone(tpl, "nothing to boot")
    x.VM.set_is_a_template(vm, False)
    err = failure(x.VM.start, vm, False, False)
    assert err[0] == "BOOTLOADER_FAILED" and "PV-kernel" in err[2], err
    assert x.VM.get_power_state(vm) == "Halted"


def test_sr_device_config_rejects_option_like_values(daemon, tmp_path):
    """L5: device-config paths must be absolute; nothing reaches a tool as an option."""
    s = as_role(daemon, "pool-operator")
    x = s.xenapi
    host = x.host.get_all()[0]
    for ty, dc in (("ext", {"device": "-V"}), ("ext", {"device": str(tmp_path)}), ("file", {"location": "-q"}),
                   ("file", {"location": "relative/dir"}), ("file", {"location": str(tmp_path) + "/../x"}),
                   ("nfs", {"server": "-o", "serverpath": "/x"}), ("nfs", {"server": "h", "serverpath": "/x?uid=0"})):
        err = failure(x.SR.create, host, dc, "0", "bad", "", ty, "user", False, {})
        assert err[0] == "INVALID_VALUE" and err[1].startswith("device-config:"), (dc, err)
    assert not os.path.exists("-q") and not os.path.exists("relative")


def test_file_sr_create_makes_only_the_last_component(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    err = failure(x.SR.create, host, {"location": str(tmp_path / "missing" / "sr")}, "0", "f", "", "file", "user",
                  False, {})
    assert err[0].startswith("SR_BACKEND_FAILURE_") and err[1] == "", err
    assert not (tmp_path / "missing").exists()
    sr = x.SR.create(host, {"location": str(tmp_path / "sr")}, "0", "f", "", "file", "user", False, {})
    assert (tmp_path / "sr" / ".corral-sr").exists() and x.SR.get_type(sr) == "file"


def test_import_upload_size_bounded(daemon):
    """L6: a vhd/qcow2 upload larger than the VDI could need is refused
    before anything is spooled."""
    import socket
    s = as_role(daemon, "vm-admin")
    v = make_vdi(s.xenapi, local_sr(s.xenapi), MiB, "small")
    c = socket.create_connection(("127.0.0.1", daemon.http_port), timeout=10)
    c.sendall(f"PUT /import_raw_vdi?session_id={s._session}&vdi={v}&format=vhd HTTP/1.1\r\nHost: x\r\n"
              f"Content-Length: {1 << 40}\r\n\r\n".encode() + b"\0" * 65536)
    head = c.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:80]
    c.close()
    spool = os.path.join(daemon.state_dir, "transfer")
    assert not os.path.isdir(spool) or not os.listdir(spool)
