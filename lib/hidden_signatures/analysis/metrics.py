"""Metrics read off a trained crosscoder, as PAPER.md defines them, plus baselines.

Decoder metrics (relative norm, sharedness, alignment by CCA, shared-latent cosines,
latent classes, feature strengths), their null values (row permutation, the exact
Gaussian expectation), activation-space baselines (linear CKA, SVCCA) and Latent Scaling
(Minder et al. 2025). Plain functions on tensors; all arithmetic is float64 on the CPU
(inputs may live on any device). Shapes ride on names: N tokens, H latents, A/B the two
models' widths, K selected latents.

One import for the notebooks and the validation: the metrics live by family in decoder_norms,
similarity and latent_scaling.
"""

from .decoder_norms import (binary_entropy, feature_strengths, latent_classes,  # noqa: F401
                            permutation_null_sharedness, relative_norms, shared_cosines, sharedness)
from .latent_scaling import LatentScalingAccumulator, latent_scaling  # noqa: F401
from .similarity import (AUTO_REG, AUTO_REG_MIN_RATIO, MOMENT_CHUNK, AlignmentResult,  # noqa: F401
                         alignment, alignment_null_gaussian, linear_cka, permutation_null_alignment, svcca)
