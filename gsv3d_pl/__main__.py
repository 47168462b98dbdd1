import sys

from gsv3d_pl.cli import main

if __name__ == "__main__":
    sys.exit(main())
