"""run.sh's own logic, with fake interpreters in a temporary copy of the project (the real .venv is never touched).

The fakes: a base "python" that answers run.sh's fact query and makes a fake venv, a venv "python" that logs
what it is asked to run, and `apt-get` / `id` on PATH so nothing is installed and root / non-root are chosen.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="run.sh needs bash and sha256sum")

BASE_PYTHON = """#!/usr/bin/env bash
# fake base interpreter: FAKE_REAL is its real path, FAKE_CAN whether it has venv + ensurepip
if [[ $1 == -c && $2 == *find_spec* ]]; then
  printf '%s 3.11.2\\n3.11\\n%s\\n' "${FAKE_REAL:-/usr/bin/python3.11}" "${FAKE_CAN:-yes}"
  exit 0
fi
if [[ $1 == -m && $2 == venv ]]; then
  echo "venv $3" >> "$FAKE_LOG"
  mkdir -p "$3/bin" && cp "$(dirname "$0")/venv-python" "$3/bin/python"
  exit 0
fi
exit 1
"""

PIP = "-m pip install -qq --disable-pip-version-check --root-user-action=ignore -r"
PROJECT = "-m pip install -qq --disable-pip-version-check --root-user-action=ignore --no-deps --no-build-isolation -e ."

VENV_PYTHON = """#!/usr/bin/env bash
# fake venv interpreter: logs what it runs
[[ $1 == -c ]] && exit 0
echo "$*" >> "$FAKE_LOG"
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "p"
    proj.mkdir()
    for name in ("run.sh", "requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, proj / name)
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    _executable(fakes / "python", BASE_PYTHON)
    _executable(fakes / "venv-python", VENV_PYTHON)
    _executable(fakes / "apt-get", '#!/bin/sh\necho "apt-get $*" >> "$FAKE_LOG"\n')
    _executable(fakes / "id", '#!/bin/sh\necho "${FAKE_UID:-1000}"\n')
    return proj, fakes


def _run(project, *args, **env):
    proj, fakes = project
    full = {**os.environ, "PATH": f"{fakes}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHON": str(fakes / "python"), "FAKE_LOG": str(proj / "calls.log"), **env}
    full.pop("VIRTUAL_ENV", None)
    result = subprocess.run(["bash", str(proj / "run.sh"), *args], env=full, capture_output=True, text=True,
                            timeout=30)
    return result


def _calls(project) -> list[str]:
    log = project[0] / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_unknown_command_prints_usage_and_exits_2(project):
    result = _run(project, "bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ./run.sh explore")
    assert not (project[0] / ".venv").exists() and _calls(project) == []


def test_no_ensurepip_not_root_says_what_to_install(project):
    result = _run(project, "explore", FAKE_CAN="no")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"run.sh: {project[1] / 'python'} cannot create a virtual environment (no ensurepip); "
        "install it with: sudo apt-get install python3.11-venv"]
    assert _calls(project) == [] and not (project[0] / ".venv").exists()


def test_no_ensurepip_as_root_installs_the_debian_package(project):
    result = _run(project, "explore", FAKE_CAN="no", FAKE_UID="0")
    assert _calls(project) == ["apt-get update -qq", "apt-get install -y -qq python3.11-venv"]
    # the fake apt-get installs nothing, so run.sh still stops with one line
    assert result.returncode == 1 and "still cannot create a virtual environment" in result.stderr


def test_non_debian_interpreter_without_venv_is_not_apt_installed(project):
    result = _run(project, "explore", FAKE_CAN="no", FAKE_UID="0", FAKE_REAL="/opt/py/bin/python3.11")
    assert result.returncode == 1 and "use an interpreter that can" in result.stderr
    assert _calls(project) == []


def test_python_that_does_not_run(project):
    result = _run(project, "tabconv", PYTHON=str(project[0] / "missing-python"))
    assert result.returncode == 1 and result.stderr.strip().endswith("does not run")


def test_venv_made_once_requirements_installed_only_when_changed(project):
    proj, _ = project
    assert _run(project, "tabconv", "cost", "--json").returncode == 0
    assert _calls(project) == ["venv .venv", f"{PIP} requirements.txt", PROJECT, "-m tabconv cost --json"]
    # second launch: no venv, no pip
    result = _run(project, "tabconv", "cost")
    assert result.returncode == 0 and result.stderr == ""
    assert _calls(project) == ["-m tabconv cost"]
    # the dev requirements include requirements.txt: installing them covers explore too
    assert _run(project, "python", "bench/x.py").returncode == 0
    assert _calls(project) == [f"{PIP} requirements-dev.txt", "bench/x.py"]
    assert _run(project, "explore", "--server.port", "1").returncode == 0
    assert _calls(project) == ["-m tabconv.native", "-m streamlit run explorer/app.py --server.port 1"]
    # a changed requirements file (also one included with -r) is installed again
    with open(proj / "requirements.txt", "a") as f:
        f.write("# changed\n")
    assert _run(project, "python", "-V").returncode == 0
    assert _calls(project) == [f"{PIP} requirements-dev.txt", "-V"]
    assert _run(project, "tabconv").returncode == 0
    assert _calls(project) == ["-m tabconv"]
    # a changed pyproject.toml installs the project again (editable: its code is the working tree's)
    with open(proj / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert _run(project, "tabconv").returncode == 0
    assert _calls(project) == [PROJECT, "-m tabconv"]


def test_venv_remade_for_another_interpreter_or_when_broken(project):
    proj, _ = project
    assert _run(project, "tabconv").returncode == 0
    _calls(project)
    result = _run(project, "tabconv", FAKE_REAL="/usr/bin/python3.12")
    assert result.returncode == 0 and "recreating .venv" in result.stderr
    assert _calls(project)[:2] == ["venv .venv", f"{PIP} requirements.txt"]
    (proj / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")  # its python no longer runs
    result = _run(project, "tabconv", FAKE_REAL="/usr/bin/python3.12")
    assert result.returncode == 0 and "recreating .venv" in result.stderr
    assert _calls(project)[0] == "venv .venv"
