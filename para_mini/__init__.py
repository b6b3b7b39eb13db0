"""para-mini: LLaMA-2 with PARA / PARADE, in a few readable files."""
from .model import ModelArgs, Transformer
from .loading import load_model
from .tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from .adapters import (AdapterConfig, add_adapter, count_parameters, load_adapter, merge_lora, remove_adapter,
                       save_adapter)
from .serving import Tenants
