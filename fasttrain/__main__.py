"""`python -m fasttrain ...`: see fasttrain.cli."""
import sys

from fasttrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
