import sys

from corral.supervisor.cli import main

sys.exit(main())
