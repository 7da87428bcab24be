"""Where the commands write: checked against their inputs, created late, written atomically.

Every command that writes files (``infer``, ``evaluate``, ``evaluate_landmarks``,
``export``, ``main``, ``distill``, ``bench --suite --out``) goes through
these pieces, so that:

* **inputs are never overwritten** (:func:`check_not_input`): an output that
  is an input (the same file or folder, compared as resolved real paths, so
  through symbolic links, and as the same inode for hard links), or lies
  inside an input folder that the command (or a later run) reads, is refused
  with one line, unless the user asked for it (``infer --overwrite``);
* **nothing is created before everything is checked**: :func:`check_output`
  and :func:`check_output_file` only find out whether the output can be
  written (a trial folder and file are made and removed again); the folder
  itself is created right before its first file (:func:`ensure_parent`);
* **a file appears whole or not at all**: :func:`atomic_write` writes under a
  temporary name (``.XXXXXXXX.tmp``) in the target's folder, then renames it
  over the target (``os.replace``); :func:`save_image`, :func:`write_bytes`,
  :func:`write_text` and :func:`write_json` are built on it.  A hard or
  symbolic link at the target is replaced by the new file; what it pointed
  to is left as it was;
* **a failed run leaves the place as it found it**: :func:`run_folder` makes a
  run folder (a training workdir) and removes it again when the run fails
  before its real work began, if it did not exist before.

``infer``'s file plan (:func:`plan_outputs`, :func:`output_format`) and its
summary (:func:`report`) live here too.  Errors are :class:`UserError` s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from progsr_jax import data
from progsr_jax.errors import UserError

#: The image formats an output file name may ask for, by extension (lower case).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP"}
#: Quality of JPEG and (lossy) WebP outputs.
JPEG_QUALITY = 95


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import (os.umask can only be read by setting it)


# ----------------------------------------------------------- inputs are sacred
class Input(NamedTuple):
    """Something a command reads: ``flag`` (``"--input"``) and ``path``.

    ``tree``: a folder read with everything under it (outputs may not go
    inside it); False for a file, or for a folder of which only known parts
    are read (a training workdir given as ``--checkpoint``: pass its
    ``checkpoints/`` folder as a second, ``tree=True`` input).
    """

    flag: str
    path: str
    tree: bool = True


def checkpoint_inputs(path: str, flag: str = "--checkpoint") -> list[Input]:
    """A checkpoint as inputs: the folder given (no output may be it) and its ``checkpoints/``
    folder (no output may go inside it; ``WORKDIR/eval`` is fine); a ``checkpoints/`` or
    one step's folder given itself is read whole."""
    inner = os.path.join(path, "checkpoints")
    if os.path.isdir(inner):
        return [Input(flag, path, tree=False), Input(flag, inner)]
    folder = os.path.basename(os.path.normpath(path))
    read_whole = folder == "checkpoints" or os.path.isdir(os.path.join(path, "generator"))
    return [Input(flag, path, tree=read_whole)]


def real(path: str) -> str:
    """``path`` with ``~`` expanded, absolute, every symbolic link resolved."""
    return os.path.realpath(os.path.expanduser(path))


def real_target(path: str) -> str:
    """Where a file written at ``path`` ends up: its folder resolved, its own name kept
    (a rename replaces a link at the last component instead of following it)."""
    path = os.path.abspath(os.path.expanduser(path))
    return os.path.join(real(os.path.dirname(path)), os.path.basename(path))


def is_inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies under it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(output: str, inputs: Sequence[Input], *, flag: str = "--output",
                    is_file: bool = False, overwrite: bool = False,
                    overwrite_flag: str | None = None) -> None:
    """Refuses an ``output`` (a folder, or with ``is_file`` a file) that is one of ``inputs``
    or lies inside an input folder; allowed when ``overwrite``.

    ``overwrite_flag`` (e.g. ``"--overwrite"``) is named in the message when
    the command has one.
    """
    if overwrite:
        return
    out = real_target(output) if is_file else real(output)
    hint = (f" (or add {overwrite_flag} to replace the inputs)" if overwrite_flag else "")
    for item in inputs:
        if not item.path:
            continue
        src = real(item.path)
        if out == src or (os.path.exists(out) and _same_file(out, src)):
            raise UserError(f"{flag}={output} is the {item.flag} ({src}): a command never "
                            f"writes over its inputs; choose another {flag}{hint}")
        if item.tree and os.path.isdir(src) and is_inside(out, src):
            raise UserError(f"{flag}={output} is inside {item.flag}={src}: the outputs would "
                            f"mix with the inputs (and be read back by a later run); choose "
                            f"a {flag} outside it{hint}")


# ------------------------------------------------------ check first, then create
def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _try_create(folder: str, what: str, probe: str | None = None, keep: bool = False) -> None:
    """Makes the missing part of ``folder`` and a file in it (``probe``, default a test
    name), then removes them again (the folders stay with ``keep``).

    Safe when several processes do it at once (the processes of a multi-host run
    checking their shared workdir): a folder another process made meanwhile is
    used, not an error; with ``keep`` none is removed under another's feet."""
    top = _nearest_existing(folder)
    if not os.path.isdir(top):
        raise UserError(f"cannot write to {what}: {top} is a file, not a folder")
    made = []
    try:
        head = folder
        missing = []
        while not os.path.lexists(head):
            missing.append(head)
            head = os.path.dirname(head)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise
                continue
            made.append(d)
        probe = probe or os.path.join(folder, f".progsr_write_test_{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        keep = False  # a failed check leaves nothing it made
        raise UserError(f"cannot write to {what}: {e.strerror or e}") from None
    finally:
        for d in reversed(made if not keep else []):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def check_output(path: str | None, flag: str = "--output") -> str:
    """The absolute output folder ``path``, checked to be creatable and writable (nothing
    is left created); UserError otherwise.  Create it with :func:`ensure_dir` when the
    first file is written."""
    if not path:
        raise UserError(f"{flag}=DIR is required")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise UserError(f"{flag}={path} is a file, not a folder")
    _try_create(path, f"{flag}={path}")
    return path


def check_output_file(path: str, flag: str = "--output") -> str:
    """The absolute output file ``path``, its folder checked as :func:`check_output` does
    (with the file's own name when it does not exist yet: a name too long fails here)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise UserError(f"{flag}={path} is a folder; give a file name")
    _try_create(os.path.dirname(path), f"{flag}={path}",
                None if os.path.lexists(path) else path)
    return path


def ensure_dir(folder: str) -> None:
    """Creates ``folder`` (and its parents); UserError ``cannot create``."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {folder}: {e.strerror or e}") from None


def ensure_parent(path: str) -> None:
    """Creates the folder a file ``path`` goes into."""
    ensure_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears at ``path`` only when
    the block finished (a temporary name in the same folder, then ``os.replace``); its
    folder is created first.  An OSError is a UserError naming ``path``."""
    ensure_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(
            os.path.abspath(path)))
        text = {} if "b" in mode else {"encoding": "utf-8", "newline": ""}
        with open(fd, mode, **text) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a new file's usual mode
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)


def write_bytes(path: str, payload: bytes) -> None:
    with atomic_write(path) as f:
        f.write(payload)


def write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_json(path: str, obj, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def output_format(path: str, flag: str = "--output") -> str:
    """The PIL format an output file name asks for (:data:`IMAGE_FORMATS`); UserError for
    another extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        known = ", ".join(sorted(IMAGE_FORMATS))
        raise UserError(f"{flag}={path}: {'the extension ' + repr(ext) if ext else 'no extension'}"
                        f" is not an image format this command writes ({known}); name the file "
                        "with one of them, or end --output with / for a folder")
    return IMAGE_FORMATS[ext]


def save_image(image, path: str, fmt: str | None = None) -> None:
    """A PIL image or uint8 array saved atomically in ``fmt`` (default: by the extension,
    :func:`output_format`; JPEG and WebP at quality :data:`JPEG_QUALITY`)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    fmt = fmt or output_format(path)
    options = {"quality": JPEG_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    with atomic_write(path) as f:
        image.save(f, format=fmt, **options)


class RunFolder:
    """A run folder made by :func:`run_folder`; :meth:`keep` once the real work begins."""

    def __init__(self, path: str, created: bool):
        self.path, self.created, self.kept = path, created, False

    def keep(self) -> None:
        self.kept = True


@contextlib.contextmanager
def run_folder(path: str | None, flag: str = "--workdir") -> Iterator[RunFolder]:
    """Creates the folder ``path`` (checked first: not a file, writable) for a run.

    When the block fails before :meth:`RunFolder.keep` was called and the
    folder did not exist before, it is removed again with whatever the run
    put there, so a run stopped by a bad setting leaves nothing behind.
    """
    if not path:
        raise UserError(f"{flag}=DIR is required")
    folder = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise UserError(f"{flag}={folder} is a file, not a folder")
    handle = RunFolder(folder, created=not os.path.lexists(folder))
    _try_create(folder, f"{flag}={folder}", keep=True)
    try:
        yield handle
    except BaseException:
        if handle.created and not handle.kept:
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ------------------------------------------------------------ infer's file plan
def input_and_output(input_path: str | None, output: str | None,
                     output_kind: str = "FILE_OR_DIR",
                     input_kind: str = "FILE_OR_DIR") -> tuple[str, str]:
    """``--input`` and ``--output`` as absolute paths (``~`` expanded); UserError naming the
    expected kind if either is missing."""
    if not input_path:
        raise UserError(f"--input={input_kind} is required")
    if not output:
        raise UserError(f"--output={output_kind} is required")
    return (os.path.abspath(os.path.expanduser(input_path)),
            os.path.abspath(os.path.expanduser(output)))


def plan_outputs(input_path: str | None, output: str | None, *, overwrite: bool = False,
                 inputs: Sequence[Input] = (), ext: str = ".png") -> list[tuple[str, str]]:
    """``[(input file, output file)]`` for a file or folder ``--input``; UserError if none.

    A folder gives a folder: the same relative names with ``ext`` (``a/b.jpg`` ->
    ``OUT/a/b.png``; a name used twice gets the input's extension kept:
    ``b.jpg.png``).  A file gives the ``--output`` file (in the format its
    extension names, :func:`output_format`), or ``OUT/<stem>.png`` when
    ``--output`` is an existing folder or ends with a slash.

    Outputs are checked against the input and ``inputs`` (the model):
    :func:`check_not_input`, refused unless ``overwrite``; even then no
    output lands on another input file than its own.
    """
    src, dst = input_and_output(input_path, output)
    given = [Input("--input", src, tree=os.path.isdir(src)), *inputs]
    rules = dict(overwrite=overwrite, overwrite_flag="--overwrite")
    if os.path.isfile(src):
        if os.path.isdir(dst) or output.endswith(("/", os.sep)):
            check_not_input(dst, inputs, **rules)
            dst = os.path.join(dst, os.path.splitext(os.path.basename(src))[0] + ext)
        else:
            output_format(dst)
        check_not_input(dst, given, is_file=True, **rules)
        return [(src, dst)]
    if not os.path.isdir(src):
        raise UserError(f"--input does not exist: {src}")
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise UserError(f"--input is a folder, so --output must be a folder, but {dst} is a file")
    if not os.path.isdir(dst) and os.path.splitext(dst)[1].lower() in IMAGE_FORMATS:
        raise UserError(f"--input is a folder, so --output must be a folder, but {dst} is named "
                        "like an image file (end it with / if you mean a folder of that name)")
    check_not_input(dst, given, **rules)
    files = data.list_files("folder", src, "all")
    in_place = real(dst) == real(src)
    # An output never takes the name of another input (in place, with --overwrite).
    taken = {os.path.relpath(f, src).lower() for f in files} if in_place else set()
    plan, used = [], set()
    for f in files:
        rel = os.path.relpath(f, src)

        def blocked(name: str, own: str = rel.lower()) -> bool:
            return name in used or (name in taken and name != own)

        target = os.path.splitext(rel)[0] + ext
        if blocked(target.lower()):
            target = rel + ext
            k = 1
            while blocked(target.lower()):
                target = f"{rel}.{k}{ext}"
                k += 1
        used.add(target.lower())
        plan.append((f, os.path.join(dst, target)))
    if not overwrite and is_inside(real(src), real(dst)):
        src_real = real(src)
        for _, target in plan:  # --output holds --input: no output may land inside it
            if is_inside(real_target(target), src_real):
                raise UserError(f"--output={dst} would write {target} inside --input={src}; "
                                "choose a --output outside it (or add --overwrite)")
    return plan


def report(written: list[str], skipped: list[tuple[str, str]], summary: str, log) -> None:
    """Logs the skipped files and the summary line; a UserError when nothing was written."""
    for path, reason in skipped:
        log(f"skipped {path}: {reason}")
    if skipped:
        summary += f"; skipped {len(skipped)}: " + ", ".join(
            os.path.basename(p) for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
    if not written:
        raise UserError(f"nothing could be processed: {summary}"
                        + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    log(summary)
