"""RLHF with PPO-max: trainers, data, models and the algorithm math."""

import os

# Without a GPU, tell DeepSpeed (imported lazily by transformers too) to use its CPU accelerator rather than
# probe for one and warn. A GPU user's environment is left alone.
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
