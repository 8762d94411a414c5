"""scripts/install.sh's checks that run before anything is installed (a pod's torch, a venv's Python)."""
import subprocess
import sys

import pytest

from conftest import ROOT


def fake_system_python(tmp_path, torch_version: str):
    """A Python environment whose `import torch` is a CUDA build of `torch_version` (a stand-in module)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "system")], check=True)
    site = next((tmp_path / "system" / "lib").glob("python3*/site-packages"))
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text(f"__version__ = {torch_version!r}\nclass version:\n    cuda = '12.8'\n")
    return tmp_path / "system" / "bin" / "python"


def install(python, venv):
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), str(venv)], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": str(python)}, timeout=120)


def test_a_pods_cuda_torch_older_than_2_6_stops_the_install(tmp_path):
    """transformers 5 turns torch < 2.6 off: every notebook would fail at model load after a 'successful'
    install (and bitsandbytes would pull a multi-GB PyPI CUDA torch over a torch < 2.4)."""
    done = install(fake_system_python(tmp_path, "2.5.1+cu121"), tmp_path / "venv")
    assert done.returncode == 1 and "older than the 2.6 transformers 5 needs" in done.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run inside a venv")
def test_a_cuda_torch_the_new_venv_cannot_see_stops_the_install(tmp_path):
    """PYTHON pointing at a venv: --system-site-packages shows the base interpreter's packages, not the venv's
    torch, and the install went on with a CPU torch on a GPU pod."""
    done = install(fake_system_python(tmp_path, "2.8.0+cu128"), tmp_path / "venv")
    assert done.returncode == 1 and "sees torch 'none', not" in done.stderr, done.stderr
