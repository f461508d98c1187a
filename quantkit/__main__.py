"""``python -m quantkit`` runs the command line (see :mod:`quantkit.cli`)."""
import sys

from .cli import main

sys.exit(main())
