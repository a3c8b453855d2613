"""`python -m adclr.train ...` (and `torchrun --nproc_per_node=K -m adclr.train ...`) is `adclr train ...`."""
import sys

from ..cli import main

sys.exit(main(["train", *sys.argv[1:]]))
