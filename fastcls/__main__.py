import sys

from fastcls.cli import main

sys.exit(main())
