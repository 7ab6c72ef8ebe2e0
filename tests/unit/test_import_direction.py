"""Imports go one way: core ← features ← ranking ← offline_eval ← CLI (DESIGN.md).

Walks the AST of every module and fails on an import that points up the chain. The CLI
(``apex_rank/cli/``) and the lazy re-exports in ``apex_rank/__init__.py`` are the only
modules of the core allowed to reach up.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LEVEL = {"core": 0, "features": 1, "ranking": 2, "offline_eval": 3, "cli": 4}
FOLDERS = {"apex_rank": "core", "features": "features", "ranking": "ranking", "offline_eval": "offline_eval"}


def layer_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] in ("features", "ranking", "offline_eval"):
        return parts[0]  # a bare top-level import would also be wrong, but still classify it
    if parts[0] != "apex_rank":
        return None
    if len(parts) == 1:
        return "core"
    if parts[1] == "cli":
        return "cli"
    return parts[1] if parts[1] in ("features", "ranking", "offline_eval") else "core"


def layer_of_file(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "apex_rank" and len(rel.parts) > 1 and rel.parts[1] == "cli":
        return "cli"
    return FOLDERS[rel.parts[0]]


def violations() -> list[str]:
    bad = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "apex_rank" / "__init__.py":
                continue  # PEP 562 lazy re-exports (strings, not imports)
            here = layer_of_file(path)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in ("features", "ranking", "offline_eval"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports bare {name!r}")
                        continue
                    there = layer_of_module(name)
                    if there is not None and LEVEL[there] > LEVEL[here]:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({here}) imports {name} ({there})")
    return bad


def test_imports_point_down_the_chain_only() -> None:
    assert violations() == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    # the rule itself: a core module importing ranking is a violation, the CLI doing so is not
    assert LEVEL[layer_of_module("apex_rank.ranking.recommender")] > LEVEL["core"]  # type: ignore[index]
    assert LEVEL[layer_of_module("apex_rank.offline_eval")] < LEVEL["cli"]  # type: ignore[index]
    assert layer_of_file(ROOT / "apex_rank" / "cli" / "main.py") == "cli"
    assert layer_of_file(ROOT / "features" / "targets.py") == "features"


def test_import_apex_rank_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, apex_rank; print(any(m in sys.modules for m in ('faiss', 'lightgbm', 'redis', 'implicit')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_package_folder_is_in_the_wheel() -> None:
    """pyproject lists packages one by one (the package-dir mapping puts features/, ranking/ and
    offline_eval/ under apex_rank): a sub-package missing from the list is missing from a wheel
    while the editable install still finds it (apex_rank.ranking.online was), and py.typed ships."""
    import tomllib

    root = ROOT
    st = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for pkg, folder in st["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found <= set(st["packages"]), sorted(found - set(st["packages"]))
    assert "py.typed" in st["package-data"]["apex_rank"] and (root / "apex_rank" / "py.typed").is_file()


# The demo lives in one package (apex_rank/cli/demo/, issue 12): no library module imports it
# (test_no_library_module_imports_the_cli below, lazily inside a function, relatively or by a
# dotted string included), and none holds a demo module, function or class of its own.
DEMO = "apex_rank.cli.demo"
PACKAGE_OF = {"apex_rank": "apex_rank", "features": "apex_rank.features", "ranking": "apex_rank.ranking",
              "offline_eval": "apex_rank.offline_eval"}


def library_files() -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
            if p.relative_to(ROOT).parts[:2] != ("apex_rank", "cli")]


def named_modules(node: ast.Import | ast.ImportFrom | ast.Constant, package: str) -> list[str]:
    """The dotted names ``node`` imports (relative ones resolved in ``package``) or spells out."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        parts = package.split(".")
        base = parts[: len(parts) - node.level + 1] if node.level else []
        module = ".".join([*base, *([node.module] if node.module else [])])
        return [module, *(f"{module}.{a.name}" for a in node.names)]
    return [node.value] if isinstance(node.value, str) else []


def demo_definitions(path: Path) -> list[str]:
    """The functions and classes of ``path`` with "demo" in their name."""
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.name}:{node.lineno} defines {node.name}" for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and "demo" in node.name.lower()]


def test_no_library_package_holds_demo_code() -> None:
    bad = [f"{p.relative_to(ROOT)} is a demo module outside {DEMO}" for p in library_files() if "demo" in p.stem]
    bad += [f"{p.relative_to(ROOT).parent}/{hit}" for p in library_files() for hit in demo_definitions(p)]
    assert bad == []


def test_the_demo_checks_catch_absolute_relative_lazy_and_named_references(tmp_path: Path) -> None:
    mod = tmp_path / "mod.py"
    mod.write_text("from apex_rank.cli.demo.online import online_stage\n"
                   "from ..cli import demo\n"
                   "def f():\n    import apex_rank.cli.demo\n"
                   "LAZY = {'x': 'apex_rank.cli.demo.build'}\n"
                   "def recommender_demo():\n    pass\n"
                   "import apex_rank.cli.demos_elsewhere\n")
    named = [(node.lineno, n) for node in ast.walk(ast.parse(mod.read_text()))
             if isinstance(node, ast.Import | ast.ImportFrom | ast.Constant)
             for n in named_modules(node, "apex_rank.ranking")]
    assert sorted({line for line, n in named if within(n, DEMO)}) == [1, 2, 4, 5], named
    assert demo_definitions(mod) == ["mod.py:6 defines recommender_demo"]
    assert library_files() and all("cli" not in p.relative_to(ROOT).parts[:2] for p in library_files())


# Sub-layers (issue 12): only the build side imports the APEX build modules (the build of
# ranking/ is ranking/build.py). Lazy imports inside functions, relative imports and dotted
# strings all count.
BUILD_MODULES = ("apex_rank.training", "apex_rank.features.apex_tables")
BUILD_SIDE = (
    "apex_rank.features.apex_tables",
    "apex_rank.ranking.build",  # trains APEX when Recommender.build is given no predictor
    "apex_rank.ranking.config",  # ApexFitConfig.train_config: the TrainConfig of the APEX recipe
    "apex_rank.offline_eval",
    "apex_rank.cli",
)
ONLINE = "apex_rank.ranking.online"
ENGINES = ("apex_rank.ranking.online.engine", "apex_rank.ranking.online.batching")
STORES = ("apex_rank.ranking.online.store", "apex_rank.ranking.online.redis_store",
          "apex_rank.ranking.online.memory_store")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGE_OF[rel.parts[0]], *rel.parts[1:-1]]
    return ".".join(parts if path.stem == "__init__" else [*parts, path.stem])


def references(path: Path) -> list[tuple[int, str, ast.AST]]:
    """``(line, dotted name, node)`` for every module ``path`` imports or names in a string."""
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    return [(node.lineno, n, node) for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Import | ast.ImportFrom | ast.Constant)
            for n in named_modules(node, package)]


def within(name: str, packages: tuple[str, ...] | str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ((packages,) if isinstance(packages, str) else packages))


def all_files() -> list[Path]:
    return [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]


def test_only_the_build_side_imports_a_build_module() -> None:
    files = all_files()
    assert set(BUILD_MODULES) <= {module_name(p) for p in files}, "a build module is gone: update BUILD_MODULES"
    bad = []
    for path in files:
        here = module_name(path)
        if here == "apex_rank" or within(here, (*BUILD_MODULES, *BUILD_SIDE)):
            continue  # the package's lazy re-exports (ApexTrainer, TrainConfig); the build side
        bad += [f"{path.relative_to(ROOT)}:{line} imports {n}" for line, n, _ in references(path)
                if within(n, BUILD_MODULES)]
    assert bad == []


def test_online_serving_imports_no_build_evaluation_or_cli_module() -> None:
    banned = (*BUILD_MODULES, "apex_rank.offline_eval", "apex_rank.cli")
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n}" for p in all_files() if within(module_name(p), ONLINE)
           for line, n, _ in references(p) if within(n, banned)]
    assert bad == []


def test_no_library_module_imports_the_cli() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n}" for p in library_files()
           for line, n, _ in references(p) if within(n, "apex_rank.cli")]
    assert bad == []


def store_references(path: Path) -> list[str]:
    """Where ``path`` imports or names a store module (the contract or an implementation)."""
    return [f"{path.name}:{line} takes {n}" for line, n, _ in references(path) if within(n, STORES)]


def test_the_online_engine_never_imports_a_store_module() -> None:
    engines = [p for p in all_files() if module_name(p) in ENGINES]
    assert len(engines) == len(ENGINES), "an engine module is gone: update ENGINES"
    assert [hit for p in engines for hit in store_references(p)] == []


# Sub-layers of ranking/ (issue 12). Components (candidates, cf, index, content_map, reranker,
# rerank_features, state) <- config, pipeline, bundle <- build <- the Recommender facade.
BUILD = "apex_rank.ranking.build"
FACADE = "apex_rank.ranking.recommender"
# Only the facade runs the build (Recommender.build); the CLI, the evaluation and the demo build
# through it. A module that needs one build step on its own joins this list, with its reason.
BUILD_IMPORTERS = (FACADE,)
# What ranking/online may take from the offline ranking package: the serving pipeline, the
# bundle, the user and song state, the configs and the components the pipeline is made of;
# never the build.
ONLINE_MAY_TAKE = tuple(f"apex_rank.ranking.{m}" for m in (
    "pipeline", "bundle", "state", "config", "candidates", "cf", "index", "content_map", "reranker", "rerank_features"))
# The engine also takes the facade: it serves a loaded Recommender (its pipeline() with its own
# als source, add_songs for ingested songs, user_state to publish the bundle's users), and adding
# songs to a catalogue lives in the facade, not in the pipeline or the bundle.
ONLINE_MAY_TAKE_THE_FACADE = ("apex_rank.ranking.online.engine",)


def offline_ranking_module(name: str) -> str | None:
    """The module of the offline ranking package that ``name`` points into (None: outside it)."""
    parts = name.split(".")
    if parts[:2] != ["apex_rank", "ranking"] or len(parts) < 3 or parts[2] == "online":
        return None
    return ".".join(parts[:3])


def taken_wrongly_online(here: str, names: list[str]) -> list[str]:
    """The names an online module ``here`` must not take from the offline ranking package."""
    allowed = (*ONLINE_MAY_TAKE, *((FACADE,) if here in ONLINE_MAY_TAKE_THE_FACADE else ()))
    return [n for n in names if (m := offline_ranking_module(n)) is not None and m not in allowed]


def test_nothing_but_the_facade_imports_the_build() -> None:
    files = all_files()
    assert {BUILD, FACADE} <= {module_name(p) for p in files}, "the build or the facade moved: update BUILD/FACADE"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n}" for p in files
           if module_name(p) not in (BUILD, *BUILD_IMPORTERS)
           for line, n, _ in references(p) if within(n, BUILD)]
    assert bad == []


def test_the_pipeline_bundle_and_config_import_neither_the_build_nor_the_facade() -> None:
    below = ("apex_rank.ranking.pipeline", "apex_rank.ranking.bundle", "apex_rank.ranking.config")
    files = [p for p in all_files() if module_name(p) in below]
    assert len(files) == len(below), "a serving module moved: update the list"
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n}" for p in files
           for line, n, _ in references(p) if within(n, (BUILD, FACADE))]
    assert bad == []


def test_online_takes_only_the_pipeline_bundle_state_and_components() -> None:
    bad = [f"{p.relative_to(ROOT)} takes {n}" for p in all_files() if within(module_name(p), ONLINE)
           for n in taken_wrongly_online(module_name(p), [n for _, n, _ in references(p)])]
    assert bad == []


def test_the_online_rule_catches_build_facade_and_relative_imports() -> None:
    tree = ast.parse("from ..build import training_frame\nfrom apex_rank.ranking import recommender\n"
                     "import apex_rank.ranking.pipeline\nfrom ..state import UserState\nfrom .keys import Keys\n")
    names = [n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
             for n in named_modules(node, ONLINE)]
    wrong = taken_wrongly_online("apex_rank.ranking.online.ranker", names)
    assert sorted({offline_ranking_module(n) for n in wrong}) == [BUILD, FACADE]
    assert {offline_ranking_module(n) for n in taken_wrongly_online(ONLINE_MAY_TAKE_THE_FACADE[0], names)} == {BUILD}
