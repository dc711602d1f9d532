import sys

from logitparity.cli import main

sys.exit(main())
