"""The `nfs` SR driver against a real userspace NFS server (nfs-ganesha with
rpcbind, serving a temporary directory on loopback). corrald mounts nothing:
it uses QEMU's libnfs client for image data and an NFSv3 client for files."""
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest
import XenAPI

from test_storage import GiB, MiB, digest, failure, login, make_vdi, wait_for, write_pattern

GANESHA_CONF = """
NFS_CORE_PARAM {{ Protocols = 3, 4; Bind_Addr = 127.0.0.1; }}
NFSV4 {{ Graceless = true; }}
EXPORT {{
    Export_Id = 1; Path = {path}; Pseudo = {path};
    Access_Type = RW; Squash = No_Root_Squash; SecType = sys;
    Protocols = 3, 4; Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = WARN; }}
"""


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Ganesha:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="corral-nfs-")
        self.export = os.path.join(self.dir, "export")
        os.makedirs(self.export)
        self.conf = os.path.join(self.dir, "ganesha.conf")
        with open(self.conf, "w") as f:
            f.write(GANESHA_CONF.format(path=self.export))
        self.proc = None

    def start(self):
        if not port_open(111):
            subprocess.run(["rpcbind", "-w"], check=True)
        assert wait_for(lambda: port_open(111), 10), "rpcbind did not start"
        self.proc = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", self.conf, "-L", os.path.join(self.dir, "log"),
             "-p", os.path.join(self.dir, "pid"), "-N", "NIV_WARN"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ok = wait_for(lambda: port_open(2049) and subprocess.run(
            ["showmount", "-e", "127.0.0.1"], capture_output=True, text=True).stdout.count(self.export) > 0, 30)
        assert ok, "nfs-ganesha did not start: " + open(os.path.join(self.dir, "log")).read()[-2000:]

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        assert wait_for(lambda: not port_open(2049), 10)


@pytest.fixture(scope="module")
def nfs():
    if not shutil.which("ganesha.nfsd"):
        if os.environ.get("CORRAL_REQUIRE_NFS"):
            pytest.fail("nfs-ganesha is not installed")
        pytest.skip("nfs-ganesha is not installed")
    if port_open(2049):
        pytest.skip("port 2049 is taken by another NFS server")
    g = Ganesha()
    g.start()
    yield g
    g.stop()
    shutil.rmtree(g.dir, ignore_errors=True)


def nfs_sr(x, g, name="nfs SR"):
    host = x.host.get_all()[0]
    return x.SR.create(host, {"server": "127.0.0.1", "serverpath": g.export}, "0", name, "", "nfs", "user", True, {})


def local_image(g, x, vdi):
    """The image as an nfs:// URL: data goes through the server, as it does
    for corrald and QEMU (writing the export's files underneath the server
    would leave it with stale attributes)."""
    d = os.path.join(g.export, x.SR.get_uuid(x.VDI.get_SR(vdi)))
    loc = x.VDI.get_location(vdi)
    name = loc + ".qcow2" if os.path.exists(os.path.join(d, loc + ".qcow2")) else loc
    return f"nfs://127.0.0.1{d}/{name}"


def export_file(g, x, vdi):
    return os.path.join(g.export, x.SR.get_uuid(x.VDI.get_SR(vdi)), local_image(g, x, vdi).rsplit("/", 1)[1])


def test_probe_lists_exports_and_srs(daemon, nfs):
    x = login(daemon).xenapi
    host = x.host.get_all()[0]
    err = failure(x.SR.probe, host, {"server": "127.0.0.1"}, "nfs", {})
    assert err[0] == "SR_BACKEND_FAILURE_101" and err[1] == ""
    assert "<nfs-exports>" in err[3] and f"<Path>{nfs.export}</Path>" in err[3]
    assert "<Target>127.0.0.1</Target>" in err[3]
    assert failure(x.SR.probe, host, {}, "nfs", {})[0] == "SR_BACKEND_FAILURE_102"
    sr = nfs_sr(x, nfs)
    xml = x.SR.probe(host, {"server": "127.0.0.1", "serverpath": nfs.export}, "nfs", {})
    assert f"<UUID>{x.SR.get_uuid(sr)}</UUID>" in xml
    err = failure(x.SR.create, host, {"server": "127.0.0.1", "serverpath": nfs.export, "nfsversion": "4"}, "0",
                  "v4", "", "nfs", "user", True, {})
    assert err[0] == "SR_BACKEND_FAILURE_73" and "NFSv3" in err[3]
    uuid = x.SR.get_uuid(sr)
    x.PBD.unplug(x.SR.get_PBDs(sr)[0])
    x.SR.destroy(sr)
    assert not os.path.exists(os.path.join(nfs.export, uuid))


def test_nfs_vdis_snapshot_clone_coalesce_and_transfer(daemon, nfs, tmp_path):
    s = login(daemon)
    x, sid = s.xenapi, s._session
    sr = nfs_sr(x, nfs)
    rec = x.SR.get_record(sr)
    assert rec["shared"] and int(rec["physical_size"]) > 0
    assert x.PBD.get_currently_attached(rec["PBDs"][0])
    a = make_vdi(x, sr, 64 * MiB)
    path = local_image(nfs, x, a)
    assert os.path.getsize(export_file(nfs, x, a)) < 2 * MiB
    write_pattern(path, 0xA1)
    d1 = digest(path)
    snap = x.VDI.snapshot(a, {})
    assert digest(local_image(nfs, x, snap)) == d1
    write_pattern(local_image(nfs, x, a), 0xB2, offset=8 * MiB)
    d2 = digest(local_image(nfs, x, a))
    clone = x.VDI.clone(a, {})
    assert digest(local_image(nfs, x, clone)) == d2 and digest(local_image(nfs, x, snap)) == d1
    x.VDI.destroy(snap)
    x.VDI.destroy(clone)
    assert wait_for(lambda: all(r["managed"] for r in x.VDI.get_all_records().values()
                                if r["SR"] == sr)), "coalesced"
    assert digest(local_image(nfs, x, a)) == d2
    srdir = os.path.join(nfs.export, x.SR.get_uuid(sr))
    assert wait_for(lambda: sorted(f for f in os.listdir(srdir) if not f.startswith(".")) ==
                    [os.path.basename(export_file(nfs, x, a))])
    # Import/export through qemu-nbd on the nfs:// URL.
    import http.client
    src = tmp_path / "in.raw"
    src.write_bytes(os.urandom(2 * MiB) + bytes(6 * MiB))
    v = make_vdi(x, sr, 8 * MiB, "imp")
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=60)
    c.request("PUT", f"/import_raw_vdi?session_id={sid}&vdi={v}&format=raw", src.read_bytes(),
              {"Content-Length": str(src.stat().st_size)})
    assert c.getresponse().status == 200
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=60)
    c.request("GET", f"/export_raw_vdi?session_id={sid}&vdi={v}&format=raw")
    assert c.getresponse().read() == src.read_bytes()
    # VDI.copy from the local SR onto NFS and back.
    local = x.pool.get_default_SR(x.pool.get_all()[0])
    back = x.VDI.copy(a, local)
    assert digest(local_image_local(x, back)) == d2


def local_image_local(x, vdi):
    sr = x.VDI.get_SR(vdi)
    loc = x.PBD.get_device_config(x.SR.get_PBDs(sr)[0])["location"]
    return os.path.join(loc, x.VDI.get_location(vdi) + ".qcow2")


def test_nfs_server_going_away(daemon, nfs):
    x = login(daemon).xenapi
    sr = nfs_sr(x, nfs, "flaky")
    a = make_vdi(x, sr, 16 * MiB)
    write_pattern(local_image(nfs, x, a), 0x5C)
    before = digest(local_image(nfs, x, a))
    nfs.stop()
    try:
        err = failure(make_vdi, x, sr, 16 * MiB)
        assert err[0].startswith("SR_BACKEND_FAILURE_"), err
        err = failure(x.VDI.snapshot, a, {})
        assert err[0].startswith("SR_BACKEND_FAILURE_"), err
        assert failure(x.SR.scan, sr)[0].startswith("SR_BACKEND_FAILURE_")
    finally:
        nfs.start()
    x.SR.scan(sr)
    recs = [x.VDI.get_record(v) for v in x.SR.get_VDIs(sr)]
    srdir = os.path.join(nfs.export, x.SR.get_uuid(sr))
    files = sorted(f[:-6] if f.endswith(".qcow2") else f for f in os.listdir(srdir) if not f.startswith("."))
    assert files == sorted(r["location"] for r in recs)
    assert digest(local_image(nfs, x, a)) == before
    snap = x.VDI.snapshot(a, {})
    assert digest(local_image(nfs, x, snap)) == before


def test_iso_library_on_nfs_with_xe_mount_iso_sr(daemon, nfs, tmp_path):
    tool = shutil.which("genisoimage") or shutil.which("xorriso")
    if not tool:
        pytest.skip("genisoimage missing")
    lib = os.path.join(nfs.export, "isos")
    os.makedirs(lib, exist_ok=True)
    content = tmp_path / "c"
    content.mkdir()
    (content / "README").write_text("corral\n")
    args = [tool] + (["-as", "mkisofs"] if tool.endswith("xorriso") else []) + \
        ["-quiet", "-o", os.path.join(lib, "install.iso"), "-V", "INSTALL", str(content)]
    subprocess.run(args, check=True)
    script = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "xe-mount-iso-sr")
    from conftest import XE
    env = dict(os.environ, CORRAL_XAPI_SOCKET=daemon.socket,
               PATH=os.path.dirname(os.path.abspath(XE)) + os.pathsep + os.environ["PATH"])
    r = subprocess.run([script, f"127.0.0.1:{lib}", "name-label=ISOs"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    sr_uuid = r.stdout.strip()
    x = login(daemon).xenapi
    sr = x.SR.get_by_uuid(sr_uuid)
    rec = x.SR.get_record(sr)
    assert rec["type"] == "iso" and rec["content_type"] == "iso" and rec["shared"]
    assert x.PBD.get_device_config(rec["PBDs"][0])["location"] == f"nfs://127.0.0.1{lib}"
    [v] = rec["VDIs"]
    assert x.VDI.get_name_label(v) == "install.iso" and x.VDI.get_read_only(v)
    assert int(x.VDI.get_virtual_size(v)) == os.path.getsize(os.path.join(lib, "install.iso"))
    # QEMU reaches it by URL.
    info = subprocess.run(["qemu-img", "info", f"nfs://127.0.0.1{lib}/install.iso"], capture_output=True, text=True)
    assert info.returncode == 0 and "raw" in info.stdout
