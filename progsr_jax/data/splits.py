"""Which files make a split: CelebA (official or Kaggle layout) or any folder of images."""

from __future__ import annotations

import csv
import os
from typing import Any, Sequence

from progsr_jax.errors import UserError

#: Files with these extensions (case-insensitive) are images for source="folder".
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")

# CelebA partition ids per split name.
_CELEBA_SPLITS = {
    "train": (0,),
    "val": (1,),
    "valid": (1,),
    "validation": (1,),
    "test": (2,),
    "all": (0, 1, 2),
}
_FOLDER_SPLITS = ("all", "train", "test")

# Where the two known CelebA layouts keep their images and partition file,
# relative to the data root (first existing candidate wins).
_CELEBA_IMAGE_DIRS = (
    os.path.join("Img", "img_align_celeba"),               # official (Google Drive)
    os.path.join("img_align_celeba", "img_align_celeba"),  # Kaggle
    "img_align_celeba",                                     # Kaggle, flattened
)
_CELEBA_PARTITION_FILES = (
    os.path.join("Eval", "list_eval_partition.txt"),  # official
    "list_eval_partition.csv",                         # Kaggle
    "list_eval_partition.txt",
    os.path.join("Eval", "list_eval_partition.csv"),
)


def _first_existing(root: str, candidates: Sequence[str], want_dir: bool) -> str | None:
    for rel in candidates:
        p = os.path.join(root, rel)
        if (os.path.isdir(p) if want_dir else os.path.isfile(p)):
            return p
    return None


def _check_root(root: str | os.PathLike | None, what: str) -> str:
    if root is None or str(root) == "":
        raise UserError(f"{what}: no data root given (set --config.root=/path/to/data)")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.exists(root):
        raise UserError(f"{what}: data root does not exist: {root}")
    if not os.path.isdir(root):
        raise UserError(f"{what}: data root is not a folder: {root}")
    return root


def _read_partition(path: str) -> list[tuple[str, int]]:
    """Reads CelebA's partition file: ``<file> <0|1|2>`` lines or Kaggle's CSV."""
    entries: list[tuple[str, int]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                rows = [(i + 1, row) for i, row in enumerate(csv.reader(f))]
                if rows and rows[0][1] and not rows[0][1][-1].strip().lstrip("-").isdigit():
                    rows = rows[1:]  # header "image_id,partition"
            else:
                rows = [(i + 1, line.split()) for i, line in enumerate(f)]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read CelebA partition file {path}: {e}") from None
    for lineno, fields in rows:
        fields = [x.strip() for x in fields if x.strip()]
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise UserError(f"{path}:{lineno}: expected '<file> <0|1|2>', got {' '.join(fields)!r}")
        entries.append((fields[0], int(fields[1])))
    return entries


def _scan_celeba(root: str, split: str) -> list[tuple[str, bool]]:
    """CelebA files of a split in partition-file order, each with "exists on disk"."""
    if split not in _CELEBA_SPLITS:
        raise UserError(f"unknown CelebA split {split!r}; expected one of "
                        f"{', '.join(_CELEBA_SPLITS)}")
    image_dir = _first_existing(root, _CELEBA_IMAGE_DIRS, want_dir=True)
    partition = _first_existing(root, _CELEBA_PARTITION_FILES, want_dir=False)
    if image_dir is None:
        raise UserError(
            f"no CelebA image folder under {root}: expected Img/img_align_celeba/ (official "
            "layout) or img_align_celeba/img_align_celeba/ (Kaggle layout); for a plain "
            "folder of images use source='folder'")
    if partition is None:
        raise UserError(
            f"CelebA partition file not found under {root}: expected "
            "Eval/list_eval_partition.txt (official layout) or list_eval_partition.csv "
            "(Kaggle layout); for a plain folder of images use source='folder'")
    wanted = _CELEBA_SPLITS[split]
    names = [name for name, part in _read_partition(partition) if part in wanted]
    if not names:
        raise UserError(f"CelebA split {split!r} is empty: {partition} lists no file "
                        f"with partition {'/'.join(map(str, wanted))}")
    on_disk = set(os.listdir(image_dir))
    entries = [(os.path.join(image_dir, n), n in on_disk) for n in names]
    if not any(exists for _, exists in entries):
        raise UserError(f"none of the {len(names)} files of CelebA split {split!r} listed in "
                        f"{partition} exist in {image_dir} (e.g. {names[0]})")
    return entries


def _scan_folder(root: str, split: str) -> list[str]:
    """Every image file under ``root`` (recursively), sorted by relative path.

    Hidden files and folders (names starting with ".") are ignored, e.g.
    macOS "._x.jpg" resource forks.  Symlinked folders are followed once.
    """
    if split not in _FOLDER_SPLITS:
        raise UserError(f"source='folder' has no partitions: split must be 'all' "
                        f"(or 'train'/'test', which also mean all files), got {split!r}")
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    found.sort(key=lambda p: os.path.relpath(p, root))
    if not found:
        raise UserError(f"no image files under {root} (looked for "
                        f"{' '.join(IMAGE_EXTENSIONS)}, case-insensitive, recursively)")
    return found


def scan_split(source: str, root: Any, split: str) -> list[tuple[str, bool]]:
    """The files of a split in dataset order, each with "exists on disk"."""
    if source == "celeba":
        return _scan_celeba(_check_root(root, "source='celeba'"), split)
    if source == "folder":
        return [(p, True) for p in _scan_folder(_check_root(root, "source='folder'"), split)]
    raise UserError(f"list_files: unknown source {source!r}; expected 'celeba' or 'folder'")


def list_files(source: str, root: str | os.PathLike, split: str) -> list[str]:
    """Absolute paths of the image files of a split, in dataset order.

    ``source="celeba"``: the official layout (``root/Img/img_align_celeba/*.jpg``
    with ``root/Eval/list_eval_partition.txt``) or Kaggle's
    (``root/img_align_celeba/img_align_celeba/*.jpg`` with
    ``root/list_eval_partition.csv``); ``split`` is one of train, val
    (valid/validation), test or all; order is the partition file's.  Files
    listed in the partition file but absent on disk are left out here (and
    reported as skipped by :func:`build_dataset`); it is an error only when
    all of them are absent.

    ``source="folder"``: every image file under ``root`` recursively, sorted.
    A folder has no partitions, so ``split`` must be "all"; "train" and
    "test" are accepted and also mean all files.

    Raises:
      UserError: missing root, missing partition file, empty split, no images.
    """
    return [p for p, exists in scan_split(source, root, split) if exists]
