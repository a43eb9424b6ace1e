import sys

from gearvisor.cli.main import main

sys.exit(main())
