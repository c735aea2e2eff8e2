"""The guide's toy algorithm, taken from docs/adding-an-algorithm.md, passes the conformance checks."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-an-algorithm.md"


@pytest.fixture
def probe_registered():
    from bpfree.algorithms import ALGORITHMS

    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    module = types.ModuleType("bpfree_guide_probe")
    sys.modules[module.__name__] = module
    try:
        exec(compile(blocks[0], str(GUIDE), "exec"), module.__dict__)  # noqa: S102 - our own documentation
        yield blocks
    finally:
        ALGORITHMS._entries.pop("probe", None)  # keep the registry as other tests expect it
        sys.modules.pop(module.__name__, None)


def test_the_guide_algorithm_conforms_and_its_own_test_passes(probe_registered, tmp_path, one_thread):
    import test_conformance

    test_conformance.test_learns_resumes_and_counts_every_step("probe", tmp_path, one_thread)
    test_conformance.test_everything_owned_is_on_the_run_device_and_predict_changes_nothing("probe", one_thread)
    own_test = probe_registered[-1]
    namespace: dict = {"torch": torch}
    exec(compile(own_test, str(GUIDE), "exec"), namespace)  # noqa: S102
    namespace["test_probe_trains_only_the_head"](one_thread)
