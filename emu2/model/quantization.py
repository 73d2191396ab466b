"""Quantized loading of the language model through transformers' quantization configs.

    Emu2ForCausalLM.from_pretrained(path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))  # CPU or GPU
    Emu2Pipeline.from_pretrained(path, load_in_4bit=True)   # the official README's call: bitsandbytes (CUDA or CPU)

``load_in_4bit`` / ``load_in_8bit`` (with the official demo's ``bnb_4bit_compute_dtype`` and any other
``bnb_4bit_*`` / ``llm_int8_*`` keyword) become a `transformers.BitsAndBytesConfig`, as transformers 4.31 did
for the official code. Any other transformers quantization config is passed through.

Only the LLaMA's decoder layers are quantized: the vision tower, ``project_up`` / ``project_down`` and
``lm_head`` stay in the load dtype (`UNQUANTIZED_MODULES`, added to the config's skip list). The official demo
(``--chat-quantize``) loads the whole HF model with ``load_in_4bit``, vision tower included; keeping the vision
tower (4B of 37B parameters) and the heads unquantized is a deliberate difference that costs little memory and keeps the image
features and the regressed embeddings at full precision.
"""

from __future__ import annotations

import importlib.util

# Module-name prefixes transformers' quantizers leave as they are (matched at module boundaries).
UNQUANTIZED_MODULES = ["visual", "project_up", "project_down", "language_model.lm_head"]
_BNB_PREFIXES = ("bnb_4bit_", "llm_int8_")
# Without CUDA, bitsandbytes' 4-bit and 8-bit layers run on its CPU backend; this is the oldest release tested so.
BITSANDBYTES_ON_CPU = "0.50"


class QuantizationUnavailableError(ImportError):
    """The requested quantization backend cannot run here; the message says what to install or use instead.

    ``skip_modules``: when set, module names that, given as ``llm_int8_skip_modules``, make the load work here."""

    def __init__(self, message: str, skip_modules: list[str] | None = None):
        super().__init__(message)
        self.skip_modules = skip_modules


def quantization_kwargs(kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments with ``load_in_4bit``/``load_in_8bit`` turned into a
    ``quantization_config`` and `UNQUANTIZED_MODULES` added to that config's skip list (``kwargs`` is not
    modified). Raises `QuantizationUnavailableError` for bitsandbytes when it is missing or, without CUDA, too old."""
    kwargs = dict(kwargs)
    load_in_4bit, load_in_8bit = kwargs.pop("load_in_4bit", False), kwargs.pop("load_in_8bit", False)
    bnb_options = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith(_BNB_PREFIXES)}
    config = kwargs.get("quantization_config")
    if load_in_4bit or load_in_8bit or bnb_options:
        if config is not None:
            raise ValueError("pass either quantization_config or load_in_4bit/load_in_8bit (bnb_*), not both")
        if load_in_4bit and load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive")
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit, **bnb_options)
    if config is None:
        return kwargs
    if type(config).__name__ == "BitsAndBytesConfig":
        _check_bitsandbytes()
    attribute = "llm_int8_skip_modules" if hasattr(config, "llm_int8_skip_modules") else "modules_to_not_convert"
    skipped = list(getattr(config, attribute, None) or [])
    setattr(config, attribute, skipped + [m for m in UNQUANTIZED_MODULES if m not in skipped])
    kwargs["quantization_config"] = config
    return kwargs


def _check_bitsandbytes() -> None:
    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            "load_in_4bit/load_in_8bit use bitsandbytes, which is not installed: `pip install bitsandbytes` "
            "(or `pip install emu2[quant]`); it runs on a CUDA GPU and, from 0.50, on a CPU")
    if torch.cuda.is_available():
        return
    from importlib.metadata import version

    from packaging.version import Version

    installed = version("bitsandbytes")
    if Version(installed) < Version(BITSANDBYTES_ON_CPU):
        raise QuantizationUnavailableError(
            f"load_in_4bit/load_in_8bit without a CUDA GPU need bitsandbytes >= {BITSANDBYTES_ON_CPU} (its CPU "
            f"backend) and {installed} is installed: `pip install -U bitsandbytes`; or use "
            "quantization_config=TorchAoConfig(Int8WeightOnlyConfig())")


def check_loaded(model) -> None:
    """Refuse, at load time, 4-bit layers that bitsandbytes cannot run on this CPU.

    With AVX512-BF16, bitsandbytes' CPU backend repacks each 4-bit weight for its fused kernel at the first
    forward, in blocks of 32 output rows and of the quantization block (64) along the input, and fails on any
    other size. The quickstart's LLaMA (MLP width 688) has such layers; the message names them and what loads
    instead."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    from bitsandbytes.nn import Linear4bit

    odd = [name for name, module in model.named_modules()
           if isinstance(module, Linear4bit) and module.weight.device.type == "cpu"
           and (module.out_features % 32 or module.in_features % module.weight.blocksize)]
    if not odd:
        return
    from bitsandbytes.functional import has_avx512bf16

    if has_avx512bf16():
        skip = sorted({name.rsplit(".", 1)[-1] for name in odd})
        raise QuantizationUnavailableError(
            f"bitsandbytes' 4-bit kernel on this CPU (AVX512-BF16) needs output sizes that are multiples of 32 and "
            "input sizes that are multiples of its block size (64), and "
            f"{len(odd)} quantized layers are not (first: {odd[0]}); keep them unquantized with "
            f"llm_int8_skip_modules={skip}, or load with "
            "load_in_8bit=True or torchao's quantization_config=TorchAoConfig(Int8WeightOnlyConfig())", skip)
