#!/bin/sh
# Run the tests this machine's kernel cannot: device-mapper (dm-verity),
# a kernel TPM (/dev/tpmrm0) and pure cgroup v2, inside QEMU booting
# Debian's own kernel (linux-image-amd64's current version, unpacked, not
# installed). The tests are the project's own test binaries, built here;
# they select themselves by what the VM's kernel offers.
#
#   scripts/vm-test.sh            (make test-vm)
#
# Needs root, qemu-system-x86, swtpm, busybox-static, cryptsetup-bin and
# runc (scripts/install-deps.sh installs them). Everything lands in
# _out/vm; the kernel package is kept there between runs.
set -eu
if [ "$(id -u)" != 0 ]; then
	echo "vm-test: skipped: needs root (QEMU with a TPM and 9p share, loop mounts inside)"
	exit 0
fi
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
out=${VM_OUT:-$here/_out/vm}
GO=${GO:-go}
timeout=${VM_TIMEOUT:-900}
share=$out/share
root=$out/root
log() { printf 'vm-test: %s\n' "$*"; }

rm -rf "$root" "$share" "$out/tpm" "$out/kernel"
mkdir -p "$out/dl" "$share/prebuilt/bin" "$share/results" "$root" "$out/tpm"

# 1. Debian's kernel, resolved through the meta package so security
# updates are followed.
resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
	apt-get update -qq >/dev/null
	pkg=$(resolve)
fi
[ -n "$pkg" ] || { log "cannot resolve linux-image-amd64 from apt"; exit 1; }
if [ ! -f "$out/dl/$pkg.deb" ]; then
	log "downloading $pkg"
	(cd "$out/dl" && apt-get download "$pkg" >/dev/null 2>&1 && mv "$pkg"_*.deb "$pkg.deb")
fi
dpkg-deb -x "$out/dl/$pkg.deb" "$out/kernel"
kver=$(ls "$out/kernel/lib/modules")

# 2. The project's binaries and test binaries, a PKI and a signed guest OS.
log "building"
$GO build -o "$share/prebuilt/bin/" ./cmd/...
$GO test -c -o "$share/e2e.test" ./test/e2e
$GO test -c -o "$share/tpm.test" ./internal/tpm
$GO test -c -o "$share/guestos.test" ./internal/guestos
"$share/prebuilt/bin/cmlsign" pki init --dir "$share/prebuilt/pki" >/dev/null
CMLSIGN="$share/prebuilt/bin/cmlsign" scripts/build-demo-guestos.sh "$share/prebuilt/guestos" "$share/prebuilt/pki" busybox 1 >/dev/null

# 3. The VM's root: busybox, the tools the tests call with their
# libraries, the kernel's modules, and the init below.
for d in bin sbin usr/bin usr/sbin etc proc sys dev tmp run root share lib/modules; do
	mkdir -p "$root/$d"
done
cp /bin/busybox "$root/bin/busybox"
for a in $(/bin/busybox --list); do
	[ "$a" = busybox ] || ln -sf /bin/busybox "$root/bin/$a"
done
libs() {
	ldd "$1" 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | while read -r l; do
		mkdir -p "$root$(dirname "$l")"
		cp -L "$l" "$root$l"
	done
}
for tool in runc veritysetup cryptsetup mkfs.ext4 losetup openssl tpm2_checkquote tpm2_pcrread; do
	p=$(command -v "$tool")
	cp "$p" "$root/usr/bin/$tool"
	libs "$p"
done
# tpm2-tools load their TPM access library by name at run time.
for l in /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0*; do
	mkdir -p "$root$(dirname "$l")"
	cp -L "$l" "$root$l"
done
for b in "$share"/*.test "$share"/prebuilt/bin/*; do
	libs "$b"
done
mkdir -p "$root/usr/lib/ssl"
cp -L /usr/lib/ssl/openssl.cnf "$root/usr/lib/ssl/"
cp -a "$out/kernel/lib/modules/$kver" "$root/lib/modules/"
/bin/busybox depmod -b "$root" "$kver"
echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
echo "nobody:x:65534:65534:nobody:/:/bin/sh" >>"$root/etc/passwd"
echo "nogroup:x:65534:" >>"$root/etc/group"
cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
if [ ! -e /.tmpfs ]; then
	# runc's pivot_root fails on an initramfs root: move to a tmpfs.
	mkdir /newroot
	mount -t tmpfs -o size=1800m tmpfs /newroot
	for e in /*; do
		case $e in /proc|/sys|/dev|/newroot) ;; *) cp -a "$e" /newroot/ ;; esac
	done
	mkdir -p /newroot/proc /newroot/sys /newroot/dev
	touch /newroot/.tmpfs
	umount /proc /sys /dev
	exec switch_root /newroot /init
fi
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 none /sys/fs/cgroup
# The kernel loads crypto modules on demand through this helper.
echo /bin/modprobe >/proc/sys/kernel/modprobe
for m in virtio_pci 9pnet_virtio 9p loop crc32c_generic crc32c_intel libcrc32c erofs overlay dm_mod dm_verity \
	dm_crypt dm_integrity authenc hmac sha256_generic xts aes_generic; do
	modprobe $m || echo "modprobe $m failed: $(dmesg | tail -3)"
done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 share /share
echo "+cpu +cpuset +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
cd /tmp
run() {
	name=$1
	shift
	echo "=== $name"
	"$@" >/share/results/$name.log 2>&1
	echo $? >/share/results/$name.rc
}
{
	echo "kernel $(uname -r); $(ls /dev/tpmrm0 2>/dev/null || echo 'no kernel TPM'); cgroup $(stat -fc %T /sys/fs/cgroup)"
	run guestos /share/guestos.test -test.v -test.run 'TestDMVerityRefusesTamperedBlocks|TestDeviceMapperDetectionAsksTheKernel'
	run tpm /share/tpm.test -test.v -test.run 'TestKernelTPM'
	# Two groups at once, each measuring into its own resettable PCR.
	CML_E2E_PREBUILT=/share/prebuilt CML_E2E_PCR=23 run e2e /share/e2e.test -test.v -test.timeout 12m -test.run "$(cat /share/e2e.run)" &
	CML_E2E_PREBUILT=/share/prebuilt CML_E2E_PCR=16 run e2e2 /share/e2e.test -test.v -test.timeout 12m -test.run "$(cat /share/e2e2.run)" &
	wait
} >/share/results/summary.log 2>&1
sync
poweroff -f
INIT
chmod 755 "$root/init"
# The end-to-end tests that exercise what only the VM has.
# cmld on /dev/tpmrm0 (identity, measurement, quotes verified by cmlverify,
# the PCR not resetting when cmld restarts), the dm-verity start path, and
# isolation and limits on pure cgroup v2, and encrypted storage on
# dm-crypt + dm-integrity.
echo 'TestAttestationEndToEnd|TestStartRefusedWhenNotMeasured|TestDeviceCgroup|TestDMVerityStartRefusesTamperedImage' >"$share/e2e.run"
echo 'TestIsolationFromInside|TestLifecycle|TestEncryptedStorageDeviceMapper' >"$share/e2e2.run"
(cd "$root" && find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$out/initrd.gz"

# 4. A software TPM as the VM's hardware TPM, and the VM.
swtpm socket --tpm2 --tpmstate dir="$out/tpm" --ctrl type=unixio,path="$out/tpm/ctrl.sock" \
	--log file="$out/tpm/swtpm.log" --terminate &
swtpm_pid=$!
trap 'kill $swtpm_pid 2>/dev/null || true' EXIT
for i in $(seq 50); do [ -S "$out/tpm/ctrl.sock" ] && break; sleep 0.1; done
accel=tcg,thread=multi
grep -qE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && accel=kvm
log "booting $pkg ($accel)"
start=$(date +%s)
status=0
timeout "$timeout" qemu-system-x86_64 -accel "$accel" -cpu max -smp 2 -m 2560 -nographic -no-reboot \
	-kernel "$out/kernel/boot/vmlinuz-$kver" -initrd "$out/initrd.gz" \
	-append "console=ttyS0 quiet panic=-1 cgroup_no_v1=all" \
	-chardev socket,id=chrtpm,path="$out/tpm/ctrl.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0 \
	-virtfs local,path="$share",mount_tag=share,security_model=none,id=share \
	>"$out/console.log" 2>&1 || status=$?
log "VM ran $(($(date +%s) - start)) s"
cat "$share/results/summary.log" 2>/dev/null || true
fail=0
for t in guestos tpm e2e e2e2; do
	rc=$(cat "$share/results/$t.rc" 2>/dev/null || echo missing)
	if [ "$rc" != 0 ]; then
		fail=1
		log "$t: FAILED ($rc)"
		cat "$share/results/$t.log" 2>/dev/null || tail -50 "$out/console.log"
	else
		grep -E '^(--- |ok|PASS|FAIL)' "$share/results/$t.log" | sed 's/^/  /'
	fi
done
[ $status = 0 ] || { log "qemu exited with $status"; tail -20 "$out/console.log"; fail=1; }
exit $fail
