"""flowhn-train with FSDP2 on CPU processes (gloo), for tests: `python -m training.fsdp_on_cpu ARGS`.

Accelerate turns FSDP on only for GPUs and other accelerators; on CPU it quietly sets up plain data parallel
(MULTI_CPU), which flowhn-train refuses when the launch config asks for FSDP. PyTorch's FSDP2 itself runs on
CPU, so this entry point marks Accelerate's state as FSDP once Accelerate has set it up, and CI covers the FSDP2
path (sharded parameters, sharded checkpoints, their export) without a GPU. Launch it like training.pretrain:

    ACCELERATE_USE_CPU=true accelerate launch --config_file training/configs/fsdp2.yaml --num_processes 2 \\
        -m training.fsdp_on_cpu --preset tiny --mixed-precision no
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from training import pretrain

_accelerator_state_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # AcceleratorState copies PartialState's fields on every construction, so both must say FSDP.
        PartialState().distributed_type = self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.exit(pretrain.main())
