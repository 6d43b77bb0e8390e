#!/usr/bin/env bash
# The project's two entry points:
#   ./run.sh explore   install what is missing, then open the explorer on the embedded default
#   ./run.sh test      install what is missing (Python packages, Debian's chromium), lint, run the tests
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install_python() {
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$1"
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

case "${1:-}" in
  explore)
    install_python requirements.txt
    shift
    exec "$PY" -m streamlit run explorer/app.py "$@"
    ;;
  test)
    install_python requirements-dev.txt
    install_chromium
    "$PY" -m ruff check tabconv explorer tests bench
    shift
    exec "$PY" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh explore | test [pytest args]" >&2
    exit 2
    ;;
esac
