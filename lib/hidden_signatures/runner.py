"""`python -m hidden_signatures.runner`: kept as an entry point; the runner is `run.runner`."""

import sys

from hidden_signatures.run.runner import main

if __name__ == "__main__":
    sys.exit(main())
