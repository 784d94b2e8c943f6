"""Runs one validated prompt with ComfyUI's semantics (docs/comfy-api-contract.md §3.2-3.8).

Plain Python: node classes come from a loader, messages leave through a `notify(event, data, to_client)`
callback, and nothing here knows about HTTP or torch.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import traceback

from .. import graph_utils, progress
from .caching import ResultCache, signature
from .graph import DuplicateNodeError, DynamicPrompt, ExecutionBlocker, is_link
from .schedule import ExecutionList

log = logging.getLogger(__name__)

HIDDEN_FROM_CONTEXT = ("PROMPT", "DYNPROMPT", "EXTRA_PNGINFO", "UNIQUE_ID", "AUTH_TOKEN_COMFY_ORG",
                       "API_KEY_COMFY_ORG")


def now_ms() -> int:
    return int(time.time() * 1000)


def type_name(exc_type: type) -> str:
    module = exc_type.__module__
    return exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"


def format_value(value):
    return value if value is None or isinstance(value, (int, float, bool, str)) else str(value)


class NodeFailure(Exception):
    """A node raised: carries what `execution_error` reports."""

    def __init__(self, node_id: str, class_type: str, error: BaseException, inputs):
        super().__init__(str(error))
        self.node_id = node_id
        self.class_type = class_type
        self.error = error
        self.inputs = inputs


class PromptRun:
    """State of one prompt being executed."""

    def __init__(self, executor: "Executor", prompt_id: str, prompt: dict, extra_data: dict):
        self.ex = executor
        self.prompt_id = prompt_id
        self.dynprompt = DynamicPrompt(prompt)
        self.extra_data = extra_data
        self.client_id = extra_data.get("client_id")
        self.outputs: dict[str, list] = {}  # node id -> one list of values per output slot
        self.ui: dict[str, dict] = {}  # node id -> merged ui object
        self.keys: dict[str, object] = {}  # original node id -> cache key
        self.executed: list[str] = []
        self.pending_async: dict[str, list] = {}
        self.pending_subgraph: dict[str, list] = {}
        self.messages: list = []
        self.current_node: str | None = None
        self.progress_nodes: dict[str, dict] = {}
        self._input_types: dict[str, dict] = {}

    # -- messages ------------------------------------------------------------------------------
    def send(self, event: str, data: dict, broadcast_without_client: bool = False) -> None:
        if self.client_id is not None:
            self.ex.notify(event, data, self.client_id)
        elif broadcast_without_client:
            self.ex.notify(event, data, None)

    def record(self, event: str, data: dict, broadcast_without_client: bool = False) -> None:
        data = {**data, "timestamp": now_ms()}
        self.messages.append([event, data])
        self.send(event, data, broadcast_without_client)

    def progress_state(self, node_id: str, state: str, value: float = 0, maximum: float = 1) -> None:
        d = self.dynprompt
        self.progress_nodes[node_id] = {
            "value": value, "max": maximum, "state": state, "node_id": node_id, "prompt_id": self.prompt_id,
            "display_node_id": d.get_display_node_id(node_id), "parent_node_id": d.get_parent_node_id(node_id),
            "real_node_id": d.get_real_node_id(node_id)}
        self.send("progress_state", {"prompt_id": self.prompt_id, "nodes": dict(self.progress_nodes)}, True)

    # -- node facts ----------------------------------------------------------------------------
    def class_of(self, node_id: str):
        return self.ex.load_class(self.dynprompt.get_node(node_id)["class_type"])

    def input_types(self, class_type: str) -> dict:
        if class_type not in self._input_types:
            self._input_types[class_type] = self.ex.load_class(class_type).INPUT_TYPES()
        return self._input_types[class_type]

    def input_info(self, node_id: str, name: str):
        """(category, options) of a declared input, or (None, None)."""
        types = self.input_types(self.dynprompt.get_node(node_id)["class_type"])
        for category in ("required", "optional", "hidden"):
            # `in` then [], as ComfyUI asks: a pack's dict subclass may claim every name (rgthree's flexible inputs).
            section = types.get(category)  # not `or {}`: such a subclass is empty, hence falsy
            spec = section[name] if section is not None and name in section else None
            if spec is not None:
                options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 else {}
                return category, options if isinstance(options, dict) else {}
        return None, None

    def is_output(self, node_id: str) -> bool:
        return bool(getattr(self.class_of(node_id), "OUTPUT_NODE", False))

    def is_async(self, node_id: str) -> bool:
        cls = self.class_of(node_id)
        return inspect.iscoroutinefunction(getattr(cls, cls.FUNCTION, None))

    # -- results -------------------------------------------------------------------------------
    def result_of(self, node_id: str):
        """This run's outputs of a node, else the cache's (identical sub-graphs share results)."""
        if node_id in self.outputs:
            return self.outputs[node_id]
        key = self.keys.get(node_id)
        cached = self.ex.cache.get(key) if key is not None else None
        if cached is not None:
            self.outputs[node_id] = cached
            ui = self.ex.cache.get_ui(key)
            if ui is not None:
                self.ui.setdefault(node_id, ui)
        return cached

    def has_result(self, node_id: str) -> bool:
        return self.result_of(node_id) is not None

    # -- inputs --------------------------------------------------------------------------------
    def input_data(self, node_id: str):
        """{name: list of values} for one call, and the names of links whose results are missing."""
        node = self.dynprompt.get_node(node_id)
        data: dict[str, list] = {}
        missing: set[str] = set()
        for name, value in node.get("inputs", {}).items():
            category, options = self.input_info(node_id, name)
            if is_link(value) and not (options or {}).get("rawLink"):
                source = self.result_of(value[0])
                if source is None:
                    data[name], missing = [None], missing | {name}
                elif value[1] < len(source):
                    data[name] = source[value[1]]
            elif category is not None:
                data[name] = [value]
        hidden = self.input_types(node["class_type"]).get("hidden") or {}
        for name, kind in hidden.items():
            if kind == "PROMPT":
                data[name] = [self.dynprompt.get_original_prompt()]
            elif kind == "DYNPROMPT":
                data[name] = [self.dynprompt]
            elif kind == "EXTRA_PNGINFO":
                data[name] = [self.extra_data.get("extra_pnginfo")]
            elif kind == "UNIQUE_ID":
                data[name] = [node_id]
            elif kind == "AUTH_TOKEN_COMFY_ORG":
                data[name] = [self.extra_data.get("auth_token_comfy_org")]
            elif kind == "API_KEY_COMFY_ORG":
                data[name] = [self.extra_data.get("api_key_comfy_org")]
        return data, missing


class Executor:
    """Owns the caches and node instances that live across prompts."""

    def __init__(self, load_class, notify, cache_mode: str = "classic", lru_size: int = 0):
        self.load_class = load_class
        self.notify = notify
        self.cache = ResultCache(cache_mode, lru_size)
        self.cache_mode = cache_mode
        self.instances: dict[tuple[str, str], object] = {}

    def reset(self) -> None:
        """Forget every cached result and node instance (`/free` with free_memory)."""
        self.cache.clear()
        self.instances.clear()

    # -- one prompt ----------------------------------------------------------------------------
    async def execute(self, prompt_id: str, prompt: dict, extra_data: dict, outputs_to_execute: list) -> dict:
        progress.clear_interrupt()
        run = PromptRun(self, prompt_id, prompt, extra_data)
        run.record("execution_start", {"prompt_id": prompt_id})
        failure = None
        try:
            await self._prepare_caches(run)
            cached = [n for n in prompt if run.has_result(n)]
            run.record("execution_cached", {"nodes": cached, "prompt_id": prompt_id})
            order = ExecutionList(run.dynprompt, run.has_result,
                                  lambda n, name: run.input_info(n, name)[1], run.is_output, run.is_async)
            for node_id in outputs_to_execute:
                order.add_node(node_id)
            while not order.is_empty():
                node_id = await order.next_node()
                done = await self._execute_node(run, order, node_id)
                if done:
                    order.complete(node_id)
        except (NodeFailure, progress.InterruptProcessingException) as exc:
            failure = exc
        except Exception as exc:  # scheduling errors: cycles, duplicate ids, missing nodes
            failure = NodeFailure(getattr(exc, "node_id", None) or "", "", exc, None)
            if exc.__class__.__name__ == "DependencyCycleError":
                failure.node_id = str(exc)
        finally:
            for tasks in run.pending_async.values():
                for task in tasks:
                    if isinstance(task, asyncio.Task):
                        task.cancel()
        if failure is None:
            run.record("execution_success", {"prompt_id": prompt_id})
        else:
            self._report_failure(run, failure)
        return self._history_outputs(run, failure is None)

    async def _prepare_caches(self, run: PromptRun) -> None:
        prompt = run.dynprompt.original
        present = {(node_id, node["class_type"]) for node_id, node in prompt.items()}
        if self.cache_mode == "none":
            self.instances.clear()
        else:
            for key in [k for k in self.instances if k not in present]:
                del self.instances[key]
        extras = {}
        for node_id, node in prompt.items():
            cls = self.load_class(node["class_type"])
            hidden = (run.input_types(node["class_type"]).get("hidden") or {}).values()
            with_id = bool(getattr(cls, "NOT_IDEMPOTENT", False)) or "UNIQUE_ID" in hidden
            extras[node_id] = (await self._is_changed(run, node_id, node, cls), with_id)
        for node_id in prompt:
            run.keys[node_id] = signature(run.dynprompt, node_id, extras.__getitem__)
        self.cache.start_prompt(set(run.keys.values()))

    async def _is_changed(self, run: PromptRun, node_id: str, node: dict, cls):
        if "is_changed" in node:
            return node["is_changed"]
        if not callable(getattr(cls, "IS_CHANGED", None)):
            return False
        data = {}
        for name, value in node.get("inputs", {}).items():
            category, _ = run.input_info(node_id, name)
            if category is not None:
                data[name] = [None if is_link(value) else value]
        try:
            results = _call_over_lists(cls, cls.IS_CHANGED, data, getattr(cls, "INPUT_IS_LIST", False))
            results = [await r if inspect.isawaitable(r) else r for r in results]
            value = [None if isinstance(r, ExecutionBlocker) else r for r in results]
        except Exception as exc:
            log.warning("IS_CHANGED of node %s failed (%s); it will run again", node_id, exc)
            value = float("nan")
        node["is_changed"] = value  # ComfyUI leaves it in the prompt (and so in saved PNG metadata)
        return value

    async def _execute_node(self, run: PromptRun, order: ExecutionList, node_id: str) -> bool:
        """Runs (or collects) one node; False when it must wait (lazy inputs, expansion, async tasks)."""
        d = run.dynprompt
        node = d.get_node(node_id)
        class_type = node["class_type"]
        cls = self.load_class(class_type)
        display_id = d.get_display_node_id(node_id)
        run.current_node = node_id

        if node_id not in run.pending_async and node_id not in run.pending_subgraph:
            if run.has_result(node_id):  # a cached output node: report its old UI, run nothing
                run.send("executed", {"node": node_id, "display_node": display_id,
                                      "output": run.ui.get(node_id), "prompt_id": run.prompt_id})
                run.progress_state(node_id, "finished")
                return True

        data = None
        try:
            if node_id in run.pending_async:
                results = [r.result() if isinstance(r, asyncio.Task) else r for r in run.pending_async.pop(node_id)]
                outputs, ui, expansions = _unpack_returns(results, cls)
            elif node_id in run.pending_subgraph:
                outputs, ui, expansions = self._collect_subgraph(run, node_id, cls), {}, None
            else:
                data, missing = run.input_data(node_id)
                run.progress_state(node_id, "running")
                run.send("executing", {"node": node_id, "display_node": display_id, "prompt_id": run.prompt_id})
                instance = self._instance(node_id, class_type, cls)
                if missing and hasattr(instance, "check_lazy_status"):
                    wanted = await self._lazy_requests(instance, cls, data, missing)
                    if wanted:
                        for name in wanted:
                            order.make_input_strong_link(node_id, name)
                        return False
                results = await self._call_node(run, node_id, class_type, instance, cls, data)
                if any(isinstance(r, asyncio.Task) and not r.done() for r in results):
                    unblock = order.add_external_block(node_id)
                    run.pending_async[node_id] = results
                    for r in results:
                        if isinstance(r, asyncio.Task) and not r.done():
                            r.add_done_callback(functools.partial(_unblock_when_all_done, results, unblock))
                            break
                    return False
                results = [r.result() if isinstance(r, asyncio.Task) else r for r in results]
                outputs, ui, expansions = _unpack_returns(results, cls)
        except progress.InterruptProcessingException:
            raise
        except Exception as exc:
            raise NodeFailure(d.get_real_node_id(node_id), class_type, exc, data) from exc

        if expansions is not None:
            try:
                self._expand(run, order, node_id, expansions)
            except Exception as exc:
                raise NodeFailure(d.get_real_node_id(node_id), class_type, exc, data) from exc
            return False
        run.outputs[node_id] = outputs
        if ui:
            run.ui[node_id] = ui
            run.send("executed", {"node": node_id, "display_node": display_id, "output": ui,
                                  "prompt_id": run.prompt_id})
        if not d.is_ephemeral(node_id):
            self.cache.put(run.keys.get(node_id), outputs, ui or None)
        run.executed.append(node_id)
        run.progress_state(node_id, "finished")
        return True

    def _instance(self, node_id: str, class_type: str, cls):
        key = (node_id, class_type)
        instance = self.instances.get(key)
        if instance is None:
            instance = cls()
            self.instances[key] = instance
        return instance

    async def _lazy_requests(self, instance, cls, data: dict, missing: set) -> list[str]:
        results = _call_over_lists(cls, instance.check_lazy_status, data, getattr(cls, "INPUT_IS_LIST", False))
        wanted = []
        for r in results:
            r = await r if inspect.isawaitable(r) else r
            for name in r or ():
                if isinstance(name, str) and (name not in data or name in missing) and name not in wanted:
                    wanted.append(name)
        return wanted

    async def _call_node(self, run: PromptRun, node_id: str, class_type: str, instance, cls, data: dict) -> list:
        """Calls FUNCTION once per list index (or once with whole lists); async calls become tasks."""
        function = getattr(instance, cls.FUNCTION)
        input_is_list = bool(getattr(cls, "INPUT_IS_LIST", False))
        reporter = self._progress_reporter(run, node_id)

        def on_blocker(blocker: ExecutionBlocker) -> ExecutionBlocker:
            if blocker.message is None:
                return blocker
            run.send("execution_error", {
                "prompt_id": run.prompt_id, "node_id": node_id, "node_type": class_type,
                "executed": list(run.executed), "exception_message": f"Execution Blocked: {blocker.message}",
                "exception_type": "ExecutionBlocked", "traceback": [], "current_inputs": [],
                "current_outputs": []}, broadcast_without_client=True)
            return ExecutionBlocker(None)

        results: list = []
        for index, kwargs in _calls(data, input_is_list):
            progress.throw_exception_if_processing_interrupted()
            blocker = _find_blocker(kwargs, input_is_list)
            if blocker is not None:
                results.append(on_blocker(blocker))
                continue
            graph_utils.set_default_prefix(node_id, index)
            token = progress.set_reporter(reporter)
            try:
                if inspect.iscoroutinefunction(function):
                    results.append(asyncio.get_running_loop().create_task(function(**kwargs)))
                else:
                    results.append(function(**kwargs))
            finally:
                progress.reset_reporter(token)
        return results

    def _progress_reporter(self, run: PromptRun, node_id: str):
        def report(value, total, preview):
            run.send("progress", {"value": value, "max": total, "prompt_id": run.prompt_id, "node": node_id},
                     broadcast_without_client=True)
            run.progress_state(node_id, "running", value, total)
            if preview is not None:
                self.notify("__preview__", {"preview": preview, "node_id": node_id, "prompt_id": run.prompt_id,
                                            "meta": run.dynprompt.meta(node_id)}, run.client_id)

        return report

    def _expand(self, run: PromptRun, order: ExecutionList, node_id: str, expansions: list) -> None:
        d = run.dynprompt
        collected = []
        for graph, result in expansions:
            if graph is None:
                collected.append((False, result))
                continue
            for new_id in graph:
                if d.has_node(new_id):
                    raise DuplicateNodeError(f"Attempt to add duplicate node {new_id}. Ensure node ids are "
                                             "unique and deterministic or use graph_utils.GraphBuilder.")
            new_outputs = []
            for new_id, info in graph.items():
                d.add_ephemeral_node(new_id, info, node_id, info.get("override_display_id", node_id))
                if run.is_output(new_id):
                    new_outputs.append(new_id)
            for new_id in new_outputs:
                order.add_node(new_id)
            for value in result or ():
                if is_link(value):
                    order.add_strong_link(value[0], node_id)
            collected.append((True, result))
        run.pending_subgraph[node_id] = collected

    def _collect_subgraph(self, run: PromptRun, node_id: str, cls) -> list:
        resolved = []
        for from_graph, result in run.pending_subgraph.pop(node_id):
            if not from_graph:
                resolved.append(result)
                continue
            values = []
            for value in result:
                if is_link(value):
                    values.extend(run.result_of(value[0])[value[1]])
                else:
                    values.append(value)
            resolved.append(tuple(values))
        return _merge_outputs(resolved, cls)

    def _report_failure(self, run: PromptRun, failure: NodeFailure | progress.InterruptProcessingException) -> None:
        if isinstance(failure, progress.InterruptProcessingException):
            node_id = run.dynprompt.get_real_node_id(run.current_node) if run.current_node else None
            node_type = run.dynprompt.get_node(node_id)["class_type"] if node_id else None
            run.record("execution_interrupted", {"prompt_id": run.prompt_id, "node_id": node_id,
                                                 "node_type": node_type, "executed": list(run.executed)},
                       broadcast_without_client=True)
            return
        error = failure.error
        is_cycle = error.__class__.__name__ == "DependencyCycleError"
        inputs = failure.inputs
        run.record("execution_error", {
            "prompt_id": run.prompt_id,
            "node_id": failure.node_id,
            "node_type": failure.class_type or _class_of(run, failure.node_id),
            "executed": list(run.executed),
            "exception_message": "Dependency cycle detected" if is_cycle else f"{error}\n",
            "exception_type": "graph.DependencyCycleError" if is_cycle else type_name(type(error)),
            "traceback": [] if is_cycle else traceback.format_tb(error.__traceback__),
            "current_inputs": [] if is_cycle else {k: [format_value(v) for v in vals]
                                                     for k, vals in (inputs or {}).items()},
            "current_outputs": [] if is_cycle else list(run.dynprompt.original),
        })
        if not is_cycle:
            log.error("prompt %s: node %s (%s) failed:\n%s", run.prompt_id, failure.node_id, failure.class_type,
                      "".join(traceback.format_exception(error)))

    def _history_outputs(self, run: PromptRun, success: bool) -> dict:
        outputs, meta = {}, {}
        for node_id in list(run.dynprompt.original) + list(run.dynprompt.ephemeral):
            ui = run.ui.get(node_id)
            if ui is None and node_id in run.keys:
                ui = self.cache.get_ui(run.keys[node_id])
            if ui is not None:
                outputs[node_id] = ui
                meta[node_id] = run.dynprompt.meta(node_id)
        return {"outputs": outputs, "meta": meta,
                "status": {"status_str": "success" if success else "error", "completed": success,
                           "messages": run.messages}}


def _class_of(run: PromptRun, node_id: str):
    try:
        return run.dynprompt.get_node(node_id)["class_type"]
    except Exception:
        return None


def _unblock_when_all_done(results: list, unblock, _done_task=None) -> None:
    """A done-callback: unblocks the node once every task among its results has finished."""
    pending = [r for r in results if isinstance(r, asyncio.Task) and not r.done()]
    if pending:
        pending[0].add_done_callback(functools.partial(_unblock_when_all_done, results, unblock))
    else:
        unblock()


def _calls(data: dict, input_is_list: bool):
    """(call index, kwargs) for each call: element i of every input list, or its last element if shorter."""
    if input_is_list:
        yield 0, dict(data)
        return
    longest = max((len(v) for v in data.values()), default=0)
    if longest == 0:
        yield 0, {}
        return
    for i in range(longest):
        yield i, {k: v[i if i < len(v) else -1] for k, v in data.items()}


def _find_blocker(kwargs: dict, input_is_list: bool):
    for value in kwargs.values():
        if input_is_list:
            for item in value:
                if isinstance(item, ExecutionBlocker):
                    return item
        elif isinstance(value, ExecutionBlocker):
            return value
    return None


def _call_over_lists(cls, function, data: dict, input_is_list: bool) -> list:
    return [function(**kwargs) for _, kwargs in _calls(data, input_is_list)]


def _unpack_returns(results: list, cls):
    """Per-call return values -> (outputs per slot, merged ui, expansions or None)."""
    n_outputs = len(getattr(cls, "RETURN_TYPES", ()))
    tuples, uis, expansions, expanded = [], [], [], False
    for r in results:
        if isinstance(r, dict):
            if "ui" in r and r["ui"] is not None:
                uis.append(r["ui"])
            result = r.get("result")
            if isinstance(result, ExecutionBlocker):
                result = (result,) * n_outputs
            if "expand" in r:
                expanded = True
                expansions.append((r["expand"], result))
            elif "result" in r:
                tuples.append(result)
                expansions.append((None, result))
        else:
            if isinstance(r, ExecutionBlocker):
                r = (r,) * n_outputs
            elif r is None:
                r = ()
            tuples.append(r)
            expansions.append((None, r))
    ui: dict[str, list] = {}
    for u in uis:
        for key, values in u.items():
            ui.setdefault(key, [])
            # ComfyUI concatenates each key's sequences, so a node's (value,) tuple merges like a list.
            ui[key].extend(values if isinstance(values, (list, tuple)) else [values])
    if expanded:
        return None, ui, expansions
    return (_merge_outputs(tuples, cls) if tuples else []), ui, None


def _merge_outputs(tuples: list, cls) -> list:
    width = len(tuples[0]) if tuples else 0
    is_list = list(getattr(cls, "OUTPUT_IS_LIST", None) or [False] * width)
    merged = []
    for slot in range(width):
        if slot < len(is_list) and is_list[slot]:
            values: list = []
            for t in tuples:
                item = t[slot]
                values.extend([item] if isinstance(item, ExecutionBlocker) else item)
            merged.append(values)
        else:
            merged.append([t[slot] for t in tuples])
    return merged
