"""seedrand without its optional dependencies: `import seedrand` and `seedrand.rewrite` need neither onnx,
onnxscript, onnxruntime, transformers nor matplotlib, and a feature that needs one names the extra to install. Each
package is made unimportable in a fresh process by a meta-path finder, as in an environment without it."""

import subprocess
import sys

BLOCK = """
import importlib.machinery, sys
class Missing:
    # a spec without origin (importlib.util.find_spec callers such as Dynamo's skip rules see no files) whose
    # loading fails as for an absent package
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"onnx", "onnxscript", "onnxruntime", "transformers", "matplotlib"}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Missing())
"""

USE = """
import torch, seedrand
from seedrand import SeedrandError
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
x = torch.randn(2, 4)
gm = seedrand.rewrite(model, {"version": 1, "rules": [{"match": {"modules": ["0"]}, "random": {}},
                                                    {"match": {"modules": ["2"]}, "filter_gates": {}}]}, (x,))
gm(x).sum().backward()
seedrand.collect_garbage(gm)
print(seedrand.summary(gm).total.regenerated)
for call in (lambda: seedrand.export_onnx(gm, x, "m.onnx"), lambda: seedrand.zoo.gpt2()):
    try:
        call()
    except SeedrandError as e:
        print(e)
assert not any(m.partition(".")[0] in {"onnx", "onnxscript", "transformers", "matplotlib"} for m in sys.modules)
"""


def test_seedrand_works_without_its_optional_dependencies(tmp_path):
    code = BLOCK + "import seedrand.zoo\n" + USE
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(8 * 4)
    assert "ONNX export needs onnx, which is not installed: pip install 'seedrand[onnx]'" in lines[1]
    assert "needs transformers, which is not installed: pip install 'seedrand[transformers]'" in lines[2]
