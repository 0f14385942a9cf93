"""The example notebooks in examples/: stored without outputs, and each one runs top to bottom.

They are executed with nbclient in a kernel started from this interpreter (so in the project's
environment), in a temporary working folder, with `LATENT_PRIOR_EXAMPLES_FAST=1` (shorter training,
shown in each notebook's settings cell) and `LATENT_PRIOR_EXAMPLE_OFFLINE=1` (the Stable Diffusion
notebook then builds a tiny local AutoencoderKL and an image folder instead of using the hub).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ["quickstart.ipynb", "wrap_your_own_vae.ipynb", "stable_diffusion_vae.ipynb"]
KERNEL = "latent-prior-tests"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = json.loads((EXAMPLES / name).read_text())
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, (
            f"{name}: code cell {i} holds outputs; clear them before committing "
            "(jupyter nbconvert --clear-output --inplace examples/*.ipynb)"
        )


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec that runs this very interpreter, and the environment the notebooks are tested in."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "latent-prior tests",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("LATENT_PRIOR_EXAMPLES_FAST", "1")
    monkeypatch.setenv("LATENT_PRIOR_EXAMPLE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    work = tmp_path / "work"
    work.mkdir()
    return work


# All three together took 49 s here (2 shared cores), under the 90 s above which a test is marked slow.
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env):
    import nbclient  # in the [dev] extra, with nbformat and ipykernel
    import nbformat

    nb = nbformat.read(EXAMPLES / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(kernel_env)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if out.output_type == "error"]
    assert not errors
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs if "image/png" in out.get("data", {})]
    assert images, f"{name} shows no pictures"
