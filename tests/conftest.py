import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("EMU2_OFFICIAL_FIXTURE", REPO.parent / "shared" / "fixtures" / "emu2-official-tiny"))
