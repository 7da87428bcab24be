"""Faces in video files: ``python -m progsr_jax.infer --mode=video`` (docs/video.md).

Built on :mod:`progsr_jax.photo` (detection, alignment, paste-back) and the one
batched inference path (:func:`progsr_jax.inference.batching.super_resolve`); needs PyAV
(``pip install 'progsr_jax[video]'``), whose wheels carry FFmpeg's libraries.

* :mod:`~progsr_jax.video.streams`: reading (upright frames, timestamps, the
  audio packets) and writing (temporary file, audio copied, rotation, codecs)
  with PyAV; one-line errors for files that are not readable videos.
* :mod:`~progsr_jax.video.tracking`: faces linked into tracks, followed
  between detections by registration, scene cuts.
* :mod:`~progsr_jax.video.smoothing`: the smoothed alignment (detections and
  frame-to-frame motions fused over a bounded two-sided window), the
  motion-gated combination of a track's restored faces, hysteresis and
  crossfades.
* :mod:`~progsr_jax.video.restoration`: the streaming loop,
  ``VideoRestorer.push(frame) -> finished frames``.
* :mod:`~progsr_jax.video.outputs`: the command's files (the video,
  ``tracks.json``, per-track clips), written atomically.

    from progsr_jax import inference
    from progsr_jax.photo import detection
    from progsr_jax.video import outputs, restoration

    options = restoration.VideoOptions(upscale=2.0)
    planned = outputs.plan("in.mp4", "out.mp4", options)
    outputs.restore_video(inference.load("/runs/pfsr"), detection.Detector(min_face=10),
                          planned, options)
"""
