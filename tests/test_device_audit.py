"""Device placement, audited without a GPU: on a CPU-only machine every tensor is on the CPU, so a model or a
tensor left behind there works in every other test and fails (or silently runs on the CPU) only on a GPU. Three
rules over the stages' code (``rlhf_core/trainers``) and the model helpers (``rlhf_core/models``), each found
broken once (the eval, rm-eval, reward-statistics and SFT-sample code ran on the CPU whatever the machine, and the
reward statistics stacked a CPU count onto GPU scores):

1. every model a stage loads is placed: the load is an argument of ``distributed.place``, ``make_engine``,
   ``make_frozen`` or ``apply_lora`` (whose result goes to an engine), or its line says ``# placed:`` why not;
2. no literal CPU device (``torch.device("cpu")``, ``device="cpu"``);
3. a tensor made from Python values (``torch.tensor``, ``zeros``, ``full``, ...) names its ``device=`` or its line
   says ``# host: <why>`` (kept on the CPU on purpose: counters, histograms, bookkeeping moved to the CPU first);
   a marker without its reason does not count, so nothing is waved through by a bare comment.

``distributed.all_reduce_sum`` moves host tensors to the GPU for NCCL, so ``# host`` counters may be reduced.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO

AUDITED = [*(REPO / "rlhf_core" / "trainers").rglob("*.py"), *(REPO / "rlhf_core" / "models").rglob("*.py")]
LOADERS = {"load_causal_lm", "load_reward_model", "load_critic", "initial_policy", "reward_model_for_training"}
PLACERS = {"place", "make_engine", "make_frozen", "apply_lora"}
FACTORIES = {"tensor", "zeros", "ones", "full", "arange", "empty", "rand", "randn", "randint", "eye", "linspace"}


def _name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _calls_with_ancestors(tree: ast.AST):
    """Every call with the calls that enclose it."""
    stack: list[ast.Call] = []

    def visit(node):
        if isinstance(node, ast.Call):
            yield node, list(stack)
            stack.append(node)
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
        if isinstance(node, ast.Call):
            stack.pop()

    yield from visit(tree)


def _marked(lines: list[str], node: ast.AST, marker: str) -> bool:
    """A ``marker: reason`` comment on one of the node's lines (the reason is required)."""
    pattern = re.compile(re.escape(marker.rstrip(":")) + r":\s*\w")
    return any(pattern.search(lines[i - 1]) for i in range(node.lineno, node.end_lineno + 1))


def _problems(path: Path, root: Path = REPO) -> list[str]:
    text = path.read_text()
    lines, tree = text.splitlines(), ast.parse(text)
    where = path.relative_to(root)
    problems = []
    in_trainers = "trainers" in where.parts
    for call, ancestors in _calls_with_ancestors(tree):
        name = _name(call)
        placed = {_name(a) for a in ancestors} & PLACERS or _marked(lines, call, "# placed:")
        if in_trainers and name in LOADERS and not placed:
            problems.append(f"{where}:{call.lineno}: {name}(...) is never placed on the device")
        literal_cpu = (name == "device" and call.args and isinstance(call.args[0], ast.Constant)
                       and call.args[0].value == "cpu")  # fmt: skip
        literal_cpu |= any(k.arg == "device" and isinstance(k.value, ast.Constant) and k.value.value == "cpu"
                           for k in call.keywords)  # fmt: skip
        if literal_cpu and not _marked(lines, call, "# host:"):
            problems.append(f"{where}:{call.lineno}: a literal CPU device")
        is_factory = (
            name in FACTORIES and isinstance(call.func, ast.Attribute) and getattr(call.func.value, "id", "") == "torch"
        )
        if is_factory and not any(k.arg == "device" for k in call.keywords) and not _marked(lines, call, "# host:"):
            problems.append(f"{where}:{call.lineno}: torch.{name}(...) without device= (or a '# host: why' comment)")
    return problems


def test_every_model_and_tensor_of_the_stages_is_placed_on_the_device():
    problems = [p for path in AUDITED for p in _problems(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "code, found",
    [
        ("model = load_causal_lm(path)\n", "never placed"),
        ("model = place(load_causal_lm(path))\n", None),
        ("sample(m, t, q, mask, s, n, torch.device('cpu'))\n", "literal CPU device"),
        ("sums += torch.stack([s.sum(), torch.tensor(float(n))])\n", "without device="),
        ("sums = torch.zeros(3)  # host: a counter\n", None),
        ("sums = torch.zeros(3)  # host\n", "without device="),
        ("model = load_causal_lm(path)  # placed:\n", "never placed"),
        ("bad = torch.tensor(1.0, device=loss.device)\n", None),
    ],
)
def test_the_audit_finds_what_it_should(tmp_path, code, found):
    path = tmp_path / "rlhf_core" / "trainers" / "_audit_probe.py"  # a stage module, outside the source tree
    path.parent.mkdir(parents=True)
    path.write_text(code)
    problems = _problems(path, tmp_path)
    assert (found is None and not problems) or (found and any(found in p for p in problems)), problems
