"""`python -m budget_server.ctl` runs budgetctl, for machines without the console script."""

import sys

from budget_server.ctl.main import main

sys.exit(main())
