"""A quantized frozen base for LoRA runs: int8 weights with one scale per output channel.

A LoRA run trains a few million adapter weights on top of billions of frozen ones, and the frozen
ones are most of its memory: 8 GB for FLUX.2 klein 4B and 12 GB for Z-Image 6B in bf16. Stored as
int8 (symmetric, absmax per output row) they take half of that, so the larger families train on a
24 GB card. Each matmul dequantizes its layer's weight on the fly (one layer at a time in the
compute dtype), the LoRA branches stay in fp32, and gradients flow to the input as before.

The same layer is the base for the bank-free prior (adapters off): the class prompt's target is
then the quantized base's prediction, consistent with what the adapters were trained against.
Saved adapters do not depend on it: they load onto the full-precision base like any others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "int8")
INT8_MAX = 127


class Int8Linear(nn.Module):
    """A frozen :class:`torch.nn.Linear` whose weight is stored as int8 rows with fp scales."""

    quantized_weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        scale = weight.abs().amax(dim=1).float().clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        quantized = torch.round(weight.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.register_buffer("quantized_weight", quantized)
        self.register_buffer("scale", scale.to(weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (built on demand; for code that reads a base layer's weight)."""
        return self.quantized_weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight.to(inputs.dtype) * self.scale.to(inputs.dtype)[:, None]
        bias = None if self.bias is None else self.bias.to(inputs.dtype)
        return F.linear(inputs, weight, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_frozen_linears(module: nn.Module) -> int:
    """Replace every frozen linear layer of ``module`` with an :class:`Int8Linear`, in place.

    A layer wrapped by a LoRA adapter has its ``base_layer`` replaced; trainable layers (the adapters,
    or anything a full fine-tune trains) are left alone. Returns how many layers were quantized.
    """
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad:
                setattr(parent, name, Int8Linear(child))
                replaced += 1
    return replaced


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module`` as it is stored."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)
