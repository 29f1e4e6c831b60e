import sys

from fastcnf.cli import main

sys.exit(main())
