"""The face-size sweep's plot (``tools/face_size_sweep.py``), drawn with PIL.

Gain over bicubic against the face's size d (log scale), one panel per
degradation, PSNR in the first row and LPIPS (where measured) in the second;
a zero line, +-2 standard-error bars, dashed marks at the model's input size
and the photo pipeline's ``--max_face``, and triangles on the bottom edge for
gains below the axis floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

MODEL_INPUT_SIZE = 16

# ------------------------------------------------------------------ output
#: Line colours of the models, in --checkpoint order (then again).
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14),
           (23, 190, 207), (140, 86, 75), (227, 119, 194))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / max(count, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int(round((last - first) / step)) + 1)]


def _font(size: int):
    return ImageFont.load_default(size=size)


def _dashed(draw, x0, y0, x1, y1, fill, width, dash):
    length = math.hypot(x1 - x0, y1 - y0)
    steps = max(1, int(length // (2 * dash)))
    for i in range(steps + 1):
        a, b = 2 * i * dash / length, min((2 * i + 1) * dash / length, 1.0)
        if a >= 1:
            break
        draw.line((x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b,
                   y0 + (y1 - y0) * b), fill=fill, width=width)


def render_plot(results: dict, models: Sequence[str], sizes: Sequence[int], header: str,
                max_face: float | None = None, floors: dict | None = None,
                width: int = 900) -> Image.Image:
    """The gains of every model over bicubic against d: one panel per degradation, a row for
    the PSNR gain and, when measured, one for the LPIPS gain.  ``floors``: the lowest gain
    shown per row (``{"psnr_gain": -3.0, "lpips_gain": -0.1}``); lower points are off the
    panel, marked by a triangle on its bottom edge.  Drawn at twice the size and shrunk
    (smooth lines); ``width`` pixels wide."""
    s = 2  # drawing scale
    degradations = list(results)
    with_lpips = results[degradations[0]]["bicubic"][sizes[0]]["lpips"] is not None
    rows = [("psnr_gain", "PSNR gain over bicubic (dB)", "psnr_gain_se")]
    if with_lpips:
        rows.append(("lpips_gain", "LPIPS gain over bicubic (lower LPIPS: up)", None))
    cols = len(degradations)
    font, small, title_font = _font(13 * s), _font(11 * s), _font(14 * s)
    W = width * s
    pad, left, right, top_title, bottom = 10 * s, 62 * s, 12 * s, 24 * s, 40 * s
    header_h, legend_h = 26 * s, 30 * s
    panel_w = (W - 2 * pad) // cols
    panel_h = 250 * s
    H = header_h + len(rows) * panel_h + legend_h + pad
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 6 * s), header, fill="black", font=font)

    any_clipped = False
    lx0, lx1 = math.log(sizes[0]), math.log(sizes[-1])
    margin_x = 0.03 * (lx1 - lx0) if lx1 > lx0 else 0.1  # room for the end markers
    lx0, lx1 = lx0 - margin_x, lx1 + margin_x
    for r, (key, label, se_key) in enumerate(rows):
        vals = []
        for g in degradations:
            for m in models:
                for d in sizes:
                    v = results[g][m][d].get(key)
                    if v is not None:
                        se = results[g][m][d].get(se_key) if se_key else None
                        vals += [v - 2 * (se or 0), v + 2 * (se or 0)]
        lo, hi = min(vals + [0.0]), max(vals + [0.0])
        floor = (floors or {}).get(key)
        clipped = floor is not None and lo < floor
        if clipped:
            lo = floor
            any_clipped = True
        margin = 0.08 * max(hi - lo, 1e-3)
        ticks = nice_ticks(lo - margin, hi + margin)
        ylo, yhi = min(ticks[0], lo - margin), max(ticks[-1], hi + margin)
        if clipped:
            ticks = [t for t in ticks if t >= floor - 1e-9]
            ylo = floor
        for c, g in enumerate(degradations):
            x0 = pad + c * panel_w + left
            x1 = pad + (c + 1) * panel_w - right
            y0 = header_h + r * panel_h + top_title
            y1 = header_h + (r + 1) * panel_h - bottom

            def px(d, x0=x0, x1=x1):
                return x0 + (math.log(d) - lx0) / (lx1 - lx0) * (x1 - x0)

            def py(v, y0=y0, y1=y1):
                return y1 - (v - ylo) / (yhi - ylo) * (y1 - y0)

            draw.text((x0, y0 - 20 * s), f"degradation: {g}", fill="black", font=title_font)
            for t in ticks:  # y grid and labels
                y = py(t)
                draw.line((x0, y, x1, y), fill=(228, 228, 228), width=s)
                text = f"{t:g}"
                tw = draw.textlength(text, font=small)
                draw.text((x0 - 6 * s - tw, y - 7 * s), text, fill="black", font=small)
            last = -1e9
            for d in sizes:  # x ticks and labels (skipped where they would overlap)
                x = px(d)
                draw.line((x, y1, x, y1 + 4 * s), fill="black", width=s)
                text = str(d)
                tw = draw.textlength(text, font=small)
                if x - tw / 2 >= last + 4 * s:
                    draw.text((x - tw / 2, y1 + 6 * s), text, fill="black", font=small)
                    last = x + tw / 2
            xlabel = "face size d (px, log scale)"
            draw.text(((x0 + x1) / 2 - draw.textlength(xlabel, font=small) / 2, y1 + 22 * s),
                      xlabel, fill="black", font=small)
            marks = [(MODEL_INPUT_SIZE, "16 px: model input")]
            if max_face:
                marks.append((max_face, f"--max_face now ({max_face:g})"))
            for k, (d, text) in enumerate(marks):  # labels one under the other
                if sizes[0] <= d <= sizes[-1]:
                    _dashed(draw, px(d), y0, px(d), y1, (150, 150, 150), s, 4 * s)
                    draw.text((px(d) + 3 * s, y0 + (2 + 14 * k) * s), text,
                              fill=(110, 110, 110), font=small)
            draw.line((x0, py(0.0), x1, py(0.0)), fill="black", width=s)  # the zero line
            draw.rectangle((x0, y0, x1, y1), outline="black", width=s)
            # the curves, drawn on their own layer and cut to the panel (points below the
            # floor leave it; a triangle on the bottom edge marks each)
            layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
            ldraw = ImageDraw.Draw(layer)
            rr = 3 * s
            for k, m in enumerate(models):
                colour = COLOURS[k % len(COLOURS)]
                pts = [(px(d), py(results[g][m][d][key])) for d in sizes
                       if results[g][m][d].get(key) is not None]
                if len(pts) > 1:
                    ldraw.line(pts, fill=colour, width=2 * s, joint="curve")
                for d in sizes:
                    v = results[g][m][d].get(key)
                    if v is None:
                        continue
                    se = results[g][m][d].get(se_key) if se_key else None
                    if se:
                        ldraw.line((px(d), py(v - 2 * se), px(d), py(v + 2 * se)), fill=colour,
                                   width=s)
                    if v < ylo:
                        ldraw.polygon([(px(d) - 2 * rr, y1 - 2.5 * rr), (px(d) + 2 * rr,
                                       y1 - 2.5 * rr), (px(d), y1 - s)], fill=colour)
                    ldraw.ellipse((px(d) - rr, py(v) - rr, px(d) + rr, py(v) + rr), fill=colour)
            box = tuple(int(round(v)) for v in (x0, y0, x1, y1))
            part = layer.crop(box)
            img.paste(part, box[:2], part)
            # the row's y label, rotated, left of the first panel only
            if c == 0:
                lw = int(draw.textlength(label, font=small)) + 4
                tmp = Image.new("RGB", (lw, 16 * s), "white")
                ImageDraw.Draw(tmp).text((2, 0), label, fill="black", font=small)
                tmp = tmp.rotate(90, expand=True)
                img.paste(tmp, (pad, int((y0 + y1) / 2 - tmp.height / 2)))
    # the legend
    x = pad + left
    y = H - legend_h - pad // 2 + 6 * s
    entries = [(m, COLOURS[k % len(COLOURS)]) for k, m in enumerate(models)]
    for name, colour in entries:
        draw.line((x, y + 8 * s, x + 24 * s, y + 8 * s), fill=colour, width=2 * s)
        draw.ellipse((x + 9 * s, y + 5 * s, x + 15 * s, y + 11 * s), fill=colour)
        draw.text((x + 30 * s, y), name, fill="black", font=font)
        x += 30 * s + draw.textlength(name, font=font) + 20 * s
    note = "above 0: the model beats PIL bicubic from the same d-px face"
    if any(r[2] for r in rows):
        note += "; bars: +-2 standard errors"
    if any_clipped:
        note += "; triangles: off the scale below"
    draw.text((x + 10 * s, y + 1 * s), note, fill=(90, 90, 90), font=small)
    return img.resize((W // s, H // s), Image.LANCZOS)
