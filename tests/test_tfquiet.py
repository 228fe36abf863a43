"""TensorFlow's load-time oneDNN notice is kept off stderr, and nothing else is (tfquiet.py)."""

from __future__ import annotations

import subprocess
import sys

from digitflow.tfquiet import NOTICES


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter of this environment, its output captured."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", **env},
    )


def test_tensorflow_loads_without_its_notice_after_the_defaults() -> None:
    code = (
        "import os\n"
        "from digitflow.config import set_environment_defaults\n"
        "set_environment_defaults()\n"
        "import keras\n"
        "import tensorflow as tf\n"
        "print(float(tf.reduce_sum(tf.constant([1.0, 2.0]))), keras.__version__)\n"
        "os.write(2, b'after the import\\n')\n"
    )
    result = _python(code, TF_ENABLE_ONEDNN_OPTS="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("3.0 ")
    assert "after the import" in result.stderr  # stderr is back where it was
    for notice in NOTICES:
        assert notice not in result.stderr


def test_only_the_notice_is_dropped_even_when_the_process_aborts() -> None:
    code = (
        "import os\n"
        "from digitflow.tfquiet import NOTICES, stderr_without\n"
        "with stderr_without():\n"
        "    for notice in NOTICES:\n"
        "        os.write(2, f'I0000 port.cc:153] {notice} more\\n'.encode())\n"
        "    os.write(2, b'why the import failed\\n')\n"
        "    os.abort()\n"
    )
    result = _python(code)
    assert result.returncode != 0
    assert result.stderr == "why the import failed\n"
