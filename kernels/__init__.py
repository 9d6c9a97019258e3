"""FlowHN's Triton kernels and their PyTorch references: parallel-flow DeltaNet, the DeltaNet branch's short
convolution with SiLU, the LM head's softmax cross-entropy; import name flowhn_kernels."""

from .cross_entropy import softmax_cross_entropy, softmax_cross_entropy_reference
from .delta_rule import delta_rule, delta_rule_naive, delta_rule_reference, l2_normalize
from .short_conv import causal_conv, short_conv_silu

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_naive", "l2_normalize", "short_conv_silu", "causal_conv",
           "softmax_cross_entropy", "softmax_cross_entropy_reference"]
