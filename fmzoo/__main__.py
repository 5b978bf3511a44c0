import sys

from fmzoo.cli import main

sys.exit(main())
