"""The EVaLP trainer: the CLI end to end, bad input, checkpoints / resume, divergence, two real
gloo processes, and a quality sanity check on a 2-D mixture.

Every fit here uses tiny networks and few steps (TINY) so the file stays fast on 2 cores.
"""

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _launch import run_two_gloo_processes
from _tiny import DEFAULT_VAE_FIT, FLAT_NETS, flags
from safetensors.torch import load_file, save_file

from latent_prior.cli import main
from latent_prior.errors import LatentPriorError
from latent_prior.fit_config import base_em_starts
from latent_prior.prior import LatentPrior
from latent_prior.selection import replay_run
from latent_prior.train import FitConfig, fit

REPO = Path(__file__).resolve().parents[1]

# Tiny networks, cheap evaluations: seconds per fit.
TINY_KW = dict(**FLAT_NETS, batch_size=32, eval_samples=256, eval_latents=128, log_z_samples=512, log_every=5, quiet=True)
TINY = flags(TINY_KW)
CENTRES = torch.tensor([[2.5, 0.0], [-2.5, 0.0], [0.0, 2.5]])


def mixture(n: int, seed: int = 0) -> torch.Tensor:
    """n points of a well-separated 3-component 2-D mixture (std 0.3), a stand-in aggregate posterior."""
    g = torch.Generator().manual_seed(seed)
    return CENTRES[torch.randint(0, 3, (n,), generator=g)] + 0.3 * torch.randn(n, 2, generator=g)


def write_latents(path: Path, n: int = 400, seed: int = 0, logvar: float | None = -4.0) -> Path:
    mean = mixture(n, seed)
    tensors = {"mean": mean}
    if logvar is not None:
        tensors["logvar"] = torch.full_like(mean, logvar)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_latents(tmp_path_factory.mktemp("data") / "mix.safetensors")


def fit_cli(latents: Path, out: Path, *extra: str) -> int:
    return main(["fit", "--latents", str(latents), "--out", str(out), *TINY, *extra])


def checkpoint_tensors(out: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = out / "train" / "checkpoints" / f"step-{step:07d}"
    tensors = {}
    for name in ("energy", "flow", "flow_ema", "optim_energy", "optim_sampler"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(str(ckpt / f"{name}.safetensors")).items()})
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------
# end to end


def test_fit_then_sample_through_the_cli(latents, tmp_path, capsys):
    out = tmp_path / "prior"
    assert fit_cli(latents, out, "--steps", "20", "--checkpoint-every", "10") == 0
    summary_line = capsys.readouterr().out
    assert "20 steps" in summary_line and "log Ẑ" in summary_line and "ESS" in summary_line and "bits/latent-dim" in summary_line
    # the prior's folder holds the prior alone (to copy or upload); the rest of the fit lives beside it
    assert sorted(p.name for p in (out / "prior").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    for name in ("fit_config.json", "metrics.csv", "fit_summary.json", "training.png"):
        assert (out / "train" / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == ["prior", "train"]
    from PIL import Image

    with Image.open(out / "train" / "training.png") as curves:  # the pipeline's curves, for `fit --latents` too
        assert curves.width > 300 and curves.height > 200
    selected = json.loads((out / "train" / "fit_summary.json").read_text())["selected_step"]
    # the last two checkpoints, and the selected one (step 0, the GMM start, is a candidate too)
    assert sorted(p.name for p in (out / "train" / "checkpoints").iterdir()) == sorted(
        {f"step-{selected:07d}", "step-0000010", "step-0000020"}
    )
    rows = (out / "train" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    for (
        column
    ) in "e_pos e_neg sampler_loss log_z_bound forward_kl energy_grad_norm sampler_grad_norm val_gain_nats val_fd val_precision".split():
        assert column in header
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "5", "10", "15", "20"]

    prior = LatentPrior.from_pretrained(out / "prior")
    config = json.loads((out / "prior" / "config.json").read_text())
    assert config["training"]["world_size"] == 1 and config["training"]["config"]["steps"] == 20
    assert prior.log_z == pytest.approx(config["log_z"]) and 0 < prior.log_z_info["ess_fraction"] <= 1
    assert prior.latent_shape == (2,)

    samples = tmp_path / "z.safetensors"
    assert main(["sample", "--prior", str(out / "prior"), "-n", "64", "--out", str(samples), "--method", "sir", "--proposals", "8"]) == 0
    z = load_file(str(samples))["latents"]
    assert z.shape == (64, 2) and torch.isfinite(z).all()


def test_python_api_accepts_a_tensor_and_returns_the_prior(tmp_path):
    means = mixture(200, seed=1)
    torch.set_num_threads(2)
    try:
        prior = fit(means, FitConfig(steps=6, checkpoint_every=3, **TINY_KW))  # no `out`: a temporary folder
        assert torch.get_num_threads() == 2  # fit trains on one CPU thread by default, then restores the caller's setting
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest.py)
    assert isinstance(prior, LatentPrior) and prior.latent_shape == (2,)
    assert prior.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 2)
    prior2 = fit(means, out=str(tmp_path / "p"), steps=6, checkpoint_every=3, seed=0, **TINY_KW)
    torch.testing.assert_close(prior.log_prob(means[:10]), prior2.log_prob(means[:10]))  # same seed, same fit
    assert (tmp_path / "p" / "prior" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_latent_files_are_refused_with_one_sentence(tmp_path, capsys):
    no_mean = tmp_path / "no_mean.safetensors"
    save_file({"means": torch.zeros(10, 2)}, str(no_mean))
    assert fit_cli(no_mean, tmp_path / "a", "--steps", "2") == 2
    assert "no `mean`" in capsys.readouterr().err

    mismatch = tmp_path / "mismatch.safetensors"
    save_file({"mean": torch.zeros(10, 2), "logvar": torch.zeros(10, 3)}, str(mismatch))
    assert fit_cli(mismatch, tmp_path / "b", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "logvar" in err and "(10, 3)" in err and "(10, 2)" in err

    nan = tmp_path / "nan.safetensors"
    mean = torch.zeros(50, 2)
    mean[7, 1] = float("nan")
    mean[9] = float("inf")
    save_file({"mean": mean}, str(nan))
    assert fit_cli(nan, tmp_path / "c", "--steps", "2") == 2
    err = capsys.readouterr().err
    assert "3 non-finite" in err and "item 7" in err

    small = write_latents(tmp_path / "small.safetensors", n=30)
    assert fit_cli(small, tmp_path / "d", "--steps", "2") == 2  # 27 training latents < batch of 32
    err = capsys.readouterr().err
    assert "27 training latents (of 30" in err and "--batch-size" in err
    assert not (tmp_path / "d").exists()  # nothing written, so the corrected command is not "a different run"

    assert fit_cli(small, tmp_path / "e", "--steps", "0") == 2
    assert "--steps 0" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()

    assert fit_cli(small, tmp_path / "f", "--steps", "2", "--flow-base-components", "-1") == 2  # 0 means "choose"
    assert "--flow-base-components -1" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_out_dir_with_another_run_is_refused_without_resume(latents, tmp_path, capsys):
    out = tmp_path / "run"
    assert fit_cli(latents, out, "--steps", "4", "--checkpoint-every", "4") == 0
    capsys.readouterr()
    assert fit_cli(latents, out, "--steps", "4", "--checkpoint-every", "4", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "holds a different fit" in err and "seed 0 -> 1" in err and "--resume" in err
    # the same command again is the same run: it picks up the finished checkpoint and re-exports
    assert fit_cli(latents, out, "--steps", "4", "--checkpoint-every", "4") == 0
    # --resume continues it with new settings
    assert fit_cli(latents, out, "--steps", "8", "--checkpoint-every", "4", "--resume") == 0
    assert json.loads((out / "prior" / "config.json").read_text())["training"]["summary"]["steps"] == 8
    # a fit of 0.1.0 (prior and training records in one folder) is refused, and its prior is left to load
    old = tmp_path / "old"
    shutil.copytree(out / "prior", old)
    shutil.copy(out / "train" / "fit_config.json", old)
    assert fit_cli(latents, old, "--steps", "4", "--checkpoint-every", "4") == 2
    assert "written by latent-prior 0.1.0" in capsys.readouterr().err
    LatentPrior.from_pretrained(old)
    # a prior/ that no fit wrote is never replaced
    foreign = tmp_path / "foreign"
    shutil.copytree(out / "prior", foreign / "prior")
    assert fit_cli(latents, foreign, "--steps", "4", "--checkpoint-every", "4") == 2
    assert "holds prior but no train/fit_config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# checkpoints, resume, divergence


def test_resume_reproduces_the_uninterrupted_run(latents, tmp_path):
    # An explicit warm-up and constant learning rates: the default warm-up (capped at half of --steps) and
    # the cosine decay depend on --steps, which differs between the runs.
    fixed = ["--warmup-steps", "3", "--lr-final-fraction", "1", "--early-stop-patience", "0"]
    common = ["--steps", "12", "--checkpoint-every", "4", "--keep-checkpoints", "5", *fixed]
    assert fit_cli(latents, tmp_path / "a", *common) == 0
    # the "interrupted" run stops at step 8 (its config says 8 steps), then resumes to 12
    assert fit_cli(latents, tmp_path / "b", "--steps", "8", "--checkpoint-every", "4", "--keep-checkpoints", "5", *fixed) == 0
    assert fit_cli(latents, tmp_path / "b", *common, "--resume") == 0
    assert_same_tensors(checkpoint_tensors(tmp_path / "a", 12), checkpoint_tensors(tmp_path / "b", 12))
    # metrics.csv of the resumed run has each step once
    steps = [r.split(",")[0] for r in (tmp_path / "b" / "train" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["0", "3", "4", "5", "8", "10", "12"]  # 0: the initialized model; 3: the end of the warm-up
    a_rows = (tmp_path / "a" / "train" / "metrics.csv").read_text().splitlines()
    b_rows = (tmp_path / "b" / "train" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[3:] for r in a_rows] == [r.split(",")[3:] for r in b_rows]  # same values (seconds differ)


def test_the_flows_dense_factors_learn_slower_and_a_resume_with_another_power_is_refused(latents, tmp_path, capsys):
    out = tmp_path / "run"
    assert fit_cli(latents, out, "--steps", "4", "--lr-linear-power", "-1") == 2
    assert "--lr-linear-power -1.0: pass 0 (no scaling) or a positive power" in capsys.readouterr().err
    assert not (out / "train").exists()
    assert fit_cli(latents, out, "--steps", "4", "--select-by", "gain_within_fd", "--select-fd-tolerance", "-0.1") == 2
    assert "--select-fd-tolerance -0.1: give a relative FD loss >= 0" in capsys.readouterr().err
    assert not (out / "train").exists()
    power = ["--lr-final-fraction", "1", "--lr-linear-power", "0.5"]
    assert fit_cli(latents, out, "--steps", "4", "--checkpoint-every", "4", *power) == 0
    groups = json.loads((out / "train" / "checkpoints" / "step-0000004" / "optim.json").read_text())["sampler"]["param_groups"]
    # the 2-D latents' invertible linear maps (D = 2) at lr / sqrt(2), the rest at lr
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3 / 2**0.5])
    capsys.readouterr()
    # the default (0) keeps one group, so a run of 0.5 does not resume under it
    assert fit_cli(latents, out, "--steps", "8", "--checkpoint-every", "4", "--resume") == 2
    err = capsys.readouterr().err
    assert "--lr-linear-power" in err and "new --out" in err


def test_kill_9_midway_then_resume_finishes_like_an_uninterrupted_run(latents, tmp_path):
    args = ["--steps", "200", "--checkpoint-every", "10", "--early-stop-patience", "0"]  # to step 200, which is compared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-c",
        "import torch; torch.set_num_threads(1); from latent_prior.cli import main; import sys; sys.exit(main(sys.argv[1:]))",
        "fit",
        "--latents",
        str(latents),
        "--out",
        str(killed),
        *TINY,
        *args,
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "train" / "checkpoints" / "step-0000020").is_dir():
        assert proc.poll() is None, f"the fit ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert still_running and proc.returncode == -signal.SIGKILL
    assert not (killed / "prior" / "model.safetensors").exists()  # it really stopped before the end

    assert fit_cli(latents, killed, *args, "--resume") == 0
    assert fit_cli(latents, tmp_path / "reference", *args) == 0
    assert_same_tensors(checkpoint_tensors(killed, 200), checkpoint_tensors(tmp_path / "reference", 200))
    assert not list((killed / "train" / "checkpoints").glob(".tmp-*"))


def test_early_stop_and_the_exported_weights_are_the_selected_checkpoint(latents, tmp_path, capsys):
    out = tmp_path / "early"
    # An unreachable ESS requirement: no evaluation can become "best". The warm-up (20 of 40 steps) is not cut short;
    # patience 2 stops at the 2nd evaluation after it (steps 22 and 24).
    unreachable = ["--checkpoint-every", "2", "--early-stop-patience", "2", "--min-ess-fraction", "1.0"]
    assert fit_cli(latents, out, "--steps", "40", *unreachable) == 0
    summary = json.loads((out / "train" / "fit_summary.json").read_text())
    assert summary["stopped_early"] and summary["steps"] == 24 and summary["selected_step"] == 24
    assert "no checkpoint reached --min-ess-fraction" in capsys.readouterr().err
    # a resume keeps the stop; with patience 0 it trains on to --steps
    assert fit_cli(latents, out, "--steps", "40", *unreachable, "--resume") == 0
    assert json.loads((out / "train" / "fit_summary.json").read_text())["steps"] == 24
    assert fit_cli(latents, out, "--steps", "40", *unreachable, "--early-stop-patience", "0", "--resume") == 0
    summary = json.loads((out / "train" / "fit_summary.json").read_text())
    assert not summary["stopped_early"] and summary["steps"] == 40

    for select_by in ("gain", "gain_and_fd", "gain_within_fd", "auto"):
        out = tmp_path / f"selected-{select_by}"
        assert fit_cli(latents, out, "--steps", "12", "--checkpoint-every", "3", "--keep-checkpoints", "1", "--select-by", select_by) == 0
        summary = json.loads((out / "train" / "fit_summary.json").read_text())
        rule = "gain_and_fd" if select_by == "auto" else select_by  # auto, for latents of the flat networks
        assert summary["select_by"] == rule
        history = json.loads((out / "prior" / "config.json").read_text())["training"]["history"]
        eligible = [h for h in history if h["ess_fraction"] >= 0.01]
        if rule == "gain":
            assert summary["selected_step"] == max(eligible, key=lambda h: h["val_gain_nats"])["step"]
        else:  # the lowest FD (or highest gain) among the candidates at least as good as the first one on all three counts
            first = history[0]
            fd_allowance = 1 + FitConfig().select_fd_tolerance if rule == "gain_within_fd" else 1.0
            keys = ("step", "val_gain_nats", "val_fd", "val_precision")
            assert first["step"] == 0 and summary["reference"] == {k: first[k] for k in keys}
            assert 0.0 <= first["val_precision"] <= 1.0
            admissible = [
                h
                for h in eligible
                if h["val_gain_nats"] >= first["val_gain_nats"]
                and h["val_fd"] <= first["val_fd"] * fd_allowance
                and h["val_precision"] >= first["val_precision"] - 0.01
            ]
            if rule == "gain_within_fd":
                assert summary["selected_step"] == max(admissible, key=lambda h: h["val_gain_nats"])["step"]
            else:
                assert summary["selected_step"] == min(admissible, key=lambda h: h["val_fd"])["step"]
        # the fits differ only in their rule, so replaying a rule on the first fit's history picks what its own fit did
        assert replay_run(out) == replay_run(tmp_path / "selected-gain", select_by=select_by) == summary["selected_step"]
    kept = sorted(p.name for p in (out / "train" / "checkpoints").iterdir())
    assert kept == sorted({f"step-{summary['selected_step']:07d}", "step-0000012"})  # best + the last one
    exported = load_file(str(out / "prior" / "model.safetensors"))
    chosen = out / "train" / "checkpoints" / f"step-{summary['selected_step']:07d}"
    for prefix, name in (("energy_net.", "energy"), ("flow.", "flow_ema")):
        for key, value in load_file(str(chosen / f"{name}.safetensors")).items():
            assert torch.equal(exported[prefix + key], value), prefix + key


def test_divergence_names_the_step_and_the_last_good_checkpoint(latents, tmp_path, capsys):
    out = tmp_path / "boom"
    code = fit_cli(
        latents,
        out,
        "--steps",
        "50",
        "--checkpoint-every",
        "1",
        "--lr-energy",
        "1e4",
        "--energy-magnitude-penalty",
        "0",
        "--grad-penalty",
        "0",
        "--divergence-threshold",
        "1e3",
    )
    err = capsys.readouterr().err
    assert code == 1  # a run that failed on good input; 2 is for bad input
    assert "training diverged at step" in err and "lower --lr-energy" in err and "--resume" in err
    step = int(err.split("diverged at step ")[1].split(" ")[0])
    assert step < 50
    named = err.split("the last good checkpoint is ")[1].split(". ")[0]
    assert Path(named).parent == out / "train" / "checkpoints" and (Path(named) / "state.json").is_file()
    assert json.loads((Path(named) / "state.json").read_text())["step"] < step


def test_divergence_before_the_first_periodic_checkpoint_names_the_initial_one(latents, tmp_path):
    # The initialized model is evaluated and checkpointed before the first step, so there is always one to resume from.
    # an energy learning rate that makes the first steps diverge, and nothing to hold it back
    diverging = dict(lr_energy=1e4, energy_magnitude_penalty=0.0, grad_penalty=0.0, divergence_threshold=1e3, warmup_steps=0)
    with pytest.raises(LatentPriorError, match=r"diverged at step \d+ .*the last good checkpoint is .*step-0000000"):
        fit(latents, out=str(tmp_path / "x"), steps=50, checkpoint_every=100, **diverging, **TINY_KW)


# ----------------------------------------------------------------------------------------------
# options


def test_evalp_code_objective_and_explicit_flags_win(latents, tmp_path):
    out = tmp_path / "critic"
    assert fit_cli(latents, out, "--steps", "4", "--checkpoint-every", "4", "--objective", "evalp-code", "--lr-sampler", "0.002") == 0
    saved = json.loads((out / "train" / "fit_config.json").read_text())
    assert saved["wgan_gp_weight"] == 10.0 and saved["kl_weight"] == 1e-3 and saved["forward_kl_weight"] == 0.0
    assert saved["lr_sampler"] == 0.002 and saved["lr_energy"] == 5e-4


def test_bf16_and_tensorboard_and_prefetch_run(latents, tmp_path):
    out = tmp_path / "bf16"
    assert (
        fit_cli(
            latents,
            out,
            "--steps",
            "4",
            "--checkpoint-every",
            "4",
            "--mixed-precision",
            "bf16",
            "--log-with",
            "tensorboard",
            "--num-workers",
            "1",
            "--spectral-norm",
        )
        == 0
    )
    assert json.loads((out / "prior" / "config.json").read_text())["training"]["mixed_precision"] == "bf16"
    assert list(out.rglob("events.out.tfevents*")), "no tensorboard event file"
    # Accelerate fixes its precision once per process; a second fit in the same process still chooses its own.
    assert fit_cli(latents, tmp_path / "fp32", "--steps", "2", "--checkpoint-every", "2", "--mixed-precision", "no") == 0
    assert json.loads((tmp_path / "fp32" / "prior" / "config.json").read_text())["training"]["mixed_precision"] == "no"


def test_log_with_takes_accelerates_tracker_names_and_refuses_unknown_or_missing_ones(latents, tmp_path, capsys):
    from accelerate.tracking import get_available_trackers

    assert fit_cli(latents, tmp_path / "a", "--steps", "2", "--log-with", "tensorboard,wnadb") == 2
    err = capsys.readouterr().err
    assert "wnadb is not a tracker that Accelerate knows" in err and "wandb" in err and "mlflow" in err
    installed = {str(t) for t in get_available_trackers()}
    missing = next((t for t in ("wandb", "mlflow", "aim", "comet_ml") if t not in installed), None)
    if missing is not None:
        assert fit_cli(latents, tmp_path / "b", "--steps", "2", "--log-with", missing) == 2
        assert f"{missing} is not installed (pip install {missing})" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before the run folder was made


def test_spatial_latents_train_in_normalized_space_and_sample_raw(tmp_path):
    """(4, 4, 4) latents with a VAE normalization: conv energy + multiscale flow, samples back in raw space."""
    g = torch.Generator().manual_seed(0)
    raw = 10.0 + 2.0 * torch.randn(160, 4, 4, 4, generator=g)  # normalized = (raw - 10) * 0.5 ~ N(0, 1)
    provenance = {"source": "test-vae", "class_name": "AutoencoderKL", "config_hash": "c0ffee", "fingerprint": "f00d"}
    path = tmp_path / "spatial.safetensors"
    save_file(
        {"mean": raw, "logvar": torch.full_like(raw, -6.0)},
        str(path),
        metadata={"normalization": json.dumps({"scaling_factor": 0.5, "shift_factor": 10.0}), "provenance": json.dumps(provenance)},
    )
    # explicit kinds: "auto" flattens latents this small (see SUBSPACE_MIN_DIMS)
    tiny = {**DEFAULT_VAE_FIT, "checkpoint_every": 2}  # conftest's tiny spatial networks and evaluations
    prior = fit(str(path), out=str(tmp_path / "p"), steps=4, energy_kind="conv", flow_kind="multiscale", **tiny)
    config = json.loads((tmp_path / "p" / "prior" / "config.json").read_text())
    energy = config["energy"]
    assert energy["kind"] == "flow_based" and energy["residual"]["kind"] == "conv" and energy["base"]["kind"] == "multiscale"
    assert config["flow"]["kind"] == "multiscale"
    assert prior.normalization.scaling_factor == 0.5 and prior.normalization.shift_factor == 10.0
    assert prior.provenance == provenance
    samples = prior.sample(256, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (256, 4, 4, 4)
    assert abs(samples.mean().item() - 10.0) < 0.5 and 1.5 < samples.std().item() < 2.5  # raw space, not normalized


# ----------------------------------------------------------------------------------------------
# two real processes


def test_two_gloo_processes_write_one_prior(latents, tmp_path):
    out = tmp_path / "ddp"
    result = run_two_gloo_processes("fit", "--latents", latents, "--out", out, *TINY, "--steps", "6", "--checkpoint-every", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("latent-prior fit:") == 1  # one summary line: only the main process reports
    config = json.loads((out / "prior" / "config.json").read_text())
    assert config["training"]["world_size"] == 2
    assert json.loads((out / "train" / "checkpoints" / "step-0000006" / "state.json").read_text())["world_size"] == 2
    assert {p.name for p in (out / "train" / "checkpoints" / "step-0000006").glob("rng-rank*.safetensors")} == {
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    }
    assert sorted(p.name for p in (out / "prior").glob("*.safetensors")) == ["model.safetensors"]
    LatentPrior.from_pretrained(out / "prior").sample(4)


# ----------------------------------------------------------------------------------------------
# quality


def _energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Székely's energy distance 2E|X−Y| − E|X−X'| − E|Y−Y'| (0 iff the distributions are equal)."""
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def test_fitted_prior_beats_the_gaussian_on_a_separated_mixture(tmp_path):
    data = write_latents(tmp_path / "train.safetensors", n=1500, seed=0)
    heldout = mixture(1000, seed=99)
    networks = dict(energy_hidden=64, flow_hidden=32, flow_blocks=4)
    budget = dict(steps=200, checkpoint_every=50, batch_size=128, eval_samples=1024, log_z_samples=4096, quiet=True)
    prior = fit(str(data), out=str(tmp_path / "p"), **networks, **budget)
    gaussian = _energy_distance(torch.randn(1000, 2, generator=torch.Generator().manual_seed(1)), heldout)
    g = torch.Generator().manual_seed(2)
    flow_samples = prior.sample(1000, generator=g)
    sir_samples = prior.sample(1000, method="sir", generator=g, proposals=32)
    d_flow, d_sir = _energy_distance(flow_samples, heldout), _energy_distance(sir_samples, heldout)
    assert d_flow < 0.25 * gaussian and d_sir < 0.25 * gaussian, (d_flow, d_sir, gaussian)
    # and the density ranks held-out points above points between the modes
    between = torch.tensor([[0.0, -2.0], [0.0, 0.0], [4.5, 4.5], [-4.5, 4.5]])
    assert prior.log_prob(heldout).median() > prior.log_prob(between).max() + 1.0
    summary = json.loads((tmp_path / "p" / "train" / "fit_summary.json").read_text())
    assert 1.0 < summary["heldout_gain_nats"] < 4.0  # the exact gain, KL(mixture || N(0, I)), is ≈ 2.4 nats


def test_the_warmed_up_flow_becomes_the_frozen_base_of_the_energy(latents, tmp_path, monkeypatch):
    from latent_prior.energy import FlowBasedEnergy
    from latent_prior.flows import Flow
    from latent_prior.prior import LatentPrior

    # A spy around the real method (not a mock): the mixture base's weights are refitted once, at the end of
    # the warm-up, and those weights are the frozen base's.
    refits = []
    real_refit = Flow.refit_mixture_weights
    monkeypatch.setattr(Flow, "refit_mixture_weights", lambda self, z, **kw: refits.append(real_refit(self, z, **kw)) or refits[-1])
    out = tmp_path / "based"
    prior = fit(latents, out=str(out), steps=40, warmup_steps=20, checkpoint_every=10, keep_checkpoints=10, **TINY_KW)
    assert isinstance(prior.energy_net, FlowBasedEnergy)
    chosen = prior.training_info["summary"]["base_components"]  # flow_base_components=0: chosen on held-out latents
    assert len(refits) == 1 and len(refits[0]) == prior.energy_net.base.base_components == chosen and chosen in (10, 20, 40)
    at_snapshot = next(h for h in prior.training_info["history"] if h["step"] == 20)
    # right after the warm-up the sampler IS the base and E_res ≈ 0, so p = q: log Z ≈ 0 and the IS weights are flat
    assert abs(at_snapshot["log_z_is"]) < 0.02 and at_snapshot["ess_fraction"] > 0.98
    snapshot = load_file(str(out / "train" / "checkpoints" / "step-0000020" / "flow_ema.safetensors"))
    last = load_file(str(out / "train" / "checkpoints" / "step-0000040" / "energy.safetensors"))
    torch.testing.assert_close(torch.softmax(last["base.base_logits"], 0), refits[0], rtol=0, atol=1e-6)
    for name, value in snapshot.items():  # frozen through the alternating phase
        torch.testing.assert_close(last[f"base.{name}"], value, msg=name)
    z = prior.sample(64, generator=torch.Generator().manual_seed(0))
    reloaded = LatentPrior.from_pretrained(out / "prior")
    torch.testing.assert_close(reloaded.log_prob(z), prior.log_prob(z))


def test_a_flow_based_prior_cast_to_bfloat16_samples_and_scores(latents, tmp_path):
    """from_pretrained(dtype=bf16) casts the energy's frozen base flow too (found on a GPU: a float32 input
    met bfloat16 weights)."""
    from latent_prior.prior import LatentPrior

    fit(latents, out=str(tmp_path / "p"), steps=8, checkpoint_every=4, **TINY_KW)
    prior = LatentPrior.from_pretrained(tmp_path / "p" / "prior", dtype=torch.bfloat16)
    z = prior.sample(32, generator=torch.Generator().manual_seed(0))
    log_p = prior.log_prob(z)
    assert z.dtype == torch.bfloat16 and log_p.shape == (32,) and torch.isfinite(log_p.float()).all()
    full = LatentPrior.from_pretrained(tmp_path / "p" / "prior")
    assert (log_p.float() - full.log_prob(z.float())).abs().median() < 1.0  # bf16 keeps ~3 significant digits


def test_the_base_components_are_chosen_on_heldout_latents(tmp_path):
    """20 thin, separated modes: 10 EM components must merge some, so the held-out choice takes more (by the
    rule it states: the best precision + recall among FDs within 50 % of the first choice's); the GMM baseline's
    own estimator (10 components, best of 5 k-means starts) is one of the candidates; an explicit count is kept
    as given."""
    g = torch.Generator().manual_seed(0)
    centres = 4.0 * torch.randn(20, 4, generator=g)
    mean = centres[torch.randint(0, 20, (3000,), generator=g)] + 0.05 * torch.randn(3000, 4, generator=g)
    path = tmp_path / "modes.safetensors"
    save_file({"mean": mean, "logvar": torch.full_like(mean, -8.0)}, str(path))
    short = dict(TINY_KW, steps=4, warmup_steps=2, checkpoint_every=2)
    summary = fit(str(path), out=str(tmp_path / "auto"), **short).training_info["summary"]
    choice = summary["base_choice"]
    assert [(r["components"], r["em_seed"], r["em_starts"]) for r in choice] == [
        *((k, s, 1) for k in (10, 20, 40) for s in (0, 1, 2)),
        (10, 0, 5),
    ]
    admissible = [r for r in choice if r["val_fd"] <= 1.5 * min(r["val_fd"] for r in choice)]
    best = max(admissible, key=lambda r: r["val_precision"] + r["val_recall"])
    assert (summary["base_components"], summary["base_em_seed"], summary["base_em_starts"]) == (
        best["components"],
        best["em_seed"],
        best["em_starts"],
    )
    assert summary["base_components"] > 10 and max(r["val_precision"] for r in choice[:3]) < 0.9  # ten components bridge the modes
    # Step 0 is the chosen GMM itself (not a fresh EM of the base codes): its held-out precision, on other
    # sampler draws, is the candidate's within sampling noise.
    with open(tmp_path / "auto" / "train" / "metrics.csv") as f:
        step0 = next(r for r in csv.DictReader(f) if r["step"] == "0")
    assert abs(float(step0["val_precision"]) - best["val_precision"]) < 0.05
    # ... and its held-out gain is the candidate's, on the same held-out draws (the flow adds no density at step 0).
    assert abs(float(step0["val_gain_nats"]) - best["val_gain_nats"]) < 1e-3 * max(1.0, abs(best["val_gain_nats"]))
    top = max(choice, key=lambda r: r["val_gain_nats"])
    assert top["val_gain_gap"] == 0 and all(r["val_gain_gap"] >= 0 and r["val_gain_gap_se"] >= 0 for r in choice)
    prior = LatentPrior.from_pretrained(tmp_path / "auto" / "prior")
    assert prior.flow.base_components == summary["base_components"]  # the exported prior records the count
    fixed = fit(str(path), out=str(tmp_path / "ten"), flow_base_components=10, **short).training_info["summary"]
    assert fixed["base_components"] == 10 and [r["components"] for r in fixed["base_choice"]] == [10, 10, 10, 10]


def test_the_start_search_tries_a_larger_mixture_only_within_its_cost_budget(tmp_path):
    """K·D² per latent is what the mixture base costs in every pass and EM per item and iteration: ten components
    always, 40 up to 45 dims, 20 up to 64 (with the k-means starts that 40 would have had), then ten alone; a fit
    on 48-D latents scores exactly those candidates and the GMM baseline's estimator."""
    three, six = (0, 1, 2), (0, 1, 2, 3, 4, 5)
    assert [base_em_starts(d) for d in (4, 45, 46, 64, 65, 256)] == [
        {10: three, 20: three, 40: three},
        {10: three, 20: three, 40: three},
        {10: three, 20: six},
        {10: three, 20: six},
        {10: three},
        {10: three},
    ]
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(4, 48, generator=g)[torch.randint(0, 4, (600,), generator=g)] + 0.3 * torch.randn(600, 48, generator=g)
    save_file({"mean": mean, "logvar": torch.full_like(mean, -6.0)}, str(tmp_path / "wide.safetensors"))
    short = dict(TINY_KW, steps=2, warmup_steps=1, checkpoint_every=2)
    summary = fit(str(tmp_path / "wide.safetensors"), out=str(tmp_path / "fit"), **short).training_info["summary"]
    tried = [(r["components"], r["em_seed"], r["em_starts"]) for r in summary["base_choice"]]
    assert tried == [*((10, s, 1) for s in three), *((20, s, 1) for s in six), (10, 0, 5)]


def fit_wide_latents(tmp_path):
    """A tiny subspace-flow fit (6 leading axes, 4 components) on 600 latents of 3×4×4 that lie near 4 clusters of a
    6-D subspace, into tmp_path/p."""
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 6, generator=g)
    codes = centres[torch.randint(0, 4, (600,), generator=g)] + 0.3 * torch.randn(600, 6, generator=g)
    mean = (codes @ torch.randn(6, 48, generator=g) + 0.05 * torch.randn(600, 48, generator=g)).reshape(600, 3, 4, 4)
    path = tmp_path / "wide.safetensors"
    save_file({"mean": mean, "logvar": torch.full_like(mean, -8.0)}, str(path))
    subspace = dict(flow_kind="subspace", flow_subspace_dims=6, flow_base_components=4)
    return fit(str(path), out=str(tmp_path / "p"), steps=4, warmup_steps=2, checkpoint_every=2, **subspace, **TINY_KW)


def test_latents_above_the_dense_basis_limit_fit_on_a_low_rank_basis_and_reload(tmp_path, monkeypatch):
    """Past PrincipalBasis.DENSE_MAX_DIMS (4096, lowered here) the trainer's subspace flow keeps a low-rank basis:
    the fit runs through selection and export, and the prior reloads with it."""
    from latent_prior.flows import PrincipalBasis

    monkeypatch.setattr(PrincipalBasis, "DENSE_MAX_DIMS", 24)
    monkeypatch.setattr(PrincipalBasis, "LOW_RANK_AXES", 12)
    prior = fit_wide_latents(tmp_path)
    assert prior.flow.basis_axes == 12 and prior.flow.basis_directions.shape == (48, 12)
    reloaded = LatentPrior.from_pretrained(tmp_path / "p" / "prior")
    z = prior.sample(16, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(z).all()
    torch.testing.assert_close(reloaded.log_prob(z), prior.log_prob(z))


def test_many_latent_dims_get_the_subspace_flow_which_starts_as_the_chosen_gmm_of_the_leading_axes(tmp_path):
    """Latents above SUBSPACE_MIN_DIMS: flow-kind auto takes the subspace flow, whose candidates are GMMs of the
    leading whitened axes scored on lifted samples; the exported prior is that flow, its step 0 is the chosen GMM
    times a Gaussian on the other axes, and it reloads with its basis. (Small latents take it when asked for, here.)"""
    from latent_prior.flows import SubspaceFlow
    from latent_prior.trainer import Trainer

    prior = fit_wide_latents(tmp_path)
    assert isinstance(prior.flow, SubspaceFlow) and prior.flow.subspace_dims == 6 and prior.flow.base_components == 4
    summary = prior.training_info["summary"]
    assert [r["components"] for r in summary["base_choice"]] == [4, 4, 4]
    with open(tmp_path / "p" / "train" / "metrics.csv") as f:
        step0 = next(r for r in csv.DictReader(f) if r["step"] == "0")
    chosen = next(r for r in summary["base_choice"] if r["em_seed"] == summary["base_em_seed"])
    assert abs(float(step0["val_precision"]) - chosen["val_precision"]) < 0.05  # step 0 is the scored candidate
    reloaded = LatentPrior.from_pretrained(tmp_path / "p" / "prior")
    z = prior.sample(16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(reloaded.log_prob(z), prior.log_prob(z))
    assert summary["select_by"] == "gain_within_fd"  # select_by="auto" for the subspace flow
    assert replay_run(tmp_path / "p") == summary["selected_step"]
    # the automatic choice by size
    for shape, kind in (((4, 8, 8), "realnvp"), ((4, 16, 16), "subspace"), ((4, 32, 32), "subspace"), ((4, 64, 64), "subspace")):
        trainer = Trainer.__new__(Trainer)
        trainer.config, trainer.shape = FitConfig(), shape
        assert trainer._flow_kind() == kind, shape


def test_select_by_auto_resolves_by_the_flow_kind_and_must_be_resolved_before_use():
    from latent_prior.checkpoints import RunState
    from latent_prior.selection import describe, offer, replay, resolve

    default = FitConfig()
    assert default.select_by == "auto"
    assert resolve(default, "subspace").select_by == "gain_within_fd"
    assert {resolve(default, kind).select_by for kind in ("realnvp", "spline", "multiscale")} == {"gain_and_fd"}
    explicit = FitConfig(select_by="gain")
    assert resolve(explicit, "subspace") is explicit
    result = {"step": 0, "val_gain_nats": 1.0, "val_fd": 1.0, "val_precision": 0.5, "ess_fraction": 1.0}
    for call in (lambda: offer(RunState(), result, default, True), lambda: replay([result], default, 0), lambda: describe(default, True)):
        with pytest.raises(ValueError, match="resolve"):
            call()


def test_early_stopping_counts_the_evaluations_of_the_alternating_phase_only():
    """A run whose later checkpoints never beat the start: patience 2 stops at the 2nd evaluation after the warm-up
    (steps 1250 and 1500 of a 1000-step warm-up), whatever the warm-up's evaluations were; a new best resets the count."""
    from latent_prior.fit_config import resolve_objective
    from latent_prior.selection import replay, replay_state

    config = resolve_objective(FitConfig(early_stop_patience=2, select_by="gain"))

    def evaluation(step: int, gain: float) -> dict:
        return {"step": step, "val_gain_nats": gain, "val_fd": 1.0, "val_precision": 0.5, "ess_fraction": 1.0}

    flat = [evaluation(step, 1.0 if step == 0 else 0.5) for step in range(0, 2001, 250)]
    state = replay_state(flat, config, warmup_steps=1000)
    assert (state.step, state.best_step, state.evals_since_best) == (1500, 0, 2)
    late = [*flat[:6], evaluation(1500, 2.0), *flat[7:]]  # a new best at 1500 gives the energy two more evaluations
    assert replay(late, config, warmup_steps=1000) == 1500
    state = replay_state(late, config, warmup_steps=1000)
    assert state.step == 2000 and state.stopped_early
    assert replay(flat, dataclasses.replace(config, early_stop_patience=0), warmup_steps=1000) == 0


def test_an_unknown_select_by_is_refused_with_the_rules_to_choose_from(tmp_path):
    with pytest.raises(LatentPriorError, match=r"--select-by 'best': choose auto, gain_and_fd, gain_within_fd or gain"):
        fit(torch.randn(64, 8), out=str(tmp_path / "never"), steps=2, select_by="best")
    assert not (tmp_path / "never").exists()  # refused before anything is written
