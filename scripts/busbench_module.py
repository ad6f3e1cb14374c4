"""busbench.py (../shared/bench/busbench.py beside the repository, or
$BUSBENCH) loaded as a module, for the scripts that reuse its clients."""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = os.environ.get("BUSBENCH", os.path.join(ROOT, "..", "shared", "bench", "busbench.py"))


def load():
    if not os.path.exists(PATH):
        sys.exit("%s: busbench.py not found (set BUSBENCH=path)" % os.path.basename(sys.argv[0]))
    spec = importlib.util.spec_from_file_location("busbench", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
