#!/bin/bash
# A short tour of CML on the embedded defaults: no config file, no TPM, no
# token. State lives in ./_demo; everything is stopped again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "the demo needs root (cmld mounts images and creates namespaces)" >&2; exit 1; }
DEMO=$PWD/_demo
export CML_SOCKET=$DEMO/run/control.sock
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

pkill -f "cmld --state-dir $DEMO" 2>/dev/null || true
rm -rf "$DEMO/guestos-src"
mkdir -p "$DEMO"

step "Build the busybox demo guest OS (erofs image + manifest with its SHA-256)"
scripts/build-demo-guestos.sh "$DEMO/guestos-src" busybox 1

step "Start cmld (state in $DEMO, control socket $CML_SOCKET)"
bin/cmld --state-dir "$DEMO/state" --run-dir "$DEMO/run" 2>"$DEMO/cmld.log" &
CMLD=$!
trap 'kill $CMLD 2>/dev/null; wait $CMLD 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$CML_SOCKET" ] && break; sleep 0.1; done

# A previous tour's leftovers: cmld re-adopted them on start; clear them.
bin/cmlctl stop demo >/dev/null 2>&1 || true
bin/cmlctl remove demo >/dev/null 2>&1 || true
bin/cmlctl guestos remove busybox 1 >/dev/null 2>&1 || true

step "Install the guest OS (size and SHA-256 checked on the copied bytes)"
run bin/cmlctl guestos install "$DEMO/guestos-src"
run bin/cmlctl guestos list

step "Create a container from a GyroidOS-style config"
cat examples/demo.conf
run bin/cmlctl create examples/demo.conf

step "Start it"
run bin/cmlctl start demo
run bin/cmlctl list

step "Look inside: own pid namespace, user namespace, few capabilities, seccomp"
run bin/cmlctl exec demo -- sh -c 'echo "pid 1 is: $(tr "\0" " " </proc/1/cmdline)"; id; grep -E "CapEff|NoNewPrivs|Seccomp:" /proc/self/status; echo "uid_map: $(cat /proc/self/uid_map)"'
printf '$ bin/cmlctl exec demo -- mount -t tmpfs none /mnt   # refused\n'
bin/cmlctl exec demo -- mount -t tmpfs none /mnt || echo "(exit status $?)"

step "The container's console"
run bin/cmlctl logs demo

step "Stop it (SIGTERM, then SIGKILL after stop_timeout)"
run bin/cmlctl stop demo
run bin/cmlctl list

step "Every management operation is in the audit trail"
tail -n 4 "$DEMO/state/audit.log"

step "Done. Remove the demo state with: rm -rf $DEMO"
