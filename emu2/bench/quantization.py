"""`python -m emu2.bench.quantization`: LM weight memory and output agreement of quantized loading vs fp32.

One random model of a preset is saved once and loaded in fp32, bf16 and torchao int8 weight-only (the CPU
backend of `emu2.model.quantization`). For each load: bytes of the language model's decoder-layer weights (what
quantization touches), the largest logit difference from fp32 relative to the largest fp32 logit, and the share
of positions whose next-token argmax equals fp32's, over random token sequences. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch


def _storage_bytes(tensor: torch.Tensor) -> int:
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.nelement() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()  # a quantized tensor subclass: count its inner tensors
    return sum(_storage_bytes(getattr(tensor, name)) for name in names)


def lm_layer_bytes(model) -> int:
    """Bytes of the weights inside the language model's decoder layers."""
    return sum(_storage_bytes(p.data) for p in model.language_model.get_decoder().layers.parameters())


@torch.no_grad()
def run(preset: str = "shapes-large", sequences: int = 4, length: int = 64, seed: int = 0) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    from ..model import Emu2ForCausalLM
    from ..pipeline import Emu2Pipeline

    loads = {"fp32": {"dtype": torch.float32}, "bf16": {"dtype": torch.bfloat16},
             "int8 weight-only (torchao)": {"dtype": torch.float32,
                                            "quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}}
    with tempfile.TemporaryDirectory() as tmp:
        Emu2Pipeline.from_preset(preset, seed=seed).save_pretrained(tmp)
        models = {name: Emu2ForCausalLM.from_pretrained(tmp, **kwargs) for name, kwargs in loads.items()}
    vocab = models["fp32"].config.text_config.vocab_size
    ids = torch.randint(0, 32000 if vocab > 32000 else vocab, (sequences, length),
                        generator=torch.Generator().manual_seed(seed))
    logits = {name: model(ids).logits.float() for name, model in models.items()}
    reference = logits["fp32"]
    report = {"preset": preset, "tokens": sequences * length}
    for name, model in models.items():
        report[name] = {
            "lm_layer_weights_MiB": round(lm_layer_bytes(model) / 2**20, 1),
            "max_logit_diff_rel": float((logits[name] - reference).abs().max() / reference.abs().max()),
            "argmax_agreement": float((logits[name].argmax(-1) == reference.argmax(-1)).float().mean()),
        }
    return report


if __name__ == "__main__":
    print(json.dumps(run(*(sys.argv[1:2] or [])), indent=2))
