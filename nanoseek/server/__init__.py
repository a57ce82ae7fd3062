"""The DeepSeek/OpenAI-compatible HTTP API (FastAPI + uvicorn) and its web chat page: `nanoseek serve`."""
