"""``fastvlm coverage``: every model type of the installed transformers' image-text-to-text mapping, what fastvlm
fuses in it, what it does not and why.

Static (the default, seconds): class inspection. The family's modeling module and those of its default sub-configs
(the vision tower's, e.g. CLIP for LLaVA) are searched for classes a recipe names, and for modular copies of them
(a class whose code is a recipe class's code under other names: transformers' modular converter makes one per family
that reuses a class); ``fastvlm.patch`` recognises both. What the code alone cannot tell comes from ``NOTES``, a data
table: families whose connectors are recognised by structure at patch time (fastvlm/integrations/structure.py),
the ops fastvlm has no kernel for yet, and families with nothing to fuse.

``--build``: each model is built from its default configuration on the meta device (no memory, no download); each
module a recipe names is listed with its path, and each module recognition by structure would consider is given
random weights on the CPU and recognised and confirmed on its probes, as ``fastvlm.patch`` does. Minutes.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from dataclasses import dataclass, field

from fastvlm.coverage_notes import NOTES

STATUSES = ("fused", "partly fused", "not fused", "nothing to fuse", "unavailable", "unlisted")


@dataclass
class Coverage:
    model_type: str
    model_class: str
    fused: list = field(default_factory=list)  # "what (how)"
    not_fused: str = ""  # what is not fused, and why
    status: str = "unlisted"

    def row(self):
        return (self.model_type, self.status, "; ".join(self.fused) or "-", self.not_fused or "-")


def mapping():
    """{model type: model class name} of the installed transformers' image-text-to-text mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _modeling_module(model_type, model_class=""):
    """The module that defines the family's model class (the mapping's class), else the model type's module."""
    import transformers

    cls = getattr(transformers, model_class, None) if model_class else None
    if cls is not None:
        return importlib.import_module(cls.__module__)
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _default_config(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CONFIG_MAPPING[model_type]()


def _modules_of(model_type, model_class=""):
    """The family's modeling module, then those of its default sub-configs (vision tower, ...)."""
    own = _modeling_module(model_type, model_class)
    mods = [own]
    try:
        cfg = _default_config(model_type)
    except Exception:
        return mods
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        where = type(sub).__module__ if sub is not None else ""
        if where.startswith("transformers.models.") and ".configuration_" in where:
            try:
                mod = importlib.import_module(where.replace(".configuration_", ".modeling_"))
            except Exception:
                continue
            if mod not in mods:
                mods.append(mod)
    return mods


def _classes(mod):
    import torch.nn as nn

    return [c for c in vars(mod).values()
            if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == mod.__name__]


def static(model_type, model_class=""):
    """Coverage of one family by class inspection and ``NOTES``."""
    from fastvlm.integrations.behaviour import copy_of
    from fastvlm.integrations.transformers import LINEAR_SLOTS
    from fastvlm.nn import recipe_for

    cov = Coverage(model_type, model_class)
    kind, text = NOTES.get(model_type, (None, ""))
    try:
        mods = _modules_of(model_type, model_class)
    except Exception as exc:
        why = f"not importable here ({type(exc).__name__}: {str(exc)[:120]})"
        cov.not_fused = f"{text.partition(' | ')[2] or text}; {why}" if text else why
        cov.status = "nothing to fuse" if kind == "nothing" else "unavailable"
        return cov
    slots = {owner: attr for owner, attr in LINEAR_SLOTS}
    for i, mod in enumerate(mods):
        for cls in _classes(mod):
            if recipe_for(cls) is not None:
                cov.fused.append(f"{cls.__name__} (recipe)")
            elif copy_of(cls) is not None:
                cov.fused.append(f"{cls.__name__} (structure: a copy of {copy_of(cls)[0].cls})")
            if i == 0 and cls.__name__ in slots:  # the family's own model class
                cov.fused.append(f"{cls.__name__}.{slots[cls.__name__]} (recipe: Linear)")
    return _classify(cov, kind, text)


def _classify(cov, kind, text):
    if kind == "structure":
        cov.fused.append(f"{text} (structure)")
    elif kind in ("unsupported", "nothing", "unavailable"):
        cov.not_fused = text
        cov.fused = []  # a class recognised (a copy with an unsupported activation, say) but not swapped
    elif kind == "partly":
        fused, _, rest = text.partition(" | ")
        if fused:
            cov.fused.append(f"{fused} (structure)")
        cov.not_fused = rest
    if kind == "nothing":
        cov.status = "nothing to fuse"
    elif kind == "unavailable" and not cov.fused:
        cov.status = "unavailable"
    elif cov.fused:
        cov.status = "partly fused" if cov.not_fused else "fused"
    elif cov.not_fused:
        cov.status = "not fused"
    return cov


def report(build=False, only=None):
    """Coverage rows for every family of the installed mapping (``only``: a subset of model types)."""
    rows = []
    for mt, cls in sorted(mapping().items()):
        if only and mt not in only:
            continue
        if build:
            from fastvlm.coverage_build import built

            rows.append(built(mt, cls))
        else:
            rows.append(static(mt, cls))
    return rows


def render(rows, markdown=False):
    from fastvlm._table import markdown_table, text_table

    head = ("model type", "status", "fused", "not fused: why")
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if markdown:
        return f"{len(rows)} model types: {summary}\n\n" + markdown_table(head, [r.row() for r in rows])
    return f"{len(rows)} model types: {summary}\n" + text_table([head] + [r.row() for r in rows])


BEGIN, END = "<!-- coverage:begin", "<!-- coverage:end -->"


def readme_block(rows, version):
    """The README's family table: the Markdown rendering between marker comments, the first of which records the
    transformers version it was generated with (the table depends on it)."""
    return (f"{BEGIN} transformers={version} (generated by `fastvlm coverage --update-readme README.md`; do not edit "
            f"by hand) -->\n{render(rows, markdown=True)}\n{END}")


def readme_table(text):
    """(recorded transformers version, block) of the README text's generated table; (None, None) when absent."""
    import re

    m = re.search(re.escape(BEGIN) + r" transformers=(\S+) .*?" + re.escape(END), text, re.S)
    return (m.group(1), m.group(0)) if m else (None, None)


def update_readme(path, rows, version):
    """Rewrites the table between the markers in ``path``; True when it changed. Raises when the markers are absent."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    _, old = readme_table(text)
    if old is None:
        raise ValueError(f"{path}: no '{BEGIN} transformers=...' ... '{END}' markers to write the table between")
    new = readme_block(rows, version)
    if new != old:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace(old, new))
    return new != old


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastvlm coverage", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_types", nargs="*", help="only these model types (default: the whole mapping)")
    ap.add_argument("--build", action="store_true", help="build each model on the meta device and recognise its "
                    "modules as fastvlm.patch does (minutes)")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    ap.add_argument("--update-readme", metavar="PATH", help="rewrite the table between the coverage markers of this "
                    "README (the whole mapping, static mode)")
    args = ap.parse_args(argv)
    import transformers

    if args.update_readme:
        if args.model_types or args.build:
            ap.error("--update-readme writes the whole mapping's static table: no model types, no --build")
        rows = report()
        changed = update_readme(args.update_readme, rows, transformers.__version__)
        print(f"{args.update_readme}: {'updated' if changed else 'already current'} "
              f"(transformers {transformers.__version__})")
        return 0 if not any(r.status == "unlisted" for r in rows) else 1
    rows = report(build=args.build, only=set(args.model_types) or None)
    print(f"transformers {transformers.__version__}: image-text-to-text mapping")
    print(render(rows, markdown=args.markdown))
    return 0 if not any(r.status == "unlisted" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
