"""`latent-prior`: one command line with subcommands.

Each subcommand is a dataclass config plus a function that runs it; the flags are generated from
the dataclass fields (see `latent_prior.config`), so the CLI, the Python API and the saved JSON
share their field names. This module is the composition root: it is the one place that may reach
into `latent_prior.adapters` (lazily, through the subcommands that need a VAE).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, NamedTuple

from latent_prior.config import add_arguments, resolve
from latent_prior.errors import LatentPriorError


class Command(NamedTuple):
    config: str  # "module:DataclassName"
    run: str  # "module:function" taking that dataclass and returning an exit code (or None)
    help: str


def run_encode(config):
    """`latent-prior encode`: resolve --vae to an adapter, then hand over to the core."""
    from latent_prior.adapters import load_vae
    from latent_prior.encode import encode_images

    adapter = load_vae(config.vae, dtype=config.dtype, subfolder=config.subfolder, revision=config.revision)
    encode_images(adapter, config)
    return 0


# name -> where its config dataclass and run function live.
COMMANDS: dict[str, Command] = {
    "encode": Command(
        "latent_prior.encode:EncodeConfig",
        "latent_prior.cli:run_encode",
        "Encode an image folder with a VAE and cache its posterior moments (mean, logvar) as safetensors shards.",
    ),
    "fit": Command(
        "latent_prior.train:FitConfig",
        "latent_prior.train:run_fit",
        "Fit an EVaLP prior on cached latents and export it as a drop-in prior module.",
    ),
    "sample": Command(
        "latent_prior.prior:SampleConfig",
        "latent_prior.prior:run_sample",
        "Draw latents from an exported prior and write them to a .safetensors file.",
    ),
}


def _import(path: str):
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # not written yet; any other missing module is a real error
            return None
        raise
    return getattr(module, attr, None)


def _available_commands() -> dict[str, tuple[Command, type, Callable]]:
    found = {}
    for name, cmd in COMMANDS.items():
        config_cls, run = _import(cmd.config), _import(cmd.run)
        if config_cls is not None and run is not None:
            found[name] = (cmd, config_cls, run)
    return found


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
        p = sub.add_parser(name, help=cmd.help, description=cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
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
    except LatentPriorError as exc:
        print(f"latent-prior {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latent-prior {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
