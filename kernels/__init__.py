"""FlowHN's Triton kernels and their PyTorch references: parallel-flow DeltaNet, the LM head's softmax
cross-entropy; import name flowhn_kernels."""

from .cross_entropy import softmax_cross_entropy, softmax_cross_entropy_reference
from .delta_rule import delta_rule, delta_rule_naive, delta_rule_reference

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_naive", "softmax_cross_entropy",
           "softmax_cross_entropy_reference"]
