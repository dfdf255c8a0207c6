"""Running kfp components and pipelines on this machine with kfp's local SubprocessRunner."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def init_local_runner(pipeline_root: str | os.PathLike) -> Path:
    """Initialise ``kfp.local`` to run tasks as subprocesses of this interpreter.

    Tasks run ``python3`` from PATH, so this interpreter's bin directory goes first; each task
    runs ``pip install kfp==<pinned> --no-deps``, a no-op since the pinned kfp is installed.
    Task scratch (TMPDIR) goes to one short-named directory of its own: short, because Ray
    (started by the fine-tuning task or later in this process) puts UNIX sockets under TMPDIR
    and their paths may not exceed 107 bytes.
    """
    import tempfile

    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(
        tempfile.mkdtemp(prefix="kuberank-kfp-", dir="/tmp" if Path("/tmp").is_dir() else None)
    )
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    os.environ["TMPDIR"] = str(scratch)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root
