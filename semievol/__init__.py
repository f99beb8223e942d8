"""semievol: evolve a large language model with a little labeled data and a lot of
unlabeled data (SemiEvol). ``import semievol`` never imports torch or openai."""
from .backends import Backend, load_backend
from .config import FinetuneConfig, RunConfig
from .errors import (BackendError, BackendUnavailable, BudgetExceeded, ConfigError, DataError,
                     FinetuneFailed, SemievolError)
from .types import ChatExample, Example, Generation, Message, Task, Usage

__version__ = "0.1.0"

__all__ = [
    "Backend", "load_backend", "FinetuneConfig", "RunConfig", "Example", "Generation",
    "Message", "ChatExample", "Task", "Usage", "SemievolError", "DataError", "ConfigError",
    "BackendError", "BackendUnavailable", "BudgetExceeded", "FinetuneFailed",
]
