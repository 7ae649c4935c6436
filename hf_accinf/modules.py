"""Which parameters influence is computed on: the chosen modules and the head that contains them.

Influence is computed on the parameters of chosen modules (names or globs, default: the
classification head). The recorder captures the inputs of the *head*, the one module that contains
every chosen module and whose output are the model's logits, so that the estimators can replay the
head exactly on the rows each step really used (DESIGN.md section 1, "chosen parameters").
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


def select_head(model: nn.Module, patterns: list[str] | None = None, head: str | None = None) -> HeadSelection:
    """Resolve module names or globs to chosen parameters and the head module holding them.

    ``head`` defaults to the common ancestor of the matched modules. Unknown names fail here,
    listing the modules that exist.
    """
    modules = dict(model.named_modules())
    patterns = list(patterns) if patterns else [default_head_name(model)]
    matched: list[str] = []
    for pattern in patterns:
        hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise AccInfError(f"No module of {type(model).__name__} matches '{pattern}'. {_available(model)}.")
        matched.extend(hit for hit in hits if hit not in matched)

    if head is None:
        parts = [name.split(".") for name in matched]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        head = ".".join(common)
    if head not in modules or head == "":
        raise AccInfError(
            f"The chosen modules {matched} share no head module below the model itself; influence is "
            "computed on parameters inside one head whose output are the logits. Choose modules of the head."
        )
    prefix = head + "."
    chosen: list[str] = []
    for name in matched:
        if name != head and not name.startswith(prefix):
            raise AccInfError(f"Module '{name}' is not inside the head '{head}'. Choose modules inside one head.")
        relative = "" if name == head else name[len(prefix) :]
        for param_name, _ in modules[name].named_parameters():
            full = f"{relative}.{param_name}" if relative else param_name
            if full not in chosen:
                chosen.append(full)
    if not chosen:
        raise AccInfError(f"The chosen modules {matched} have no parameters. {_available(model)}.")
    head_params = [name for name, _ in modules[head].named_parameters()]
    chosen.sort(key=head_params.index)
    return HeadSelection(head_name=head, head=modules[head], chosen_parameters=tuple(chosen))
