"""FunGPT: a GPT-2-style language model and training kit you can read end to end.

    from fungpt import GPT, GPTConfig            # the model (fungpt/model.py)
    from fungpt import RunConfig, train          # the training API used by examples/
    from fungpt import load_tokenizer, prepare   # tokenizers and datasets
"""

from fungpt.config import DataConfig, RunConfig, TrainConfig, load_config
from fungpt.data import BatchLoader, prepare
from fungpt.errors import FunGPTError
from fungpt.model import GPT, GPTConfig
from fungpt.runs import load_run
from fungpt.sample import evaluate_run, sample
from fungpt.sampling import sample_next_token
from fungpt.tokenizer import load_tokenizer
from fungpt.train import train

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "sample_next_token", "RunConfig", "DataConfig", "TrainConfig", "load_config", "train",
    "prepare", "BatchLoader", "load_tokenizer", "load_run", "sample", "evaluate_run", "FunGPTError",
]
