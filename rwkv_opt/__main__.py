"""`python -m rwkv_opt` = the `rwkv-opt` command."""

import sys

from rwkv_opt.cli import main

sys.exit(main())
