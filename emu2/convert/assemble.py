"""The stage-1 starting point (paper Table 5, "init."): EVA-CLIP's visual tower + a LLaMA + random projections.

    emu2 init --preset emu2 --vision EVA02_CLIP_E_psz14_plus_s9B.pt --llm llama-30b-hf --out checkpoints/emu2-init

writes an emu2 model directory (config.json, safetensors shards + index, tokenizer) that `Emu2Pipeline.from_pretrained`
and the stage-1 recipe's ``model.init_from`` load. Three sources:

* ``vision``: an EVA-CLIP release as open_clip saves it (``visual.*`` tower, ``text.*`` tower, ``logit_scale``),
  .safetensors or a torch file read with ``weights_only``. Only the visual trunk is kept: it is named as the
  official Emu2 ``visual.*`` (`emu2.convert.official.official_key`); the CLIP head, final norm and text tower are
  dropped and listed. The image size follows the checkpoint's position grid (224 px for EVA-02-CLIP-E-plus);
  ``emu2-stage1-448`` interpolates it to 448 (`emu2.train.model.resize_position_embedding`).
* ``llm``: a local Hugging Face LLaMA folder (config.json + safetensors, sharded with an index or not). Its sizes
  must equal the preset's text config. Emu2 appends its special tokens ([PAD], [IMG], [/IMG], <image>, grounding
  and coordinate tokens, and [USER]/[ASSISTANT] for instruct presets; `emu2.processing.SPECIAL_TOKENS`) after the
  LLaMA vocabulary, so ``embed_tokens`` and ``lm_head`` gain rows. Each new row is the mean of the existing rows:
  a new input token starts as an "average word", and a new output row gives the token the average logit, so the
  LLaMA's next-token distribution over its own vocabulary is not disturbed before training (random rows of the
  usual 0.02 scale would be ~10x larger than LLaMA's embeddings and skew the softmax).
* ``project_up`` / ``project_down``: random, drawn as `Emu2ForCausalLM`'s own init (normal, std 0.02) with ``seed``.

Memory: the model is built on the meta device only for its key names and shapes. Output shards are written one at
a time, each tensor read on demand (safetensors through ``safe_open``, torch files memory-mapped), so the peak is
about one output shard, not the 37B-parameter model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import Emu2Config
from .official import CheckpointMismatchError, official_key

# LLaMA config fields that fix the weights' shapes or the numerics; each must equal the preset's.
LLM_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
              "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id")
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.model", "tokenizer.json")
_RESIZED = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


class AssemblyError(ValueError):
    """Sources that do not fit the chosen preset; the message names what differs and how to fix it."""


@dataclass
class AssemblyReport:
    """What `assemble_init` wrote and what it left out of the sources."""

    out: Path
    image_size: int  # of the vision checkpoint's position grid
    new_token_rows: int  # rows appended to embed_tokens and lm_head (mean-initialised)
    tokenizer_from: str
    dropped_visual: list[str] = field(default_factory=list)  # visual.* tensors our trunk has no place for
    dropped_other: dict[str, int] = field(default_factory=dict)  # other CLIP parts: top-level name -> tensors

    def summary(self) -> str:
        other = ", ".join(f"{k}.* ({n})" if n > 1 else k for k, n in sorted(self.dropped_other.items()))
        return "\n".join([
            f"wrote {self.out}",
            f"  vision: {self.image_size} px; dropped visual tensors: {', '.join(self.dropped_visual) or 'none'}",
            f"  dropped non-visual CLIP tensors: {other or 'none'}",
            f"  tokenizer from {self.tokenizer_from}; {self.new_token_rows} embedding rows added (mean of the rest)",
            "  project_up / project_down: random",
        ])


class _LazyTensors:
    """Tensors of weight files, each read when asked for (safetensors via safe_open, torch files mmap-ed)."""

    def __init__(self, files: list[Path]):
        self._source: dict[str, object] = {}
        for path in files:
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt")
                self._source.update(dict.fromkeys(handle.keys(), handle))
            else:
                state = _torch_state_dict(path)
                self._source.update(dict.fromkeys(state, state))
        self.names = list(self._source)

    def __getitem__(self, key: str) -> torch.Tensor:
        source = self._source[key]
        return source.get_tensor(key) if hasattr(source, "get_tensor") else source[key]

    def shape(self, key: str) -> tuple[int, ...]:
        source = self._source[key]
        return tuple(source.get_slice(key).get_shape() if hasattr(source, "get_slice") else source[key].shape)


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a released .pt/.bin is never unpickled beyond tensors and containers.
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # pre-1.6 (non-zip) files cannot be memory-mapped: read whole
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "module"):  # training checkpoints nest the weights
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _weight_files(path: Path, what: str) -> list[Path]:
    """One weight file, or a folder's files (through its ``*.index.json`` when sharded)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: no file or folder at {path}")
    indexes = sorted(path.glob("*.safetensors.index.json")) or sorted(path.glob("*.index.json"))
    if indexes:
        return [path / f for f in sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")) or sorted(path.glob("*.pt"))
    if not files:
        raise FileNotFoundError(f"{what}: no .safetensors/.bin/.pt weight files in {path}")
    return files


# ------------------------------------------------------------------------------------------------ the checks
def check_llm_config(llm_config, config: Emu2Config, where: str = "the LLaMA") -> None:
    """Raise `AssemblyError` naming every `LLM_FIELDS` value (and a too-large vocabulary) unlike the preset's."""
    text = config.text_config
    differing = [f"{name}: {getattr(llm_config, name, None)!r} (preset {getattr(text, name, None)!r})"
                 for name in LLM_FIELDS if getattr(llm_config, name, None) != getattr(text, name, None)]
    if llm_config.vocab_size > text.vocab_size:
        differing.append(f"vocab_size: {llm_config.vocab_size} (preset {text.vocab_size} including Emu2's added "
                         "tokens)")
    if differing:
        raise AssemblyError(f"{where} does not fit the preset's text config:\n  " + "\n  ".join(differing) +
                            "\nchoose the preset whose language model this is (emu2/emu2-chat/emu2-gen: LLaMA-33B)")


def _check_vision_sizes(vision: _LazyTensors, config: Emu2Config, where: Path) -> int:
    """Width, depth and patch size against the preset; returns the image size of the position grid."""
    v = config.vision_config
    width, _, patch, _ = vision.shape("visual.patch_embed.proj.weight")
    layers = 1 + max((int(k.split(".")[2]) for k in vision.names if k.startswith("visual.blocks.")), default=-1)
    found, wanted = (width, layers, patch), (v.width, v.layers, v.patch_size)
    if found != wanted:
        raise AssemblyError(f"the vision tower at {where} has width {width}, {layers} layers, patch {patch}; the preset "
                            f"wants {v.width}, {v.layers}, {v.patch_size} (EVA-02-CLIP-E-plus for the emu2 presets)")
    positions = vision.shape("visual.pos_embed")[1] - 1  # (1, 1 + grid^2, Dv): CLS first
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise AssemblyError(f"visual.pos_embed at {where} has {positions} patch positions, not a square grid")
    return grid * patch


def _open_vision(path: Path) -> _LazyTensors:
    vision = _LazyTensors(_weight_files(path, "--vision"))
    if not any(k.startswith("visual.") for k in vision.names):
        raise AssemblyError(f"no visual.* tensors in {path}: expected an EVA-CLIP checkpoint as open_clip saves it "
                            f"(found e.g. {vision.names[:3]})")
    if "visual.patch_embed.proj.weight" not in vision.names or "visual.pos_embed" not in vision.names:
        raise CheckpointMismatchError(
            sorted({"visual.patch_embed.proj.weight", "visual.pos_embed"} - set(vision.names)), [])
    return vision


def _emu2_tokenizer(llm: Path, config: Emu2Config, llm_vocab: int):
    """The LLaMA folder's tokenizer (else the packaged LLaMA one) with Emu2's tokens at the preset's ids."""
    from .. import processing as P

    source = llm if any((llm / f).is_file() for f in _TOKENIZER_FILES) else P.DEFAULT_TOKENIZER
    tokenizer = P.load_tokenizer(source, instruct=config.instruct)
    text = config.text_config
    ids = {P.PAD_TOKEN: text.pad_token_id, P.BOI: config.boi_token_id, P.EOI: config.eoi_token_id,
           P.IMAGE_TOKEN: config.image_token_id, P.FRAME_TOKEN: config.frame_token_id}
    wrong = [f"{token} is {tokenizer.convert_tokens_to_ids(token)} (preset {want})" for token, want in ids.items()
             if tokenizer.convert_tokens_to_ids(token) != want]
    if len(tokenizer) != text.vocab_size or wrong:
        raise AssemblyError(
            f"the tokenizer from {source} with Emu2's tokens has {len(tokenizer)} tokens (preset vocab "
            f"{text.vocab_size}, LLaMA vocab {llm_vocab}){'; ' + ', '.join(wrong) if wrong else ''}. Emu2 appends "
            "[PAD] then its special tokens right after the 32000 LLaMA tokens: use the original LLaMA tokenizer "
            "(no pad token of its own)")
    return tokenizer, str(source)


# ---------------------------------------------------------------------------------------------- the assembly
def assemble_init(
    preset: str | Emu2Config,
    vision: str | Path,
    llm: str | Path,
    out: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str | int = "5GB",
) -> AssemblyReport:
    """Write the emu2 model directory Table 5 starts stage 1 from; see the module docstring for the rules.

    ``dtype``: of every written tensor (bf16, as the official Emu2 weights). ``out`` must be new or empty. Raises
    `AssemblyError` when a source's sizes differ from the preset's and `CheckpointMismatchError` naming the tensors
    a source lacks (or, for the LLaMA, has in excess). Nothing is written before every check has passed.
    """
    from transformers import AutoConfig

    from ..model import Emu2ForCausalLM

    vision, llm, out = Path(vision), Path(llm), Path(out)
    config = Emu2Config.from_preset(preset) if isinstance(preset, str) else preset
    if out.exists() and any(out.iterdir()):  # stale shards of an earlier run would mix into the new index
        raise FileExistsError(f"{out} is not empty: give a new directory for the assembled model")
    # 1. The language model's config and tokenizer against the preset.
    if not (llm / "config.json").is_file():
        raise FileNotFoundError(f"--llm {llm} is not a Hugging Face model folder (no config.json)")
    llm_config = AutoConfig.from_pretrained(str(llm), local_files_only=True)
    check_llm_config(llm_config, config, where=f"the LLaMA at {llm}")
    tokenizer, tokenizer_from = _emu2_tokenizer(llm, config, llm_config.vocab_size)

    # 2. The vision tower: its sizes, the image size of its position grid, its keys in our names.
    eva = _open_vision(vision)
    config.vision_config.image_size = _check_vision_sizes(eva, config, vision)
    with torch.device("meta"):  # key names and shapes only: no memory
        model = Emu2ForCausalLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sources, dropped_visual, dropped_other = _vision_sources(eva, expected, vision)

    # 3. The language model's tensors: transformers names under language_model.
    sources.update(_lm_sources(_LazyTensors(_weight_files(llm, "--llm")), expected, llm))
    _check_shapes(sources, expected)

    # 4. Projections: the model's own random init, in the written dtype.
    projections = _random_projections(model, seed)

    def tensor(key: str) -> torch.Tensor:
        if key in projections:
            return projections.pop(key).to(dtype)
        source, name = sources[key]
        value = source[name]
        extra = expected[key][0] - value.shape[0]
        if extra:  # embed_tokens / lm_head rows of Emu2's added tokens: the mean of the LLaMA's rows
            return torch.cat([value.to(dtype), value.float().mean(0, keepdim=True).to(dtype).expand(extra, -1)])
        return value.to(dtype=dtype, copy=True)  # a copy: mmap-ed views may share storage

    # 5. Write shard by shard (the layout `save_pretrained` writes), then config and tokenizer.
    _write_shards(out, expected, dtype, max_shard_size, tensor)
    config.dtype = dtype
    config.architectures = [Emu2ForCausalLM.__name__]
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return AssemblyReport(out=out, image_size=config.vision_config.image_size, tokenizer_from=tokenizer_from,
                          new_token_rows=config.text_config.vocab_size - llm_config.vocab_size,
                          dropped_visual=sorted(dropped_visual), dropped_other=dict(dropped_other))


def _write_shards(out: Path, shapes: dict, dtype: torch.dtype, max_shard_size, tensor) -> None:
    """safetensors shards of at most ``max_shard_size`` (and their index when there are several) in ``out``,
    each shard's tensors made by ``tensor(key)`` only when that shard is written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out.mkdir(parents=True, exist_ok=True)
    meta_state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, shape in shapes.items()}
    split = split_torch_state_dict_into_shards(meta_state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensor(k) for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _vision_sources(eva: _LazyTensors, expected: dict, vision: Path):
    """Which of our ``visual.*`` keys each EVA-CLIP tensor fills: (our key -> (source, its key), the visual keys
    dropped, the other towers' key counts by prefix). Raises naming the visual tensors it lacks."""
    sources: dict[str, tuple[_LazyTensors, str]] = {}
    dropped_visual, dropped_other = [], Counter()
    for key in eva.names:
        ours = official_key(key) if key.startswith("visual.") else None
        if ours in expected:
            sources[ours] = (eva, key)
        elif key.startswith("visual."):
            dropped_visual.append(key)  # CLIP's final norm and head (Emu2 returns every token, un-normed)
        else:
            dropped_other[key.split(".")[0]] += 1  # the text tower, logit_scale
    _check_complete([k for k in expected if k.startswith("visual.")], sources, [], where=f"--vision {vision}")
    return sources, dropped_visual, dropped_other


def _lm_sources(lm: _LazyTensors, expected: dict, llm: Path) -> dict[str, tuple[_LazyTensors, str]]:
    """Our ``language_model.*`` key -> (the LLaMA's tensors, its key). Raises naming missing and extra tensors."""
    sources, unexpected = {}, []
    for key in lm.names:
        if key.endswith("rotary_emb.inv_freq"):  # old conversions saved the recomputed rotary buffer
            continue
        ours = "language_model." + key
        if ours in expected:
            sources[ours] = (lm, key)
        else:
            unexpected.append(key)
    _check_complete([k for k in expected if k.startswith("language_model.")], sources, unexpected,
                    where=f"--llm {llm}")
    return sources


def _random_projections(model, seed: int) -> dict[str, torch.Tensor]:
    """``project_up`` / ``project_down`` weights as the model initialises them, from ``seed``."""
    torch.manual_seed(seed)
    projections = {}
    for name in ("project_up", "project_down"):
        meta = getattr(model, name)
        linear = nn.Linear(meta.in_features, meta.out_features, bias=False)
        model._init_weights(linear)
        projections[f"{name}.weight"] = linear.weight.detach()
    return projections


def _check_complete(wanted: list[str], sources: dict, unexpected: list[str], where: str) -> None:
    missing = sorted(k for k in wanted if k not in sources)
    if missing or unexpected:
        error = CheckpointMismatchError(missing, sorted(unexpected))
        error.args = (f"{where}: {error.args[0]}",)
        raise error


def _check_shapes(sources: dict, expected: dict) -> None:
    """Every source tensor has the model's shape; embeddings may have fewer rows (grown by the mean)."""
    wrong = []
    for key, (source, name) in sources.items():
        shape, want = source.shape(name), tuple(expected[key])
        grows = key in _RESIZED and shape[1:] == want[1:] and shape[0] <= want[0]
        if shape != want and not grows:
            wrong.append(f"{name}: source {shape} vs model {want}")
    if wrong:
        raise CheckpointMismatchError([], [], wrong)
