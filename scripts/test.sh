#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: makes .venv, installs the project with its
# test extras, then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
# torch first, pinned (2.13.0 is a CPU build on these machines; unpinned, pip pulls GBs of CUDA
# wheels), then the rest of the local provider's extra, so its tests run too
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,local]"
# the tests start their own throwaway PostgreSQL server (tests/pgserver.py): with no server
# binaries around, install Debian's postgresql-15 when we can (root with apt-get)
have_pg_server() {
  local bindir
  if bindir=$(pg_config --bindir 2>/dev/null) && [ -x "$bindir/initdb" ]; then
    return 0
  fi
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}
if ! have_pg_server && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  # refresh the package lists only when they do not know the package, or hold a stale version
  apt-cache show postgresql-15 >/dev/null 2>&1 || apt-get update -q
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15
  fi
fi
# the docs test loads Swagger UI and ReDoc in a headless browser: Debian's chromium
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-cache show chromium >/dev/null 2>&1 || apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium || {
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
