"""Dataclass config <-> CLI flags <-> config file: precedence, types and errors."""

import argparse
import json
from dataclasses import dataclass, field

import pytest

from latent_prior.config import add_arguments, resolve, to_dict
from latent_prior.errors import LatentPriorError


@dataclass
class ToyConfig:
    out: str | None = field(default=None, metadata={"help": "where to write", "required": True})
    steps: int = field(default=100, metadata={"help": "training steps"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    flip: bool = field(default=False, metadata={"help": "add flipped copies"})
    n: int = field(default=4, metadata={"help": "how many", "flags": ("-n",)})
    method: str = field(default="sampler", metadata={"help": "how", "choices": ("sampler", "sir")})
    shape: tuple[int, ...] = field(default=(4, 8, 8), metadata={"help": "latent shape"})


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, ToyConfig)
    return resolve(ToyConfig, parser.parse_args(argv))


def test_defaults_and_flag_types():
    cfg = parse(["--out", "x", "--steps", "7", "--lr", "0.5", "--flip", "-n", "9", "--shape", "2", "3"])
    assert cfg == ToyConfig(out="x", steps=7, lr=0.5, flip=True, n=9, shape=(2, 3))
    assert parse([]) == ToyConfig()


def test_config_file_is_overridden_by_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 50\nlr: 0.1\nflip: true\n")
    cfg = parse(["--config", str(path), "--steps", "3", "--no-flip"])
    assert (cfg.steps, cfg.lr, cfg.flip) == (3, 0.1, False)

    path_json = tmp_path / "c.json"
    path_json.write_text(json.dumps(to_dict(cfg)))
    assert parse(["--config", str(path_json)]) == cfg


def test_unknown_key_and_bad_file_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(LatentPriorError, match="stepz"):
        parse(["--config", str(bad)])
    with pytest.raises(LatentPriorError, match="no such file"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LatentPriorError, match="could not parse"):
        parse(["--config", str(broken)])


def test_invalid_choice_is_rejected_by_argparse():
    with pytest.raises(SystemExit):
        parse(["--method", "bogus"])


def test_help_lists_every_field_with_default(capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, ToyConfig)
    text = parser.format_help()
    for flag in ("--out", "--steps", "--lr", "--flip", "-n", "--method", "--shape", "--config"):
        assert flag in text
    assert "default: 100" in text and "required" in text


def test_fit_help_groups_its_flags_by_the_config_sections():
    from latent_prior.cli import build_parser
    from latent_prior.config import field_groups
    from latent_prior.pipeline import RunConfig

    groups = field_groups(RunConfig)
    assert groups["latents"] == groups["out"] == "data and output"
    assert groups["energy_kind"] == "networks" and groups["kl_weight"] == "losses and optimisation"
    assert groups["vae"] == "encoding" and groups["mixed_precision"] == "runtime"
    parser, _ = build_parser()
    fit = parser._subparsers._group_actions[0].choices["fit"]
    titles = [g.title for g in fit._action_groups]
    assert {"data and output", "networks", "losses and optimisation", "encoding", "runtime"} <= set(titles)
    text = fit.format_help()
    assert text.index("\nnetworks:") < text.index("\n  --energy-kind") < text.index("\nruntime:") < text.index("\n  --mixed-precision")
