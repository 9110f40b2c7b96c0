"""A ComfyUI API-format graph, checked as a whole before anything runs.

`{"<node id>": {"class_type": ..., "inputs": {name: value | [source node id, output index]}}}`.
Every problem is collected (not only the first), each naming the node id, its class_type and the
input, so a client can show them next to the nodes as ComfyUI's front end does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from genserve.workflows.nodes import NODES, Input

MAX_NODES = 500


@dataclass(frozen=True)
class NodeError:
    node_id: str
    class_type: str
    input: str | None
    type: str  # ComfyUI's error type: required_input_missing, value_not_in_list, ...
    message: str

    def describe(self) -> str:
        where = f"node {self.node_id} ({self.class_type})"
        return f"{where}, input '{self.input}': {self.message}" if self.input else f"{where}: {self.message}"


class WorkflowError(ValueError):
    """The graph cannot run. `errors` lists every problem found, each naming its node."""

    def __init__(self, errors: list[NodeError], kind: str = "prompt_outputs_failed_validation") -> None:
        super().__init__("; ".join(error.describe() for error in errors))
        self.errors = errors
        self.kind = kind


@dataclass(frozen=True)
class Link:
    node: str
    output: int


@dataclass
class GraphNode:
    id: str
    class_type: str
    inputs: dict[str, Any]  # literal values, or Link
    title: str | None = None

    def link(self, name: str) -> Link | None:
        value = self.inputs.get(name)
        return value if isinstance(value, Link) else None


@dataclass
class Graph:
    nodes: dict[str, GraphNode]
    order: list[str] = field(default_factory=list)  # topological: sources first

    @property
    def outputs(self) -> list[str]:
        return [node_id for node_id in self.order if NODES[self.nodes[node_id].class_type].output_node]


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def parse_graph(prompt: Any) -> Graph:
    """The graph, validated: known nodes, every required input, links to existing nodes and outputs
    of the right type, literal values in range, no cycles, at least one output node. Raises
    WorkflowError listing every problem."""
    if not isinstance(prompt, dict) or not prompt:
        raise WorkflowError(
            [NodeError("", "", None, "invalid_prompt", "the prompt must be a non-empty object of nodes")],
            "invalid_prompt",
        )
    if len(prompt) > MAX_NODES:
        message = f"the prompt has {len(prompt)} nodes; at most {MAX_NODES}"
        raise WorkflowError([NodeError("", "", None, "invalid_prompt", message)], "invalid_prompt")
    errors: list[NodeError] = []
    nodes: dict[str, GraphNode] = {}
    for node_id, raw in prompt.items():
        node = _read_node(str(node_id), raw, errors)
        if node is not None:
            nodes[node.id] = node
    for node in nodes.values():
        _check_inputs(node, nodes, prompt, errors)
    if errors:
        raise WorkflowError(errors)
    graph = Graph(nodes, order=_topological_order(nodes))
    if not graph.outputs:
        error = NodeError(
            "", "", None, "prompt_no_outputs", "the prompt has no output node (SaveImage, PreviewImage)"
        )
        raise WorkflowError([error], "prompt_no_outputs")
    return graph


def _read_node(node_id: str, raw: Any, errors: list[NodeError]) -> GraphNode | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("class_type"), str):
        errors.append(NodeError(node_id, "", None, "invalid_prompt", "a node needs a class_type string"))
        return None
    class_type = raw["class_type"]
    if class_type not in NODES:
        message = f"node type '{class_type}' is not supported; see GET /object_info"
        errors.append(NodeError(node_id, class_type, None, "invalid_prompt", message))
        return None
    inputs = raw.get("inputs", {})
    if not isinstance(inputs, dict):
        errors.append(NodeError(node_id, class_type, None, "invalid_prompt", "inputs must be an object"))
        return None
    meta = raw.get("_meta")
    title = meta.get("title") if isinstance(meta, dict) and isinstance(meta.get("title"), str) else None
    values = {
        name: Link(str(value[0]), value[1]) if _is_link(value) else value for name, value in inputs.items()
    }
    return GraphNode(node_id, class_type, values, title)


def _check_inputs(
    node: GraphNode, nodes: dict[str, GraphNode], prompt: dict, errors: list[NodeError]
) -> None:
    spec = NODES[node.class_type]
    for name, expected in [*spec.inputs.items(), *spec.optional.items()]:
        required = name in spec.inputs

        def fail(kind: str, message: str, name: str = name) -> None:
            errors.append(NodeError(node.id, node.class_type, name, kind, message))

        if name not in node.inputs:
            if required:
                fail("required_input_missing", "required input is missing")
            continue
        value = node.inputs[name]
        if isinstance(value, Link):
            _check_link(value, expected, nodes, prompt, fail)
        elif expected.is_link:
            fail("bad_linked_input", f"expects a link [node id, output index] to a {expected.type} output")
        else:
            problem = literal_problem(value, expected)
            if problem is not None:
                fail(*problem)


def _check_link(link: Link, expected: Input, nodes: dict[str, GraphNode], prompt: dict, fail: Any) -> None:
    source = nodes.get(link.node)
    if source is None:
        if link.node in prompt:  # the source node has errors of its own
            return
        fail("bad_linked_input", f"links to node {link.node}, which is not in the prompt")
        return
    outputs = NODES[source.class_type].outputs
    if not 0 <= link.output < len(outputs):
        fail(
            "bad_linked_input",
            f"links to output {link.output} of node {link.node} ({source.class_type}), "
            f"which has {len(outputs)} output(s)",
        )
        return
    if outputs[link.output] != expected.type:
        fail(
            "return_type_mismatch",
            f"expects {expected.type}; output {link.output} of node {link.node} ({source.class_type}) "
            f"is {outputs[link.output]}",
        )


def literal_problem(value: Any, expected: Input) -> tuple[str, str] | None:
    """(error type, message) when a literal input is wrong for its spec, else None. Lists filled
    in by the server (`choices`) are checked when the graph is planned."""
    if expected.options:
        if value not in expected.options:
            return "value_not_in_list", f"'{value}' is not one of {list(expected.options)}"
        return None
    if expected.choices:
        return None if isinstance(value, str) and value else ("invalid_input_type", "expects a name")
    if expected.type == "INT":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            return "invalid_input_type", f"expects an integer, got {json.dumps(value)[:40]}"
    elif expected.type == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "invalid_input_type", f"expects a number, got {json.dumps(value)[:40]}"
    elif expected.type == "STRING":
        return None if isinstance(value, str) else ("invalid_input_type", "expects a string")
    elif expected.type == "BOOLEAN":
        return None if isinstance(value, bool) else ("invalid_input_type", "expects true or false")
    if expected.min is not None and value < expected.min:
        return "value_smaller_than_min", f"{value} is below the minimum {expected.min:g}"
    if expected.max is not None and value > expected.max:
        return "value_bigger_than_max", f"{value} is above the maximum {expected.max:g}"
    return None


def _topological_order(nodes: dict[str, GraphNode]) -> list[str]:
    """Sources first (Kahn's algorithm, ties by node id); a cycle raises WorkflowError naming its nodes."""
    upstream = {
        node_id: {value.node for value in node.inputs.values() if isinstance(value, Link)}
        for node_id, node in nodes.items()
    }
    order: list[str] = []
    ready = sorted((n for n, deps in upstream.items() if not deps), key=_sort_key)
    remaining = {n: set(deps) for n, deps in upstream.items() if deps}
    while ready:
        node_id = ready.pop(0)
        order.append(node_id)
        freed = [n for n, deps in remaining.items() if node_id in deps and len(deps) == 1]
        for deps in remaining.values():
            deps.discard(node_id)
        for n in freed:
            del remaining[n]
        ready = sorted([*ready, *freed], key=_sort_key)
    if remaining:
        errors = [
            NodeError(n, nodes[n].class_type, None, "dependency_cycle", "is part of a cycle of links")
            for n in sorted(remaining, key=_sort_key)
        ]
        raise WorkflowError(errors, "dependency_cycle")
    return order


def _sort_key(node_id: str) -> tuple[int, int | str]:
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)
