"""User-facing errors and the command-line wrapper that prints them as one line.

Every command (``main``, ``evaluate``, ``infer``, ``bench``, the tools) raises
:class:`UserError` for mistakes a user can fix (bad paths, bad config values,
wrong checkpoints).  :func:`run_cli` turns it into ``error: <message>`` on
stderr and a non-zero exit status, without a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix; printed as one line without a traceback."""


def _oom_hint(exc: BaseException) -> str | None:
    text = str(exc)
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return ("out of device memory: lower --config.batch_size (or --batch_size), "
                "or use --config.model.dtype=bfloat16 / a smaller --config.model.width")
    return None


def run_cli(fn: Callable[[], int | None]) -> None:
    """Runs ``fn`` and exits; user errors become a one-line message, exit status 2."""
    try:
        code = fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - only to add a hint for OOM, then re-raise
        hint = _oom_hint(e)
        if hint:
            print(f"error: {hint}", file=sys.stderr)
            sys.exit(3)
        raise
    sys.exit(int(code or 0))
