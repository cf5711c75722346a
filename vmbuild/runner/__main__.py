"""``python -m vmbuild.runner run IMAGE.vmx ...`` (and the zipapp's entry point)."""

import sys

from vmbuild.runner.main import main

sys.exit(main(sys.argv[1:]))
