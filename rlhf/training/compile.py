"""Regional compilation: torch.compile each transformer block in place.

Every block of a model runs the same code, so one compilation serves all of them (far quicker than compiling the
whole model), and the module tree, its parameter names and its checkpoints stay as they are. On a GPU, fusing the
many small kernels of a block is what lifts a small model's step out of launch overhead (docs/benchmarks.md).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from rlhf.training.models import decoder_layers


def compile_blocks(model: PreTrainedModel) -> int:
    """Compile each transformer block of `model` (a PEFT wrapper too) in place; the number of blocks."""
    _, layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
