"""Test-session settings."""

import torch

# The tests run many small-tensor loops (d <= a few thousand), where intra-op threading only
# adds overhead; one thread is about twice as fast on the 2-core CI machine.
torch.set_num_threads(1)
