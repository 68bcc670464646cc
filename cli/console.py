"""What a CLI run prints on the terminal around its log lines (used by cli/commands.py).

    from cli.console import tidy_console
    tidy_console(tracebacks=False)   # before a flow runs; idempotent

Two things, both for the terminal's handlers only (the records themselves are untouched, so the
Prefect run's log on its server, the UI and `nanorun -v` keep everything):
- a failed step or flow run is logged by Prefect with its ~20-line traceback before the CLI's own
  one-line reason; on the terminal the record is printed without it unless -v;
- a line logged while a progress bar is drawn clears the bar, prints, and redraws it below, so the
  bar keeps a line of its own instead of INFO lines being written into it.
"""
from __future__ import annotations

import logging
import sys

def console_handlers() -> list[logging.Handler]:
    """The handlers that write to the terminal: stream handlers on stderr/stdout of every logger."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class _Tracebacks(logging.Formatter):
    """Formats a record as `inner` does, without its traceback unless `keep` (the record keeps it
    for the other handlers: the run's log on the Prefect server)."""

    def __init__(self, inner: logging.Formatter | None, keep: bool):
        super().__init__()
        self.inner, self.keep = inner or logging.Formatter(), keep

    def format(self, record: logging.LogRecord) -> str:
        if self.keep:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _around_bars(emit):
    def emit_around_bars(record: logging.LogRecord) -> None:
        tqdm = sys.modules.get("tqdm")
        if tqdm is None or not getattr(tqdm.tqdm, "_instances", None):
            return emit(record)
        with tqdm.tqdm.external_write_mode(file=sys.stderr):  # clear the bars, print, redraw them
            emit(record)
    return emit_around_bars


def tidy_console(tracebacks: bool) -> None:
    """Apply the two rules above to every terminal handler there is now (Prefect's included: call it
    after Prefect configured its logging, i.e. once a flow is imported)."""
    for handler in console_handlers():
        if isinstance(handler.formatter, _Tracebacks):
            handler.formatter.keep = tracebacks
            continue
        handler.setFormatter(_Tracebacks(handler.formatter, tracebacks))
        handler.emit = _around_bars(handler.emit)
