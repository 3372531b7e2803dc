import sys

from infscale.cli import main

sys.exit(main())
