"""A tiny job: greet, describe the machine, leave a result in the outputs directory.

It imports only `os` and `sys`, which Python has loaded before any job code runs: a job VM's
start is paid at every run, and under TCG (no hardware virtualisation) importing `platform`
and `pathlib` was half a second before the first line.
"""

import os
import sys

greeting = os.environ.get("GREETING", "hello")
args = sys.argv[1:]
machine = os.uname()
print(f"{greeting} from the guest: {machine.nodename} running Linux {machine.release}")
print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), arguments: {args}")

outputs = "/var/lib/job/output"
os.makedirs(outputs, exist_ok=True)
result = os.path.join(outputs, "result.txt")
with open(result, "w") as f:
    f.write(f"{greeting} {' '.join(args)}\n".rstrip() + "\n")
print("wrote", result)
