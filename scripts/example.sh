#!/usr/bin/env bash
# Set up, then build, validate and run the hello example end to end:
#   recipe -> base (cached) -> Packer + Ansible -> VMDK + VMX -> boot test -> vmbuild run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-out/hello}
.venv/bin/vmbuild examples/hello/recipe.yaml -o "$out"
echo "--- running the image with the suspend-aware runner:"
.venv/bin/vmbuild run "$out/hello.vmx" --workdir "$out.work" --output-dir "$out.results"
echo "--- the job's outputs directory, back on the host ($out.results):"
ls -l "$out.results"
