import sys

from radai.cli import main

sys.exit(main())
