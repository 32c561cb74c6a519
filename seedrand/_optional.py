"""Optional dependencies: each feature that needs one imports it through :func:`require`, which names the extra to
install when it is missing. ``import seedrand`` and ``seedrand.rewrite`` need none of them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import SeedrandError

__all__ = ["require", "EXTRAS"]

# module -> the extra of pyproject.toml that installs it
EXTRAS = {"onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "transformers": "transformers",
          "peft": "peft",
          "matplotlib": "demo", "sklearn": "demo"}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (dotted) for ``feature``.

    Raises:
        SeedrandError: the module is not installed; the message names the feature and ``pip install
            'seedrand[EXTRA]'``.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.partition(".")[0]
        if e.name is None or e.name.partition(".")[0] != top:
            raise  # the module is there but one of its own imports fails: not a missing extra
        raise SeedrandError(f"{feature} needs {top}, which is not installed: pip install "
                            f"'seedrand[{EXTRAS.get(top, top)}]'") from None


def pyplot(feature: str) -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only), for ``feature``.

    Raises:
        SeedrandError: matplotlib is not installed (names ``pip install 'seedrand[demo]'``).
    """
    require("matplotlib", feature).use("Agg")
    return require("matplotlib.pyplot", feature)
