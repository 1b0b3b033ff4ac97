import sys

from tltk.cli import main

sys.exit(main())
