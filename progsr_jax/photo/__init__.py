"""Faces in real photos: detection, alignment to the CelebA template, paste-back.

* :mod:`~progsr_jax.photo.mtcnn`: MTCNN's three networks in Flax, with the
  weights that the ``facenet-pytorch`` 2.6.0 wheel ships
  (``pip install --no-deps facenet-pytorch==2.6.0``; never imported).
* :mod:`~progsr_jax.photo.detection`: the MTCNN cascade;
  ``photo.detect(img) -> list[Face]`` (box, five landmarks, score).
* :mod:`~progsr_jax.photo.align`: the similarity transform onto the
  aligned-CelebA template (178x218) and the model's input from it.
* :mod:`~progsr_jax.photo.paste`: warping 128x128 results back into the
  upscaled photo with a feathered mask.
* :mod:`~progsr_jax.photo.restoration`: the whole pipeline on one photo,
  ``photo.restore(sr, img) -> (restored, faces)``; ``python -m progsr_jax.infer --mode=photo``
  runs it on files and folders.
* :mod:`~progsr_jax.photo.folders`: the file side of ``infer``: output
  planning, photos opened upright (EXIF), the photo loop and ``faces.json``.

    from progsr_jax import inference, photo
    faces = photo.detect(img)                    # [Face(box, landmarks, score)]
    sr = inference.load("/runs/pfsr")
    restored, faces = photo.restore(sr, img, upscale="auto")
"""

from progsr_jax.photo.detection import Detector, Face, detect
from progsr_jax.photo.restoration import Restoration, RestoredFace, restore, restore_photo

__all__ = ["Detector", "Face", "Restoration", "RestoredFace", "detect", "restore", "restore_photo"]
