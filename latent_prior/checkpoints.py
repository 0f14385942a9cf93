"""A fit's training records in `out/train/`: checkpoints and metrics.csv.

A checkpoint `checkpoints/step-XXXXXXX/` holds the networks, the EMA, both optimizers and every rank's RNG
state as safetensors + JSON, written by hand rather than with Accelerate's `save_state`, whose optimizer
and RNG files are pickles: a checkpoint is read back without unpickling anything.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latent_prior.errors import LatentPriorError
from latent_prior.files import atomic_write

# ----------------------------------------------------------------------------------------------
# checkpoints (safetensors + JSON; nothing is pickled)

STEP_PREFIX = "step-"


def tensors_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors (safetensors) and JSON (param groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    if len(groups) != len(opt.param_groups) or any(len(g["params"]) != len(c["params"]) for g, c in zip(groups, opt.param_groups)):
        raise LatentPriorError(
            f"the checkpoint's optimizer has {len(groups)} parameter group(s), this run's {len(opt.param_groups)}: it was written "
            "with another --lr-linear-power (runs before it existed: 0); resume with that setting or start a new --out."
        )
    for group, current in zip(groups, opt.param_groups):
        # The run may resume with new settings (e.g. a lower lr after a divergence): those win.
        group.update({key: current[key] for key in ("lr", "betas", "lr_scale") if key in current})
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_to_files(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"train_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])], "python": random.getstate()}
    return tensors, meta


def rng_from_files(generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    generator.set_state(tensors["train_generator"])
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def load_tensors(path: Path, device: Any = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    device = torch.device(device)
    # safetensors accepts "cpu" but not "cpu:0", the device of a CPU rank under `accelerate launch`.
    return load_file(str(path), device="cpu" if device.type == "cpu" else str(device))


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with state.json), sorted by step."""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX) :].isdigit() and (p / "state.json").is_file():
                found.append((int(p.name[len(STEP_PREFIX) :]), p))
    return sorted(found)


@dataclass
class RunState:
    """Everything besides weights, optimizers and RNG that a resumed run needs (state.json)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0
    best_step: int | None = None
    best_value: float | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    world_size: int = 1
    warmup_steps: int | None = None  # fixed when the run starts: a resume with other --steps keeps it
    reference: dict[str, Any] | None = None  # the first candidate (the GMM start), which select_by="gain_and_fd" must match
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# metrics.csv

#: the trainer's per-step losses and gradient norms
LOSS_KEYS = ("e_pos", "e_neg", "energy_loss", "sampler_loss", "log_z_bound", "forward_kl", "energy_grad_norm", "sampler_grad_norm")
#: the validation figures of an evaluation step: the ELBO gain and its log Z estimate, then the sample fidelity
GAIN_KEYS = ("val_gain_nats", "train_gain_nats", "log_z_is", "ess_fraction")
FIDELITY_KEYS = ("val_fd", "val_precision")
EVAL_KEYS = GAIN_KEYS + FIDELITY_KEYS
CSV_COLUMNS = ("step", "epoch", "seconds", *LOSS_KEYS, *GAIN_KEYS, "lr_sampler", *FIDELITY_KEYS)
STAT_KEYS = (*LOSS_KEYS, "max_abs_energy")


class MetricsCSV:
    """Append-only metrics.csv; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
            self._rewrite(rows)
        elif not path.exists() or resume_step is None:
            self._rewrite([])

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def check_checkpoint(path: Path, networks: dict[str, nn.Module], world_size: int, rank: int) -> None:
    """Read every file of the checkpoint a resume starts from and check its weights against `networks` (file stem ->
    the module it restores: energy, flow, flow_ema), before anything is written: a damaged checkpoint, or one of
    other networks, is refused here with one sentence instead of failing after fit_config.json was rewritten.
    `world_size` and `rank`: this run's processes and this one's rank (its RNG files)."""

    def damaged(name: str, exc: BaseException) -> LatentPriorError:
        return LatentPriorError(
            f"{path / name}: the checkpoint is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"delete {path} to resume from the checkpoint before it, or start a new --out."
        )

    def json_object(name: str) -> dict[str, Any]:
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError) as exc:
            raise damaged(name, exc) from None
        if not isinstance(data, dict):
            raise damaged(name, ValueError("not a JSON object"))
        return data

    def tensors(name: str) -> dict[str, torch.Tensor]:
        try:
            return load_tensors(path / name)
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: a truncated or garbled file
            raise damaged(name, exc) from None

    state = json_object("state.json")
    for key in ("step", "epoch", "batch_in_epoch"):
        if not isinstance(state.get(key, 0), int) or isinstance(state.get(key, 0), bool) or state.get(key, 0) < 0:
            raise damaged("state.json", ValueError(f"{key} is {state.get(key)!r}"))
    if state.get("world_size", 1) != world_size:
        raise LatentPriorError(
            f"{path} was written by a run with {state.get('world_size')} processes, this one has {world_size}; "
            "resume with the same number of processes, or start a new --out."
        )
    for name, module in networks.items():
        stored = {k: tuple(v.shape) for k, v in tensors(f"{name}.safetensors").items()}
        wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if stored != wanted:
            first = next((k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)), "")
            raise LatentPriorError(
                f"{path} does not fit the networks of this config ({name}.safetensors: `{first}` is {stored.get(first)} in the "
                f"checkpoint, {wanted.get(first)} here); resume with the architecture flags of the original run (see "
                "fit_config.json) or start a new --out."
            )
    optim = json_object("optim.json")
    for name in ("energy", "sampler"):
        meta = optim.get(name)
        if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) or not isinstance(meta.get("scalars"), dict):
            raise damaged("optim.json", KeyError(f"no optimizer state for {name}"))
        tensors(f"optim_{name}.safetensors")
    tensors(f"rng-rank{rank}.safetensors")
    json_object(f"rng-rank{rank}.json")
