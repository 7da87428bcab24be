r"""Progressive face super-resolution, 16x16 -> 128x128 (8x): the paper's full recipe.

    python -m progsr_jax.main --config=configs/step3.py --workdir=/runs/pfsr \
        [--config.data.root=/path/to/celeba] [--config.fan.checkpoint=/path/to/converted_fan]

Without ``data.root`` CelebA comes through TensorFlow Datasets (``celeb_a``,
downloaded and prepared on first use: ``pip install -e '.[tfds]'``); with it,
from an extracted CelebA folder (official or Kaggle layout).

Three stages, each doubling the output (32, 64, 128); a new stage's block is
faded in over ``fade_steps`` iterations.  The generator is trained with a
pixel loss, a VGG16 perceptual loss and a WGAN-GP critic at every stage, and
from stage 2 on with the heatmap and attention losses of the landmark network
(``fan.checkpoint``; without it those two terms are off).

Variants (``--config=configs/step3.py:<variant>``):

* ``paper`` (default): the numbers of the paper and the authors' code.
* ``cpu``: real faces from ``data.root`` on 2 CPU cores in about 30 minutes:
  a quarter-width G, batch 8, most iterations at 128x128 and the pixel loss
  alone (README, "Training on a CPU").
* ``cpu_real``: the ``cpu`` model and batch trained on realistically degraded
  inputs (``data.degradation.preset='mild'``, half of the images left clean),
  with Adam b1 0.9 at 2e-3, a cosine decay and 500 / 500 / 4,500 iterations:
  the checkpoint for real photos.
* ``demo``: the README's first command: built-in synthetic faces, a quarter-width
  G and the pixel loss, about 3 minutes on 2 CPU cores, ending above bicubic
  in PSNR and SSIM on held-out faces.
* ``smoke``: built-in synthetic faces, a sixteenth-width model and a few
  iterations per stage: every code path in a couple of minutes; for tests.

Degraded inputs (``data.degradation``, :mod:`progsr_jax.data.degradation`;
the presets are :data:`progsr_jax.data.degradation.PRESETS`).
``preset='none'`` (default) is the paper's clean chain, bit for bit.  Any other
preset makes each 16x16 input from the 128x128 image at batch time, drawn from
``(seed, step, position in the global batch)``: blur at 128 px, resize to 16
(through an optional intermediate size), noise, JPEG, an optional second
pass.  Every field below overrides the preset's value
(``--config.data.degradation.jpeg_quality=(40,90)``).  The presets' ranges,
taken from the published pipelines and scaled to a 16x16 face from a 128x128
one (blur sigmas in 128-px pixels; noise in grey levels of the small image):

================== ========================== ===============================
field              ``mild`` (GFPGAN [1])      ``real`` (Real-ESRGAN [2])
================== ========================== ===============================
blur_prob          1.0                        1.0
blur_kinds         iso 0.5, aniso 0.5         iso .45, aniso .25, gen. .15
blur_sigma         0.025-2.5 (0.1-10 at 512)  0.4-6 (0.2-3 at 4x, x2 for 8x)
blur_beta          -                          0.5-4 (generalised Gaussian)
resize_modes       chain/area/bilinear/bicubic area/bilinear/bicubic
resize_mid_prob    0                          0.9 (0.1 keeps the size)
resize_mid         -                          16-96 px (0.15-1.5 x HR, where
                                              the LR is HR/4: 0.6-6 x the LR)
noise_prob         1.0                        1.0
noise_sigma        0-20                       1-30
poisson_prob       0                          0.5, scale 0.05-3
gray_noise_prob    0                          0.4
jpeg_prob, quality 1.0, 60-100                1.0, 30-95
second_prob        0                          0.8: blur sigma 0.2-1.5 at the
                                              intermediate size, resize to 16,
                                              noise and JPEG again
clean_prob         0 (``cpu_real``: 0.5)      0
================== ========================== ===============================

BSRGAN [3] (isotropic sigma up to 2+0.2*sf, anisotropic lengths up to 4+sf
at scale factor sf: 3.6 / 12 for sf=8; noise 2-25; JPEG 30-95) brackets
the same ranges.  Not implemented: Real-ESRGAN's sinc filters and plateau
kernels, and its random order of the final resize and JPEG.
[1] Wang et al., GFPGAN, CVPR 2021 (options/train_gfpgan_v1.yml).
[2] Wang et al., Real-ESRGAN, ICCVW 2021 (options/train_realesrgan_x4plus.yml).
[3] Zhang et al., BSRGAN, ICCV 2021 (utils_blindsr.degradation_bsrgan).

Every field can be changed with ``--config.<field>=<value>``;
:mod:`progsr_jax.training.sr.config` checks them.
"""

import ml_collections

from progsr_jax.data import degradation
from progsr_jax.training.config import unknown_variant

# Per-stage loss weights of the authors' training code (PAPER_FACTS, "Losses").
PAPER_LOSS_WEIGHTS = {
    1: dict(pixel=10.0, perceptual=1e-2, adversarial=1.0, heatmap=0.0, attention=0.0),
    2: dict(pixel=10.0, perceptual=1e-2, adversarial=1.0, heatmap=50.0, attention=500.0),
    3: dict(pixel=10.0, perceptual=1e-3, adversarial=0.1, heatmap=50.0, attention=50.0),
}


def _pixel_loss_only(c):
    """No perceptual and no adversarial term at any stage (the critic is then skipped)."""
    for stage in (1, 2, 3):
        c.loss[f"stage{stage}"].perceptual = 0.0
        c.loss[f"stage{stage}"].adversarial = 0.0


def get_config(variant="paper"):
    placeholder = ml_collections.config_dict.placeholder
    c = ml_collections.ConfigDict()
    c.seed = 0

    # ---- schedule: 50k / 50k / 100k iterations of batch 16
    c.batch_size = 16  # global batch, split over all devices
    c.stage_steps = (50_000, 50_000, 100_000)
    c.start_stage = 1
    c.final_stage = 3
    c.fade_steps = 25_000  # alpha rises 0 -> 1 over this many iterations at stages 2 and 3

    # ---- optimiser: Adam(1e-3, betas (0, 0.99)) for G and for D
    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.b1 = 0.0
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.decay = "none"  # or "cosine": decay to 0 over the final stage (not in the paper)

    # ---- model
    c.model = ml_collections.ConfigDict()
    c.model.width = 1.0  # channel multiplier; 1.0 = paper (G 8,969,097 / D 8,065,537 params)
    c.model.d_width = placeholder(float)  # D's multiplier; None = width
    c.model.dtype = "float32"  # or "bfloat16": compute dtype; params and optimiser stay float32

    # ---- losses: G minimises sum_t weight_t * term_t with per-stage weights
    c.loss = ml_collections.ConfigDict()
    c.loss.pixel = "l1"  # 'l1' (authors' code) or 'mse' (paper text)
    c.loss.heatmap_norm = "own"  # 'own' or 'pfsr_code' (the authors' min/max quirk)
    c.loss.gp_weight = 10.0  # WGAN-GP
    c.loss.drift = 0.001  # critic's epsilon_drift * D(real)^2
    for stage, weights in PAPER_LOSS_WEIGHTS.items():
        c.loss[f"stage{stage}"] = ml_collections.ConfigDict(weights)

    # ---- landmark network for the heatmap and attention losses
    c.fan = ml_collections.ConfigDict()
    c.fan.checkpoint = placeholder(str)  # converted or distilled FAN folder

    # ---- data (progsr_jax.data.build_dataset)
    c.data = ml_collections.ConfigDict()
    c.data.source = "celeba"  # 'synthetic' | 'celeba' | 'folder' | 'tfds'
    c.data.root = placeholder(str)  # CelebA folder; None: CelebA through TFDS
    c.data.tfds_data_dir = placeholder(str)  # TFDS's data_dir; None: ~/tensorflow_datasets
    c.data.tfds_manual_dir = placeholder(str)  # None: <data_dir>/downloads/manual
    c.data.split = "train"
    c.data.cache_dir = placeholder(str)
    c.data.num_workers = -1  # decoding processes of the cache: -1: one per CPU core; 0: in-process
    # Processes that make the training batches (grain, docs/data.md): -1: auto (none for
    # clean inputs, half the CPU cores for degraded ones); 0: in-process.
    c.data.workers = -1
    c.data.strict = False  # True: any unreadable image is an error instead of a skip
    c.data.min_size = 32
    c.data.max_images = placeholder(int)
    c.data.num_synthetic = 2048
    c.data.prefetch = 2  # batches made ahead per worker, and ready on the devices
    # 16x16 inputs: 'none' = the paper's clean chain; 'mild' / 'real' = degraded on the
    # fly (module docstring); every field overrides the preset's value.
    c.data.degradation = degradation.config_fields("none")

    # ---- validation (progsr_jax.training.sr.validation): PSNR/SSIM of the model
    # and of bicubic on held-out faces (CelebA's validation partition, other
    # synthetic seeds, or the images under val.root for a folder source)
    c.eval_every = 5_000  # and at the end of every stage
    c.val = ml_collections.ConfigDict()
    c.val.num_images = 256  # 0: no validation
    c.val.batch_size = 32
    c.val.root = placeholder(str)  # held-out images for data.source='folder'

    # ---- outputs
    c.init_from = placeholder(str)  # converted official checkpoint to start from
    c.log_every = 100
    c.checkpoint_every = 5_000
    c.sample_every = 5_000
    c.keep_checkpoints = 3
    c.num_samples = 8

    if variant == "paper":
        return c
    if variant == "smoke":
        c.data.source = "synthetic"
        c.data.num_synthetic = 256
        c.model.width = 0.0625
        c.batch_size = 4
        c.stage_steps = (24, 12, 8)
        c.fade_steps = 6
        c.log_every = 4
        c.checkpoint_every = 12
        c.sample_every = 12
        c.num_samples = 4
        c.eval_every = 12
        c.val.num_images = 8
        c.val.batch_size = 8
        return c
    if variant in ("cpu", "cpu_real"):
        # Within this budget the critic and the VGG pass each cost more compute
        # than G itself, and the adversarial term costs PSNR/SSIM (measured: with
        # weight 0.01 and an eighth-width D the same budget ended 0.5 dB *below*
        # bicubic), so both are off; a zero adversarial weight also skips the
        # critic's update.
        c.model.width = 0.25
        c.model.d_width = 0.125
        c.batch_size = 8
        c.stage_steps = (500, 500, 2000)
        c.fade_steps = 200
        _pixel_loss_only(c)
        c.log_every = 50
        c.checkpoint_every = 500
        c.sample_every = 500
        c.eval_every = 500
        c.val.num_images = 240
        if variant == "cpu_real":
            # Chosen on CelebA val files 0-239 among 11 variants (preset mild/real,
            # with/without the second pass, clean share 0.25/0.35/0.5, lr 1e-3/2e-3/
            # 3e-3; README, "Training on realistic degradations"): GFPGAN-like mild
            # degradations on half the faces, Adam with momentum and a cosine decay
            # (as ``demo``), and a longer final stage: 17 minutes on 2 idle cores.
            c.stage_steps = (500, 500, 4500)
            c.optim.lr = 2e-3
            c.optim.b1 = 0.9
            c.optim.decay = "cosine"
            c.data.degradation.preset = "mild"
            c.data.degradation.clean_prob = 0.5
        return c
    if variant == "demo":
        # Learns the built-in faces in about 3 minutes on 2 CPU cores (the README's
        # first command) and ends above bicubic at 128x128.  The ``cpu`` recipe's
        # choices (pixel loss alone, no critic, a quarter-width G) with short
        # stages 1-2, most iterations at 128x128, Adam with momentum (b1 0.9) at
        # 2e-3 and a cosine decay over stage 3.  Measured (validation on 64
        # held-out faces): PSNR 24.15 dB against bicubic's 22.94, SSIM 0.652
        # against 0.646; with the paper's b1 = 0 and no decay the same budget
        # stays below bicubic (22.6 dB).
        c.data.source = "synthetic"
        c.data.num_synthetic = 1024
        c.model.width = 0.25
        c.model.d_width = 0.0625
        c.batch_size = 8
        c.stage_steps = (40, 40, 640)
        c.fade_steps = 30
        _pixel_loss_only(c)
        c.optim.lr = 2e-3
        c.optim.b1 = 0.9
        c.optim.decay = "cosine"
        c.log_every = 20
        c.checkpoint_every = 720
        c.sample_every = 240
        c.eval_every = 240
        c.val.num_images = 64
        return c
    raise unknown_variant(variant, ("paper", "smoke", "cpu", "cpu_real", "demo"))
