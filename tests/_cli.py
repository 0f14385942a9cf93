"""Command lines for the tests, written as they would be typed.

`argv("eval --prior", prior_dir, "--samples 100 --quiet")` is `["eval", "--prior", str(prior_dir), "--samples", "100",
"--quiet"]`: a str part is split on white space (flags and plain values), a list or tuple part is taken word for word
(a command line built before), any other part (a Path, a number) is one word. Pass paths as Path objects, so that a
path with a space in it stays one word.
"""

from __future__ import annotations


def argv(*parts: object) -> list[str]:
    words: list[str] = []
    for part in parts:
        if isinstance(part, str):
            words += part.split()
        elif isinstance(part, (list, tuple)):
            words += [str(word) for word in part]
        else:
            words.append(str(part))
    return words
