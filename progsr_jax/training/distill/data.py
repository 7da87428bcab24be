"""The distillation's data: dataset images matched to their teacher heatmaps.

Which images are used: the dataset ``data`` (source, root, split) is built as
for super-resolution training and each of its files is matched to a row of
the teacher folder by its path relative to the data root (by the last path
parts, see :meth:`progsr_jax.data.teacher.TeacherHeatmaps.indices_for`).  Files
without a teacher row, and rows the teacher pass could not decode, are
skipped with a message; no match at all is an error.

The held-out images are ``val.teacher_heatmaps`` (teacher heatmaps of another
split, e.g. CelebA ``val``, decoded from ``data.root`` with split
``val.split``) or, without it, ``val.fraction`` of the training images, evenly
spaced in dataset order and excluded from training.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from progsr_jax import data as data_lib
from progsr_jax.data import teacher as teacher_lib
from progsr_jax.data.cache import by_path, opened
from progsr_jax.errors import UserError
from progsr_jax.training import config as config_files
from progsr_jax.training import distributed


@dataclasses.dataclass
class Split:
    """Images of one split matched to their teacher heatmaps.

    ``images[r]`` (r = 64, 128) are the dataset's uint8 arrays (memory-mapped),
    ``ds_rows[i]`` / ``teacher_rows[i]`` the dataset and teacher row of
    example ``i``.
    """

    name: str
    files: list[str]
    images: dict[int, np.ndarray]
    ds_rows: np.ndarray
    teacher_rows: np.ndarray
    teacher: Any  # progsr_jax.data.teacher.TeacherHeatmaps

    def __len__(self) -> int:
        return len(self.ds_rows)

    def subset(self, idx: np.ndarray) -> Split:
        idx = np.asarray(idx, np.int64)
        return dataclasses.replace(self, files=[self.files[i] for i in idx],
                                   ds_rows=self.ds_rows[idx], teacher_rows=self.teacher_rows[idx])

    def inputs(self, idx: np.ndarray, size: int = 64) -> np.ndarray:
        """float32 (len(idx), size, size, 3) in [0, 1], the teacher's input convention."""
        rows = self.ds_rows[np.asarray(idx, np.int64)]
        return data_lib.gather(self.images[size], rows).astype(np.float32) / np.float32(255.0)

    def targets(self, idx: np.ndarray) -> np.ndarray:
        """float32 (len(idx), 64, 64, 68) teacher heatmaps."""
        return self.teacher.get(self.teacher_rows[np.asarray(idx, np.int64)])


def open_teacher(directory: str, what: str):
    if not os.path.isdir(directory):
        raise UserError(f"{what}: no such folder: {directory} (create it with: python "
                        "tools/convert_fan_weights.py teacher-heatmaps ... --output DIR)")
    return teacher_lib.open(directory)


def load_split(config, teacher_dir: str, split: str, name: str, info=print) -> Split:
    """Builds the dataset of ``split`` and matches its files to the rows of ``teacher_dir``."""
    reader = open_teacher(teacher_dir, f"{name} teacher heatmaps")
    data_crop = {"folder": "square", "synthetic": "none"}.get(config.data.source, "celeba")
    teacher_crop = reader.meta.get("crop")
    if teacher_crop and config.data.source != "synthetic" and teacher_crop != data_crop:
        raise UserError(f"{teacher_dir} was computed on {teacher_crop!r} crops but data.source="
                        f"{config.data.source!r} uses {data_crop!r} crops: the images would not "
                        "match their heatmaps")
    ds = distributed.prepare_once(f"{name} data", lambda: data_lib.build_dataset(
        config_files.data_config(config, split), log=info))
    ds_rows, teacher_rows, missing = [], [], []
    for i, path in enumerate(ds.files):
        try:
            row = int(reader.indices_for([path])[0])
        except UserError:
            missing.append(path)
            continue
        if row in reader.bad:
            missing.append(path)
            continue
        ds_rows.append(i)
        teacher_rows.append(row)
    if not ds_rows:
        where = reader.meta.get("data_root", "?")
        raise UserError(f"none of the {len(ds.files)} images of {config.data.source} split "
                        f"{split!r} has a heatmap in {teacher_dir} (it holds {len(reader)} images "
                        f"of split {reader.meta.get('split', '?')!r} of {where}); "
                        "check data.root, data.split and the teacher folder")
    if missing:
        info(f"{name}: {len(missing)} of {len(ds.files)} images have no usable teacher heatmap "
             f"in {teacher_dir} and are skipped (e.g. {os.path.basename(missing[0])})")
    info(f"{name}: {len(ds_rows)} images with teacher heatmaps "
         f"({reader.meta.get('teacher', '?')} teacher, {teacher_dir})")
    return Split(name=name, files=[ds.files[i] for i in ds_rows], images=ds.images,
                 ds_rows=np.asarray(ds_rows, np.int64),
                 teacher_rows=np.asarray(teacher_rows, np.int64), teacher=reader)


def held_out_indices(n: int, fraction: float) -> np.ndarray:
    """``round(fraction * n)`` evenly spaced example indices (at least one if fraction > 0)."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, np.int64)
    k = min(n - 1, max(1, round(fraction * n)))
    return np.unique(np.floor(np.arange(k) * (n / k)).astype(np.int64))


def load_splits(config, info=print, need_train: bool = True) -> tuple[Split | None, Split | None]:
    """(train, validation) splits; validation is None when there is none."""
    train_split = val_split = None
    if need_train or not config.val.teacher_heatmaps:
        train_split = load_split(config, config.teacher_heatmaps, config.data.split, "train", info)
    if config.val.teacher_heatmaps:
        val_split = load_split(config, config.val.teacher_heatmaps, config.val.split, "val", info)
    elif config.val.fraction > 0:
        held = held_out_indices(len(train_split), config.val.fraction)
        if len(held):
            keep = np.setdiff1d(np.arange(len(train_split)), held)
            val_split = dataclasses.replace(train_split.subset(held), name="val")
            train_split = train_split.subset(keep)
            info(f"val: {len(held)} training images held out (val.fraction={config.val.fraction})")
    return train_split, val_split


class BatchLoader:
    """``step -> (images, teacher heatmaps)`` of batch ``step`` (the order of
    :func:`progsr_jax.data.batch_indices`): the element of the distillation's
    :class:`progsr_jax.data.InputPipeline`; ``rows``: only these rows of it
    (this process's, :func:`progsr_jax.data.local_rows`).

    Pickled for a worker process with the 64x64 images' memory map by path
    and the teacher folder by name: the worker opens both, it receives no
    copy of them (nor the file names, which batches do not need).
    """

    def __init__(self, split: Split, batch_size: int, seed: int, rows: slice | None = None):
        self.split = split
        self.batch_size, self.seed, self.rows = int(batch_size), int(seed), rows

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        idx = data_lib.batch_indices(len(self.split), self.batch_size, self.seed,
                                     step)[self.rows or slice(None)]
        return self.split.inputs(idx), self.split.targets(idx)

    def __getstate__(self) -> dict:
        split = dataclasses.replace(self.split, files=[],
                                    images=by_path({64: self.split.images[64]}))
        return dict(self.__dict__, split=split)

    def __setstate__(self, state: dict) -> None:
        split = state["split"]
        self.__dict__.update(state, split=dataclasses.replace(split, images=opened(split.images)))
