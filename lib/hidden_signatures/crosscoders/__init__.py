"""The crosscoders: the paper's ReLU + L1 crosscoder and its variants, their fused step, training and evaluation.

Importing the package registers every architecture in `crosscoder.ARCHITECTURES` (relu_l1 in
crosscoder.py, batchtopk and dfc in their own modules, which import the registry, never the reverse).
"""

from . import batchtopk, dfc  # noqa: F401  (register batchtopk and dfc)
