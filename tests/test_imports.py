"""torchvision imported without torch._dynamo (seconds off every start), and torch._dynamo whole when used."""

import os
import subprocess
import sys

from tests.conftest import write_image

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    """Run code in a fresh interpreter (this one has imported torchvision already); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_cpu_run_never_imports_torch_dynamo(tmp_path):
    """The whole job on the CPU (imports, model, plan, decode, forward, Parquet), in a process of its own."""
    for index in range(3):
        write_image(tmp_path / "in" / f"{index}.jpg", seed=index)
    out = _python(f"""
import sys
from pathlib import Path
from pipeline import runner
from pipeline.config import Config
summary = runner.run(Config(Path({str(tmp_path / 'in')!r}), Path({str(tmp_path / 'out')!r}), weights="random",
                            device="cpu", workers=1, batch_size=2))
print(summary.ok, "torch._dynamo" in sys.modules, "torchvision" in sys.modules)
""")
    assert out.split() == ["3", "False", "True"]


def test_torch_dynamo_and_roi_align_work_as_usual_afterwards():
    out = _python("""
import sys
import torch
from pipeline.imports import import_torch
import_torch()
import torchvision
from torchvision.ops import roi_align
image = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
print(roi_align(image, torch.tensor([[0, 0.0, 0.0, 10.0, 10.0]]), (1, 1), aligned=True).item())
print("torch._dynamo" in sys.modules)
import torch._dynamo
from torch._dynamo.utils import is_compile_supported
print(type(torch._dynamo.utils.counters).__name__, sys.modules["torchvision.ops.roi_align"].is_compile_supported("cpu")
      == is_compile_supported("cpu"))
""")
    assert out.split() == ["49.5", "False", "defaultdict", "True"]


def test_any_other_use_of_the_stand_in_imports_the_real_module():
    """Code importing torch._dynamo while torchvision imports (a future torchvision, say) gets the real thing."""
    out = _python("""
import sys
import torch
from pipeline.imports import DYNAMO_UTILS, dynamo_deferred
with dynamo_deferred():
    stand_in = sys.modules[DYNAMO_UTILS]
    import torch._dynamo
    from torch._dynamo.utils import counters
    print(sys.modules[DYNAMO_UTILS] is not stand_in, type(counters).__name__, hasattr(stand_in, "__file__"))
print(sys.modules[DYNAMO_UTILS].__file__.endswith("utils.py"))
""")
    assert out.split() == ["True", "defaultdict", "False", "True"]


def test_the_command_never_imports_pandas_which_pyarrow_would(tmp_path):
    """A stand-in pandas that notes its import: pyarrow imports it on its first array; `pipeline classify` does not."""
    (tmp_path / "site" / "pandas").mkdir(parents=True)
    marker = tmp_path / "pandas-imported"
    (tmp_path / "site" / "pandas" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('the test stand-in of pandas')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    subprocess.run([sys.executable, "-c", "import pyarrow; pyarrow.array([1])"], env=env, check=True, timeout=120)
    assert marker.exists()  # the stand-in works: pyarrow imports pandas when it can
    marker.unlink()
    write_image(tmp_path / "in" / "a.jpg", seed=1)

    done = subprocess.run([sys.executable, "-m", "pipeline", "classify", str(tmp_path / "in"), str(tmp_path / "out"),
                           "--weights", "random", "--device", "cpu", "--workers", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert done.returncode == 0, done.stderr
    assert "images=1 ok=1" in done.stderr and not marker.exists()
