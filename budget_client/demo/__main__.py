"""`python -m budget_client.demo` (and `make demo`)."""

import sys

from budget_client.demo._run import main

sys.exit(main())
