#!/usr/bin/env bash
# Prepare a fresh Debian machine for gearvisor: gearmand + gearman tools, php-gearman and
# Perl's Gearman::Worker (for the example command pools), Prometheus, Alertmanager and tmux
# (which the tests run for real), PostgreSQL (the job store's tests) from Debian, and a
# virtualenv in .venv with gearvisor installed (editable) plus the test tools.
# Idempotent and quiet when everything is already there. Used by examples/demo.sh and
# tests/run.sh (and so by .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need=()
command -v gearmand >/dev/null 2>&1 || [ -x /usr/sbin/gearmand ] || need+=(gearman-job-server)
command -v gearman >/dev/null 2>&1 && command -v gearadmin >/dev/null 2>&1 || need+=(gearman-tools)
# The interpreter .venv is made from: Debian's own python3 (what a fresh Debian machine
# has), even where another one comes first on PATH (pyenv's, say, built by default
# without PGO and LTO: the child's per-job Python takes about 13% more instructions on it,
# README: Performance); GEARVISOR_PYTHON=/path/to/python picks another (3.10+).
if [ -n "${GEARVISOR_PYTHON:-}" ]; then
  PY=$GEARVISOR_PYTHON
else
  PY=/usr/bin/python3
  [ -x "$PY" ] || need+=(python3)
fi
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then need+=(python3-venv); fi
# The PHP and Perl example workers (command pools) and their integration tests.
command -v php >/dev/null 2>&1 || need+=(php-cli)
php -r 'exit(class_exists("GearmanWorker") ? 0 : 1);' >/dev/null 2>&1 || need+=(php-gearman)
perl -MGearman::Worker -e 1 >/dev/null 2>&1 || need+=(libgearman-client-perl)
# The monitoring parts the tests run for real: Prometheus and promtool, Alertmanager, and
# tmux (terminal views).
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
# openssl: the email channel's test makes a certificate for its STARTTLS server.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# PostgreSQL: the job store's tests run a real server (initdb in a temp dir, a free
# loopback port) as the unprivileged user the package creates (postgres).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# strace: bench/profile.py counts system calls per job beside the C worker.
command -v strace >/dev/null 2>&1 || need+=(strace)
# valgrind: bench/instructions.py counts the child's instructions per job (callgrind).
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} from Debian" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.gearvisor-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing gearvisor and test tools into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,bench]'
  touch "$stamp"
fi
