"""The bash completion script, driven by a real bash against a real corrald."""
import os
import subprocess

from conftest import XE

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "contrib", "xe-completion.bash")


def complete(daemon, words):
    """COMPREPLY for a command line whose last word is being completed."""
    bindir = os.path.dirname(os.path.abspath(XE))
    line = " ".join(f"'{w}'" for w in words)
    script = f"""
        source '{SCRIPT}'
        COMP_WORDS=({line})
        COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
        _xe
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], CORRAL_XAPI_SOCKET=daemon.socket)
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_completes_commands_params_and_uuids(daemon):
    assert complete(daemon, ["xe", "vm-param-l"]) == ["vm-param-list"]
    assert "user-create" in complete(daemon, ["xe", "user-"])
    assert complete(daemon, ["xe", "user-create", "ro"]) == ["role="]
    assert set(complete(daemon, ["xe", "vm-list", "par"])) == {"params="}
    host_uuid = daemon.xe("host-list", "--minimal", "params=uuid", check=0).stdout.strip()
    assert complete(daemon, ["xe", "host-param-list", "uuid="]) == [f"uuid={host_uuid}"]
    assert complete(daemon, ["xe", "host-param-list", "uuid=" + host_uuid[:4]]) == [f"uuid={host_uuid}"]
    assert complete(daemon, ["xe", "host-param-list", "uuid=zzz"]) == []
