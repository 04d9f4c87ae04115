"""What a newcomer meets first: an example run without its optional dependency names the install command."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_diffusion_example_without_diffusers_names_the_install_command():
    # diffusers hidden as if it were not installed (an entry of None in sys.modules makes its import fail)
    code = ("import sys, runpy; sys.modules['diffusers'] = None; sys.argv = ['diffusion_boft.py']; "
            "runpy.run_path('examples/diffusion_boft.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == 'diffusers is missing: pip install "diffusers>=0.30" (in a clone: pip install -e ' \
                                  '".[diffusers]")'
