"""lorakit's console lines: one handler on the "lorakit" logger, `lorakit:` on stdout (`lorakit
demo:` for the demo's modules), silenced by the level, redirected by another handler."""

from __future__ import annotations

import io
import logging

import pytest

from lorakit import log


@pytest.fixture
def fresh_logger():
    logger = logging.getLogger(log.ROOT)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    log.configure()
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_lines_go_to_the_current_stdout_with_their_prefix(fresh_logger, capsys):
    log.get_logger("lorakit.training.loop").info("step=1 loss=2")
    log.get_logger("lorakit.demo.run").info("base model exact match: 3%")
    log.get_logger("lorakit.demonstration").info("not the demo package")
    assert capsys.readouterr().out.splitlines() == [
        "lorakit: step=1 loss=2",
        "lorakit demo: base model exact match: 3%",
        "lorakit: not the demo package",
    ]


def test_a_user_silences_or_redirects_them(fresh_logger, capsys):
    fresh_logger.setLevel(logging.WARNING)
    log.get_logger("lorakit.recipes.sft").info("resolved config")
    assert capsys.readouterr().out == ""
    sink = io.StringIO()
    log.configure(handler=logging.StreamHandler(sink))
    log.get_logger("lorakit.cli").info("finished step 2")
    assert sink.getvalue() == "lorakit: finished step 2\n" and capsys.readouterr().out == ""
