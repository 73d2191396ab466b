"""Quantized loading of the language model (official README: `load_in_4bit=True`; here any transformers
quantization config, tested on a CPU with torchao's int8 weight-only quantization and bitsandbytes' CPU
backend)."""

import pytest
import torch

from emu2.model import Emu2ForCausalLM
from emu2.model import quantization as Q
from emu2.pipelines.emu2 import Emu2Pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    Emu2Pipeline.from_preset("tiny", seed=0).save_pretrained(path)
    return path


def _int8_config():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _is_quantized(module) -> bool:
    return type(module.weight.data) is not torch.Tensor  # torchao swaps in a quantized tensor subclass


def test_only_the_language_model_layers_are_quantized(model_dir):
    """Vision tower, project_up/down and lm_head keep the load dtype; the LLaMA's decoder layers are quantized."""
    model = Emu2ForCausalLM.from_pretrained(model_dir, quantization_config=_int8_config())
    kept = [model.visual.blocks[0].mlp.fc1, model.visual.blocks[0].attn.proj, model.project_up, model.project_down,
            model.language_model.lm_head]
    assert not any(_is_quantized(m) for m in kept)
    layer = model.language_model.model.layers[0]
    assert all(_is_quantized(m) for m in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj))


def test_int8_model_logits_within_two_percent_and_same_greedy_answer(model_dir):
    """Tolerance: int8 per-channel weights (error <= 1/254 of each row's range) keep every logit within 2% of the
    largest logit; the greedy answer is the same."""
    full = Emu2ForCausalLM.from_pretrained(model_dir)
    quantized = Emu2ForCausalLM.from_pretrained(model_dir, quantization_config=_int8_config())
    pipe = Emu2Pipeline.from_pretrained(model_dir)
    batch = pipe.encode(["[<IMG_PLH>]a red circle"], images=[torch.zeros(3, 56, 56)])
    with torch.no_grad():
        want = full(batch["input_ids"], images=batch["images"]).logits
        got = quantized(batch["input_ids"], images=batch["images"]).logits
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    generate = dict(images=batch["images"], max_new_tokens=5, num_beams=1, do_sample=False)
    assert torch.equal(quantized.generate_text(batch["input_ids"], **generate),
                       full.generate_text(batch["input_ids"], **generate))


def test_own_skip_list_is_kept_and_extended(model_dir):
    config = _int8_config()
    config.modules_to_not_convert = ["language_model.model.layers.0"]
    model = Emu2ForCausalLM.from_pretrained(model_dir, quantization_config=config)
    assert not _is_quantized(model.language_model.model.layers[0].mlp.up_proj)
    assert _is_quantized(model.language_model.model.layers[1].mlp.up_proj) and not _is_quantized(model.project_up)


def test_official_load_in_4bit_becomes_a_bitsandbytes_config(monkeypatch):
    """The official demo: from_pretrained(..., load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)."""
    monkeypatch.setattr(Q, "_check_bitsandbytes", lambda: None)
    kwargs = Q.quantization_kwargs({"load_in_4bit": True, "bnb_4bit_compute_dtype": torch.float16, "dtype": "auto"})
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_compute_dtype == torch.float16 and kwargs["dtype"] == "auto"
    assert set(Q.UNQUANTIZED_MODULES) <= set(config.llm_int8_skip_modules)


def test_load_in_4bit_without_bitsandbytes_says_what_to_install(model_dir, monkeypatch):
    monkeypatch.setattr(Q.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(Q.QuantizationUnavailableError, match="pip install bitsandbytes"):
        Emu2Pipeline.from_pretrained(model_dir, load_in_4bit=True)


def test_load_in_8bit_without_cuda_and_an_old_bitsandbytes_says_to_upgrade(model_dir, monkeypatch):
    monkeypatch.setattr(Q.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.45.0")
    with pytest.raises(Q.QuantizationUnavailableError, match="bitsandbytes >= 0.50.*0.45.0 is installed"):
        Emu2ForCausalLM.from_pretrained(model_dir, load_in_8bit=True)


def _bitsandbytes_logits(model_dir, **load):
    """Logits of one image+text prompt, full precision and loaded with the official ``load_in_*`` keywords."""
    pytest.importorskip("bitsandbytes")
    full = Emu2ForCausalLM.from_pretrained(model_dir)
    quantized = Emu2ForCausalLM.from_pretrained(model_dir, **load)
    batch = Emu2Pipeline.from_pretrained(model_dir).encode(["[<IMG_PLH>]a red circle"],
                                                           images=[torch.zeros(3, 56, 56)])
    with torch.no_grad():
        want = full(batch["input_ids"], images=batch["images"]).logits
        got = quantized(batch["input_ids"], images=batch["images"]).logits
    return full, quantized, batch, want, got


def test_official_load_in_4bit_runs_on_a_cpu_and_quantizes_only_the_language_model_layers(model_dir):
    """Tolerance: nf4 stores each weight as one of 16 levels scaled by its 64-weight block's largest magnitude,
    so a weight moves by up to about 1/10 of that magnitude; on the tiny model the logits then stay within 35 %
    of the largest logit (measured 17 %; the same preset with another seed is 159 % away)."""
    from bitsandbytes.nn import Linear4bit

    _, model, _, want, got = _bitsandbytes_logits(model_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    layer = model.language_model.model.layers[0]
    assert all(isinstance(m, Linear4bit) for m in (layer.self_attn.q_proj, layer.mlp.gate_proj, layer.mlp.down_proj))
    kept = [model.visual.blocks[0].mlp.fc1, model.project_up, model.project_down, model.language_model.lm_head]
    assert not any(isinstance(m, Linear4bit) for m in kept)
    assert (got - want).abs().max() <= 0.35 * want.abs().max()


def test_official_load_in_8bit_runs_on_a_cpu_with_the_same_greedy_answer(model_dir):
    """Tolerance: LLM.int8 rounds each weight row to 1/254 of its range, and each activation row too, so the
    logits stay within 3 % of the largest logit (measured 1.5 %)."""
    full, model, batch, want, got = _bitsandbytes_logits(model_dir, load_in_8bit=True)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    generate = dict(images=batch["images"], max_new_tokens=5, num_beams=1, do_sample=False)
    assert torch.equal(model.generate_text(batch["input_ids"], **generate),
                       full.generate_text(batch["input_ids"], **generate))


def test_the_quantization_benchmark_reports_every_load_against_fp32(model_dir):
    pytest.importorskip("torchao")
    pytest.importorskip("bitsandbytes")
    from emu2.bench.quantization import run

    report = run(str(model_dir), sequences=1, length=8)
    loads = [k for k in report if isinstance(report[k], dict)]
    assert len(loads) == 6 and report["fp32"]["argmax_agreement"] == 1.0
    assert report["fp32"]["max_logit_diff_rel"] == 0.0
    assert report["load_in_4bit, nf4 (bitsandbytes)"]["lm_layer_weights_MiB"] < report["fp32"]["lm_layer_weights_MiB"] / 4


def test_4bit_layers_this_cpus_bitsandbytes_kernel_cannot_run_are_refused_at_load_time_with_their_names(monkeypatch):
    """bitsandbytes' AVX512-BF16 CPU kernel packs 4-bit weights in blocks of 32 output rows and 64 inputs and
    fails at the first forward otherwise; the quickstart LLaMA's 688-wide MLP is such a layer."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: True)
    with pytest.raises(Q.QuantizationUnavailableError, match=r"multiples of 32.*1 quantized layers.*first: 1\)"):
        Q.check_loaded(torch.nn.Sequential(Linear4bit(64, 64), Linear4bit(64, 40)))  # 40 outputs
    model = torch.nn.Sequential(torch.nn.Sequential(Linear4bit(64, 96), Linear4bit(96, 64)))  # 96 inputs
    with pytest.raises(Q.QuantizationUnavailableError, match=r"first: 0\.1\).*llm_int8_skip_modules=\['1'\]") as error:
        Q.check_loaded(model)
    assert error.value.skip_modules == ["1"]  # what the benchmark loads instead
    Q.check_loaded(torch.nn.Sequential(Linear4bit(64, 64)))
