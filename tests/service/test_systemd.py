"""The unit file and the installer, checked by systemd's own tools, installed into a scratch
root (never this machine's /etc)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEVICES = Path(__file__).resolve().parents[2] / "devices"
UNIT = DEVICES / "edgestream.service"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("EDGESTREAM_SYSTEM_TESTS") == "required":
            pytest.fail(f"{tool} is missing: bash devices/setup.sh test installs it")
        pytest.skip(f"needs {tool} (Debian: apt install systemd passwd)")
    return path


def scratch_root(root: Path) -> Path:
    """An /etc with root, a video group (as on Jetson) and no audio group or edgestream user."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\nvideo:x:44:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\nvideo:*::\n")
    for f in ("shadow", "gshadow"):
        (etc / f).chmod(0o600)
    return root


def install(root: Path, *args: str) -> subprocess.CompletedProcess:
    need("useradd")
    need("systemctl")
    return subprocess.run(["bash", str(DEVICES / "install.sh"), "--root", str(root),
                           "--pip-arg", "--no-deps", *args],
                          capture_output=True, text=True, timeout=600)


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and \
            not path.is_symlink() else os.readlink(path) if path.is_symlink() else ""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                            digest)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Path:
    root = scratch_root(tmp_path_factory.mktemp("root"))
    first = install(root, "--bundle", str(tiny_bundle), "--kiosk")
    assert first.returncode == 0, first.stderr
    return root


def test_security_score_is_ok() -> None:
    tool = need("systemd-analyze")
    result = subprocess.run([tool, "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edgestream\.service: ([\d.]+) (\w+)",
                  result.stdout + result.stderr)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.5 and m.group(2) == "OK", m.group(0)


def test_installed_unit_verifies(installed: Path) -> None:
    tool = need("systemd-analyze")
    # systemd's own units, so that the targets the unit names resolve in the scratch root
    shutil.copytree("/lib/systemd/system", installed / "usr/lib/systemd/system", symlinks=True,
                    dirs_exist_ok=True)
    result = subprocess.run([tool, "verify", f"--root={installed}",
                             "/etc/systemd/system/edgestream.service"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    unit = (installed / "etc/systemd/system/edgestream.service").read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "MemoryMax=",
                    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "RestrictAddressFamilies=", "DeviceAllow=char-alsa"):
        assert setting in unit, setting


def test_installer_lays_out_the_system(installed: Path) -> None:
    passwd = (installed / "etc/passwd").read_text()
    group = (installed / "etc/group").read_text()
    user = next(line for line in passwd.splitlines() if line.startswith("edgestream:"))
    assert user.endswith(":/var/lib/edgestream:/usr/sbin/nologin")
    uid = int(user.split(":")[2])
    assert uid < 1000  # a system account
    audio = next(line for line in group.splitlines() if line.startswith("audio:"))
    video = next(line for line in group.splitlines() if line.startswith("video:"))
    assert "edgestream" in audio.split(":")[3] and "edgestream" in video.split(":")[3]
    assert (installed / "opt/edgestream/venv/bin/edgestream").exists()
    config = installed / "etc/edgestream/config.toml"
    assert config.stat().st_mode & 0o777 == 0o640
    assert 'bundle = "/var/lib/edgestream/bundles/tiny"' in config.read_text()
    bundle = installed / "var/lib/edgestream/bundles/tiny"
    assert (bundle / "manifest.json").is_file() and bundle.stat().st_uid == uid
    assert (installed / "var/cache/edgestream").stat().st_uid == uid
    wants = installed / "etc/systemd/system/multi-user.target.wants/edgestream.service"
    assert wants.is_symlink()
    autostart = installed / "etc/xdg/autostart/edgestream-kiosk.desktop"
    assert "Exec=/opt/edgestream/kiosk/edgestream-kiosk.sh" in autostart.read_text()
    assert os.access(installed / "opt/edgestream/kiosk/edgestream-kiosk.sh", os.X_OK)


def test_second_install_changes_nothing(installed: Path, tiny_bundle: Path) -> None:
    before = snapshot(installed)
    again = install(installed, "--bundle", str(tiny_bundle), "--kiosk")
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip() == "", again.stderr  # it says what it changes: nothing
    assert snapshot(installed) == before


def test_operator_config_is_never_overwritten(installed: Path, tiny_bundle: Path) -> None:
    config = installed / "etc/edgestream/config.toml"
    config.write_text(config.read_text().replace('device = ""', 'device = "USB"'))
    assert install(installed).returncode == 0
    assert 'device = "USB"' in config.read_text()


def test_bad_bundle_is_refused(tmp_path: Path) -> None:
    root = scratch_root(tmp_path / "root")
    result = install(root, "--bundle", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json" in result.stderr
    assert not (root / "opt").exists()  # refused before anything was written


def test_uninstall_keeps_config_unless_purged(tmp_path: Path, tiny_bundle: Path) -> None:
    root = scratch_root(tmp_path / "root")
    assert install(root).returncode == 0
    subprocess.run(["bash", str(DEVICES / "uninstall.sh"), "--root", str(root)], check=True,
                   capture_output=True)
    assert not (root / "etc/systemd/system/edgestream.service").exists()
    assert not (root / "opt/edgestream").exists()
    assert (root / "etc/edgestream/config.toml").exists()
    subprocess.run(["bash", str(DEVICES / "uninstall.sh"), "--root", str(root), "--purge"],
                   check=True, capture_output=True)
    assert not (root / "etc/edgestream").exists()
    assert "edgestream:" not in (root / "etc/passwd").read_text()
