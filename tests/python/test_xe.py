"""xe against a real corrald: golden output for list, param and error output."""
import re


def normalise(text, daemon):
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<uuid>", text)
    return text


def test_template_list_golden(daemon):
    r = daemon.xe("template-list", check=0)
    assert normalise(r.stdout, daemon) == (
        "uuid ( RO)                : <uuid>\n"
        "          name-label ( RW): Other install media\n"
        "    name-description ( RW): Template for installing an operating system from install media (BIOS boot).\n"
        "\n\n"
        "uuid ( RO)                : <uuid>\n"
        "          name-label ( RW): Linux direct kernel boot\n"
        "    name-description ( RW): Template for a Linux guest booted from a kernel and initrd on the host (PV_kernel, PV_ramdisk, PV_args).\n"
        "\n\n"
    )


def test_minimal_and_params(daemon):
    assert daemon.xe("sm-list", "params=type", "--minimal", check=0).stdout == "file,ext,nfs,iso\n"
    uuids = daemon.xe("template-list", "--minimal", check=0).stdout.strip().split(",")
    assert len(uuids) == 2
    r = daemon.xe("template-list", "name-label=Other install media", "params=name-label", check=0)
    assert r.stdout == "name-label ( RW)    : Other install media\n\n\n"
    assert daemon.xe("vm-list", check=0).stdout == ""  # templates are not VMs


def test_param_get_set_add_remove_clear(daemon):
    t = daemon.xe("template-list", "name-label=Other install media", "--minimal", check=0).stdout.strip()
    daemon.xe("template-param-set", f"uuid={t}", "name-description=edited", "other-config:owner=ops", check=0)
    assert daemon.xe("template-param-get", f"uuid={t}", "param-name=name-description", check=0).stdout == "edited\n"
    assert daemon.xe("template-param-get", f"uuid={t}", "param-name=other-config", "param-key=owner", check=0).stdout == "ops\n"
    daemon.xe("template-param-add", f"uuid={t}", "param-name=tags", "param-key=gold", check=0)
    assert daemon.xe("template-param-get", f"uuid={t}", "param-name=tags", check=0).stdout == "gold\n"
    r = daemon.xe("template-param-remove", f"uuid={t}", "param-name=tags", "param-key=silver", check=1)
    assert r.stderr == "Key silver is not in the set\n"
    daemon.xe("template-param-remove", f"uuid={t}", "param-name=other-config", "param-key=owner", check=0)
    r = daemon.xe("template-param-get", f"uuid={t}", "param-name=other-config", "param-key=owner", check=1)
    assert r.stderr == "Key owner not found in map\n"
    daemon.xe("template-param-clear", f"uuid={t}", "param-name=tags", check=0)
    assert daemon.xe("template-param-get", f"uuid={t}", "param-name=tags", check=0).stdout == "\n"
    lines = daemon.xe("template-param-list", f"uuid={t}", check=0).stdout.splitlines()
    assert lines[0].startswith("uuid ( RO)") and any(l.strip().startswith("power-state ( RO): halted") for l in lines)
    width = lines[0].index(":")
    assert all(l.index(":") == width for l in lines if l)


def test_error_output(daemon):
    r = daemon.xe("vm-param-list", "uuid=nope", check=1)
    assert r.stdout == ""
    assert r.stderr == "The uuid you supplied was invalid.\ntype: VM\nuuid: nope\n"
    r = daemon.xe("no-such-command", check=1)
    assert r.stderr == "Unknown command: no-such-command\nFor usage run: 'xe help'\n"
    t = daemon.xe("template-list", "--minimal", check=0).stdout.strip().split(",")[0]
    r = daemon.xe("template-param-set", f"uuid={t}", "VCPUs-max=lots", check=1)
    assert r.stderr == "Parameter VCPUs-max must be an integer\n"
    r = daemon.xe("template-param-set", f"uuid={t}", "power-state=Running", check=1)
    assert r.stderr == "Field 'power-state' is read-only.\n"


def test_remote_https_http_and_bad_password(daemon):
    assert daemon.xe("host-list", "--minimal", server="https", check=0).stdout.strip()
    assert daemon.xe("host-list", "--minimal", server="http", check=0).stdout.strip()
    import subprocess, os
    from conftest import XE
    r = subprocess.run([XE, "-s", "127.0.0.1", "-p", str(daemon.https_port), "-u", "root", "-pw", "wrong", "host-list"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == "Authentication failed\n"


def test_users_and_password_change(daemon):
    daemon.xe("user-create", "user-name=rita", "password-new=pw1", "role=read-only", check=0)
    import subprocess
    from conftest import XE
    base = [XE, "-s", "127.0.0.1", "-p", str(daemon.https_port), "-u", "rita"]
    assert subprocess.run(base + ["-pw", "pw1", "host-list", "--minimal"], capture_output=True, text=True).returncode == 0
    r = subprocess.run(base + ["-pw", "pw1", "pool-param-set", "uuid=" + daemon.xe("pool-list", "--minimal", check=0).stdout.strip(), "name-label=x"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("RBAC permission denied.\npermission: pool.set_name_label\n")
    r = subprocess.run(base + ["-pw", "pw1", "user-password-change", "old=pw1", "new=pw2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(base + ["-pw", "pw2", "host-list"], capture_output=True, text=True).returncode == 0


def test_help(daemon):
    r = daemon.xe("help", check=0)
    assert "vm-list" in r.stdout and "user-password-change" in r.stdout
    r = daemon.xe("help", "vm-param-get", check=0)
    assert "reqd params     : uuid, param-name" in r.stdout
    r = daemon.xe("help", "vm-param-list", check=0)
    assert "description     : Lists all the parameters of the object" in r.stdout
    r = daemon.xe("help", "vm-list", check=0)
    assert "optional params : params" in r.stdout
