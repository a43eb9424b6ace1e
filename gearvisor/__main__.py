import sys

from gearvisor.cli import main

sys.exit(main())
