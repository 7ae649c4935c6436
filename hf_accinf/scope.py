"""Which parameters influence is computed on: the scope, and the head the recorder captures.

Influence is computed on the parameters of chosen modules, the *scope* (DESIGN.md sections 1 and 6b).
One set of rules reads ``modules`` at record and at score time (:func:`resolve_scope`): module or
parameter names, globs, ``head`` (the classification head), ``all``, or ``last:k`` (the last ``k``
transformer blocks and every parameter after them); a name that matches nothing is tried inside the head.
At score time the scope may lie anywhere in the model. At record time the recorder captures the inputs
of the *head*, the one module that contains the whole scope and whose output are the model's logits
(:func:`select_head`: the scope's deepest common module, so ``all`` and ``last:k`` are refused there);
:func:`describe_scopes` lists the choices for ``hf-accinf summary``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .errors import AccInfError


@dataclass(frozen=True)
class HeadSelection:
    head_name: str
    head: nn.Module
    chosen_parameters: tuple[str, ...]  # names relative to the head


def default_head_name(model: nn.Module) -> str:
    """The last ``nn.Linear`` whose width is the number of labels: the classification head of HF classifiers."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (num_labels is None or module.out_features == num_labels)
    ]
    if not candidates:
        raise AccInfError(
            f"Could not find the classification head of {type(model).__name__}: no nn.Linear with "
            f"{num_labels} outputs. Pass the module names explicitly (modules=['...'])."
        )
    return candidates[-1]


def _available(model: nn.Module) -> str:
    names = [name for name, module in model.named_modules() if name and any(True for _ in module.parameters(False))]
    shown = ", ".join(names[-30:])
    more = f" (last 30 of {len(names)})" if len(names) > 30 else ""
    return f"Modules with parameters{more}: {shown}"


ALL = "all"
HEAD = "head"  # the recorded classification head, by name
LAST_PREFIX = "last:"


@dataclass(frozen=True)
class Scope:
    """The parameters that carry ``Delta`` (full ``named_parameters`` names, in the model's order)."""

    parameters: tuple[str, ...]
    patterns: tuple[str, ...]

    def inside(self, module: str) -> tuple[str, ...] | None:
        """The scope's names relative to ``module`` when every one lies inside it, else ``None``."""
        prefix = module + "."
        if module and all(name.startswith(prefix) for name in self.parameters):
            return tuple(name[len(prefix):] for name in self.parameters)
        return None


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` holding the model's repeated blocks (``encoder.layer`` of BERT and ViT):
    the ModuleList with the most parameters, or ``None`` when the model has none."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        return None
    return max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def _last_blocks(model: nn.Module, spec: str) -> list[str]:
    count = spec[len(LAST_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise AccInfError(f"'{spec}': write last:k with k >= 1 (the last k blocks and everything above them).")
    found = transformer_blocks(model)
    if found is None:
        raise AccInfError(f"'{spec}' needs a model whose blocks sit in one nn.ModuleList; "
                          f"{type(model).__name__} has none. {_available(model)}.")
    name, blocks = found
    k = int(count)
    if k > len(blocks):
        raise AccInfError(f"'{spec}': {name} has only {len(blocks)} blocks; use last:1 .. last:{len(blocks)} or all.")
    first = f"{name}.{len(blocks) - k}."
    names = [param for param, _ in model.named_parameters()]
    start = next(i for i, param in enumerate(names) if param.startswith(first))
    # "Above" the blocks: every parameter registered after the first of the chosen blocks (HF models
    # register embeddings, blocks, final norm/pooler, head in forward order).
    return names[start:]


def resolve_scope(model: nn.Module, patterns: list[str] | None, head: str | None = None) -> Scope:
    """Resolve ``modules`` to parameter names: module names or globs (``bert.encoder.layer.1*``), ``all``,
    ``last:k``. A name that matches no module of the model is also tried inside ``head`` (the recorded
    head's own names, e.g. ``weight``). ``None``: the default classification head."""
    patterns = list(patterns) if patterns else [default_head_name(model)]
    modules = dict(model.named_modules())
    order = [name for name, _ in model.named_parameters()]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == HEAD:
            pattern = head or default_head_name(model)
        if pattern == ALL:
            chosen.update(order)
            continue
        if pattern.startswith(LAST_PREFIX):
            chosen.update(_last_blocks(model, pattern))
            continue
        hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        params = [name for name in order if fnmatch.fnmatchcase(name, pattern)]
        if not hits and not params and head:
            inner = f"{head}.{pattern}"
            hits = [name for name in modules if fnmatch.fnmatchcase(name, inner)]
            params = [name for name in order if fnmatch.fnmatchcase(name, inner)]
        if not hits and not params:
            raise AccInfError(f"No module of {type(model).__name__} matches '{pattern}'. {_available(model)}. "
                              f"{describe_scopes(model)}")
        chosen.update(params)
        for hit in hits:
            chosen.update(f"{hit}.{name}" for name, _ in modules[hit].named_parameters())
    if not chosen:
        raise AccInfError(f"The modules {patterns} hold no parameters. {_available(model)}.")
    return Scope(parameters=tuple(name for name in order if name in chosen), patterns=tuple(patterns))


def describe_scopes(model: nn.Module) -> str:
    """The scope choices of ``model``, one per line, with their parameter counts (for ``hf-accinf summary``)."""
    def count(names) -> int:
        sizes = dict((name, p.numel()) for name, p in model.named_parameters())
        return sum(sizes[name] for name in names)

    try:
        head = default_head_name(model)
        lines = [f"  {head:<24} {count(resolve_scope(model, [head]).parameters):>10,d} parameters (head: the closed-form fast path)"]
    except AccInfError:
        lines = []
    found = transformer_blocks(model)
    if found is not None:
        name, blocks = found
        for k in range(1, len(blocks) + 1):
            lines.append(f"  last:{k:<19} {count(_last_blocks(model, f'last:{k}')):>10,d} parameters "
                         f"({name}.{len(blocks) - k}.. and everything above)")
    lines.append(f"  {ALL:<24} {count(n for n, _ in model.named_parameters()):>10,d} parameters (the whole model)")
    return "Scopes (--modules; names and globs of modules also work):\n" + "\n".join(lines)


def select_head(model: nn.Module, patterns: list[str] | None = None, head: str | None = None) -> HeadSelection:
    """The record-time scope: ``patterns`` resolved by :func:`resolve_scope`, the head module holding them.

    ``head`` defaults to the deepest module containing every chosen parameter; it must lie below the model
    itself. Unknown names fail here, listing the modules that exist.
    """
    modules = dict(model.named_modules())
    scope = resolve_scope(model, patterns, head)
    owners = [name.rpartition(".")[0] for name in scope.parameters]
    if head is None:
        common: list[str] = []
        for level in zip(*[owner.split(".") for owner in owners]):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        head = ".".join(common)
    if head not in modules or head == "":
        raise AccInfError(
            f"The chosen modules {sorted(set(owners))} share no head module below the model itself; influence is "
            "computed on parameters inside one head whose output are the logits. Choose modules of the head."
        )
    relative = scope.inside(head)
    if relative is None:
        outside = next(owner for owner in owners if not (owner + ".").startswith(head + "."))
        raise AccInfError(f"Module '{outside}' is not inside the head '{head}'. Choose modules inside one head.")
    return HeadSelection(head_name=head, head=modules[head], chosen_parameters=relative)
