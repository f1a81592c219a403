"""The real Python SDK (PyPI XenAPI) against a real corrald."""
import http.client
import json
import ssl
import threading
import time

import pytest
import XenAPI

from conftest import ROOT_PASSWORD


def failure(fn):
    with pytest.raises(XenAPI.Failure) as e:
        fn()
    return e.value.details


def test_login_over_http_https_and_unix_socket(daemon):
    for url in (daemon.http, daemon.https):
        s = XenAPI.Session(url, ignore_ssl=True)
        s.login_with_password("root", ROOT_PASSWORD)
        assert s.xenapi.pool.get_all()
        s.xenapi.session.logout()
    # Socket callers are root: Ansible logs in with empty credentials.
    # pysdk turns '_' in the host into '/': reach our socket through a link
    # whose path has no underscores.
    import os, secrets
    link_dir = f"/tmp/corralsock-{secrets.token_hex(4)}"
    os.makedirs(link_dir)
    os.symlink(daemon.socket, f"{link_dir}/xapi")
    s = XenAPI.Session("http://" + f"{link_dir}/xapi".replace("/", "_") + "/", transport=XenAPI.UDSTransport())
    s.login_with_password("", "")
    host = s.xenapi.session.get_this_host(s._session)
    assert s.xenapi.host.get_record(host)["hostname"]
    s.xenapi.session.logout()


def test_pool_host_sm_and_templates(session):
    x = session.xenapi
    pool = x.pool.get_all()[0]
    master = x.pool.get_master(pool)
    host = x.host.get_record(master)
    assert host["API_version_major"] == "2" and host["API_version_minor"] == "21"
    version = host["software_version"]["product_version"]
    assert [int(p) for p in version.split(".")] and len(version.split(".")) == 3
    assert host["software_version"]["build_number"]
    assert int(host["cpu_info"]["cpu_count"]) >= 1
    metrics = x.host_metrics.get_record(host["metrics"])
    assert int(metrics["memory_total"]) > 0
    sms = {x.SM.get_type(r) for r in x.SM.get_all()}
    assert {"file", "ext", "nfs", "iso"} <= sms
    templates = [r for r, v in x.VM.get_all_records().items() if v["is_a_template"]]
    assert {x.VM.get_name_label(t) for t in templates} >= {"Other install media", "Linux direct kernel boot"}
    assert session.xenapi.session.get_this_host(session._session) == master


def test_clone_template_and_edit_fields_maps_sets(session):
    x = session.xenapi
    tpl = x.VM.get_by_name_label("Other install media")[0]
    vm = x.VM.clone(tpl, "web01")
    x.VM.set_is_a_template(vm, False)
    rec = x.VM.get_record(vm)
    assert rec["name_label"] == "web01" and rec["is_a_template"] is False and rec["power_state"] == "Halted"
    assert rec["uuid"] != x.VM.get_uuid(tpl)
    assert x.VM.get_by_uuid(rec["uuid"]) == vm
    x.VM.set_name_description(vm, "front end")
    x.VM.set_memory_static_max(vm, "1073741824")
    assert x.VM.get_memory_static_max(vm) == "1073741824"
    x.VM.add_to_other_config(vm, "folder", "/web")
    assert failure(lambda: x.VM.add_to_other_config(vm, "folder", "/x")) == [
        "MAP_DUPLICATE_KEY", "VM", "other_config", rec["uuid"], "folder"]
    x.VM.remove_from_other_config(vm, "absent-key")  # not an error
    x.VM.remove_from_other_config(vm, "folder")
    assert "folder" not in x.VM.get_other_config(vm)
    x.VM.add_tags(vm, "prod")
    x.VM.add_tags(vm, "prod")  # duplicate add is a no-op
    assert x.VM.get_tags(vm) == ["prod"]
    x.VM.remove_tags(vm, "prod")
    assert x.VM.get_tags(vm) == []
    assert vm in x.VM.get_all_records_where('field "name__label"="web01"')
    assert x.VM.get_all_records_where('field "name__label"="nobody"') == {}


def test_exact_errors(daemon, session):
    x = session.xenapi
    assert failure(lambda: x.VM.get_record("OpaqueRef:nope")) == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]
    assert failure(lambda: x.VM.get_by_uuid("bad-uuid")) == ["UUID_INVALID", "VM", "bad-uuid"]
    assert failure(lambda: x.VM.get_record()) == ["MESSAGE_PARAMETER_COUNT_MISMATCH", "VM.get_record", "1", "0"]
    assert failure(lambda: x.VM.no_such_message()) == ["MESSAGE_METHOD_UNKNOWN", "VM.no_such_message"]
    assert failure(lambda: x.VM.set_is_a_template(x.VM.get_all()[0], "yes"))[0] == "FIELD_TYPE_ERROR"
    assert failure(lambda: x.VM.get_all_records_where('field "uuid'))[0] == "INVALID_VALUE"
    s = XenAPI.Session(daemon.http)
    assert failure(lambda: s.login_with_password("root", "wrong"))[0] == "SESSION_AUTHENTICATION_FAILED"
    # A dead session: the raw proxy sees SESSION_INVALID (the SDK would re-login).
    proxy = XenAPI.xmlrpclib.ServerProxy(daemon.http)
    r = proxy.VM.get_all("OpaqueRef:dead")
    assert r["Status"] == "Failure" and r["ErrorDescription"] == ["SESSION_INVALID", "OpaqueRef:dead"]


def test_rbac_denial_and_local_users(daemon, session):
    x = session.xenapi
    x.user.create_local("olivia", "Olivia Operator", "pw-olivia", "vm-operator")
    s = XenAPI.Session(daemon.http)
    s.login_with_password("olivia", "pw-olivia")
    vm = s.xenapi.VM.get_all()[0]
    assert s.xenapi.VM.get_name_label(vm)  # read-only access works
    assert failure(lambda: s.xenapi.VM.set_name_label(vm, "x")) == [
        "RBAC_PERMISSION_DENIED", "vm.set_name_label",
        "No permission in user session. (Roles with this permission: pool-admin, pool-operator, vm-power-admin, vm-admin)"]
    s.xenapi.VM.add_tags(vm, "ok-for-vm-operator")
    assert failure(lambda: s.xenapi.user.create_local("x", "", "p", "pool-admin"))[0] == "RBAC_PERMISSION_DENIED"
    # Password hashes never leave the server.
    u = [r for r in x.user.get_all_records().values() if r["short_name"] == "olivia"][0]
    assert "password_hash" not in u and all("argon2" not in str(v) for v in u.values())


def test_password_change(daemon):
    s = XenAPI.Session(daemon.http)
    s.login_with_password("root", ROOT_PASSWORD)
    s.xenapi.session.change_password(ROOT_PASSWORD, "new-pw")
    t = XenAPI.Session(daemon.http)
    assert failure(lambda: t.login_with_password("root", ROOT_PASSWORD))[0] == "SESSION_AUTHENTICATION_FAILED"
    t.login_with_password("root", "new-pw")
    t.xenapi.session.change_password("new-pw", ROOT_PASSWORD)


def test_event_from_is_woken_by_another_session(daemon, session):
    x = session.xenapi
    pool = x.pool.get_all()[0]
    first = x.event["from"](["pool"], "", 1.0) if False else getattr(x.event, "from")(["pool"], "", 1.0)
    assert [e["operation"] for e in first["events"]] == ["add"]
    assert first["events"][0]["class"] == "pool" and "snapshot" in first["events"][0]
    assert int(first["valid_ref_counts"]["task"]) >= 0
    token = first["token"]
    other = XenAPI.Session(daemon.http)
    other.login_with_password("root", ROOT_PASSWORD)

    def edit():
        time.sleep(0.5)
        other.xenapi.pool.add_to_other_config(pool, "xo:barrier:1", "1")

    threading.Thread(target=edit).start()
    t0 = time.time()
    got = getattr(x.event, "from")(["pool"], token, 30.0)
    assert time.time() - t0 < 10
    ev = got["events"]
    assert len(ev) == 1 and ev[0]["operation"] == "mod" and ev[0]["ref"] == pool
    assert ev[0]["snapshot"]["other_config"]["xo:barrier:1"] == "1"
    # Timeout with nothing new: empty events and a token.
    quiet = getattr(x.event, "from")(["pool"], got["token"], 0.2)
    assert quiet["events"] == [] and quiet["token"]
    # inject returns a token before the touch, so the next from sees it.
    tok = x.event.inject("pool", pool)
    again = getattr(x.event, "from")(["pool"], tok, 5.0)
    assert [e["operation"] for e in again["events"]] == ["mod"]
    assert failure(lambda: getattr(x.event, "from")(["pool"], "not-a-token", 1.0))[0] == "EVENT_FROM_TOKEN_PARSE_FAILURE"
    # create + delete in one window coalesce to nothing; delete alone is del.
    tpl = x.VM.get_by_name_label("Other install media")[0]
    t1 = getattr(x.event, "from")(["vm"], "", 0.1)["token"]
    a = x.VM.clone(tpl, "ephemeral")
    x.VM.destroy(a)
    b = x.VM.clone(tpl, "kept")
    evs = getattr(x.event, "from")(["vm"], t1, 1.0)["events"]
    assert [(e["operation"], e["ref"]) for e in evs if e["ref"] in (a, b)] == [("add", b)]
    # The template's derived `children` set changed, so it has a mod event too.
    assert ("mod", tpl) in [(e["operation"], e["ref"]) for e in evs]
    t2 = getattr(x.event, "from")(["vm"], "", 0.1)["token"]
    x.VM.destroy(b)
    evs = [e for e in getattr(x.event, "from")(["vm"], t2, 1.0)["events"] if e["ref"] == b]
    assert [(e["operation"], e["ref"]) for e in evs] == [("del", b)] and "snapshot" not in evs[0]


def test_legacy_register_next(session):
    x = session.xenapi
    x.event.register(["vm"])
    tpl = x.VM.get_by_name_label("Other install media")[0]
    vm = x.VM.clone(tpl, "n1")
    evs = x.event.next()
    assert any(e["ref"] == vm and e["operation"] == "add" for e in evs)
    x.event.unregister(["vm"])


def test_async_call_and_task_result(session):
    x = session.xenapi
    tpl = x.VM.get_by_name_label("Other install media")[0]
    task = x.Async.VM.clone(tpl, "async-clone")
    for _ in range(100):
        if x.task.get_status(task) != "pending":
            break
        time.sleep(0.05)
    rec = x.task.get_record(task)
    assert rec["status"] == "success" and rec["progress"] == 1.0
    assert rec["result"].startswith("<value>OpaqueRef:") and rec["result"].endswith("</value>")
    new_vm = rec["result"][len("<value>"):-len("</value>")]
    assert x.VM.get_name_label(new_vm) == "async-clone"
    x.task.destroy(task)
    # A failing async call records error_info.
    task = x.Async.VM.clone("OpaqueRef:nope", "x")
    for _ in range(100):
        if x.task.get_status(task) != "pending":
            break
        time.sleep(0.05)
    assert x.task.get_status(task) == "failure"
    assert x.task.get_error_info(task) == ["HANDLE_INVALID", "VM", "OpaqueRef:nope"]
    # No async form for getters.
    assert failure(lambda: x.Async.VM.get_name_label(tpl))[0] == "Fault"
    # Client-created tasks can be cancelled.
    t = x.task.create("upload", "client task")
    x.task.cancel(t)
    assert x.task.get_status(t) == "cancelled"


def test_messages(session):
    x = session.xenapi
    host_uuid = x.host.get_uuid(x.host.get_all()[0])
    m = x.message.create("TEST_ALERT", "3", "Host", host_uuid, "hello")
    recs = x.message.get_since("20000101T00:00:00Z")
    assert m in recs and recs[m]["name"] == "TEST_ALERT" and recs[m]["priority"] == "3"
    assert m in x.message.get_all()
    x.message.destroy(m)
    assert m not in x.message.get_all()


def raw(daemon, path, body, ctype="text/xml"):
    c = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    c.request("POST", path, body=body, headers={"Content-Type": ctype})
    r = c.getresponse()
    data = r.read()
    return r.status, r.getheader("Content-Type"), data


def test_jsonrpc_v1_and_v2(daemon):
    st, ct, data = raw(daemon, "/jsonrpc", json.dumps({"jsonrpc": "2.0", "id": 0, "method": "session.login_with_password", "params": ["root", ROOT_PASSWORD]}), "application/json")
    assert st == 200 and ct == "application/json"
    reply = json.loads(data)
    assert set(reply) == {"jsonrpc", "result", "id"} and reply["id"] == 0
    sess = reply["result"]
    _, _, data = raw(daemon, "/jsonrpc", json.dumps({"jsonrpc": "2.0", "id": "a", "method": "VM.get_record", "params": [sess, "OpaqueRef:x"]}))
    reply = json.loads(data)
    assert reply == {"jsonrpc": "2.0", "error": {"code": 1, "message": "HANDLE_INVALID", "data": ["VM", "OpaqueRef:x"]}, "id": "a"}
    _, _, data = raw(daemon, "/jsonrpc", json.dumps({"id": 7, "method": "host.get_all_records", "params": [sess]}))
    reply = json.loads(data)
    assert reply["error"] is None and reply["id"] == 7
    h = list(reply["result"].values())[0]
    assert isinstance(h["API_version_major"], int)  # ints are numbers in JSON
    _, _, data = raw(daemon, "/jsonrpc", json.dumps({"id": 8, "method": "VM.get_all", "params": ["OpaqueRef:dead"]}))
    assert json.loads(data)["error"] == ["SESSION_INVALID", "OpaqueRef:dead"]


def test_list_methods_and_bad_input_keeps_serving(daemon, session):
    methods = XenAPI.xmlrpclib.ServerProxy(daemon.http).system.listMethods()
    assert "VM.get_all_records" in methods and "session.login_with_password" in methods
    assert "event.from" in methods and "VM.get_all_records_where" in methods
    for body in [b"<methodCall><methodName>x", b"not xml at all", b"\xff\xfe<bad utf8>", b"<methodCall></methodCall>"]:
        st, _, _ = raw(daemon, "/RPC2", body)
        assert st in (200, 500)
    st, _, _ = raw(daemon, "/jsonrpc", b'{"method":"VM.get_all","params":[]}', "application/json")
    assert st == 500  # no id
    st, _, _ = raw(daemon, "/jsonrpc", b'{"method":', "application/json")
    assert st == 500
    import socket
    sk = socket.create_connection(("127.0.0.1", daemon.http_port))
    sk.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 400000\r\n\r\n")
    assert sk.recv(100).startswith(b"HTTP/1.1 413")
    sk.close()
    # Wrong parameter types and nested garbage give API errors.
    st, _, data = raw(daemon, "/", XenAPI.xmlrpclib.dumps((session._session, "OpaqueRef:x", [1, 2]), "VM.set_name_label").encode())
    assert st == 200 and b"FIELD_TYPE_ERROR" in data
    assert session.xenapi.pool.get_all()  # still serving


def test_crash_safety_acknowledged_writes_survive_sigkill(tmp_path):
    from conftest import Daemon
    d = Daemon(tmp_path / "crash").start()
    s = XenAPI.Session(d.http)
    s.login_with_password("root", ROOT_PASSWORD)
    pool = s.xenapi.pool.get_all()[0]
    acked = []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            try:
                s.xenapi.pool.add_to_other_config(pool, f"k{i}", str(i))
            except Exception:
                return
            acked.append(i)
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    time.sleep(1.5)
    d.kill9()
    stop.set()
    th.join()
    assert len(acked) > 10
    d.start()
    s2 = XenAPI.Session(d.http)
    s2.login_with_password("root", ROOT_PASSWORD)
    oc = s2.xenapi.pool.get_other_config(s2.xenapi.pool.get_all()[0])
    missing = [i for i in acked if oc.get(f"k{i}") != str(i)]
    assert missing == []
    d.stop()
