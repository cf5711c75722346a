#!/bin/sh
# __NAME__: the job (POSIX sh). Replace this with your own work.
#
# It runs once when the VM boots. Inputs given with `vmbuild run IMAGE.vmx --input PATH` are
# under $VMBUILD_INPUT (read-only), each under its own base name; whatever it writes to
# $RESULTS comes back to `--output-dir`. Its exit status becomes the status of `vmbuild run`.
set -eu

RESULTS=${RESULTS:-/var/lib/job/output}
mkdir -p "$RESULTS"

echo "__NAME__: running on $(uname -n), Linux $(uname -r), arguments: $*"

count=0
if [ -n "${VMBUILD_INPUT:-}" ]; then
    # Every regular file but the runner's own settings file; names may contain spaces.
    count=$(find "$VMBUILD_INPUT" -type f ! -name vmbuild-input.json | wc -l)
    find "$VMBUILD_INPUT" -type f ! -name vmbuild-input.json -exec ls -l {} +
else
    echo "__NAME__: no inputs (give some with: vmbuild run IMAGE.vmx --input PATH)"
fi

echo "$count input file(s)" > "$RESULTS/result.txt"
echo "__NAME__: done, wrote $RESULTS/result.txt"
