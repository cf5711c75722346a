"""A tiny job: greet, describe the machine, leave a result in the outputs directory."""

import os
import platform
import sys
from pathlib import Path

greeting = os.environ.get("GREETING", "hello")
args = sys.argv[1:]
print(f"{greeting} from the guest: {platform.node()} running Linux {platform.release()}")
print(f"python {platform.python_version()}, {os.cpu_count()} cpu(s), arguments: {args}")

outputs = Path("/var/lib/job/output")
outputs.mkdir(parents=True, exist_ok=True)
(outputs / "result.txt").write_text(f"{greeting} {' '.join(args)}\n".rstrip() + "\n")
print("wrote", outputs / "result.txt")
