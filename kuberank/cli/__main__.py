"""``python -m kuberank.cli ...``: the ``kuberank`` command (the RayJob entrypoint uses it)."""

import sys

from kuberank.cli import main

sys.exit(main())
