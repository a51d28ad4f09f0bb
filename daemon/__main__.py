import sys

from everlearn.daemon.cli import main

sys.exit(main())
