import sys

from edgeflex.cli import main

sys.exit(main())
