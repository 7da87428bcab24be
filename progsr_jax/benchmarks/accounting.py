"""What a measurement is worth: FLOPs from the lowered module, the precision in use, the
device's peak for it (:data:`PEAK_TFLOPS`), memory, and the rates derived from them."""

from __future__ import annotations

import jax

#: Dense (no sparsity) peak TFLOP/s of one device per precision, from the vendors'
#: datasheets; the first name found in ``device_kind`` wins.
PEAK_TFLOPS = (
    ("H200", {"float32": 67.0, "tf32": 494.7, "bfloat16": 989.4}),
    ("H100 PCIe", {"float32": 51.2, "tf32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 66.9, "tf32": 494.7, "bfloat16": 989.4}),
    ("A100", {"float32": 19.5, "tf32": 156.0, "bfloat16": 312.0}),
    ("L4", {"float32": 30.3, "tf32": 60.0, "bfloat16": 121.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5", {"bfloat16": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),
)


# --------------------------------------------------------------------------- the work


def lowered_flops(lowered) -> float | None:
    """FLOPs of a lowered (unoptimised) computation by XLA's cost analysis, or None."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def precision(dtype: str, device) -> str:
    """What the convolutions compute in: float32, tf32 or bfloat16."""
    if dtype == "bfloat16":
        return "bfloat16"
    if device.platform == "tpu":
        return "bfloat16"  # the default precision: one bfloat16 pass
    wanted = str(jax.config.jax_default_matmul_precision or "default").lower()
    cc = getattr(device, "compute_capability", None)
    if device.platform == "gpu" and cc and float(cc) >= 8.0 and wanted in ("default", "tensorfloat32"):
        return "tf32"
    return "float32"


def peak_tflops(device_kind: str, prec: str, override: float | None = None) -> float | None:
    """The device's dense peak for ``prec`` (:data:`PEAK_TFLOPS`), ``override`` if given."""
    if override:
        return float(override)
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks.get(prec)
    return None


def executable_bytes(compiled) -> int | None:
    """Device memory of one call of a compiled computation: arguments, outputs and temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend has it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def process_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend reports memory
        return None
    return stats.get("peak_bytes_in_use")


def device_fields() -> dict:
    devs = jax.devices()
    return {"device": f"{devs[0].platform}:{devs[0].device_kind}", "num_devices": len(devs)}


def with_rates(out: dict, peak_override: float | None) -> dict:
    """Adds achieved TFLOP/s and the fraction of the peak to a measurement."""
    flops, dt = out.get("flops_per_step"), out["step_time_s"]
    if flops:
        out["achieved_tflops"] = flops / dt / 1e12
        peak = peak_tflops(out.get("device", ""), out["precision"], peak_override)
        out["peak_tflops"] = peak
        if peak:
            out["fraction_of_peak"] = out["achieved_tflops"] / peak
    return out
