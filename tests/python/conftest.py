"""Starts a real corrald for the tests: temp state dir, free ports."""
import os
import signal
import socket
import subprocess
import time

import pytest

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "target"))
CORRALD = os.environ.get("CORRALD", os.path.join(TARGET, "debug", "corrald"))
XE = os.environ.get("XE", os.path.join(TARGET, "debug", "xe"))
ROOT_PASSWORD = "corral-test-pw"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def login(daemon, user="root", pw=ROOT_PASSWORD):
    """A real SDK session on the daemon's HTTP port."""
    import XenAPI
    s = XenAPI.Session(daemon.http)
    s.login_with_password(user, pw, "1.0", "pytest")
    return s


def failure(fn, *args):
    """The error description of a call that must fail."""
    import XenAPI
    with pytest.raises(XenAPI.Failure) as e:
        fn(*args)
    return e.value.details


class Daemon:
    def __init__(self, state_dir):
        self.state_dir = str(state_dir)
        self.http_port = free_port()
        self.https_port = free_port()
        self.proc = None
        self.extra_config = ""   # more `key = value` lines for corrald's --config
        self.log_level = "warn"
        self.nofile = None   # an RLIMIT_NOFILE for corrald
        # The test guest's kernel is booted from where the build script keeps it.
        self.boot_dirs = os.environ.get("CORRAL_GUEST_DIR", os.path.expanduser("~/.cache/corral/guest"))
        # A network namespace to run in (its bridges and taps stay there);
        # the test then reaches corrald through its unix socket only.
        self.netns = None

    @property
    def socket(self):
        return os.path.join(self.state_dir, "xapi.sock")

    @property
    def http(self):
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https(self):
        return f"https://127.0.0.1:{self.https_port}"

    def start(self, umask=None):
        cfg = os.path.join(self.state_dir, "test.conf")
        os.makedirs(self.state_dir, exist_ok=True)
        with open(cfg, "w") as f:
            # The first mention of a key wins: the test's own lines come first.
            f.write(self.extra_config + "failed-login-delay-ms = 10\nlogin-failures-per-minute = 1000\n"
                    f"accel = tcg\nboot-dirs = {self.boot_dirs}\n")
        env = dict(os.environ, CORRAL_ROOT_PASSWORD=ROOT_PASSWORD, CORRAL_LOG=self.log_level)
        old_umask = None if umask is None else os.umask(umask)
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            prefix + [CORRALD, "--state-dir", self.state_dir, "--listen", f"127.0.0.1:{self.http_port}",
                      "--tls-listen", f"127.0.0.1:{self.https_port}", "--config", cfg],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.state_dir, "stderr"), "a"),
            preexec_fn=None if self.nofile is None else self._limit_fds)
        if old_umask is not None:
            os.umask(old_umask)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                if self.netns:
                    self.connect_unix().close()
                    return self
                socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2).close()
                if os.path.exists(self.socket):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("corrald exited: " + open(os.path.join(self.state_dir, "stderr")).read())
            time.sleep(0.05)
        raise RuntimeError("corrald did not start")

    def connect_unix(self, timeout=0.2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.socket)
        except OSError:
            s.close()
            raise
        return s

    def sdk(self, user="root", pw=ROOT_PASSWORD):
        """An SDK session over the unix socket (works from any namespace)."""
        import XenAPI
        s = XenAPI.Session("http://localhost/", transport=UnixTransport(self.socket))
        s.login_with_password(user, pw, "1.0", "pytest")
        return s

    def _limit_fds(self):
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill_vms(self):
        """QEMUs outlive corrald by design; tests clean up after themselves."""
        subprocess.run(["pkill", "-9", "-f", self.vm_dir + "/"], check=False)

    @property
    def vm_dir(self):
        return os.path.realpath(os.path.join(self.state_dir, "vms"))

    def xe_command(self, server=None):
        """xe's argv prefix and environment: local socket, or http/https."""
        env = dict(os.environ, CORRAL_XAPI_SOCKET=self.socket)
        env.pop("XE_EXTRA_ARGS", None)
        cmd = [XE]
        if server == "https":
            cmd += ["-s", "127.0.0.1", "-p", str(self.https_port), "-u", "root", "-pw", ROOT_PASSWORD]
        elif server == "http":
            cmd += ["-s", "127.0.0.1", "-p", str(self.http_port), "--nossl", "-u", "root", "-pw", ROOT_PASSWORD]
        return cmd, env

    def xe(self, *args, server=None, check=None):
        cmd, env = self.xe_command(server)
        r = subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=30)
        if check is not None:
            assert r.returncode == check, (r.returncode, r.stdout, r.stderr)
        return r


class UnixTransport:
    """xmlrpc transport over corrald's unix socket."""

    def __new__(cls, path):
        import http.client
        import xmlrpc.client

        class Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)

        class Transport(xmlrpc.client.Transport):
            def make_connection(self, host):
                return Conn("localhost")

        return Transport()


class Netns:
    """A network namespace a test made, with helpers to run commands in it."""

    def __init__(self, name):
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd, check=True):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=check,
                              capture_output=True, text=True, timeout=30)

    def links(self):
        """Interface name -> (master or None) in the namespace."""
        import json
        out = json.loads(self.run("ip", "-j", "link", "show").stdout)
        return {l["ifname"]: l.get("master") for l in out}

    def delete(self):
        subprocess.run(["ip", "netns", "del", self.name], check=False)


_netns_count = [0]


@pytest.fixture
def netns():
    """Makes network namespaces (addresses from 198.18.0.0/15, no route out);
    each is deleted afterwards."""
    made = []

    def make():
        _netns_count[0] += 1
        n = Netns(f"corral-t{os.getpid()}-{_netns_count[0]}")
        made.append(n)
        return n

    yield make
    for n in made:
        n.delete()


@pytest.fixture
def netns_daemon(tmp_path, netns):
    """corrald in a network namespace of its own; its VMs' bridges and taps
    are made there."""
    ns = netns()
    d = Daemon(tmp_path / "state")
    d.netns = ns.name
    d.ns = ns
    d.start()
    yield d
    d.stop()
    d.kill_vms()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state").start()
    yield d
    d.stop()
    d.kill_vms()


@pytest.fixture
def make_daemon(tmp_path):
    """Starts corralds with their own settings; all are stopped afterwards."""
    made = []

    def make(extra_config="", log_level="warn", umask=None, nofile=None):
        d = Daemon(tmp_path / f"state{len(made)}")
        d.extra_config, d.log_level, d.nofile = extra_config, log_level, nofile
        made.append(d)
        return d.start(umask=umask)

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def session(daemon):
    import XenAPI
    s = XenAPI.Session(daemon.http)
    s.login_with_password("root", ROOT_PASSWORD, "1.0", "pytest")
    yield s
    try:
        s.xenapi.session.logout()
    except Exception:
        pass
