"""`python -m msrnn_jax.cli ...`: the `msrnn` command."""

import sys

from . import main

sys.exit(main())
