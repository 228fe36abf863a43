"""TensorFlow imported without its load-time oneDNN notice on stderr.

With oneDNN on (`TF_ENABLE_ONEDNN_OPTS=1`, set by config.set_environment_defaults: on an AMD
EPYC without AVX-512 it trains twice as fast, docs/benchmarks.md), loading TensorFlow 2.21
prints, twice, "All log messages before absl::InitializeLog() is called are written to STDERR"
and "oneDNN custom operations are on ...", whatever `TF_CPP_MIN_LOG_LEVEL` says: the C++ log is
not set up yet when the notice is written, an Abseil behaviour reported upstream
(abseil/abseil-cpp#1957). Every command that trains or predicts showed those four lines.

`install()` puts a finder on `sys.meta_path` that wraps the first import of the `tensorflow`
package, from whatever module it comes (keras, mlflow, the project): while it runs, file
descriptor 2 goes through `grep -v` of the notice's two lines. Nothing else is dropped, nor
delayed, and an import that crashes the process (TensorFlow aborts on a CPU without the
instructions it was built for) still shows why.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on.",
)
"""Lines that contain one of these are left out while TensorFlow loads."""


@contextmanager
def stderr_without(notices: tuple[str, ...] = NOTICES) -> Iterator[None]:
    """File descriptor 2, for the duration, passed through `grep -v` of the `notices` (fixed
    strings, line by line as they come). grep is a process of its own, so what was written
    before a crash still reaches stderr; without grep, stderr is left as it is."""
    grep = shutil.which("grep")
    if grep is None:
        yield
        return
    command = [grep, "-v", "--line-buffered", "-F", *(f"-e{notice}" for notice in notices)]
    sys.stderr.flush()
    original = os.dup(2)
    sieve = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=original)
    assert sieve.stdin is not None
    os.dup2(sieve.stdin.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)
        os.close(original)
        sieve.stdin.close()
        sieve.wait()


class _QuietLoader(importlib.abc.Loader):
    """The package's own loader, executing the package under stderr_without."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with stderr_without():
            self.inner.exec_module(module)

    def __getattr__(self, name: str) -> object:  # resource readers and the like
        return getattr(self.inner, name)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders do, once, and wraps its loader."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and the search below must not find this finder
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def install() -> None:
    """Quiet the next import of TensorFlow in this process (nothing if it is already loaded)."""
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietTensorFlow) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())
