"""``python -m semla.registry.synth``: write datasets or a contact sheet (see ``--help``)."""

import sys

from semla.registry.synth.writer import main

sys.exit(main())
