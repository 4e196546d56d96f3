"""Ray's `worker_process_setup_hook` for the OpenRLHF adapter: `install` here imports nothing of
OpenRLHF. Every worker of the job runs it at startup, vLLM engine actors included, which
OpenRLHF keeps free of DeepSpeed (openrlhf/trainer/ray/__init__.py); so a worker that has not
imported OpenRLHF's trainer modules gets bandadv's classes only when it imports them (the
trainer actors, as Ray unpickles their class), through a finder on `sys.meta_path`.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

TRAINER_MODULES = ("openrlhf.trainer.ppo_trainer", "openrlhf.trainer.ppo_trainer_async")


def install() -> None:
    """bandadv's experience maker and samples generator in OpenRLHF's trainers of this process:
    now if a trainer module is imported already, else when one is."""
    if any(name in sys.modules for name in TRAINER_MODULES):
        _patch()
    elif not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())


_patching = False


def _patch() -> None:
    global _patching
    if _patching:  # the adapter's own imports of the trainer modules, while it loads
        return
    _patching = True
    try:
        from bandadv.integrations.openrlhf import install_classes

        install_classes()
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchAfterImport)]
    finally:
        _patching = False


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds OpenRLHF's trainer modules as the path finder does, with a loader that patches
    them once they have run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in TRAINER_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        _patch()

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... of the file loader
        return getattr(self.loader, name)
