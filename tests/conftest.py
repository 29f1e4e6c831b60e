import os
import sys

import torch

# One thread: the test problems are tiny, and two OpenMP threads spinning on tiny tensors are much
# slower than one (measured: 24 s vs 574 s for tests/engine on a busy 2-core machine).
torch.set_num_threads(int(os.environ.get("FASTCNF_TEST_THREADS", "1")))

# tests/reference_models.py (shared independent references) is importable from every test file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
