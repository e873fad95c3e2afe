"""notebooks/h2o_budget.ipynb runs on a tiny model's sweep (nbclient), so it never rots."""

from __future__ import annotations

import nbformat
import pytest
from conftest import REPO
from eval_sweep import subprocess_env, tiny_sweep

NOTEBOOK = REPO / "notebooks" / "h2o_budget.ipynb"


def test_h2o_budget_notebook_executes(tmp_path_factory, monkeypatch):
    from nbclient import NotebookClient

    sweep_dir, proc = tiny_sweep(tmp_path_factory.mktemp("eval_sweep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, value in subprocess_env().items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LLAMAHOME_SWEEP_DIR", str(sweep_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO / "notebooks")}},
    )
    client.execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"{sweep_dir}: 8 rows" in text
    assert "closer to full than window" in text
    assert "budget is within" in text or "no budget in this sweep" in text
    kinds = {kind for o in outputs for kind in o.get("data", {})}
    assert {"text/markdown", "image/png"} <= kinds  # the table and the plot


@pytest.mark.parametrize("cell_source", ["QUALITY_TOLERANCE", "LLAMAHOME_SWEEP_DIR"])
def test_notebook_is_parameterised(cell_source):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert any(cell_source in cell.source for cell in notebook.cells if cell.cell_type == "code")
