import os

import torch

# deterministic, small thread count on CI (2 cores)
torch.set_num_threads(int(os.environ.get("FASTCNF_TEST_THREADS", "2")))
