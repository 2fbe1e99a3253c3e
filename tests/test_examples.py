"""The notebook example runs as a researcher runs it: from another directory, importing `core`."""
import os
import re
import subprocess
import sys

import pytest
import torch

from core import models, patching, tasks
from tests.helpers import ROOT


@pytest.mark.slow  # .ci/run also runs the example directly
def test_notebook_example_runs_from_outside_the_repository(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # as after `pip install -e .` (CI runs it installed too)
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook_patching.py"), "figure.html"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "figure.html").stat().st_size > 10_000  # a whole plotly figure, offline
    printed = dict(re.findall(r"^  (L\dH\d): ([+-][0-9.]+)$", out.stdout, re.M))
    # The same sweep here: its three heads furthest from an unchanged run, with their values.
    model = models.load_model("ce-circuits-3l-attn")
    result = patching.sweep_task(model, tasks.make_task("ioi", model, template="when_went"), "z", direction="noise")
    order = (result.values - result.baseline).abs().flatten().argsort(descending=True)[:3].tolist()
    expected = {f"L{i // 4}H{i % 4}": float(result.values.flatten()[i]) for i in order}
    assert set(printed) == set(expected)
    for head, value in expected.items():
        assert abs(float(printed[head]) - value) < 1e-3
    assert torch.isfinite(result.values).all()
