"""Training recipes: `TrainConfig` dataclasses, YAML loading, ``key=value`` overrides, validation.

A recipe is one YAML file per stage (``emu2/recipes/*.yaml``); stages differ only in their YAML. Every field
can be overridden from the command line with a dotted path::

    emu2 train shapes-stage1 steps=50 optim.lr.lm=3.0e-4 data.streams.pairs.batch_size=8

Values are parsed as YAML (``true``, ``null``, ``[0.9, 0.95]``, ``1e-4``) and checked against the field types;
unknown keys are errors that name the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
STAGES = ("encoder", "lm", "stage1", "stage2", "chat", "gen", "decoder", "video-decoder")
GROUPS = ("project", "lm", "visual")  # project = project_up + project_down (paper 2.2.2 "linear projection")
DECAYS = ("cosine", "linear", "constant")
PRECISIONS = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A recipe or override that does not fit the `TrainConfig` schema."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (``mixed_precision: no`` stays a string) and ``1e-4`` is
    a float (YAML 1.1 reads it as a string)."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelSection:
    """Where the weights come from and what changes before training."""

    init_from: str | None = None  # an Emu2Pipeline directory: the previous stage's output_dir
    preset: str | None = None  # random initialisation of a named preset when init_from is null
    # Top-level Emu2Config fields replaced after loading (n_query, v_query, instruct, text_loss_weight, ...).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    # Encoder input resolution; a size other than the loaded model's interpolates the position embedding
    # (paper 2.2.2: stage 1 "restarted at a higher 448-pixel resolution").
    image_size: int | None = None
    activation_checkpointing: bool = False  # LM: HF gradient checkpointing; vision tower: its own flag


@dataclass
class LoraSection:
    """LoRA through peft (merged into the weights when the stage output is saved)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names (peft matches name suffixes) or one regex string (full match on the module path).
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=lambda: ["project_up", "project_down"])


@dataclass
class SourceSection:
    """One set of shards: ``urls`` (path/glob/brace list, relative to data.root) or, when null, the shards of
    ``kind`` listed in ``data.root``'s dataset.json (the shapes world)."""

    kind: str
    weight: float = 1.0
    urls: str | None = None


@dataclass
class StreamSection:
    """A stream of batches with its own global batch size (paper Table 5: one batch size per data type).

    Every optimizer step takes ``batch_size`` samples from every stream, summed over ranks and accumulation
    micro-steps; within a stream the sources are mixed by weight.
    """

    batch_size: int
    sources: list[SourceSection]


@dataclass
class SyntheticSection:
    """Random token/image batches instead of shards (benchmarks, distributed tests)."""

    seq_len: int = 128
    images: int = 1  # image blocks per sample
    regress: bool = True  # the images are regression targets


@dataclass
class DataSection:
    root: str | None = None  # dataset directory with dataset.json; relative source urls resolve against it
    split: str = "train"
    streams: dict[str, StreamSection] = field(default_factory=dict)
    max_length: int = 2048  # tokens per sample (2.3.1: "limited to 2048, ... truncated directly")
    # Pack each row with consecutive samples, whole, up to max_length tokens (as LM pre-training packs documents)
    # instead of one right-padded sample a row; a stream's batch_size then counts rows. Later samples attend to
    # earlier ones in their row and positions run on, so the model trains at every position up to max_length.
    packing: bool = False
    sequence: dict[str, Any] = field(default_factory=dict)  # emu2.data.sequence.SequenceConfig fields
    shuffle_buffer: int = 1000
    num_workers: int = 0  # dataloader worker processes per rank (a resume needs the same count)
    # Random resized crop (emu2.data.shards.Augmentation fields, e.g. {crop_scale: [0.8, 1.0]}); null: none.
    # The paper describes no augmentation for the LM stages.
    augmentation: dict[str, Any] | None = None
    synthetic: SyntheticSection | None = None
    # The run stops once more than this share of the samples read was skipped (unreadable shards, undecodable
    # images, malformed records; emu2.train.data.SkippedSamples). Web-crawled shards lose a few samples to bad
    # images as a matter of course; a truncated download or a wrong shard layout loses far more than 1%.
    # 1.0: never stop.
    max_skipped_fraction: float = 0.01


@dataclass
class OptimSection:
    """AdamW with one peak learning rate per module group."""

    lr: dict[str, float] = field(default_factory=dict)  # group -> peak lr, groups: project, lm, visual
    freeze: list[str] = field(default_factory=list)  # groups kept fixed (no gradients, not in the optimizer)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.05  # not applied to norms, biases and embeddings
    grad_clip: float | None = 5.0


@dataclass
class ScheduleSection:
    """Linear warm-up from 0 to the peak, then decay to zero."""

    warmup_steps: int | None = None  # takes precedence over warmup_ratio
    warmup_ratio: float = 0.0
    decay: str = "cosine"


@dataclass
class CheckpointSection:
    every: int = 1000  # steps between checkpoints (and one at the end)
    keep_last: int = 3


@dataclass
class EncoderSection:
    """``stage: encoder`` only: the weights of its two objectives on image-caption pairs (emu2.train.stages.encoder).

    ``contrastive``: CLIP-style InfoNCE between the pooled embeddings and the caption. ``caption_words``: predict
    which vocabulary tokens the caption contains (multi-label, one logistic output per token; CatLIP's
    classification view of image-text pre-training), which rewards every attribute a caption names, not only
    those that tell a batch's captions apart. ``attributes`` (shapes world only): supervised attribute labels of
    ``attribute_pool`` procedurally rendered scenes of the dataset's world (`emu2.data.shapes.supervision`), the
    stand-in for the pre-training EVA-CLIP brings. ``word_projection`` (with ``attributes``): when the stage ends,
    set the projection into the language model (``project_up``, which the stage does not train) by least squares so
    that each pooled embedding lands on the sum of the input embeddings of the words naming what lies under it (its
    object's shape and colour, or its background colour and "background"); the stand-in for CLIP's alignment of
    image and text, so that stage 1 starts with visual embeddings the language model can already read as words.
    ``word_projection_position``: the weight of the words of an object's position ("top left", "center") in those
    sums (0: not named; read only with ``word_projection``); an object's embeddings then also read as where it is.
    """

    contrastive: float = 1.0
    caption_words: float = 0.0
    attributes: float = 0.0
    attribute_pool: int = 6000
    word_projection: bool = False
    word_projection_position: float = 0.0


@dataclass
class DecoderSection:
    """``stage: decoder`` / ``video-decoder`` only (`emu2.train.stages.decoder`, paper 2.2.3, A.3): the visual
    decoder and how it trains. Fields marked (image) or (video) are read by that stage only; validation rejects
    the other stage's fields when they are set."""

    output_image_size: int = 64  # image side in pixels (the shapes world: 64; paper: 1024)
    pixel_space: bool = True  # true: the UNet denoises pixels, no VAE; false (image): the latents of ``vae``
    pixel_scale: int = 1  # pixel space: the UNet works at output_image_size / pixel_scale, outputs are enlarged
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # UNet block widths (a UNet from scratch)
    attention: list[bool] | None = None  # per UNet level: cross-attention or not (null: every level but the first)
    layers_per_block: int = 1  # resnet (+ attention) layers per UNet level
    scheduler: dict[str, Any] = field(default_factory=dict)  # overrides of the official Euler scheduler config
    cfg_drop_prob: float = 0.1  # embeddings replaced by the unconditional ones with this probability (Table 6)
    noise_offset: float = 0.1  # Table 6
    snr_gamma: float | None = None  # Min-SNR loss weighting gamma (null: the plain MSE of the paper)
    # (image)
    unet_init: str | None = None  # local diffusers folder (SDXL-base checkout with unet/, or a UNet folder) to
    # start from; its cross-attention and pooled-embedding projections are resized to the vision width
    # (`emu2.convert.sdxl.load_pretrained_decoder_unet`); null: a small UNet from scratch (channels, attention, ...)
    vae: str | None = None  # local AutoencoderKL folder for pixel_space: false (default: the vae/ of unet_init)
    max_scale: float = 1.25  # largest random up-scaling before the random crop (A.3.1; 1.0: no crops)
    cache_embeddings: bool = False  # encode every training image once up front (max_scale 1.0, not streaming)
    max_images: int = 4000  # training images read from the shards into memory (not with streaming)
    streaming: bool = False  # stream the shards (data.num_workers processes), the position saved in checkpoints
    encoder_image_size: int | None = None  # the encoder's input size, checked against model.init_from's
    min_image_size: int = 0  # images whose short side is smaller are skipped (A.3.1)
    gradient_checkpointing: bool = False  # recompute UNet activations in the backward pass (SDXL at 1024 px)
    spatial_conditioning: bool = False  # a UNet from scratch also takes the embeddings laid out on their grid as
    # input channels (`emu2.model.decoder.unet_input`), so it knows where each one lies; the official has none
    # (video)
    num_frames: int | None = None  # frames per clip (null: every frame of the first clip)
    n_query: int | None = None  # embeddings per frame (null: the model's v_query, what Emu2 regresses per frame)
    max_clips: int = 256  # training clips read and encoded up front


# What only one of the two decoder stages reads.
_IMAGE_DECODER_ONLY = ("unet_init", "vae", "max_scale", "cache_embeddings", "max_images", "streaming",
                       "encoder_image_size", "min_image_size", "gradient_checkpointing", "spatial_conditioning")
_VIDEO_DECODER_ONLY = ("num_frames", "n_query", "max_clips")


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    stage: str
    output_dir: str  # the stage output (an Emu2Pipeline directory) + checkpoints/, metrics.jsonl, tensorboard/
    steps: int  # optimizer steps
    description: str = ""
    seed: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"  # accelerate mixed precision: no | bf16 | fp16
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    decoder: DecoderSection = field(default_factory=DecoderSection)

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def warmup_steps(self) -> int:
        s = self.schedule
        return s.warmup_steps if s.warmup_steps is not None else round(s.warmup_ratio * self.steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading
def recipe_names() -> list[str]:
    """Short names of the packaged recipes (``emu2/recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A YAML path, or the short name of a packaged recipe (``shapes-stage1``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if packaged.is_file() and path.parent == Path("."):
        return packaged
    close = difflib.get_close_matches(str(name_or_path), recipe_names(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"no recipe file {str(name_or_path)!r} and no packaged recipe of that name{hint} "
                      f"(packaged: {', '.join(recipe_names())})")


def load_config(recipe: str | Path | dict, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Recipe (path, packaged short name, or an already-parsed dict) + ``key=value`` overrides -> config."""
    if isinstance(recipe, dict):
        raw, where = dict(recipe), "recipe"
    else:
        path = resolve_recipe(recipe)
        raw = _yaml(path.read_text()) or {}
        where = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a recipe is a YAML mapping, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    config = _build(TrainConfig, raw, "", where)
    validate(config)
    return config


def apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value`` -> raw["a"]["b"]["c"] = yaml(value); list elements by index (``sources.0.weight``)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr.lm=1e-5)")
    value = _yaml(text) if text.strip() else None
    _check_path(key)
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_index(part, node, key)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {key}: {'.'.join(parts[:i + 1])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_index(last, node, key)] = value
    else:
        node[last] = value


def _index(part: str, node: list, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def _check_path(key: str) -> None:
    """Fail early, with a suggestion, on a dotted key that no dataclass field matches."""
    hint: Any = TrainConfig
    for i, part in enumerate(key.split(".")):
        where = ".".join(key.split(".")[:i]) or "the top level"
        hint = _strip_optional(hint)
        if dataclasses.is_dataclass(hint):
            names = [f.name for f in dataclasses.fields(hint)]
            if part not in names:
                close = difflib.get_close_matches(part, names, n=1)
                raise ConfigError(f"unknown key {key!r}: {where} has no {part!r}"
                                  + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(names)}"))
            hint = typing.get_type_hints(hint)[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        elif typing.get_origin(hint) is list:
            hint = typing.get_args(hint)[0]
        else:
            return  # free-form (Any): anything below is the owner's business


def _strip_optional(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _build_dataclass(hint, value, path: str, where: str):
    """The dataclass ``hint`` from the mapping ``value``: unknown keys (with the closest known one) and missing
    required keys are errors."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {path or 'the top level'} must be a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(hint)}
    unknown = [k for k in value if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        raise ConfigError(f"{where}: unknown key {'.'.join(filter(None, [path, str(unknown[0])]))!r}"
                          + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"))
    types_ = typing.get_type_hints(hint)
    kwargs = {}
    for key, f in fields.items():
        sub = f"{path}.{key}" if path else key
        if key in value:
            kwargs[key] = _build(types_[key], value[key], sub, where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {sub!r}")
    return hint(**kwargs)


def _build(hint, value, path: str, where: str):
    """Type-check ``value`` against ``hint`` and build dataclasses; errors name the dotted path."""
    name = path or "the top level"
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _build(arg, value, path, where)
            except ConfigError as exn:
                errors.append(str(exn))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {name}: {value!r} fits none of {hint}")
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, path, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {name} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_build(item, v, f"{path}.{i}", where) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {name} must be a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _build(item, v, f"{path}.{k}", where) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise ConfigError(f"{where}: {name}: unsupported type {hint}")
    raise ConfigError(f"{where}: {name} must be {hint.__name__}, got {value!r} ({type(value).__name__})")


# ------------------------------------------------------------------------------------------- validation
def validate(config: TrainConfig) -> None:
    """Cross-field checks the types cannot express; raises `ConfigError` saying what to change.

    Long because it is a flat list of independent checks, each one condition and one message; all problems are
    collected so that one run names every one of them."""
    problems = []
    if config.stage not in STAGES:
        problems.append(f"stage must be one of {STAGES}, got {config.stage!r}")
    if config.steps <= 0:
        problems.append(f"steps must be positive, got {config.steps}")
    if config.gradient_accumulation_steps <= 0:
        problems.append("gradient_accumulation_steps must be >= 1")
    if config.mixed_precision not in PRECISIONS:
        problems.append(f"mixed_precision must be one of {PRECISIONS}, got {config.mixed_precision!r}")
    if config.stage not in ("decoder", "video-decoder"):
        m = config.model
        if m.init_from is None and m.preset is None:
            problems.append("model: give init_from (the previous stage's output_dir) or a preset (random init)")
        if m.preset is not None:
            from emu2.config import PRESETS

            if m.preset not in PRESETS:
                problems.append(f"model.preset {m.preset!r} is not one of {sorted(PRESETS)}")
        o = config.optim
        for group in [*o.lr, *o.freeze]:
            if group not in GROUPS:
                problems.append(f"optim: unknown module group {group!r}; groups are {GROUPS}")
        trained = [g for g in GROUPS if g not in o.freeze]
        missing = [g for g in trained if g not in o.lr]
        if missing and not config.lora.enabled:
            problems.append(f"optim.lr has no learning rate for trained group(s) {missing}; add one or freeze them "
                            f"(optim.freeze)")
        if not trained:
            problems.append("optim.freeze freezes every group: nothing to train")
        d = config.data
        from emu2.data.kinds import KINDS

        for name, stream in d.streams.items():
            for i, source in enumerate(stream.sources):
                if source.kind not in KINDS:
                    problems.append(f"data.streams.{name}.sources.{i}.kind {source.kind!r} is not one of "
                                    f"{sorted(KINDS)}")
        if not d.streams:
            problems.append("data.streams is empty: add at least one stream with a batch_size and sources")
        for name, stream in d.streams.items():
            if stream.batch_size <= 0:
                problems.append(f"data.streams.{name}.batch_size must be positive")
            if not stream.sources and d.synthetic is None:
                problems.append(f"data.streams.{name} has no sources")
            for i, source in enumerate(stream.sources):
                if source.urls is None and d.root is None and d.synthetic is None:
                    problems.append(f"data.streams.{name}.sources.{i}: give urls or data.root (a dataset.json dir)")
                if source.weight < 0:
                    problems.append(f"data.streams.{name}.sources.{i}.weight must be >= 0")
        if config.lora.enabled and not config.lora.target_modules:
            problems.append("lora.target_modules is empty")
    else:
        problems += _unused_by_decoder_stages(config)
    o, s = config.optim, config.schedule
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        problems.append(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        problems.append("optim.grad_clip must be positive or null")
    if s.decay not in DECAYS:
        problems.append(f"schedule.decay must be one of {DECAYS}, got {s.decay!r}")
    if not 0 <= s.warmup_ratio < 1:
        problems.append("schedule.warmup_ratio must be in [0, 1)")
    if not 0 <= config.data.max_skipped_fraction <= 1:
        problems.append(f"data.max_skipped_fraction must be in [0, 1] (1: never stop), got "
                        f"{config.data.max_skipped_fraction}")
    e = config.encoder
    weights = (e.contrastive, e.caption_words, e.attributes)
    if min(weights) < 0 or sum(weights) == 0:
        problems.append(f"encoder: the objective weights must be >= 0 and not all 0, got contrastive="
                        f"{e.contrastive}, caption_words={e.caption_words}, attributes={e.attributes}")
    if e.attribute_pool <= 0:
        problems.append(f"encoder.attribute_pool must be positive, got {e.attribute_pool}")
    if e.word_projection and not e.attributes:
        problems.append("encoder.word_projection needs encoder.attributes > 0: the fit reads the attribute labels")
    if e.word_projection_position < 0:
        problems.append(f"encoder.word_projection_position must be >= 0, got {e.word_projection_position}")
    if config.stage != "encoder" and e != EncoderSection():
        problems.append(f"encoder: the section is read by stage: encoder only, not stage: {config.stage}")
    if config.checkpoint.every <= 0 or config.checkpoint.keep_last <= 0:
        problems.append("checkpoint.every and checkpoint.keep_last must be positive")
    problems += _decoder_problems(config)
    if problems:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))


# Sections the decoder stages (emu2.train.stages.decoder) do not read: set, they would be silently ignored.
_NOT_READ_BY_DECODER_STAGES = {
    "model": ("preset", "config_overrides", "image_size", "activation_checkpointing"),
    "lora": tuple(f.name for f in dataclasses.fields(LoraSection)),
    "data": ("split", "max_length", "packing", "sequence", "augmentation", "synthetic"),
    "optim": ("freeze",),
}


def _decoder_problems(config: TrainConfig) -> list[str]:
    """The ``decoder`` section: set only for the decoder stages, only the fields of the stage, consistent."""
    d, default = config.decoder, DecoderSection()
    if config.stage not in ("decoder", "video-decoder"):
        return [] if d == default else [f"decoder: the section is read by the decoder stages only, not stage: "
                                        f"{config.stage}"]
    other = _VIDEO_DECODER_ONLY if config.stage == "decoder" else _IMAGE_DECODER_ONLY
    problems = [f"decoder.{name} is not used by stage {config.stage} (it is {getattr(d, name)!r}): remove it"
                for name in other if getattr(d, name) != getattr(default, name)]
    if config.stage == "video-decoder" and not d.pixel_space:
        problems.append("decoder.pixel_space: the video decoder stage trains in pixel space only: set it to true")
    if d.pixel_scale < 1 or d.output_image_size % d.pixel_scale:
        problems.append(f"decoder.pixel_scale {d.pixel_scale} must divide decoder.output_image_size "
                        f"{d.output_image_size}")
    if d.pixel_scale != 1 and not d.pixel_space:
        problems.append("decoder.pixel_scale applies to pixel space only; with pixel_space: false the VAE sets the "
                        "scale: drop decoder.pixel_scale")
    if d.vae is not None and d.pixel_space:
        problems.append("decoder.vae is set but decoder.pixel_space is true: set pixel_space: false to train on the "
                        "VAE's latents, or drop decoder.vae")
    if d.streaming and d.cache_embeddings:
        problems.append("decoder.streaming reads each image once, as it comes: set decoder.cache_embeddings: false")
    if d.cache_embeddings and d.max_scale != 1.0:
        problems.append("decoder.cache_embeddings needs decoder.max_scale: 1.0 (random crops change the input)")
    if d.spatial_conditioning and d.unet_init is not None:
        problems.append("decoder.spatial_conditioning builds a UNet from scratch with more input channels; a "
                        "pretrained decoder.unet_init takes latents only: drop one of them")
    if d.attention is not None and len(d.attention) != len(d.channels):
        problems.append(f"decoder.attention has {len(d.attention)} levels, decoder.channels {len(d.channels)}")
    return problems


def _unused_by_decoder_stages(config: TrainConfig) -> list[str]:
    """What a decoder stage's recipe sets but the stage does not use; its learning rate is ``optim.lr.unet``."""
    problems = []
    for section, names in _NOT_READ_BY_DECODER_STAGES.items():
        given, default = getattr(config, section), type(getattr(config, section))()
        problems += [f"{section}.{name} is not used by stage {config.stage} (it is {getattr(given, name)!r}): "
                     "remove it" + (" (decoder.gradient_checkpointing recomputes UNet activations)"
                                    if name == "activation_checkpointing" else "")
                     for name in names if getattr(given, name) != getattr(default, name)]
    if list(config.optim.lr) != ["unet"]:
        problems.append(f"optim.lr of stage {config.stage} has one group, unet (the UNet is all it trains); "
                        f"got {sorted(config.optim.lr)}")
    if config.model.init_from is None:
        problems.append(f"model.init_from: stage {config.stage} needs the stage-1 model whose encoder it decodes")
    return problems
