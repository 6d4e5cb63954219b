import sys

from hummingbird_fungi.cli.main import main

sys.exit(main())
