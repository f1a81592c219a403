"""Storage: SRs, PBDs, VDIs and VBDs on real files, loop devices and ISOs,
driven through the real Python SDK, with data checked through qemu-img."""
import hashlib
import json
import os
import shutil
import subprocess
import time

import pytest
import XenAPI

from conftest import Daemon, ROOT_PASSWORD

GiB = 1 << 30
MiB = 1 << 20


def login(daemon):
    s = XenAPI.Session(daemon.http)
    s.login_with_password("root", ROOT_PASSWORD, "1.0", "pytest")
    return s


def failure(fn, *args):
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


def local_sr(x):
    return x.pool.get_default_SR(x.pool.get_all()[0])


def vdi_path(x, vdi):
    sr = x.VDI.get_SR(vdi)
    pbd = x.SR.get_PBDs(sr)[0]
    loc = x.PBD.get_device_config(pbd)["location"]
    base = os.path.join(loc, x.VDI.get_location(vdi))
    return base + ".qcow2" if os.path.exists(base + ".qcow2") else base


def make_vdi(x, sr, size=GiB, name="disk"):
    return x.VDI.create({"name_label": name, "name_description": "", "SR": sr, "virtual_size": str(size),
                         "type": "user", "sharable": False, "read_only": False, "other_config": {}})


def write_pattern(path, byte, offset=0, length=MiB):
    subprocess.run(["qemu-io", "-c", f"write -P {byte} {offset} {length}", path], check=True, capture_output=True)


def digest(path):
    """sha256 of the whole virtual disk as qemu-img reads it (through the chain)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "disk.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", path, raw], check=True, capture_output=True)
        h = hashlib.sha256()
        with open(raw, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def vdi_digest(x, vdi):
    """digest of a VDI, re-resolving its image if background coalescing moves
    it while we read (GC only waits for VDIs attached to running VMs)."""
    for _ in range(50):
        try:
            return digest(vdi_path(x, vdi))
        except subprocess.CalledProcessError:
            time.sleep(0.1)
    return digest(vdi_path(x, vdi))


def wait_for(cond, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_local_sr_sm_records_and_default_sr(daemon):
    x = login(daemon).xenapi
    sr = local_sr(x)
    rec = x.SR.get_record(sr)
    assert rec["name_label"] == "Local storage" and rec["type"] == "file" and rec["content_type"] == "user"
    assert int(rec["physical_size"]) > 0 and "vdi_snapshot" in rec["allowed_operations"]
    pbd = x.PBD.get_record(rec["PBDs"][0])
    assert pbd["currently_attached"] and pbd["host"] == x.host.get_all()[0]
    types = {r["type"]: r for r in x.SM.get_all_records().values()}
    assert {"file", "ext", "iso"} <= set(types)
    assert "VDI_SNAPSHOT" in types["file"]["capabilities"] and types["file"]["features"]["VDI_CLONE"] == "1"
    assert "VDI_CREATE" not in types["iso"]["capabilities"]
    assert set(x.SR.get_supported_types()) >= {"file", "ext", "iso"}


def test_snapshot_clone_coalesce_keep_every_block(daemon):
    x = login(daemon).xenapi
    sr = local_sr(x)
    big = make_vdi(x, sr, GiB)
    rec = x.VDI.get_record(big)
    assert rec["virtual_size"] == str(GiB)
    assert int(rec["physical_utilisation"]) < 2 * MiB, "sparse"
    for r in (x.VDI.snapshot(big, {}), x.VDI.clone(big, {})):
        assert int(x.VDI.get_physical_utilisation(r)) < 2 * MiB, "no space used until written"
        assert x.VDI.get_virtual_size(r) == str(GiB)
        x.VDI.destroy(r)
    x.VDI.destroy(big)
    assert wait_for(lambda: x.SR.get_VDIs(sr) == [])

    a = make_vdi(x, sr, 64 * MiB)
    write_pattern(vdi_path(x, a), 0xAA)
    d1 = digest(vdi_path(x, a))

    snap = x.VDI.snapshot(a, {})
    s = x.VDI.get_record(snap)
    assert s["is_a_snapshot"] and s["snapshot_of"] == a and s["managed"]
    assert snap in x.VDI.get_snapshots(a)
    assert int(s["physical_utilisation"]) < 2 * MiB, "a snapshot uses no space until written"
    bases = [r for r in x.VDI.get_all_records().values() if not r["managed"]]
    assert len(bases) == 1 and bases[0]["read_only"] and bases[0]["allowed_operations"] == []
    assert s["sm_config"]["vhd-parent"] == bases[0]["uuid"]
    assert digest(vdi_path(x, snap)) == d1

    write_pattern(vdi_path(x, a), 0xBB, offset=4 * MiB)
    d2 = digest(vdi_path(x, a))
    assert d2 != d1 and digest(vdi_path(x, snap)) == d1

    clone = x.VDI.clone(a, {})
    assert not x.VDI.get_is_a_snapshot(clone)
    assert digest(vdi_path(x, clone)) == d2
    write_pattern(vdi_path(x, clone), 0xCC)
    assert digest(vdi_path(x, a)) == d2

    # Deleting the snapshot and the clone coalesces the chain back to one image.
    x.VDI.destroy(snap)
    assert vdi_digest(x, a) == d2
    x.VDI.destroy(clone)
    assert wait_for(lambda: all(r["managed"] for r in x.VDI.get_all_records().values())), "base copies coalesced"
    assert vdi_digest(x, a) == d2
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vdi_path(x, a)],
                                     check=True, capture_output=True).stdout)
    assert "backing-filename" not in info
    sr_dir = os.path.dirname(vdi_path(x, a))
    assert wait_for(lambda: [f for f in os.listdir(sr_dir) if not f.startswith(".")] ==
                    [os.path.basename(vdi_path(x, a))]), os.listdir(sr_dir)
    x.VDI.destroy(a)


def test_resize_copy_update_and_errors(daemon, tmp_path):
    x = login(daemon).xenapi
    sr = local_sr(x)
    a = make_vdi(x, sr, 64 * MiB)
    write_pattern(vdi_path(x, a), 0x5A)
    x.VDI.resize(a, str(128 * MiB))
    assert x.VDI.get_virtual_size(a) == str(128 * MiB)
    assert failure(x.VDI.resize, a, str(MiB))[0] == "SR_BACKEND_FAILURE_79"
    assert x.SR.get_virtual_allocation(sr) == str(128 * MiB)

    # VDI.copy to another (file) SR, and as an async task.
    other = x.SR.create(x.host.get_all()[0], {"location": str(tmp_path / "sr2")}, "0", "second", "", "file",
                        "user", False, {})
    c = x.VDI.copy(a, other)
    assert x.VDI.get_SR(c) == other and digest(vdi_path(x, c)) == digest(vdi_path(x, a))
    s = login(daemon)
    task = s.xenapi.Async.VDI.copy(a, other)
    assert wait_for(lambda: s.xenapi.task.get_status(task) != "pending")
    assert s.xenapi.task.get_status(task) == "success"

    # XAPI's errors.
    assert failure(x.VDI.destroy, "OpaqueRef:nope") == ["HANDLE_INVALID", "VDI", "OpaqueRef:nope"]
    assert failure(x.SR.destroy, other) == ["SR_HAS_PBD", other]
    assert failure(x.SR.create, x.host.get_all()[0], {}, "0", "x", "", "zfs", "user", False, {}) == \
        ["SR_UNKNOWN_DRIVER", "zfs"]
    # Unplugged SR: storage calls say so; destroy needs it emptied.
    pbd = x.SR.get_PBDs(other)[0]
    x.PBD.unplug(pbd)
    assert failure(x.SR.scan, other) == ["SR_NOT_ATTACHED", other]
    x.PBD.plug(pbd)
    assert failure(x.SR.destroy, other)[0] == "SR_HAS_PBD"
    x.PBD.unplug(pbd)
    assert failure(x.SR.destroy, other) == ["SR_NOT_EMPTY"]
    x.PBD.plug(pbd)
    for v in x.SR.get_VDIs(other):
        x.VDI.destroy(v)
    x.PBD.unplug(pbd)
    x.SR.destroy(other)
    assert other not in x.SR.get_all()
    assert not os.path.exists(tmp_path / "sr2" / ".corral-sr")


def test_scan_reconciles_out_of_band_changes_and_probe(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    d = tmp_path / "sr"
    sr = x.SR.create(host, {"location": str(d)}, "0", "scanned", "", "file", "user", False, {})
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "outside.qcow2"), "10M"], check=True)
    x.SR.scan(sr)
    found = [x.VDI.get_record(v) for v in x.SR.get_VDIs(sr)]
    assert [(v["location"], v["virtual_size"]) for v in found] == [("outside", str(10 * MiB))]
    os.remove(d / "outside.qcow2")
    x.SR.scan(sr)
    assert x.SR.get_VDIs(sr) == []

    # probe: finds the SR in its directory; a missing location is the backend error.
    xml = x.SR.probe(host, {"location": str(d)}, "file", {})
    assert f"<UUID>{x.SR.get_uuid(sr)}</UUID>" in xml
    assert failure(x.SR.probe, host, {}, "file", {})[0].startswith("SR_BACKEND_FAILURE_")

    # forget keeps the storage; introduce + PBD.create + plug brings it back.
    uuid = x.SR.get_uuid(sr)
    v = make_vdi(x, sr, 8 * MiB, "kept")
    loc = x.VDI.get_location(v)
    pbd = x.SR.get_PBDs(sr)[0]
    assert failure(x.SR.forget, sr) == ["SR_HAS_PBD", sr]
    x.PBD.unplug(pbd)
    x.SR.forget(sr)
    assert (d / f"{loc}.qcow2").exists()
    sr2 = x.SR.introduce(uuid, "again", "", "file", "user", False, {})
    pbd2 = x.PBD.create({"host": host, "SR": sr2, "device_config": {"location": str(d)}})
    assert failure(x.PBD.create, {"host": host, "SR": sr2, "device_config": {"location": str(d)}}) == \
        ["PBD_EXISTS", sr2, host, pbd2]
    x.PBD.plug(pbd2)
    assert [x.VDI.get_location(v) for v in x.SR.get_VDIs(sr2)] == [loc]


def test_secrets_never_returned(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    sr = x.SR.create(host, {"location": str(tmp_path / "s"), "password": "hunter2"}, "0", "sec", "", "file",
                     "user", False, {})
    pbd = x.SR.get_PBDs(sr)[0]
    dc = x.PBD.get_device_config(pbd)
    assert "password" not in dc and "password_secret" in dc
    secret = x.secret.get_by_uuid(dc["password_secret"])
    assert "hunter2" not in json.dumps(x.secret.get_record(secret))
    assert "hunter2" not in json.dumps(x.PBD.get_all_records())
    log = open(os.path.join(daemon.state_dir, "corrald.log")).read() if os.path.exists(
        os.path.join(daemon.state_dir, "corrald.log")) else ""
    assert "hunter2" not in log


def test_legacy_sr_upgrade(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    d = tmp_path / "libvirt-images"
    d.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "web01.img"), "16M"], check=True)
    write_pattern(str(d / "web01.img"), 0x42)
    before = digest(str(d / "web01.img"))
    sr = x.SR.introduce("", "old pool", "", "file", "user", False, {})
    x.PBD.plug(x.PBD.create({"host": host, "SR": sr, "device_config": {"location": str(d)}}))
    [v] = x.SR.get_VDIs(sr)
    assert x.VDI.get_location(v) == "web01.img" and x.VDI.get_virtual_size(v) == str(16 * MiB)
    assert x.SR.get_sm_config(sr)["requires_upgrade"] == "true"
    assert "vdi_snapshot" not in x.SR.get_allowed_operations(sr)
    assert failure(x.VDI.snapshot, v, {}) == ["SR_REQUIRES_UPGRADE", sr]
    assert failure(x.VDI.clone, v, {}) == ["SR_REQUIRES_UPGRADE", sr]
    # New disks on a legacy SR are raw, like the old ones.
    n = make_vdi(x, sr, 4 * MiB)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", vdi_path(x, n)], check=True,
                                     capture_output=True).stdout)
    assert info["format"] == "raw" and "image-format" not in x.VDI.get_sm_config(n)

    r = daemon.xe("sr-upgrade", f"uuid={x.SR.get_uuid(sr)}", check=0)
    assert r.stdout.strip() == f"SR {x.SR.get_uuid(sr)} successfully upgraded"
    assert "requires_upgrade" not in x.SR.get_sm_config(sr)
    snap = x.VDI.snapshot(v, {})
    assert digest(vdi_path(x, snap)) == before and digest(vdi_path(x, v)) == before
    # One-way: a marker from a newer format is refused, not misread.
    pbd = x.SR.get_PBDs(sr)[0]
    x.PBD.unplug(pbd)
    marker = json.loads((d / ".corral-sr").read_text())
    assert marker["format_version"] == 2
    (d / ".corral-sr").write_text(json.dumps(dict(marker, format_version=3)))
    err = failure(x.PBD.plug, pbd)
    assert err[0] == "SR_BACKEND_FAILURE_47" and err[1] == "" and "newer Corral" in err[3]


def test_vbd_records_cd_and_disk(daemon):
    x = login(daemon).xenapi
    sr = local_sr(x)
    vm = x.VM.clone(x.VM.get_by_name_label("Other install media")[0], "vbd-vm")
    disk = make_vdi(x, sr, 8 * MiB)
    vbd = x.VBD.create({"VM": vm, "VDI": disk, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                        "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    assert x.VBD.get_VDI(vbd) == disk and x.VDI.get_VBDs(disk) == [vbd] and x.VM.get_VBDs(vm) == [vbd]
    cd = x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "autodetect", "bootable": False,
                       "mode": "RO", "type": "CD", "empty": True, "other_config": {}, "qos_algorithm_type": "",
                       "qos_algorithm_params": {}})
    assert x.VBD.get_userdevice(cd) == "1" and x.VBD.get_empty(cd)
    assert failure(x.VBD.eject, cd) == ["VBD_IS_EMPTY", cd]
    assert failure(x.VBD.eject, vbd) == ["VBD_NOT_REMOVABLE_MEDIA", vbd]
    assert failure(x.VBD.create, {"VM": vm, "VDI": disk, "userdevice": "0", "bootable": False, "mode": "RW",
                                  "type": "Disk", "empty": False, "other_config": {}, "qos_algorithm_type": "",
                                  "qos_algorithm_params": {}}) == ["DEVICE_ALREADY_EXISTS", "0"]
    x.VDI.destroy(disk)
    assert vbd not in x.VBD.get_all()


FAIL_QEMU_IMG = """#!/bin/sh
case "$1" in info) exec qemu-img "$@";; esac
echo "qemu-img: simulated failure" >&2
exit 1
"""


def test_failing_qemu_img_leaves_nothing_behind(tmp_path):
    tool = tmp_path / "qemu-img-fails"
    tool.write_text(FAIL_QEMU_IMG)
    tool.chmod(0o755)
    os.environ["CORRAL_QEMU_IMG"] = str(tool)
    try:
        d = Daemon(tmp_path / "state").start()
    finally:
        del os.environ["CORRAL_QEMU_IMG"]
    try:
        x = login(d).xenapi
        sr = local_sr(x)
        err = failure(make_vdi, x, sr)
        assert err[0] == "SR_BACKEND_FAILURE_78" and err[1] == "" and "simulated failure" in err[3]
        assert x.SR.get_VDIs(sr) == []
        loc = tmp_path / "state" / "local-sr"
        assert [f for f in os.listdir(loc) if not f.startswith(".")] == []
    finally:
        d.stop()


def test_full_filesystem_is_a_clean_error(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    img = tmp_path / "small.img"
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "12M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        small = x.SR.create(host, {"location": str(mnt)}, "0", "small", "", "file", "user", False, {})
        big = make_vdi(x, local_sr(x), 32 * MiB)
        write_pattern(vdi_path(x, big), 0x11, 0, 24 * MiB)
        err = failure(x.VDI.copy, big, small)
        assert err[0] == "SR_BACKEND_FAILURE_44", err
        assert [f for f in os.listdir(mnt) if not f.startswith(".") and f != "lost+found"] == []
        assert x.SR.get_VDIs(small) == []
        x.SR.scan(small)
        assert x.SR.get_VDIs(small) == []
        x.PBD.unplug(x.SR.get_PBDs(small)[0])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_kill9_mid_clone_then_scan_is_consistent(tmp_path):
    d = Daemon(tmp_path / "state").start()
    try:
        x = login(d).xenapi
        sr = local_sr(x)
        a = make_vdi(x, sr, 64 * MiB)
        write_pattern(vdi_path(x, a), 0x77)
        before = digest(vdi_path(x, a))
        s = login(d)
        tasks = [s.xenapi.Async.VDI.clone(a, {}) for _ in range(6)]
        time.sleep(0.05)
        d.kill9()
        d.start()
        x = login(d).xenapi
        x.SR.scan(sr)
        recs = x.VDI.get_all_records()
        locs = {r["location"] for r in recs.values()}
        files = {f[:-6] if f.endswith(".qcow2") else f for f in os.listdir(tmp_path / "state" / "local-sr")
                 if not f.startswith(".")}
        assert files == locs, (files, locs)
        assert digest(vdi_path(x, a)) == before
        for v, r in recs.items():
            if r["managed"]:
                assert digest(vdi_path(x, v)) == before
        # Tasks are volatile, as in XAPI: gone after the restart.
        assert not set(tasks) & set(x.task.get_all())
        # The clones' operations died with the old process: nothing stays
        # blocked, and the VDI clones again.
        assert x.SR.get_current_operations(sr) == {} and x.VDI.get_current_operations(a) == {}
        assert "clone" in x.VDI.get_allowed_operations(a)
        x.VDI.clone(a, {})
    finally:
        d.stop()


@pytest.mark.skipif(not shutil.which("genisoimage") and not shutil.which("xorriso"), reason="genisoimage missing")
def test_iso_sr(daemon, tmp_path):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    lib = tmp_path / "isos"
    lib.mkdir()
    src = tmp_path / "content"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    tool = shutil.which("genisoimage") or shutil.which("xorriso")
    args = [tool] + (["-as", "mkisofs"] if tool.endswith("xorriso") else []) + \
        ["-quiet", "-o", str(lib / "tools.iso"), "-V", "TOOLS", str(src)]
    subprocess.run(args, check=True)
    (lib / "notes.txt").write_text("not an iso")
    sr = x.SR.create(host, {"location": str(lib)}, "0", "ISO library", "", "iso", "iso", True, {})
    assert x.SR.get_content_type(sr) == "iso"
    [v] = x.SR.get_VDIs(sr)
    rec = x.VDI.get_record(v)
    assert rec["name_label"] == "tools.iso" and rec["read_only"]
    assert int(rec["virtual_size"]) == os.path.getsize(lib / "tools.iso")
    assert failure(make_vdi, x, sr)[0] == "SR_OPERATION_NOT_SUPPORTED"
    vm = x.VM.clone(x.VM.get_by_name_label("Other install media")[0], "cd-vm")
    cd = x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "3", "bootable": False, "mode": "RO",
                       "type": "CD", "empty": True, "other_config": {}, "qos_algorithm_type": "",
                       "qos_algorithm_params": {}})
    x.VBD.insert(cd, v)
    assert x.VBD.get_VDI(cd) == v and not x.VBD.get_empty(cd)
    assert failure(x.VBD.insert, cd, v) == ["VBD_NOT_EMPTY", cd]
    x.VBD.eject(cd)
    assert x.VBD.get_empty(cd)
    os.remove(lib / "tools.iso")
    x.SR.scan(sr)
    assert x.SR.get_VDIs(sr) == []


@pytest.fixture
def loop_device(tmp_path):
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "256M", str(img)], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], check=True, capture_output=True,
                         text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_local_sr_on_a_configured_device(tmp_path, loop_device):
    """`local-sr-device` makes the first start's "Local storage" an ext SR
    on that device, the pool's default; later starts keep it, and do not
    make it again once the admin forgot it."""
    d = Daemon(tmp_path / "state")
    d.extra_config = f"local-sr-device = {loop_device}\n"
    d.start()
    try:
        x = login(d).xenapi
        [sr] = x.SR.get_by_name_label("Local storage")
        assert x.SR.get_type(sr) == "ext" and not x.SR.get_shared(sr)
        assert x.pool.get_default_SR(x.pool.get_all()[0]) == sr
        [pbd] = x.SR.get_PBDs(sr)
        assert x.PBD.get_device_config(pbd)["device"] == loop_device and x.PBD.get_currently_attached(pbd)
        v = make_vdi(x, sr, 8 * MiB)
        assert os.path.ismount(os.path.join(d.state_dir, "sr-mount", x.SR.get_uuid(sr)))
        d.stop()
        d.start()
        x = login(d).xenapi
        assert x.SR.get_by_name_label("Local storage") == [sr] and v in x.SR.get_VDIs(sr)
        x.VDI.destroy(v)
        x.PBD.unplug(pbd)
        x.SR.forget(sr)
        d.stop()
        d.start()
        x = login(d).xenapi
        assert x.SR.get_by_name_label("Local storage") == []
    finally:
        d.stop()


def test_ext_sr_on_a_loop_device(daemon, loop_device):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    sr = x.SR.create(host, {"device": loop_device}, "0", "ext", "", "ext", "user", False, {})
    mnt = os.path.join(daemon.state_dir, "sr-mount", x.SR.get_uuid(sr))
    assert os.path.ismount(mnt)
    assert 200 * MiB < int(x.SR.get_physical_size(sr)) <= 256 * MiB
    v = make_vdi(x, sr, 32 * MiB)
    write_pattern(os.path.join(mnt, x.VDI.get_location(v) + ".qcow2"), 0x33)
    snap = x.VDI.snapshot(v, {})
    assert x.VDI.get_is_a_snapshot(snap)
    pbd = x.SR.get_PBDs(sr)[0]
    x.PBD.unplug(pbd)
    assert not os.path.ismount(mnt)
    xml = x.SR.probe(host, {"device": loop_device}, "ext", {})
    assert f"<UUID>{x.SR.get_uuid(sr)}</UUID>" in xml
    x.PBD.plug(pbd)
    assert os.path.ismount(mnt)
    assert len([r for r in x.SR.get_VDIs(sr) if x.VDI.get_managed(r)]) == 2
    for r in x.SR.get_VDIs(sr):
        if x.VDI.get_managed(r):
            x.VDI.destroy(r)
    assert wait_for(lambda: x.SR.get_VDIs(sr) == [])
    x.PBD.unplug(pbd)
    x.SR.destroy(sr)
    assert not os.path.ismount(mnt)


def test_xe_storage_commands(daemon, tmp_path):
    xe = daemon.xe
    sr_dir = tmp_path / "xe-sr"
    sr = xe("sr-create", "name-label=xe SR", "type=file", f"device-config:location={sr_dir}", check=0).stdout.strip()
    assert len(sr) == 36
    out = xe("sr-list", f"uuid={sr}", check=0).stdout
    assert out == (f"uuid ( RO)                : {sr}\n"
                   "          name-label ( RW): xe SR\n"
                   "    name-description ( RW): \n"
                   "                type ( RO): file\n"
                   "        content-type ( RO): user\n\n\n")
    vdi = xe("vdi-create", f"sr-uuid={sr}", "name-label=data", "virtual-size=2GiB", check=0).stdout.strip()
    assert xe("vdi-param-get", f"uuid={vdi}", "param-name=virtual-size", check=0).stdout.strip() == str(2 * GiB)
    snap = xe("vdi-snapshot", f"uuid={vdi}", check=0).stdout.strip()
    assert xe("vdi-param-get", f"uuid={snap}", "param-name=is-a-snapshot", check=0).stdout.strip() == "true"
    clone = xe("vdi-clone", f"uuid={vdi}", "new-name-label=copy", check=0).stdout.strip()
    assert xe("vdi-list", "name-label=copy", "--minimal", check=0).stdout.strip() == clone
    xe("vdi-resize", f"uuid={vdi}", "disk-size=3GiB", check=0)
    assert xe("vdi-param-get", f"uuid={vdi}", "param-name=virtual-size", check=0).stdout.strip() == str(3 * GiB)
    r = xe("vdi-resize", f"uuid={vdi}", "disk-size=1GiB", check=1)
    assert "SR_BACKEND_FAILURE_79" in r.stderr + r.stdout
    # CD drives: the seed's `xe vbd-list type=CD empty=false`.
    vm = xe("vm-list", "name-label=nothing", "--minimal", check=0).stdout.strip()
    assert vm == ""
    tpl = xe("template-list", "name-label=Other install media", "--minimal", check=0).stdout.strip()
    assert tpl
    x = login(daemon).xenapi
    vmref = x.VM.clone(x.VM.get_by_uuid(tpl), "xe-vm")
    x.VM.set_is_a_template(vmref, False)
    vm = x.VM.get_uuid(vmref)
    cd = xe("vbd-create", f"vm-uuid={vm}", "device=3", "type=CD", check=0).stdout.strip()
    assert xe("vbd-list", "type=CD", "empty=false", "--minimal", check=0).stdout.strip() == ""
    assert xe("vbd-list", "type=CD", "empty=true", "--minimal", check=0).stdout.strip() == cd
    r = xe("vbd-eject", f"uuid={cd}", check=1)
    assert r.stderr == f"Operation could not be performed because the drive is empty.\nvbd: {cd}\n"
    disk_vbd = xe("vbd-create", f"vm-uuid={vm}", f"vdi-uuid={vdi}", "device=0", "bootable=true", check=0).stdout.strip()
    assert xe("vbd-param-get", f"uuid={disk_vbd}", "param-name=vdi-uuid", check=0).stdout.strip() == vdi
    xe("vbd-destroy", f"uuid={disk_vbd}", check=0)
    # Probe and repair.
    probe = xe("sr-probe", "type=file", f"device-config:location={sr_dir}", check=0).stdout
    assert f"<UUID>{sr}</UUID>" in probe
    r = xe("sr-probe", "type=file", check=1)
    assert "SR_BACKEND_FAILURE_112" in r.stderr + r.stdout
    pbd = xe("pbd-list", f"sr-uuid={sr}", "--minimal", check=0).stdout.strip()
    xe("pbd-unplug", f"uuid={pbd}", check=0)
    assert xe("pbd-param-get", f"uuid={pbd}", "param-name=currently-attached", check=0).stdout.strip() == "false"
    r = xe("sr-repair", f"uuid={sr}", check=0)
    assert r.stdout.strip().endswith(": attached")
    assert xe("pbd-param-get", f"uuid={pbd}", "param-name=currently-attached", check=0).stdout.strip() == "true"
    # Teardown through xe.
    for v in (snap, clone, vdi):
        xe("vdi-destroy", f"uuid={v}", check=0)
    assert wait_for(lambda: xe("vdi-list", f"sr-uuid={sr}", "--minimal", check=0).stdout.strip() == "")
    xe("pbd-unplug", f"uuid={pbd}", check=0)
    xe("sr-destroy", f"uuid={sr}", check=0)
    assert xe("sr-list", f"uuid={sr}", "--minimal", check=0).stdout.strip() == ""


def test_xe_sr_list_shows_legacy_sr_needs_upgrade(daemon, tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "a.img"), "1M"], check=True)
    sr = daemon.xe("sr-introduce", "uuid=", "name-label=old", "type=file", "content-type=user", check=0).stdout.strip()
    host = daemon.xe("host-list", "--minimal", check=0).stdout.strip()
    pbd = daemon.xe("pbd-create", f"host-uuid={host}", f"sr-uuid={sr}", f"device-config:location={d}",
                    check=0).stdout.strip()
    daemon.xe("pbd-plug", f"uuid={pbd}", check=0)
    out = daemon.xe("sr-list", f"uuid={sr}", check=0).stdout
    assert "    requires-upgrade ( RO): true\n" in out
    assert "format_version: 1" in daemon.xe("sr-param-list", f"uuid={sr}", check=0).stdout
    daemon.xe("sr-upgrade", f"uuid={sr}", check=0)
    assert "requires-upgrade" not in daemon.xe("sr-list", f"uuid={sr}", check=0).stdout


def http_transfer(daemon, method, path, body=None, length=None):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=60)
    headers = {} if length is None else {"Content-Length": str(length)}
    c.request(method, path, body, headers)
    r = c.getresponse()
    return r.status, r.getheader("Content-Type"), r.read()


def test_import_export_round_trips(daemon, tmp_path):
    s = login(daemon)
    x, sid = s.xenapi, s._session
    sr = local_sr(x)
    src = tmp_path / "disk.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(3 * MiB))
        f.seek(20 * MiB)
        f.write(os.urandom(MiB))
        f.truncate(32 * MiB)
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    v = make_vdi(x, sr, 32 * MiB, "imported")
    with open(src, "rb") as f:
        status, _, body = http_transfer(daemon, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={v}&format=raw",
                                        f, src.stat().st_size)
    assert status == 200, body
    # Zero runs stay unallocated.
    assert int(x.VDI.get_physical_utilisation(v)) < 8 * MiB
    status, ctype, data = http_transfer(daemon, "GET",
                                        f"/export_raw_vdi?session_id={sid}&vdi={x.VDI.get_uuid(v)}&format=raw")
    assert status == 200 and ctype == "application/octet-stream"
    assert hashlib.sha256(data).hexdigest() == want
    for fmt, ctype_want in (("vhd", "application/vhd"), ("qcow2", "application/x-qemu-disk")):
        status, ctype, image = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={v}&format={fmt}")
        assert status == 200 and ctype == ctype_want
        (tmp_path / f"e.{fmt}").write_bytes(image)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(tmp_path / f"e.{fmt}")],
                                         check=True, capture_output=True).stdout)
        assert info["format"] == {"vhd": "vpc", "qcow2": "qcow2"}[fmt] and info["virtual-size"] == 32 * MiB
        w = make_vdi(x, sr, 32 * MiB, f"from-{fmt}")
        status, _, body = http_transfer(daemon, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={w}&format={fmt}",
                                        image, len(image))
        assert status == 200, body
        _, _, back = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={w}&format=raw")
        assert hashlib.sha256(back).hexdigest() == want
    # A snapshot chain: the VDI's data now comes from two files (changed
    # ranges on top, the rest from the snapshot's base), with zeroed ranges.
    snap = x.VDI.snapshot(v, {})
    src2 = bytearray(src.read_bytes())
    src2[MiB:2 * MiB] = os.urandom(MiB)
    src2[2 * MiB:3 * MiB] = bytes(MiB)
    status, _, body = http_transfer(daemon, "PUT", f"/import_raw_vdi?session_id={sid}&vdi={v}&format=raw",
                                    bytes(src2), len(src2))
    assert status == 200, body
    _, _, data = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={v}&format=raw")
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(src2).hexdigest()
    _, _, data = http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={snap}&format=raw")
    assert hashlib.sha256(data).hexdigest() == want
    # Refusals: a bad session, an unknown format, data larger than the VDI (with its task failed).
    assert http_transfer(daemon, "GET", f"/export_raw_vdi?session_id=OpaqueRef:bad&vdi={v}")[0] == 401
    assert http_transfer(daemon, "GET", f"/export_raw_vdi?session_id={sid}&vdi={v}&format=vmdk")[0] == 400
    small = make_vdi(x, sr, MiB, "small")
    task = x.task.create("import", "")
    status, _, body = http_transfer(daemon, "PUT",
                                    f"/import_raw_vdi?session_id={sid}&vdi={small}&format=raw&task_id={task}",
                                    b"x" * (2 * MiB), 2 * MiB)
    assert status == 500 and b"SR_BACKEND_FAILURE_79" in body
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task)[0] == "SR_BACKEND_FAILURE_79"
    # The daemon still serves.
    assert x.VDI.get_name_label(v) == "imported"


def test_xe_vdi_import_export(daemon, tmp_path):
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(MiB) + bytes(3 * MiB))
    sr = daemon.xe("sr-list", "name-label=Local storage", "--minimal", check=0).stdout.strip()
    vdi = daemon.xe("vdi-create", f"sr-uuid={sr}", "name-label=xe-import", "virtual-size=4MiB", check=0).stdout.strip()
    daemon.xe("vdi-import", f"uuid={vdi}", f"filename={src}", "format=raw", check=0)
    out = tmp_path / "out.raw"
    daemon.xe("vdi-export", f"uuid={vdi}", f"filename={out}", check=0)
    assert out.read_bytes() == src.read_bytes()
    qc = tmp_path / "out.qcow2"
    daemon.xe("vdi-export", f"uuid={vdi}", f"filename={qc}", "format=qcow2", server="https", check=0)
    assert json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qc)], check=True,
                                     capture_output=True).stdout)["format"] == "qcow2"
    r = daemon.xe("vdi-import", f"uuid={vdi}", f"filename={tmp_path / 'missing'}", check=1)
    assert "Cannot open" in r.stderr
    big = tmp_path / "big.raw"
    big.write_bytes(bytes(8 * MiB))
    r = daemon.xe("vdi-import", f"uuid={vdi}", f"filename={big}", check=1)
    assert "SR_BACKEND_FAILURE_79" in r.stderr + r.stdout
