"""`load_vae`: turn `--vae ID_OR_PATH` into a `VAEAdapter`, failing fast with one clear sentence.

Accepted specs, tried in this order:
0. None or "default": the small VAE shipped with the package (`latent_prior.defaults.DEFAULT_VAE_DIR`);
1. an existing `.safetensors` file: a single-file checkpoint (original LDM/SD key layout or diffusers
   layout), loaded with `AutoencoderKL.from_single_file`; its diffusers config comes from `config=`,
   else a `config.json` beside the file, else diffusers' guess from the keys (a Hub config, so it must
   be in the Hugging Face cache or the Hub reachable);
2. an existing folder: a `save_pretrained` folder (config.json + diffusion_pytorch_model.safetensors),
   or a pipeline folder whose `vae/` subfolder holds one (found automatically; `subfolder=` forces it);
3. anything that does not look like a local path: a Hugging Face Hub id (`stabilityai/sd-vae-ft-mse`,
   or a pipeline repo, where `vae/` is found automatically as well).

Hub ids are looked up in the local Hugging Face cache first (no network), and the Hub is contacted only
when the files are not cached; with `HF_HUB_OFFLINE=1`, or when one quick request shows the Hub is
unreachable, we stop at once instead of waiting through huggingface_hub's ~23 s of retries. A cached
repo is therefore not checked for updates; `hf download ID` refreshes it.

The model class comes from the config's `_class_name` (`AutoencoderKL` or `AutoencoderTiny`), or
`kind="kl" | "tiny"` when the config lacks it. Weights are only read from safetensors, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from latent_prior.errors import LatentPriorError, read_json_object
from latent_prior.hub import hub_reachable, offline_mode
from latent_prior.vae import VAEAdapter, parse_dtype

from .diffusers_kl import DiffusersKLAdapter
from .diffusers_tiny import DiffusersTinyAdapter

CLASS_KINDS = {"AutoencoderKL": "kl", "AutoencoderTiny": "tiny"}
PICKLED_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
WEIGHTS_NAME = "diffusion_pytorch_model"
# `--vae default` (or leaving --vae out) means the small VAE shipped in latent_prior/assets.
EMBEDDED_DEFAULT = "default"


def load_vae(
    spec: str | os.PathLike | None,
    *,
    dtype: str | torch.dtype = "fp32",
    subfolder: str | None = None,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    kind: str | None = None,
    config: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    enable_slicing: bool = False,
    enable_tiling: bool = False,
    force_upcast: bool | None = None,
) -> VAEAdapter:
    """Load a diffusers VAE from a hub id, a local folder or a single `.safetensors` file.

    Args:
        spec: hub id, folder or `.safetensors` file (see the module docstring); None or "default" is
            the embedded default VAE (`latent_prior.defaults.DEFAULT_VAE_DIR`).
        dtype: "fp32" | "fp16" | "bf16": the precision encode/decode run in (weights are read in fp32
            first, so the provenance fingerprint does not depend on it).
        subfolder: the VAE's subfolder in a pipeline folder or repo (default: found automatically).
        revision: hub branch, tag or commit.
        device: where to run ("cpu", "cuda", "cuda:1", ...).
        kind: "kl" or "tiny", only needed when the config has no `_class_name`.
        config: for a single-file checkpoint, a diffusers config folder (or hub id) to build it from.
        cache_dir: Hugging Face cache to use instead of the default one.
        enable_slicing, enable_tiling, force_upcast: passed to the adapter (see `DiffusersKLAdapter`).
    """
    parse_dtype(dtype)  # refuse a bad --dtype before any loading
    if kind is not None and kind not in ("kl", "tiny"):
        raise LatentPriorError(f"kind={kind!r} is not a VAE kind; use 'kl' (AutoencoderKL) or 'tiny' (AutoencoderTiny).")
    options = dict(dtype=dtype, device=device, enable_slicing=enable_slicing, enable_tiling=enable_tiling, force_upcast=force_upcast)
    if spec is None or os.fspath(spec) == EMBEDDED_DEFAULT:
        return _from_folder(_embedded_default_dir(), subfolder=None, kind=kind, options=options)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent  # the config of a save_pretrained folder names that folder
    if path.is_file():
        return _from_single_file(path, config=config, kind=kind, cache_dir=cache_dir, options=options)
    if path.is_dir():
        return _from_folder(path, subfolder=subfolder, kind=kind, options=options)
    if looks_like_path(text):
        raise LatentPriorError(f"VAE path {text} does not exist; check the path (a hub id looks like 'owner/name').")
    return _from_hub(text, subfolder=subfolder, revision=revision, kind=kind, cache_dir=cache_dir, options=options)


def _embedded_default_dir() -> Path:
    from latent_prior import defaults  # lazily: the assets are only needed when asked for

    folder = Path(defaults.DEFAULT_VAE_DIR)
    if not (folder / "config.json").is_file():
        raise LatentPriorError(
            f"the embedded default VAE is missing from {folder}; reinstall latent-prior with its package data "
            "(pip install --force-reinstall latent-prior) or pass --vae with your own VAE."
        )
    return folder


def looks_like_path(text: str) -> bool:
    """True when `text` cannot be a hub id, so that a missing local path is reported as such."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith((".", "/", "~")) or "\\" in text or (os.sep != "/" and os.sep in text):
        return True
    if text.count("/") > 1 or Path(text).suffix.lower() in PICKLED_SUFFIXES | {".safetensors", ".json"}:
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False


# ---- building the adapter ---------------------------------------------------------------------------
def choose_kind(config: dict[str, Any], kind: str | None, where: str) -> str:
    """'kl' or 'tiny' from the config's `_class_name`, or `kind` when the config does not say."""
    class_name = config.get("_class_name")
    if class_name is None:
        if kind is not None:
            return kind
        if "encoder_block_out_channels" in config:
            return "tiny"
        if "block_out_channels" in config:
            return "kl"
        raise LatentPriorError(f"{where} has no _class_name and does not look like a diffusers VAE config; pass kind='kl' or 'tiny'.")
    found = CLASS_KINDS.get(class_name)
    if found is None:
        raise LatentPriorError(
            f"{where} has _class_name {class_name}, but only AutoencoderKL and AutoencoderTiny are supported; "
            "adapt other VAEs with latent_prior.adapters.wrap."
        )
    if kind is not None and kind != found:
        raise LatentPriorError(f"{where} has _class_name {class_name}, which contradicts kind={kind!r}; drop kind or fix it.")
    return found


def _model_class(kind: str) -> type:
    from diffusers import AutoencoderKL, AutoencoderTiny

    return AutoencoderKL if kind == "kl" else AutoencoderTiny


def _adapter(vae: torch.nn.Module, kind: str, options: dict[str, Any], **provenance: Any) -> VAEAdapter:
    if kind == "kl":
        return DiffusersKLAdapter(vae, **options, **provenance)
    options = {k: v for k, v in options.items() if k != "force_upcast"}  # AutoencoderTiny never upcasts
    return DiffusersTinyAdapter(vae, **options, **provenance)


def _read_config(path: Path) -> dict[str, Any]:
    return read_json_object(path, "VAE config", "re-save it with save_pretrained")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---- local folders ----------------------------------------------------------------------------------
def _from_folder(folder: Path, *, subfolder: str | None, kind: str | None, options: dict[str, Any]) -> VAEAdapter:
    if subfolder is None and not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        subfolder = "vae"  # a pipeline folder
    target = folder / subfolder if subfolder else folder
    if not target.is_dir():
        raise LatentPriorError(f"VAE folder {folder} has no subfolder {subfolder!r}; check --subfolder.")
    config_path = target / "config.json"
    if not config_path.is_file():
        raise LatentPriorError(
            f"VAE folder {target} has no config.json; expected a diffusers save_pretrained folder "
            f"(config.json + {WEIGHTS_NAME}.safetensors) or a pipeline folder with a vae/ subfolder."
        )
    kind = choose_kind(_read_config(config_path), kind, str(config_path))
    variant = _weights_variant(target)
    try:
        vae = _model_class(kind).from_pretrained(
            target, torch_dtype=torch.float32, use_safetensors=True, local_files_only=True, variant=variant
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise LatentPriorError(f"VAE folder {target} could not be loaded ({_first_line(exc)}); re-save it with save_pretrained.") from exc
    return _adapter(vae, kind, options, source=str(folder.resolve()), subfolder=subfolder)


def _weights_variant(folder: Path) -> str | None:
    """None for `diffusion_pytorch_model.safetensors` (or a sharded index), else e.g. 'fp16'."""
    names = {p.name for p in folder.glob("*.safetensors*")}
    if f"{WEIGHTS_NAME}.safetensors" in names or f"{WEIGHTS_NAME}.safetensors.index.json" in names:
        return None
    variants = sorted(
        n[len(WEIGHTS_NAME) + 1 : -len(".safetensors")] for n in names if n.startswith(WEIGHTS_NAME + ".") and n.endswith(".safetensors")
    )
    if variants:
        return variants[0]
    if any(folder.glob("*.bin")):
        raise LatentPriorError(
            f"VAE folder {folder} holds only pickled .bin weights, which we do not load for safety; "
            "re-save it with save_pretrained(..., safe_serialization=True)."
        )
    raise LatentPriorError(f"VAE folder {folder} has no {WEIGHTS_NAME}.safetensors; re-save it with save_pretrained.")


# ---- single-file checkpoints ------------------------------------------------------------------------
def _from_single_file(
    path: Path,
    *,
    config: str | os.PathLike | None,
    kind: str | None,
    cache_dir: str | os.PathLike | None,
    options: dict[str, Any],
) -> VAEAdapter:
    suffix = path.suffix.lower()
    if suffix in PICKLED_SUFFIXES:
        raise LatentPriorError(
            f"VAE checkpoint {path} is a pickle ({suffix}), which we do not load for safety; convert it to .safetensors."
        )
    if suffix != ".safetensors":
        raise LatentPriorError(f"VAE file {path} is not a .safetensors checkpoint; pass a .safetensors file or a diffusers folder.")

    config_dir: Path | None = None
    if config is not None:
        given = Path(os.fspath(config)).expanduser()
        if given.is_file() and given.name == "config.json":
            given = given.parent
        if given.is_dir():
            config_dir = given
        elif looks_like_path(os.fspath(config)):
            raise LatentPriorError(f"VAE config {config} does not exist; pass a folder holding the VAE's config.json.")
    elif (path.parent / "config.json").is_file():
        config_dir = path.parent

    source = str(path.resolve())
    if config_dir is not None:
        if not (config_dir / "config.json").is_file():
            raise LatentPriorError(f"VAE config folder {config_dir} has no config.json; pass the folder that holds it.")
        kind = choose_kind(_read_config(config_dir / "config.json"), kind, str(config_dir / "config.json"))
        if kind == "tiny":
            vae = _tiny_from_single_file(path, config_dir)
        else:
            vae = _kl_from_single_file(path, config=str(config_dir), local_files_only=True)
        return _adapter(vae, kind, options, source=source)

    if kind == "tiny":
        raise LatentPriorError(f"AutoencoderTiny checkpoint {path} needs its config; put config.json beside it or pass config=FOLDER.")
    # No local config: diffusers picks a Hub config from the checkpoint's keys (cache first, then the Hub).
    hub_config = None if config is None else os.fspath(config)
    try:
        vae = _kl_from_single_file(path, config=hub_config, local_files_only=True, cache_dir=cache_dir)
    except _NotCached as missing:
        if offline_mode() or not hub_reachable():
            if hub_config is not None:
                raise _offline_error(hub_config) from missing
            raise LatentPriorError(
                f"single-file VAE {path} has no config.json beside it and the diffusers config it needs is not in "
                "the Hugging Face cache (offline); put the VAE's config.json beside the file, pass config=FOLDER, "
                "or run once while online."
            ) from missing
        vae = _kl_from_single_file(path, config=hub_config, local_files_only=False, cache_dir=cache_dir)
    return _adapter(vae, "kl", options, source=source)


def _kl_from_single_file(path: Path, *, config: str | None, local_files_only: bool, cache_dir: Any = None) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_single_file(
            str(path), config=config, torch_dtype=torch.float32, local_files_only=local_files_only, cache_dir=cache_dir
        )
    except OSError as exc:
        if local_files_only and (config is None or not Path(config).is_dir()):
            raise _NotCached() from exc
        raise LatentPriorError(f"single-file VAE {path} could not be loaded ({_first_line(exc)}); check the file and its config.") from exc
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LatentPriorError(
            f"single-file VAE {path} does not match its config ({_first_line(exc)}); pass the config it was trained with."
        ) from exc


def _tiny_from_single_file(path: Path, config_dir: Path) -> torch.nn.Module:
    # diffusers has no single-file loader for AutoencoderTiny: build it from the config and load the
    # (diffusers-layout) state dict ourselves, strictly.
    from diffusers import AutoencoderTiny
    from safetensors.torch import load_file

    vae = AutoencoderTiny.from_config(AutoencoderTiny.load_config(config_dir))
    try:
        vae.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, OSError) as exc:
        raise LatentPriorError(
            f"AutoencoderTiny checkpoint {path} does not match {config_dir / 'config.json'} ({_first_line(exc)}); "
            "it must use diffusers' key layout."
        ) from exc
    return vae.eval()


# ---- the Hugging Face Hub ---------------------------------------------------------------------------
class _NotCached(Exception):
    """Internal: the files are not in the local Hugging Face cache."""


def _offline_error(repo_id: str, detail: str = "not in the local Hugging Face cache") -> LatentPriorError:
    return LatentPriorError(
        f"VAE {repo_id!r} is a Hugging Face Hub id that is {detail} and the Hub cannot be reached "
        f"(offline); download it first while online (`hf download {repo_id}`, or `from_pretrained` once) "
        "or point --vae at a local folder."
    )


def _from_hub(
    repo_id: str,
    *,
    subfolder: str | None,
    revision: str | None,
    kind: str | None,
    cache_dir: str | os.PathLike | None,
    options: dict[str, Any],
) -> VAEAdapter:
    try:
        return _hub_attempt(repo_id, subfolder, revision, kind, cache_dir, options, local_files_only=True)
    except _NotCached as missing:
        if offline_mode() or not hub_reachable():
            raise _offline_error(repo_id, str(missing) or "not in the local Hugging Face cache") from missing
    return _hub_attempt(repo_id, subfolder, revision, kind, cache_dir, options, local_files_only=False)


def _hub_attempt(
    repo_id: str,
    subfolder: str | None,
    revision: str | None,
    kind: str | None,
    cache_dir: Any,
    options: dict[str, Any],
    *,
    local_files_only: bool,
) -> VAEAdapter:
    config_file, subfolder = _hub_config(repo_id, subfolder, revision, cache_dir, local_files_only)
    kind = choose_kind(_read_config(Path(config_file)), kind, f"{repo_id}/{subfolder + '/' if subfolder else ''}config.json")
    try:
        vae = _model_class(kind).from_pretrained(
            repo_id,
            subfolder=subfolder,
            revision=revision,
            cache_dir=cache_dir,
            torch_dtype=torch.float32,
            use_safetensors=True,
            local_files_only=local_files_only,
        )
    except (OSError, ValueError) as exc:
        if local_files_only:
            raise _NotCached("partly in the local Hugging Face cache (its weights are missing)") from exc
        raise LatentPriorError(
            f"VAE {repo_id!r} could not be loaded from the Hub ({_first_line(exc)}); it needs "
            f"{WEIGHTS_NAME}.safetensors weights, or download it and point --vae at the folder."
        ) from exc
    return _adapter(vae, kind, options, source=repo_id, revision=revision, subfolder=subfolder)


def _hub_config(
    repo_id: str, subfolder: str | None, revision: str | None, cache_dir: Any, local_files_only: bool
) -> tuple[str, str | None]:
    """Path of the cached config.json and the subfolder it lives in (the root, else `vae/`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    candidates = [subfolder] if subfolder is not None else [None, "vae"]
    for candidate in candidates:
        try:
            path = hf_hub_download(
                repo_id, "config.json", subfolder=candidate, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
            )
            return path, candidate
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
            if local_files_only:
                continue  # not cached here; try the next place, then the Hub
            raise _offline_error(repo_id) from exc  # the connection dropped after our probe
        except GatedRepoError as exc:  # a subclass of RepositoryNotFoundError, so first
            raise LatentPriorError(
                f"VAE {repo_id!r} is a gated Hub repo; accept its licence on huggingface.co and log in with `hf auth login`."
            ) from exc
        except RepositoryNotFoundError as exc:
            raise LatentPriorError(
                f"VAE {repo_id!r} was not found on the Hugging Face Hub; check the id (a private repo needs "
                "`hf auth login`) or point --vae at a local folder."
            ) from exc
        except RevisionNotFoundError as exc:
            raise LatentPriorError(f"VAE {repo_id!r} has no revision {revision!r}; check --revision.") from exc
        except EntryNotFoundError:
            continue  # no config.json there; try vae/
        except HfHubHTTPError as exc:
            raise LatentPriorError(
                f"the Hugging Face Hub answered an error for VAE {repo_id!r} ({_first_line(exc)}); try again later "
                "or point --vae at a local folder."
            ) from exc
    if local_files_only:
        raise _NotCached()
    where = f"in {subfolder}/" if subfolder is not None else "at its top level or in vae/"
    raise LatentPriorError(f"Hub repo {repo_id!r} has no config.json {where}; pass --subfolder with the VAE's folder.")
