#!/bin/sh
# Build the busybox demo guest OS: an erofs root filesystem image plus its
# manifest (guestos.conf) with the image's size and SHA-256.
#   scripts/build-demo-guestos.sh <out-dir> [name] [version]
set -eu
out=${1:?usage: build-demo-guestos.sh <out-dir> [name] [version]}
name=${2:-busybox}
version=${3:-1}
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
mkdir -p "$out"
rm -f "$out/root.img"
mkfs.erofs --quiet --all-root -T0 "$out/root.img" "$root"
size=$(stat -c %s "$out/root.img")
sha=$(sha256sum "$out/root.img" | cut -d' ' -f1)
cat >"$out/guestos.conf" <<CONF
name: "$name"
version: $version
description: "busybox demo guest OS"
mounts {
  image_file: "root.img"
  mount_point: "/"
  fs_type: "erofs"
  image_size: $size
  image_sha2_256: "$sha"
}
init_path: "/sbin/init"
min_ram_limit: 16
CONF
echo "built guest OS $name $version in $out ($size bytes)"
