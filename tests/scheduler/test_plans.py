"""Policies plan without a model: driven here by a fake runner (no weights, no
forward), every policy keeps its invariants on plans alone."""
from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest
import torch

from baton import SamplingParams
from baton.cache import KVBudget, KVSpec
from baton.scheduler import POLICIES
from baton.sequence import Sequence

SRC = Path(__file__).resolve().parents[2] / "src" / "baton"
SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))


def make_policy(name: str, budget: KVBudget, **kw):
    kwargs = dict(max_num_seqs=3, max_prefill_tokens=16)
    if name == "baton-pd":
        kwargs.update(pool_size=2)
    kwargs.update(kw)
    return POLICIES[name](SPEC, budget, **kwargs)


def drive(policy, seqs, arrivals, max_steps=2000):
    """The engine's loop with a fake runner: each sampled row gets token 7; a
    query finishes at max_tokens. Returns {request_id: times finished} and plans."""
    finished, plans, step, pending = {}, [], 0, list(zip(arrivals, seqs))
    while pending or policy.has_work():
        for a, s in [p for p in pending if p[0] <= step]:
            policy.add(s)
            pending.remove((a, s))
        plan = policy.schedule()
        if not plan.empty:
            plans.append(plan)
            for seg in plan.segments:  # a plan is data over allocated caches and queries
                assert len(seg.starts) == len(seg.tokens) == len(seg.sample) == len(seg.owners)
                assert seg.cache.rows >= len(seg.starts)
                assert all(s + len(t) <= seg.cache.width for s, t in zip(seg.starts, seg.tokens))
            policy.commit(plan, plan.useful_tokens)
            for seq in plan.sampled():
                seq.output_ids.append(7)
                if len(seq.output_ids) >= seq.params.max_tokens:
                    seq.finish_reason = "length"
                    seq.status = seq.status.FINISHED
                    policy.release(seq)
                    finished[seq.request_id] = finished.get(seq.request_id, 0) + 1
        assert policy.budget.used <= policy.budget.limit
        step += 1
        assert step < max_steps
    return finished, plans


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_query_ends_once_and_frees_everything(name):
    rng = random.Random(0)
    budget = KVBudget(1 << 22)
    policy = make_policy(name, budget)
    seqs = [Sequence(f"q{i}", [1] * rng.randint(1, 40), SamplingParams(max_tokens=rng.randint(1, 12),
                                                                       temperature=0)) for i in range(12)]
    finished, plans = drive(policy, seqs, [rng.randint(0, 20) for _ in seqs])
    assert finished == {s.request_id: 1 for s in seqs}
    assert budget.used == 0 and budget.resident == 0 and plans


def test_baton_pd_decode_rows_feed_one_token_and_prompts_stay_in_their_own_caches():
    policy = make_policy("baton-pd", KVBudget(1 << 22))
    seqs = [Sequence(f"q{i}", [1] * (5 + 7 * i), SamplingParams(max_tokens=6, temperature=0)) for i in range(6)]
    _, plans = drive(policy, seqs, [0, 0, 1, 2, 3, 4])
    batch_cache = policy.batch.cache  # the same object for the policy's life
    for plan in plans:
        for seg in plan.segments:
            if seg.cache is batch_cache:
                assert all(len(t) == 1 for t in seg.tokens)
            else:
                assert len(seg.starts) == 1  # a pool entry: a one-row cache of its own
    assert any(len(p.segments) >= 2 and p.segments[0].cache is batch_cache for p in plans)


def _imports(path: Path) -> set[str]:
    """Every module a file imports (anywhere in it), as absolute baton names."""
    pkg = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0] + "." + "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_schedulers_never_import_models_or_the_runner():
    for f in (SRC / "scheduler").glob("*.py"):
        bad = {m for m in _imports(f) if m.startswith(("baton.models", "baton.runner", "baton.attention", "torch.nn"))}
        assert not bad, f"{f.name} imports {bad}"


def test_only_the_runner_calls_the_model():
    """No engine-side module calls a model: the runner is the one caller."""
    for f in SRC.rglob("*.py"):
        if f.name == "runner.py" or "bench" in f.parts or "models" in f.parts:
            continue
        text = f.read_text()
        assert "self.model(" not in text and "model.forward(" not in text, f


def test_no_import_cycles():
    """The package's import graph (lazy, in-function imports included) has no cycle."""
    modules = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.relative_to(SRC.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = f
    graph = {m: {i for i in _imports(f) if i in modules and i != m} for m, f in modules.items()}
    # A package's __init__ re-exports its children: importing the package is not a dependency on a child's caller.
    state, stack = {}, []

    def visit(m):
        state[m] = "active"
        stack.append(m)
        for n in graph[m]:
            if n.startswith(m + "."):  # a package importing its own submodule
                continue
            if state.get(n) == "active":
                cycle = stack[stack.index(n):] + [n]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
