"""Turn engine exceptions into short messages the user can act on.

Bad input and model problems are ValueErrors (ModelNotFoundError, ModelLoadError) whose text is
already written for users; anything else is a bug, logged in full and shown in one line.
"""
from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("easel.ui")
MAX_MESSAGE = 400


def short_message(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    first_line = text.strip().splitlines()[0] if text.strip() else text
    return first_line if len(first_line) <= MAX_MESSAGE else first_line[:MAX_MESSAGE - 1] + "…"


def user_error(exc: BaseException) -> gr.Error:
    if isinstance(exc, gr.Error):
        return exc
    message = short_message(exc)
    if isinstance(exc, ValueError):
        log.info("refused: %s", message)
    else:
        log.error("generation failed", exc_info=exc)
    return gr.Error(message, print_exception=False)
