"""The benchmark suite `python -m bench` (bench/run.py), run for real on its quickest cell.

One --quick run of the flat β = 0.1 digits cell (a 40-epoch digits VAE, three 120-step fits: the defaults', flow
matching's and one --variants fit; 300 samples per method) is shared by the tests that need it: ~50 s on one thread, so they are marked slow (CI runs them in
their own step); the rendering and refusal tests without it run by default.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from _cli import argv as cli_words  # `argv` names the bench's own command lines here
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `bench/` lives at the repo root, outside the installed package

from bench import run as suite  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("suite")
    argv = cli_words("--quick --sets digits-flat --seeds 0 --methods", ",".join(suite.METHODS), "--variants narrow:flow_hidden=32")
    argv += cli_words("--out", tmp / "b.md", "--json", tmp / "s.json", "--threads 1 --cache-dir", tmp / "cache")
    assert suite.main(argv) == 0
    return tmp, argv


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_quick_run_writes_tables_targets_and_grid(quick_run):
    tmp, argv = quick_run
    md = (tmp / "b.md").read_text()
    assert "python -m bench " + " ".join(argv) in md  # the exact command in the header
    assert "## digits-d8-b0.1" in md and "--quick run" in md  # the earlier cell name is an alias
    section = md.split("## digits-d8-b0.1")[1].split("## Goals, cell by cell")[0]
    table_rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    cell = json.loads((tmp / "s.json").read_text())["cells"]["digits-d8-b0.1"]
    for label in (suite._method_label(m, cell) for m in suite.METHODS):  # the GMM row names its covariance
        row = next((r for r in table_rows if r.startswith(f"| {label}")), None)
        assert row is not None, label
        assert "failed" not in row, row
    assert "Image metrics: not computed for flat latents" in section  # FID judges the spatial cells only
    targets = md.split("## Goals, cell by cell")[1].split("## How to read")[0]
    for target in (
        "excess FD ≤ GMM's (2 s.e.)",
        "excess FD ≤ ⅓ N(0, I)'s",
        "digit confidence ≥ GMM's",
        "ELBO gain > 0 on held-out data",
        "faster than Langevin(60)",
        "default fit ≤ 120 s",
    ):
        line = next(line for line in targets.splitlines() if target in line)
        assert any(v in line for v in ("PASS", "MISS", "N/A")), line
    assert "| EVaLP [narrow] sampler |" in section and "variant narrow: flow_hidden=32" in section
    summary = md.split("## Summary")[1].split("## digits-d8-b0.1")[0]
    row = next(line for line in summary.splitlines() if line.startswith("| digits-d8-b0.1 | 8, 1500 |"))
    assert "conf 0." in row  # the quality column: the digit classifier, EVaLP / GMM
    assert "| EVaLP sampler |" in summary and "| goal | PASS |" in summary  # median ranks and the goals' tally
    assert "## GPU profile (not run here)" in md
    grid = tmp / "b" / "digits-d8-b0.1.png"
    assert "(b/digits-d8-b0.1.png)" in md
    with Image.open(grid) as image:
        image.load()
        assert image.width > 7 * 8 * 8 and image.height > 8 * 8  # 7 panels of 8×8 digits, 8 per row


def test_a_full_runs_spatial_cell_takes_at_least_twice_as_many_latent_samples_as_dims():
    assert suite.default_samples("spatial", 4 * 8 * 8, quick=False) == suite.FULL_SAMPLES["spatial"] == 1000
    assert suite.default_samples("spatial", 32 * 8 * 8, quick=False) == 4096
    assert suite.default_samples("flat", 64, quick=False) == suite.FULL_SAMPLES["flat"]
    assert suite.default_samples("spatial", 4 * 32 * 32, quick=True) == suite.QUICK_SAMPLES["spatial"]


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_quick_run_json_holds_the_figures(quick_run):
    tmp, _ = quick_run
    result = json.loads((tmp / "s.json").read_text())
    cell = result["cells"]["digits-d8-b0.1"]
    assert cell["seeds"] == [0] and cell["samples"] == suite.QUICK_SAMPLES["flat"]
    for method in suite.METHODS:
        agg = cell["methods"][method]
        assert not agg["errors"], (method, agg["errors"])
        assert math.isfinite(agg["excess_fd"]["median"]) and 0.0 <= agg["hole_share"]["median"] <= 1.0
        assert 0.0 <= agg["conf"]["median"] <= 1.0  # digit classifier on decoded samples
    assert cell["methods"]["flow-matching"]["nfe"]["median"] == 63  # Heun, 32 steps
    # the --variants fit: its own row, fit and settings, beside the defaults'
    narrow = cell["methods"]["evalp[narrow]"]
    assert not narrow["errors"] and math.isfinite(narrow["excess_fd"]["median"]) and math.isfinite(narrow["elbo_gain_nats"]["median"])
    assert cell["variants"] == {"narrow": {"flow_hidden": 32}} and "evalp[narrow]" in cell["per_seed"][0]["fits"]
    assert narrow["fit_seconds"]["median"] == cell["per_seed"][0]["fits"]["evalp[narrow]"]["seconds"]
    assert math.isfinite(cell["methods"]["evalp"]["elbo_gain_nats"]["median"])
    # a β = 0.1 VAE's latents are far from N(0, I): even a 120-step EVaLP fit is much closer than the Gaussian
    assert cell["methods"]["evalp"]["excess_fd"]["median"] < cell["methods"]["gaussian"]["excess_fd"]["median"]
    assert {t["status"] for t in result["targets"]} <= {"pass", "noise", "miss", "n/a"}
    assert result["machine"]["cpu_count"] and result["machine"]["torch"]


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_rerender_reproduces_the_markdown(quick_run):
    tmp, _ = quick_run
    assert suite.main(["--rerender", str(tmp / "s.json"), "--out", str(tmp / "b.md.again")]) == 0
    # same folder, so the grid links resolve alike
    assert (tmp / "b.md.again").read_text() == (tmp / "b.md").read_text()


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_quick_without_out_refuses(quick_run, capsys):
    tmp, _ = quick_run
    target = REPO / "docs" / "benchmarks.md"
    before = target.read_bytes() if target.exists() else None
    assert suite.main(["--quick", "--sets", "digits-flat"]) == 2
    assert "--quick without --out" in capsys.readouterr().err
    assert suite.main(["--rerender", str(tmp / "s.json")]) == 2  # nor may a quick run's JSON be rendered over it
    assert "holds a --quick run" in capsys.readouterr().err
    assert (target.read_bytes() if target.exists() else None) == before


def test_gpu_profile_names_what_is_missing(tmp_path, capsys):
    assert suite.main(["--gpu", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "g.md")]) == 2
    err = capsys.readouterr().err
    assert "--gpu (cifar10, latent 128)" in err and "nowhere/cifar10/train" in err
    assert err.count("error:") == 1 and not (tmp_path / "g.md").exists()


#: one seed's figures for a method that ran well, as `suite.aggregate_cell` takes them
ROW = {
    "excess_fd": 0.1,
    "mmd2": 1e-3,
    "hole_share": 0.02,
    "c2st_auc": 0.6,
    "precision": 0.8,
    "recall": 0.8,
    "samples_per_second": 1000.0,
    "fit_seconds": 1.0,
}


def test_a_failed_method_is_a_table_cell_not_a_crash():
    """Langevin diverging on every seed: its row and the speed target say so; the other rows stay."""
    per_seed = [{"rows": {m: ({"error": "diverged"} if m == "langevin" else dict(ROW)) for m in suite.METHODS}, "fits": {}} for _ in (0, 1)]
    cell = {
        "cell": "photos",
        "seeds": [0, 1],
        "methods": suite.aggregate_cell(per_seed, [0, 1]),
        "images": "skipped: test",
        "latent_shape": [4, 8, 8],
        "n_train": 3000,
        "spatial": True,
    }
    table = suite.cell_table(cell)
    assert any(line.startswith(f"| {suite.METHODS['langevin']} | diverged |") for line in table)
    assert any(line.startswith(f"| {suite.METHODS['evalp']} | +0.1000 [+0.1000 … +0.1000] |") for line in table)
    result = {"config": {"quick": False}, "machine": {"torch_threads": 1}, "cells": {"photos": cell}}
    speed = next(t for t in suite.evaluate_targets(result) if "Langevin" in t["target"])
    assert speed["status"] == "n/a" and "diverged" in speed["detail"]
    # a cell that failed as a whole (e.g. its VAE could not be trained) is reported, and its targets are N/A
    broken = {"cell": "photos", "description": "photos", "error": "LatentPriorError: no photos"}
    assert "**The cell failed**: LatentPriorError: no photos" in "\n".join(suite.cell_section(broken, None))
    result["cells"] = {"photos": broken}
    assert [t["status"] for t in suite.evaluate_targets(result)] == ["n/a"]


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_report_measures_the_other_methods_when_one_fails(quick_run):
    """`_report` falls back to one method at a time: the failing method (here one latent_report refuses) gets
    an error, the others their figures, from a real short fit on the cell's latents."""
    from bench.datasets import load_set
    from latent_prior.train import fit

    tmp, _ = quick_run
    lset = load_set("digits-b0.1", cache_dir=tmp / "cache", quick=True, verbose=False)  # the VAE the quick run trained
    budget = dict(steps=20, checkpoint_every=10, batch_size=128, eval_samples=256, eval_latents=256, log_z_samples=512, quiet=True)
    prior = fit(str(lset.save_train(tmp / "train.safetensors")), out=str(tmp / "tiny-prior"), **budget)
    source, train, heldout = suite._memory_source(lset)
    kept = {}
    report, errors = suite._report(
        prior,
        source,
        heldout,
        train,
        ["gaussian", "no-such-method", "evalp"],
        samples=60,
        seed=0,
        evaluations=2,
        gain=True,
        keep=lambda m, z: kept.setdefault(m, z),
        log=lambda msg: None,
    )
    assert list(errors) == ["no-such-method"] and errors["no-such-method"].startswith("failed: LatentPriorError")
    assert [r["method"] for r in report["rows"]] == ["gaussian", "evalp"] and set(kept) == {"gaussian", "evalp"}
    assert {len(z) for z in kept.values()} == {120} and report["evaluations"] == 2  # both evaluations' samples
    assert math.isfinite(report["elbo_gain"]["gain_nats"])


def test_worker_command_drops_the_flags_the_parent_sets():
    argv = ["--sets", "a,b", "--jobs=2", "--image-samples", "200", "--out", "x.md", "--json-out=y.json", "--quick"]
    kept = suite._without_flags(argv, ("--sets", "--jobs", "--out", "--json", "--json-out"))
    assert kept == ["--image-samples", "200", "--quick"]


@pytest.mark.slow
def test_jobs_runs_cells_in_worker_processes(tmp_path, quick_run):
    """--jobs 2: two cells measured by two `python -m bench` workers, merged into one page, grids where the page
    links them. Reuses the quick run's digits VAE cache for the β = 0.1 cell (~60 s on 2 cores)."""
    _, argv = quick_run
    cache = argv[argv.index("--cache-dir") + 1]
    out = tmp_path / "jobs.md"
    cells = "--quick --sets digits-flat,digits-flat-b1 --seeds 0 --image-samples 4 --jobs 2"
    assert suite.main(cli_words(cells, ["--cache-dir", cache], "--out", out, "--json", tmp_path / "jobs.json")) == 0
    result = json.loads((tmp_path / "jobs.json").read_text())
    assert set(result["cells"]) == {"digits-d8-b0.1", "digits-d8-b1"}  # the earlier names are aliases
    assert all("error" not in cell and cell["methods"]["evalp"]["excess_fd"]["median"] is not None for cell in result["cells"].values())
    assert result["machine"]["torch_threads"] == 1 and "--jobs 2" in result["machine"]["threads_reason"]
    md = out.read_text()
    for cell in result["cells"]:
        assert f"## {cell}" in md and (tmp_path / "jobs" / f"{cell}.png").is_file()


def test_variants_are_parsed_against_fitconfig():
    from bench.fits import parse_overrides, parse_variants

    assert parse_overrides(["forward_kl_weight=5", "flow_kind=spline", "spectral_norm=true", "betas=0.9/0.99"], "--variants a:...:") == {
        "forward_kl_weight": 5,
        "flow_kind": "spline",
        "spectral_norm": True,
        "betas": (0.9, 0.99),
    }
    assert parse_variants(("a:steps=10,flow_hidden=64", "b:")) == {"a": {"steps": 10, "flow_hidden": 64}, "b": {}}


def test_bad_jobs_and_image_samples_are_refused(tmp_path, capsys):
    for flag, value in (
        ("--jobs", "0"),
        ("--image-samples", "-1"),
        ("--evaluations", "0"),
        ("--variants", "no-colon"),
        ("--variants", "a:not_a_field=1"),
        ("--variants", "a:seed=2"),
    ):
        assert suite.main([flag, value, "--out", str(tmp_path / "x.md"), "--json", str(tmp_path / "x.json")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}" in err and err.count("error:") == 1
    assert not (tmp_path / "x.md").exists() and not (tmp_path / "x.json").exists()


@pytest.mark.slow  # the --quick run of one cell (~50 s): the benchmark harness, in CI's slow step
def test_merge_adds_another_runs_cells_with_a_note_and_rebuilds_the_page(quick_run, capsys):
    tmp, _ = quick_run
    run = json.loads((tmp / "s.json").read_text())
    ((name, cell),) = run["cells"].items()
    other = dict(run, command="python -m bench --sets other", cells={"other-cell": dict(cell, cell="other-cell")})
    (tmp / "other.json").write_text(json.dumps(other))
    (tmp / "merged.json").write_text(json.dumps(run))
    assert suite.main(["--merge", str(tmp / "other.json"), "--json", str(tmp / "merged.json"), "--out", str(tmp / "merged.md")]) == 0
    merged = json.loads((tmp / "merged.json").read_text())
    assert set(merged["cells"]) == {name, "other-cell"}
    assert any("other-cell" in n and "python -m bench --sets other" in n for n in merged["notes"])
    page = (tmp / "merged.md").read_text()
    assert "## other-cell" in page and f"## {name}" in page and "python -m bench --sets other" in page
    # the merged cell's sample grid is copied beside the page, where its link points
    assert merged["cells"]["other-cell"]["grid"] == str(tmp / "merged" / Path(cell["grid"]).name)
    assert (tmp / "merged" / Path(cell["grid"]).name).is_file()
    # a grid whose scratch folder is gone: taken from the page's grid folder when a copy lies there, else dropped
    gone = str(tmp / "gone" / Path(cell["grid"]).name)
    stale = dict(
        run,
        command="python -m bench --sets stale",
        cells={
            "kept-cell": dict(cell, cell="kept-cell", grid=gone),
            "lost-cell": dict(cell, cell="lost-cell", grid=str(tmp / "gone" / "lost.png")),
        },
    )
    (tmp / "stale.json").write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match="sample grid of cell lost-cell"):
        assert suite.main(["--merge", str(tmp / "stale.json"), "--json", str(tmp / "merged.json"), "--out", str(tmp / "merged.md")]) == 0
    merged = json.loads((tmp / "merged.json").read_text())
    assert merged["cells"]["kept-cell"]["grid"] == str(tmp / "merged" / Path(cell["grid"]).name)
    assert "grid" not in merged["cells"]["lost-cell"] and str(tmp / "gone") not in (tmp / "merged.md").read_text()
    # a "grid" that is not a PNG sample grid is never copied beside the page
    (tmp / "notes.txt").write_text("not a grid")
    odd = dict(run, cells={"odd-cell": dict(cell, cell="odd-cell", grid=str(tmp / "notes.txt"))})
    (tmp / "odd.json").write_text(json.dumps(odd))
    assert suite.main(["--merge", str(tmp / "odd.json"), "--json", str(tmp / "merged.json"), "--out", str(tmp / "merged.md")]) == 2
    assert "not a .png sample grid" in capsys.readouterr().err and not (tmp / "merged" / "notes.txt").exists()
    # a --quick run's cells may not join a full run
    (tmp / "full.json").write_text(json.dumps(dict(run, config=dict(run["config"], quick=False))))
    assert suite.main(["--merge", str(tmp / "other.json"), "--json", str(tmp / "full.json"), "--out", str(tmp / "full.md")]) == 2
    assert "cannot join a full run" in capsys.readouterr().err


@pytest.mark.slow  # shares the --quick run of one cell
def test_merge_joins_other_seeds_of_a_cell_and_refuses_a_different_cell(quick_run, capsys):
    tmp, _ = quick_run
    run = json.loads((tmp / "s.json").read_text())
    ((name, cell),) = run["cells"].items()
    seeds = cell["seeds"]
    new_seed = max(seeds) + 7
    moved = json.loads(json.dumps(cell["per_seed"][0]))
    moved["rows"]["evalp"]["excess_fd"] += 1.0
    other = dict(run, command="python -m bench --seeds more", cells={name: dict(cell, seeds=[new_seed], per_seed=[moved])})
    (tmp / "seeds.json").write_text(json.dumps(other))
    (tmp / "joined.json").write_text(json.dumps(run))
    assert suite.main(["--merge", str(tmp / "seeds.json"), "--json", str(tmp / "joined.json"), "--out", str(tmp / "joined.md")]) == 0
    joined = json.loads((tmp / "joined.json").read_text())["cells"][name]
    assert joined["seeds"] == [*seeds, new_seed] and len(joined["per_seed"]) == len(seeds) + 1
    values = [s["rows"]["evalp"]["excess_fd"] for s in joined["per_seed"]]
    assert joined["methods"]["evalp"]["excess_fd"]["n"] == len(values) and joined["methods"]["evalp"]["excess_fd"]["max"] == max(values)
    assert Path(joined["grid"]).name == Path(cell["grid"]).name and Path(joined["grid"]).is_file()  # the first seed's grid
    page = (tmp / "joined.md").read_text()
    assert f"seeds {', '.join(map(str, [*seeds, new_seed]))}" in page and f"seeds {new_seed} of cells {name}" in page
    # a cell measured with other flags cannot lend it seeds
    different = dict(run, cells={name: dict(cell, seeds=[new_seed + 1], per_seed=[moved], samples=cell["samples"] + 1)})
    (tmp / "different.json").write_text(json.dumps(different))
    assert suite.main(["--merge", str(tmp / "different.json"), "--json", str(tmp / "joined.json"), "--out", str(tmp / "joined.md")]) == 2
    assert "differs in samples" in capsys.readouterr().err


def test_a_spatial_cell_shows_the_decoded_training_posteriors_as_the_fid_floor():
    """The floor row (decoded posterior draws of training items) sits under the methods' image columns, and the FID
    targets quote it beside their verdict."""
    per_seed = [{"rows": {m: dict(ROW) for m in ("gaussian", "gmm", "evalp")}, "fits": {}}]
    image = {"kid": 0.1, "kid_std": None, "n_samples": 200, "n_real": 200, "precision": 0.2, "recall": 0.1}
    images = {
        "n_real": 200,
        "seconds": 1.0,
        "extractor": "x.pt",
        "floor": dict(image, fid=250.0),
        "rows": {"gaussian": dict(image, fid=300.0), "gmm": dict(image, fid=280.0), "evalp": dict(image, fid=270.0)},
    }
    cell = {
        "cell": "photos",
        "seeds": [0],
        "methods": suite.aggregate_cell(per_seed, [0]),
        "images": images,
        "methods_run": ["gaussian", "gmm", "evalp"],
        "latent_shape": [4, 8, 8],
        "n_train": 3000,
        "spatial": True,
    }
    floor = next(line for line in suite.cell_table(cell) if "training posteriors, decoded" in line)
    assert floor.count("|") == suite.cell_table(cell)[0].count("|") and "250.00 (200/200)" in floor
    result = {"config": {"quick": False}, "machine": {"torch_threads": 1}, "cells": {"photos": cell}}
    fid = {t["target"]: t for t in suite.evaluate_targets(result) if "FID" in t["target"]}
    assert fid["FID ≤ GMM's"]["status"] == "pass" and fid["FID ≤ 0.8 × GMM's"]["status"] == "miss"
    assert all("training posteriors decoded: 250.00" in t["detail"] for t in fid.values())


def test_the_flagship_step_rates_leave_out_the_evaluation_that_ends_the_warm_up(tmp_path):
    """metrics.csv's clock is read before a step's evaluation, so the held-out evaluation at the end of the warm-up
    lands in the next logged row: the alternating rate starts after it, and reads the steps alone."""
    from bench.flagship import _step_seconds

    # warm-up 0.1 s/step to step 10, an evaluation of 2 s, then 0.3 s/step logged every 2 steps
    rows = [(0, 0.0), (5, 0.5), (10, 1.0)] + [(s, 1.0 + 2.0 + 0.3 * (s - 10)) for s in range(12, 21, 2)]
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,seconds\n" + "".join(f"{s},{t}\n" for s, t in rows))
    warmup, alternating = _step_seconds(csv, warmup=10)
    assert warmup == pytest.approx(0.1) and alternating == pytest.approx(0.3)


@pytest.mark.slow  # two 25-step fits (~30 s)
def test_the_warmup_shock_study_freezes_the_named_parameters_and_only_those(tmp_path, capsys):
    from safetensors.torch import load_file

    from bench import warmup_shock
    from latent_prior.trainer import Trainer

    build = Trainer._build
    variants = ["--variants", "default,frozen linear maps"]  # one word, with a space in it
    assert warmup_shock.main(cli_words("--set syn-aniso4-d8 --run", tmp_path, variants, "--steps 25 --cache-dir", tmp_path / "cache")) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" (")[0] for r in rows] == ["| default", "| frozen linear maps"]
    assert "(0 values frozen" in rows[0] and "(1,088 values frozen" in rows[1]  # 8 maps of 8×8: L, U, log s
    assert Trainer._build is build  # later fits in this process freeze nothing

    def flow(variant: str, step: int) -> dict:
        return load_file(str(tmp_path / variant / "train" / "checkpoints" / f"step-{step:07d}" / "flow.safetensors"))

    for variant, linear_moved in (("default", True), ("frozen-linear-maps", False)):
        start, end = flow(variant, 0), flow(variant, 25)
        moved = {k for k in start if not k.endswith(("perm", "sign_s", "initialized")) and not torch.equal(start[k], end[k])}
        linear = {k for k in start if k.endswith((".lower", ".upper", ".log_s"))}
        assert linear and bool(moved & linear) == linear_moved
        assert moved - linear  # the couplings train in both


def test_the_page_names_the_cells_measured_with_other_seeds():
    cells = {
        "photos": {"spatial": True, "seeds": [0]},
        "photos-16": {"spatial": True, "seeds": [0]},
        "default-vae": {"spatial": True, "seeds": [2, 0, 1]},
        "digits-d8-b1": {"spatial": False, "seeds": [0, 1, 2]},
    }
    assert suite._seeds_of({"cells": cells}, spatial=True) == "0 (default-vae: 0,1,2)"
    assert suite._seeds_of({"cells": cells}, spatial=False) == "0,1,2"
    assert suite._seeds_of({"cells": {}}, spatial=True) == ""


def test_checkpoint_fid_refuses_a_seed_that_is_not_the_fitted_runs(tmp_path, capsys):
    from bench import checkpoint_fid

    (tmp_path / "run" / "prior").mkdir(parents=True)
    (tmp_path / "run" / "prior" / "config.json").write_text(json.dumps({"training": {"config": {"seed": 1}}}))
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        checkpoint_fid.main(cli_words("--set syn-aniso4-d8 --run", tmp_path / "run", "--cache-dir", cache))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--seed 0" in err and "holds a fit with seed 1" in err and err.count("error:") == 1
    assert not cache.exists()  # refused before any cell was built
    (tmp_path / "run" / "prior" / "config.json").write_text("{not json")  # a prior/ folder latent-prior did not write
    with pytest.raises(SystemExit) as exit_:
        checkpoint_fid.main(cli_words("--set syn-aniso4-d8 --run", tmp_path / "run", "--cache-dir", cache))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "is not a latent-prior fit's" in err and "config.json" in err and not cache.exists()


def test_the_selection_study_reports_the_best_test_fd_checkpoint_beside_the_rules():
    from bench.selection_rules import ORACLE, table

    rows = []
    for seed in (0, 1):
        rows.append({"cell": "c", "seed": seed, "rule": "GMM row", "excess_fd": 0.01})
        rows.append({"cell": "c", "seed": seed, "rule": "gain_and_fd", "step": 0, "excess_fd": 0.02})
        rows += [
            {"cell": "c", "seed": seed, "rule": "checkpoint", "step": s, "excess_fd": fd}
            for s, fd in ((0, 0.02), (250, 0.005), (500, 0.03))
        ]
    lines = table(rows).splitlines()
    summary = {line.split(" | ")[0][2:]: line for line in lines[:4]}
    assert "| 0 of 1 | 0 of 1 |" in summary["gain_and_fd"]
    assert "| 1 of 1 | 1 of 1 |" in summary[ORACLE] and "| — |" in summary[ORACLE]  # not ranked among the rules
    assert "| c | 0/0 | 250/250 |" in lines  # the steps each exported


def test_the_fd_floor_study_scores_other_training_items_against_the_validation_layout(tmp_path, capsys):
    from bench import fd_floor

    cache = tmp_path / "cache"
    assert fd_floor.main(cli_words("--set syn-aniso4-d8 --items 300 --splits 2 --cache-dir", cache)) == 0
    out = capsys.readouterr().out.splitlines()
    floors = [float(line.split("FD ")[1]) for line in out if line.startswith("split ")]
    assert len(floors) == 2 and all(0 < f < 1 for f in floors)  # 8 dims, 300 items: a small floor
    assert out[-1].startswith("syn-aniso4-d8, 300 items × 7 draws, 8 dims: floor ")
    with pytest.raises(SystemExit) as exit_:
        fd_floor.main(cli_words("--set syn-aniso4-d8 --items 5000 --cache-dir", cache))
    assert exit_.value.code == 2 and "--items 5000" in capsys.readouterr().err


def test_a_cell_measured_again_leaves_the_notes_of_the_run_it_replaces():
    notes = [
        "cells photos come from another run: `python -m bench --sets photos` (date)",
        "cells photos-16, photos-c32 come from another run: `python -m bench --sets photos-16,photos-c32` (date)",
        "cells a and seeds 2 of cells b, photos come from another run: `python -m bench --sets a,b,photos` (date)",
        "the photos run shared the 2 cores with another: its times are upper bounds",
    ]
    assert suite._forget_replaced(notes, ["photos", "photos-c32", "a"]) == [
        "cells photos-16 come from another run: `python -m bench --sets photos-16,photos-c32` (date)",
        "seeds 2 of cells b come from another run: `python -m bench --sets a,b,photos` (date)",
        "the photos run shared the 2 cores with another: its times are upper bounds",  # free text is kept as written
    ]


def test_the_fit_time_goal_takes_its_verdict_from_a_fit_alone_when_the_run_shared_the_cores(tmp_path, capsys):
    """A --jobs 2 run's fit times are upper bounds (N/A); `python -m bench.fit_time --into` records fits alone,
    which then decide the goal, and a cell measured again replaces its own rows only."""
    from bench import fit_time

    per_seed = [{"rows": {m: dict(ROW) for m in ("gaussian", "gmm", "evalp")}, "fits": {}}]
    cell = {"cell": "digits-d8-b1", "seeds": [0], "methods": suite.aggregate_cell(per_seed, [0]), "latent_shape": [8], "n_train": 1500}
    result = {
        "config": {"quick": False, "jobs": 2},
        "machine": {"torch_threads": 1},
        "cells": {"digits-d8-b1": cell, "digits-d64-b1": {**cell, "cell": "digits-d64-b1", "latent_shape": [64]}},
    }

    def verdicts() -> dict[str, tuple[str, str]]:
        return {t["cell"]: (t["status"], t["detail"]) for t in suite.evaluate_targets(result) if "default fit" in t["target"]}

    assert {c: v[0] for c, v in verdicts().items()} == {"digits-d8-b1": "n/a", "digits-d64-b1": "n/a"}
    suite_json = tmp_path / "suite.json"
    suite_json.write_text(json.dumps(result))

    def alone(rows: list[tuple[str, float]], code: str) -> dict:
        fits = [
            {"cell": c, "seed": 0, "dims": 8, "n_train": 1500, "seconds": s, "selected_step": 0, "load_before": 0.1, "load_after": 1.0}
            for c, s in rows
        ]
        return {"command": "python -m bench.fit_time", "code": code, "date": "today", "threads": 2, "cpu_count": 2, "rows": fits}

    fit_time.record_into(suite_json, alone([("digits-d8-b1", 150.0), ("digits-d64-b1", 100.0)], "git a"))
    fit_time.record_into(suite_json, alone([("digits-d8-b1", 90.0)], "git b"))
    result = json.loads(suite_json.read_text())
    assert [[r["cell"] for r in run["rows"]] for run in result["fit_time"]["runs"]] == [["digits-d64-b1"], ["digits-d8-b1"]]
    got = verdicts()
    assert got["digits-d8-b1"][0] == "pass" and "seed 0 90.0 s" in got["digits-d8-b1"][1] and "git b" in got["digits-d8-b1"][1]
    assert got["digits-d64-b1"][0] == "pass" and "100.0 s" in got["digits-d64-b1"][1]
    fit_time.record_into(suite_json, alone([("digits-d64-b1", 121.0)], "git c"))
    result = json.loads(suite_json.read_text())
    assert verdicts()["digits-d64-b1"][0] == "miss"
    # the command line records an earlier --json into a page's results without measuring: here a copy of the repo's
    record, page, suite_copy = tmp_path / "fit_time.json", tmp_path / "page.md", tmp_path / "suite_copy.json"
    record.write_text(json.dumps(alone([("digits-d64-b1", 121.0)], "git c")))
    suite_copy.write_text((REPO / "bench" / "results" / "suite.json").read_text())
    assert fit_time.main(cli_words("--rerender", record, "--into", suite_copy, "--out", page)) == 0
    line = next(line for line in page.read_text().splitlines() if line.startswith("| digits-d64-b1 | default fit"))
    assert "**MISS**" in line and "121.0 s" in line and "git c" in line
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for args in (["--rerender", broken, "--into", suite_copy], ["--rerender", record, "--into", broken]):  # unreadable: named
        before = broken.read_text()
        assert fit_time.main(cli_words(*args)) == 2
        assert str(broken) in capsys.readouterr().err and broken.read_text() == before
    for cell in ("no-such-cell", "photos-16"):  # an unknown cell, and one outside the goal: refused before any work
        with pytest.raises(SystemExit):
            fit_time.main(["--sets", cell])
    assert fit_time.flat_cells() and not set(fit_time.flat_cells()) & set(suite.SPATIAL_CELLS)
