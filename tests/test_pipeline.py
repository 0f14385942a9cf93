"""`latent-prior fit` from images (latent_prior.pipeline): the whole run folder, on real parts.

Everything is real: the embedded default VAE (a diffusers AutoencoderKL), 64 of the bundled digit PNGs,
the trainer, the decoder, matplotlib, the evaluate module's metrics. Networks and step counts are tiny so
that one run takes a few seconds; the kill-and-resume test runs `python -m latent_prior` in a subprocess
and kills it with SIGKILL, and the distributed test starts two gloo processes with `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _cli import argv
from _launch import run_two_gloo_processes
from PIL import Image

from latent_prior import defaults
from latent_prior.cli import main
from latent_prior.config import from_dict, to_dict
from latent_prior.pipeline import RUN_FILES, RunConfig
from latent_prior.prior import LatentPrior
from latent_prior.train import FitConfig

REPO = Path(__file__).resolve().parents[1]
#: Tiny networks and budgets: a whole run (encode 64 images, fit, decode, report) takes a few seconds.
TINY = argv(
    "--batch-size 16 --checkpoint-every 10 --energy-channels 8 --energy-depth 1 --flow-channels 8 --flow-blocks 1",
    "--eval-samples 64 --eval-latents 64 --log-z-samples 128 --report-samples 100 --encode-workers 0 --quiet",
)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["fit", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """64 of the bundled digit PNGs (every class), in their <label>/ folders."""
    folder = tmp_path_factory.mktemp("digits64")
    files = sorted(Path(defaults.DEFAULT_DATA_DIR).glob("*/*.png"))[::28][:64]
    for f in files:
        (folder / f.parent.name).mkdir(exist_ok=True)
        shutil.copy(f, folder / f.parent.name / f.name)
    assert len(files) == 64
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits) -> dict:
    """One pipeline run: --config YAML (steps 12, seed 3, grid_samples 4) overridden by flags (steps 30, grid 9)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config_file = tmp / "run.yaml"
    config_file.write_text(yaml.safe_dump({"steps": 12, "seed": 3, "grid_samples": 4, "sample_method": "sampler"}))
    run_dir = tmp / "run"
    args = ["--data", digits, "--out", run_dir, "--config", config_file, *TINY, "--steps", "30", "--grid-samples", "9"]
    code, out, err = run_cli(*args)
    assert code == 0, err[-3000:]
    return {"dir": run_dir, "out": out, "err": err, "args": args, "tmp": tmp}


# ----------------------------------------------------------------------------------------------
# the config


def test_run_config_has_every_fit_field_and_needs_no_latents():
    fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
    run_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert fit_fields <= set(run_fields)
    assert {
        "vae",
        "data",
        "resolution",
        "dtype",
        "subfolder",
        "revision",
        "flip",
        "encode_batch_size",
        "encode_workers",
        "grid_samples",
        "report_samples",
        "overwrite",
    } <= set(run_fields)
    assert not run_fields["latents"].metadata.get("required") and not run_fields["out"].metadata.get("required")


def test_help_documents_the_run_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--vae", "--data", "--grid-samples", "--report-samples", "--overwrite", "--resume", "--encode-batch-size", "--latents"):
        assert flag in text
    assert "runs/default" in text and "(default: 64)" in text


def test_out_is_required_with_user_data(digits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("--data", digits, *TINY)
    assert code == 2 and "--out is required" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# the happy path


def test_run_folder_holds_every_file(run):
    d = run["dir"]
    for name in RUN_FILES:
        assert (d / name).exists(), name
    # the prior's folder holds the prior alone; the training records are beside it
    assert sorted(p.name for p in (d / "prior").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("metrics.csv", "fit_config.json", "fit_summary.json", "training.png", "checkpoints"):
        assert (d / "train" / name).exists(), name
    assert (d / "cache" / "manifest.json").is_file()
    closing = run["out"].strip().splitlines()[-1]
    assert "samples.png" in closing and "report.md" in closing
    prior = LatentPrior.from_pretrained(d / "prior")
    assert prior.latent_shape == (4, 8, 8) and prior.sample(3).shape == (3, 4, 8, 8)


def test_samples_png_has_two_labelled_halves_of_equal_size(run):
    report = json.loads((run["dir"] / "report.json").read_text())
    n = report["samples"]["n_per_half"]
    channels, size, _ = report["samples"]["decoded_shape"]
    assert n == 9 and size == 32
    image = np.asarray(Image.open(run["dir"] / "samples.png").convert("RGB")).astype(int)
    # make_grid: ceil(sqrt(9)) = 3 columns of 32 px tiles enlarged 2x, 2 px padding; labelled_panels: a 16 px gap.
    grid = 3 * (2 * size + 2) + 2
    height, width, _ = image.shape
    assert width == 2 * grid + 16
    label_height = height - grid
    assert 8 < label_height < 40
    left, gap, right = image[:, :grid], image[:, grid : grid + 16], image[:, grid + 16 :]
    assert left.shape == right.shape
    assert (gap == 255).all()  # nothing drawn between the halves
    for half in (left, right):
        label, tiles = half[:label_height], half[label_height:]
        assert (label < 128).any(), "no label text above a half"
        assert tiles.std() > 20, "a half holds no picture"
    assert not np.array_equal(left[label_height:], right[label_height:])


def test_report_compares_three_priors_on_heldout_latents(run):
    report = json.loads((run["dir"] / "report.json").read_text())
    rows = report["metrics"]["rows"]
    assert [r["method"] for r in rows] == ["gaussian", "gmm", "evalp"]
    for row in rows:
        for key in ("excess_fd", "fd", "mmd2", "precision", "recall"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (row["method"], key)
    # held out = the fit's validation split: int(64 * 0.1) = 6 items, never the training ones
    assert report["latents"] == {"total": 64, "train": 58, "heldout": 6, "metrics_on_training_latents": False, "include_flips": False}
    assert report["metrics"]["n_heldout"] == 6 and report["fit_summary"]["num_validation"] == 6
    assert set(report["versions"]) >= {"latent-prior", "torch", "diffusers", "accelerate", "python"}
    assert set(report["timings"]) >= {"encode", "fit", "samples", "metrics", "total"}
    assert report["vae"]["provenance"]["class_name"] == "AutoencoderKL" and report["vae"]["provenance"]["fingerprint"]
    assert report["seeds"]["training"] == 3
    md = (run["dir"] / "report.md").read_text()
    assert "(samples.png)" in md and "(train/training.png)" in md and "| method |" in md
    assert "estimate" in md and "bits/dim" in md and "fingerprint" in md


def test_config_file_loses_to_flags_and_the_saved_config_round_trips(run):
    saved = json.loads((run["dir"] / "config.json").read_text())
    assert saved["steps"] == 30 and saved["grid_samples"] == 9  # flags beat the file
    assert saved["seed"] == 3  # from the file
    assert saved["batch_size"] == 16 and saved["latents"] is None
    assert to_dict(from_dict(RunConfig, saved)) == saved
    fit_config = json.loads((run["dir"] / "train" / "fit_config.json").read_text())
    assert fit_config["steps"] == 30 and fit_config["seed"] == 3
    assert json.loads((run["dir"] / "train" / "fit_summary.json").read_text())["steps"] == 30


def test_training_png_and_log(run):
    with Image.open(run["dir"] / "train" / "training.png") as png:
        assert png.width > 600 and png.height > 400
    log = (run["dir"] / "log.txt").read_text()
    assert "\r" not in log
    for stage in ("[1/4] encode", "[2/4] fit", "[3/4] samples", "[4/4] report", "latent-prior encode: 64 images encoded"):
        assert stage in log
    assert log.strip().splitlines()[-1] == run["out"].strip().splitlines()[-1]


def test_same_config_again_reuses_the_cache_and_the_prior(run):
    before = (run["dir"] / "prior" / "model.safetensors").stat().st_mtime_ns
    code, out, err = run_cli(*run["args"])
    assert code == 0, err[-2000:]
    assert "0 images encoded (64 in cache" in out
    assert "already holds the prior fitted with these settings" in err
    assert (run["dir"] / "prior" / "model.safetensors").stat().st_mtime_ns == before
    timings = json.loads((run["dir"] / "report.json").read_text())["timings"]
    assert timings["encode"]["reused"] and timings["fit"]["reused"]


# ----------------------------------------------------------------------------------------------
# refusals


def test_an_occupied_run_dir_is_refused_and_overwrite_replaces_it(run, tmp_path, digits):
    d = tmp_path / "run"
    shutil.copytree(run["dir"], d)
    base = ["--data", digits, "--out", d, *TINY, "--steps", "30", "--grid-samples", "4"]
    code, _, err = run_cli(*base, "--seed", "5")
    assert code == 2
    assert "holds a different run" in err and "seed 3 -> 5" in err and "--overwrite" in err and "--resume" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads((d / "config.json").read_text())["seed"] == 3  # untouched

    code, _, err = run_cli(*base, "--seed", "5", "--overwrite", "--resume")
    assert code == 2 and "contradict" in err

    code, _, err = run_cli(*base, "--seed", "5", "--overwrite")
    assert code == 0, err[-2000:]
    assert json.loads((d / "config.json").read_text())["seed"] == 5
    assert json.loads((d / "train" / "fit_config.json").read_text())["seed"] == 5
    assert (d / "log.txt").read_text().count("==== latent-prior fit") == 1  # the old log went with the old run


def test_a_folder_with_foreign_run_files_is_refused(tmp_path, digits):
    d = tmp_path / "run"
    (d / "prior").mkdir(parents=True)
    code, _, err = run_cli("--data", digits, "--out", d, *TINY)
    assert code == 2 and "no config.json" in err and "--overwrite" in err


def test_a_bad_fit_flag_is_refused_before_anything_is_encoded(tmp_path, digits):
    """The fit's own flags are checked with the run's, so a typo costs no encoding (minutes with a real VAE)."""
    for flags, said in ((["--steps", "0"], "--steps 0"), (["--log-with", "tensorbored"], "not a tracker that Accelerate knows")):
        d = tmp_path / flags[0].strip("-")
        code, _, err = run_cli("--data", digits, "--out", d, *TINY, *flags)
        assert code == 2 and said in err
        assert not (d / "cache").exists()


def test_a_tracker_gets_the_scalars_and_a_decoded_sample_grid_at_each_checkpoint(tmp_path, digits):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tmp_path / "tracked"
    code, _, err = run_cli("--data", digits, "--out", d, *TINY, "--steps", "20", "--log-with", "tensorboard")
    assert code == 0, err
    acc = EventAccumulator(str(d / "train" / "latent-prior"), size_guidance={"images": 0, "scalars": 0})  # Accelerate's run name
    acc.Reload()
    assert "val_gain_nats" in acc.Tags()["scalars"]
    grids = acc.Images("samples")
    assert [g.step for g in grids] == [0, 10, 20] and all(g.width * g.height == 16 * 32 * 32 for g in grids)  # 16 digits


def test_a_mismatched_cache_is_refused(run, tmp_path, digits):
    d = tmp_path / "run"
    shutil.copytree(run["dir"], d)
    base = ["--data", digits, "--out", d, "--config", run["tmp"] / "run.yaml", *TINY, "--steps", "30", "--resolution", "16"]
    code, _, err = run_cli(*base)
    assert code == 2 and "resolution None -> 16" in err and "--overwrite" in err
    # --resume accepts changed settings, but the cache was encoded at 32 px and is not mixed with 16 px latents
    code, _, err = run_cli(*base, "--resume")
    assert code == 2
    assert f"{d / 'cache'} was encoded with different settings" in err and "resolution 32 then, 16 now" in err


def test_a_mismatched_prior_is_refused_on_resume(run, tmp_path, digits):
    d = tmp_path / "run"
    shutil.copytree(run["dir"], d)
    code, _, err = run_cli(
        "--data", digits, "--out", d, "--config", run["tmp"] / "run.yaml", *TINY, "--steps", "40", "--energy-depth", "2", "--resume"
    )  # depth: a hidden layer more, whichever the energy kind
    assert code == 2 and "does not fit the networks" in err
    assert "error:" in (d / "log.txt").read_text().splitlines()[-1]  # the refusal is in the log too


# ----------------------------------------------------------------------------------------------
# kill -9 and --resume


def _metrics_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # ~40 s; a killed fit and a killed encode resume in test_train and test_encode's default tests
def test_resume_after_kill_continues_from_the_checkpoint(tmp_path, digits):
    d = tmp_path / "run"
    args = ["fit", "--data", str(digits), "--out", str(d), *TINY, "--steps", "200", "--early-stop-patience", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "latent_prior", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    ckpts = d / "train" / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while not any(ckpts.glob("step-*/state.json")):
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(int(p.parent.name.split("-")[1]) for p in ckpts.glob("step-*/state.json"))
    last = done[-1]
    assert last < 200 and not (d / "train" / "fit_summary.json").exists(), "killed too late to test resuming"
    before = [r for r in _metrics_rows(d / "train" / "metrics.csv") if int(r["step"]) <= last]

    code, _, err = run_cli(*args[1:], "--resume")
    assert code == 0, err[-2000:]
    assert f"resuming from {ckpts / f'step-{last:07d}'}" in err
    assert "0 images encoded (64 in cache" in (d / "log.txt").read_text()  # the cache was complete: not encoded again
    after = _metrics_rows(d / "train" / "metrics.csv")
    # A restart would rewrite these rows (with new wall-clock `seconds`); a resume keeps them as they were.
    assert after[: len(before)] == before and int(after[-1]["step"]) == 200
    assert json.loads((d / "train" / "fit_summary.json").read_text())["steps"] == 200
    assert (d / "report.md").is_file() and (d / "samples.png").is_file()


# ----------------------------------------------------------------------------------------------
# two real processes


@pytest.mark.slow  # ~21 s; two gloo processes fit (test_train) and encode (test_encode) in the default tests
def test_two_gloo_processes_run_the_pipeline(tmp_path, digits):
    d = tmp_path / "run"
    result = run_two_gloo_processes(
        "fit", "--data", digits, "--out", d, *TINY, "--steps", "6", "--checkpoint-every", "3", "--shard-size", "16"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("latent-prior fit: done") == 1  # only the main process reports
    for name in RUN_FILES:
        assert (d / name).exists(), name
    assert {s["rank"] for s in json.loads((d / "cache" / "manifest.json").read_text())["shards"]} == {0, 1}
    assert json.loads((d / "prior" / "config.json").read_text())["training"]["world_size"] == 2
    report = json.loads((d / "report.json").read_text())
    assert report["world_size"] == 2 and [r["method"] for r in report["metrics"]["rows"]] == ["gaussian", "gmm", "evalp"]
    assert (d / "log.txt").read_text().count("==== latent-prior fit") == 1
