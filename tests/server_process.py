"""The spawned server the tests share with the benchmarks (bench/server_process.py)."""

from bench.server_process import API_KEY, ServerProcess, free_port, running_server

__all__ = ["API_KEY", "ServerProcess", "free_port", "running_server"]
