"""`torchrun -m hidden_signatures.distributed`: kept as an entry point; the command is `run.distributed`."""

import sys

from hidden_signatures.run.distributed import main

if __name__ == "__main__":
    sys.exit(main())
