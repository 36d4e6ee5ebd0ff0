import sys

from vmkit.cli.main import main

sys.exit(main())
