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

step "Build pipeline: make a development PKI (root CA + code-signing certificate)"
[ -f "$DEMO/pki/signer.key" ] || run bin/cmlsign pki init --dir "$DEMO/pki"

step "Build pipeline: build and sign the busybox guest OS (erofs image, dm-verity hash tree, signed manifest)"
scripts/build-demo-guestos.sh "$DEMO/guestos-src" "$DEMO/pki" busybox 1
cp examples/demo.conf "$DEMO/demo.conf"
run bin/cmlsign config --key "$DEMO/pki/signer.key" --cert "$DEMO/pki/signer.pem" "$DEMO/demo.conf"

step "Anyone can check the signatures with stock openssl"
run openssl dgst -sha256 -verify "$DEMO/pki/signer.pub" -signature "$DEMO/guestos-src/guestos.conf.sig" "$DEMO/guestos-src/guestos.conf"

step "Provision the device: the PKI's root becomes the vendor CA (not changeable through the API)"
mkdir -p "$DEMO/state/trust/vendor"
run cp "$DEMO/pki/root-ca.pem" "$DEMO/state/trust/vendor/vendor.pem"

step "Start cmld (state in $DEMO, control socket $CML_SOCKET)"
bin/cmld --state-dir "$DEMO/state" --run-dir "$DEMO/run" 2>"$DEMO/cmld.log" &
CMLD=$!
trap 'kill $CMLD 2>/dev/null; wait $CMLD 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -S "$CML_SOCKET" ] && break; sleep 0.1; done

# A previous tour's leftovers: cmld re-adopted them on start; clear them.
bin/cmlctl stop demo >/dev/null 2>&1 || true
bin/cmlctl remove demo >/dev/null 2>&1 || true
bin/cmlctl guestos remove busybox 1 >/dev/null 2>&1 || true

step "A tampered copy of the guest OS is refused (one flipped byte in the image)"
rm -rf "$DEMO/tampered" && cp -r "$DEMO/guestos-src" "$DEMO/tampered"
printf '\377' | dd of="$DEMO/tampered/root.img" bs=1 seek=8192 conv=notrunc status=none
printf '$ bin/cmlctl guestos install %s\n' "$DEMO/tampered"
bin/cmlctl guestos install "$DEMO/tampered" || echo "(refused, exit status $?)"

step "Install the genuine guest OS (signature, size, SHA-256 and verity root checked on the copied bytes)"
run bin/cmlctl guestos install "$DEMO/guestos-src"
run bin/cmlctl guestos list
run bin/cmlctl ca list

step "Create a container from a signed GyroidOS-style config"
cat "$DEMO/demo.conf"
run bin/cmlctl create "$DEMO/demo.conf"

step "Start it (config signature and every image block verified again first)"
run bin/cmlctl start demo
run bin/cmlctl list

step "Look inside: own pid namespace, user namespace, few capabilities, seccomp"
run bin/cmlctl exec demo -- sh -c 'echo "pid 1 is: $(tr "\0" " " </proc/1/cmdline)"; id; grep -E "CapEff|NoNewPrivs|Seccomp:" /proc/self/status; echo "uid_map: $(cat /proc/self/uid_map)"'
printf '$ bin/cmlctl exec demo -- mount -t tmpfs none /mnt   # refused\n'
bin/cmlctl exec demo -- mount -t tmpfs none /mnt || echo "(exit status $?)"

step "The container's console"
run bin/cmlctl logs demo

step "The device's identity lives in a TPM (here cmld's own swtpm, state under $DEMO/state/tpm)"
run bin/cmlctl device info

step "Fleet operator: provision the device (CSRs signed in the TPM, certificates from a fleet CA)"
[ -f "$DEMO/fleet/root-ca.key" ] || run bin/cmlsign pki init --dir "$DEMO/fleet" --org "demo fleet"
if ! bin/cmlctl device info | grep -q "state: *provisioned"; then
	run bin/cmlctl device csr -f "$DEMO/tls.csr"
	run bin/cmlsign pki device --ca-cert "$DEMO/fleet/root-ca.pem" --ca-key "$DEMO/fleet/root-ca.key" --csr "$DEMO/tls.csr" --out "$DEMO/tls.pem"
	run bin/cmlctl device cert "$DEMO/tls.pem"
	run bin/cmlctl device csr --attestation -f "$DEMO/ak.csr"
	run bin/cmlsign pki device --ca-cert "$DEMO/fleet/root-ca.pem" --ca-key "$DEMO/fleet/root-ca.key" --csr "$DEMO/ak.csr" --out "$DEMO/ak.pem"
	run bin/cmlctl device cert "$DEMO/ak.pem"
	run bin/cmlctl device provisioned
fi

step "Remote attestation: cmlverify checks the quote, the device certificate, the measurement log, and that the running container maps to the signed guest OS and config"
mkdir -p "$DEMO/refs" && cp "$DEMO/demo.conf" "$DEMO/demo.conf.sig" "$DEMO/demo.conf.cert" "$DEMO/refs/"
run bin/cmlverify --fleet-ca "$DEMO/fleet/root-ca.pem" --trust "$DEMO/pki/root-ca.pem" --reference "$DEMO/guestos-src" --reference "$DEMO/refs" --socket "$CML_SOCKET"

step "Accounts and roles: local root is the built-in administrator; every call is decided by one table"
run bin/cmlctl whoami
run bin/cmlctl user policy
bin/cmlctl user remove operator >/dev/null 2>&1 || true
rm -f "$DEMO/operator.session"
printf 'Initial-Passw0rd\n' >"$DEMO/operator.pw" && printf 'Chosen-By-0perator\n' >"$DEMO/operator.new" && chmod 600 "$DEMO/operator.pw" "$DEMO/operator.new"
run bin/cmlctl user add operator --role user --container demo --password-file "$DEMO/operator.pw"
step "The operator logs in (the administrator's password must be replaced) and sees and operates only its container"
OP=(bin/cmlctl --session-file "$DEMO/operator.session")
run "${OP[@]}" login operator --password-file "$DEMO/operator.pw" --new-password-file "$DEMO/operator.new"
run "${OP[@]}" list
printf '$ %s guestos remove busybox 1   # refused\n' "${OP[*]}"
"${OP[@]}" guestos remove busybox 1 || echo "(exit status $?)"
run bin/cmlctl session list --all
run "${OP[@]}" logout

step "Stop it (SIGTERM, then SIGKILL after stop_timeout)"
run bin/cmlctl stop demo
run bin/cmlctl list

step "Every management operation is in the audit trail"
tail -n 4 "$DEMO/state/audit.log"

step "The trail is tamper-evident: hash chain, Merkle tree, checkpoints signed in the TPM"
run bin/cmlctl audit verify

step "Done. Remove the demo state with: chattr -R -a $DEMO/state; rm -rf $DEMO (the audit trail is append-only)"
