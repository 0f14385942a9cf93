"""The exceptions that the CLI turns into a single sentence on stderr, with no traceback.

`LatentPriorError` means "the user gave us something we cannot use" (exit code 2, as argparse's usage
errors); `RunFailed`, a subclass, means the input was fine but the run did not succeed, e.g. a training that
diverged (exit code 1). The message names the file or argument at fault and says what to do about it.
"""


class LatentPriorError(Exception):
    """Bad input, stated in one sentence that names the culprit and the remedy."""


class RunFailed(LatentPriorError):
    """A run that failed on good input (a divergence), stated in one sentence with the remedy."""


def read_json_object(path, what: str, remedy: str) -> dict:
    """The JSON object in `path`; a LatentPriorError naming the file, `what` it should be, and the `remedy`
    when it is unreadable, not JSON, or not an object. (Our folders keep their metadata as JSON objects.)"""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LatentPriorError(f"{path}: cannot read the {what} ({exc}); {remedy}.") from None
    if not isinstance(data, dict):
        raise LatentPriorError(f"{path}: the {what} is not a JSON object; {remedy}.")
    return data


def checked_kind(
    kind: str, kinds: tuple[str, ...], shape: tuple[int, ...], *, what: str, flat: str, spatial: str, supported_by: str
) -> str:
    """A network's `kind`, refused unless one of `kinds` (which hold "auto"); "auto" becomes `flat` for flat (D,) latents
    and `spatial` for (C, H, W) ones, and is refused for other shapes, naming `flat` as the kind that flattens them.
    `what` names the network in the messages ("energy"), `supported_by` the subject of "... support(s) flat"."""
    if kind not in kinds:
        raise LatentPriorError(f"{what} kind={kind!r} is unknown; choose one of {', '.join(kinds)}.")
    if kind != "auto":
        return kind
    if len(shape) not in (1, 3):
        raise LatentPriorError(
            f"latent_shape={shape} has {len(shape)} dimensions; {supported_by} flat (D,) or spatial (C, H, W) "
            f"latents (pass kind={flat!r} to flatten other shapes)."
        )
    return flat if len(shape) == 1 else spatial
