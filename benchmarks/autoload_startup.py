"""Start-up cost of the autoload .pth: interleaved `python -c pass` runs.

Usage: python benchmarks/autoload_startup.py VENV/bin/python N
VENV must have mergekit-expert installed with its .pth; the script moves the
.pth aside for the "no .pth" runs and puts it back. Prints median/mean/min.
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

PY = sys.argv[1]
N = int(sys.argv[2])
code = sys.argv[3] if len(sys.argv) > 3 else "pass"
site = subprocess.check_output(
    [PY, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
).strip()
pth = os.path.join(site, "mergekit_expert_autoload.pth")
env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def once(extra):
    t = time.perf_counter()
    subprocess.run([PY, "-c", code], env={**env, **extra}, check=True)
    return time.perf_counter() - t


res = {"no .pth": [], ".pth on": [], ".pth, MERGEKIT_EXPERT_AUTOLOAD=0": []}
for _ in range(N):
    shutil.move(pth, pth + ".off")
    try:
        res["no .pth"].append(once({}))
    finally:
        shutil.move(pth + ".off", pth)
    res[".pth on"].append(once({}))
    res[".pth, MERGEKIT_EXPERT_AUTOLOAD=0"].append(
        once({"MERGEKIT_EXPERT_AUTOLOAD": "0"})
    )
for k, v in res.items():
    v = sorted(v)
    print(
        f"{k:34s} median {statistics.median(v) * 1e3:7.2f} ms  mean {statistics.mean(v) * 1e3:7.2f} ± {statistics.stdev(v) * 1e3:5.2f} ms  min {v[0] * 1e3:6.2f} ms  (n={len(v)})"
    )
