"""Sum the numbers in the *.txt files under $VMBUILD_INPUT; print and save "SUM <n>".

Each file has one number a line (integers or decimals); blank lines and lines starting with
'#' are skipped. A line that is not a number stops the job with its file and line, status 65;
no input at all stops it with status 66. Decimal arithmetic keeps 0.1 + 0.2 exact.
"""

import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

# sysexits.h codes: distinct from the runner's own statuses (2 usage, 85 and 90-92)
NO_INPUT = 66  # EX_NOINPUT
BAD_INPUT = 65  # EX_DATAERR


def fail(message: str, status: int) -> None:
    print(f"sums: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def show(value: Decimal) -> str:
    """1107.00 as 1107, 103.750 as 103.75, never 1.1E+3."""
    return format(value.normalize(), "f")


def numbers(path: Path) -> list[Decimal]:
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            found.append(Decimal(text))
        except InvalidOperation:
            fail(f"{path}:{number}: not a number: {text!r}", BAD_INPUT)
    return found


def main() -> None:
    top = os.environ.get("VMBUILD_INPUT")
    files = sorted(Path(top).rglob("*.txt")) if top else []
    if not files:
        fail("no input files: give a directory of *.txt files (one number a line) with "
             "`vmbuild run IMAGE.vmx --input DIR`", NO_INPUT)
    assert top is not None
    total = Decimal(0)
    count = 0
    for path in files:
        values = numbers(path)
        subtotal = sum(values, Decimal(0))
        print(f"{path.relative_to(top)}: {len(values)} numbers, sum {show(subtotal)}",
              flush=True)
        total += subtotal
        count += len(values)
    print(f"SUM {show(total)}", flush=True)
    results = Path(os.environ.get("RESULTS", "/var/lib/job/output"))
    results.mkdir(parents=True, exist_ok=True)
    (results / "result.txt").write_text(
        f"SUM {show(total)}\nfiles {len(files)}\nnumbers {count}\n")


if __name__ == "__main__":
    main()
