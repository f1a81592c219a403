"""Ansible's community.general xenserver modules (from PyPI's `ansible`)
against corrald, as a new user would run them: a VM from a template with a
disk, a CD and two NICs, powered on, its IP address awaited, a NIC
hot-plugged, facts read over XAPI's local socket, the VM deleted."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT_PASSWORD, Daemon
from test_vm import guest, iso_sr, make_vm  # noqa: F401  (guest is a fixture)

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))


def ansible_ready():
    return os.path.exists(os.path.join(VENV_BIN, "ansible-playbook"))


@pytest.fixture
def ansible_daemon(tmp_path, netns):
    """corrald in a namespace of its own, serving XAPI's local socket path
    too (inside a private mount namespace, where the playbook runs)."""
    if not ansible_ready():
        if os.environ.get("CORRAL_REQUIRE_ANSIBLE"):
            pytest.fail("ansible-playbook is not installed in the test venv")
        pytest.skip("ansible is not installed in the test venv")
    ns = netns()
    xcp = tmp_path / "xcp"
    d = Daemon(tmp_path / "state")
    d.netns, d.ns = ns.name, ns
    d.extra_config = f"xapi-socket = {xcp}/xapi\n"
    d.start()
    d.xcp = str(xcp)
    yield d
    d.stop()
    d.kill_vms()


def playbook(d, tmp_path, name, tasks):
    """Runs `tasks` (YAML) against corrald; returns the results by task name."""
    conn = (f'{{hostname: "http://127.0.0.1:{d.http_port}", username: root, '
            f'password: "{ROOT_PASSWORD}", validate_certs: false}}')
    defaults = "".join(f"    community.general.{m}: {conn}\n"
                       for m in ("xenserver_guest", "xenserver_guest_info", "xenserver_guest_powerstate"))
    path = tmp_path / f"{name}.yml"
    path.write_text("- hosts: localhost\n  connection: local\n  gather_facts: false\n  module_defaults:\n"
                    + defaults + "  tasks:\n" + textwrap.indent(tasks, "    "))
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="json", ANSIBLE_LOCALHOST_WARNING="false",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_PYTHON_INTERPRETER=sys.executable,
               PATH=VENV_BIN + ":" + os.environ["PATH"], ANSIBLE_HOME=str(tmp_path / "ansible-home"))
    # XAPI's /var/lib/xcp/xapi is corrald's socket in this mount namespace only.
    script = (f"mount -t tmpfs none /var/lib && mkdir /var/lib/xcp && mount --bind {d.xcp} /var/lib/xcp && "
              f"exec ansible-playbook {path}")
    r = subprocess.run(["ip", "netns", "exec", d.netns, "unshare", "-m", "--propagation", "private",
                        "sh", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"ansible-playbook printed no JSON (exit {r.returncode}):\n{r.stdout}\n{r.stderr}")
    results = {}
    for play in out["plays"]:
        for t in play["tasks"]:
            results[t["task"]["name"]] = t["hosts"]["localhost"]
    failed = {k: v.get("msg") for k, v in results.items() if v.get("failed")}
    assert r.returncode == 0 and not failed, (failed, r.stderr[-3000:])
    return results


def test_ansible_xenserver_modules_end_to_end(ansible_daemon, guest, tmp_path):
    d = ansible_daemon
    x = d.sdk().xenapi
    iso_sr(x, tmp_path)
    for n in ("ans-net1", "ans-net2", "ans-net3"):
        x.network.create({"name_label": n, "name_description": "", "MTU": "1500", "other_config": {}})
    # The template the user's VMs come from: the test guest, eth0 at 198.18.21.5.
    tpl = make_vm(x, guest, "ans-template", args="console=ttyS0 quiet corral.ip.eth0=198.18.21.5/24", cd=False)
    x.VM.set_is_a_template(tpl, True)
    vm_task = textwrap.dedent("""\
        - name: {name}
          community.general.xenserver_guest:
            name: ans-vm
            template: ans-template
            state: {state}
            disks:
              - size_mb: 64
                name: ans-data
                sr: Local storage
            cdrom:
              type: iso
              iso_name: tools.iso
            networks:
        {nets}
            wait_for_ip_address: true
            state_change_timeout: 180
    """)
    two = "      - name: ans-net1\n      - name: ans-net2"
    res = playbook(d, tmp_path, "create", textwrap.dedent("""\
        - name: facts
          community.general.xenserver_facts:
    """) + vm_task.format(name="create", state="poweredon", nets=two)
                   + vm_task.format(name="again", state="poweredon", nets=two)
                   + vm_task.format(name="unchanged", state="present", nets=two))
    facts = res["facts"]["ansible_facts"]
    assert set(facts["xs_networks"]) >= {"ans-net1", "ans-net2", "ans-net3"}
    assert "ans-template" in facts["xs_vms"]
    created, again = res["create"], res["again"]
    assert created["changed"] is True
    inst = created["instance"]
    assert inst["state"] == "poweredon" and not inst["is_template"]
    assert inst["networks"][0]["ip"] == "198.18.21.5", inst["networks"]
    assert [n["name"] for n in inst["networks"]] == ["ans-net1", "ans-net2"]
    assert [n["mac"] for n in inst["networks"]][0] != [n["mac"] for n in inst["networks"]][1]
    assert any(disk["name"] == "ans-data" for disk in inst["disks"]), inst["disks"]
    assert inst["cdrom"]["iso_name"] == "tools.iso"
    assert again["changed"] is False, again
    # Run with state=present the module compares every setting: none differs.
    assert res["unchanged"]["changed"] is False, res["unchanged"].get("changes")
    vm = x.VM.get_by_name_label("ans-vm")[0]
    assert x.VM.get_is_a_template(vm) is False and x.VM.get_power_state(vm) == "Running"
    # A third NIC, hot-plugged into the running VM; then the VM goes.
    three = two + "\n      - name: ans-net3"
    res = playbook(d, tmp_path, "hotplug", vm_task.format(name="hotplug", state="present", nets=three) + textwrap.dedent("""\
        - name: info
          community.general.xenserver_guest_info:
            name: ans-vm
    """))
    assert res["hotplug"]["changed"] is True, res["hotplug"]
    assert x.VM.get_power_state(vm) == "Running"
    [vif3] = [v for v in x.VM.get_VIFs(vm) if x.network.get_name_label(x.VIF.get_network(v)) == "ans-net3"]
    assert x.VIF.get_currently_attached(vif3) is True
    nets = res["info"]["instance"]["networks"]
    assert [n["name"] for n in nets] == ["ans-net1", "ans-net2", "ans-net3"], nets
    res = playbook(d, tmp_path, "delete", textwrap.dedent("""\
        - name: delete
          community.general.xenserver_guest:
            name: ans-vm
            state: absent
            force: true
    """))
    assert res["delete"]["changed"] is True
    assert x.VM.get_by_name_label("ans-vm") == []
