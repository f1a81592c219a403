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
        self.proc = subprocess.Popen(
            [CORRALD, "--state-dir", self.state_dir, "--listen", f"127.0.0.1:{self.http_port}",
             "--tls-listen", f"127.0.0.1:{self.https_port}", "--config", cfg],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.state_dir, "stderr"), "a"),
            preexec_fn=None if self.nofile is None else self._limit_fds)
        if old_umask is not None:
            os.umask(old_umask)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2).close()
                if os.path.exists(self.socket):
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("corrald exited: " + open(os.path.join(self.state_dir, "stderr")).read())
            time.sleep(0.05)
        raise RuntimeError("corrald did not start")

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
