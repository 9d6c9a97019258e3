"""FlowHN's Triton kernels and their PyTorch references: parallel-flow DeltaNet, the DeltaNet branch's short
convolution with SiLU, the LM head's softmax cross-entropy; import name flowhn_kernels."""

if __name__ == "kernels":
    # This folder is imported as `kernels` only where the repository root is on sys.path (python -m or pytest run
    # from the root). There it would shadow Hugging Face's `kernels` package, which transformers imports whenever it
    # is installed (transformers requires it from 5.25): load that package in its place where there is one; where
    # there is none this module stays empty, which transformers reads as the package not installed. Every checkout
    # of this repository on the path is passed over, not only this one: two of them (an A/B's trees) would
    # otherwise hand over to each other without end.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _path = [entry for entry in sys.path
             if not os.path.isfile(os.path.join(entry or os.curdir, "kernels", "delta_rule.py"))]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        sys.modules["kernels"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["kernels"])
else:
    from .cross_entropy import softmax_cross_entropy, softmax_cross_entropy_reference
    from .delta_rule import delta_rule, delta_rule_naive, delta_rule_reference, l2_normalize
    from .short_conv import causal_conv, short_conv_silu, short_conv_silu_reference

    __all__ = ["delta_rule", "delta_rule_reference", "delta_rule_naive", "l2_normalize", "short_conv_silu",
               "short_conv_silu_reference", "causal_conv", "softmax_cross_entropy", "softmax_cross_entropy_reference"]
