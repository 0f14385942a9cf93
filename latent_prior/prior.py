"""The exported prior: a drop-in replacement for a VAE's N(0, I) prior.

`LatentPrior` bundles what `latent-prior fit` learned, in the VAE's *normalized* latent space:

    p_θ(z) = N(z; 0, I) · exp(−E_θ(z)) / Z_θ

* `energy_net`: the energy E_θ (nats), `latent_prior.energy`;
* `flow`: the sampler q_φ (the EMA weights), a normalizing flow from `latent_prior.flows`;
* `log_z`: the importance-sampling estimate log Ẑ (with its effective sample size);
* `normalization`: the `LatentNormalization` the prior was trained in, so `sample` returns *raw*
  latents for `vae.decode` and `log_prob` / `energy` take raw latents.

On disk a prior is a folder with `model.safetensors` (every tensor) and `config.json` (how to rebuild
the networks, log Ẑ, the normalization, the source VAE's provenance, the training config, versions),
with a model card (`README.md`). It is a Hub model (huggingface_hub's `ModelHubMixin`): `save_pretrained`,
`push_to_hub` and `from_pretrained` take a folder or a Hub repo id. Nothing is ever unpickled.

`latent-prior sample` (`latent_prior.commands.sample`) draws from a saved prior on the command line.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from huggingface_hub import ModelHubMixin
from torch import nn

from latent_prior.errors import LatentPriorError
from latent_prior.files import atomic_save_safetensors, atomic_write_json
from latent_prior.sampling import SAMPLERS
from latent_prior.vae import LatentNormalization, VAEAdapter, parse_dtype

__all__ = ["LatentPrior", "FORMAT_VERSION", "MODEL_FILE", "CONFIG_FILE"]

#: Version of the on-disk layout. Bump it when a field's meaning changes; `from_pretrained` refuses
#: folders written by a newer layout instead of silently misreading them.
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: the folders of a fit's --out: the exported prior alone (what a user copies or uploads), and the training
#: records (checkpoints, metrics.csv, fit_config.json, fit_summary.json, training.png)
PRIOR_DIR, TRAIN_DIR = "prior", "train"
CARD_FILE = "README.md"
SAMPLE_METHODS = tuple(SAMPLERS)


def _build_flow(latent_shape: Sequence[int], config: dict[str, Any]) -> nn.Module:
    from latent_prior.flows import build_flow

    config = dict(config)
    shape = tuple(config.pop("latent_shape", latent_shape))
    return build_flow(shape, **config)


def _build_energy(latent_shape: Sequence[int], config: dict[str, Any]) -> nn.Module:
    from latent_prior.energy import build_energy

    config = dict(config)
    shape = tuple(config.pop("latent_shape", latent_shape))
    return build_energy(shape, **config)


#: Sizes no trained prior has: a config.json asking for them was edited, and building it would hang or
#: exhaust memory. Latent elements per item; any count (blocks, layers, scales, depth, components, bins);
#: any other integer (widths).
MAX_LATENT_ELEMENTS = 2**24
MAX_COUNT = 1000
MAX_WIDTH = 65536
_COUNT_KEY = re.compile(r"blocks|layers|scales|depth|components|bins")
#: The networks of a prior, by their key in config.json and their prefix in model.safetensors.
_NETWORKS = (("energy", "energy_net.", _build_energy), ("flow", "flow.", _build_flow))


def _restore(where: Path) -> str:
    return f"restore {where} from the run that exported it, or re-export the prior"


def _check_sizes(value: Any, key: str, shape: list[int], where: Path) -> None:
    """Walk a network's sub-config: refuse absurd integers and a `latent_shape` other than the prior's."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name == "latent_shape" and item != shape:
                raise LatentPriorError(
                    f"{where}: `{key}.latent_shape` is {item!r} but the prior's latent_shape is {shape}; {_restore(where)}."
                )
            _check_sizes(item, f"{key}.{name}", shape, where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_sizes(item, f"{key}[{i}]", shape, where)
    elif isinstance(value, int) and not isinstance(value, bool):
        limit = MAX_COUNT if _COUNT_KEY.search(key.rsplit(".", 1)[-1]) else MAX_WIDTH
        if value > limit:
            raise LatentPriorError(f"{where}: `{key}` is {value}, more than any prior has (at most {limit}); {_restore(where)}.")


def validate_prior_config(config: Any, where: Path) -> None:
    """Refuse a prior's config.json (already parsed) that `from_pretrained` cannot use, with one sentence naming
    the key: its structure and types, latent_shape, normalization, log_z, and sizes no trained prior has. The
    energy and flow configs are otherwise checked by building them (see `_build_networks`)."""
    if not isinstance(config, dict):
        raise LatentPriorError(f"{where}: is not a JSON object of an exported prior; {_restore(where)}.")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise LatentPriorError(f"{where} has no integer format_version; it was not written by latent-prior.")
    if version > FORMAT_VERSION:
        raise LatentPriorError(
            f"{where} has format_version {version}, newer than this latent-prior understands "
            f"({FORMAT_VERSION}); upgrade latent-prior (pip install -U latent-prior)."
        )
    for key in ("latent_shape", "energy", "flow", "log_z"):
        if key not in config:
            raise LatentPriorError(f"{where} lacks the key {key!r}; re-export the prior.")
    shape = config["latent_shape"]
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise LatentPriorError(
            f"{where}: `latent_shape` is {shape!r}, not a list of positive integers such as [4, 8, 8]; {_restore(where)}."
        )
    if math.prod(shape) > MAX_LATENT_ELEMENTS:
        raise LatentPriorError(
            f"{where}: `latent_shape` {shape} has {math.prod(shape)} elements, more than any prior has "
            f"(at most {MAX_LATENT_ELEMENTS}); {_restore(where)}."
        )
    log_z = config["log_z"]
    if not isinstance(log_z, (int, float)) or isinstance(log_z, bool) or not math.isfinite(log_z):
        raise LatentPriorError(f"{where}: `log_z` is {log_z!r}, not a finite number of nats; {_restore(where)}.")
    for key in ("energy", "flow"):
        if not isinstance(config[key], dict):
            raise LatentPriorError(
                f"{where}: `{key}` is {config[key]!r}, not the JSON object that describes the {key} network; {_restore(where)}."
            )
        _check_sizes(config[key], key, shape, where)
    for key in ("log_z_info", "provenance", "training"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise LatentPriorError(f"{where}: `{key}` is {config[key]!r}, not a JSON object or null; {_restore(where)}.")
    LatentNormalization.from_recorded(config.get("normalization"), str(where), channels=shape[0])


def _build_networks(config: dict[str, Any], where: Path) -> dict[str, nn.Module]:
    """The energy and flow networks a validated config describes; a sub-config they cannot be built from
    (an unknown key, a wrong type or value) is one LatentPriorError naming that key."""
    shape = tuple(config["latent_shape"])
    networks = {}
    for key, _, build in _NETWORKS:
        try:
            networks[key] = build(shape, config[key])
        except (LatentPriorError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise LatentPriorError(
                f"{where}: `{key}` does not describe a network that can be built ({str(exc).rstrip('.')}); {_restore(where)}."
            ) from None
    return networks


def _weights_header(model_file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors header alone (nothing is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(model_file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled file becomes one clear sentence
        raise LatentPriorError(f"{model_file} could not be read ({type(exc).__name__}: {exc}); re-export the prior.") from None


def _check_weight_count(config: dict[str, Any], header: dict[str, tuple[int, ...]], directory: Path) -> None:
    """Refuse a config whose networks hold other tensors than model.safetensors, before allocating them: the
    networks are first built on the `meta` device, which costs no memory, so a config edited to ask for
    huge networks is refused at once. (Where a network cannot be built on `meta`, the real build and the
    strict state-dict check still catch a mismatch.)"""
    shape = tuple(config["latent_shape"])
    for key, prefix, build in _NETWORKS:
        try:
            with torch.device("meta"):
                tensors = build(shape, config[key]).state_dict()
        except Exception:  # noqa: BLE001 - judged by the real build, which names the problem
            continue
        stored = {k[len(prefix) :]: v for k, v in header.items() if k.startswith(prefix)}
        built = {k: tuple(v.shape) for k, v in tensors.items()}
        if built != stored:
            odd = sorted(set(built) ^ set(stored)) or [k for k in sorted(built) if built[k] != stored[k]]
            raise LatentPriorError(
                f"{directory / MODEL_FILE} does not match {CONFIG_FILE}: its `{key}` config describes "
                f"{sum(math.prod(v) for v in built.values())} weights where the file holds "
                f"{sum(math.prod(v) for v in stored.values())} (first difference: {prefix}{odd[0]}); re-export the prior."
            )


class LatentPrior(
    nn.Module, ModelHubMixin, library_name="latent-prior", license="apache-2.0", tags=["latent-prior", "vae-prior", "energy-based-model"]
):
    """An energy-based latent prior p_θ(z) = N(z; 0, I)·exp(−E_θ(z))/Z_θ for one VAE.

    Every public method takes and returns latents in the VAE's **raw** latent space (what its
    encoder emits and `decode` accepts); the normalization it was trained in is applied inside.
    Computations follow the module: move it with `.to(device)` / `.to(dtype)`.

    Args:
        energy_net: E_θ, (N, *latent_shape) normalized latents -> (N,) nats.
        flow: the sampler q_φ (a `latent_prior.flows` flow), in normalized space.
        latent_shape: shape of one latent, e.g. (8,) or (4, 32, 32).
        normalization: the VAE's `LatentNormalization` (identity when None).
        log_z: log Ẑ in nats (normalized space), estimated by importance sampling with the flow.
        log_z_info: diagnostics of that estimate (ess, ess_fraction, num_samples, curve).
        provenance: the source VAE's `VAEProvenance.to_dict()`, or None when unknown.
        training: the training config and run facts (JSON-able), recorded for reproducibility.
    """

    def __init__(
        self,
        energy_net: nn.Module,
        flow: nn.Module,
        *,
        latent_shape: Sequence[int],
        normalization: LatentNormalization | None = None,
        log_z: float = 0.0,
        log_z_info: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        training: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.energy_net = energy_net
        self.flow = flow
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.normalization = normalization or LatentNormalization()
        # A python float, not a buffer: `.to(torch.bfloat16)` must not round log Ẑ.
        self.log_z = float(log_z)
        self.log_z_info = dict(log_z_info or {})
        self.provenance = provenance
        # (not `self.training`: nn.Module uses that name for its train/eval flag)
        self.training_info = dict(training or {})

    # ------------------------------------------------------------------------------------------
    # device / dtype

    @property
    def device(self) -> torch.device:
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    @property
    def num_latent_dims(self) -> int:
        """D = prod(latent_shape), the number of latent scalars."""
        return math.prod(self.latent_shape)

    def _to_module(self, raw_z: torch.Tensor) -> torch.Tensor:
        if not isinstance(raw_z, torch.Tensor):
            raise LatentPriorError(
                f"expected a tensor of latents (N, {', '.join(map(str, self.latent_shape))}), got {type(raw_z).__name__}."
            )
        if tuple(raw_z.shape[1:]) != self.latent_shape or raw_z.dim() != len(self.latent_shape) + 1:
            raise LatentPriorError(
                f"latents of shape {tuple(raw_z.shape)} do not match this prior's latent shape "
                f"(N, {', '.join(map(str, self.latent_shape))}); encode with the VAE the prior was fitted on."
            )
        return raw_z.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------------------------------
    # densities

    def log_abs_det_normalize(self) -> float:
        """log |det ∂normalize(raw)/∂raw| in nats: Σ over latent elements of log|scaling / std_c|.

        The normalization is affine and elementwise, so this is a constant; it is 0 for the identity.
        """
        ones = torch.ones((1, *self.latent_shape), dtype=torch.float64)
        scale = self.normalization.normalize(ones) - self.normalization.normalize(torch.zeros_like(ones))
        return float(scale.abs().log().sum())

    def energy(self, raw_z: torch.Tensor) -> torch.Tensor:
        """E_θ of raw latents (N, *latent_shape) -> (N,) nats (evaluated in normalized space)."""
        z = self.normalization.normalize(self._to_module(raw_z))
        return self.energy_net(z)

    def log_prob(self, raw_z: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """log p_θ of latents (N, *latent_shape) -> (N,) nats, using the estimate log Ẑ.

        By default `raw_z` is in raw space and the result is a density **in raw space**: it includes
        the constant log-Jacobian of the normalization (`log_abs_det_normalize`), so it is comparable
        with other raw-space densities. With `normalized=True`, `raw_z` is taken as already normalized
        and the result is the density in normalized space, log N(z; 0, I) − E_θ(z) − log Ẑ.
        Since log Ẑ is an estimate (biased low), so is this log-density (biased high).
        """
        z = self._to_module(raw_z)
        if not normalized:
            z = self.normalization.normalize(z)
        from latent_prior.sampling import log_standard_normal

        out = log_standard_normal(z) - self.energy_net(z) - self.log_z
        if not normalized:
            out = out + self.log_abs_det_normalize()
        return out

    def forward(self, raw_z: torch.Tensor) -> torch.Tensor:
        """Same as `log_prob(raw_z)`."""
        return self.log_prob(raw_z)

    # ------------------------------------------------------------------------------------------
    # sampling

    def sample(
        self,
        n: int,
        method: str = "sampler",
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Draw n latents from the prior, returned in the VAE's RAW latent space: (n, *latent_shape),
        ready for `vae.decode(...)` (the normalization is undone here).

        method:
            "sampler"  — one pass of the flow q_φ (fast; temperature scales its base noise);
            "sir"      — sampling-importance-resampling from q_φ towards p_θ (`proposals=100`);
            "langevin" — short-run Langevin on p_θ (`steps=60`, `step_size=0.4`, `init="normal"|"flow"`,
                         `space="auto"|"latent"|"base"`). "auto" (the default) runs the chain in the
                         coordinates of the energy's frozen base flow when it has one (a flow-based
                         energy): the same target, but a z-space chain diverges on sharp latents
                         (see `latent_prior.sampling.sample_langevin`); "latent" runs it in z.
        For "sir" and "langevin" temperature tempers the target (see `latent_prior.sampling`; in base
        space Langevin tempers the density of the base coordinates).
        generator: a torch.Generator on the prior's device, for reproducible draws.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise LatentPriorError(f"n={n!r}: the number of samples must be a positive integer.")
        if method not in SAMPLE_METHODS:
            raise LatentPriorError(f"method={method!r}: choose one of {', '.join(SAMPLE_METHODS)}.")
        if generator is not None and generator.device.type != self.device.type:
            raise LatentPriorError(
                f"the generator is on {generator.device} but the prior is on {self.device}; create it with "
                f"torch.Generator(device='{self.device}')."
            )
        from latent_prior.sampling import sample

        was_training = self._enter_eval()
        try:
            z = sample(
                method, self.energy_net, self.flow, n, generator=generator, temperature=temperature, batch_size=batch_size, **options
            )
        except TypeError as exc:  # an option the method does not take
            raise LatentPriorError(f"method={method!r} does not accept these options ({exc}).") from None
        finally:
            self.train(was_training)
        return self.normalization.denormalize(z.detach())

    def _enter_eval(self) -> bool:
        """Switch to eval mode (no spectral-norm power iterations while sampling); return the previous mode."""
        was = self.training
        self.eval()
        return was

    # ------------------------------------------------------------------------------------------
    # compatibility with a VAE

    def check_compatible(
        self,
        adapter_or_latent_shape: VAEAdapter | Sequence[int],
        normalization: LatentNormalization | None = None,
        *,
        resolution: int | None = None,
        allow_other_weights: bool = False,
    ) -> None:
        """Raise LatentPriorError unless latents of this VAE / shape can be used with this prior.

        Pass a `VAEAdapter` (its normalization and provenance are compared; its latent shape at
        `resolution` when given, otherwise its channel count), or a latent shape plus, optionally,
        the normalization those latents use. The error says what differs, expected vs got.
        A VAE with the same config but other weights (their fingerprint, taken before any dtype cast, so
        one checkpoint has one fingerprint) is refused too, unless `allow_other_weights=True`: use that for
        a fine-tune of the VAE the prior was fitted on, whose latents you know to be distributed alike.
        """
        expected = self.latent_shape
        if isinstance(adapter_or_latent_shape, VAEAdapter):
            adapter = adapter_or_latent_shape
            normalization = adapter.normalization if normalization is None else normalization
            if resolution is not None:
                got = tuple(adapter.latent_shape(resolution))
                if got != expected:
                    raise LatentPriorError(
                        f"latent shape differs: the prior expects {expected} but the VAE gives {got} at "
                        f"{resolution} px; use images of the resolution the prior was fitted at, or fit a new prior."
                    )
            else:
                try:
                    probe = tuple(adapter.latent_shape(64))
                except LatentPriorError:  # a VAE that cannot tile 64 px: nothing to compare without a resolution
                    probe = expected
                if len(probe) != len(expected) or probe[0] != expected[0]:
                    raise LatentPriorError(
                        f"latent shape differs: the prior expects {expected} but this VAE's latents look like "
                        f"{probe} (at 64 px); fit a prior on this VAE's latents."
                    )
            self._check_provenance(adapter, allow_other_weights)
        else:
            try:
                if isinstance(adapter_or_latent_shape, (str, bytes)):
                    raise TypeError  # a string is a sequence of characters, never a shape
                got = tuple(int(s) for s in adapter_or_latent_shape)
            except (TypeError, ValueError):
                raise LatentPriorError(
                    f"check_compatible expects a VAEAdapter or a latent shape, got {type(adapter_or_latent_shape).__name__}."
                ) from None
            if got != expected:
                raise LatentPriorError(f"latent shape differs: the prior expects {expected}, got {got}.")
        if normalization is not None and not self.normalization.matches(normalization):
            raise LatentPriorError(
                f"latent normalization differs: the prior was fitted with {self.normalization.to_dict()} but got "
                f"{normalization.to_dict()}; use the VAE (and scaling/shift) the prior was fitted on."
            )

    def _check_provenance(self, adapter: VAEAdapter, allow_other_weights: bool = False) -> None:
        if not self.provenance:
            return
        try:
            got = adapter.provenance.to_dict()
        except Exception:  # noqa: BLE001 - a VAE without provenance cannot be checked further
            return
        if got.get("config_hash") and self.provenance.get("config_hash") and got["config_hash"] != self.provenance["config_hash"]:
            raise LatentPriorError(
                f"VAE config differs: the prior was fitted on {self.provenance.get('source')!r} "
                f"(config {self.provenance['config_hash']}) but got {got.get('source')!r} (config {got['config_hash']}); "
                "use the VAE the prior was fitted on."
            )
        if got.get("fingerprint") and self.provenance.get("fingerprint") and got["fingerprint"] != self.provenance["fingerprint"]:
            # Same architecture, other weights: the fingerprint is taken before any dtype cast, so this is
            # another checkpoint, not rounding. A fine-tune may still suit the prior; the caller says so.
            text = (
                f"VAE weights differ: the prior was fitted on {self.provenance.get('source')!r} (weights fingerprint "
                f"{self.provenance['fingerprint']}) but got {got.get('source')!r} (fingerprint {got['fingerprint']}), "
                "whose latents may be distributed differently"
            )
            if not allow_other_weights:
                raise LatentPriorError(
                    f"{text}; use the VAE the prior was fitted on, or allow_other_weights=True "
                    "(--allow-finetuned-vae) for a fine-tune of it."
                )
            warnings.warn(f"{text}; allowed for a fine-tuned VAE.", stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # save / load

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as saved in config.json."""
        from latent_prior import __version__

        return {
            "format_version": FORMAT_VERSION,
            "latent_prior_version": __version__,
            "latent_shape": list(self.latent_shape),
            "normalization": self.normalization.to_dict(),
            "energy": dict(getattr(self.energy_net, "config", {})),
            "flow": dict(getattr(self.flow, "config", {})),
            "log_z": self.log_z,
            "log_z_info": self.log_z_info,
            "provenance": self.provenance,
            "training": self.training_info,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], *, where: str | os.PathLike = CONFIG_FILE) -> "LatentPrior":
        """A prior built from its config.json alone (the `config` property's dict), with freshly initialized
        networks: latent shape, energy and flow configs, normalization, log Ẑ and the records. `where` names the
        config in errors; a config that cannot be used is one LatentPriorError naming its key."""
        where = Path(where)
        config = json.loads(json.dumps(config, default=_json_default))  # the property's tuples as config.json's lists
        validate_prior_config(config, where)
        return cls._from_valid_config(config, where)

    @classmethod
    def _from_valid_config(cls, config: dict[str, Any], where: Path) -> "LatentPrior":
        """`from_config` on a config that `validate_prior_config` has passed."""
        networks = _build_networks(config, where)
        return cls(
            networks["energy"],
            networks["flow"],
            latent_shape=tuple(config["latent_shape"]),
            normalization=LatentNormalization.from_recorded(config.get("normalization"), str(where)),
            log_z=config["log_z"],
            log_z_info=config.get("log_z_info"),
            provenance=config.get("provenance"),
            training=config.get("training"),
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write `model.safetensors`, `config.json` and a model card (`README.md`: the source VAE, its fingerprint, the
        data, the held-out figures) to `save_directory` (created if needed), as huggingface_hub's ModelHubMixin does;
        with push_to_hub, then upload it to the Hub repo `repo_id` (created if needed; `hf auth login` first) and
        return the commit URL. Unlike the mixin, push_to_hub needs repo_id: a fit's folder is named `prior`."""
        if push_to_hub and not repo_id:
            raise LatentPriorError("save_pretrained(push_to_hub=True) needs repo_id='namespace/name'.")
        return super().save_pretrained(
            save_directory,
            repo_id=repo_id,
            push_to_hub=push_to_hub,
            model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})},
            **push_to_hub_kwargs,
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        # clone(): safetensors refuses tensors that share storage.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        atomic_save_safetensors(tensors, save_directory / MODEL_FILE, {"format": "pt", "format_version": str(FORMAT_VERSION)})
        atomic_write_json(save_directory / CONFIG_FILE, self.config, default=_json_default)
        # The mixin writes a card only where none is: a card from an earlier save would keep stale figures.
        (save_directory / CARD_FILE).unlink(missing_ok=True)

    def generate_model_card(self, repo_id: str | None = None, **_: Any) -> Any:
        """The Hub model card (`README.md`): the mixin's metadata (library, license, tags) over `model_card`'s text."""
        from huggingface_hub import ModelCard

        return ModelCard(f"---\n{self._hub_mixin_info.model_card_data.to_yaml()}\n---\n\n{model_card(self.config, repo_id)}")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
        **_: Any,
    ) -> str:
        """Save the prior to a temporary folder and upload it to the Hub repo `repo_id` (created if needed); returns
        the commit URL. Offline, or refused by the Hub, it fails in one sentence that says what to do."""
        import tempfile

        from latent_prior.hub import upload

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "prior"
            self.save_pretrained(folder, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})})
            return upload(
                folder,
                repo_id,
                what="prior",
                private=private,
                commit_message=commit_message,
                token=token,
                branch=branch,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        token: str | bool | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> "LatentPrior":
        """Load a prior saved by `save_pretrained`: a local folder (or the --out folder of `latent-prior fit`, whose
        prior/ it reads), or a Hugging Face Hub repo id ("namespace/name"), read from the local Hub cache when it is there.

        revision / subfolder / cache_dir / local_files_only / force_download / token: as in huggingface_hub (a folder
        ignores revision). torch_dtype (or its alias dtype): e.g. torch.float32 / "bf16" (default float32); device:
        default CPU. Offline (HF_HUB_OFFLINE=1, or no connection), an id that is not cached fails at once, in one sentence.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise LatentPriorError(f"from_pretrained: torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; pass one.")
        dtype = torch_dtype if torch_dtype is not None else dtype
        pretrained = pretrained_model_name_or_path
        directory = Path(pretrained)
        if subfolder:
            directory = directory / subfolder
        if not directory.exists() and not Path(pretrained).exists():
            from latent_prior.hub import download, is_repo_id

            # A missing path that is a valid repo id ("name", "namespace/name"; never "./x", "/x", "a/b/c") is a Hub id.
            if is_repo_id(str(pretrained)):
                hub = dict(
                    revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download, token=token
                )
                directory = download(str(pretrained), (CONFIG_FILE, MODEL_FILE), what="prior", subfolder=subfolder, **hub)
        directory = prior_folder(directory)
        if directory.is_file():
            raise LatentPriorError(
                f"prior folder {directory} is a file, not a folder; pass the --out folder of `latent-prior fit` "
                "(it holds config.json and model.safetensors)."
            )
        if not directory.is_dir():
            raise LatentPriorError(f"prior folder {directory} does not exist; pass the --out folder of `latent-prior fit`.")
        missing = [name for name in (CONFIG_FILE, MODEL_FILE) if not (directory / name).is_file()]
        if missing:
            raise LatentPriorError(
                f"prior folder {directory} lacks {', '.join(missing)}; it is not a complete exported prior "
                "(re-run `latent-prior fit` with --resume to re-export it)."
            )
        try:
            config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:  # not JSON, not UTF-8, unreadable
            raise LatentPriorError(f"{directory / CONFIG_FILE} is not valid JSON ({exc}); re-export the prior.") from None
        validate_prior_config(config, directory / CONFIG_FILE)
        _check_weight_count(config, _weights_header(directory / MODEL_FILE), directory)
        prior = cls._from_valid_config(config, directory / CONFIG_FILE)
        try:
            state = load_file(str(directory / MODEL_FILE))
        except (SafetensorError, OSError) as exc:
            raise LatentPriorError(f"{directory / MODEL_FILE} could not be read ({exc}); re-export the prior.") from None
        try:
            result = prior.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # size mismatches
            detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
            raise LatentPriorError(f"{directory / MODEL_FILE} does not match {CONFIG_FILE} ({detail}); re-export the prior.") from None
        if result.missing_keys or result.unexpected_keys:
            raise LatentPriorError(
                f"{directory / MODEL_FILE} does not match {CONFIG_FILE} (missing: {result.missing_keys[:5]}, "
                f"unexpected: {result.unexpected_keys[:5]}); re-export the prior."
            )
        prior.eval()
        return prior.to(device=device or "cpu", dtype=parse_dtype(dtype) if dtype is not None else torch.float32)

    def extra_repr(self) -> str:
        return f"latent_shape={self.latent_shape}, log_z={self.log_z:.4f}"


def _figure(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "not recorded"


def model_card(config: dict[str, Any], repo_id: str | None = None) -> str:
    """The text of a prior folder's README.md (Hub model card, below its metadata): what it is, its source VAE, the data
    and the held-out figures."""
    from latent_prior import __version__

    provenance = config.get("provenance") or {}
    training = config.get("training") or {}
    summary = training.get("summary") or {}
    shape = "×".join(str(s) for s in config.get("latent_shape", []))
    source = provenance.get("source") or "unknown (the prior was fitted on latents that recorded no VAE)"
    name = repo_id or "PATH_OR_REPO_ID"
    ess = summary.get("log_z_ess_fraction")
    lines = [
        f"# A latent prior for {source}",
        "",
        f"An EVaLP prior (energy-based variational latent prior, [latent-prior](https://pypi.org/project/latent-prior/) "
        f"{config.get('latent_prior_version', __version__)}) over {shape} latents: p(z) ∝ N(z; 0, I)·exp(−E(z)), with a "
        "one-pass sampler network. `prior.sample(n)` replaces `torch.randn` when sampling the VAE.",
        "",
        "```python",
        "from latent_prior import LatentPrior",
        "",
        f'prior = LatentPrior.from_pretrained("{name}")',
        "z = prior.sample(16)                 # raw latents, as the VAE's encoder emits them",
        "images = vae.decode(z).sample        # the VAE below",
        "```",
        "",
        "## Source VAE",
        "",
        f"- source: `{source}`"
        + (f" (revision {provenance['revision']})" if provenance.get("revision") else "")
        + (f", subfolder `{provenance['subfolder']}`" if provenance.get("subfolder") else ""),
        f"- class: {provenance.get('class_name', 'unknown')}; weights fingerprint `{provenance.get('fingerprint', 'unknown')}` "
        "(the prior refuses a VAE with other weights unless told to allow it)",
        "",
        "## Data and fit",
        "",
        f"- latents: {training.get('latents', 'not recorded')}",
        f"- {summary.get('num_train', '?')} training latents, {summary.get('num_validation', '?')} held out; "
        f"{summary.get('steps', '?')} steps in {_figure(summary.get('seconds'), '.0f')} s, selected step "
        f"{summary.get('selected_step', '?')}",
        "",
        "## Held-out figures",
        "",
        f"- ELBO gain over N(0, I): {_figure(summary.get('heldout_gain_nats'), '+.3f')} nats per latent "
        "(an importance-sampling estimate of log Z: optimistic)",
        f"- latent Fréchet distance of the sampler to held-out posterior draws: {_figure(summary.get('heldout_fd'), '.4f')}; "
        f"k-NN precision {_figure(summary.get('heldout_precision'), '.3f')}",
        f"- log Z: {_figure(config.get('log_z'), '.4f')} nats (ESS "
        f"{_figure(100 * ess if isinstance(ess, (int, float)) else None, '.1f')} % of the proposals)",
        "",
    ]
    return "\n".join(lines)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    return str(obj)


def prior_folder(path: Path) -> Path:
    """The folder that holds a prior: `path` itself, or for a fit's --out folder (prior/ and train/), its prior/."""
    if path.is_dir() and not (path / CONFIG_FILE).exists() and (path / PRIOR_DIR / CONFIG_FILE).is_file():
        return path / PRIOR_DIR
    return path
