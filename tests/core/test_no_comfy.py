"""fera_core imports and works with ComfyUI absent (every ComfyUI module made unimportable)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r"""
    import importlib.abc, json, sys

    BLOCKED = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "execution"}

    attempts = []

    class NoComfy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or name.startswith("comfy"):
                attempts.append(name)
                raise ImportError(f"ComfyUI is absent: {name}")
            return None

    sys.meta_path.insert(0, NoComfy())
    for name in ("comfy", "comfy_api.latest", "folder_paths", "server"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"blocker failed for {name}")
    if attempts != ["comfy", "comfy_api", "folder_paths", "server"]:
        raise SystemExit(f"blocker did not see the imports: {attempts}")
    attempts.clear()

    import torch
    import fera_core
    from fera_core import FeRAConfig, FeRAModel, band_energies
    from fera_core.trace import RoutingTrace

    z = torch.randn(2, 4, 32, 32)
    e = band_energies(z, 3, "reference")
    e_part = band_energies(z, 3, "partition")

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = (torch.nn.Linear(8, 8) for _ in range(3))
        def forward(self, x):
            return self.to_q(x) + self.to_k(x) + self.to_v(x)

    model = Attn()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        base = model(x)
        fm = FeRAModel(model, FeRAConfig())
        for layer in fm.fera_layers:
            torch.nn.init.normal_(layer.experts.up)
        w = fm.prepare_forward(z)
        out = model(x)
    trace = RoutingTrace()
    trace.record(fm.current_e_t, w)
    print(json.dumps({
        "energies_sum": e.sum(1).tolist(), "partition_sum": e_part.sum(1).tolist(),
        "layers": len(fm.fera_layers), "changed": (out - base).abs().max().item(),
        "rows": len(trace.rows()),
        "attempted": attempts,
        "comfy_modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("comfy")),
        "pack_modules": sorted(m for m in sys.modules if m == "nodes" or m.startswith("nodes.")),
    }))
""")


def test_fera_core_works_without_comfyui(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert all(abs(s - 1) < 1e-5 for s in result["energies_sum"])
    assert all(abs(s - 1) < 1e-5 for s in result["partition_sum"])
    assert result["layers"] == 3 and result["changed"] > 1e-3 and result["rows"] == 2
    assert result["attempted"] == []  # fera_core never even tries to import ComfyUI
    assert result["comfy_modules"] == []
    assert result["pack_modules"] == []  # the pack's ComfyUI glue (nodes/) is not dragged in either
