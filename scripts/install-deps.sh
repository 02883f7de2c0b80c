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
	qemu-system-x86_64:qemu-system-x86 nft:nftables ip:iproute2 iperf3:iperf3 \
	pkg-config:pkg-config gocryptfs:gocryptfs debugfs:e2fsprogs nsenter:util-linux \
	rsyslogd:rsyslog age:age; do
	bin=${pair%%:*}
	pkg=${pair#*:}
	command -v "$bin" >/dev/null 2>&1 || need="$need $pkg"
done
# Headers and libraries for cgo: the TPM reference simulator in the tests
# links libcrypto.
[ -f /usr/include/openssl/evp.h ] || need="$need libssl-dev"
# The audit forwarding tests run their own rsyslog with TLS.
[ -f /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || need="$need rsyslog-gnutls"
# runc is built from source with seccomp (see below).
[ -f /usr/include/seccomp.h ] || need="$need libseccomp-dev"
if [ -n "$need" ]; then
	echo "installing:$need"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq $need >/dev/null
fi
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || { echo "Go 1.26 is required (/usr/local/go)" >&2; exit 1; }
# runc 1.3 or newer: Debian's 1.1 joins a container's user namespace before
# its other namespaces on exec, so it cannot exec into a container whose
# network namespace cmld made (owned by the host, so that the container
# cannot change it); 1.3 joins what it can first. Installed to
# /usr/local/sbin, ahead of /usr/sbin in root's PATH.
RUNC_VERSION=v1.3.6
have=$(runc --version 2>/dev/null | sed -n 's/^runc version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
set -- $have
if [ -z "$have" ] || [ "$1" -lt 1 ] || { [ "$1" -eq 1 ] && [ "$2" -lt 3 ]; }; then
	echo "installing: runc $RUNC_VERSION (go install, with seccomp)"
	GO=$(command -v go || echo /usr/local/go/bin/go)
	GOBIN=/usr/local/sbin CGO_ENABLED=1 "$GO" install -tags seccomp "github.com/opencontainers/runc@$RUNC_VERSION"
	hash -r
	runc --version | head -1
fi
