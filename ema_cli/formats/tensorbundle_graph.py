"""What each key of a TF2 object-based checkpoint is: model weight or optimizer state.

A ``tf.train.Checkpoint`` stores its object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``, a
``TrackableObjectGraph``): node 0 is the root, each node names its children and lists the
checkpoint keys of its own values. A key is built from *one* path to its node (the shortest),
so keys do not say whose a variable is: a Keras 3 model saved as ``Checkpoint(model=model,
optimizer=opt)`` stores its kernels as ``optimizer/_trainable_variables/0/...`` because the
optimizer's list reaches them in fewer steps than the model's layers. We classify nodes by
reachability instead:

- ``model``: reachable from the root through children without passing through an optimizer
  (or the root's ``save_counter``). Model variables, BatchNorm moving statistics, and any
  other variable a user tracks (``Checkpoint(step=tf.Variable(...))`` too).
- ``slot``: an optimizer's per-variable state: a node listed in some ``slot_variables``
  (TF2/Keras 2 optimizers: Adam ``m``/``v``), or reached only through an optimizer's containers
  (Keras 3 ``_variables``, ``_momentums``, ``_velocities``).
- ``optimizer``: a named direct child of an optimizer that is not its step counter
  (``learning_rate``, ``beta_1``, ``decay``).
- ``counter``: the root's ``save_counter`` and an optimizer's ``iter`` / ``_iterations``.
- ``other``: anything else (a value no path leads to).

An optimizer node is the root's ``optimizer`` child, a node that owns slot variables, or a node
with an ``iter`` or ``_iterations`` child.

TF1 name-based checkpoints (``Saver``) carry no graph: ``classify_name`` guesses from TF's slot
and counter naming conventions instead.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ema_cli.formats.tensorbundle_proto import TrackableNode

ROLES = ("model", "slot", "optimizer", "counter", "other")

_COUNTER_CHILDREN = frozenset({"iter", "_iterations"})

#: TF1 ``tf.compat.v1.train`` optimizers' slot suffixes (``<var>/<Slot>``) and their global
#: accumulators.
_TF1_SLOT_SUFFIXES = (
    "/Adam",
    "/Adam_1",
    "/Momentum",
    "/RMSProp",
    "/RMSProp_1",
    "/Adagrad",
    "/AdagradDA",
    "/Adadelta",
    "/Adadelta_1",
    "/Ftrl",
    "/Ftrl_1",
    "/ProximalAdagrad",
)
_TF1_OPTIMIZER_NAME = re.compile(r"beta[12]_power(_[0-9]+)?")
_TF1_COUNTERS = frozenset({"global_step"})


@dataclass(frozen=True)
class KeyInfo:
    """One checkpoint key: its ``role`` (one of ``ROLES``), the object paths that lead to its
    node (``model/_functional/_operations/1/_kernel``; shortest first), its node id and the
    attribute name (``VARIABLE_VALUE``). Paths of a slot variable read
    ``<variable path>/.OPTIMIZER_SLOT/<optimizer path>/<slot name>``."""

    key: str
    role: str
    paths: tuple[str, ...]
    node_id: int | None = None
    attribute: str = ""


class ObjectGraph:
    """A parsed object graph with every checkpoint key classified (see the module doc)."""

    def __init__(self, nodes: Sequence[TrackableNode]) -> None:
        self.nodes = list(nodes)
        count = len(self.nodes)
        root_children = dict(self.nodes[0].children) if self.nodes else {}
        slot_of: dict[int, tuple[int, int, str]] = {}  # slot node -> (optimizer, var, name)
        optimizers: set[int] = set()
        if "optimizer" in root_children:
            optimizers.add(root_children["optimizer"])
        for node_id, node in enumerate(self.nodes):
            if node.slot_variables:
                optimizers.add(node_id)
            if any(name in _COUNTER_CHILDREN for name, _ in node.children):
                optimizers.add(node_id)
            for slot in node.slot_variables:
                slot_of[slot.slot_variable_node_id] = (
                    node_id,
                    slot.original_variable_node_id,
                    slot.slot_name,
                )
        counters = {root_children["save_counter"]} if "save_counter" in root_children else set()
        direct: set[int] = set()  # named children of an optimizer
        for node_id in optimizers:
            for name, child in self.nodes[node_id].children:
                (counters if name in _COUNTER_CHILDREN else direct).add(child)

        # Breadth first from the root: each node's incoming paths (its parent's shortest path
        # plus the edge's name), shortest first.
        paths: list[list[str]] = [[] for _ in range(count)]
        seen = [False] * count
        queue: deque[int] = deque()
        if count:
            paths[0].append("")
            seen[0] = True
            queue.append(0)
        while queue:
            node_id = queue.popleft()
            prefix = paths[node_id][0]
            for name, child in self.nodes[node_id].children:
                paths[child].append(f"{prefix}/{name}" if prefix else name)
                if not seen[child]:
                    seen[child] = True
                    queue.append(child)
        # A second breadth-first walk that never enters an optimizer (or the save counter):
        # what it reaches belongs to the model, whatever the shortest path says.
        in_model = [False] * count
        if count:
            in_model[0] = True
            queue.append(0)
        while queue:
            node_id = queue.popleft()
            for name, child in self.nodes[node_id].children:
                if child in optimizers or (node_id == 0 and name == "save_counter"):
                    continue
                if not in_model[child]:
                    in_model[child] = True
                    queue.append(child)
        for slot_id, (optimizer, variable, name) in slot_of.items():
            if not paths[slot_id] and paths[variable] and paths[optimizer]:
                paths[slot_id].append(
                    f"{paths[variable][0]}/.OPTIMIZER_SLOT/{paths[optimizer][0]}/{name}"
                )

        self.keys: dict[str, KeyInfo] = {}
        for node_id, node in enumerate(self.nodes):
            if in_model[node_id] and node_id not in counters:
                role = "model"
            elif node_id in slot_of:
                role = "slot"
            elif node_id in counters:
                role = "counter"
            elif node_id in direct:
                role = "optimizer"
            elif seen[node_id]:
                role = "slot"  # reached only through an optimizer's containers
            else:
                role = "other"
            for attribute, key in node.attributes:
                self.keys[key] = KeyInfo(key, role, tuple(paths[node_id]), node_id, attribute)

    def role(self, key: str) -> str:
        """The role of ``key`` (``other`` for a key the graph does not list)."""
        info = self.keys.get(key)
        return info.role if info else "other"

    def paths(self, key: str) -> tuple[str, ...]:
        """The object paths of ``key``'s node (empty for a key the graph does not list)."""
        info = self.keys.get(key)
        return info.paths if info else ()


def classify_name(key: str) -> str:
    """A TF1 name-based key's role from TF's naming: optimizer slots (``w/Adam``,
    ``w/Momentum``), Adam's ``beta1_power``/``beta2_power``, the ``global_step`` counter; every
    other key (EMA shadows included) is ``model``."""
    if key in _TF1_COUNTERS:
        return "counter"
    if _TF1_OPTIMIZER_NAME.fullmatch(key.rsplit("/", 1)[-1]):
        return "optimizer"
    if key.endswith(_TF1_SLOT_SUFFIXES):
        return "slot"
    return "model"


def classify(keys: Sequence[str], graph: ObjectGraph | None) -> Mapping[str, KeyInfo]:
    """Every key's ``KeyInfo``: from the object graph when there is one, else from its name."""
    if graph is not None:
        return {k: graph.keys.get(k, KeyInfo(k, "other", ())) for k in keys}
    return {k: KeyInfo(k, classify_name(k), ()) for k in keys}
