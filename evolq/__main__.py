import sys

from evolq.cli import main

sys.exit(main())
