import sys

from vla.gpucheck import main

sys.exit(main())
