#!/usr/bin/env python
"""Face-alignment network weights: conversion and the teacher heatmap pass.

Commands
--------
``distilled --input FILE --output DIR``
    Converts the released distilled FAN (``compressed_model_011000.pth``, a
    legacy whole-module pickle) or any state dict of the same layout into an
    Orbax checkpoint for :class:`progsr_jax.nets.fan.StudentFAN`, plus
    ``fan_meta.json``.  The file is read with :mod:`progsr_jax.interop.torch_pickle`
    (no torch, no arbitrary code): a file that references anything but
    tensors and known layer records is refused.  Load the result with
    ``progsr_jax.nets.fan.load(DIR)``.

``teacher-heatmaps --teacher=fan4|distilled --weights=FILE --data_root=ROOT --split=... --output=DIR``
    Runs a PyTorch teacher over the 64x64 step-2 targets of a split and
    stores its 64x64x68 heatmaps (format: :mod:`progsr_jax.data.teacher`).
    ``fan4``: face-alignment's 4-stack FAN (``2DFAN4-11f355bf06.pth.tar``, a
    plain state dict) on the image bilinearly upsampled x4 to 256x256; the
    last stack's output.  ``distilled``: the released student on the 64x64
    image.  Needs torch; uses a GPU when there is one.  Resumable: rerun the
    same command after an interruption and finished chunks are skipped.

Examples::

    python tools/convert_fan_weights.py distilled \\
        --input ../shared/weights/distilled_fan/compressed_model_011000.pth --output weights/fan
    python tools/convert_fan_weights.py teacher-heatmaps --teacher=fan4 \\
        --weights=2DFAN4-11f355bf06.pth.tar --data_root=celeba --split=train --output=teacher/train
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags
from tqdm import tqdm

from progsr_jax import cli, data
from progsr_jax.data import teacher as teacher_io
from progsr_jax.errors import UserError
from progsr_jax.interop.state_dict import state_dict_to_variables
from progsr_jax.interop.torch_pickle import UnsafePickleError, load_torch_file
from progsr_jax.nets import fan as fan_lib
from progsr_jax.nets.fan import StudentFAN, abstract_variables
from progsr_jax.nets.layers import count_params

COMMANDS = ("distilled", "teacher-heatmaps")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: str) -> dict:
    """A state dict of numpy arrays from a .pth file, refusing unsafe pickles with a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        return load_torch_file(path)
    except UnsafePickleError as e:
        msg = str(e)
        if not msg.startswith("refusing to load"):
            msg = f"refusing to load {path}: {msg}"
        raise UserError(msg) from None


# ---------------------------------------------------------------------------
# distilled


def convert_distilled(input_path: str, output_dir: str, width: float = 1.0) -> dict:
    sd = read_state_dict(input_path)  # before importing jax: refuse bad files fast

    module = StudentFAN(width=width)
    reference = abstract_variables(module)  # shapes only (random init is slow on CPU)
    variables = state_dict_to_variables(sd, reference, what=input_path)
    return fan_lib.save(output_dir, variables, {
        "width": float(width), "source": sha256_file(input_path),
        "source_file": os.path.basename(input_path),
        "num_params": count_params(variables["params"])})


def _cmd_distilled(args) -> int:
    cli.require(args, "input", "output")
    meta = convert_distilled(args.input, args.output, args.width)
    print(f"converted {args.input} -> {os.path.abspath(args.output)} "
          f"({meta['num_params']:,} parameters, sha256 {meta['source'][:12]}...)")
    return 0


# ---------------------------------------------------------------------------
# teacher-heatmaps


def _import_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UserError("teacher-heatmaps needs PyTorch (it runs the PyTorch teacher once): "
                        "pip install torch, or pip install 'progsr_jax[torch]'") from None
    return torch


def build_teacher(kind: str, weights: str, device):
    """The PyTorch teacher in eval mode and a function (N,64,64,3) float [0,1] -> (N,64,64,68)."""
    torch = _import_torch()
    import torch.nn.functional as F

    from progsr_jax.interop.pytorch.fan4 import FAN4, FanSqueeze, load_state_dict_strict

    sd = read_state_dict(weights)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if kind == "fan4":
        net = load_state_dict_strict(FAN4(4), sd, weights)
    elif kind == "distilled":
        net = load_state_dict_strict(FanSqueeze(), sd, weights)
    else:
        raise UserError(f"unknown teacher {kind!r} (fan4 or distilled)")
    net = net.to(device).eval()

    @torch.inference_mode()
    def run(x64: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(x64.transpose(0, 3, 1, 2))).to(device)
        if kind == "fan4":
            x = F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)
            y = net(x)[-1]
        else:
            y = net(x)
        return y.permute(0, 2, 3, 1).float().cpu().numpy()

    return net, run


def _load_64(path: str, crop: str):
    try:
        img = data.open_image(path)
        return data.preprocess(img, crop=crop)[64], None
    except data.BadImage as e:
        return None, str(e) or "unreadable image"


def _relative_names(paths: Sequence[str], root: str) -> list[str]:
    root = os.path.abspath(root)
    out = []
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), root)
        if rel.startswith(".."):
            rel = os.path.abspath(p)
        out.append(rel.replace(os.sep, "/"))
    return out


def teacher_heatmaps(*, teacher: str, weights: str, data_root: str, split: str, output: str,
                     source: str = "celeba", crop: str | None = None, limit: int | None = None,
                     batch_size: int = 64, chunk_size: int = 1024, dtype: str = "float16",
                     workers: int = 4, device: str | None = None, overwrite: bool = False,
                     allow_tf32: bool = False, progress: bool = True) -> dict:
    """Writes teacher heatmaps for a split into ``output`` (resuming); returns a summary."""
    torch = _import_torch()
    if teacher not in ("fan4", "distilled"):
        raise UserError(f"--teacher must be fan4 or distilled, not {teacher!r}")
    if dtype not in teacher_io.DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(teacher_io.DTYPES)}")
    if batch_size < 1 or chunk_size < 1:
        raise UserError("--batch_size and --chunk_size must be positive")
    if not os.path.isfile(weights):
        raise UserError(f"no such weights file: {weights}")
    crop = crop or ("celeba" if source == "celeba" else "square")
    paths = data.list_files(source, data_root, split)
    if limit is not None:
        if limit < 1:
            raise UserError("--limit must be positive")
        paths = paths[:limit]
    names = _relative_names(paths, data_root)
    n = len(paths)
    weights_sha = sha256_file(weights)
    meta = {"format": teacher_io.FORMAT, "version": teacher_io.VERSION, "teacher": teacher,
            "weights_sha256": weights_sha, "weights_file": os.path.basename(weights),
            "source": source, "crop": crop, "split": split, "data_root": os.path.abspath(data_root),
            "num_images": n, "shape": list(teacher_io.HEATMAP_SHAPE), "dtype": dtype,
            "chunk_size": chunk_size, "layout": "NHWC",
            "files_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "input": ("64x64 step-2 target in [0,1], bilinear x4 to 256 (align_corners=False), "
                      "last stack" if teacher == "fan4" else "64x64 step-2 target in [0,1]")}

    os.makedirs(output, exist_ok=True)
    meta_path = os.path.join(output, teacher_io.META_FILE)
    hm_path = os.path.join(output, teacher_io.HEATMAPS_FILE)
    scale_path = os.path.join(output, teacher_io.SCALE_FILE)
    progress_path = os.path.join(output, teacher_io.PROGRESS_FILE)
    resume = os.path.isfile(meta_path) and not overwrite
    if resume:
        old = teacher_io.read_json(meta_path)
        keys = ("format", "version", "teacher", "weights_sha256", "num_images", "dtype",
                "chunk_size", "files_sha256", "crop")
        diff = [k for k in keys if old.get(k) != meta.get(k)]
        if diff:
            raise UserError(f"{output} already holds heatmaps of a different run (differs in "
                            f"{', '.join(diff)}); use another --output or pass --overwrite")
        try:
            prog = teacher_io.read_json(progress_path) if os.path.isfile(progress_path) \
                else {"done": [], "bad": {}}
            hm = np.load(hm_path, mmap_mode="r+")
            scale = np.load(scale_path, mmap_mode="r+") if dtype == "uint8" else None
        except (OSError, ValueError) as e:
            raise UserError(f"{output} holds a damaged earlier run ({e}); pass --overwrite "
                            "to start again") from None
        if hm.shape != (n,) + teacher_io.HEATMAP_SHAPE:
            raise UserError(f"{output}: {teacher_io.HEATMAPS_FILE} has shape {hm.shape}; "
                            "pass --overwrite to start again")
    else:
        prog = {"done": [], "bad": {}}
        for p in (progress_path, meta_path):
            if os.path.exists(p):
                os.remove(p)
        with open(os.path.join(output, teacher_io.FILES_FILE), "w") as f:
            f.write("".join(name + "\n" for name in names))
        hm = np.lib.format.open_memmap(hm_path, mode="w+", dtype=np.dtype(dtype),
                                       shape=(n,) + teacher_io.HEATMAP_SHAPE)
        scale = None
        if dtype == "uint8":
            scale = np.lib.format.open_memmap(scale_path, mode="w+", dtype=np.float32,
                                              shape=(n, teacher_io.HEATMAP_SHAPE[-1], 2))
        teacher_io.write_json_atomic(progress_path, prog)
        teacher_io.write_json_atomic(meta_path, meta)

    total_chunks = teacher_io.num_chunks(n, chunk_size)
    done = set(int(c) for c in prog["done"])
    todo = [c for c in range(total_chunks) if c not in done]
    summary = {"num_images": n, "chunks": total_chunks, "skipped_chunks": len(done),
               "computed_chunks": 0, "computed_images": 0, "bad": dict(prog.get("bad", {}))}
    if not todo:
        return summary

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not allow_tf32:  # full float32 convolutions on Ampere+ GPUs (TF32 is cuDNN's default)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    _, run = build_teacher(teacher, weights, dev)
    bar = None
    if progress:
        bar = tqdm(total=sum(min(chunk_size, n - c * chunk_size) for c in todo), unit="img",
                   desc=f"{teacher} heatmaps", file=sys.stderr)
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

    def submit(c):  # decoding of chunk c starts now, in the background
        lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
        return pool.map(lambda p: _load_64(p, crop), paths[lo:hi])

    try:
        pending = submit(todo[0])
        for k, c in enumerate(todo):
            lo, hi = c * chunk_size, min(n, (c + 1) * chunk_size)
            loaded = list(pending)
            if k + 1 < len(todo):
                pending = submit(todo[k + 1])  # overlaps with this chunk's forward passes
            for b0 in range(lo, hi, batch_size):
                b1 = min(hi, b0 + batch_size)
                imgs = np.zeros((b1 - b0, 64, 64, 3), np.float32)
                ok = np.ones(b1 - b0, bool)
                for j in range(b0, b1):
                    arr, err = loaded[j - lo]
                    if arr is None:
                        ok[j - b0] = False
                        prog["bad"][str(j)] = err
                    else:
                        imgs[j - b0] = arr.astype(np.float32) / 255.0
                out = run(imgs)
                out[~ok] = 0.0
                if dtype == "float16" and np.abs(out).max() > 65000:
                    raise UserError("teacher heatmap values exceed the float16 range; "
                                    "use --dtype float32 or uint8")
                if dtype == "uint8":
                    q, s = teacher_io.quantize_uint8(out)
                    hm[b0:b1] = q
                    scale[b0:b1] = s
                else:
                    hm[b0:b1] = out.astype(dtype)
                if bar is not None:
                    bar.update(b1 - b0)
            hm.flush()
            if scale is not None:
                scale.flush()
            prog["done"] = sorted(set(prog["done"]) | {c})
            teacher_io.write_json_atomic(progress_path, prog)
            summary["computed_chunks"] += 1
            summary["computed_images"] += hi - lo
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    summary["bad"] = dict(prog["bad"])
    return summary


def _cmd_teacher(args) -> int:
    cli.require(args, "teacher", "weights", "data_root", "split", "output")
    s = teacher_heatmaps(teacher=args.teacher, weights=args.weights, data_root=args.data_root,
                         split=args.split, output=args.output, source=args.source, crop=args.crop,
                         limit=args.limit, batch_size=args.batch_size, chunk_size=args.chunk_size,
                         dtype=args.dtype, workers=args.workers, device=args.device,
                         overwrite=args.overwrite, allow_tf32=args.allow_tf32,
                         progress=not args.no_progress)
    print(f"{args.output}: {s['num_images']} images in {s['chunks']} chunks; computed "
          f"{s['computed_chunks']} chunks ({s['computed_images']} images), "
          f"{s['skipped_chunks']} were already done; {len(s['bad'])} unreadable images")
    return 0


# ---------------------------------------------------------------------------


def define(fv: flags.FlagValues) -> None:
    def string(name, default, help_string):
        flags.DEFINE_string(name, default, help_string, flag_values=fv)

    string("input", None, "distilled: compressed_model_011000.pth or a state dict")
    string("output", None, "output folder")
    flags.DEFINE_float("width", 1.0, "distilled: StudentFAN width (1.0 = released)",
                       flag_values=fv)
    flags.DEFINE_enum("teacher", None, ["fan4", "distilled"], "teacher-heatmaps: the teacher",
                      flag_values=fv)
    string("weights", None, "teacher-heatmaps: FAN4 state dict (.pth.tar) or distilled .pth")
    string("data_root", None, "teacher-heatmaps: data folder")
    string("split", None, "teacher-heatmaps: train, val, test (CelebA) or all (folder)")
    flags.DEFINE_enum("source", "celeba", ["celeba", "folder"], "teacher-heatmaps: data source",
                      flag_values=fv)
    flags.DEFINE_enum("crop", None, ["celeba", "square", "none"],
                      "default: celeba for --source=celeba, square otherwise", flag_values=fv)
    flags.DEFINE_integer("limit", None, "only the first N images", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "teacher batch", flag_values=fv)
    flags.DEFINE_integer("chunk_size", 1024, "images per resumable chunk (fixed for a given "
                         "output folder)", flag_values=fv)
    flags.DEFINE_enum("dtype", "float16", list(teacher_io.DTYPES), "heatmap storage type",
                      flag_values=fv)
    flags.DEFINE_integer("workers", 4, "image decoding threads", flag_values=fv)
    string("device", None, "torch device (default: cuda if available)")
    flags.DEFINE_bool("overwrite", False, "discard an existing output folder", flag_values=fv)
    flags.DEFINE_bool("allow_tf32", False, "let cuDNN use TF32 (faster on Ampere+ GPUs, ~1e-3 "
                      "relative error)", flag_values=fv)
    flags.DEFINE_bool("no_progress", False, "no progress bar", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    command, fv = cli.parse_command(argv, define, __doc__, COMMANDS)
    return {"distilled": _cmd_distilled, "teacher-heatmaps": _cmd_teacher}[command](fv)


if __name__ == "__main__":
    cli.run(main)
