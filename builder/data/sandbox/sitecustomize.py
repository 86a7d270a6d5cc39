"""Loaded by the kernel-sandbox subprocess: the training stack and the network are out of reach, as on Kaggle."""

import importlib.abc
import os
import socket

# Kaggle's image has torch, transformers and peft: a twin that carries them (builder.twin.SANDBOX_TORCH) lets them in.
BLOCKED = {"builder"} if os.environ.get("MAPBUILD_SANDBOX_TORCH") else {"builder", "torch", "transformers", "peft"}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the kernel sandbox")
        return None


def _no_network(*args, **kwargs):
    raise OSError("network access is blocked in the kernel sandbox")


import sys  # noqa: E402

sys.meta_path.insert(0, _Block())
socket.socket.connect = _no_network
socket.create_connection = _no_network
