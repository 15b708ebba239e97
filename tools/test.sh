#!/usr/bin/env bash
# The whole test suite, from a clean clone on a fresh machine:
#   bash tools/test.sh [pytest args]
# Creates or reuses .venv, installs the project with its test extra, installs
# the Debian packages the tests use when missing (needs root), starts the
# machine's PostgreSQL and points the tests at it, then runs mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need=()
command -v age >/dev/null 2>&1 || need+=(age)
command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)           # browser tests (Playwright drives Debian's chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing Debian packages: ${need[*]}"
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "== missing Debian packages: ${need[*]} (run as root or install them; tests that need them skip)"
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
echo "== installing exchange[test] into .venv"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import exchange, pyarrow, sqlalchemy, paramiko, hypothesis' 

# PostgreSQL: start the machine's cluster and use a role named after us.
if [ -z "${EXCHANGE_TEST_PG:-}" ] && command -v pg_lsclusters >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  cluster=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1" "$2}')
  if [ -z "$cluster" ]; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$ver" main >/dev/null
    cluster="$ver main"
  fi
  pg_ctlcluster $cluster start 2>/dev/null || true
  for _ in $(seq 1 30); do pg_isready -q && break; sleep 0.5; done
  su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='root'\"" | grep -q 1 \
    || su postgres -c "createuser -s root"
  export EXCHANGE_TEST_PG="postgresql+psycopg://root@/postgres?host=/var/run/postgresql"
  echo "== PostgreSQL $cluster running; tests use throwaway databases"
fi

echo "== mypy"
.venv/bin/python -m mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
