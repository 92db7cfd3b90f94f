"""`import baton` bounds oneDNN's primitive caches (RSS under mixed shapes), and a
value the user set is kept."""
import os
import subprocess
import sys

SCRIPT = "import os, baton; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])"


def _run(env_updates: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    env.update(env_updates)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True,
                          text=True).stdout.split()


def test_primitive_caches_bounded_by_default():
    assert _run({}) == ["64", "64"]


def test_user_setting_kept():
    assert _run({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "7"}) == ["1024", "7"]
