"""The package layout imports downward only.

Every import in ``emu2/`` (module level and inside functions) is read with `ast`. Each subpackage (``model``,
``data``, ``train``, ...) and each top-level module (``config``, ``processing``, ``pipeline``, ``cli``) is one
node. A node may import only from nodes in lower layers, which rules out cycles:

    0  config, processing,  presets, the tokenizer/chat-template/image-input conventions and the one learning-rate
       lr_schedule          schedule of every training stage: no emu2 imports
    1  model                nn modules and their tensor-level parts: Emu2ForCausalLM and its generation loops, the
                            EVA ViT, diffusion-decoder helpers and configs, quantized loading
    2  data                 sequence layout, shards, converters, the shapes world, box-mask images, decoder crops
    3  pipelines            one loader and call each: Emu2 / Emu2-Chat, Emu2-Gen, the image and video decoders
    4  convert, eval        official and third-party formats in and out (LM, Gen, SDXL parts); few-shot
                            evaluation, RICES, probes, image metrics
    5  train                the runner and every recipe stage (LM, encoder, image/video decoder), quickstart
    6  serve, bench         the HTTP server; throughput benchmarks
    7  cli                  ``emu2 ...`` verbs

A name with a leading underscore is private to its node: importing one (or a private module) from another node
is refused too, so each node's public surface is what its docstring and ``__all__`` describe.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "emu2"

LAYERS = [
    {"config", "processing", "lr_schedule"},
    {"model"},
    {"data"},
    {"pipelines"},
    {"convert", "eval"},
    {"train"},
    {"serve", "bench"},
    {"cli"},
]
LAYER_OF = {node: level for level, nodes in enumerate(LAYERS) for node in nodes}


@dataclass(frozen=True)
class Import:
    source: str  # the importing node
    target: str  # the imported node
    module: str  # the imported module, dotted
    names: tuple[str, ...]  # names taken from it (empty for ``import x``)
    where: str  # path:line


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _node(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "emu2" and len(parts) > 1 else None


def emu2_imports() -> list[Import]:
    """Every import of one emu2 node by another, from every module of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = _node(module)
        if source is None:  # emu2/__init__.py
            continue
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        where = str(path.relative_to(PACKAGE.parent))
        for statement in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(statement, ast.Import):
                targets = [(alias.name, ()) for alias in statement.names]
            elif isinstance(statement, ast.ImportFrom):
                if statement.level:
                    base = package.split(".")[: len(package.split(".")) - statement.level + 1]
                    imported = ".".join(base + ([statement.module] if statement.module else []))
                else:
                    imported = statement.module or ""
                names = tuple(alias.name for alias in statement.names)
                if imported == "emu2":  # ``from emu2 import data``: each name is a node
                    targets = [(f"emu2.{name}", ()) for name in names]
                else:
                    targets = [(imported, names)]
            else:
                continue
            for imported, names in targets:
                target = _node(imported)
                if target is not None and target != source:
                    found.append(Import(source, target, imported, names, f"{where}:{statement.lineno}"))
    return found


def test_the_layers_name_every_node_of_the_package():
    nodes = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    nodes |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert nodes == set(LAYER_OF), "add the new node to LAYERS (and the docstring) at the layer it belongs to"


def test_the_import_reader_sees_function_level_and_relative_imports():
    # emu2.cli imports its verbs inside functions; emu2.pipelines imports the model with relative imports.
    edges = {(i.source, i.target) for i in emu2_imports()}
    assert ("cli", "train") in edges and ("pipelines", "model") in edges


def test_packages_import_only_from_lower_layers():
    upward = [f"{i.where}: {i.source} (layer {LAYER_OF[i.source]}) imports {i.module} (layer {LAYER_OF[i.target]})"
              for i in emu2_imports() if LAYER_OF[i.target] >= LAYER_OF[i.source]]
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(upward)


def test_no_package_import_cycle():
    graph: dict[str, set[str]] = {}
    for i in emu2_imports():
        graph.setdefault(i.source, set()).add(i.target)

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        for target in sorted(graph.get(node, ())):
            found = cycle_from(target, path + [node])
            if found:
                return found
        return None

    for node in sorted(graph):
        cycle = cycle_from(node, [])
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_package():
    private = [f"{i.where}: {i.source} imports {name} from {i.module}"
               for i in emu2_imports()
               for name in (i.names or (i.module,))
               if any(part.startswith("_") and not part.startswith("__") for part in (name, *i.module.split(".")))]
    assert not private, "private names used across packages (make them public or move them):\n" + "\n".join(private)


def test_the_tests_use_public_names_only():
    # A test that imports a private helper pins how the code is written, not what it does.
    tests = Path(__file__).resolve().parent
    private = []
    for path in sorted(tests.rglob("*.py")):
        for statement in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith("emu2"):
                private += [f"{path.relative_to(tests)}:{statement.lineno} {statement.module}.{alias.name}"
                            for alias in statement.names if alias.name.startswith("_")]
                if any(part.startswith("_") for part in statement.module.split(".")):
                    private.append(f"{path.relative_to(tests)}:{statement.lineno} {statement.module}")
    assert not private, private
