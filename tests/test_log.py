"""latent_prior.log: the package's messages reach the console and a run's log file, and nothing else is captured."""

import logging
import sys
import warnings

from latent_prior.log import log_file, log_result, logger, to_file_only


def test_log_file_holds_the_package_messages_and_warnings_and_swaps_no_stream(tmp_path, capsys):
    path = tmp_path / "log.txt"
    out, err = sys.stdout, sys.stderr
    handlers = list(logger.handlers)
    with log_file(path) as handler:
        assert sys.stdout is out and sys.stderr is err  # a notebook's streams are never replaced
        logger.info("latent-prior fit: [1/4] encode")
        logger.warning("latent-prior fit: warning: low ESS")
        log_result("latent-prior fit: done")
        to_file_only(handler, "latent-prior fit: error: only in the file")
        print("printed by the user's own code")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    logger.info("after the block")

    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[:4] == [
        "latent-prior fit: [1/4] encode",
        "latent-prior fit: warning: low ESS",
        "latent-prior fit: done",
        "latent-prior fit: error: only in the file",
    ]
    assert any("a library's warning" in line for line in lines[4:])
    assert not any("printed by the user's own code" in line or "after the block" in line for line in lines)

    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["latent-prior fit: done", "printed by the user's own code"]
    assert "latent-prior fit: [1/4] encode" in captured.err and "low ESS" in captured.err
    assert "after the block" in captured.err
    assert "only in the file" not in captured.err + captured.out
    assert logger.handlers == handlers and not logging.getLogger("py.warnings").handlers


def test_the_level_silences_the_progress_notes_but_keeps_warnings(capsys):
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        logger.info("a progress note")
        logger.warning("a warning")
    finally:
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert "a warning" in err and "a progress note" not in err
