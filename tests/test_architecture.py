"""The core stays platform-free: bot/ never imports a platform library, torch or aiosqlite."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "discord",
    "telegram",
    "torch",
    "diffusers",
    "transformers",
    "aiosqlite",
    "PIL",
    "aiohttp",
    "httpx",
}
# The composition root wires the packages together; it imports them inside functions only.
COMPOSITION_ROOT = ROOT / "bot" / "__main__.py"


def _imports(tree: ast.AST, top_level_only: bool) -> set[str]:
    nodes = tree.body if top_level_only and isinstance(tree, ast.Module) else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_core_modules_import_no_platform_library() -> None:
    for path in sorted((ROOT / "bot").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # no library anywhere in bot/, not even inside a function
        bad = _imports(tree, top_level_only=False) & FORBIDDEN
        assert not bad, f"{path.name} imports {sorted(bad)}"
        # the other packages only inside the composition root's functions
        imported = _imports(tree, top_level_only=path == COMPOSITION_ROOT)
        bad = imported & {"adapters", "generation", "data"}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_core_loads_no_heavy_library() -> None:
    modules = [f"bot.{p.stem}" for p in (ROOT / "bot").glob("*.py") if p.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted(n for n in {sorted(FORBIDDEN)!r} if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_adapters_do_not_import_each_other_or_torch() -> None:
    # the console module and every module of the platform packages (adapters/discord/, adapters/telegram/)
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        name = str(path.relative_to(ROOT / "adapters"))
        imported = _imports(ast.parse(path.read_text(encoding="utf-8")), top_level_only=False)
        assert not imported & {"torch", "diffusers", "aiosqlite", "generation", "data"}, name
        own = {platform for platform in ("discord", "telegram") if name.startswith(platform)}
        assert not imported & ({"discord", "telegram"} - own), f"{name} imports another platform"
        if (
            own
        ):  # ``adapters.discord`` imports the library by its absolute name, never itself by a relative one
            relative = [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                        if isinstance(n, ast.ImportFrom) and n.level > 0]  # fmt: skip
            assert not relative, f"{name} uses a relative import"


def test_platform_packages_keep_small_modules() -> None:
    for platform in ("discord", "telegram"):
        for path in sorted((ROOT / "adapters" / platform).glob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= 420, f"adapters/{platform}/{path.name} has {lines} lines"


def test_platform_modules_do_not_shadow_libraries() -> None:
    names = {p.stem for p in (ROOT / "adapters").glob("*.py")}
    assert not names & {"discord", "telegram"}
