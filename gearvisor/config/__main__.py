"""`python -m gearvisor.config --markdown`: print the config reference table of README.md.

README.md's table is this output, and a test keeps the two in sync."""

import sys

from gearvisor.config.reference import markdown_reference

if sys.argv[1:] == ["--markdown"]:
    print(markdown_reference())
else:
    print("usage: python -m gearvisor.config --markdown", file=sys.stderr)
    sys.exit(2)
