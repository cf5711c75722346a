"""__NAME__: the job. Replace this with your own work.

It runs once when the VM boots. Inputs given with `vmbuild run IMAGE.vmx --input PATH` are
under $VMBUILD_INPUT (read-only), each under its own base name; whatever it writes to
$RESULTS comes back to `--output-dir`. Its exit status becomes the status of `vmbuild run`.
"""

import os
import platform
import sys
from pathlib import Path

results = Path(os.environ.get("RESULTS", "/var/lib/job/output"))
results.mkdir(parents=True, exist_ok=True)

print(f"__NAME__: running on {platform.node()}, Linux {platform.release()}, "
      f"Python {platform.python_version()}, arguments: {sys.argv[1:]}", flush=True)

inputs = os.environ.get("VMBUILD_INPUT")
files = []
if inputs:
    files = sorted(p for p in Path(inputs).rglob("*")
                   if p.is_file() and p.name != "vmbuild-input.json")
    for path in files:
        print(f"__NAME__: input {path.relative_to(inputs)} ({path.stat().st_size} bytes)")
else:
    print("__NAME__: no inputs (give some with: vmbuild run IMAGE.vmx --input PATH)")

(results / "result.txt").write_text(f"{len(files)} input file(s)\n")
print(f"__NAME__: done, wrote {results / 'result.txt'}", flush=True)
