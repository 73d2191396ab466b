"""emu2: Emu2 ("Generative Multimodal Models are In-Context Learners") — model, training, evaluation, serving."""

import logging as _logging

# transformers imports torchao (the optional CPU quantization backend, `emu2[quant]`) whenever it is installed;
# torchao then logs, at import, that its CUDA-only kernels are absent and that torch deprecates one of its enum
# registrations. Neither concerns a user of emu2, and both would clutter stderr of every command.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
