"""Where things are: the repository (the golden vectors' directory is in ``golden.py``).

A plain module (not conftest.py, of which the suite has several) so that tests can import it.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
