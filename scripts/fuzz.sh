#!/bin/sh
# Run every fuzz target of a parser that takes outside input, each for
# FUZZTIME: a duration (make fuzz: 60s) or a count of inputs (make test:
# 5000x; a count, because a short duration can end go test's fuzzing with
# a spurious "context deadline exceeded").
# A crash leaves its input under <package>/testdata/fuzz/<target>/: commit
# it with the fix, so it stays a regression test of the normal test run.
set -eu
t=${FUZZTIME:-5000x}
GO=${GO:-go}
for pair in \
	internal/config:FuzzParseContainer \
	internal/config:FuzzParseGuestOS \
	internal/config:FuzzParseDevice \
	internal/config:FuzzParseDeviceRule \
	internal/sign:FuzzParseRevocationList \
	internal/measurelog:FuzzDecodeLog \
	internal/attest:FuzzVerify \
	internal/cmlsign:FuzzExtractTar \
	internal/auditlog:FuzzVerifyTrail; do
	pkg=${pair%%:*}
	target=${pair#*:}
	echo "fuzz $target ($pkg, $t)"
	$GO test -run '^$' -fuzz "^$target\$" -fuzztime "$t" "./$pkg/" >/tmp/cml-fuzz.$$ 2>&1 || { cat /tmp/cml-fuzz.$$; rm -f /tmp/cml-fuzz.$$; exit 1; }
done
rm -f /tmp/cml-fuzz.$$
