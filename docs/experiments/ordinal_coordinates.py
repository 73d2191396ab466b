"""Does an ordinal code for the coordinate tokens let the chat model ground? Writes a copy of a model directory
whose `<patch_index_k>` input and output embeddings are a smooth code of k / 224 (8 cosine and 8 sine frequencies
on a fixed random orthonormal basis, around the rows' mean, at their mean spread), so that neighbouring coordinates
look alike to the model instead of being 257 unrelated classes.

    python docs/experiments/ordinal_coordinates.py runs/quickstart/stage2 OUT
    emu2 train shapes-chat model.init_from=OUT data.root=runs/quickstart/data output_dir=CHAT steps=154

Then `emu2.eval.shapes.evaluate_instructions(Emu2Pipeline.from_pretrained(CHAT), DATA, items=200)`. Result in
docs/training-notes.md, "Grounding writes the shape of a box, not the object's box".
"""
# ruff: noqa
import math, sys, shutil
from pathlib import Path
import torch
from emu2.pipelines import Emu2Pipeline
from emu2 import processing as P

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
pipe = Emu2Pipeline.from_pretrained(src)
tok = pipe.tokenizer
ids = tok.convert_tokens_to_ids([f"<patch_index_{k:04d}>" for k in range(P.NUM_PATCH_INDEX_TOKENS)])
emb_in = pipe.model.get_input_embeddings().weight
emb_out = pipe.model.language_model.get_output_embeddings().weight
g = torch.Generator().manual_seed(0)
D = emb_in.shape[1]
t = torch.tensor([min(k, P.COORD_BINS) / P.COORD_BINS for k in range(P.NUM_PATCH_INDEX_TOKENS)])
m = 8
feats = torch.cat([torch.cos(math.pi * j * t[:, None]) for j in range(1, m + 1)] +
                  [torch.sin(math.pi * j * t[:, None]) for j in range(1, m + 1)], 1)  # (257, 2m)
feats = feats / feats.norm(dim=1, keepdim=True)
basis = torch.linalg.qr(torch.randn(D, 2 * m, generator=g))[0].T  # (2m, D) orthonormal rows
with torch.no_grad():
    for w in (emb_in, emb_out):
        rows = w[ids]
        shared = rows.mean(0)
        code = feats @ basis
        norm = (rows - shared).norm(dim=1).mean()
        w[ids] = shared + code * norm
pipe.save_pretrained(dst)
print("wrote", dst, "rows", len(ids))
