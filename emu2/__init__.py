"""emu2: Emu2 ("Generative Multimodal Models are In-Context Learners") — model, training, evaluation, serving."""

import logging as _logging

# transformers imports torchao (the optional CPU quantization backend, `emu2[quant]`) whenever it is installed;
# torchao then logs, at import, that its CUDA-only kernels are absent and that torch deprecates one of its enum
# registrations. Neither concerns a user of emu2, and both would clutter stderr of every command.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


class _BitsandbytesWithoutHub:
    """diffusers imports bitsandbytes (the optional ``emu2[quant]``) whenever it is installed, and bitsandbytes, on
    a CPU with AVX512-BF16, fetches a matmul kernel from the Hugging Face Hub at import: a network call (a download
    where the Hub answers) in every process that touches the visual decoder, and a warning where it does not.
    bitsandbytes falls back to its own CPU kernels when the lookup fails, so its module runs with the Hub lookup
    in offline mode (`huggingface_hub.constants.HF_HUB_OFFLINE`, read by ``kernels`` at call time) and that
    fallback's warning muted, both restored after it. A meta-path finder that wraps only that one import."""

    resolving = False  # find_spec asks the other finders, which would ask this one again

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes" or self.resolving:
            return None
        import importlib.util

        self.resolving = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.resolving = False
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_offline(module):
                from huggingface_hub import constants

                levels = {name: _logging.getLogger(name).level for name in ("bitsandbytes", "kernels")}
                offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
                for name in levels:
                    _logging.getLogger(name).setLevel(_logging.ERROR)
                try:
                    exec_module(module)
                finally:
                    constants.HF_HUB_OFFLINE = offline
                    for name, level in levels.items():
                        _logging.getLogger(name).setLevel(level)

            spec.loader.exec_module = exec_offline
        return spec


def _install_bitsandbytes_finder():
    import sys

    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _BitsandbytesWithoutHub) for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesWithoutHub())


_install_bitsandbytes_finder()
