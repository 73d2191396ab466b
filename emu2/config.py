"""Model configuration: an Emu2 config nests a vision config and any transformers causal-LM config.

Named presets (`Emu2Config.from_preset("emu2")`) carry the official sizes (official-format section 2) and the
small sizes this project trains and tests with.
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# LLaMA token ids fixed by the official special-token order (emu2.processing.SPECIAL_TOKENS).
PAD_ID, BOI_ID, EOI_ID, IMAGE_ID, FRAME_ID = 32000, 32001, 32002, 32003, 32004
BASE_VOCAB, INSTRUCT_VOCAB = 32272, 32274
# The shapes world's tokenizer (emu2.data.shapes.tokenizer) has 1,024 pieces where LLaMA has 32,000; the same
# special tokens follow in the same order, so every id above is shifted by the difference.
SHAPES_PIECES = 1024
SHAPES_INSTRUCT_VOCAB = INSTRUCT_VOCAB - PAD_ID + SHAPES_PIECES


def _special_ids(pieces: int) -> dict:
    """Emu2Config's token ids for a tokenizer with ``pieces`` pieces before [PAD] and the special tokens."""
    shift = pieces - PAD_ID
    return dict(boi_token_id=BOI_ID + shift, eoi_token_id=EOI_ID + shift, image_token_id=IMAGE_ID + shift,
                frame_token_id=FRAME_ID + shift)


class Emu2VisionConfig(PreTrainedConfig):
    """EVA-CLIP ViT sizes (official `CLIPVisionCfg` field names).

    ``postnorm`` (EVA-CLIP's flag; True in Emu2): post-norm blocks without a final norm. False gives the
    pre-norm layout of EVA-02-CLIP B/L (norm before attention and MLP, one final ``norm``), which a small
    encoder trained from scratch learns far faster. ``stem``: "patch" (one convolution with kernel = stride =
    patch_size, as every EVA-CLIP) or "conv" (stride-2 3x3 convolutions down to the same patch grid, the
    "early convolutions" stem of Xiao et al. 2021), which lets a small ViT see the shape of objects no
    larger than a patch. ``stem_norm`` (conv stem only): a GroupNorm of 8 groups after each stride-2 convolution,
    the normalised early convolutions of Xiao et al. (there BatchNorm; GroupNorm keeps an image's features
    independent of its batch). The official presets keep "patch" and post-norm. ``pos_embed_init``: how a
    model built from its config starts its learned position embedding: "normal" (N(0, 0.02), as EVA-CLIP) or
    "sincos" (the fixed 2D sine-cosine table of MAE, He et al. 2022, still learned from there). A checkpoint's
    own weights replace either.
    """

    model_type = "emu2_vision"

    image_size: int = 448
    patch_size: int = 14
    width: int = 1792
    layers: int = 64
    head_width: int = 112
    mlp_ratio: float = 8.571428571428571
    layer_norm_eps: float = 1e-6
    postnorm: bool = True
    stem: str = "patch"
    stem_norm: bool = False
    pos_embed_init: str = "normal"

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


class Emu2Config(PreTrainedConfig):
    """Vision encoder + projections + causal LM.

    ``n_query``: visual embeddings per image (8x8 = 64 for Emu2/Emu2-Gen, 16x16 = 256 for Emu2-Chat);
    ``v_query``: per video frame. The loss weights scale the two terms of the unified objective (paper 2.2.2).
    """

    model_type = "emu2"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=Emu2VisionConfig),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    n_query: int = 64
    v_query: int = 64
    image_token_id: int = IMAGE_ID
    frame_token_id: int = FRAME_ID
    boi_token_id: int = BOI_ID
    eoi_token_id: int = EOI_ID
    instruct: bool = False
    text_loss_weight: float = 1.0
    regression_loss_weight: float = 1.0
    tie_word_embeddings: bool = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Emu2Config:
        """A named preset; keyword overrides replace top-level fields."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = PRESETS[name]()
        kwargs.update(overrides)
        return cls(**kwargs)


def _llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, **kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=kw.pop("max_pos", 2048),
        bos_token_id=1, eos_token_id=2, pad_token_id=kw.pop("pad", PAD_ID), tie_word_embeddings=False, **kw,
    )


def _official(vocab: int, n_query: int, instruct: bool) -> dict:
    # EVA-02-CLIP-E-plus trunk + LLaMA-33B (official-format 2.1, 2.2).
    return dict(
        vision_config=Emu2VisionConfig(),
        text_config=_llama(6656, 17920, 60, 52, vocab),
        n_query=n_query, v_query=64, instruct=instruct,
    )


PRESETS = {
    "emu2": lambda: _official(BASE_VOCAB, 64, False),
    "emu2-gen": lambda: _official(BASE_VOCAB, 64, False),
    "emu2-chat": lambda: _official(INSTRUCT_VOCAB, 256, True),
    # Random weights, builds in well under a second: smoke tests and examples.
    "tiny": lambda: dict(
        vision_config=Emu2VisionConfig(image_size=56, patch_size=14, width=64, layers=2, head_width=32, mlp_ratio=2.0),
        text_config=_llama(64, 128, 2, 4, BASE_VOCAB), n_query=4, v_query=4,
    ),
    "tiny-chat": lambda: dict(
        vision_config=Emu2VisionConfig(image_size=56, patch_size=14, width=64, layers=2, head_width=32, mlp_ratio=2.0),
        text_config=_llama(64, 128, 2, 4, INSTRUCT_VOCAB), n_query=4, v_query=4, instruct=True,
    ),
    # Shapes world (64-px images, 8x8 patch grid pooled to 4x4 = 16 visual embeddings) with its own tokenizer
    # (`processing.preset_tokenizer`): 2 x 256 x 1,298 embedding weights instead of 2 x 256 x 32,274. Its encoder
    # is trained from scratch, so it takes the layout that learns fastest on a CPU budget: the convolutional stem
    # with normalised convolutions and no transformer blocks (4 pre-norm blocks made a step 3.4x slower and read
    # every attribute worse at equal steps; the stem's GroupNorm read shape, count and size better for 7-20 % more
    # time a step; docs/training-notes.md).
    "shapes": lambda: dict(
        vision_config=Emu2VisionConfig(image_size=64, patch_size=8, width=128, layers=0, head_width=32, mlp_ratio=4.0,
                                       postnorm=False, stem="conv", stem_norm=True,
                                       pos_embed_init="sincos"),
        text_config=_llama(256, 688, 6, 4, SHAPES_INSTRUCT_VOCAB, pad=SHAPES_PIECES), n_query=16, v_query=4,
        instruct=True, **_special_ids(SHAPES_PIECES),
    ),
    # A ~100M-parameter config for GPU runs and throughput benchmarks.
    "shapes-large": lambda: dict(
        vision_config=Emu2VisionConfig(image_size=64, patch_size=8, width=384, layers=6, head_width=64, mlp_ratio=4.0,
                                       postnorm=False, stem="conv"),
        text_config=_llama(768, 2048, 10, 12, INSTRUCT_VOCAB), n_query=16, v_query=4, instruct=True,
    ),
}


# Let transformers' Auto classes (e.g. AutoTokenizer reading a model directory's config.json) know our types.
AutoConfig.register(Emu2VisionConfig.model_type, Emu2VisionConfig, exist_ok=True)
AutoConfig.register(Emu2Config.model_type, Emu2Config, exist_ok=True)
