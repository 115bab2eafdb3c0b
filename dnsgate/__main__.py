"""`python -m dnsgate` is the `dnsgate` command."""

import sys

from dnsgate.cli.main import main

sys.exit(main())
