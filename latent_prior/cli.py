"""`latent-prior`: one command line with subcommands.

Each subcommand is a dataclass config plus a function that runs it, in `latent_prior.commands`; the flags
are generated from the dataclass fields (see `latent_prior.config`), so the CLI, the Python API and the saved
JSON share their field names. This module is the composition root: it is the one place that may reach into
`latent_prior.adapters` (lazily, for the subcommands that need a VAE), and it maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, NamedTuple

from latent_prior.config import add_arguments, resolve
from latent_prior.errors import LatentPriorError, RunFailed


class Command(NamedTuple):
    config: str  # "module:DataclassName"
    run: str  # "module:function" taking that dataclass and returning an exit code (or None)
    help: str


def load_adapter(config, *, required: bool = True):
    """The VAE named by `config.vae` (a hub id, a folder, a .safetensors file, or "default"/None for the
    embedded one), loaded with the config's `dtype`, `subfolder` and `revision` when it has them.
    With required=False, a config whose `vae` is None gives None instead of the embedded default."""
    spec = getattr(config, "vae", None)
    if spec is None and not required:
        return None  # before the import: it pulls in diffusers
    from latent_prior.adapters import load_vae

    return load_vae(
        spec,
        dtype=getattr(config, "dtype", "fp32"),
        subfolder=getattr(config, "subfolder", None),
        revision=getattr(config, "revision", None),
    )


def run_encode(config):
    from latent_prior.commands.encode import run_encode as encode

    return encode(config, load_adapter(config))


def run_fit(config):
    from latent_prior.commands.fit import run_fit as fit

    return fit(config, lambda: load_adapter(config))


def run_sample(config):
    from latent_prior.commands.sample import run_sample as sample

    return sample(config, load_adapter(config, required=False))


def run_eval(config):
    from latent_prior.commands.eval import run_eval as evaluate

    return evaluate(config, load_adapter(config, required=False))


# name -> where its config dataclass and run function live ("module:attribute"), imported when the parser is
# built; a module that fails to import is an error, never a command silently missing from --help.
COMMANDS: dict[str, Command] = {
    "encode": Command(
        "latent_prior.encode:EncodeConfig",
        "latent_prior.cli:run_encode",
        "Encode an image folder with a VAE and cache its posterior moments (mean, logvar) as safetensors shards.",
    ),
    "fit": Command(
        "latent_prior.pipeline:RunConfig",
        "latent_prior.cli:run_fit",
        "Fit an EVaLP prior: from images (--vae/--data, or the embedded default) to a run folder with the "
        "prior, sample grids and a report; or from cached latents (--latents) to an exported prior.",
    ),
    "sample": Command(
        "latent_prior.commands.sample:SampleConfig",
        "latent_prior.cli:run_sample",
        "Draw latents from an exported prior into a .safetensors file, or decode them to PNGs with --vae.",
    ),
    "eval": Command(
        "latent_prior.commands.eval:EvalConfig",
        "latent_prior.cli:run_eval",
        "Measure a prior against held-out latents (and images), beside the Gaussian and GMM baselines.",
    ),
    "info": Command(
        "latent_prior.commands.info:InfoConfig",
        "latent_prior.commands.info:run_info",
        "Describe a latent cache, a latents .safetensors file, an exported prior, or a run folder of `fit`.",
    ),
}


def _import(path: str):
    """The object at "module:attribute"; a command that cannot be imported is a bug to see, not to hide."""
    module_name, attr = path.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _available_commands() -> dict[str, tuple[Command, type, Callable]]:
    return {name: (cmd, _import(cmd.config), _import(cmd.run)) for name, cmd in COMMANDS.items()}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[Command, type, Callable]]]:
    from latent_prior import __version__

    parser = argparse.ArgumentParser(
        prog="latent-prior",
        description="Turn a pretrained VAE into a better generative model by learning its latent prior (EVaLP).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands = _available_commands()
    for name, (cmd, config_cls, _) in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, config_cls)
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _, config_cls, run = commands[args.command]
    try:
        config = resolve(config_cls, args)
        result = run(config)
    except LatentPriorError as exc:  # 2: the input or the flags; 1: a run that failed on good input
        print(f"latent-prior {args.command}: error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, RunFailed) else 2
    except KeyboardInterrupt:
        print(f"latent-prior {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the machine failed us (disk, memory): one sentence, exit code 1
        failure = runtime_failure(exc)
        if failure is None or os.environ.get("LATENT_PRIOR_DEBUG"):
            raise  # a bug: keep its traceback (LATENT_PRIOR_DEBUG=1 keeps it for the failures above too)
        print(f"latent-prior {args.command}: error: {failure}", file=sys.stderr)
        return 1
    return int(result or 0)


def runtime_failure(exc: BaseException) -> str | None:
    """One sentence for a failure of the machine rather than of the input (a full disk, a permission, no
    memory), or None for anything else."""
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}; check that path, its permissions and the free disk space, then run the same command again."
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory; lower --batch-size (or --resolution, -n) and run the same command again."
    return None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
