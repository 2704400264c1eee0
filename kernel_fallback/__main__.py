"""``python -m kernel_fallback``: the ``kernel-fallback`` command."""

from __future__ import annotations

from kernel_fallback._cli import main

raise SystemExit(main())
