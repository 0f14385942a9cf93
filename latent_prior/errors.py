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
