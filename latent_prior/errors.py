"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single sentence on stderr and a non-zero exit code, with no traceback.
Its message must name the file or argument at fault and say what to do about it.
"""


class LatentPriorError(Exception):
    """Bad input, stated in one sentence that names the culprit and the remedy."""
