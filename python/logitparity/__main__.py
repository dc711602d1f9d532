"""``python -m logitparity`` (and ``torchrun ... -m logitparity``): the command line."""

import sys

from logitparity.cli import main

sys.exit(main())
