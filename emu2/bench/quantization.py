"""`emu2 bench quantization [--model DIR|PRESET]`: LM weight memory and output agreement of quantized loading vs fp32.

A model directory, or one random model of a preset saved once, is loaded in fp32, bf16, torchao int8
weight-only, and with the official `load_in_8bit` / `load_in_4bit` keywords (bitsandbytes: LLM.int8, the fp4
that `load_in_4bit=True` gives, and nf4; without CUDA, bitsandbytes runs on its CPU backend). For each load:
bytes of the language model's decoder-layer weights (what quantization touches), the largest logit difference
from fp32 relative to the largest fp32 logit, and the share of positions whose next-token argmax equals fp32's
(and bf16's), over random token sequences. A load refused here is reported with its reason; when the refusal
names modules to keep unquantized, that load is measured as well. Prints JSON.
"""

from __future__ import annotations

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
def run(model: str = "shapes-large", sequences: int = 4, length: int = 64, seed: int = 0) -> dict:
    """``model``: a saved model directory, or a preset name (random weights, ``seed``)."""
    from pathlib import Path

    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoTokenizer, TorchAoConfig

    from ..eval.intervals import wilson_interval
    from ..model import Emu2ForCausalLM
    from ..model.quantization import QuantizationUnavailableError
    from ..pipelines.emu2 import Emu2Pipeline

    fp32 = {"dtype": torch.float32}
    loads = {"fp32": fp32, "bf16": {"dtype": torch.bfloat16},
             "int8 weight-only (torchao)": {**fp32, "quantization_config": TorchAoConfig(Int8WeightOnlyConfig())},
             "load_in_8bit (bitsandbytes LLM.int8)": {**fp32, "load_in_8bit": True},
             "load_in_4bit (bitsandbytes fp4)": {**fp32, "load_in_4bit": True},
             "load_in_4bit, nf4 (bitsandbytes)": {**fp32, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}
    with tempfile.TemporaryDirectory() as tmp:
        path = model if Path(model).is_dir() else tmp
        if path == tmp:
            Emu2Pipeline.from_preset(model, seed=seed).save_pretrained(tmp)
        models, refused = {}, {}
        for name, kwargs in loads.items():
            try:
                models[name] = Emu2ForCausalLM.from_pretrained(path, **kwargs)
            except QuantizationUnavailableError as error:  # e.g. this CPU's bitsandbytes kernel; the reason is kept
                refused[name] = {"refused": str(error)}
                if error.skip_modules:  # and the load its message suggests is measured too
                    skip = {"llm_int8_skip_modules": error.skip_modules}
                    models[f"{name}, {'/'.join(error.skip_modules)} kept unquantized"] = \
                        Emu2ForCausalLM.from_pretrained(path, **kwargs, **skip)
        special = set(AutoTokenizer.from_pretrained(path).added_tokens_decoder)  # the tokenizer only, no model
    # Text tokens only: image slots would need images, and the added tokens are few and special.
    text_ids = torch.tensor([i for i in range(models["fp32"].config.text_config.vocab_size) if i not in special])
    picks = torch.randint(0, len(text_ids), (sequences, length), generator=torch.Generator().manual_seed(seed))
    ids = text_ids[picks]
    logits = {name: loaded(ids).logits.float() for name, loaded in models.items()}
    reference, bf16 = logits["fp32"], logits["bf16"]
    report = {"model": model, "tokens": sequences * length}
    positions = reference.shape[0] * reference.shape[1]
    for name, loaded in models.items():
        agree = int((logits[name].argmax(-1) == reference.argmax(-1)).sum())
        agree_bf16 = int((logits[name].argmax(-1) == bf16.argmax(-1)).sum())
        report[name] = {
            "lm_layer_weights_MiB": round(lm_layer_bytes(loaded) / 2**20, 1),
            "max_logit_diff_rel": float((logits[name] - reference).abs().max() / reference.abs().max()),
            "argmax_agreement": agree / positions,
            "argmax_agreement_ci95": [round(v, 4) for v in wilson_interval(agree, positions)],
            "argmax_agreement_vs_bf16": agree_bf16 / positions,
            "argmax_agreement_vs_bf16_ci95": [round(v, 4) for v in wilson_interval(agree_bf16, positions)],
        }
    return {**report, **refused}
