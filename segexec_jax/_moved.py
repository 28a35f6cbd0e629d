"""The flat module names of earlier versions (`segexec_jax.retrieval`, `segexec_jax.train`, ...)
still import: each is the module at its new place in the subpackages, the same object.

`segexec_jax.model`, `.segment` and `.data` are packages now; their old names resolve through
the package (`model/__init__.py`). The command lines keep their names as modules of their own.
`forward` and `generate` are not aliased: importing a module by those names would replace the
package's functions of the same name (`segexec_jax.forward`) with the module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "numerics": "model.numerics", "rope": "model.rope", "attention": "model.attention",
    "splash": "model.splash", "sharding": "model.sharding",
    "roles": "segment.roles", "retrieval": "segment.retrieval",
    "objective": "segment.objective", "reference": "segment.reference", "streaming": "segment.streaming",
    "tokenization": "data.tokenization", "synthetic": "data.synthetic",
    "safetensors_io": "interop.safetensors_io", "gguf_io": "interop.gguf_io",
    "optim": "training.optim", "metrics": "training.metrics", "checkpoint": "training.checkpoint",
    "train": "training.loop",
    "decode": "inference.decode", "infer": "inference.infer",
    "scoring": "evaluation.scoring",
}
_PACKAGE = __name__.rpartition(".")[0]


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package == _PACKAGE and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(f"{_PACKAGE}.{MOVED[spec.name.rpartition('.')[2]]}")
        self._spec = module.__spec__  # importlib sets the alias's spec on it; put the real one back
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
