"""Reading a list of files in threads.

``evaluate``, ``evaluate_landmarks`` and ``infer`` (every mode) read a list
of image files, decode them in threads (:func:`iter_loaded`, batched by
:func:`loaded_batches`) and skip the unreadable ones with a reason; where
they write is :mod:`progsr_jax.data.writing`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from typing import Any, Callable, Iterator, Sequence

from progsr_jax import progress as progress_lib
from progsr_jax.data.images import BadImage


def iter_loaded(files: Sequence[str], load: Callable[[str], Any], workers: int = 2,
                window: int = 64) -> Iterator[tuple[str, Any, str | None]]:
    """Yields ``(path, value, None)`` or ``(path, None, reason)`` in file order.

    Decoding runs in ``workers`` threads, at most ``window`` files ahead.
    ``BadImage`` (and ValueError/OSError from the landmark files) become
    a skip reason; anything else propagates.
    """
    def guarded(path):
        try:
            return load(path), None
        except (BadImage, ValueError, OSError) as e:
            return None, str(e) or type(e).__name__

    if workers <= 1:
        for p in files:
            yield (p,) + guarded(p)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        it = iter(files)
        pending = collections.deque((p, ex.submit(guarded, p))
                                    for p in itertools.islice(it, window))
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(guarded, nxt)))
            yield (p,) + fut.result()


def loaded_batches(files: Sequence[str], load: Callable[[str], Any], batch_size: int,
                   skipped: list[tuple[str, str]], workers: int = 2, desc: str = "",
                   progress: bool = True) -> Iterator[list[tuple[str, Any]]]:
    """Yields lists of up to ``batch_size`` ``(path, value)`` in file order, with a progress bar.

    Files :func:`iter_loaded` cannot use are appended to ``skipped`` as
    ``(path, reason)``; only the last batch is smaller.
    """
    batch: list[tuple[str, Any]] = []
    with progress_lib.bar(len(files), desc, "img", disable=not progress) as bar:
        for path, value, reason in iter_loaded(files, load, workers):
            bar.update(1)
            if reason is not None:
                skipped.append((path, reason))
                continue
            batch.append((path, value))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
