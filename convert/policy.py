"""Which GGML type each tensor gets: a policy keyed on tensor class (and, for recipes, on layer)."""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

from cascade_local.errors import UsageError

from .tensor_map import PlannedTensor, TensorClass

T = gguf.GGMLQuantizationType

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class TypePolicy:
    """Maps tensor classes to GGML types. Norms, router, conv and SSM scalars are always F32."""

    name: str
    file_type: gguf.LlamaFileType
    by_class: dict[TensorClass, gguf.GGMLQuantizationType]
    by_layer: dict[tuple[TensorClass, int], gguf.GGMLQuantizationType] = field(default_factory=dict)

    def type_for(self, tensor: PlannedTensor) -> gguf.GGMLQuantizationType:
        if tensor.cls is TensorClass.F32_ONLY or len(tensor.shape) == 1:
            return T.F32
        if tensor.layer is not None and (tensor.cls, tensor.layer) in self.by_layer:
            qtype = self.by_layer[(tensor.cls, tensor.layer)]
        else:
            qtype = self.by_class[tensor.cls]
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        if tensor.row_width % block_size:
            raise UsageError(
                f"{self.name}: {tensor.name} has rows of {tensor.row_width} values, which {qtype.name} "
                f"(blocks of {block_size}) cannot hold; choose a type with a block size dividing {tensor.row_width}"
            )
        return qtype

    @property
    def is_quantized(self) -> bool:
        return any(t not in FLOAT_TYPES for t in (*self.by_class.values(), *self.by_layer.values()))
