import sys

from perflow.cli import main

sys.exit(main())
