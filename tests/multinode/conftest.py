"""Two "hosts" on this machine: an sshd of the test's own, listening only on 127.0.0.1 and 127.0.0.2 (a free
port, a throw-away root key, no passwords), and pdsh, so a two-line hostfile drives DeepSpeed's real multi-node
(pdsh) runner. Debian packages openssh-server and pdsh are installed when missing (CI runs as root); where that
is impossible the tests skip with the reason. Traffic goes to loopback addresses only."""
import os
import shutil
import signal
import subprocess
import time

import pytest

from dist_utils import free_port

MARK_BEGIN, MARK_END = "# >>> megatron_ov3 multinode tests", "# <<< megatron_ov3 multinode tests"
SSH_CONFIG = os.path.expanduser("~/.ssh/config")
MISMATCH = "ov3-other-software"  # an alias of 127.0.0.2 whose processes get a simulated other software build


def _ensure_packages():
    """openssh-server and pdsh (needed), openmpi-bin (for the --launcher openmpi test), from Debian."""
    if shutil.which("pdsh") and os.path.exists("/usr/sbin/sshd") and shutil.which("mpirun"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "openssh-server and pdsh are missing and cannot be installed (not root or no apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "openssh-server", "pdsh", "openmpi-bin"]
    for cmd in (["apt-get", "update", "-q"], install):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0 and cmd[1] == "install":
            return f"apt-get install openssh-server pdsh openmpi-bin failed: {r.stderr.strip().splitlines()[-1:]}"
    return None


def _write_ssh_config(port: int, key: str) -> None:
    os.makedirs(os.path.dirname(SSH_CONFIG), mode=0o700, exist_ok=True)
    old = open(SSH_CONFIG).read() if os.path.exists(SSH_CONFIG) else ""
    block = "\n".join([
        MARK_BEGIN,
        f"Host {MISMATCH}",
        "    HostName 127.0.0.2",
        "    SetEnv OV3_SIMULATE_SOFTWARE=other-build",
        f"Host 127.0.0.1 127.0.0.2 127.0.0.3 {MISMATCH}",
        f"    Port {port}", f"    IdentityFile {key}", "    IdentitiesOnly yes", "    BatchMode yes",
        "    StrictHostKeyChecking no", "    UserKnownHostsFile /dev/null", "    LogLevel ERROR",
        "    ConnectTimeout 10",
        MARK_END, ""])
    with open(SSH_CONFIG, "w") as f:
        f.write(block + _without_block(old))
    os.chmod(SSH_CONFIG, 0o600)


def _without_block(text: str) -> str:
    if MARK_BEGIN not in text:
        return text
    head, rest = text.split(MARK_BEGIN, 1)
    return head + rest.split(MARK_END, 1)[-1].lstrip("\n")


@pytest.fixture(scope="session")
def two_hosts(tmp_path_factory):
    """{"port", "mismatch_host"}: ~/.ssh/config reaches 127.0.0.1, 127.0.0.2 and ``mismatch_host`` (127.0.0.2 with a
    simulated other software build) without a password."""
    reason = _ensure_packages()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("sshd")
    key, host_key = str(d / "id_ed25519"), str(d / "host_ed25519")
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True, timeout=30)
    (d / "authorized_keys").write_text(open(key + ".pub").read())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", "ListenAddress 127.0.0.2", f"HostKey {host_key}",
        f"PidFile {d / 'sshd.pid'}", f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
        "AcceptEnv OV3_SIMULATE_SOFTWARE", "PrintMotd no", ""]))
    os.makedirs("/run/sshd", exist_ok=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True, timeout=30)
    _write_ssh_config(port, key)
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            deadline = time.time() + 20
            while subprocess.run(["ssh", host, "true"], capture_output=True, timeout=30).returncode != 0:
                if time.time() > deadline:
                    pytest.skip(f"the test sshd does not answer on {host}: {(d / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.5)
        yield {"port": port, "mismatch_host": MISMATCH}
    finally:
        try:
            os.kill(int((d / "sshd.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        if os.path.exists(SSH_CONFIG):
            with open(SSH_CONFIG) as f:
                rest = _without_block(f.read())
            with open(SSH_CONFIG, "w") as f:
                f.write(rest)
