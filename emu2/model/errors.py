"""Errors raised when weights do not fit the model, shared by `Emu2ForCausalLM.from_pretrained` and the
converters in `emu2.convert` (which import the model, so the error lives below both)."""

from __future__ import annotations


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model: names the missing and unexpected keys."""

    def __init__(self, missing: list[str], unexpected: list[str], shape_errors: list[str] = ()):
        self.missing, self.unexpected, self.shape_errors = missing, unexpected, list(shape_errors)
        lines = ["checkpoint does not match the model config"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", self.shape_errors)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title} keys: {shown}")
        super().__init__("\n".join(lines))
