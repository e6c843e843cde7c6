"""FunGPT: a GPT-2-style language model and training kit you can read end to end.

    from fungpt import GPT, GPTConfig            # the model (fungpt/model.py)
    from fungpt import RunConfig, train          # the training API used by examples/
    from fungpt import load_tokenizer, prepare   # tokenizers and datasets
"""

from fungpt import _startup

_startup.install()  # only when this process is the fungpt command: Ctrl-C during the imports below is one line

from fungpt.config import DataConfig, RunConfig, TrainConfig, load_config  # noqa: E402
from fungpt.data import BatchLoader, prepare  # noqa: E402
from fungpt.errors import FunGPTError  # noqa: E402
from fungpt.model import GPT, GPTConfig  # noqa: E402
from fungpt.runs import load_run  # noqa: E402
from fungpt.sample import evaluate_run, sample  # noqa: E402
from fungpt.sampling import sample_next_token  # noqa: E402
from fungpt.tokenizer import load_tokenizer  # noqa: E402
from fungpt.train import train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "GPT", "GPTConfig", "sample_next_token", "RunConfig", "DataConfig", "TrainConfig", "load_config", "train",
    "prepare", "BatchLoader", "load_tokenizer", "load_run", "sample", "evaluate_run", "FunGPTError",
]
