"""Provisioning with xe (vm-install, vm-clone, vm-copy, vm-uninstall,
vm-disk-list) and BIOS boot from a disk or a CD in HVM_boot_params order."""
import os
import re
import shutil
import subprocess

import pytest

from test_vm import Console, GUEST_DIR, failure, login, wait_power

MiB = 1 << 20
GiB = 1 << 30


def xe_out(daemon, *args):
    return daemon.xe(*args, check=0).stdout.strip()


def vdis_of(x, vm):
    return [x.VBD.get_VDI(b) for b in x.VM.get_VBDs(vm) if x.VBD.get_type(b) == "Disk"]


def export(daemon, vdi_uuid, path):
    daemon.xe("vdi-export", f"uuid={vdi_uuid}", f"filename={path}", check=0)
    return path.read_bytes()


def test_xe_install_clone_copy_uninstall(daemon, tmp_path):
    s = login(daemon)
    x = s.xenapi
    local = xe_out(daemon, "sr-list", "name-label=Local storage", "--minimal")
    other_dir = tmp_path / "second-sr"
    other_dir.mkdir()
    other = xe_out(daemon, "sr-create", "name-label=second", "type=file", f"device-config:location={other_dir}")

    # vm-install from the BIOS template: its other-config:disks asks for one
    # 32 GiB boot disk, made on the named SR (sparse).
    uuid = xe_out(daemon, "vm-install", "template=Other install media", "new-name-label=installed",
                  f"sr-uuid={other}")
    vm = x.VM.get_by_uuid(uuid)
    assert not x.VM.get_is_a_template(vm)
    assert "disks" not in x.VM.get_other_config(vm)
    [vdi] = vdis_of(x, vm)
    assert x.SR.get_uuid(x.VDI.get_SR(vdi)) == other
    assert int(x.VDI.get_virtual_size(vdi)) == 32 * GiB
    assert int(x.VDI.get_physical_utilisation(vdi)) < 16 * MiB
    [vbd] = [b for b in x.VM.get_VBDs(vm) if x.VBD.get_type(b) == "Disk"]
    assert x.VBD.get_userdevice(vbd) == "0" and x.VBD.get_bootable(vbd)
    # The README's next step: an empty CD drive for install media.
    daemon.xe("vbd-create", f"vm-uuid={uuid}", "device=3", "type=CD", "mode=RO", "empty=true", check=0)
    [cd] = [b for b in x.VM.get_VBDs(vm) if x.VBD.get_type(b) == "CD"]
    assert x.VBD.get_empty(cd) and x.VBD.get_mode(cd) == "RO" and x.VBD.get_userdevice(cd) == "3"
    listing = xe_out(daemon, "vm-disk-list", f"uuid={uuid}")
    assert "Disk 0 VBD:" in listing and "Disk 0 VDI:" in listing and "second" in listing
    # The template itself is untouched.
    tpl = x.VM.get_by_name_label("Other install media")[0]
    assert "disks" in x.VM.get_other_config(tpl) and x.VM.get_VBDs(tpl) == []

    # A source VM with data on its disk.
    src_uuid = xe_out(daemon, "vm-install", "template=Other install media", "new-name-label=source")
    src = x.VM.get_by_uuid(src_uuid)
    [src_vdi] = vdis_of(x, src)
    assert x.SR.get_uuid(x.VDI.get_SR(src_vdi)) == local     # the pool's default SR
    data_vdi = xe_out(daemon, "vdi-create", f"sr-uuid={local}", "name-label=data", "virtual-size=4MiB")
    raw = tmp_path / "data.raw"
    raw.write_bytes(os.urandom(MiB) + bytes(3 * MiB))
    daemon.xe("vdi-import", f"uuid={data_vdi}", f"filename={raw}", "format=raw", check=0)
    daemon.xe("vbd-create", f"vm-uuid={src_uuid}", "device=1", f"vdi-uuid={data_vdi}", check=0)

    # vm-clone: instant clones of both disks, the data the same.
    clone_uuid = xe_out(daemon, "vm-clone", "vm=source", "new-name-label=cloned")
    clone = x.VM.get_by_uuid(clone_uuid)
    cloned = vdis_of(x, clone)
    assert len(cloned) == 2 and not set(cloned) & set(vdis_of(x, src))
    [clone_data] = [v for v in cloned if int(x.VDI.get_virtual_size(v)) == 4 * MiB]
    assert export(daemon, x.VDI.get_uuid(clone_data), tmp_path / "c.raw") == raw.read_bytes()

    # vm-copy onto another SR: full copies there.
    copy_uuid = xe_out(daemon, "vm-copy", "vm=source", "new-name-label=copied", f"sr-uuid={other}")
    copied = vdis_of(x, x.VM.get_by_uuid(copy_uuid))
    assert len(copied) == 2 and all(x.SR.get_uuid(x.VDI.get_SR(v)) == other for v in copied)
    [copy_data] = [v for v in copied if int(x.VDI.get_virtual_size(v)) == 4 * MiB]
    assert export(daemon, x.VDI.get_uuid(copy_data), tmp_path / "k.raw") == raw.read_bytes()

    # vm-uninstall asks for force=true, then removes the VM and the disks
    # only it uses; the source's disks stay.
    r = daemon.xe("vm-uninstall", "vm=cloned", check=1)
    assert "about to be destroyed" in r.stdout + r.stderr
    assert clone in x.VM.get_all()
    # A disk the clone shares with another VM is not its own.
    shared = xe_out(daemon, "vdi-create", f"sr-uuid={local}", "name-label=shared", "virtual-size=1MiB")
    daemon.xe("vbd-create", f"vm-uuid={clone_uuid}", "device=2", f"vdi-uuid={shared}", check=0)
    daemon.xe("vbd-create", f"vm-uuid={src_uuid}", "device=2", f"vdi-uuid={shared}", check=0)
    out = xe_out(daemon, "vm-uninstall", "vm=cloned", "force=true")
    assert out.startswith("The following items are about to be destroyed")
    assert out.endswith("All objects destroyed")
    assert out.count("VDI:") == 2
    assert clone not in x.VM.get_all()
    assert not set(cloned) & set(x.VDI.get_all())
    assert x.VDI.get_by_uuid(shared) and src_vdi in x.VDI.get_all()
    # vm-destroy keeps the disks.
    daemon.xe("vm-destroy", f"uuid={copy_uuid}", check=0)
    assert set(copied) <= set(x.VDI.get_all())


def test_provision_failure_undoes_its_disks(daemon):
    s = login(daemon)
    x = s.xenapi
    tpl = x.VM.get_by_name_label("Other install media")[0]
    custom = x.VM.clone(tpl, "two disks, one on a missing SR")
    x.VM.remove_from_other_config(custom, "disks")
    x.VM.add_to_other_config(custom, "disks",
                             '<provision><disk device="0" size="1073741824" sr="" bootable="true" type="system"/>'
                             '<disk device="1" size="1073741824" sr="00000000-0000-0000-0000-000000000000" '
                             'bootable="false" type="user"/></provision>')
    vdis_before = set(x.VDI.get_all())
    vm = x.VM.clone(custom, "half")
    err = failure(x.VM.provision, vm)
    assert err[0] == "VM_REQUIRES_SR", err
    assert set(x.VDI.get_all()) == vdis_before       # the first disk was undone
    assert x.VM.get_VBDs(vm) == []
    assert "disks" in x.VM.get_other_config(vm)
    # vm-install from that template leaves no VM behind either.
    r = daemon.xe("vm-install", "template=two disks, one on a missing SR", "new-name-label=broken")
    assert r.returncode == 1 and "access to an SR needed by the VM" in r.stderr, (r.stdout, r.stderr)
    assert "<not in database>" not in r.stderr and re.search(r"vm: [0-9a-f-]{36}\n", r.stderr), r.stderr
    assert x.VM.get_by_name_label("broken") == []
    assert set(x.VDI.get_all()) == vdis_before


def boot_media(tmp_path):
    """A FAT disk image with SYSLINUX and an ISO with ISOLINUX, both booting
    the test guest with `corral.boot=disk` / `corral.boot=cd` on its command
    line."""
    for tool in ("syslinux", "mcopy", "mkfs.vfat", "genisoimage"):
        if not shutil.which(tool):
            if os.environ.get("CORRAL_REQUIRE_QEMU") == "1":
                raise AssertionError(f"{tool} is missing (syslinux, isolinux, mtools, dosfstools, genisoimage)")
            pytest.skip(f"{tool} not installed")
    kernel, initrd = os.path.join(GUEST_DIR, "vmlinuz"), os.path.join(GUEST_DIR, "initrd.img")
    cfg = ("SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nLABEL linux\n  KERNEL /vmlinuz\n"
           "  APPEND initrd=/initrd.img console=ttyS0 quiet corral.boot={}\n")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.vfat", "-n", "CORRAL", str(disk)], check=True, capture_output=True)
    subprocess.run(["syslinux", "--install", str(disk)], check=True)
    (tmp_path / "syslinux.cfg").write_text(cfg.format("disk"))
    subprocess.run(["mcopy", "-i", str(disk), kernel, initrd, str(tmp_path / "syslinux.cfg"), "::"], check=True)
    tree = tmp_path / "iso"
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy("/usr/lib/ISOLINUX/isolinux.bin", tree / "isolinux")
    shutil.copy("/usr/lib/syslinux/modules/bios/ldlinux.c32", tree / "isolinux")
    shutil.copy(kernel, tree)
    shutil.copy(initrd, tree)
    (tree / "isolinux" / "isolinux.cfg").write_text(cfg.format("cd"))
    lib = tmp_path / "isos"
    lib.mkdir()
    subprocess.run(["genisoimage", "-quiet", "-o", str(lib / "boot.iso"), "-b", "isolinux/isolinux.bin",
                    "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
                    "-J", "-R", str(tree)], check=True)
    return disk, lib


def test_bios_boot_follows_hvm_boot_params_order(daemon, tmp_path):
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no QEMU")
    disk, lib = boot_media(tmp_path)
    s = login(daemon)
    x = s.xenapi
    host = x.host.get_all()[0]
    iso_sr = x.SR.create(host, {"location": str(lib)}, "0", "boot ISOs", "", "iso", "iso", True, {})
    [iso] = x.SR.get_VDIs(iso_sr)
    local = x.pool.get_default_SR(x.pool.get_all()[0])
    # A VM from the BIOS template with the disk image imported into its
    # VDI and the ISO in its CD drive.
    tpl = x.VM.get_by_name_label("Other install media")[0]
    vm = x.VM.clone(tpl, "bios")
    x.VM.set_is_a_template(vm, False)
    x.VM.set_memory_limits(vm, str(256 * MiB), str(256 * MiB), str(256 * MiB), str(256 * MiB))
    vdi = x.VDI.create({"name_label": "boot disk", "SR": local, "virtual_size": str(64 * MiB), "type": "system",
                        "sharable": False, "read_only": False, "other_config": {}})
    daemon.xe("vdi-import", f"uuid={x.VDI.get_uuid(vdi)}", f"filename={disk}", "format=raw", check=0)
    x.VBD.create({"VM": vm, "VDI": vdi, "userdevice": "0", "bootable": True, "mode": "RW", "type": "Disk",
                  "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    x.VBD.create({"VM": vm, "VDI": iso, "userdevice": "3", "bootable": False, "mode": "RO", "type": "CD",
                  "empty": False, "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {}})
    for order, want in (("dc", "cd"), ("cd", "disk")):
        # XenServer's letters: c = the first disk, d = the CD drive.
        x.VM.set_HVM_boot_params(vm, {"order": order})
        x.VM.start(vm, False, False)
        con = Console(daemon, x, s._session, vm)
        con.expect("corral-guest: ready", timeout=120)
        con.drain()
        con.send("echo boot$((1+1))=$(sed 's/.*corral.boot=//' /proc/cmdline)")
        assert con.expect(r"boot2=(\w+)\r?\n").group(1).decode() == want, order
        con.close()
        x.VM.hard_shutdown(vm)
        wait_power(x, vm, "Halted", 10)


def test_readme_quick_start_runs(daemon, tmp_path):
    """The README's "From nothing to a running VM" commands, run as written
    (apart from the interactive `xe console`)."""
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("no QEMU")
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    start = readme.index("    scripts/build-test-guest.sh\n")
    block = readme[start:readme.index("\n\n", start)]
    lines = [ln[4:] for ln in block.split("\n") if not ln.lstrip().startswith("xe console")]
    script = "\n".join(lines).replace("$HOME/.cache/corral/guest", GUEST_DIR)
    script = script.replace("/var/lib/corral", daemon.state_dir)
    script = script.replace("scripts/build-test-guest.sh", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                         "scripts", "build-test-guest.sh"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    cmd, env = daemon.xe_command()
    os.symlink(os.path.abspath(cmd[0]), bindir / "xe")
    env["PATH"] = f"{bindir}:{env['PATH']}"
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (script, r.stdout, r.stderr)
    # vm-list printed the VM Running; vm-shutdown then halted it.
    assert "demo" in r.stdout and "running" in r.stdout.lower(), r.stdout
    x = login(daemon).xenapi
    [vm] = x.VM.get_by_name_label("demo")
    assert x.VM.get_power_state(vm) == "Halted"


def test_sim_host_driver_says_so(tmp_path):
    """The simulator runs only when asked for (or without QEMU), and the host
    record and `xe host-list` say so; VM records still follow XAPI."""
    from conftest import Daemon
    d = Daemon(tmp_path / "sim")
    d.extra_config = "host-driver = sim\n"
    d.start()
    try:
        x = login(d).xenapi
        host = x.host.get_all()[0]
        assert x.host.get_software_version(host)["host_driver"] == "sim"
        assert "Simulated host (sim driver)" in d.xe("host-list", check=0).stdout
        tpl = x.VM.get_by_name_label("Linux direct kernel boot")[0]
        vm = x.VM.clone(tpl, "simulated")
        x.VM.set_is_a_template(vm, False)
        kernel = os.path.join(d.state_dir, "boot", "vmlinuz")   # never read by the simulator
        open(kernel, "wb").close()
        x.VM.set_PV_kernel(vm, kernel)
        x.VM.start(vm, False, False)
        assert x.VM.get_power_state(vm) == "Running"
        assert failure(x.VM.start, vm, False, False) == ["VM_BAD_POWER_STATE", vm, "halted", "running"]
        x.VM.hard_shutdown(vm)
        assert x.VM.get_power_state(vm) == "Halted"
    finally:
        d.stop()
    # Started again with QEMU installed and no driver named, it is a real
    # host once more and says nothing about simulation.
    if shutil.which("qemu-system-x86_64"):
        d.extra_config = ""
        d.start()
        try:
            x = login(d).xenapi
            host = x.host.get_all()[0]
            assert x.host.get_software_version(host)["host_driver"] == "qemu"
            assert "Simulated" not in d.xe("host-list", check=0).stdout
        finally:
            d.stop()


def test_provision_makes_a_vm_of_a_template_and_allowed_vbd_devices(daemon):
    """What Ansible's xenserver_guest needs: VM.provision leaves no
    half-made template, with or without other_config:disks, and
    VM.get_allowed_VBD_devices lists the free user devices."""
    x = login(daemon).xenapi
    tpl = x.VM.get_by_name_label("Other install media")[0]
    vm = x.VM.clone(tpl, "provisioned")
    assert x.VM.get_is_a_template(vm) is True
    # The template asks for a 32 GiB disk; without the ask, provision still
    # makes a VM of it.
    x.VM.remove_from_other_config(vm, "disks")
    x.VM.provision(vm)
    assert x.VM.get_is_a_template(vm) is False
    assert "start" in x.VM.get_allowed_operations(vm)
    assert x.VM.get_allowed_VBD_devices(vm) == [str(d) for d in range(16)]
    x.VBD.create({"VM": vm, "VDI": "OpaqueRef:NULL", "userdevice": "3", "bootable": False, "mode": "RO",
                  "type": "CD", "empty": True, "other_config": {}, "qos_algorithm_type": "",
                  "qos_algorithm_params": {}})
    assert x.VM.get_allowed_VBD_devices(vm) == [str(d) for d in range(16) if d != 3]
