"""Nothing reaches the Hugging Face Hub at import: bitsandbytes (which diffusers imports whenever it is installed)
looks a kernel up on the Hub while its module runs; emu2 runs that module with the Hub lookup offline."""

import os
import subprocess
import sys
import textwrap


def test_bitsandbytes_is_imported_with_the_hub_offline_and_the_setting_restored(tmp_path):
    # A stand-in bitsandbytes that records the Hub setting its import ran under.
    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "from huggingface_hub import constants\nHUB_OFFLINE_AT_IMPORT = constants.HF_HUB_OFFLINE\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import importlib.util
        import emu2
        from huggingface_hub import constants
        assert importlib.util.find_spec("bitsandbytes") is not None  # diffusers asks first, then imports
        import bitsandbytes
        assert bitsandbytes.__file__.startswith({str(tmp_path)!r})
        print(bitsandbytes.HUB_OFFLINE_AT_IMPORT, constants.HF_HUB_OFFLINE)
    """)
    env_free = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_free, check=True)
    assert out.stdout.split() == ["True", "False"]
