"""Issue 13: bad input and damage never lose a file, never end in a traceback, never read outside the folders
the user named.

The table `CASES` feeds each reproduction of the issue (and variations of it) to the real command line,
`latent_prior.cli.main([...])`, on real files in a temporary folder: a real cache of the embedded VAE, a
real fitted prior with its checkpoints, real images. Every case asserts the exit code, one sentence on
stderr without a traceback, that the sentence names the file or argument at fault, and that every file
present before the command is still there, byte for byte (and that nothing new was written). The tests
after the table check the other half of each fix: what must still work (rerunning `encode` repairs a
damaged cache, --overwrite and --allow-finetuned-vae opt in, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from _cli import argv
from _tiny import DEFAULT_VAE_FIT, flags
from safetensors.torch import load_file, save_file

from latent_prior.cache import open_latents
from latent_prior.cli import main
from latent_prior.pipeline import RUN_MARKER

REPO = Path(__file__).resolve().parents[1]
#: The tiny fit of conftest's `default_vae_prior`, as flags: a --resume of it must pass the same architecture.
FIT_FLAGS = flags(DEFAULT_VAE_FIT)


# ----------------------------------------------------------------------------------------------
# running the command line and watching the disk


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `latent-prior ARGV` in this process. An exception escaping `main` is
    a traceback, and fails the test as one."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (links not followed): its kind and, for a file, the sha256 of its bytes."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = os.fsdecode(path.relative_to(root))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir",)
            elif path.is_file():
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                found[rel] = ("other",)
    return found


# ----------------------------------------------------------------------------------------------
# real inputs, made once


@pytest.fixture(scope="module")
def made(default_vae_prior, tmp_path_factory) -> dict[str, Path]:
    """A real cache (9 digits of the embedded VAE, shards of 4 + 4 + 1), the fitted prior of conftest (its
    fit's train/ folder, with the checkpoints, beside it), its latents file and image folder, and a VAE of the embedded one's config with other
    weights (a "fine-tune")."""
    from diffusers import AutoencoderKL

    from latent_prior.defaults import DEFAULT_VAE_DIR

    latents, prior, data = default_vae_prior
    root = tmp_path_factory.mktemp("robust")
    cache = root / "cache"
    code, _, err = run_cli(["encode", "--data", data, "--out", cache, "--shard-size", "4", "--num-workers", "0", "--quiet"])
    assert code == 0, err
    vae = AutoencoderKL.from_pretrained(DEFAULT_VAE_DIR)
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    vae.save_pretrained(root / "finetuned")
    return {"cache": cache, "prior": prior, "latents": latents, "data": data, "finetuned": root / "finetuned"}


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True) if src.is_dir() else shutil.copy(src, dst)
    return dst


def edit_json(path: Path, change: Callable[[dict], object], *, keep_checksum: bool = True) -> None:
    """Edit a JSON file in place: `change` mutates the object, or returns a list to stand in for it. A
    manifest's checksum is dropped unless `keep_checksum`, so that a check behind it is reached."""
    data = json.loads(path.read_text())
    replaced = change(data)
    data = replaced if isinstance(replaced, list) else data
    if isinstance(data, dict) and not keep_checksum:
        data.pop("checksum", None)
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x01  # inside the tensor data, past the header
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------------------------
# the table: (id, what the error must name, argv built from (tmp, made))
#
# The first part of an id numbers the kind of bad input (the sections below). `names` holds fragments of the one error sentence; a
# callable fragment gets the case's tmp folder (for paths).


@dataclasses.dataclass
class Case:
    id: str
    names: tuple
    setup: Callable[[Path, dict], list]


CASES: list[Case] = []


def rows(table: list[tuple]):
    """Register one case per row (id, names, *args) of a setup function(tmp, made, *args)."""

    def register(setup):
        for id, names, *args in table:
            CASES.append(Case(id, names, lambda tmp, made, _args=tuple(args): setup(tmp, made, *_args)))
        return setup

    return register


def at(*parts: str) -> Callable[[Path], str]:
    """A fragment naming a path under the case's tmp folder."""
    return lambda tmp: str(tmp.joinpath(*parts))


# ---- 1. encode --out into a folder latent-prior did not make ------------------------------------


@rows(
    [
        ("1-manifest-and-hidden-tmp", (at("d"), "not a latent cache"), {"manifest.json": '{"a":1}', ".s.tmp": ""}),
        ("1-notes", (at("d"), "notes.txt"), {"notes.txt": "hello"}),
        ("1-hidden-tmp-only", (at("d"), ".s.tmp"), {".s.tmp": "the user's"}),
        ("1-folder-inside", (at("d"), "sub"), {"sub/x.txt": ""}),
        ("1-user-plan-json", (at("d"), "different settings"), {"plan.json": '{"a": 1}'}),
        ("1-garbled-plan-json", (at("d", "plan.json"),), {"plan.json": "not json"}),
        ("1-user-file-named-like-a-shard", (at("d"), "plan.json"), {"shard-00000.safetensors": "mine"}),
        ("1-tmp-lookalike", (at("d"), ".shard-1.safetensors.tmp"), {".shard-1.safetensors.tmp": "mine"}),
    ]
)
def _encode_into_occupied(tmp, made, files):
    for name, text in files.items():
        (tmp / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "d" / name).write_text(text)
    return ["encode", "--data", made["data"], "--out", tmp / "d", "--num-workers", "0", "--quiet"]


@rows([("1-out-is-a-file", (at("d.txt"), "not a folder"))])
def _encode_into_a_file(tmp, made):
    (tmp / "d.txt").write_text("mine")
    return ["encode", "--data", made["data"], "--out", tmp / "d.txt", "--num-workers", "0", "--quiet"]


# ---- 2. fit --overwrite / --resume in a folder that never held a run ----------------------------


@rows(
    [
        (
            "2-overwrite-user-cache-and-prior",
            (at("d"), "--overwrite"),
            {"cache/important.db": "x", "prior/paper.pdf": "y"},
            ["--overwrite"],
        ),
        ("2-resume-user-cache-and-prior", (at("d"), "--resume"), {"cache/important.db": "x", "prior/paper.pdf": "y"}, ["--resume"]),
        ("2-resume-user-report", (at("d"), "report.md"), {"report.md": "my notes"}, ["--resume"]),
        ("2-overwrite-user-log-and-report", (at("d"), "log.txt"), {"log.txt": "l", "report.md": "r"}, ["--overwrite"]),
        ("2-overwrite-user-config", (at("d"), "config.json"), {"config.json": '{"a": 1}'}, ["--overwrite"]),
        ("2-user-config", (at("d"), "config.json"), {"config.json": '{"a": 1}'}, []),
        ("2-resume-user-config-and-samples", (at("d"), "samples.png"), {"config.json": '{"a": 1}', "samples.png": "p"}, ["--resume"]),
        ("2-user-samples-png", (at("d"), "samples.png"), {"samples.png": "p"}, []),
    ]
)
def _fit_in_user_folder(tmp, made, files, flags):
    for name, text in files.items():
        (tmp / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "d" / name).write_text(text)
    return ["fit", "--data", made["data"], "--out", tmp / "d", "--steps", "2", "--quiet", *flags]


def _marked_run_folder(tmp: Path) -> Path:
    """A folder latent-prior made (its marker, config.json, a report), to be damaged by a case."""
    d = tmp / "d"
    d.mkdir()
    (d / RUN_MARKER).write_text("{}")
    (d / "config.json").write_text('{"steps": 2}')
    (d / "report.md").write_text("the run's report")
    return d


def _link_cache_elsewhere(tmp: Path, d: Path) -> None:
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "keep.db").write_text("x")
    (d / "cache").symlink_to(tmp / "elsewhere")


def _prior_as_a_file(tmp: Path, d: Path) -> None:
    (d / "prior").write_text("not a folder")


def _report_as_a_folder(tmp: Path, d: Path) -> None:
    (d / "report.md").unlink()
    (d / "report.md").mkdir()
    (d / "report.md" / "draft.txt").write_text("x")


@rows(
    [
        ("2-overwrite-cache-is-a-link", (at("d", "cache"), "a link"), _link_cache_elsewhere, ["--overwrite"]),
        ("2-overwrite-prior-is-a-file", (at("d", "prior"), "a file"), _prior_as_a_file, ["--overwrite"]),
        ("2-overwrite-report-is-a-folder", (at("d", "report.md"), "a folder"), _report_as_a_folder, ["--overwrite"]),
        ("2-overwrite-and-resume", ("--overwrite", "--resume"), lambda tmp, d: None, ["--overwrite", "--resume"]),
    ]
)
def _fit_in_damaged_run_folder(tmp, made, damage, flags):
    d = _marked_run_folder(tmp)
    damage(tmp, d)
    return ["fit", "--data", made["data"], "--out", d, "--steps", "2", "--quiet", *flags]


# ---- 3. sample / fit --latents / eval writing over files -----------------------------------------


def _existing_file(tmp: Path, name: str) -> None:
    (tmp / name).write_text("my file")


def _link_to_my_file(tmp: Path, name: str) -> None:
    (tmp / "mine.txt").write_text("my file")
    (tmp / name).symlink_to(tmp / "mine.txt")


def _folder_named(tmp: Path, name: str) -> None:
    (tmp / name).mkdir()


@rows(
    [
        ("3-sample-existing-safetensors", (at("z.safetensors"), "--overwrite"), _existing_file, "z.safetensors", []),
        ("3-sample-existing-png", (at("g.png"), "--overwrite"), _existing_file, "g.png", ["--vae", "default"]),
        ("3-sample-link-to-a-file", (at("z.safetensors"), "--overwrite"), _link_to_my_file, "z.safetensors", []),
        ("3-sample-folder-named-safetensors", (at("x.safetensors"), "folder"), _folder_named, "x.safetensors", ["--overwrite"]),
        ("3-sample-folder-named-png", (at("x.png"), "folder"), _folder_named, "x.png", ["--vae", "default"]),
    ]
)
def _sample_over_a_file(tmp, made, make, name, flags):
    make(tmp, name)
    return ["sample", "--prior", made["prior"], "-n", "3", "--out", tmp / name, "--device", "cpu", "--quiet", *flags]


@rows(
    [
        ("3-sample-into-prior-model", ("inside the prior folder",), "model.safetensors", []),
        ("3-sample-into-prior-model-overwrite", ("inside the prior folder",), "model.safetensors", ["--overwrite"]),
        ("3-sample-into-prior-new-file", ("inside the prior folder",), "new.safetensors", []),
        ("3-sample-into-prior-png", ("inside the prior folder",), "config.png", ["--vae", "default", "--overwrite"]),
        ("3-sample-folder-is-the-prior", ("inside the prior folder",), "", ["--vae", "default", "--overwrite"]),
        ("3-sample-into-prior-subfolder", ("inside the prior folder",), "grids", ["--vae", "default", "--overwrite"]),
    ]
)
def _sample_into_the_prior(tmp, made, name, flags):
    prior = copy(made["prior"], tmp / "prior")
    return ["sample", "--prior", prior, "-n", "2", "--out", prior / name, "--device", "cpu", "--quiet", *flags]


@rows([(f"3-fit-latents-over-user-{name}", (at("out"), name, "train/fit_config.json"), name) for name in ("prior", "train")])
def _fit_latents_into_user_folder(tmp, made, name):
    (tmp / "out").mkdir()
    (tmp / "out" / name).write_text("mine")
    return ["fit", "--latents", made["latents"], "--out", tmp / "out", "--steps", "2", *FIT_FLAGS]


@rows([("3-eval-existing-report", (at("r.json"), "--overwrite"), False), ("3-eval-report-into-prior", ("inside the prior folder",), True)])
def _eval_over_a_report(tmp, made, into_prior):
    if into_prior:
        prior = copy(made["prior"], tmp / "prior")
        return ["eval", "--prior", prior, "--latents", made["latents"], "--out", prior / "config.json", "--overwrite", "--quiet"]
    (tmp / "r.json").write_text('{"mine": 1}')
    return ["eval", "--prior", made["prior"], "--latents", made["latents"], "--out", tmp / "r.json", "--quiet"]


# ---- 4, 5, 6. paths out of a cache, tampered manifests, damaged shards ----------------------------
# Each damage is fed to `fit --latents` (which would train on it) and to `info` (which would call it complete).


def _outside_copy(cache: Path, tmp: Path) -> Path:
    outside = tmp / "outside.safetensors"
    shutil.copy(cache / "shard-00000.safetensors", outside)
    return outside


def _manifest(change: Callable[[dict], object], keep_checksum: bool = False) -> Callable[[Path, Path], None]:
    """A damage that edits manifest.json; its checksum is dropped (as by an editor who knows of it) unless kept."""
    return lambda cache, tmp: edit_json(cache / "manifest.json", change, keep_checksum=keep_checksum)


def _shard_link_out(cache: Path, tmp: Path) -> None:
    outside = _outside_copy(cache, tmp)
    (cache / "shard-00000.safetensors").unlink()
    (cache / "shard-00000.safetensors").symlink_to(outside)


def _point_entry_outside(cache: Path, tmp: Path) -> None:
    outside = _outside_copy(cache, tmp)
    edit_json(cache / "manifest.json", lambda m: m["shards"][0].update(file=str(outside)), keep_checksum=False)


def _one_row_less(m: dict) -> None:
    """Shard 0 claims 3 rows (of its 4) and a skipped file makes the totals add up again."""
    m["shards"][0]["count"] = 3
    m["count"] -= 1
    m["skipped"] = [{"path": "0/x.png", "reason": "OSError: bad"}]


def _garble_header(cache: Path, tmp: Path) -> None:
    raw = (cache / "shard-00002.safetensors").read_bytes()
    (cache / "shard-00002.safetensors").write_bytes(b"\xff" * 64 + raw[64:])


DAMAGE: list[tuple[str, tuple, Callable[[Path, Path], None]]] = [
    # 4: a path in the manifest that leaves the folder
    (
        "4-dotdot-shard",
        ("manifest.json", "../outside.safetensors"),
        lambda c, t: (_outside_copy(c, t), _manifest(lambda m: m["shards"][0].update(file="../outside.safetensors"))(c, t)),
    ),
    ("4-absolute-shard", ("manifest.json", "outside.safetensors"), _point_entry_outside),
    ("4-etc-passwd", ("manifest.json", "/etc/passwd"), _manifest(lambda m: m["shards"][0].update(file="/etc/passwd"))),
    (
        "4-subfolder-shard",
        ("manifest.json", "sub/shard-00000"),
        _manifest(lambda m: m["shards"][0].update(file="sub/shard-00000.safetensors")),
    ),
    ("4-shard-is-a-link-out", ("shard-00000.safetensors", "link"), _shard_link_out),
    # 5: tampering
    ("5-duplicated-entry", ("manifest.json", "twice"), _manifest(lambda m: m["shards"].insert(1, m["shards"][0]))),
    ("5-dropped-entry", ("manifest.json", "2 shards"), _manifest(lambda m: m["shards"].pop(1))),
    ("5-renamed-entry", ("manifest.json", "twice"), _manifest(lambda m: m["shards"][1].update(file="shard-00000.safetensors"))),
    ("5-deterministic-true", ("shard-00000.safetensors", "logvar"), _manifest(lambda m: m.update(deterministic=True))),
    ("5-flip-true", ("shard-00000.safetensors", "mean_flip"), _manifest(lambda m: m.update(flip=True))),
    ("5-deterministic-string", ("manifest.json", "deterministic"), _manifest(lambda m: m.update(deterministic="yes"))),
    (
        "5-scaling-1000-behind-the-checksum",
        ("manifest.json", "checksum"),
        _manifest(lambda m: m["normalization"].update(scaling_factor=1000), keep_checksum=True),
    ),
    ("5-scaling-0", ("manifest.json", "scaling_factor"), _manifest(lambda m: m["normalization"].update(scaling_factor=0))),
    ("5-scaling-big", ("manifest.json", "scaling_factor"), _manifest(lambda m: m["normalization"].update(scaling_factor="big"))),
    ("5-normalization-string", ("manifest.json", "normalization"), _manifest(lambda m: m.update(normalization="x"))),
    (
        "5-latents-std-zero",
        ("manifest.json", "latents_std"),
        _manifest(lambda m: m["normalization"].update(latents_std=[0.0, 1.0, 1.0, 1.0])),
    ),
    ("5-latents-mean-one-of-four", ("manifest.json", "latents_mean"), _manifest(lambda m: m["normalization"].update(latents_mean=[0.0]))),
    ("5-count-999", ("manifest.json", "count 999"), _manifest(lambda m: m.update(count=999))),
    ("5-count-999-behind-the-checksum", ("manifest.json", "checksum"), _manifest(lambda m: m.update(count=999), keep_checksum=True)),
    ("5-entry-count-one-less", ("shard-00000.safetensors", "3"), _manifest(_one_row_less)),
    ("5-num-files-50", ("manifest.json", "shards"), _manifest(lambda m: m.update(num_files=50))),
    ("5-latent-shape-negative", ("manifest.json", "latent_shape"), _manifest(lambda m: m.update(latent_shape=[-4, 8, 8]))),
    ("5-latent-shape-string", ("manifest.json", "latent_shape"), _manifest(lambda m: m.update(latent_shape="abc"))),
    ("5-latent-shape-other", ("shard-00000.safetensors", "shape"), _manifest(lambda m: m.update(latent_shape=[4, 4, 16]))),
    ("5-shards-not-a-list", ("manifest.json", "shards"), _manifest(lambda m: m.update(shards="all"))),
    ("5-manifest-a-list", ("manifest.json", "JSON object"), _manifest(lambda m: [m])),
    ("5-format-version-string", ("manifest.json", "format_version"), _manifest(lambda m: m.update(format_version="1"))),
    ("5-checksum-forged", ("manifest.json", "checksum"), _manifest(lambda m: m.update(checksum="0" * 64), keep_checksum=True)),
    (
        "5-swapped-shards",
        ("shard-00000.safetensors", "chunk 1"),
        lambda c, t: shutil.copy(c / "shard-00001.safetensors", c / "shard-00000.safetensors"),
    ),
    (
        "5-foreign-shard",
        ("shard-00000.safetensors",),
        lambda c, t: save_file({"mean": torch.zeros(4, 4, 8, 8), "logvar": torch.zeros(4, 4, 8, 8)}, str(c / "shard-00000.safetensors")),
    ),
    # 6: damaged shards, each repaired by rerunning the same encode (test_rerunning_encode_repairs_...)
    ("6-truncated-shard", ("shard-00001.safetensors", "damaged", "encode"), lambda c, t: truncate(c / "shard-00001.safetensors")),
    ("6-empty-shard", ("shard-00001.safetensors", "damaged", "encode"), lambda c, t: (c / "shard-00001.safetensors").write_bytes(b"")),
    ("6-garbled-header", ("shard-00002.safetensors", "damaged", "encode"), _garble_header),
    ("6-missing-shard", ("shard-00002.safetensors", "encode"), lambda c, t: (c / "shard-00002.safetensors").unlink()),
    ("6-manifest-not-json", ("manifest.json",), lambda c, t: (c / "manifest.json").write_text("{ half")),
    ("6-manifest-not-utf8", ("manifest.json",), lambda c, t: (c / "manifest.json").write_bytes(b"\xff\xfe{}")),
]


def _damaged_cache(tmp: Path, made: dict, damage: Callable[[Path, Path], None]) -> Path:
    cache = copy(made["cache"], tmp / "cache")
    damage(cache, tmp)
    return cache


@rows([(f"{id}-fit", names, damage) for id, names, damage in DAMAGE])
def _fit_on_damaged_cache(tmp, made, damage):
    return ["fit", "--latents", _damaged_cache(tmp, made, damage), "--out", tmp / "prior", "--steps", "2", "--quiet"]


@rows([(f"{id}-info", names, damage) for id, names, damage in DAMAGE])
def _info_on_damaged_cache(tmp, made, damage):
    return ["info", _damaged_cache(tmp, made, damage)]


@rows(
    [
        ("5-bit-flip-fit", ("shard-00001.safetensors", "sha256"), "fit"),
        ("5-bit-flip-info-verify", ("shard-00001.safetensors", "sha256"), "info"),
        ("5-bit-flip-eval", ("shard-00001.safetensors", "sha256"), "eval"),
    ]
)
def _bit_flipped_cache(tmp, made, command):
    cache = _damaged_cache(tmp, made, lambda c, t: flip_a_bit(c / "shard-00001.safetensors"))
    return {
        "fit": ["fit", "--latents", cache, "--out", tmp / "prior", "--steps", "2", "--quiet"],
        "info": ["info", cache, "--verify"],
        "eval": ["eval", "--prior", made["prior"], "--latents", cache, "--quiet"],
    }[command]


# ---- 7. file names that are not UTF-8, named pipes, links to nothing -----------------------------


def _named_pipe(tmp: Path, made: dict) -> None:
    os.mkfifo(tmp / "data" / "x.png")


def _non_utf8_name(tmp: Path, made: dict) -> None:
    first = sorted(Path(made["data"]).rglob("*.png"))[0]
    shutil.copy(first, os.path.join(os.fsencode(tmp / "data"), b"caf\xe9.png"))


def _dangling_link_and_folder(tmp: Path, made: dict) -> None:
    (tmp / "data" / "folder.png").mkdir()
    (tmp / "data" / "dangling.png").symlink_to(tmp / "nowhere.png")


@rows(
    [
        ("7-only-a-named-pipe", ("x.png", "named pipe"), _named_pipe),
        ("7-only-a-non-utf8-name", ("UTF-8", "rename it"), _non_utf8_name),
        ("7-only-a-link-to-nothing", ("dangling.png",), _dangling_link_and_folder),
    ]
)
def _encode_odd_files(tmp, made, make):
    (tmp / "data").mkdir()
    make(tmp, made)
    return ["encode", "--data", tmp / "data", "--out", tmp / "cache", "--num-workers", "0", "--quiet"]


# ---- 8. wrong types in --config ---------------------------------------------------------------------


def _config(tmp: Path, text: str | bytes, suffix: str) -> Path:
    path = tmp / f"c{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _base_argv(tmp: Path, made: dict, command: str) -> list:
    return {
        "fit": ["fit", "--latents", made["latents"], "--out", tmp / "p"],
        "encode": ["encode", "--out", tmp / "cache"],
        "sample": ["sample", "--prior", made["prior"], "--out", tmp / "z.safetensors"],
        "info": ["info"],
        "eval": ["eval", "--prior", made["prior"], "--latents", made["latents"]],
    }[command]


@rows(
    [
        ("8-batch-size-string", ("batch_size", "'16'", "integer"), "fit", 'batch_size: "16"', ".yaml"),
        ("8-seed-abc", ("seed", "integer"), "fit", "seed: abc", ".yaml"),
        ("8-lr-energy-fast", ("lr_energy", "number"), "fit", "lr_energy: fast", ".yaml"),
        ("8-betas-scalar", ("betas", "list"), "fit", "betas: 0.5", ".yaml"),
        ("8-betas-strings", ("betas", "list"), "fit", "betas: [a, b]", ".yaml"),
        ("8-steps-true", ("steps", "integer"), "fit", "steps: true", ".yaml"),
        ("8-steps-float", ("steps", "integer"), "fit", "steps: 1.5", ".yaml"),
        ("8-steps-null", ("steps", "integer"), "fit", "steps: null", ".yaml"),
        ("8-out-int", ("out", "string"), "fit", "out: 5", ".yaml"),
        ("8-quiet-string", ("quiet", "true or false"), "fit", 'quiet: "yes"', ".yaml"),
        ("8-objective-unknown", ("objective", "vml"), "fit", "objective: magic", ".yaml"),
        ("8-unknown-key", ("stepz", "unknown"), "fit", "stepz: 3", ".yaml"),
        ("8-non-string-key", ("c.yaml", "1"), "fit", "1: 2", ".yaml"),
        ("8-list-not-mapping", ("c.yaml", "mapping"), "fit", "- 1\n- 2", ".yaml"),
        ("8-yaml-syntax", ("c.yaml", "parse"), "fit", "steps: [1, 2", ".yaml"),
        ("8-not-utf8", ("c.yaml", "UTF-8"), "fit", b"steps: \xff\xfe\n", ".yaml"),
        ("8-json-shard-size-1e3", ("shard_size", "integer"), "encode", '{"shard_size": 1e3}', ".json"),
        ("8-yaml-shard-size-1e3", ("shard_size", "integer"), "encode", "shard_size: 1e3", ".yaml"),
        ("8-data-list", ("data", "string"), "encode", "data: [1, 2]", ".yaml"),
        ("8-dtype-fp64", ("dtype", "fp32"), "encode", "dtype: fp64", ".yaml"),
        ("8-flip-string", ("flip", "true or false"), "encode", "flip: 'no'", ".yaml"),
        ("8-sample-n-string", ("`n`", "integer"), "sample", 'n: "4"', ".yaml"),
        ("8-sample-temperature-hot", ("temperature", "number"), "sample", "temperature: hot", ".yaml"),
        ("8-info-path-int", ("path", "string"), "info", "path: 5", ".yaml"),
        ("8-eval-methods-string", ("methods", "list"), "eval", "methods: evalp", ".yaml"),
        ("8-eval-methods-unknown", ("methods", "magic"), "eval", "methods: [evalp, magic]", ".yaml"),
        ("8-json-not-json", ("c.json", "parse"), "info", "{steps: 2", ".json"),
    ]
)
def _bad_config_file(tmp, made, command, text, suffix):
    return [*_base_argv(tmp, made, command), "--config", _config(tmp, text, suffix)]


@rows([("8-config-is-a-folder", (at("conf.d"), "no such file"))])
def _config_folder(tmp, made):
    (tmp / "conf.d").mkdir()
    return ["info", made["cache"], "--config", tmp / "conf.d"]


# ---- 9. an edited prior config.json -----------------------------------------------------------------

PRIOR_EDITS: list[tuple[str, tuple, Callable[[dict], object]]] = [
    ("9-config-a-list", ("config.json", "object"), lambda c: []),
    ("9-energy-null", ("config.json", "energy"), lambda c: c.update(energy=None)),
    ("9-flow-null", ("config.json", "flow"), lambda c: c.update(flow=None)),
    ("9-log-z-string", ("config.json", "log_z"), lambda c: c.update(log_z="x")),
    ("9-log-z-bool", ("config.json", "log_z"), lambda c: c.update(log_z=True)),
    ("9-log-z-nan", ("config.json", "log_z"), lambda c: c.update(log_z=float("nan"))),
    ("9-normalization-string", ("config.json", "normalization"), lambda c: c.update(normalization="x")),
    ("9-normalization-scaling-zero", ("config.json", "scaling_factor"), lambda c: c["normalization"].update(scaling_factor=0)),
    ("9-latent-shape-abc", ("config.json", "latent_shape"), lambda c: c.update(latent_shape="abc")),
    ("9-latent-shape-negative", ("config.json", "latent_shape"), lambda c: c.update(latent_shape=[-4, 8, 8])),
    ("9-latent-shape-float", ("config.json", "latent_shape"), lambda c: c.update(latent_shape=[4, 8, 8.5])),
    ("9-latent-shape-huge", ("config.json", "latent_shape"), lambda c: c.update(latent_shape=[4096, 4096, 4096])),
    ("9-latent-shape-empty", ("config.json", "latent_shape"), lambda c: c.update(latent_shape=[])),
    ("9-residual-unknown-key", ("config.json", "`energy`", "bogus"), lambda c: c["energy"]["residual"].update(bogus=1)),
    ("9-residual-not-an-object", ("config.json", "`energy`"), lambda c: c["energy"].update(residual=[1])),
    ("9-energy-kind-unknown", ("config.json", "`energy`", "bogus"), lambda c: c["energy"].update(kind="bogus")),
    ("9-flow-kind-unknown", ("config.json", "`flow`", "bogus"), lambda c: c["flow"].update(kind="bogus")),
    ("9-flow-unknown-key", ("config.json", "`flow`", "wings"), lambda c: c["flow"].update(wings=2)),
    ("9-num-blocks-1e6-float", ("config.json", "num_blocks"), lambda c: c["flow"].update(num_blocks=1e6)),
    ("9-num-blocks-1e6-int", ("config.json", "num_blocks"), lambda c: c["flow"].update(num_blocks=1_000_000)),
    ("9-hidden-huge", ("config.json", "hidden"), lambda c: c["flow"].update(hidden=10**7)),
    ("9-hidden-string", ("config.json", "`flow`", "hidden"), lambda c: c["flow"].update(hidden="wide")),
    ("9-hidden-doubled", ("model.safetensors", "config.json"), lambda c: c["flow"].update(hidden=2 * c["flow"]["hidden"])),
    ("9-flow-latent-shape-other", ("config.json", "flow.latent_shape"), lambda c: c["flow"].update(latent_shape=[4, 4, 16])),
    ("9-missing-log-z", ("config.json", "log_z"), lambda c: c.pop("log_z")),
    ("9-format-version-string", ("config.json", "format_version"), lambda c: c.update(format_version="1")),
    ("9-format-version-bool", ("config.json", "format_version"), lambda c: c.update(format_version=True)),
    ("9-provenance-string", ("config.json", "provenance"), lambda c: c.update(provenance="x")),
    ("9-training-a-list", ("config.json", "training"), lambda c: c.update(training=[1])),
]


def _edited_prior(tmp: Path, made: dict, edit: Callable[[dict], object]) -> Path:
    prior = copy(made["prior"], tmp / "prior")
    edit_json(prior / "config.json", edit)
    return prior


@rows([(f"{id}-sample", names, edit) for id, names, edit in PRIOR_EDITS])
def _sample_edited_prior(tmp, made, edit):
    return ["sample", "--prior", _edited_prior(tmp, made, edit), "-n", "2", "--out", tmp / "z.safetensors", "--device", "cpu"]


@rows([(f"{id}-info", names, edit) for id, names, edit in PRIOR_EDITS[:13]])
def _info_edited_prior(tmp, made, edit):
    return ["info", _edited_prior(tmp, made, edit)]


@rows(
    [
        ("9-config-not-utf8", ("config.json",), lambda p: (p / "config.json").write_bytes(b"\xff\xfe")),
        ("9-config-truncated", ("config.json",), lambda p: truncate(p / "config.json")),
        ("9-model-truncated", ("model.safetensors",), lambda p: truncate(p / "model.safetensors")),
        ("9-model-empty", ("model.safetensors",), lambda p: (p / "model.safetensors").write_bytes(b"")),
    ]
)
def _sample_damaged_prior(tmp, made, damage):
    prior = copy(made["prior"], tmp / "prior")
    damage(prior)
    return ["sample", "--prior", prior, "-n", "2", "--out", tmp / "z.safetensors", "--device", "cpu"]


# ---- 10. a damaged checkpoint on --resume -------------------------------------------------------------


@rows(
    [
        ("10-state-json-garbled", ("state.json", "damaged"), lambda c: (c / "state.json").write_text("{ half"), []),
        ("10-state-step-string", ("state.json", "damaged"), lambda c: edit_json(c / "state.json", lambda s: s.update(step="ten")), []),
        ("10-energy-truncated", ("energy.safetensors", "damaged"), lambda c: truncate(c / "energy.safetensors"), []),
        ("10-flow-empty", ("flow.safetensors", "damaged"), lambda c: (c / "flow.safetensors").write_bytes(b""), []),
        ("10-ema-missing", ("flow_ema.safetensors", "damaged"), lambda c: (c / "flow_ema.safetensors").unlink(), []),
        ("10-optim-json-a-list", ("optim.json", "damaged"), lambda c: (c / "optim.json").write_text("[]"), []),
        (
            "10-optim-tensors-garbled",
            ("optim_energy.safetensors", "damaged"),
            lambda c: (c / "optim_energy.safetensors").write_bytes(b"\x00" * 16),
            [],
        ),
        ("10-rng-truncated", ("rng-rank0.safetensors", "damaged"), lambda c: truncate(c / "rng-rank0.safetensors"), []),
        ("10-rng-json-garbled", ("rng-rank0.json", "damaged"), lambda c: (c / "rng-rank0.json").write_text("nope"), []),
        (
            "10-foreign-weights",
            ("does not fit the networks",),
            lambda c: save_file({"x": torch.zeros(3)}, str(c / "energy.safetensors")),
            [],
        ),
        ("10-other-architecture", ("does not fit the networks", "energy"), lambda c: None, ["--energy-depth", "2"]),
    ]
)
def _resume_from_damaged_checkpoint(tmp, made, damage, extra):
    out = copy(made["prior"].parent, tmp / "fit")
    damage(sorted((out / "train" / "checkpoints").glob("step-*"))[-1])
    return ["fit", "--latents", made["latents"], "--out", out, "--steps", "10", "--resume", *FIT_FLAGS, *extra]


# ---- 11. a VAE with other weights -----------------------------------------------------------------------


@rows(
    [
        ("11-sample-finetuned-vae", ("--vae", "weights", "--allow-finetuned-vae"), "sample"),
        ("11-eval-finetuned-vae", ("--vae", "weights", "--allow-finetuned-vae"), "eval"),
    ]
)
def _finetuned_vae(tmp, made, command):
    if command == "sample":
        return ["sample", "--prior", made["prior"], "-n", "2", "--vae", made["finetuned"], "--out", tmp / "g.png", "--quiet"]
    return ["eval", "--prior", made["prior"], "--latents", made["latents"], "--vae", made["finetuned"], "--quiet"]


# ---- 12. settings that cannot fit in memory ---------------------------------------------------------------


@rows(
    [
        ("12-resolution-100000", ("--resolution 100000", "estimated"), ["--resolution", "100000"]),
        ("12-resolution-and-batch", ("--batch-size 512", "estimated"), ["--resolution", "32768", "--batch-size", "512"]),
    ]
)
def _huge_encode(tmp, made, flags):
    return ["encode", "--data", made["data"], "--out", tmp / "cache", "--num-workers", "0", "--quiet", *flags]


@rows([("12-sample-n-huge", (f"-n {10**13}",))])
def _huge_sample(tmp, made):
    return ["sample", "--prior", made["prior"], "-n", str(10**13), "--out", tmp / "z.safetensors", "--device", "cpu"]


# ---- 13. nothing but corrupt images; --prior FILE --------------------------------------------------------


@rows([("13-only-corrupt-images", (at("data"), "bad0.png", "bad1.jpg"))])
def _only_corrupt_images(tmp, made):
    (tmp / "data").mkdir()
    (tmp / "data" / "bad0.png").write_bytes(b"not a png")
    (tmp / "data" / "bad1.jpg").write_bytes(b"\xff\xd8 truncated")
    return ["encode", "--data", tmp / "data", "--out", tmp / "cache", "--num-workers", "0", "--quiet"]


@rows(
    [
        ("13-sample-prior-is-a-file", (at("p.txt"), "is a file"), "sample"),
        ("13-eval-prior-is-a-file", (at("p.txt"), "is a file"), "eval"),
        ("13-info-prior-config-is-a-file", (at("p.txt"),), "info"),
    ]
)
def _prior_is_a_file(tmp, made, command):
    (tmp / "p.txt").write_text("x")
    return {
        "sample": ["sample", "--prior", tmp / "p.txt", "-n", "2", "--out", tmp / "z.safetensors"],
        "eval": ["eval", "--prior", tmp / "p.txt", "--latents", made["latents"], "--quiet"],
        "info": ["info", tmp / "p.txt"],
    }[command]


def test_the_table_covers_every_item_with_over_100_cases():
    assert {c.id.split("-")[0] for c in CASES} == {str(i) for i in range(1, 14)}
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_sentence_and_nothing_is_lost(c: Case, made, tmp_path):
    argv = c.setup(tmp_path, made)
    before = snapshot(tmp_path)
    code, _, err = run_cli(argv)
    assert code == 2, err  # every refusal of bad input; argparse's usage errors give 2 as well
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith(f"latent-prior {argv[0]}: error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err  # one sentence, last
    for fragment in c.names:
        fragment = fragment(tmp_path) if callable(fragment) else fragment
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert snapshot(tmp_path) == before  # nothing lost, nothing changed, nothing new written


# ----------------------------------------------------------------------------------------------
# the other half of each fix: what the refusals must not stop


def test_rerunning_encode_repairs_a_damaged_shard(made, tmp_path):
    """Item 6: the refusal says that rerunning the same `encode` repairs the cache; it does."""
    cache = copy(made["cache"], tmp_path / "cache")
    good = {k: v.clone() for k, v in load_file(str(cache / "shard-00001.safetensors")).items()}  # not mmap-backed
    truncate(cache / "shard-00001.safetensors")
    code, _, err = run_cli(["info", cache, "--verify"])
    assert code == 2 and "shard-00001.safetensors" in err
    code, _, err = run_cli(["encode", "--data", made["data"], "--out", cache, "--shard-size", "4", "--num-workers", "0", "--quiet"])
    assert code == 0, err
    repaired = load_file(str(cache / "shard-00001.safetensors"))
    assert repaired.keys() == good.keys() and all(torch.equal(repaired[k], good[k]) for k in good)
    assert run_cli(["info", cache, "--verify"])[0] == 0
    assert len(open_latents(cache)) == 9


def test_opting_in_still_works(made, tmp_path):
    """Items 3 and 11: --overwrite replaces a sample file the user named, --allow-finetuned-vae decodes with a
    fine-tune; nothing else in the folder changes."""
    out = tmp_path / "z.safetensors"
    command = ["sample", "--prior", made["prior"], "-n", "3", "--out", out, "--seed", "1", "--device", "cpu"]
    assert run_cli(command)[0] == 0
    first = load_file(str(out))["latents"]
    assert run_cli(command)[0] == 2  # refused: the file exists
    code, _, err = run_cli([*command[:-4], "--seed", "2", "--device", "cpu", "--overwrite"])
    assert code == 0, err
    assert not torch.equal(load_file(str(out))["latents"], first)
    code, _, err = run_cli(
        argv("sample --prior", made["prior"], "-n 2 --vae", made["finetuned"], "--out", tmp_path / "g.png", "--allow-finetuned-vae --quiet")
    )
    assert code == 0, err
    assert (tmp_path / "g.png").stat().st_size > 0


def test_fit_overwrite_replaces_its_own_run_and_only_that(made, tmp_path):
    """Item 2: --overwrite deletes what latent-prior wrote (recognized by its marker) and leaves the rest."""
    run = tmp_path / "run"
    flags = [
        "fit",
        "--data",
        made["data"],
        "--out",
        run,
        "--steps",
        "5",
        "--grid-samples",
        "4",
        "--report-samples",
        "64",
        "--encode-workers",
        "0",
        *FIT_FLAGS,
        "--batch-size",
        "4",
    ]
    code, _, err = run_cli(flags)
    assert code == 0, err
    assert (run / RUN_MARKER).is_file()
    (run / "notes.txt").write_text("mine")
    code, _, err = run_cli([*flags, "--overwrite"])
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "prior" / "model.safetensors").is_file()
