"""Parallel-flow DeltaNet kernels (Triton) and their PyTorch references; import name flowhn_kernels."""

from .delta_rule import delta_rule, delta_rule_naive, delta_rule_reference

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_naive"]
