"""The built wheel carries what it needs (issue: a wheel that installs anywhere).

scripts/wheel.sh builds the wheel and grafts libhwy into it; here it is
installed into a fresh virtual environment without this machine's site
packages, and its _core must load Highway from inside the wheel and compute the
same KL as a float64 numpy reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, sys
import numpy as np
import logitparity, logitparity._core as core
a = np.load(sys.argv[1]); b = np.load(sys.argv[2])
m = logitparity.compare_logits(a, b)
print(json.dumps({"package": os.path.dirname(logitparity.__file__), "core": core.__file__,
                  "kl": [float(x) for x in m.kl_ref_cand]}))
"""


def _kl64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    la = a - a.max(1, keepdims=True)
    la -= np.log(np.exp(la).sum(1, keepdims=True))
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(1)


def test_wheel_installs_into_a_fresh_venv_and_loads_highway_from_the_wheel(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(["bash", str(ROOT / "scripts" / "wheel.sh"), str(dist)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    (wheel,) = dist.glob("logitparity-*-manylinux_*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"numpy=={np.__version__}", str(wheel)],
                   check=True, env=env)

    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, 1003)).astype(np.float32)  # odd width: the vector tail
    b = (a + 0.3 * rng.normal(size=a.shape)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = subprocess.run([str(py), "-I", "-c", PROBE, str(tmp_path / "a.npy"), str(tmp_path / "b.npy")],
                         check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    got = json.loads(out.stdout)

    # The package imported is the installed wheel, not this checkout.
    assert Path(got["package"]).is_relative_to(venv), got["package"]
    np.testing.assert_allclose(got["kl"], _kl64(a, b), rtol=1e-5)

    # Highway resolves to the copy grafted into the wheel (logitparity.libs/),
    # never to the system's /usr/lib libhwy.so.1.
    ldd = subprocess.run(["ldd", got["core"]], check=True, capture_output=True, text=True).stdout
    (hwy,) = [line for line in ldd.splitlines() if "libhwy" in line]
    assert "logitparity.libs" in hwy and "/usr/lib" not in hwy, hwy

    # The console script runs from the wheel too.
    cli = subprocess.run([str(venv / "bin" / "logitparity"), "--help"], env=env, capture_output=True, text=True)
    assert cli.returncode == 0 and "compare" in cli.stdout, cli.stderr
