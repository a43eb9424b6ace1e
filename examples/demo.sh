#!/usr/bin/env bash
# The gearvisor demo: starts gearmand on loopback, runs gearvisor on conf/pools.yaml,
# submits jobs with the gearman CLI, shows a crash being healed, then stops everything
# it started. Run from anywhere: bash examples/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh
REPO=$(pwd)
PY=.venv/bin/python
GEARVISOR=.venv/bin/gearvisor
GEARMAND=$(command -v gearmand || echo /usr/sbin/gearmand)
WORK=$(mktemp -d /tmp/gearvisor-demo.XXXXXX)
PORT=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The metrics port: conf/pools.yaml's 9464 if it is free, else any free one.
METRICS_PORT=$($PY -c 'import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 9464))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
GEARMAND_PID=""; MASTER_PID=""

cleanup() {
  [ -n "$MASTER_PID" ] && kill -TERM "$MASTER_PID" 2>/dev/null && wait "$MASTER_PID" 2>/dev/null || true
  [ -n "$GEARMAND_PID" ] && kill "$GEARMAND_PID" 2>/dev/null && wait "$GEARMAND_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Poll a command until it succeeds (at most ~10 s): no fixed sleeps.
wait_until() { for _ in $(seq 100); do if eval "$1"; then return 0; fi; sleep 0.1; done; echo "timed out: $1" >&2; return 1; }

step "gearmand on 127.0.0.1:$PORT"
"$GEARMAND" -L 127.0.0.1 -p "$PORT" -t 1 --log-file=none &
GEARMAND_PID=$!
wait_until "gearadmin -h 127.0.0.1 -p $PORT --server-version >/dev/null 2>&1"

step "gearvisor check -c conf/pools.yaml (pointed at that port)"
sed -e "s/127.0.0.1:4730/127.0.0.1:$PORT/" -e "s/127.0.0.1:9464/127.0.0.1:$METRICS_PORT/" -e "s#pythonpath: \[\"..\"\]#pythonpath: [\"$REPO\"]#" \
    -e "s/^log_format: auto/log_format: console/" conf/pools.yaml > "$WORK/pools.yaml"
echo "control_socket: gearvisor.sock   # demo: next to this config" >> "$WORK/pools.yaml"
echo "state_dir: state                 # demo: alert state next to this config" >> "$WORK/pools.yaml"
CTL="-c $WORK/pools.yaml"
$GEARVISOR check -c "$WORK/pools.yaml"

step "gearvisor -c pools.yaml (log: key=value lines below)"
$GEARVISOR -c "$WORK/pools.yaml" 2>&1 | sed -u "s/^/  [log] /" &
wait_until "pgrep -f 'gearvisor: master -c $WORK/pools.yaml' >/dev/null"
MASTER_PID=$(pgrep -f "gearvisor: master -c $WORK/pools.yaml")
wait_until "[ \$(gearadmin -h 127.0.0.1 -p $PORT --workers | grep -c ':text:\|:tasks:\|:flaky:') -ge 5 ]"
ps -o pid,args --ppid "$MASTER_PID"

step "gearadmin --workers: every child registered, with its client id"
gearadmin -h 127.0.0.1 -p "$PORT" --workers

G="gearman -h 127.0.0.1 -p $PORT"
step "gearman -f reverse 'Hello, Gearman'"
$G -f reverse 'Hello, Gearman'; echo
step "gearman -f wordcount (a JSON task reporting progress)"
$G -f wordcount '{"lines": ["the quick brown fox", "jumps over", "the lazy dog"], "delay": 0.2}'; echo
step "gearman -f flaky fail (a job that raises: the client sees the failure and the error text)"
$G -f flaky fail || echo "(gearman exited $?, as expected)"
step "gearvisor dead list / jobs --failed: the failure is in the job journal (state/journal.sqlite3)"
wait_until "$GEARVISOR dead list -c '$WORK/pools.yaml' --json 2>/dev/null | grep -q flaky"
$GEARVISOR dead list -c "$WORK/pools.yaml"
$GEARVISOR jobs -c "$WORK/pools.yaml" --failed

step "kill -9 a child: gearvisor restarts it with backoff"
VICTIM=$(pgrep -f 'gearvisor: text\[0\]')
kill -9 "$VICTIM"
wait_until "pgrep -f 'gearvisor: text\[0\] idle' | grep -vx $VICTIM >/dev/null"
echo "text[0] was pid $VICTIM, now pid $(pgrep -f 'gearvisor: text\[0\]')"
$G -f reverse 'still serving'; echo

step "Prometheus metrics: curl http://127.0.0.1:$METRICS_PORT/metrics (scrape it there)"
# (Python's urllib, not curl: the demo needs nothing else installed; 503 is an answer too)
scrape() { $PY -c "import sys, urllib.request, urllib.error
try:
    r = urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT' + sys.argv[1], timeout=5)
except urllib.error.HTTPError as e:
    r = e
sys.stdout.write(r.read().decode())" "$1"; }
wait_until "scrape /metrics | grep -q 'gearvisor_child_restarts_total{pool=\"text\",reason=\"crash\"} 1.0'"
scrape /metrics | grep -E '^gearvisor_(jobs_total\{function="(reverse|flaky)",outcome="(success|error)"|child_restarts_total\{pool="text",reason="crash"|children\{pool="text")'
echo "/readyz: $(scrape /readyz)"

step "gearvisor status: every pool and child, from the master's control socket"
$GEARVISOR status $CTL

step "gearvisor alerts and silences (one crash is no CrashLoop: the rule wants 5 in 10m)"
$GEARVISOR alerts $CTL
$GEARVISOR silence add $CTL pool=flaky --for 30m --comment "demo: flaky fails on purpose"
$GEARVISOR silence list $CTL

step "gearvisor reload: each child is replaced by a new one (new code), which must be ready first"
$GEARVISOR reload $CTL
$GEARVISOR status $CTL
$G -f reverse 'served by generation 2'; echo

step "edit pools.yaml (add a PHP worker pool): the file watcher reloads, no command needed"
sed -i "/^pools:/a\\  php:\\n    processes: 1\\n    command: [php, $REPO/examples/php/worker.php]\\n    functions: [php_reverse]\\n    ready: registered" "$WORK/pools.yaml"
wait_until "$GEARVISOR status $CTL 2>/dev/null | grep -q 'pool php: 1/1 ready'"
$G -f php_reverse 'served by PHP, supervised by gearvisor'; echo
$GEARVISOR status $CTL | tail -3

step "gearvisor stop: children finish their jobs, everything exits"
$GEARVISOR stop $CTL
wait_until "! kill -0 $MASTER_PID 2>/dev/null"
MASTER_PID=""
echo "gearvisor stopped; workers left registered in gearmand: $(gearadmin -h 127.0.0.1 -p "$PORT" --workers | grep -c ':text:\|:tasks:\|:flaky:' || true)"
step "done"
