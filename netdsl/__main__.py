import sys

from netdsl.cli.main import main

sys.exit(main())
