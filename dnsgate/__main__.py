"""`python -m dnsgate` is the `dnsgate` command."""

import sys

from .cli import main

sys.exit(main())
