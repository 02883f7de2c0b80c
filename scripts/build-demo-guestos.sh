#!/bin/sh
# Build the busybox demo guest OS as a signed bundle: a busybox root
# filesystem, turned by cmlsign into an erofs image, its dm-verity hash
# file, the manifest (guestos.conf) and its signature and signer chain.
#   scripts/build-demo-guestos.sh <out-dir> <pki-dir> [name] [version]
# <pki-dir> holds signer.key and signer.pem (cmlsign pki init makes them).
set -eu
usage="usage: build-demo-guestos.sh <out-dir> <pki-dir> [name] [version]"
out=${1:?$usage}
pki=${2:?$usage}
name=${3:-busybox}
version=${4:-1}
here=$(cd "$(dirname "$0")/.." && pwd)
cmlsign=${CMLSIGN:-$here/bin/cmlsign}
bb=$(command -v busybox) || { echo "busybox not found (apt-get install busybox-static)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/bin "$root"/sbin "$root"/etc "$root"/proc "$root"/sys "$root"/dev \
	"$root"/tmp "$root"/root "$root"/run "$root"/var "$root"/usr/bin "$root"/data
chmod 1777 "$root/tmp"
cp "$bb" "$root/bin/busybox"
for applet in $("$bb" --list); do
	[ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
cat >"$root/sbin/init" <<'INIT'
#!/bin/sh
# Demo init: greet on the console, then idle until asked to stop.
echo "demo guest OS up: hostname $(hostname), pid $$"
trap 'echo "init: SIGTERM received, shutting down"; exit 0' TERM
# Hooks for tests and demos of the lifecycle, set through init_env.
[ -n "${DEMO_IGNORE_TERM:-}" ] && trap 'echo "init: ignoring SIGTERM"' TERM
[ -n "${DEMO_EXIT:-}" ] && { sleep 0.3; exit "$DEMO_EXIT"; }
while :; do sleep 1 & wait $!; done
INIT
chmod 755 "$root/sbin/init"
"$cmlsign" guestos build --rootfs "$root" --all-root --name "$name" --version "$version" \
	--init /sbin/init --min-ram 16 --description "busybox demo guest OS" \
	--key "$pki/signer.key" --cert "$pki/signer.pem" --out "$out"
