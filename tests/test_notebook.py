"""notebooks/paper_figures.ipynb runs end to end on a tiny sweep over two seeds and shows every figure."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from sim.sweep import jobs, load_sweep
from sim.sweep_run import run_sweep

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "paper_figures.ipynb"

EXPERIMENTS = """\
experiments:
  tiny:
    workload:
      generator: bfcl
      params: {programs: 10, rate: 2.0}
    latency: {kind: constant, seconds: 0.01}
sweeps:
  tiny:
    experiment: tiny
    grid:
      engine.replicas: [1, 2]
      workload.params.rate: {start: 1, stop: 4, num: 2, times: engine.replicas}
      seed: [0, 1]                # the seed paths: bands, error bars, means over seeds
    policies: [fcfs, plas]
"""


def test_stored_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_executes_on_a_tiny_sweep(tmp_path, monkeypatch):
    exp = tmp_path / "exp.yaml"
    exp.write_text(EXPERIMENTS)
    sweep = load_sweep("tiny", exp)
    run_sweep(sweep, jobs(sweep, exp), tmp_path / "results", workers=1, quiet=True)

    monkeypatch.setenv("AUTELLIX_SWEEP", str(tmp_path / "results"))
    monkeypatch.setenv("AUTELLIX_FIGURES", str(tmp_path / "figures"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert len(images) == 4  # latency, throughput ratio, wait breakdown, replicas
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "16 rows from" in text and "vs fcfs" in text and "ratios paired per seed" in text
    for name in ("latency_vs_rate", "throughput_ratio", "wait_breakdown", "balancers_vs_replicas"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000
        assert (tmp_path / "figures" / f"{name}.svg").is_file()
