"""`import baton` changes nothing process-wide; an engine starting bounds oneDNN's
primitive caches (RSS under mixed shapes), keeps a value the user set, and sets
the thread count only when asked."""
import os
import subprocess
import sys

SCRIPT = """
import os, torch, baton
from baton import platform
names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
print(*[os.environ.get(n, "unset") for n in names])
threads = torch.get_num_threads()
platform.configure("cpu")
print(*[os.environ.get(n, "unset") for n in names], torch.get_num_threads() == threads)
platform.configure("cpu", num_threads=1)
print(torch.get_num_threads())
"""


def _run(env_updates: dict) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_updates)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True, text=True).stdout
    return [line.split() for line in out.strip().splitlines()]


def test_import_has_no_side_effects_and_engine_start_bounds_caches():
    at_import, at_start, threads = _run({})
    assert at_import == ["unset", "unset"]
    assert at_start == ["64", "64", "True"]
    assert threads == ["1"]


def test_user_setting_kept():
    _, at_start, _ = _run({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "7"})
    assert at_start == ["1024", "7", "True"]
