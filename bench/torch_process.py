"""The PyTorch side of bench/list_step.py in a child process (`torch_step.py --serve`), one
step per call: the two runtimes never share a process -- in one process they measurably slow
each other -- while the benchmark still interleaves them step by step. Imports no torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_step.py")


class TorchStepProcess:
    """`build_torch` in a child process: `proc()` runs one step there and waits for it.

    initial: the summed log-probs [K] before any step; last_loss: the loss of the last step;
    versions: the child's torch / transformers versions, threads and whether it runs with
    `perpo_jax.host_memory.keep_host_memory()` (keep_memory, as our side does). Use as a context
    manager (the child is stopped on exit, killed if it does not quit within 30 s).
    """

    def __init__(self, model_dir: str, batch_np: dict, *, seed: int, beta: float, gamma: float,
                 threads: int, keep_memory: bool = True):
        batch_path = os.path.join(model_dir, "torch_batch.npz")
        np.savez(batch_path, **batch_np)
        self.proc = subprocess.Popen(
            [sys.executable, SERVER, "--serve", model_dir, batch_path,
             "--seed", str(seed), "--beta", str(beta), "--gamma", str(gamma),
             "--threads", str(threads), *(["--keep-host-memory"] if keep_memory else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._reply()
        self.initial = np.asarray(ready["initial"], np.float32)
        self.versions = ready["versions"]
        self.last_loss = None

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the torch child process exited with code {code} "
                               "(its stderr above says why)")
        return json.loads(line)

    def __call__(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self.last_loss = self._reply()["loss"]

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
