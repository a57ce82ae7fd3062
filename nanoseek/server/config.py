"""ServeConfig: the flags of `nanoseek serve` (kept apart from app.py so the CLI can build its
parser without importing FastAPI)."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import arg
from ..engine.llm import COMPILE_HELP, COMPILES, QUANTIZATION_HELP, QUANTIZATIONS

API_KEY_ENV = "NANOSEEK_API_KEY"


@dataclass
class ServeConfig:
    model: str = arg("smollm2-135m", "built-in name, .gguf file or Hugging Face folder")
    host: str = arg("127.0.0.1", "address to bind (loopback by default; 0.0.0.0 exposes the server)")
    port: int = arg(8000, "TCP port (0 = any free port; the URL is printed when ready)")
    api_key: str | None = arg(None, f"Bearer token required on /v1 routes (or set ${API_KEY_ENV}, "
                                    "which keeps it out of the process list)")
    served_model_name: str | None = arg(None, "model id clients send and /v1/models lists (default: --model's name)")
    max_num_seqs: int = arg(16, "sequences the engine batches at once")
    max_queue: int = arg(64, "requests waiting beyond max-num-seqs before new ones get 503")
    request_timeout: float = arg(600.0, "seconds a request may run before it ends with finish_reason 'abort' "
                                        "(0 = no limit)")
    shutdown_timeout: float = arg(30.0, "on SIGTERM: seconds running requests may take before being aborted")
    max_request_bytes: int = arg(4 * 2**20, "largest request body; bigger ones get 413")
    allowed_origins: str | None = arg(None, "comma-separated origins allowed by CORS (default: CORS off)")
    price_input_cache_hit: float = arg(0.14, "USD per million prompt tokens served by the prefix cache")
    price_input_cache_miss: float = arg(0.55, "USD per million prompt tokens computed")
    price_output: float = arg(2.19, "USD per million generated tokens (reasoning included)")
    max_model_len: int | None = arg(None, "context length (default: the model's)")
    kv_cache_gb: float = arg(1.0, "KV-cache pool size in GiB")
    dtype: str = arg("auto", "float32 | bfloat16 | float16 | auto (bfloat16 on CUDA and bf16-capable CPUs)")
    device: str = arg("auto", "cpu | cuda | auto")
    quantization: str = arg("auto", QUANTIZATION_HELP, choices=list(QUANTIZATIONS))
    compile: str = arg("auto", COMPILE_HELP, choices=list(COMPILES))
    log_level: str = arg("warning", "uvicorn's log level: debug | info | warning | error")

    def __post_init__(self):
        checks = [("max_num_seqs", self.max_num_seqs >= 1), ("max_queue", self.max_queue >= 0),
                  ("request_timeout", self.request_timeout >= 0), ("shutdown_timeout", self.shutdown_timeout >= 0),
                  ("max_request_bytes", self.max_request_bytes >= 1), ("port", 0 <= self.port < 65536),
                  ("price_input_cache_hit", self.price_input_cache_hit >= 0),
                  ("price_input_cache_miss", self.price_input_cache_miss >= 0), ("price_output", self.price_output >= 0)]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')} is out of range: {getattr(self, bad[0])!r}")
