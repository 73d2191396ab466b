"""`emu2 bench image-regression`: the official recompute algorithm against our KV-cached regression.

Both run on the same random model and prompts in one process. The official `generate_image` re-runs the whole
sequence (prompt + [IMG] + k regressed slots) for each of the n_query embeddings (official-format 6.3); ours
prefills once and then takes one single-token step per embedding.
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig

from ..config import Emu2Config, Emu2VisionConfig
from ..model import Emu2ForCausalLM


@torch.no_grad()
def official_recompute_regression(model: Emu2ForCausalLM, input_ids: torch.Tensor,
                                  image_features: torch.Tensor | None = None) -> torch.Tensor:
    """The official algorithm, pass by pass: ``input_ids (1, P)`` -> ``(1, n_query, Dv)``.

    Pass k runs the LM without a cache over P + [IMG] + k slots, whose inputs are ``project_up`` of the previous
    pass's outputs, and keeps ``project_down`` of the last k + 1 hidden states.
    """
    cfg = model.config
    decoder = model.language_model.get_decoder()
    prompt = model.embed(input_ids, image_features)
    boi = model.get_input_embeddings()(torch.tensor([[cfg.boi_token_id]], device=input_ids.device))
    previous = prompt.new_zeros(1, 0, cfg.vision_config.width)
    for k in range(cfg.n_query):
        generated = model.project_up(previous[:, :k])  # the k slots regressed so far
        sequence = torch.cat([prompt, boi, generated], dim=1)
        hidden = decoder(inputs_embeds=sequence, use_cache=False).last_hidden_state
        previous = model.project_down(hidden[:, -(k + 1):])
    return previous


def bench_config() -> Emu2Config:
    """The benchmarks' model: the ``tiny`` preset (vocabulary, special ids) widened to a 512-wide, 8-layer LLaMA,
    with a small ViT and n_query = 64."""
    text = Emu2Config.from_preset("tiny").text_config.to_dict()
    text.update(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, head_dim=64)
    return Emu2Config(
        vision_config=Emu2VisionConfig(image_size=64, patch_size=8, width=256, layers=2, head_width=64, mlp_ratio=4.0),
        text_config=LlamaConfig.from_dict(text), n_query=64, v_query=16,
    )


def bench_model(seed: int = 0) -> Emu2ForCausalLM:
    """A random model of `bench_config`."""
    torch.manual_seed(seed)
    return Emu2ForCausalLM(bench_config()).eval()


def _prompt(model, length: int, shots: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``length`` ids: BOS, then ``shots`` x ([IMG] + n_query slots + [/IMG] + text), then text; with features."""
    g = torch.Generator().manual_seed(length)
    cfg = model.config
    ids = [1]
    if shots:
        text_per_shot = (length - 1) // shots - (cfg.n_query + 2)
        for _ in range(shots):
            ids += [cfg.boi_token_id] + [cfg.image_token_id] * cfg.n_query + [cfg.eoi_token_id]
            ids += torch.randint(3, 32000, (text_per_shot,), generator=g).tolist()
    ids += torch.randint(3, 32000, (length - len(ids),), generator=g).tolist()
    if not shots:
        return torch.tensor([ids]), None
    pixels = torch.randn(shots, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    with torch.no_grad():
        return torch.tensor([ids]), model.encode_image(pixels)


def _time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(lengths=(64, 256, 1024), repeats: int = 2) -> dict:
    model = bench_model()
    results = {"model": {"hidden": 512, "layers": 8, "n_query": model.config.n_query,
                         "threads": torch.get_num_threads()}, "by_prompt_length": {}}
    for length in lengths:
        # The longest prompt is few-shot-like: 12 images of n_query slots with a little text each.
        ids, feats = _prompt(model, length, shots=12 if length >= 12 * (model.config.n_query + 2) else 0)
        recompute_s, reference = _time(lambda: official_recompute_regression(model, ids, feats), max(1, repeats - 1))
        cached_s, ours = _time(lambda: model.regress_image_embeddings(ids, image_features=feats), repeats)
        results["by_prompt_length"][str(ids.shape[1])] = {
            "recompute_s": round(recompute_s, 4), "kv_cache_s": round(cached_s, 4),
            "speedup": round(recompute_s / cached_s, 2),
            "max_abs_diff": float((reference - ours).abs().max()),
            "prompt_images": 0 if feats is None else feats.shape[0],
        }
    longest = results["by_prompt_length"][str(max(int(k) for k in results["by_prompt_length"]))]
    results.update({k: longest[k] for k in ("recompute_s", "kv_cache_s", "speedup", "max_abs_diff")})
    return results
