"""Make an installed mergekit-expert known to mergekit's own entry points.

mergekit 0.1.5 has no plugin entry points: a merge method exists only once
something imports the module that registers it, so a plain ``mergekit-yaml`` on
an ``expert_merging`` config fails with ``Unimplemented merge method``. This
module is imported at interpreter start-up by ``mergekit_expert_autoload.pth``
(installed into site-packages next to it). It only puts a one-shot finder at
the front of ``sys.meta_path``; when ``mergekit.merge_methods`` has finished
executing, the finder imports ``mergekit_expert``, whose import registers both
methods, and removes itself.

- Processes that never import mergekit pay for reading this file and one string
  comparison per import, nothing more: no third-party module is imported here.
- ``MERGEKIT_EXPERT_AUTOLOAD=0`` (or ``false``/``no``/``off``) switches it off,
  read at start-up and again when the hook fires.
- No circular import: the hook fires only after ``mergekit.merge_methods`` is
  fully executed, and does nothing while ``mergekit_expert`` is itself being
  imported (that import registers the methods on its own). ``mergekit_expert``
  must import at package level only ``mergekit.merge_methods*`` and
  ``mergekit.architecture*`` (tests/test_autoload.py checks this): those are
  complete when the hook fires, whereas mergekit.merge / card / plan may still
  be half-executed above it.
- A failure to import the plugin never breaks mergekit: it is reported once on
  stderr with what to do, and merges that do not use the methods go on.

This module must stay importable with nothing but the standard library.
"""

import os
import sys

TARGET = "mergekit.merge_methods"
PLUGIN = "mergekit_expert"
ENV = "MERGEKIT_EXPERT_AUTOLOAD"

state = {"fired": False, "error": None}


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _register() -> None:
    """Called once ``mergekit.merge_methods`` is complete."""
    state["fired"] = True
    uninstall()
    if not enabled() or PLUGIN in sys.modules:
        return  # off, or mergekit_expert is importing mergekit and registers itself
    try:
        __import__(PLUGIN)
    except Exception as error:  # never break a merge that does not need us
        state["error"] = error
        sys.stderr.write(
            f"mergekit-expert: could not register expert_merging / "
            f"expert_merging_pp with mergekit ({type(error).__name__}: {error}); "
            f"merges with other methods are unaffected. Fix the installation "
            f"(pip check), import mergekit_expert yourself to see the full "
            f"traceback, or set {ENV}=0 to silence this.\n"
        )


class _Loader:
    """Runs the real loader, then the hook; the module keeps its real loader."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if spec is not None:
                spec.loader = self.loader
        _register()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _Finder:
    """Finds nothing itself: wraps the real loader of ``mergekit.merge_methods``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec

    def invalidate_caches(self):
        pass


FINDER = _Finder()


def install() -> None:
    """Arm the hook (what the .pth file does); idempotent."""
    if not enabled() or TARGET in sys.modules:
        return
    if not any(finder is FINDER for finder in sys.meta_path):
        state["fired"] = False
        sys.meta_path.insert(0, FINDER)


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if finder is not FINDER]
