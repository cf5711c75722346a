"""A simulation that runs for hours: the 2D Ising model (Metropolis Monte Carlo).

An L x L lattice of spins at temperature T (periodic boundaries), swept SWEEPS times. Every
PROGRESS_EVERY seconds it prints the sweep count, the energy and the magnetisation per spin,
and appends the same to progress.csv in $RESULTS (flushed and fsync'ed, so what was measured
survives however the job ends). At the end it writes result.txt.

It keeps no checkpoint of its own: `vmbuild run` saves the whole VM on the scheduler's
signal and resumes it, so the job never notices it was stopped.

Environment: SIZE (L, default 48), TEMPERATURE (default 2.269, the critical point),
SWEEPS (default 10000000: about 6 hours at native speed, days under QEMU's TCG),
SEED (default 1), PROGRESS_EVERY (seconds, default 5).
"""

import math
import os
import random
import signal
import sys
import time
from pathlib import Path

size = int(os.environ.get("SIZE", "48"))
temperature = float(os.environ.get("TEMPERATURE", "2.269"))
sweeps = int(os.environ.get("SWEEPS", "10000000"))
seed = int(os.environ.get("SEED", "1"))
progress_every = float(os.environ.get("PROGRESS_EVERY", "5"))
results = Path(os.environ.get("RESULTS", "/var/lib/job/output"))

rng = random.Random(seed)
n = size * size
spins = [rng.choice((-1, 1)) for _ in range(n)]
# The probability of accepting a flip that raises the energy by dE (4 or 8, in units of J).
accept = {de: math.exp(-de / temperature) for de in (4, 8)}
neighbours = [((i // size) * size + (i + 1) % size, (i // size) * size + (i - 1) % size,
               (i + size) % n, (i - size) % n) for i in range(n)]


def sweep() -> None:
    """n attempted single-spin flips at random sites."""
    random_index = rng.randrange
    random_value = rng.random
    for _ in range(n):
        i = random_index(n)
        a, b, c, d = neighbours[i]
        de = 2 * spins[i] * (spins[a] + spins[b] + spins[c] + spins[d])
        if de <= 0 or random_value() < accept[de]:
            spins[i] = -spins[i]


def measure() -> tuple[float, float]:
    """Energy and absolute magnetisation per spin."""
    energy = -sum(spins[i] * (spins[neighbours[i][0]] + spins[neighbours[i][2]])
                  for i in range(n))
    return energy / n, abs(sum(spins)) / n


def append(line: str) -> None:
    fd = os.open(results / "progress.csv", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def stopped(signum: int, _frame: object) -> None:
    print(f"ising: stopped by {signal.Signals(signum).name} after sweep {done} of {sweeps}",
          flush=True)
    sys.exit(128 + signum)


results.mkdir(parents=True, exist_ok=True)
signal.signal(signal.SIGTERM, stopped)
print(f"ising: {size}x{size} lattice at T={temperature:g}, {sweeps} sweeps, seed {seed}; "
      f"progress every {progress_every:g}s", flush=True)
append("sweep,seconds,energy_per_spin,abs_magnetisation_per_spin")
start = last = time.monotonic()
done = 0
while done < sweeps:
    sweep()
    done += 1
    now = time.monotonic()
    if now - last >= progress_every or done == sweeps:
        last = now
        energy, magnetisation = measure()
        print(f"sweep {done}/{sweeps}  E/N={energy:+.4f}  |M|/N={magnetisation:.4f}  "
              f"({done / (now - start):.1f} sweeps/s)", flush=True)
        append(f"{done},{now - start:.1f},{energy:.6f},{magnetisation:.6f}")
energy, magnetisation = measure()
(results / "result.txt").write_text(
    f"size {size}\ntemperature {temperature}\nsweeps {sweeps}\nseed {seed}\n"
    f"energy_per_spin {energy:.6f}\nabs_magnetisation_per_spin {magnetisation:.6f}\n")
print(f"ising: done, {sweeps} sweeps in {time.monotonic() - start:.0f}s", flush=True)
