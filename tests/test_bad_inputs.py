"""Bad inputs, tried as a demanding new user would: every command fails with one line.

A table of cases, each a command run as a subprocess (``python -m
progsr_jax.<command>``, with a timeout) on bad inputs made in its own folder.
For every case: exit status 2, exactly one line on stderr starting with
``error:`` (and matching the case's pattern), no ``Traceback`` or crash
report, and the case's folder exactly as it was (every file byte-identical,
nothing added or removed: no input changed, no output or empty output
folder left behind).  The shared checkpoint and exported model are hashed
before and after all cases too.

The cases run in a thread pool (:func:`results`, once per module) and are
reported one by one.  Issue 29 lists where each class came from: truncated
and fake images, decompression bombs, unwritable and colliding outputs,
corrupt checkpoints and exported models, bad flags and config overrides,
``--multihost`` coordinator problems.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from progsr_jax import export, infer
from progsr_jax.data import writing
from progsr_jax.errors import UserError
from progsr_jax.inference import serialized
from progsr_jax.photo import mtcnn

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
TIMEOUT = 120  # seconds per case: none should take more than ~15 s
WORKERS = 3
WAIT = 2  # --coordinator_timeout of the multihost cases
HAS_PROC = os.path.isdir("/proc/self")


# ------------------------------------------------------------------ inputs made here
def png(path: pathlib.Path, size=(16, 16), seed=0, mode="RGB") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).convert(mode).save(path)
    return path


def lowres_folder(d: pathlib.Path, name: str = "in") -> pathlib.Path:
    for k in range(3):
        png(d / name / f"f{k}.png", seed=k)
    return d / name


def truncated(path: pathlib.Path) -> pathlib.Path:
    png(path, (64, 64))
    path.write_bytes(path.read_bytes()[:200])
    return path


def bomb_png(path: pathlib.Path, w: int = 100_000, h: int = 100_000) -> pathlib.Path:
    """A PNG whose header claims ``w`` x ``h`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def cut(path: pathlib.Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def edit_json(path: pathlib.Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def earlier_run(wd: pathlib.Path, width: float = 0.0625) -> None:
    """The files of an earlier smoke run's workdir (its architecture, so that a resume
    is allowed to go on to its data)."""
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"model": {"width": width, "d_width": None},
                                                "seed": 7}))
    (wd / "log.txt").write_text("[00:00:00] an earlier run\n")
    (wd / "metrics.jsonl").write_text('{"step": 12, "g": 1.0}\n')


def step_dir(ckpt: pathlib.Path) -> pathlib.Path:
    return next((ckpt / "checkpoints").iterdir())


# ------------------------------------------------------------------------ the table
@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    command: str  # progsr_jax.<command>
    args: tuple[str, ...]  # formatted with d (the case folder) and the assets' names
    expect: str  # a substring of the error line
    setup: Callable | None = None  # setup(d, assets)
    needs: str | None = None  # "onnx", "proc", "mtcnn" (its weights): skipped without it


def C(id, command, args, expect, setup=None, needs=None):  # noqa: N802 - a table row
    return Case(id, command, tuple(args.split()), expect, setup, needs)


LOW = "--mode=lowres --noprogress"
SMOKE = "--config=configs/step3.py:smoke"
DSMOKE = "--config=configs/distill_fan.py:smoke"
MH = "--multihost --num_processes=2"

CASES = [
    # --- infer: outputs that are (or would overwrite, or mix with) inputs
    C("infer_same_folder", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/in {LOW}", "is the --input", lambda d, a: lowres_folder(d)),
    C("infer_same_file", "infer", f"--checkpoint={{ckpt}} --input={{d}}/face.png "
      f"--output={{d}}/face.png {LOW}", "is the --input", lambda d, a: png(d / "face.png")),
    C("infer_output_inside_input", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/in/sr {LOW}", "is inside --input", lambda d, a: lowres_folder(d)),
    C("infer_output_symlink_to_input", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/link {LOW}", "is the --input",
      lambda d, a: (lowres_folder(d), (d / "link").symlink_to(d / "in"))),
    C("infer_input_symlink_to_output", "infer", f"--checkpoint={{ckpt}} --input={{d}}/link "
      f"--output={{d}}/in {LOW}", "is the --input",
      lambda d, a: (lowres_folder(d), (d / "link").symlink_to(d / "in"))),
    C("infer_output_file_symlink_to_input", "infer", f"--checkpoint={{ckpt}} "
      f"--input={{d}}/face.png --output={{d}}/link.png {LOW}", "is the --input",
      lambda d, a: (png(d / "face.png"), (d / "link.png").symlink_to(d / "face.png"))),
    C("infer_output_hard_link_to_input", "infer", f"--checkpoint={{ckpt}} "
      f"--input={{d}}/face.png --output={{d}}/hard.png {LOW}", "is the --input",
      lambda d, a: (png(d / "face.png"), os.link(d / "face.png", d / "hard.png"))),
    C("infer_output_holds_input_tree", "infer", f"--checkpoint={{ckpt}} --input={{d}}/out/in "
      f"--output={{d}}/out {LOW}", "inside --input",
      lambda d, a: (png(d / "out/in/in/x.png"), png(d / "out/in/y.png"))),
    C("infer_photo_same_folder", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/in "
      "--mode=photo --noprogress", "is the --input", lambda d, a: lowres_folder(d)),
    C("infer_output_is_checkpoint", "infer", f"--checkpoint={{d}}/ck --input={{d}}/in "
      f"--output={{d}}/ck {LOW}", "is the --checkpoint",
      lambda d, a: (lowres_folder(d), copy(a.ckpt, d / "ck"))),
    C("infer_output_inside_checkpoints", "infer", f"--checkpoint={{d}}/ck --input={{d}}/in "
      f"--output={{d}}/ck/checkpoints/sr {LOW}", "is inside --checkpoint",
      lambda d, a: (lowres_folder(d), copy(a.ckpt, d / "ck"))),
    C("infer_output_is_exported", "infer", f"--exported={{d}}/ex --input={{d}}/in "
      f"--output={{d}}/ex {LOW}", "is the --exported",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"))),
    C("infer_folder_to_existing_file", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/in2.png {LOW}", "must be a folder",
      lambda d, a: (lowres_folder(d), png(d / "in2.png"))),
    C("infer_folder_to_image_name", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/sr.png {LOW}", "named like an image file", lambda d, a: lowres_folder(d)),
    # --- infer: output names and places
    C("infer_output_txt_extension", "infer", f"--checkpoint={{ckpt}} --input={{d}}/face.png "
      f"--output={{d}}/sr.txt {LOW}", "not an image format", lambda d, a: png(d / "face.png")),
    C("infer_output_no_extension", "infer", f"--checkpoint={{ckpt}} --input={{d}}/face.png "
      f"--output={{d}}/result {LOW}", "no extension", lambda d, a: png(d / "face.png")),
    C("infer_output_name_too_long", "infer", "--checkpoint={ckpt} --input={d}/face.png "
      f"--output={{d}}/{'x' * 300}.png {LOW}", "name too long", lambda d, a: png(d / "face.png")),
    C("infer_output_under_a_file", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output={{d}}/afile/sr {LOW}", "is a file",
      lambda d, a: (lowres_folder(d), (d / "afile").write_text("x"))),
    C("infer_output_unwritable", "infer", f"--checkpoint={{ckpt}} --input={{d}}/in "
      f"--output=/proc/progsr_probe/sr {LOW}", "cannot write to", lambda d, a: lowres_folder(d),
      needs="proc"),
    # --- infer: images that cannot be used
    C("infer_truncated_image", "infer", "--checkpoint={ckpt} --input={d}/t.png --output={d}/o.png",
      "nothing could be processed", lambda d, a: truncated(d / "t.png")),
    C("infer_fake_image", "infer", "--checkpoint={ckpt} --input={d}/fake.jpg --output={d}/o.png",
      "nothing could be processed", lambda d, a: (d / "fake.jpg").write_text("not a jpeg\n")),
    C("infer_empty_image", "infer", "--checkpoint={ckpt} --input={d}/empty.png "
      "--output={d}/o.png", "empty file", lambda d, a: (d / "empty.png").write_bytes(b"")),
    C("infer_decompression_bomb", "infer", "--checkpoint={ckpt} --input={d}/bomb.png "
      "--output={d}/o.png", "decompression bomb", lambda d, a: bomb_png(d / "bomb.png")),
    C("infer_image_too_small", "infer", "--checkpoint={ckpt} --input={d}/tiny.png "
      "--output={d}/o.png", "too small", lambda d, a: png(d / "tiny.png", (8, 8))),
    C("infer_folder_all_bad", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--noprogress", "nothing could be processed",
      lambda d, a: (truncated(d / "in/t.png"), (d / "in/fake.jpg").write_text("x"),
                    (d / "in/empty.png").write_bytes(b""), bomb_png(d / "in/bomb.png"))),
    C("infer_photo_all_bad", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--mode=photo --noprogress", "nothing could be processed",
      lambda d, a: (truncated(d / "in/t.png"), bomb_png(d / "in/bomb.png")), needs="mtcnn"),
    C("infer_input_missing", "infer", "--checkpoint={ckpt} --input={d}/nope --output={d}/out",
      "does not exist"),
    C("infer_input_folder_empty", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out",
      "no image", lambda d, a: (d / "in").mkdir()),
    C("infer_input_folder_no_images", "infer", "--checkpoint={ckpt} --input={d}/in "
      "--output={d}/out", "no image",
      lambda d, a: ((d / "in").mkdir(), (d / "in/notes.txt").write_text("x"))),
    # --- infer: checkpoints and exported models
    C("infer_checkpoint_missing", "infer", "--checkpoint={d}/nope --input={d}/in "
      "--output={d}/out", "not found", lambda d, a: lowres_folder(d)),
    C("infer_checkpoint_garbage_folder", "infer", "--checkpoint={d}/ck --input={d}/in "
      "--output={d}/out", "no checkpoint found",
      lambda d, a: (lowres_folder(d), (d / "ck").mkdir(), (d / "ck/x").write_text("x"))),
    C("infer_checkpoint_is_a_file", "infer", "--checkpoint={d}/ck.bin --input={d}/in "
      "--output={d}/out", "is a file",
      lambda d, a: (lowres_folder(d), (d / "ck.bin").write_bytes(os.urandom(999)))),
    C("infer_checkpoint_truncated", "infer", "--checkpoint={d}/ck --input={d}/in "
      "--output={d}/out", "cannot read the checkpoint",
      lambda d, a: (lowres_folder(d), copy(a.ckpt, d / "ck"),
                    cut(step_dir(d / "ck") / "generator" / "manifest.ocdbt", 0.2))),
    C("infer_checkpoint_arrays_missing", "infer", "--checkpoint={d}/ck --input={d}/in "
      "--output={d}/out", "cannot read the checkpoint",
      lambda d, a: (lowres_folder(d), copy(a.ckpt, d / "ck"),
                    shutil.rmtree(step_dir(d / "ck") / "generator" / "d"))),
    C("infer_checkpoint_bad_meta", "infer", "--checkpoint={d}/ck --input={d}/in "
      "--output={d}/out", "cannot read the checkpoint",
      lambda d, a: (lowres_folder(d), copy(a.ckpt, d / "ck"),
                    (step_dir(d / "ck") / "meta" / "metadata").write_text("{"))),
    C("infer_exported_missing", "infer", "--exported={d}/nope --input={d}/in --output={d}/out",
      "not found", lambda d, a: lowres_folder(d)),
    C("infer_exported_empty_folder", "infer", "--exported={d}/ex --input={d}/in "
      "--output={d}/out", "no exported model", lambda d, a: (lowres_folder(d), (d / "ex").mkdir())),
    C("infer_exported_truncated_onnx", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out {LOW}", "cannot load",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"), cut(d / "ex/model.onnx")),
      needs="onnx"),
    C("infer_exported_truncated_stablehlo", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "cannot load",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    cut(d / "ex/model.stablehlo"))),
    C("infer_exported_garbage_stablehlo", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "cannot load",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    (d / "ex/model.stablehlo").write_bytes(os.urandom(4000)))),
    C("infer_exported_contract_truncated", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "cannot read the contract",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    cut(d / "ex/model.stablehlo.json"))),
    C("infer_exported_contract_missing", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "cannot read the contract",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    (d / "ex/model.stablehlo.json").unlink())),
    C("infer_exported_contract_wrong_size", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "export the model again",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    edit_json(d / "ex/model.stablehlo.json", output_size=64))),
    C("infer_exported_contract_no_stage", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "no valid 'stage'",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    edit_json(d / "ex/model.stablehlo.json", stage=None))),
    C("infer_exported_contract_lies", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=stablehlo {LOW}", "as its contract says",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    edit_json(d / "ex/model.stablehlo.json", stage=2, output_size=64))),
    C("infer_exported_format_absent", "infer", "--exported={d}/ex --input={d}/in "
      f"--output={{d}}/out --exported_format=onnx {LOW}", "no model.onnx",
      lambda d, a: (lowres_folder(d), copy(a.exported, d / "ex"),
                    (d / "ex/model.onnx").unlink(missing_ok=True))),
    C("infer_exported_format_without_exported", "infer", "--checkpoint={ckpt} --input={d}/in "
      f"--output={{d}}/out --exported_format=onnx {LOW}", "only applies with --exported",
      lambda d, a: lowres_folder(d)),
    C("infer_checkpoint_and_exported", "infer", "--checkpoint={ckpt} --exported={exported} "
      "--input={d}/in --output={d}/out", "not both", lambda d, a: lowres_folder(d)),
    C("infer_exported_photo", "infer", "--exported={exported} --input={d}/in --output={d}/out "
      "--mode=photo", "not --mode=photo", lambda d, a: lowres_folder(d)),
    # --- infer: flags
    C("infer_bad_mode", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--mode=video2", "--mode", lambda d, a: lowres_folder(d)),
    C("infer_batch_size_zero", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--batch_size=0", "batch_size", lambda d, a: lowres_folder(d)),
    C("infer_batch_size_text", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--batch_size=many", "batch_size", lambda d, a: lowres_folder(d)),
    C("infer_unknown_flag", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--ouput={d}/o2", "ouput", lambda d, a: lowres_folder(d)),
    C("infer_positional_argument", "infer", "--checkpoint={ckpt} {d}/in --output={d}/out",
      "unexpected argument", lambda d, a: lowres_folder(d)),
    C("infer_no_output", "infer", "--checkpoint={ckpt} --input={d}/in", "--output",
      lambda d, a: lowres_folder(d)),
    C("infer_no_input", "infer", "--checkpoint={ckpt} --output={d}/out", "--input"),
    C("infer_no_model", "infer", "--input={d}/in --output={d}/out", "--checkpoint",
      lambda d, a: lowres_folder(d)),
    C("infer_photo_flag_without_photo", "infer", "--checkpoint={ckpt} --input={d}/in "
      "--output={d}/out --upscale=4", "only applies to --mode=photo",
      lambda d, a: lowres_folder(d)),
    C("infer_photo_bad_upscale", "infer", "--checkpoint={ckpt} --input={d}/in --output={d}/out "
      "--mode=photo --upscale=big", "upscale", lambda d, a: lowres_folder(d)),
    C("infer_photo_upscale_zero", "infer", "--checkpoint={ckpt} --input={d}/in "
      "--output={d}/out --mode=photo --upscale=0", "upscale", lambda d, a: lowres_folder(d)),
    C("infer_photo_detector_weights_missing", "infer", "--checkpoint={ckpt} --input={d}/in "
      "--output={d}/out --mode=photo --detector_weights={d}/nowhere", "nowhere",
      lambda d, a: lowres_folder(d)),
    C("infer_photo_output_is_a_file", "infer", "--checkpoint={ckpt} --input={d}/in "
      "--output={d}/o.png --mode=photo", "is a file",
      lambda d, a: (lowres_folder(d), png(d / "o.png"))),
    C("infer_tfds_with_input", "infer", "--checkpoint={ckpt} --source=tfds --input={d}/in "
      "--output={d}/out", "no --input", lambda d, a: lowres_folder(d)),
    # --- evaluate
    C("evaluate_output_is_data_root", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/data --nolpips --noprogress", "is the --data_root",
      lambda d, a: png(d / "data/a.png", (128, 128))),
    C("evaluate_output_inside_data_root", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/data/eval --nolpips", "is inside --data_root",
      lambda d, a: png(d / "data/a.png", (128, 128))),
    C("evaluate_output_symlink_to_data_root", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/link --nolpips", "is the --data_root",
      lambda d, a: (png(d / "data/a.png", (128, 128)), (d / "link").symlink_to(d / "data"))),
    C("evaluate_output_inside_lr_dir", "evaluate", "--method=bicubic --source=paired "
      "--lr_dir={d}/lr --hr_dir={d}/hr --output={d}/lr/eval --nolpips", "is inside --lr_dir",
      lambda d, a: (png(d / "lr/a.png"), png(d / "hr/a.png", (128, 128)))),
    C("evaluate_output_is_hr_dir", "evaluate", "--method=bicubic --source=paired "
      "--lr_dir={d}/lr --hr_dir={d}/hr --output={d}/hr --nolpips", "is the --hr_dir",
      lambda d, a: (png(d / "lr/a.png"), png(d / "hr/a.png", (128, 128)))),
    C("evaluate_output_is_checkpoint", "evaluate", "--checkpoint={d}/ck --source=folder "
      "--data_root={d}/data --output={d}/ck --nolpips", "is the --checkpoint",
      lambda d, a: (png(d / "data/a.png", (128, 128)), copy(a.ckpt, d / "ck"))),
    C("evaluate_offset_past_end", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/out --offset=5 --nolpips", "past the end",
      lambda d, a: [png(d / f"data/{k}.png", (128, 128), k) for k in range(3)]),
    C("evaluate_paired_offset_past_end", "evaluate", "--method=bicubic --source=paired "
      "--lr_dir={d}/lr --hr_dir={d}/hr --output={d}/out --offset=1 --nolpips", "past the end",
      lambda d, a: (png(d / "lr/a.png"), png(d / "hr/a.png", (128, 128)))),
    C("evaluate_paired_no_common_stem", "evaluate", "--method=bicubic --source=paired "
      "--lr_dir={d}/lr --hr_dir={d}/hr --output={d}/out --nolpips", "no file stem",
      lambda d, a: (png(d / "lr/a.png"), png(d / "hr/b.png", (128, 128)))),
    C("evaluate_paired_no_hr_dir", "evaluate", "--method=bicubic --source=paired "
      "--lr_dir={d}/lr --output={d}/out --nolpips", "--hr_dir", lambda d, a: png(d / "lr/a.png")),
    C("evaluate_data_root_missing", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/nope --output={d}/out --nolpips", "not a folder"),
    C("evaluate_data_root_is_a_file", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/a.png --output={d}/out --nolpips", "not a folder",
      lambda d, a: png(d / "a.png")),
    C("evaluate_checkpoint_missing", "evaluate", "--checkpoint={d}/nope --source=folder "
      "--data_root={d}/data --output={d}/out --nolpips", "not found",
      lambda d, a: png(d / "data/a.png", (128, 128))),
    C("evaluate_checkpoint_garbage", "evaluate", "--checkpoint={d}/ck --source=folder "
      "--data_root={d}/data --output={d}/out --nolpips", "no checkpoint found",
      lambda d, a: (png(d / "data/a.png", (128, 128)), (d / "ck").mkdir())),
    C("evaluate_model_without_checkpoint", "evaluate", "--source=folder --data_root={d}/data "
      "--output={d}/out --nolpips", "--checkpoint", lambda d, a: png(d / "data/a.png", (64, 64))),
    C("evaluate_bad_degradation", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/out --degradation=heavy --nolpips", "heavy",
      lambda d, a: png(d / "data/a.png", (128, 128))),
    C("evaluate_output_is_a_file", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/out.txt --nolpips", "not a folder",
      lambda d, a: (png(d / "data/a.png", (128, 128)), (d / "out.txt").write_text("x"))),
    C("evaluate_all_images_bad", "evaluate", "--method=bicubic --source=folder "
      "--data_root={d}/data --output={d}/out --nolpips --noprogress", "could be used",
      lambda d, a: (truncated(d / "data/t.png"), bomb_png(d / "data/bomb.png"))),
    C("evaluate_bad_source", "evaluate", "--method=bicubic --source=imagenet "
      "--data_root={d}/data --output={d}/out", "--source"),
    # --- evaluate_landmarks
    C("landmarks_output_is_data_root", "evaluate_landmarks", "--fan={d}/fan --data_root={d}/data "
      "--output={d}/data", "is the --data_root",
      lambda d, a: (png(d / "data/a.png", (64, 64)), (d / "fan").mkdir())),
    C("landmarks_output_inside_data_root", "evaluate_landmarks", "--fan={d}/fan "
      "--data_root={d}/data --output={d}/data/nme", "is inside --data_root",
      lambda d, a: (png(d / "data/a.png", (64, 64)), (d / "fan").mkdir())),
    C("landmarks_fan_missing", "evaluate_landmarks", "--fan={d}/nope --data_root={d}/data "
      "--output={d}/out", "nope", lambda d, a: png(d / "data/a.png", (64, 64))),
    C("landmarks_fan_garbage", "evaluate_landmarks", "--fan={d}/fan --data_root={d}/data "
      "--output={d}/out", "fan",
      lambda d, a: (png(d / "data/a.png", (64, 64)), (d / "fan").mkdir(),
                    (d / "fan/junk.bin").write_bytes(os.urandom(100)))),
    C("landmarks_no_fan", "evaluate_landmarks", "--data_root={d}/data", "--fan"),
    # --- export
    C("export_checkpoint_missing", "export", "--checkpoint={d}/nope --output={d}/out",
      "not found"),
    C("export_folder_without_model", "export", "--checkpoint={d}/ck --output={d}/out",
      "no checkpoint found", lambda d, a: (d / "ck").mkdir()),
    C("export_checkpoint_truncated", "export", "--checkpoint={d}/ck --output={d}/out "
      "--format=stablehlo", "cannot read the checkpoint",
      lambda d, a: (copy(a.ckpt, d / "ck"),
                    cut(step_dir(d / "ck") / "generator" / "manifest.ocdbt", 0.2))),
    C("export_output_is_checkpoint", "export", "--checkpoint={d}/ck --output={d}/ck",
      "is the --checkpoint", lambda d, a: copy(a.ckpt, d / "ck")),
    C("export_output_inside_checkpoints", "export", "--checkpoint={d}/ck "
      "--output={d}/ck/checkpoints/onnx", "is inside --checkpoint",
      lambda d, a: copy(a.ckpt, d / "ck")),
    C("export_output_is_a_file", "export", "--checkpoint={ckpt} --output={d}/out.onnx",
      "not a folder", lambda d, a: (d / "out.onnx").write_text("x")),
    C("export_partial_without_flag", "export", "--checkpoint={ckpt1} --output={d}/out "
      "--format=stablehlo", "--partial"),
    C("export_bad_format", "export", "--checkpoint={ckpt} --output={d}/out --format=tflite",
      "--format"),
    C("export_bad_batch", "export", "--checkpoint={ckpt} --output={d}/out --batch_size=0",
      "--batch_size"),
    C("export_bad_platform", "export", "--checkpoint={ckpt} --output={d}/out "
      "--platforms=metal", "--platforms"),
    # --- main (training)
    C("main_workdir_is_a_file", "main", f"{SMOKE} --workdir={{d}}/wd", "not a folder",
      lambda d, a: (d / "wd").write_text("x")),
    C("main_workdir_under_a_file", "main", f"{SMOKE} --workdir={{d}}/wd/run", "is a file",
      lambda d, a: (d / "wd").write_text("x")),
    C("main_workdir_unwritable", "main", f"{SMOKE} --workdir=/proc/progsr_probe/run",
      "cannot write to", needs="proc"),
    C("main_unknown_config_key", "main", f"{SMOKE} --workdir={{d}}/wd --config.nope=3",
      "unknown config key --config.nope"),
    C("main_misspelt_config_key", "main", f"{SMOKE} --workdir={{d}}/wd --config.optim.lrr=1",
      "did you mean --config.optim.lr"),
    C("main_config_key_in_other_group", "main", f"{SMOKE} --workdir={{d}}/wd --config.lr=1",
      "did you mean --config.optim.lr"),
    C("main_config_value_not_a_number", "main", f"{SMOKE} --workdir={{d}}/wd "
      "--config.batch_size=lots", "batch_size"),
    C("main_config_file_missing", "main", "--config={d}/nope.py --workdir={d}/wd", "nope.py"),
    C("main_config_bad_variant", "main", "--config=configs/step3.py:huge --workdir={d}/wd",
      "huge"),
    C("main_no_workdir", "main", SMOKE, "--workdir"),
    C("main_no_config", "main", "--workdir={d}/wd", "--config"),
    C("main_invalid_config_value", "main", f"{SMOKE} --workdir={{d}}/wd --config.batch_size=1",
      "batch_size"),
    C("main_data_root_missing", "main", f"{SMOKE} --workdir={{d}}/wd --config.data.source=folder "
      "--config.data.root={d}/nope", "does not exist"),
    C("main_resume_with_missing_data_root", "main", f"{SMOKE} --workdir={{d}}/wd "
      "--config.data.source=folder --config.data.root={d}/nope", "does not exist",
      lambda d, a: earlier_run(d / "wd")),
    C("main_fan_checkpoint_missing", "main", f"{SMOKE} --workdir={{d}}/wd "
      "--config.fan.checkpoint={d}/nope --config.data.cache_dir=", "nope"),
    C("main_init_from_missing", "main", f"{SMOKE} --workdir={{d}}/wd --config.init_from={{d}}/nope "
      "--config.data.cache_dir=", "nope"),
    # --- main: --multihost
    C("main_coordinator_garbage", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      "--coordinator_address=garbage", "expected HOST:PORT"),
    C("main_coordinator_port_not_a_number", "main", f"{SMOKE} --workdir={{d}}/wd {MH} "
      "--process_id=0 --coordinator_address=localhost:abc", "expected HOST:PORT"),
    C("main_coordinator_port_too_large", "main", f"{SMOKE} --workdir={{d}}/wd {MH} "
      "--process_id=1 --coordinator_address=localhost:99999", "1 .. 65535"),
    C("main_coordinator_no_host", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      "--coordinator_address=:1234", "expected HOST:PORT"),
    C("main_coordinator_unknown_host", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      "--coordinator_address=no-such-host.invalid:1234", "cannot resolve"),
    C("main_coordinator_unreachable", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      f"--coordinator_address=localhost:{{free_port}} --coordinator_timeout={WAIT}",
      "no coordinator answered at localhost:"),
    C("main_coordinator_not_jax", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      f"--coordinator_address=localhost:{{listening_port}} --coordinator_timeout={WAIT}",
      "did not start the run within"),
    C("main_coordinator_port_busy", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=0 "
      "--coordinator_address=localhost:{listening_port}", "choose a free port"),
    C("main_coordinator_others_never_join", "main", f"{SMOKE} --workdir={{d}}/wd {MH} "
      f"--process_id=0 --coordinator_address=localhost:{{free_port}} "
      f"--coordinator_timeout={WAIT}", "not every one of the 2 processes joined"),
    C("main_process_id_out_of_range", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=2 "
      "--coordinator_address=localhost:1234", "--process_id"),
    C("main_coordinator_timeout_zero", "main", f"{SMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      "--coordinator_address=localhost:1234 --coordinator_timeout=0", "--coordinator_timeout"),
    C("main_launch_flag_without_multihost", "main", f"{SMOKE} --workdir={{d}}/wd "
      "--coordinator_address=localhost:1234", "needs --multihost"),
    # --- distill
    C("distill_workdir_is_a_file", "distill", f"{DSMOKE} --workdir={{d}}/wd "
      "--config.teacher_heatmaps={d}/hm", "not a folder", lambda d, a: (d / "wd").write_text("x")),
    C("distill_unknown_config_key", "distill", f"{DSMOKE} --workdir={{d}}/wd --config.stepz=3",
      "did you mean --config.steps"),
    C("distill_teacher_missing", "distill", f"{DSMOKE} --workdir={{d}}/wd "
      "--config.teacher_heatmaps={d}/nope --config.data.cache_dir=", "nope"),
    C("distill_resume_with_missing_teacher", "distill", f"{DSMOKE} --workdir={{d}}/wd "
      "--config.teacher_heatmaps={d}/nope --config.data.cache_dir=", "nope",
      lambda d, a: earlier_run(d / "wd", width=0.125)),
    C("distill_fan_without_eval_only", "distill", f"{DSMOKE} --workdir={{d}}/wd --fan={{d}}",
      "--eval_only"),
    C("distill_eval_only_multihost", "distill", f"{DSMOKE} --eval_only --multihost", "--eval_only"),
    C("distill_coordinator_garbage", "distill", f"{DSMOKE} --workdir={{d}}/wd {MH} --process_id=1 "
      "--coordinator_address=a:b:c", "expected HOST:PORT"),
    # --- bench
    C("bench_bad_stage", "bench", "--stage=4", "--stage"),
    C("bench_batch_of_one", "bench", "--batch_size=1", "--batch_size"),
    C("bench_no_steps", "bench", "--steps=0", "--steps"),
    C("bench_width_zero", "bench", "--width=0", "--width"),
    C("bench_bad_mode", "bench", "--mode=video", "--mode"),
    C("bench_bad_dtype", "bench", "--dtype=float16", "--dtype"),
    C("bench_bad_degradation", "bench", "--mode=data --degradation=heavy", "heavy"),
    C("bench_out_without_suite", "bench", "--out={d}/b.jsonl", "--suite"),
    C("bench_out_is_a_folder", "bench", "--suite --out={d}", "is a folder"),
    C("bench_out_unwritable", "bench", "--suite --out=/proc/progsr_probe/b.jsonl",
      "cannot write to", needs="proc"),
]


# ---------------------------------------------------------------------- the harness
def snapshot(root: pathlib.Path) -> dict[str, str]:
    """``{relative path: what it is}``: a file's SHA-256, a link's target, ``dir``."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
                if name in dirs:
                    dirs.remove(name)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _have(what: str | None) -> bool:
    if what == "proc":
        return HAS_PROC
    if what == "onnx":
        try:
            import onnxruntime  # noqa: F401 - optional: only asked whether it is there
        except ImportError:
            return False
    if what == "mtcnn":
        try:
            mtcnn.weights_dir()
        except UserError:
            return False
    return True


@dataclasses.dataclass
class Assets:
    ckpt: pathlib.Path  # a finished stage-3 generator, width 1/16 (converted checkpoint)
    ckpt1: pathlib.Path  # the same weights as a stage-1 model (export needs --partial)
    exported: pathlib.Path  # model.stablehlo (+ model.onnx with the converter), contracts


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_checkpoint) -> Assets:
    root = tmp_path_factory.mktemp("probe_assets")
    ckpt = copy(tiny_checkpoint, root / "ckpt")
    ckpt1 = copy(tiny_checkpoint, root / "ckpt1")
    meta = step_dir(ckpt1) / "meta" / "metadata"
    edit_json(meta, stage=1)
    try:
        import jax2onnx  # noqa: F401 - optional: only asked whether it is there
        formats = ["stablehlo", "onnx"] if _have("onnx") else ["stablehlo"]
    except ImportError:
        formats = ["stablehlo"]
    export.export(str(ckpt), str(root / "exported"), formats=formats, platforms=["cpu"],
                  log=lambda _: None)
    return Assets(ckpt, ckpt1, root / "exported")


@pytest.fixture(scope="module")
def results(assets, tmp_path_factory):
    """Runs every case (in ``WORKERS`` threads); ``{id: (result, before, after, seconds)}``.

    Also checks the shared assets are untouched by all of them.
    """
    root = tmp_path_factory.mktemp("probe")
    listening = socket.socket()
    listening.bind(("localhost", 0))
    listening.listen()
    names = dict(ckpt=assets.ckpt, ckpt1=assets.ckpt1, exported=assets.exported,
                 listening_port=listening.getsockname()[1])
    shared_before = snapshot(assets.ckpt.parent)

    def run(case: Case):
        d = root / case.id
        d.mkdir()
        if case.setup:
            case.setup(d, assets)
        args = [a.format(d=d, free_port=_free_port(), **names) for a in case.args]
        before = snapshot(d)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", f"progsr_jax.{case.command}", *args],
                                  cwd=REPO, env=ENV, capture_output=True, text=True,
                                  timeout=TIMEOUT)
        except subprocess.TimeoutExpired as e:
            proc = subprocess.CompletedProcess(e.cmd, "timeout", e.stdout or "",
                                               f"(killed after {TIMEOUT} s)")
        return proc, before, snapshot(d), time.perf_counter() - t0

    runnable = [c for c in CASES if _have(c.needs)]
    try:
        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            out = dict(zip([c.id for c in runnable], pool.map(run, runnable)))
    finally:
        listening.close()
    out["__shared__"] = (shared_before, snapshot(assets.ckpt.parent))
    return out


def test_cases_have_unique_names():
    assert len({c.id for c in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, results):
    if not _have(case.needs):
        pytest.skip(f"needs {case.needs}")
    proc, before, after, seconds = results[case.id]
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode} after {seconds:.1f} s:\n{err[-3000:]}"
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for crash in ("Traceback", "Fatal Python error", "Check failure", "Segmentation fault"):
        assert crash not in err, err[-3000:]
    assert case.expect in errors[0], errors[0]
    assert after == before, (f"the case folder changed: {errors[0]}\nadded/changed: "
                             f"{sorted(k for k in after if after[k] != before.get(k))}\n"
                             f"removed: {sorted(k for k in before if k not in after)}")


def test_shared_assets_untouched(results):
    before, after = results["__shared__"]
    assert after == before


# ------------------------------------------------- what the refusals leave possible
def test_overwrite_replaces_the_inputs_in_place(tmp_path, assets):
    """``--overwrite`` is the explicit way to write over the inputs: each file is replaced by
    its own output, nothing else is made."""
    src = lowres_folder(tmp_path)
    before = snapshot(src)
    with pytest.raises(UserError, match="add --overwrite"):
        infer.run(str(assets.ckpt), str(src), str(src), mode="lowres", progress=False)
    assert snapshot(src) == before
    res = infer.run(str(assets.ckpt), str(src), str(src), mode="lowres", progress=False,
                    overwrite=True, log=lambda _: None)
    assert sorted(res["written"]) == sorted(str(src / f"f{k}.png") for k in range(3))
    assert sorted(snapshot(src)) == sorted(before)  # the same names, no temporary files left
    assert all(Image.open(src / f"f{k}.png").size == (128, 128) for k in range(3))


def test_in_place_outputs_never_take_another_inputs_name(tmp_path):
    png(tmp_path / "a.jpg")
    png(tmp_path / "a.png", seed=1)
    png(tmp_path / "b.jpg", seed=2)
    plan = dict(writing.plan_outputs(str(tmp_path), str(tmp_path), overwrite=True))
    assert plan == {str(tmp_path / "a.jpg"): str(tmp_path / "a.jpg.png"),
                    str(tmp_path / "a.png"): str(tmp_path / "a.png"),
                    str(tmp_path / "b.jpg"): str(tmp_path / "b.png")}


def test_the_output_extension_names_the_format(tmp_path, assets):
    face = png(tmp_path / "face.png")
    magic = {"x.jpg": b"\xff\xd8\xff", "x.JPEG": b"\xff\xd8\xff", "x.png": b"\x89PNG",
             "x.webp": b"RIFF", "x.bmp": b"BM", "x.tiff": b"II*\x00"}
    for name, head in magic.items():
        infer.run(str(assets.ckpt), str(face), str(tmp_path / name), mode="lowres",
                  progress=False, log=lambda _: None)
        assert (tmp_path / name).read_bytes()[:len(head)] == head, name
        assert Image.open(tmp_path / name).size == (128, 128)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["face.png", *magic])


def test_a_folder_with_both_exported_formats_says_which_runs(assets):
    if not (assets.exported / "model.onnx").exists():
        pytest.skip("no ONNX converter: the folder holds one format")
    lines = []
    model = serialized.load(str(assets.exported), log=lines.append)
    assert model.backend == "onnx"
    assert len(lines) == 1 and "running model.onnx" in lines[0]
    assert "--exported_format=stablehlo" in lines[0]
    lines.clear()
    assert serialized.load(str(assets.exported), "stablehlo", log=lines.append).backend == \
        "stablehlo"
    assert not lines


def test_a_photo_left_unchanged_is_not_rewritten(tmp_path, assets):
    """In place (``--overwrite``), a photo without a face at upscale 1 is left exactly as it
    was (the issue: a grayscale photo was saved back as RGB)."""
    try:
        mtcnn.weights_dir()
    except UserError as e:
        pytest.skip(f"MTCNN weights not installed ({mtcnn.PIP_COMMAND}): {e}")
    gray = tmp_path / "in" / "gray.png"
    gray.parent.mkdir()
    Image.fromarray(np.full((60, 80), 90, np.uint8), "L").save(gray)
    stat = gray.stat()
    before = gray.read_bytes()
    lines = []
    res = infer.run(str(assets.ckpt), str(gray.parent), str(gray.parent), mode="photo",
                    upscale="1", overwrite=True, progress=False, log=lines.append)
    assert res["no_face"] == [str(gray)]
    assert gray.read_bytes() == before and gray.stat().st_mtime_ns == stat.st_mtime_ns
    assert any("left as it is (not rewritten)" in ln for ln in lines)
    assert sorted(p.name for p in gray.parent.iterdir()) == ["faces.json", "gray.png"]


def test_atomic_write_leaves_nothing_when_it_fails(tmp_path):
    target = tmp_path / "out" / "a.bin"
    with pytest.raises(RuntimeError):
        with writing.atomic_write(str(target)) as f:
            f.write(b"half")
            raise RuntimeError("stopped")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []
    writing.write_bytes(str(target), b"whole")
    assert target.read_bytes() == b"whole" and len(list(target.parent.iterdir())) == 1


def test_run_folder_is_removed_when_the_run_fails_before_it_starts(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(UserError):
        with writing.run_folder(str(new)):
            (new / "log.txt").write_text("setting up")
            raise UserError("bad data root")
    assert not new.exists()
    with pytest.raises(UserError):
        with writing.run_folder(str(new)) as folder:
            folder.keep()
            raise UserError("diverged")
    assert new.is_dir()  # the run began: its files stay
    old = tmp_path / "old"
    old.mkdir()
    with pytest.raises(UserError):
        with writing.run_folder(str(old)):
            raise UserError("bad data root")
    assert old.is_dir()  # it was there before
