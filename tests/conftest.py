import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("EMU2_OFFICIAL_FIXTURE", REPO.parent / "shared" / "fixtures" / "emu2-official-tiny"))

# The fixture maker seeded torch with this before each Emu2-Gen run (found by matching its RNG stream).
OFFICIAL_GEN_SEED = 400


def official_initial_latents(recorded, num_steps: int):
    """The initial noise of an official Gen run.

    The fixture's ``gen.<run>.latents`` is, despite its README, the last of the unused noise tensors that
    diffusers 0.24's Euler ``step`` draws each step; replaying the seeded stream gives the real initial draw.
    A fixture that records the initial draw itself (as its README says) is returned unchanged.
    """
    import torch

    generator = torch.Generator().manual_seed(OFFICIAL_GEN_SEED)
    draws = [torch.randn(recorded.shape, generator=generator) for _ in range(num_steps + 1)]
    return draws[0] if torch.equal(draws[num_steps], recorded) else recorded
