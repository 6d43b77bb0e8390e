#!/usr/bin/env bash
# The project's entry points, all inside a project-local virtual environment .venv/ that this script makes
# from $PYTHON (default python3) on first use; the system interpreter is never installed into.
#   ./run.sh explore [streamlit args]   install what is missing, then open the explorer on the embedded default
#   ./run.sh test [pytest args]         install what is missing (Python packages, Debian's chromium and gcc), build the
#                                       native kernels, lint, run the tests (without args: the whole suite, then the
#                                       table-layer suites again on the torch path)
#   ./run.sh tabconv ARGS...            the command line: python -m tabconv ARGS...
#   ./run.sh python ARGS...             the environment's python with the development requirements (bench/ scripts)
# Requirements are installed only when the venv lacks them or the requirements files changed (a sha256 of the
# files is kept in .venv/); a venv made by another interpreter, or one whose python no longer runs, is remade.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
VPY=$PWD/$VENV/bin/python

usage() {
  echo "usage: ./run.sh explore [streamlit args] | test [pytest args] | tabconv ARGS... | python ARGS..." >&2
  exit 2
}

die() {
  echo "run.sh: $*" >&2
  exit 1
}

# Three lines about $PY: its identity (real path and version, what the venv records), X.Y, and whether it has
# the venv and ensurepip modules.
python_facts() {
  "$PY" -c 'import importlib.util as u, os, sys
v = sys.version_info
print(os.path.realpath(sys.executable) + " " + "%d.%d.%d" % v[:3])
print("%d.%d" % v[:2])
print("yes" if all(u.find_spec(m) is not None for m in ("venv", "ensurepip")) else "no")'
}

# Make sure $PY can create a venv; on Debian without pythonX.Y-venv install it (root) or say what to install.
ensure_venv_support() {
  local real=$1 xy=$2 can=$3 pkg
  [[ $can == yes ]] && return
  pkg=python$xy-venv
  if ! command -v apt-get >/dev/null || [[ $real != /usr/bin/* ]]; then
    die "$PY cannot create a virtual environment (no venv/ensurepip); use an interpreter that can: PYTHON=/path/to/python3 ./run.sh ..."
  fi
  if [[ $(id -u) -ne 0 ]]; then
    die "$PY cannot create a virtual environment (no ensurepip); install it with: sudo apt-get install $pkg"
  fi
  echo "run.sh: installing Debian's $pkg so $PY can create $VENV" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
  [[ $(python_facts | tail -n 1) == yes ]] || die "$PY still cannot create a virtual environment after installing $pkg"
}

# Reuse .venv when its python runs and it was made by the interpreter $PY is now; otherwise (re)create it.
ensure_venv() {
  local facts ident xy can
  facts=$(python_facts 2>/dev/null) || die "PYTHON=$PY does not run"
  { read -r ident; read -r xy; read -r can; } <<<"$facts"
  if [[ -f $VENV/.tabconv-python && $(<"$VENV/.tabconv-python") == "$ident" ]] && "$VPY" -c '' 2>/dev/null; then
    return
  fi
  if [[ -e $VENV ]]; then
    echo "run.sh: recreating $VENV for $PY (it was made by another interpreter or is broken)" >&2
    rm -rf "$VENV"
  fi
  ensure_venv_support "${ident% *}" "$xy" "$can"
  if ! "$PY" -m venv "$VENV"; then
    rm -rf "$VENV"
    die "$PY -m venv $VENV failed (see above)"
  fi
  echo "$ident" >"$VENV/.tabconv-python"
}

# A requirements file and, recursively, the files it includes with -r / --requirement.
req_closure() {
  local f=$1 inc
  echo "$f"
  while read -r inc; do
    [[ -n $inc ]] && req_closure "$(dirname "$f")/$inc"
  done < <(sed -n -E 's/^[[:space:]]*(-r|--requirement)[[:space:]=]*([^[:space:]#]+).*/\2/p' "$f")
}

# sha256 of the contents of a requirements file and of the files it includes.
req_hash() {
  local files
  mapfile -t files < <(req_closure "$1")
  cat "${files[@]}" | sha256sum | cut -d' ' -f1
}

stamp_of() {
  echo "$VENV/.tabconv-req-$(basename "$1").sha256"
}

# pip-install a requirements file into the venv unless the stamp says exactly these files are installed.
install_python() {
  local req=$1 stamp f
  stamp=$(stamp_of "$req")
  if [[ -f $stamp && $(<"$stamp") == "$(req_hash "$req")" ]]; then return; fi
  echo "run.sh: installing $req into $VENV (torch is large: the first time takes minutes)" >&2
  # -qq: errors only (this machine's pip configuration otherwise warns about every package's index location)
  "$VPY" -m pip install -qq --disable-pip-version-check --root-user-action=ignore -r "$req"
  # Everything the file includes is installed too: stamp it as well.
  while read -r f; do req_hash "$f" >"$(stamp_of "$f")"; done < <(req_closure "$req")
}

# The project itself, installed editable (its modules are the working tree's, no path edits anywhere): once per
# venv and pyproject.toml. Without setuptools in the venv, pip fetches it for the build (build isolation).
install_project() {
  local stamp=$VENV/.tabconv-project.sha256 hash isolation=()
  hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [[ -f $stamp && $(<"$stamp") == "$hash" ]]; then return; fi
  if "$VPY" -c "import setuptools" 2>/dev/null; then isolation=(--no-build-isolation); fi
  "$VPY" -m pip install -qq --disable-pip-version-check --root-user-action=ignore --no-deps "${isolation[@]}" -e .
  echo "$hash" >"$stamp"
}

# The native table kernels need a C compiler: Debian's gcc when there is none (as root), else the torch path serves.
install_compiler() {
  if command -v cc >/dev/null || command -v gcc >/dev/null || [[ -n ${CC:-} ]]; then return; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's gcc for the native table kernels" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null
  fi
}

# Build the native kernels once per source and compiler (cached under build/native/); without a compiler this
# says so and every table layer runs on the torch path.
build_native() {
  install_compiler
  "$VPY" -m tabconv.native
}

install_chromium() {
  if [[ -x /usr/bin/chromium ]]; then return; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "installing Debian's chromium for the real-browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "no /usr/bin/chromium and not root: the real-browser test will be skipped" >&2
  fi
}

cmd=${1:-}
case "$cmd" in
  explore | test | tabconv | python) shift ;;
  *) usage ;;
esac
ensure_venv
# Subprocesses that look up python, streamlit, ... on PATH find the environment's.
export VIRTUAL_ENV=$PWD/$VENV PATH=$PWD/$VENV/bin:$PATH
case "$cmd" in
  explore)
    install_python requirements.txt
    install_project
    build_native
    exec "$VPY" -m streamlit run explorer/app.py "$@"
    ;;
  test)
    install_python requirements-dev.txt
    install_project
    install_chromium
    build_native
    "$VPY" -m ruff check tabconv explorer tests bench
    if [[ $# -gt 0 ]]; then exec "$VPY" -m pytest -q "$@"; fi
    # The whole suite on the native kernels (when built), then the table-layer suites again on the torch path.
    "$VPY" -m pytest -q
    echo "run.sh: the table-layer tests again with TABCONV_KERNEL=torch (the path without native kernels)" >&2
    TABCONV_KERNEL=torch exec "$VPY" -m pytest -q tests/test_native.py \
      tests/test_convert.py tests/test_export.py tests/test_quantizer.py tests/test_session.py
    ;;
  tabconv)
    install_python requirements.txt
    install_project
    exec "$VPY" -m tabconv "$@"
    ;;
  python)
    install_python requirements-dev.txt
    install_project
    exec "$VPY" "$@"
    ;;
esac
