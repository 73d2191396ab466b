"""Emu2: vision encoder -> project_up -> causal LM -> (lm_head for text, project_down for visual embeddings).

Shape legend: B batch, L sequence, N images in a batch (all samples, in slot order), M video frames,
Q visual embeddings per image (n_query) or frame (v_query), S image side, D LM hidden, Dv vision width.

One autoregressive objective (paper 2.2.2): cross-entropy on supervised text tokens plus regression (MSE, as the
official training) of ``project_down(hidden)`` at every position whose next element is a visual embedding of a
target image, against the encoder's detached embedding of that slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import StaticCache
from transformers.utils import ModelOutput

from ..config import Emu2Config
from .errors import CheckpointMismatchError
from .vision import EVAVisionTransformer, sincos_position_table


class SlotCountError(ValueError):
    """The number of visual slots in the token ids does not match the images/frames given."""


@dataclass
class Emu2Output(ModelOutput):
    """Output of `Emu2ForCausalLM.forward`.

    loss: weighted sum of the two terms (scalar), or None without targets.
    text_loss / regression_loss: mean cross-entropy over supervised tokens / mean squared error over target
        slots (scalars; 0 when the batch has none).
    num_text_targets / num_regression_targets: how many tokens / visual slots the means are over.
    logits: (B, L, V), only when no text targets are given (training computes logits at supervised rows only).
    last_hidden_state: (B, L, D) after the LM's final norm.
    """

    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    regression_loss: torch.Tensor | None = None
    num_text_targets: int | None = None
    num_regression_targets: int | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class Emu2PreTrainedModel(PreTrainedModel):
    config_class = Emu2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, EVAVisionTransformer):
            init.normal_(module.cls_token, std=0.02)
            if module.config.pos_embed_init == "sincos":
                grid = module.config.image_size // module.config.patch_size
                init.copy_(module.pos_embed, sincos_position_table(grid, module.config.width)[None])
            else:
                init.normal_(module.pos_embed, std=0.02)


class Emu2ForCausalLM(Emu2PreTrainedModel):
    """The Emu2 multimodal model (Emu2, Emu2-Chat, or the multimodal encoder of Emu2-Gen)."""

    def __init__(self, config: Emu2Config):
        super().__init__(config)
        width, hidden = config.vision_config.width, config.text_config.hidden_size
        self.visual = EVAVisionTransformer(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.project_up = nn.Linear(width, hidden, bias=False)
        self.project_down = nn.Linear(hidden, width, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        """transformers ``from_pretrained`` (dtype, device_map, low-memory loading), refusing mismatched files.

        With ``strict`` (default) a checkpoint with missing, unexpected or wrongly shaped tensors raises
        `CheckpointMismatchError` naming them, instead of silently keeping random weights. ``quantization_config``
        (any transformers one) or the official ``load_in_4bit=True`` / ``load_in_8bit=True`` quantize the language
        model's decoder layers only (`emu2.model.quantization`).
        """
        from .quantization import check_loaded, quantization_kwargs

        kwargs = quantization_kwargs(kwargs)
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = (sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ())),
                    [f"{m[0]}: {m[1]} vs {m[2]}" if isinstance(m, tuple) else str(m)
                     for m in info.get("mismatched_keys", ())])
        if strict and any(problems):
            raise CheckpointMismatchError(*problems)
        if kwargs.get("quantization_config") is not None:
            check_loaded(model)
        return (model, info) if wants_info else model

    # ---------------------------------------------------------------------------------------- visual side
    def encode_image(self, pixels: torch.Tensor, n_query: int | None = None) -> torch.Tensor:
        """``pixels (N, 3, S, S)`` normalised -> ``(N, n_query, Dv)`` pooled visual embeddings."""
        return self.visual.encode_image(pixels, n_query or self.config.n_query)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _splice(self, embeds, input_ids, slot_id, features, what):
        """Write ``project_up(features (K, Q, Dv))`` into the positions of ``slot_id`` in row-major order."""
        mask = input_ids == slot_id
        n_slots, n_given = int(mask.sum()), features.shape[0] * features.shape[1]
        if n_slots != n_given:
            raise SlotCountError(
                f"the token ids hold {n_slots} {what} slot tokens but {features.shape[0]} {what}(s) x "
                f"{features.shape[1]} embeddings = {n_given} were given; expand each placeholder with "
                "emu2.processing.expand_placeholders using the model's n_query/v_query"
            )
        if n_slots:
            weight = self.project_up.weight
            projected = self.project_up(features.to(device=weight.device, dtype=weight.dtype))
            # A model split over devices (device_map) may hold the embedding table elsewhere than the vision
            # side: the official splice moves the projected features to the embeddings' device too.
            projected = projected.reshape(-1, embeds.shape[-1]).to(device=embeds.device, dtype=embeds.dtype)
            embeds = embeds.masked_scatter(mask.to(embeds.device).unsqueeze(-1), projected)
        return embeds

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``(B, L)`` + visual embeddings ``(N, Q, Dv)`` / ``(M, Qv, Dv)`` -> input embeddings ``(B, L, D)``.

        ``<image>`` slots take the image features in order (row-major over batch then sequence), ``[gIMG]`` slots
        the frame features; ``[IMG]``/``[/IMG]`` keep their token embeddings (official-format 6.1).
        """
        embeds = self.get_input_embeddings()(input_ids)
        dv = self.config.vision_config.width
        empty = embeds.new_zeros(0, 1, dv)
        embeds = self._splice(embeds, input_ids, self.config.image_token_id,
                              image_features if image_features is not None else empty, "image")
        embeds = self._splice(embeds, input_ids, self.config.frame_token_id,
                              frame_features if frame_features is not None else empty, "video frame")
        return embeds

    def _visual_features(self, images, frames, image_features=None, frame_features=None):
        """Encode images/frames unless their features ``(N, Q, Dv)`` were given (e.g. cached by the caller)."""
        if image_features is None and images is not None and len(images):
            image_features = self.encode_image(images)
        if frame_features is None and frames is not None and len(frames):
            frame_features = self.encode_image(frames, self.config.v_query)
        return image_features, frame_features

    def _decoder(self):
        return self.language_model.get_decoder()

    # ------------------------------------------------------------------------------------------- training
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_is_target: torch.Tensor | None = None,
        frame_is_target: torch.Tensor | None = None,
        **_,
    ) -> Emu2Output:
        """The unified objective on a batch of interleaved sequences.

        input_ids, attention_mask: (B, L); images: (N, 3, S, S); frames: (M, 3, S, S);
        labels: (B, L) token ids where text is supervised, -100 elsewhere (shifted inside, HF convention);
        image_is_target: (N,) bool and frame_is_target: (M,) bool: which visuals are regression targets.
        """
        image_features, frame_features = self._visual_features(images, frames)
        embeds = self.embed(input_ids, image_features, frame_features)
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self._decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state

        lm_head = self.language_model.get_output_embeddings()
        zero = hidden.new_zeros(())
        text_loss, n_text, logits = zero, 0, None
        if labels is not None:
            targets = labels[:, 1:]
            rows = targets != -100
            n_text = int(rows.sum())
            if n_text:  # logits only where a token is supervised: a 32k-row head on every position is waste
                text_loss = F.cross_entropy(lm_head(hidden[:, :-1][rows]).float(), targets[rows])
        else:
            logits = lm_head(hidden)

        reg_loss, n_reg = zero, 0
        predictions, goals = [], []
        for slot_id, features, is_target in (
            (self.config.image_token_id, image_features, image_is_target),
            (self.config.frame_token_id, frame_features, frame_is_target),
        ):
            if features is None or is_target is None or not bool(is_target.any()):
                continue
            # Position p of a slot is predicted by the hidden state at p - 1 ([IMG] for the first slot).
            batch_idx, seq_idx = (input_ids == slot_id).nonzero(as_tuple=True)
            chosen = is_target.to(features.device).repeat_interleave(features.shape[1])
            predictions.append(hidden[batch_idx[chosen], seq_idx[chosen] - 1])
            goals.append(features.detach().reshape(-1, features.shape[-1])[chosen])
        if predictions:
            predicted = self.project_down(torch.cat(predictions))
            goal = torch.cat(goals).to(predicted.dtype)
            n_reg = goal.shape[0]
            reg_loss = F.mse_loss(predicted.float(), goal.float())

        loss = None
        if labels is not None or n_reg:
            loss = self.config.text_loss_weight * text_loss + self.config.regression_loss_weight * reg_loss
        return Emu2Output(
            loss=loss, text_loss=text_loss, regression_loss=reg_loss, num_text_targets=n_text,
            num_regression_targets=n_reg, logits=logits, last_hidden_state=hidden,
        )

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Text continuation through transformers ``generate`` on input embeddings.

        input_ids (B, L) left-padded; returns the generated ids ``(B, T)`` only (no prompt). Any ``generate``
        argument passes through: num_beams, do_sample, temperature, top_p, max_new_tokens, streamer, ...
        """
        image_features, frame_features = self._visual_features(images, frames)
        embeds = self.embed(input_ids, image_features, frame_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("pad_token_id", self.config.text_config.pad_token_id)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    @torch.inference_mode()
    def regress_image_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        n_query: int | None = None,
        image_features: torch.Tensor | None = None,
        frame_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate the visual embeddings of the next image: ``(B, n_query, Dv)``.

        ``input_ids`` (B, L) is the prompt with BOS, left-padded, *without* the trailing ``[IMG]`` (appended here,
        as the official `generate_image`). One prefill over the prompt + ``[IMG]``, then one single-token step per
        embedding with the KV cache: the input of step k is ``project_up`` of embedding k-1. The official code
        re-runs the whole sequence for each embedding; in exact arithmetic the two are equal.
        """
        n_query = n_query or self.config.n_query
        B = input_ids.shape[0]
        boi = torch.full((B, 1), self.config.boi_token_id, dtype=input_ids.dtype, device=input_ids.device)
        input_ids = torch.cat([input_ids, boi], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        else:
            attention_mask = torch.cat([attention_mask, torch.ones_like(boi)], dim=1)
        padded = not bool(attention_mask.all())
        image_features, frame_features = self._visual_features(images, frames, image_features, frame_features)
        embeds = self.embed(input_ids, image_features, frame_features)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

        # The cache is preallocated for prompt + n_query: a growing cache re-copies all keys/values every step.
        # Each call appends its keys/values after the rows already written (the cache counts them).
        decoder = self._decoder()
        cache = StaticCache(config=self.config.text_config, max_cache_len=input_ids.shape[1] + n_query)
        outputs = []
        step_input, step_positions, mask = embeds, positions, attention_mask
        for k in range(n_query):
            hidden = decoder(
                inputs_embeds=step_input, attention_mask=mask if padded else None, position_ids=step_positions,
                cache=cache, use_cache=True,
            ).last_hidden_state[:, -1]
            outputs.append(self.project_down(hidden))
            if k + 1 < n_query:
                step_input = self.project_up(outputs[-1]).unsqueeze(1)
                step_positions = step_positions[:, -1:] + 1
                if padded:
                    mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        return torch.stack(outputs, dim=1)


# `AutoModelForCausalLM.from_pretrained(converted_dir)` works once `emu2.model` is imported (the config's
# model_type "emu2" is registered with AutoConfig in `emu2.config`).
AutoModelForCausalLM.register(Emu2Config, Emu2ForCausalLM, exist_ok=True)
