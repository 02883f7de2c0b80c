#!/bin/sh
# Install everything CML needs to build, run the demo and run the tests on
# Debian 12. Idempotent; needs root. With "bench", also the peers make
# bench compares against (podman).
set -eu
need=""
if [ "${1:-}" = bench ]; then
	command -v podman >/dev/null 2>&1 || need="$need podman"
fi
for pair in runc:runc busybox:busybox-static mkfs.erofs:erofs-utils mksquashfs:squashfs-tools \
	protoc:protobuf-compiler gcc:gcc veritysetup:cryptsetup-bin \
	openssl:openssl softhsm2-util:softhsm2 pkcs11-tool:opensc \
	swtpm:swtpm swtpm_setup:swtpm-tools tpm2_checkquote:tpm2-tools \
	qemu-system-x86_64:qemu-system-x86; do
	bin=${pair%%:*}
	pkg=${pair#*:}
	command -v "$bin" >/dev/null 2>&1 || need="$need $pkg"
done
# Headers and libraries for cgo: the TPM reference simulator in the tests
# links libcrypto.
[ -f /usr/include/openssl/evp.h ] || need="$need libssl-dev"
if [ -n "$need" ]; then
	echo "installing:$need"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq $need >/dev/null
fi
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || { echo "Go 1.26 is required (/usr/local/go)" >&2; exit 1; }
