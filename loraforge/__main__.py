import sys

from loraforge.cli import main

sys.exit(main())
