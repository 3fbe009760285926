"""A teacher served by vLLM or SGLang: ``read_topk`` turns one answer into fastkd's top-k,
``fill_cache`` fills a ``TeacherCache`` from a server (bounded concurrency, retries, resume).
Standard library only (``urllib``, ``concurrent.futures``); see docs/topk.md."""
from .client import ServingError, fill_cache, request_body
from .formats import FORMATS, read_topk

__all__ = ["read_topk", "fill_cache", "request_body", "ServingError", "FORMATS"]
