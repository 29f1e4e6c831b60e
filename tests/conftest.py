import os

import torch

# One thread: the test problems are tiny, and two OpenMP threads spinning on tiny tensors are much
# slower than one (measured: 24 s vs 574 s for tests/engine on a busy 2-core machine).
torch.set_num_threads(int(os.environ.get("FASTCNF_TEST_THREADS", "1")))
