"""The process's heap policy (comfy_serverless/heap.py): large tensors come from glibc's main heap, whichever
thread allocates them, so freed activations are reused instead of paying fresh page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from comfy_serverless import cli, heap

IN_HEAP = ("import torch\n"
           "def in_heap(t):\n"
           "    for line in open('/proc/self/maps'):\n"
           "        if line.rstrip().endswith('[heap]'):\n"
           "            low, high = (int(x, 16) for x in line.split()[0].split('-'))\n"
           "            return low <= t.data_ptr() < high\n"
           "    return False\n")


def printed_words(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", IN_HEAP + code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_large_tensors_come_from_the_heap_once_models_load():
    """models/loading.py keeps freed memory for reuse: a 40 MB tensor is heap memory, not a fresh mapping."""
    assert printed_words("before = in_heap(torch.empty(10 * 2**20))\n"
                         "import comfy_serverless.models.loading\n"
                         "print(before, in_heap(torch.empty(10 * 2**20)))\n") == ["False", "True"]


@pytest.mark.parametrize("one_arena", [True, False])
def test_a_worker_threads_tensors_come_from_the_main_heap(one_arena):
    """Without one arena a thread's 8-100 MB tensors live in its own arena's heaps (the control run)."""
    code = ("import threading\n"
            f"from comfy_serverless import heap\nif {one_arena}: heap.share_one_arena()\n"
            "import comfy_serverless.models.loading\n"
            "found = []\n"
            "def work():\n"
            "    found.extend(in_heap(torch.empty(mb * 2**18)) for mb in (8, 40, 100))\n"
            "thread = threading.Thread(target=work)\nthread.start()\nthread.join()\nprint(*found)\n")
    assert printed_words(code) == [str(one_arena)] * 3


def test_the_server_shares_one_arena_before_it_starts_a_thread(monkeypatch):
    order = []

    class StopHere(Exception):
        pass

    def app(*_args):
        order.append("app")
        raise StopHere

    monkeypatch.setattr(heap, "share_one_arena", lambda: order.append("one arena"))
    monkeypatch.setattr("comfy_serverless.server.app.App", app)
    settings = cli.parse("serve", [])
    with pytest.raises(StopHere):
        cli.serve(settings, [], None)
    assert order == ["one arena", "app"]
