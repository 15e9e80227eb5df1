"""``python -m orchestrator_client`` is ``orchestrator-client``."""

import sys

from orchestrator_client.cli import main

sys.exit(main())
